"""What a checkpoint folder holds and where the shipped ones live: the ground floor of loading.

:mod:`chestxray.checkpoint` loads folders and resolves model references through
:mod:`chestxray.hub`; both need these few names, so they live here and neither imports the other
in a circle (``tests/test_layering.py`` checks it).
"""
from __future__ import annotations

import os
from pathlib import Path

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, pickled, or inconsistent. One-line message."""


def weights_dir() -> Path:
    """The folder of shipped checkpoints (``weights/`` beside the package, or $CHESTXRAY_WEIGHTS)."""
    env = os.environ.get("CHESTXRAY_WEIGHTS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "weights"
