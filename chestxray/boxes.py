"""Boxes from a class activation map: threshold, connected components, one box per region.

A label's map (H x W in [0,1], at the film's size) is cut at ``threshold`` times its maximum; each
8-connected region of at least ``min_area`` of the film becomes one box, scored by the map's peak
inside it. The threshold is relative so that it means the same on a per-label min-max map and on a
probability-scaled one: 0.5 keeps the regions at half the map's strongest evidence or more (the
usual choice for turning Grad-CAM into boxes). A coarse 7 x 7 feature map upsampled to the film
gives smooth blobs, so the boxes are rough regions, not lesion outlines.

Run-time module: :meth:`chestxray.predictor.Analysis.overlay` draws the boxes in the app, and
:mod:`chestxray.localization` scores them against radiologists' boxes.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

#: Default cut, relative to the map's maximum.
BOX_THRESHOLD = 0.5
#: Default smallest region kept, as a share of the film's area (drops slivers at the cut's edge;
#: one cell of a 7 x 7 feature map is about 2% of the film).
BOX_MIN_AREA = 0.005
#: Outline colours: a light line on a dark one stays visible on the film and on every colormap value.
_LIGHT, _DARK = (255, 255, 255), (0, 0, 0)


class Box(NamedTuple):
    """A box in pixel coordinates of the film it was found on: top-left ``(x, y)``, width, height,
    and the map's peak value inside it (``score``; 1.0 for a box from elsewhere)."""

    x: int
    y: int
    w: int
    h: int
    score: float = 1.0

    @property
    def area(self) -> int:
        """Area in pixels."""
        return self.w * self.h


def cam_boxes(cam: np.ndarray, threshold: float = BOX_THRESHOLD, min_area: float = BOX_MIN_AREA) -> list[Box]:
    """One box per connected region of the map at or above ``threshold x`` its maximum.

    Args:
        cam: H x W map in [0,1] at the film's size (e.g. :meth:`~chestxray.predictor.Analysis.cam`).
        threshold: the cut, relative to the map's maximum, in (0, 1].
        min_area: smallest region kept, as a share of the film's area (0 keeps every region).

    Returns:
        Boxes in the map's pixel coordinates, highest peak first; empty for an all-zero map.
    """
    from scipy import ndimage  # a dependency of scikit-learn; imported here to keep the app's start light

    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    cam = np.asarray(cam, dtype=np.float32)
    peak = float(cam.max()) if cam.size else 0.0
    if peak <= 0:
        return []
    regions, n = ndimage.label(cam >= threshold * peak, structure=np.ones((3, 3), dtype=bool))
    boxes = []
    for i, (sy, sx) in enumerate(ndimage.find_objects(regions), start=1):
        inside = regions[sy, sx] == i
        if inside.sum() < min_area * cam.size:
            continue
        boxes.append(Box(sx.start, sy.start, sx.stop - sx.start, sy.stop - sy.start,
                         float(cam[sy, sx][inside].max())))
    return sorted(boxes, key=lambda b: -b.score)


def box_iou(a: Box | tuple, b: Box | tuple) -> float:
    """Intersection over union of two ``(x, y, w, h, ...)`` boxes (0 when either is empty)."""
    ax, ay, aw, ah = (float(v) for v in a[:4])
    bx, by, bw, bh = (float(v) for v in b[:4])
    iw = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = iw * ih
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


def mask_iou(box: Box | tuple, mask: np.ndarray) -> float:
    """Intersection over union of a box with a boolean region (e.g. the union of several boxes)."""
    x, y, w, h = (int(v) for v in box[:4])
    inside = np.zeros_like(mask, dtype=bool)
    inside[max(0, y):max(0, y + h), max(0, x):max(0, x + w)] = True
    union = int((inside | mask).sum())
    return int((inside & mask).sum()) / union if union else 0.0


def draw_boxes(rgb: np.ndarray, boxes: list[Box]) -> np.ndarray:
    """The image with each box's outline drawn on it: a thin light line edged in dark, nothing filled.

    Args:
        rgb: H x W x 3 uint8 image (the overlay).
        boxes: boxes in its pixel coordinates.

    Returns:
        A new H x W x 3 uint8 image.
    """
    from PIL import Image, ImageDraw

    im = Image.fromarray(np.ascontiguousarray(rgb))
    draw = ImageDraw.Draw(im)
    line = max(1, round(min(rgb.shape[:2]) / 384))  # 1 px on a 384-px film, 2 on the 768-px display
    for b in boxes:
        x0, y0, x1, y1 = b.x, b.y, b.x + b.w - 1, b.y + b.h - 1
        draw.rectangle((x0 - line, y0 - line, x1 + line, y1 + line), outline=_DARK, width=3 * line)
        draw.rectangle((x0, y0, x1, y1), outline=_LIGHT, width=line)
    return np.asarray(im)


def describe(boxes: list[Box], threshold: float = BOX_THRESHOLD) -> str:
    """One line for a caption: what the outlined boxes are."""
    n = len(boxes)
    return (f"Boxes: {n} region{'s' if n != 1 else ''} where the map reaches {threshold:.0%} of its maximum "
            "or more (rough areas from a coarse map, not lesion outlines)." if n else
            "Boxes: none (the map is flat).")
