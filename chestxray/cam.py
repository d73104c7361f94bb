"""Class activation maps: every label from one forward pass, other pytorch-grad-cam methods, overlays.

Why the fast path is exact: all supported models end in global average pooling + one linear layer,
so the gradient of logit k with respect to the final feature map A is W[k] / (h*w) at every
position. Grad-CAM's channel weights are therefore W[k] (up to a constant), and
``relu(sum_c W[k, c] * A_c)`` min-max scaled *is* Grad-CAM (and HiResCAM) for label k. One forward
gives the probabilities and the maps of all labels; ``tests/test_cam.py`` checks it against
pytorch-grad-cam.

Maps are min-max scaled per label, so a label at p=0.01 still gets a full-range heatmap: always
show the probability beside a map, or draw it scaled by the probability (:func:`scale_map`), which
makes a low-probability label faint.

Overlays use viridis (perceptually uniform, readable with the common colour-vision deficiencies;
jet is neither) and an opacity that grows with the map value, so where the map is 0 the film shows
through untouched; :func:`add_colorbar` appends the key. There is one rendering path:
:meth:`chestxray.predictor.Analysis.overlay` for every map the app and the CLI draw.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chestxray.cam_methods import (CAM_METHODS, FAST_METHODS, METHOD_TITLES, METHODS, SCALES,  # noqa: F401
                                   CamMethod)  # re-exported: the table lives where the app reads it without torch
from chestxray.models import arch_spec, target_layer


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
        method: a key of :data:`CAM_METHODS`.

    Returns:
        H x W float32 map in [0,1] at the input resolution.
    """
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of: {', '.join(METHODS)}")
    cls = getattr(pytorch_grad_cam, CAM_METHODS[method].cls)
    reshape: Callable | None = nhwc_to_nchw if arch_spec(arch).nhwc else None
    with torch.enable_grad(), cls(model=model, target_layers=[target_layer(model, arch)],
                                  reshape_transform=reshape) as cam:
        for name, value in CAM_METHODS[method].attrs:
            setattr(cam, name, value)
        out = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(label_index))])
    return np.asarray(out[0], dtype=np.float32)


#: The heatmap colormap (a matplotlib name).
COLORMAP = "viridis"
@functools.lru_cache(maxsize=4)
def colormap_lut(name: str = COLORMAP) -> np.ndarray:
    """256 x 3 uint8 RGB table of a matplotlib colormap (index = map value x 255)."""
    from matplotlib import colormaps

    return np.round(colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def scale_map(cam: np.ndarray, scale: str = "minmax", prob: float = 1.0) -> np.ndarray:
    """A [0,1] map as it is to be drawn: unchanged (``"minmax"``) or times ``prob`` (``"probability"``)."""
    if scale not in SCALES:
        raise ValueError(f"unknown heatmap scale {scale!r}; choose one of: {', '.join(SCALES)}")
    return cam if scale == "minmax" else cam * float(np.clip(prob, 0.0, 1.0))


def overlay(gray: np.ndarray, cam: np.ndarray, alpha: float = 0.4, cmap: str = COLORMAP) -> np.ndarray:
    """Blends a heatmap over a gray image, each pixel's opacity ``alpha x`` its map value.

    The opacity follows the value so that a map near 0 leaves the film readable and a faint
    (probability-scaled) map stays faint; at value 1 the colour is ``cmap(1)`` at opacity ``alpha``.

    Args:
        gray: H x W image in [0,1] (the decoded film as displayed).
        cam: h x w map in [0,1]; resized to H x W if needed.
        alpha: the opacity at map value 1, in [0,1].
        cmap: matplotlib colormap name.

    Returns:
        H x W x 3 uint8 RGB.

    The request path's blend: the same numbers as :func:`overlay_reference` (``tests/test_cam.py``
    checks it) in about a third of the time: one float32 pass per channel instead of an H x W x 3
    repeat of the film and several full-size temporaries.
    """
    if cam.shape != gray.shape:
        cam = upsample(cam, gray.shape)
    cam = np.clip(np.asarray(cam, np.float32), 0.0, 1.0)
    idx = np.rint(cam * np.float32(255.0)).astype(np.uint8)
    a = cam * np.float32(np.clip(alpha, 0.0, 1.0))
    base = np.clip(np.asarray(gray, np.float32), 0.0, 1.0) * np.float32(255.0)
    kept = (np.float32(1.0) - a) * base  # the film's share: the same for the three channels
    lut = colormap_lut(cmap).astype(np.float32)
    out = np.empty((*gray.shape, 3), np.uint8)
    tmp = np.empty(gray.shape, np.float32)
    for ch in range(3):
        np.multiply(a, lut[:, ch][idx], out=tmp)
        tmp += kept
        tmp += np.float32(0.5)
        np.clip(tmp, 0, 255, out=tmp)
        out[..., ch] = tmp  # truncation, as astype(np.uint8) after + 0.5
    return out


def overlay_reference(gray: np.ndarray, cam: np.ndarray, alpha: float = 0.4, cmap: str = COLORMAP) -> np.ndarray:
    """The straightforward blend that :func:`overlay` computes faster (kept for its tests)."""
    if cam.shape != gray.shape:
        cam = upsample(cam, gray.shape)
    cam = np.clip(np.asarray(cam, np.float32), 0.0, 1.0)
    heat = colormap_lut(cmap)[np.round(cam * 255.0).astype(np.uint8)].astype(np.float32)
    base = np.repeat(np.clip(gray, 0, 1)[..., None] * 255.0, 3, axis=2)
    a = float(np.clip(alpha, 0.0, 1.0)) * cam[..., None]
    return np.clip((1 - a) * base + a * heat + 0.5, 0, 255).astype(np.uint8)


def add_colorbar(rgb: np.ndarray, cmap: str = COLORMAP) -> np.ndarray:
    """The overlay with its colour key appended on the right: the colormap from 0 (bottom) to 1 (top).

    Drawn onto the image itself so that a saved or downloaded overlay keeps its key.
    """
    from PIL import Image, ImageDraw, ImageFont

    h, w = rgb.shape[:2]
    width, bar, pad = max(48, w // 10), max(10, w // 40), max(8, h // 24)
    strip = np.full((h, width, 3), 32, np.uint8)  # dark: the numbers stay readable on any film
    ramp = colormap_lut(cmap)[np.linspace(255, 0, max(1, h - 2 * pad)).round().astype(int)]
    strip[pad:h - pad, 4:4 + bar] = ramp[:, None, :]
    im = Image.fromarray(np.concatenate([rgb, strip], axis=1))
    draw = ImageDraw.Draw(im)
    size = max(10, min(18, h // 24))
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    x = w + 6 + bar
    for text, y in (("1", pad), ("0.5", h // 2), ("0", h - pad)):
        draw.text((x, y), text, fill=(235, 235, 235), font=font, anchor="lm")
    return np.asarray(im)
