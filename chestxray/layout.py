"""What a checkpoint folder holds and where the shipped ones live: the ground floor of loading.

:mod:`chestxray.checkpoint` loads folders and resolves model references through
:mod:`chestxray.hub`; both need these few names, so they live here and neither imports the other
in a circle (``tests/test_layering.py`` checks it). Nothing here imports torch.

Where shipped things are found (one rule, the same for the library, the CLI and the app):

- **Weights** (:func:`weights_dir`): ``$CHESTXRAY_WEIGHTS`` when set; else the checkout's ``weights/``
  when the package is imported from a checkout (the source tree, or an editable install); else the
  weights installed with the package (``chestxray/shipped/weights``, copied there when a wheel is
  built from a checkout). ``hf-hub:`` references (``models.yaml``, ``--model``) are resolved through
  the Hugging Face cache or the Hub and fall back to these folders (:mod:`chestxray.hub`).
- **The model list** (:func:`models_file`): ``$CHESTXRAY_MODELS`` when set; else the checkout's
  ``models.yaml``; else the copy installed with the package (``chestxray/shipped/models.yaml``).
"""
from __future__ import annotations

import os
from pathlib import Path

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
WEIGHTS_ENV = "CHESTXRAY_WEIGHTS"
MODELS_ENV = "CHESTXRAY_MODELS"
DATA_ENV = "CHESTXRAY_DATA"
MODELS_FILE = "models.yaml"
#: Where a wheel built from a checkout carries the shipped weights and model list (see setup.py).
PACKAGED = Path(__file__).resolve().parent / "shipped"
#: The folder above the package: a checkout's root when the package is imported from one.
_ABOVE = Path(__file__).resolve().parents[1]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, pickled, or inconsistent. One-line message."""


def checkout_root() -> Path | None:
    """The checkout the package is imported from (source tree or editable install), else None.

    An installed package lives in ``site-packages``, which holds no ``pyproject.toml``; a folder of
    that name from another project is never mistaken for ours because the file must name us.
    """
    pyproject = _ABOVE / "pyproject.toml"
    try:
        if pyproject.is_file() and 'name = "chestxray"' in pyproject.read_text(errors="replace"):
            return _ABOVE
    except OSError:
        pass
    return None


def weights_dir() -> Path:
    """The folder of shipped checkpoints: ``$CHESTXRAY_WEIGHTS``, the checkout's, or the installed one.

    Returns the checkout's (or else the installed) path even when it does not exist, so that callers
    can name it in their "no model installed" message.
    """
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        return Path(env).expanduser()
    root = checkout_root()
    if root is not None and (root / "weights").is_dir():
        return root / "weights"
    if (PACKAGED / "weights").is_dir() or root is None:
        return PACKAGED / "weights"
    return root / "weights"


def models_file() -> Path | None:
    """The model list: ``$CHESTXRAY_MODELS``, the checkout's ``models.yaml``, the installed copy, or None."""
    env = os.environ.get(MODELS_ENV)
    if env:
        return Path(env).expanduser()
    root = checkout_root()
    for candidate in ([root / MODELS_FILE] if root else []) + [PACKAGED / MODELS_FILE]:
        if candidate.is_file():
            return candidate
    return None


def default_data_root() -> str:
    """The shared data folder: ``$CHESTXRAY_DATA``, else ``shared/data`` beside the checkout, else ``../shared/data``."""
    env = os.environ.get(DATA_ENV)
    if env:
        return env
    root = checkout_root()
    return str(root.parent / "shared" / "data") if root else "../shared/data"
