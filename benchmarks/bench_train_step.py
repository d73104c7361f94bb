"""CPU training-step speed with glibc's default allocator settings vs those of ``train/env.sh``.

    .venv/bin/python -m benchmarks.bench_train_step --arch mobilenetv2_100 --sizes 320 384

Each setting runs in a fresh process (glibc reads its ``MALLOC_*`` variables once, at start-up), which times
``--steps`` AdamW steps of ``--arch`` (1-channel input, channels-last, as ``chestxray train`` runs it) on a
random batch and reports the best step after the first, with the kernel time and minor page faults per step.
The gap is the allocator: by default glibc unmaps each freed activation tensor and maps it afresh next step.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

# train/env.sh's values; kept in step with it by tests/test_train_env.py.
TUNED = {"MALLOC_MMAP_THRESHOLD_": "17179869184", "MALLOC_TRIM_THRESHOLD_": "17179869184",
         "MALLOC_TOP_PAD_": "1073741824"}


def child(arch: str, size: int, batch: int, steps: int, threads: int) -> dict:
    """Times ``steps`` training steps in this process; returns the best step's figures (after the first)."""
    import resource
    import time

    import torch

    from chestxray.models import create_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(arch, 15, in_chans=1, img_size=size).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    x = torch.randn(batch, 1, size, size).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, 15) > 0.8).float()
    rows = []
    for _ in range(steps):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        rows.append({"s": t1 - t0, "sys": r1.ru_stime - r0.ru_stime, "faults": r1.ru_minflt - r0.ru_minflt})
    best = min(rows[1:], key=lambda r: r["s"])
    return {**best, "img_s": batch / best["s"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="mobilenetv2_100")
    ap.add_argument("--sizes", type=int, nargs="+", default=[320])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="steps per process; the first (warm-up) is not counted")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=320, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.arch, args.size, args.batch, args.steps, args.threads)))
        return
    base = {k: v for k, v in os.environ.items() if k not in TUNED}
    print(f"{args.arch}, batch {args.batch}, {args.threads} threads, best of {args.steps - 1} steps")
    print(f"{'size':>5} {'allocator':<16} {'img/s':>6} {'s/step':>7} {'kernel s':>9} {'page faults':>12}")
    for size in args.sizes:
        for name, env in (("glibc default", base), ("train/env.sh", {**base, **TUNED})):
            cmd = [sys.executable, "-m", "benchmarks.bench_train_step", "--child", "--arch", args.arch,
                   "--size", str(size), "--batch", str(args.batch), "--steps", str(args.steps),
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{size:>5} {name:<16} {r['img_s']:>6.1f} {r['s']:>7.2f} {r['sys']:>9.2f} {r['faults']:>12,}")


if __name__ == "__main__":
    main()
