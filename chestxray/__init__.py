"""chestxray: multi-label chest X-ray classification with explanations.

The small public API::

    from chestxray import Predictor, read_image
    pred = Predictor.load("resnet18")            # shipped name, folder, or hf-hub:org/name@revision
    probs = pred.predict("film.dcm")             # {label: probability}
    analysis = pred.analyze(read_image("film.png"))   # probabilities + Grad-CAM of every label
    rgb = analysis.overlay("Effusion", alpha=0.4)

The names are imported on first use (module ``__getattr__``): ``import chestxray`` and the command
line's ``--help`` stay fast and never import torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and IDEs only; at run time see __getattr__
    from chestxray.imaging import ImageReadError, XrayImage, read_image
    from chestxray.labels import LABEL_SETS, get_label_set
    from chestxray.predictor import Analysis, Predictor

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_LAZY = {"Analysis": "chestxray.predictor", "Predictor": "chestxray.predictor",
         "ImageReadError": "chestxray.imaging", "XrayImage": "chestxray.imaging", "read_image": "chestxray.imaging",
         "LABEL_SETS": "chestxray.labels", "get_label_set": "chestxray.labels"}

__all__ = ["Analysis", "ImageReadError", "LABEL_SETS", "Predictor", "XrayImage", "get_label_set", "read_image"]


def __getattr__(name: str) -> Any:
    """Imports a public name's module on first access (PEP 562) and caches the name here."""
    if name not in _LAZY:
        raise AttributeError(f"module 'chestxray' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
