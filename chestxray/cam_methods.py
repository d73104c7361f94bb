"""The explanation methods and heatmap scales the app offers: one table, read without importing torch.

:mod:`chestxray.cam` computes the maps; this module only names them, so that the app builds its menus
before torch and timm are imported.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CamMethod:
    """One explanation method: its pytorch-grad-cam class, its menu title, and how it is computed."""

    cls: str  # class name in pytorch_grad_cam
    title: str  # what the app's method menu shows
    #: Drawn from the stored all-label maps of :func:`chestxray.cam.all_label_cams` (no extra pass): exact for these
    #: architectures (global average pooling + one linear layer), so the title says "(fast)".
    fast: bool = False
    #: Attributes set on the pytorch-grad-cam object (ScoreCAM's ``batch_size`` is one, not a constructor argument).
    attrs: tuple[tuple[str, object], ...] = ()
    note: str = ""  # a caveat shown with its map


#: Every method by user-facing name: the one table the app's menu, the predictor and the report read.
#: EigenCAM ignores the label; ScoreCAM costs one forward pass per channel.
CAM_METHODS: dict[str, CamMethod] = {
    "gradcam": CamMethod("GradCAM", "Grad-CAM (fast)", fast=True),
    "hirescam": CamMethod("HiResCAM", "HiResCAM (fast)", fast=True),
    "gradcam++": CamMethod("GradCAMPlusPlus", "Grad-CAM++"),
    "xgradcam": CamMethod("XGradCAM", "XGradCAM"),
    "layercam": CamMethod("LayerCAM", "LayerCAM"),
    "eigencam": CamMethod("EigenCAM", "EigenCAM (no label)", note="EigenCAM ignores the label: every label gets "
                                                                  "the same map."),
    "scorecam": CamMethod("ScoreCAM", "Score-CAM (slow)", attrs=(("batch_size", 16),)),
}
#: Views of :data:`CAM_METHODS` under their older names: name -> class, fast names, name -> title.
METHODS: dict[str, str] = {k: m.cls for k, m in CAM_METHODS.items()}
FAST_METHODS: tuple[str, ...] = tuple(k for k, m in CAM_METHODS.items() if m.fast)
METHOD_TITLES: dict[str, str] = {k: m.title for k, m in CAM_METHODS.items()}


#: How a map is scaled before it is coloured: name -> what the colour bar's 1 then means.
SCALES: dict[str, str] = {
    "minmax": "per-label range: 1 is this label's strongest evidence in this image, whatever its probability",
    "probability": "scaled by probability: the map times the label's probability, so 1 would need p = 1 "
                   "and a low-probability label is drawn faint",
}
