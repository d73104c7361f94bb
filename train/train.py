#!/usr/bin/env python
"""Train a chest X-ray model: ``python train/train.py --config train/configs/resnet18.yaml [--epochs 3 ...]``.

A thin wrapper of ``chestxray train`` (:mod:`chestxray.train_cli`), kept for ``torchrun``, which
wants a script: ``torchrun --nproc_per_node 2 train/train.py ...``. Needs the package installed
(``pip install -e .``, see the README).
"""
from __future__ import annotations

import sys

try:
    from chestxray.train_cli import main
except ModuleNotFoundError as err:  # the package itself, or one of its dependencies, is not installed
    sys.exit(f"error: {err}: install the project first (pip install -e . in the checkout, see the README)")

if __name__ == "__main__":
    raise SystemExit(main(prog="train/train.py"))
