"""Class activation maps: every label from one forward pass, other pytorch-grad-cam methods, overlays.

Why the fast path is exact: all supported models end in global average pooling + one linear layer,
so the gradient of logit k with respect to the final feature map A is W[k] / (h*w) at every
position. Grad-CAM's channel weights are therefore W[k] (up to a constant), and
``relu(sum_c W[k, c] * A_c)`` min-max scaled *is* Grad-CAM (and HiResCAM) for label k. One forward
gives the probabilities and the maps of all labels; ``tests/test_cam.py`` checks it against
pytorch-grad-cam.

Maps are min-max scaled per label, so a label at p=0.01 still gets a full-range heatmap: always
show the probability beside a map.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chestxray.models import arch_spec, target_layer

#: Methods by user-facing name. "gradcam" uses the one-forward path; the rest go through
#: pytorch-grad-cam (EigenCAM ignores the label; ScoreCAM costs one forward per channel).
METHODS: dict[str, str] = {
    "gradcam": "GradCAM",
    "hirescam": "HiResCAM",
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
    "scorecam": "ScoreCAM",
}
FAST_METHODS = ("gradcam", "hirescam")


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Scales each map (last two dims) to [0,1], as pytorch-grad-cam does."""
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    maps = maps - lo
    return maps / (maps.amax(dim=(-2, -1), keepdim=True) + 1e-7)


def all_label_cams(feats: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of every label from the final feature map.

    Args:
        feats: B x C x h x w final features (NCHW).
        weight: K x C classifier weight.

    Returns:
        B x K x h x w maps in [0,1] (feature resolution; upsample with :func:`upsample`).
    """
    cams = torch.einsum("kc,bchw->bkhw", weight.to(feats.dtype), feats).clamp_min_(0)
    return minmax(cams)


def upsample(maps: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of ... x h x w maps to ``size`` (H, W); returns float32 numpy in [0,1]."""
    t = torch.as_tensor(maps, dtype=torch.float32).detach()
    lead = t.shape[:-2]
    t = t.reshape(1, -1, *t.shape[-2:])
    t = F.interpolate(t, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)
    return t.reshape(*lead, *t.shape[-2:]).clamp_(0, 1).numpy()


def cam_at(cam: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One map upsampled to ``size`` and min-max scaled again, as pytorch-grad-cam presents it."""
    return minmax(torch.from_numpy(upsample(cam, size))).numpy()


def nhwc_to_nchw(t: torch.Tensor) -> torch.Tensor:
    """Reshape for pytorch-grad-cam on timm's channels-last Swin features (B,H,W,C -> B,C,H,W)."""
    return t.permute(0, 3, 1, 2)


def method_cam(model: nn.Module, arch: str, x: torch.Tensor, label_index: int, method: str = "gradcam") -> np.ndarray:
    """One label's map by a pytorch-grad-cam method, on that label's logit (never the argmax).

    Args:
        model: the model in eval mode.
        arch: its architecture (for the target layer and the Swin reshape).
        x: 1 x C x H x W preprocessed input.
        label_index: index of the label's logit.
        method: a key of :data:`METHODS`.

    Returns:
        H x W float32 map in [0,1] at the input resolution.
    """
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of: {', '.join(METHODS)}")
    cls = getattr(pytorch_grad_cam, METHODS[method])
    reshape: Callable | None = nhwc_to_nchw if arch_spec(arch).nhwc else None
    kwargs = {"batch_size": 16} if method == "scorecam" else {}
    with torch.enable_grad(), cls(model=model, target_layers=[target_layer(model, arch)],
                                  reshape_transform=reshape, **kwargs) as cam:
        out = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(label_index))])
    return np.asarray(out[0], dtype=np.float32)


def _jet_lut() -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


_LUT: np.ndarray | None = None


def overlay(gray: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Blends a heatmap over a gray image.

    Args:
        gray: H x W image in [0,1] (the decoded film as displayed).
        cam: h x w map in [0,1]; resized to H x W if needed.
        alpha: heatmap opacity in [0,1].

    Returns:
        H x W x 3 uint8 RGB.
    """
    global _LUT
    if _LUT is None:
        _LUT = _jet_lut()
    if cam.shape != gray.shape:
        cam = upsample(cam, gray.shape)
    heat = _LUT[np.clip(cam * 255.0, 0, 255).astype(np.uint8)].astype(np.float32)
    base = np.repeat(np.clip(gray, 0, 1)[..., None] * 255.0, 3, axis=2)
    a = float(np.clip(alpha, 0.0, 1.0))
    return np.clip((1 - a) * base + a * heat, 0, 255).astype(np.uint8)
