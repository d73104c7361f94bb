"""The viewer (window/level, before/after) and the report: drawing from the session's state, never a model."""
from __future__ import annotations

from typing import Any

import numpy as np

from chestxray.cam_methods import METHOD_TITLES
from chestxray.imaging import to_uint8
from chestxray.serve.errors import ServiceError, user_errors
from chestxray.serve.files import OUT, file_stem
from chestxray.serve.sessions import State, current_cam, require, viewed, window_text
from chestxray.serve.text import DISCLAIMER_TEXT, SCALE_NAMES, shown_as_stored
from chestxray.windowing import CUSTOM, PRESETS, STORED, Window


class ViewerReport:
    """Handlers of the viewer and the report (mixed into :class:`~chestxray.serve.service.Service`, whose
    ``_render`` draws the overlay and ``registry`` gives the model card): display only, no forward pass."""

    @user_errors
    def window(self, preset: str, center: float, width: float, state: State | None):
        """Re-windows the film (a preset, or "Custom" with centre and width in the file's stored units) and
        redraws the overlay from the stored analysis: ``(preset, centre, width, overlay, caption, state)``. The
        model's input is not affected."""
        state = require(state)
        film = state.get("film")
        if film is None:
            raise ServiceError("Window/level needs a DICOM or 16-bit image; this file's 8-bit pixels are shown as "
                               "stored.")
        if preset == CUSTOM:
            win = Window(float(center), max(float(width), 1.0))
        elif preset in PRESETS:
            win = None if preset == STORED else film.preset(preset)
        else:
            raise ServiceError("Unknown window preset: choose one of " + ", ".join((*PRESETS, CUSTOM)) + ".")
        state["window"], state["window_name"] = win, preset
        shown = win or film.preset(STORED)
        v = state.get("view") or {}
        image, text = self._render(state, v.get("label"), v.get("method", "gradcam"), v.get("alpha", 0.4),
                                   v.get("scale", "minmax"), boxes=v.get("boxes", False))
        return preset, shown.center, shown.width, image, text, state

    def window_custom(self, center: float, width: float, state: State | None):
        """The centre/width sliders: a custom window."""
        return self.window(CUSTOM, center, width, state)

    @staticmethod
    def window_controls(state: State | None) -> dict[str, Any]:
        """The window/level panel for the analysed film: ``visible`` only for films with stored values to window
        (DICOM and 16-bit; 8-bit and colour files are shown as stored) and a ``note`` (empty before any
        analysis); when visible also ``center`` and ``width``, each ``{minimum, maximum, value, step}`` from the
        film's stored values."""
        state = state or {}
        film = state.get("film")
        if film is None:
            return {"visible": False, "note": shown_as_stored(state.get("info")) if "analysis" in state else ""}
        w = film.preset(STORED)
        span = (film.high - film.low) or 1.0
        step = 1.0 if span >= 200 else span / 200
        return {"visible": True,
                "center": {"minimum": min(film.low, w.center), "maximum": max(film.high, w.center),
                           "value": w.center, "step": step},
                "width": {"minimum": 1, "maximum": max(2 * span, w.width), "value": w.width, "step": step},
                "note": f"Display only: the model always sees the file's own window. Stored values {film.low:g} to "
                        f"{film.high:g}" + (" (MONOCHROME1: high values are dark)." if film.invert else ".")}

    @staticmethod
    def report_shown(state: State | None) -> bool:
        """Whether the report outputs show: only once a report is made for the analysed film (a new analysis
        starts without one)."""
        return bool(state and state.get("report"))

    @staticmethod
    @user_errors
    def before_after(state: State | None) -> tuple[str, str] | None:
        """The film and its heatmap (same size, no colour bar) for the before/after slider, as two paths."""
        if not state or "view" not in state:
            return None
        a, v = viewed(state), state["view"]
        folder = OUT.new_dir()
        film = np.repeat(to_uint8(a.image)[..., None], 3, axis=2)
        heat = a.overlay(v["label"], v["alpha"], scale=v["scale"], cam=current_cam(state),
                         boxes=v.get("boxes", False))
        return OUT.png(film, folder / "film.png"), OUT.heatmap(heat, folder / f"heatmap_{file_stem(v['label'])}")

    @user_errors
    def report(self, state: State | None) -> tuple[str, str]:
        """The study as shown now (label, map, scale, window) as a PDF and a JSON file: every probability with
        its threshold, the model and its card line, the input warnings, the disclaimer. No forward pass; no
        file name and no DICOM header field other than the technical ones the reader keeps."""
        state = require(state, "view")
        a, v = viewed(state), state["view"]
        overlay = a.overlay(v["label"], v["alpha"], scale=v["scale"], cam=current_cam(state), colorbar=True,
                            boxes=v.get("boxes", False))
        view = {**v, "method_title": METHOD_TITLES.get(v["method"], v["method"]),
                "scale_title": SCALE_NAMES[v["scale"]].lower(), "window": window_text(state)}
        from chestxray.report import write_report  # matplotlib: not needed to build the page

        pdf, js = write_report(OUT.new_dir(), a, to_uint8(a.image), overlay, model=self.registry.card(state["model"]),
                               image=state["info"], view=view, disclaimer=DISCLAIMER_TEXT)
        state["report"] = {"pdf": str(pdf), "json": str(js)}  # the page shows its outputs from now on
        return str(pdf), str(js)
