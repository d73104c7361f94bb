"""Build hook: a wheel built from a checkout carries the shipped weights and the model list.

Everything else is declared in ``pyproject.toml``. ``weights/`` and ``models.yaml`` live at the
checkout's root (the app, the tests and ``release`` use them there), so ``build_py`` copies them into
the package as ``chestxray/shipped/`` (the third place :func:`chestxray.layout.weights_dir` looks).
An editable install (``pip install -e .``) copies nothing: it reads the checkout itself.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
#: What a shipped checkpoint needs at run time: weights, config (labels, thresholds, card data),
#: the input gate, and the model card. Plots, predictions and splits stay in the checkout. An ensemble
#: folder (chestxray/ensemble.py) has only the config and the card: its members hold the weights.
CHECKPOINT_FILES = ("config.json", "model.safetensors", "gate.safetensors", "README.md")


def _is_ensemble(folder: Path) -> bool:
    """A folder whose config.json names ensemble members instead of carrying weights."""
    import json

    try:
        return bool(json.loads((folder / "config.json").read_text()).get("chestxray", {}).get("ensemble"))
    except (OSError, ValueError, AttributeError):
        return False


class BuildPyWithShipped(build_py):
    """``build_py`` plus ``models.yaml`` and ``weights/<name>/`` under ``chestxray/shipped/``."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dest = Path(self.build_lib) / "chestxray" / "shipped"
        if (ROOT / "models.yaml").is_file():
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / "models.yaml", dest / "models.yaml")
        for folder in sorted((ROOT / "weights").glob("*")):
            if folder.name.startswith(".") or folder.suffix == ".tmp" or not (
                    (folder / "model.safetensors").is_file() or _is_ensemble(folder)):
                continue
            (dest / "weights" / folder.name).mkdir(parents=True, exist_ok=True)
            for name in CHECKPOINT_FILES:
                if (folder / name).is_file():
                    shutil.copyfile(folder / name, dest / "weights" / folder.name / name)


setup(cmdclass={"build_py": BuildPyWithShipped})
