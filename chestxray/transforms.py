"""The one preprocessing path: training, evaluation, the predictor, the app and the CAM overlay.

Everything is derived from the checkpoint's ``pretrained_cfg`` (timm's data config): input size,
mean/std and ``crop_pct=1.0, crop_mode="squash"`` (a plain resize of the whole film, because
timm's default centre crop cuts off the costophrenic angles and lung apices).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

#: ImageNet mean/std folded to one gray channel (mean of the RGB values); used for new models.
GRAY_MEAN: tuple[float, ...] = (0.449,)
GRAY_STD: tuple[float, ...] = (0.226,)


def resize_gray(img: np.ndarray | torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resizes gray image(s) in [0,1] to ``size`` (H, W): squash, bilinear with antialiasing.

    Args:
        img: HxW or NxHxW array/tensor, float in [0,1] (uint8 is scaled by 1/255).
        size: target (H, W).

    Returns:
        float32 tensor N x 1 x H x W in [0,1].
    """
    t = torch.as_tensor(img)
    if t.dtype == torch.uint8:
        t = t.float().div_(255.0)
    t = t.float()
    if t.ndim == 2:
        t = t[None]
    t = t[:, None]
    h, w = int(size[0]), int(size[1])
    if tuple(t.shape[-2:]) != (h, w):
        antialias = t.shape[-2] > h or t.shape[-1] > w
        t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False, antialias=antialias)
    return t.clamp_(0.0, 1.0)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float], in_chans: int = 1) -> torch.Tensor:
    """Normalises an N x 1 x H x W batch in [0,1] and repeats it to ``in_chans`` channels."""
    if x.shape[1] != in_chans:
        x = x.expand(-1, in_chans, -1, -1)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


@dataclass(frozen=True)
class Preprocess:
    """Turns a gray image in [0,1] into the model's input tensor, as the checkpoint prescribes."""

    input_size: tuple[int, int, int]  # (C, H, W), timm's convention
    mean: tuple[float, ...] = GRAY_MEAN
    std: tuple[float, ...] = GRAY_STD

    @classmethod
    def from_config(cls, pretrained_cfg: Mapping) -> "Preprocess":
        """Builds the transform from a checkpoint's ``pretrained_cfg`` dict."""
        c, h, w = (int(v) for v in pretrained_cfg["input_size"])
        mean = tuple(float(v) for v in pretrained_cfg.get("mean", GRAY_MEAN))
        std = tuple(float(v) for v in pretrained_cfg.get("std", GRAY_STD))
        if len(mean) == 1 and c > 1:
            mean, std = mean * c, std * c
        return cls((c, h, w), mean, std)

    @property
    def size(self) -> tuple[int, int]:
        """Spatial input size (H, W)."""
        return self.input_size[1], self.input_size[2]

    def resize(self, img: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Resizes to the input size without normalising (N x 1 x H x W in [0,1])."""
        return resize_gray(img, self.size)

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """Normalises a resized batch in [0,1] (N x 1 x H x W) to the model's input."""
        return normalize(x01, self.mean, self.std, self.input_size[0])

    def __call__(self, img: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Full path: resize + normalise; returns N x C x H x W float32."""
        return self.normalize(self.resize(img))
