"""Window/level for display: re-render a film from its stored values without the file or the model.

Display only. The model's input is always :attr:`XrayImage.pixels` (the file's own window, then the
checkpoint's preprocessing); nothing here feeds a model. :func:`window` is DICOM's linear VOI function
(PS3.3 C.11.2.1.2.1, the formula pydicom's ``apply_voi_lut`` uses), scaled to [0, 1], with
MONOCHROME1 inverted afterwards so that air is dark.

Presets: radiograph values (CR/DX, 16-bit PNG) have no fixed unit, so "Lung" and "Mediastinum" are
taken from the film's own histogram (percentiles in display orientation: lung = the darker part,
mediastinum = the brighter part). CT values are Hounsfield units, so CT gets the usual HU windows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from chestxray.imaging import XrayImage

STORED = "Stored window"
CUSTOM = "Custom"
#: Preset names, in menu order ("Stored window" is the file's own window, as the model sees it).
PRESETS = (STORED, "Lung", "Mediastinum", "Full range")
#: Radiographs: (low, high) percentiles of display-oriented values (0 = darkest) that the window spans.
_PERCENTILES = {"Lung": (1.0, 65.0), "Mediastinum": (35.0, 99.5)}
#: CT in Hounsfield units: (centre, width).
_CT_WINDOWS = {"Lung": (-600.0, 1500.0), "Mediastinum": (40.0, 400.0)}


@dataclass(frozen=True)
class Window:
    """A linear display window in the film's stored units (after the modality LUT)."""

    center: float
    width: float


def window(values: np.ndarray, center: float, width: float, invert: bool = False) -> np.ndarray:
    """DICOM linear windowing to float32 [0, 1].

    Args:
        values: stored values (after the modality LUT), any shape.
        center: window centre (DICOM WindowCenter).
        width: window width (DICOM WindowWidth); values below 1 are taken as 1.
        invert: MONOCHROME1 (high values are dark): flip the result.

    Returns:
        float32 array in [0, 1]: 0 at or below ``center - 0.5 - (width - 1) / 2``, 1 above
        ``center - 0.5 + (width - 1) / 2``, linear between.
    """
    width = max(float(width), 1.0)
    x = np.asarray(values, dtype=np.float32)
    if width == 1.0:  # DICOM: a step at the centre
        out = (x > center - 0.5).astype(np.float32)
    else:
        out = np.clip((x - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0).astype(np.float32)
    return 1.0 - out if invert else out


@dataclass
class Film:
    """A film's stored values at display size, with what windowing them needs.

    Attributes:
        values: float32 HxW stored values, resized to the display image's shape.
        invert: MONOCHROME1 (high values are dark).
        stored: the file's first window, when it has one.
        low: smallest stored value of the whole film.
        high: largest stored value of the whole film.
        modality: DICOM modality ("CT" gets HU presets), None for plain images.
    """

    values: np.ndarray
    invert: bool
    stored: Window | None
    low: float
    high: float
    modality: str | None = None

    def preset(self, name: str) -> Window:
        """The window of a preset name (unknown names and a missing stored window give the full range)."""
        if name == STORED and self.stored is not None:
            return self.stored
        if name in _CT_WINDOWS and self.modality == "CT":
            return Window(*_CT_WINDOWS[name])
        if name in _PERCENTILES:
            # percentiles of display-oriented values (negated for MONOCHROME1), mapped back to stored units
            shown = -self.values if self.invert else self.values
            lo, hi = (float(v) for v in np.percentile(shown, _PERCENTILES[name]))
            lo, hi = (-hi, -lo) if self.invert else (lo, hi)
            return _span(lo, hi)
        return _span(self.low, self.high)

    def render(self, win: Window) -> np.ndarray:
        """The film at display size through ``win``: float32 HxW in [0, 1], air dark."""
        return window(self.values, win.center, win.width, self.invert)


def _span(lo: float, hi: float) -> Window:
    """The window whose linear ramp runs from ``lo`` (black) to ``hi`` (white) in DICOM's formula."""
    width = max(hi - lo + 1.0, 1.0)
    return Window(lo + 0.5 + (width - 1.0) / 2.0, width)


def film_for_display(xray: XrayImage | None, shape: tuple[int, int]) -> Film | None:
    """The film's stored values resized to ``shape`` (the display image's), or None when the file has none
    worth windowing (8-bit and colour images: their decoded pixels are all there is).

    Resizing runs on values scaled to [0, 1] by the film's range (the shared resize clamps to [0, 1]) and
    maps them back, so the display geometry is exactly the display image's.
    """
    from chestxray.transforms import resize_gray  # torch: the app builds its window controls without it

    raw = getattr(xray, "raw", None)
    if raw is None or raw.ndim != 2:
        return None
    low, high = float(raw.min()), float(raw.max())
    span = (high - low) or 1.0
    unit = (raw.astype(np.float32) - low) / span
    values = resize_gray(unit, shape)[0, 0].numpy() * span + low
    stored = Window(*xray.stored_window) if xray.stored_window else None
    return Film(values.astype(np.float32), bool(xray.invert), stored, low, high, xray.modality)
