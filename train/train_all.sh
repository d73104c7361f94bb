#!/usr/bin/env bash
# Reproduces every shipped checkpoint: trains the five recipes (resumable: re-run to continue),
# then evaluates each best checkpoint on its held-out test split and installs it in weights/.
# The ImageNet-initialised EfficientNets come first: released, they are the teachers of the
# other three (train/configs/student.yaml).
# Usage: bash train/train_all.sh [arch ...]        (default: every train/configs/<arch>.yaml, teachers first)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
source train/env.sh
source train/runs.sh
ARCHS=("$@")
[ ${#ARCHS[@]} -gt 0 ] || mapfile -t ARCHS < <("$PY" -m chestxray.recipes)
for arch in "${ARCHS[@]}"; do
  if [ ! -f "runs/$arch/DONE" ]; then
    "$PY" train/train.py --config "train/configs/$arch.yaml" --resume true
    touch "runs/$arch/DONE"
  fi
  if [ "${SKIP_RELEASE:-0}" != 1 ]; then
    "$PY" -m chestxray release "runs/$arch" --name "$arch"
  fi
done
if [ "${SKIP_RELEASE:-0}" != 1 ]; then
  "$PY" -c "from chestxray.release import mark_default; print('default model:', mark_default('models.yaml'))"
fi
