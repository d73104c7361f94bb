"""Test helpers: tiny real checkpoints written to tmp folders."""
from __future__ import annotations

from pathlib import Path

import torch

from chestxray.checkpoint import save_checkpoint
from chestxray.ckpt_config import CkptMeta
from chestxray.labels import get_label_set
from chestxray.models import create_model


def make_checkpoint(folder: Path, arch: str = "test_efficientnet", labels: list[str] | None = None,
                    img_size: int = 64, seed: int = 0, half: bool = False, meta: CkptMeta | None = None,
                    **fields) -> Path:
    """Writes a randomly initialised (seeded) checkpoint folder with the project's writer and returns it.

    The ``chestxray`` block is ``meta``, or built from ``fields`` in its dict form (``training={...}``);
    thresholds are 0.5 for every label.
    """
    labels = labels or get_label_set("nih14")
    torch.manual_seed(seed)
    model = create_model(arch, len(labels), img_size=img_size).eval()
    thresholds = {k: 0.5 for k in labels}
    return save_checkpoint(model, folder, arch=arch, labels=labels, img_size=img_size, thresholds=thresholds,
                           meta=meta or CkptMeta.from_dict(fields), half=half)
