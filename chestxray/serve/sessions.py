"""What a session keeps of an analysis, so that a label, map, opacity or window change redraws without a model.

A session's state is a plain dict (the Gradio page keeps it in ``gr.State``): ``model`` (its name),
``analysis`` (:func:`pack`), ``maps`` (the last slow method's map), ``film``/``window``/``window_name`` (the
viewer's window/level), ``info`` (the file's technical fields), ``view`` (what is shown now) and, once one is
made, ``report`` (the report's files).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from chestxray.cam_methods import FAST_METHODS
from chestxray.imaging import XrayImage, to_uint8
from chestxray.serve.errors import ServiceError
from chestxray.windowing import STORED, film_for_display

if TYPE_CHECKING:  # torch: not needed to build a page
    from chestxray.predictor import Analysis

#: Seconds a session's stored analysis is kept (overlay changes need it; API clients never "close the tab").
STATE_TTL = int(os.environ.get("CHESTXRAY_STATE_TTL", 1800))
#: Sessions whose stored analysis is kept, most recently used first (Gradio's ``state_session_capacity``; its
#: default, 10,000, would let abandoned sessions hold up to ~3 MB each, a DICOM's film at display size included,
#: for STATE_TTL: API clients open a new session per client and never close it). An older session's next label or
#: window change asks to analyze again. bench_load (16 clients opening 48 sessions over 400 requests, idle machine):
#: RSS +54 to +86 MiB from request 20 to 400 before; +24, -9, +21 MiB with this cap and the work threads.
SESSIONS = int(os.environ.get("CHESTXRAY_SESSIONS", 32))

State = dict[str, Any]


def pack(a: Analysis) -> dict:
    """What a session keeps of an analysis: probabilities, all-label maps, the display image as uint8 (~0.6 MB)."""
    return {"labels": list(a.labels), "probs": a.probs, "cams": a.cams, "image": to_uint8(a.image),
            "thresholds": dict(a.thresholds), "warnings": list(getattr(a, "warnings", None) or []),
            "calibrated": bool(getattr(a, "calibrated", False)), "reference": getattr(a, "reference", None)}


def unpack(d: dict) -> Analysis:
    """The stored analysis back as an :class:`Analysis` (no model involved)."""
    from chestxray.predictor import Analysis

    return Analysis(d["labels"], d["probs"], d["cams"], d["image"].astype(np.float32) / 255.0, d["thresholds"],
                    warnings=d["warnings"], calibrated=d.get("calibrated", False),
                    reference=d.get("reference"))


def new_state(model: str, xray: XrayImage, a: Analysis) -> State:
    """A session's state after analysing ``xray`` with ``model``.

    The display image (longest side <= 768, uint8) stands in for the film in later explain calls: it bounds
    the memory a session holds, and every model input is far smaller. For windowing and the report it keeps
    the film's stored values at display size (None for 8-bit files), the window shown (None: the file's own,
    as the model saw it) and the file's technical fields."""
    from chestxray.report import technical_fields

    return {"model": model, "analysis": pack(a), "maps": {}, "film": film_for_display(xray, a.image.shape),
            "window": None, "window_name": STORED, "info": technical_fields(xray)}


def require(state: State | None, key: str = "analysis") -> State:
    """``state`` when it holds an analysis (and ``key``); otherwise stops with the one-line message."""
    if not state or key not in state:
        raise ServiceError("Analyze an image first.")
    return state


def viewed(state: State) -> Analysis:
    """The stored analysis with its display image re-windowed as the user chose (the maps are untouched)."""
    a = unpack(state["analysis"])
    film, win = state.get("film"), state.get("window")
    if film is not None and win is not None:
        a.image = film.render(win)
    return a


def window_text(state: State) -> str:
    """The window shown, in words (for the report)."""
    film, win, name = state.get("film"), state.get("window"), state.get("window_name", STORED)
    if win is None:
        stored = film.stored if film is not None else None
        return STORED + (f" (centre {stored.center:g}, width {stored.width:g})" if stored else " (as decoded)")
    return f"{name} (centre {win.center:.6g}, width {win.width:.6g}, in the file's stored units)"


def current_cam(state: State) -> np.ndarray | None:
    """The map of the view's slow method, kept by the last render (None for the fast methods: stored maps)."""
    v = state["view"]
    return None if v["method"] in FAST_METHODS else state.get("maps", {}).get((v["label"], v["method"]))
