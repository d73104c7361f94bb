# Sourced by the training scripts: the environment every training process runs in.
# Torch threads: 2 on the 2-core machines (TRAIN_THREADS=1 is steadier when another process shares the cores).
export OMP_NUM_THREADS=${TRAIN_THREADS:-${OMP_NUM_THREADS:-2}} HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
# glibc hands every large tensor (a batch's activations: tens to hundreds of MB) back to the kernel when it is
# freed and maps it afresh on the next step, so each training step paid ~1.5 million page faults, more time in
# the kernel than in the network on some machines (MobileNetV2, 320 px, batch 32: 5.8 img/s, 0 faults and
# 14.8 img/s with these; benchmarks/bench_train_step.py). Keeping the freed memory in the process costs only
# the peak resident size, which the process reaches anyway.
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-17179869184} \
  MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-17179869184} MALLOC_TOP_PAD_=${MALLOC_TOP_PAD_:-1073741824}
