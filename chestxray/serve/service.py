"""The app's handlers over one model registry, for every front end: plain data in, plain data out.

Each handler runs on the work threads (:func:`~chestxray.serve.errors.user_errors`) and says what went wrong
as one :class:`~chestxray.serve.errors.ServiceError` line. Results are numbers, strings, file paths and the
session's state dict (:mod:`chestxray.serve.sessions`); a front end only lays them out.
"""
from __future__ import annotations

import csv
import html
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chestxray.boxes import describe as describe_boxes
from chestxray.cam_methods import FAST_METHODS, METHODS, SCALES
from chestxray.imaging import ImageReadError, XrayImage, read_image
from chestxray.layout import CheckpointError
from chestxray.registry import NO_MODEL, ModelRegistry
from chestxray.serve import runtime
from chestxray.serve.encode import gallery_thumbnail
from chestxray.serve.errors import ServiceError, one_line, user_errors
from chestxray.serve.files import OUT, file_stem, safe_cell
from chestxray.serve.limits import MAX_BATCH, MAX_UPLOAD_BYTES
from chestxray.serve.sessions import State, new_state, pack, require, unpack, viewed
from chestxray.serve.text import SCALE_NAMES, caption, card_markdown, image_info, label_table, warning_html
from chestxray.serve.viewer import ViewerReport

if TYPE_CHECKING:  # torch: imported after the page is up (runtime.configure_torch)
    from chestxray.predictor import Analysis, Predictor

log = logging.getLogger("chestxray.serve")

#: Labels above threshold drawn in the gallery, at most.
MAX_GALLERY = 8


@dataclass
class Answer:
    """What ``predict`` gives the page: the bars, the table, the top label's overlay and what goes with it."""

    probs: dict[str, float]
    table: str  # HTML
    overlay: str  # JPEG path
    caption: str  # Markdown
    labels: list[str]
    top: str
    warnings: list[str]
    warning: str  # HTML box ("" without warnings)
    info: str  # HTML line about the decoded file
    state: State


@dataclass
class Scored:
    """What ``score`` gives the HTTP API: the model, the decoded file, the analysis, the overlay if asked."""

    model: str
    xray: XrayImage
    analysis: Analysis
    overlay: np.ndarray | None  # RGB uint8 with its colour bar


def upload_path(file: Any) -> str:
    """The uploaded file's path (some clients send ``{"path": ...}``); stops when nothing was uploaded."""
    if isinstance(file, dict):
        file = file.get("path")
    if not file:
        raise ServiceError("Upload an image first (PNG, JPEG or DICOM).", 400)
    return str(file)


def map_of(predictor: Predictor, a: Analysis, label: str, method: str, maps: dict | None = None) -> np.ndarray | None:
    """The label's map by a slow method (one backward pass; ``maps`` keeps the last one, so that opacity and scale
    changes stay free), or None for the fast methods, whose maps the analysis holds."""
    if method in FAST_METHODS:
        return None
    maps = {} if maps is None else maps
    if (label, method) not in maps:
        maps.clear()
        maps[(label, method)] = predictor.explain(a.image, label, method)
    return maps[(label, method)]


class Service(ViewerReport):
    """The handlers over one model registry (every model call goes through the library)."""

    def __init__(self, registry: ModelRegistry, load_default: bool = True, warm_up: bool = True):
        self.registry = registry
        self.available = registry.available()
        self.default = registry.default()
        self._load_default = load_default
        #: Imports torch and loads the default model (the others load on first use) in the background: start-up
        #: does not wait for it, and a request that comes first waits on the import lock and the registry's
        #: per-model lock. Not a daemon: a process that exits while torch is still loading weights in a daemon
        #: thread aborts. ``python app.py`` starts it once the server is up, so that the imports do not compete
        #: with building and serving the page for the interpreter lock.
        self.warm = threading.Thread(target=self._warm_up, name="warm-up")
        if warm_up:
            self.warm.start()

    def start_warm_up(self) -> None:
        """Starts the warm-up thread (once)."""
        if not self.warm.is_alive() and self.warm.ident is None:
            self.warm.start()

    def _warm_up(self) -> None:
        from chestxray.cam import colormap_lut

        runtime.configure_torch()
        colormap_lut()  # matplotlib's colormap, imported once here rather than in the first request
        if self.default and self._load_default:
            try:
                self.registry.get(self.default)
            except Exception as err:  # noqa: BLE001 - the service still starts and reports the error on use
                log.error("could not load the default model %s: %s", self.default, err)

    def _predictor(self, model: str | None) -> tuple[str, Predictor]:
        if not self.available:
            raise ServiceError(NO_MODEL, 503)
        name = model or self.default
        if name not in self.available:
            raise ServiceError(f"Model {name!r} is not installed; choose one of: {', '.join(self.available)}")
        return name, self.registry.get(name)

    def card(self, name: str | None) -> str:
        """The model card panel's Markdown (a one-line note when the card cannot be read)."""
        if not name:
            return f"**{NO_MODEL}**"
        try:
            return card_markdown(self.registry.card(name))
        except Exception as err:  # noqa: BLE001
            return f"Model card unavailable: {html.escape(one_line(err))}"

    def _render(self, state: State, label: str | None, method: str, alpha: float, scale: str = "minmax",
                folder: Path | None = None, boxes: bool = False) -> tuple[str, str]:
        """The overlay (JPEG path) and its caption for one label from the stored analysis: no forward pass for the
        fast methods, and none for a scale or opacity change (both only change how the stored map is drawn)."""
        a = viewed(state)  # drawn on the film as currently windowed (display only)
        label = label if label in a.labels else a.top_label()
        method = method if method in METHODS else "gradcam"
        scale = scale if scale in SCALES else "minmax"
        cam = None if method in FAST_METHODS else map_of(self.registry.get(state["model"]), a, label, method,
                                                         state.setdefault("maps", {}))
        state["view"] = {"label": label, "method": method, "alpha": float(alpha), "scale": scale,
                         "boxes": bool(boxes)}
        image = a.overlay(label, alpha, scale=scale, cam=cam, colorbar=True, boxes=bool(boxes))
        path = OUT.heatmap(image, (folder or OUT.new_dir()) / f"overlay_{file_stem(label)}")
        text = caption(a, label, method, scale)
        return path, (text + "\n\n" + describe_boxes(a.boxes(label, cam)) if boxes else text)

    @staticmethod
    def _gallery(analysis: Analysis, alpha: float, folder: Path) -> list[tuple[str, str]]:
        probs = analysis.prob_dict()
        return [(OUT.heatmap(gallery_thumbnail(analysis, k, alpha), folder / f"above_{file_stem(k)}"),
                 f"{k} {probs[k]:.2f}") for k in analysis.positives()[:MAX_GALLERY]]

    @user_errors(model=True)
    def predict(self, file: Any, model: str | None, method: str = "gradcam", alpha: float = 0.4,
                scale: str = "minmax", boxes: bool = False) -> Answer:
        """Probabilities of every label (one forward pass), the label table, the top label's overlay.

        The decoded film and the gallery are not drawn here: the page asks for them (:meth:`extras`) once
        the bars and the overlay are shown, and API clients that only want the answer never pay for them.
        """
        name, predictor = self._predictor(model)
        xray = read_image(upload_path(file))
        a = predictor.analyze(xray)  # the XrayImage carries what the gate reads (metadata, colour)
        state = new_state(name, xray, a)
        top = a.top_label()
        image, text = self._render(state, top, method, alpha, scale, OUT.new_dir(), boxes)
        warnings = [str(w) for w in (getattr(a, "warnings", None) or [])]
        return Answer(a.prob_dict(), label_table(a), image, text, list(a.labels), top, warnings,
                      warning_html(warnings) if warnings else "", image_info(xray), state)

    @user_errors
    def extras(self, alpha: float, state: State | None) -> tuple[str, list[tuple[str, str]]]:
        """The decoded film as analysed and the gallery of labels above threshold, from the stored analysis."""
        state = require(state)
        folder = OUT.new_dir()
        decoded = OUT.png(state["analysis"]["image"], folder / "image.png")  # the uint8 film pack() kept
        return decoded, self._gallery(viewed(state), alpha, folder)

    @user_errors(model=True)
    def explain(self, label: str, method: str, alpha: float, scale: str, state: State | None,
                boxes: bool = False) -> tuple[str, str, State]:
        """Re-renders the overlay for another label, method, opacity, scale or boxes without running the model."""
        state = require(state)
        return (*self._render(state, label, method, alpha, scale, boxes=boxes), state)

    @user_errors(model=True)
    def compare(self, file: Any, label: str | None = None, alpha: float = 0.4, scale: str = "minmax"):
        """Every installed model on the same image: ``(table, gallery, labels, label shown, notes, state)``."""
        if not self.available:
            raise ServiceError(NO_MODEL, 503)
        xray = read_image(upload_path(file))
        results, notes = {}, []
        for name in self.available:
            try:
                results[name] = self.registry.get(name).analyze(xray)
            except CheckpointError as err:
                notes.append(f"{name}: could not be loaded ({err})")
        if not results:
            raise ServiceError("; ".join(notes) or NO_MODEL, 500)
        labels = list(dict.fromkeys(k for a in results.values() for k in a.labels))
        rows = [[k, *[round(a.prob_dict()[k], 4) if k in a.labels else None for a in results.values()]]
                for k in labels]
        label = label if label in labels else next(iter(results.values())).top_label()
        for name, a in results.items():
            notes.append(f"**{name}**, above threshold: {', '.join(a.positives()) or 'none'}")
            notes += [f"{name}: ⚠ {html.escape(str(w))}" for w in getattr(a, "warnings", None) or []]
        state = {"results": {name: pack(a) for name, a in results.items()}}
        return ({"headers": ["label", *results], "data": rows}, self._compare_gallery(state, label, alpha, scale),
                labels, label, "\n\n".join(notes), state)

    @staticmethod
    def _compare_gallery(state: State, label: str, alpha: float, scale: str = "minmax") -> list[tuple[str, str]]:
        folder, scale = OUT.new_dir(), scale if scale in SCALES else "minmax"
        return [(OUT.heatmap(a.overlay(label, alpha, scale=scale, colorbar=True), folder / file_stem(name)),
                 f"{name}: {label} p={a.prob_dict()[label]:.2f}, {SCALE_NAMES[scale].lower()}")
                for name, a in ((n, unpack(d)) for n, d in state["results"].items()) if label in a.labels]

    @user_errors
    def compare_overlay(self, label: str, alpha: float, scale: str, state: State | None) -> list[tuple[str, str]]:
        """The side-by-side overlays for another label or scale, without running the models again."""
        if not state:
            raise ServiceError("Run the comparison first.")
        return self._compare_gallery(state, label, alpha, scale)

    @user_errors(model=True)
    def batch(self, files: list | None, model: str | None,
              track: Callable[[list], Iterable] = iter) -> tuple[str, dict]:
        """Scores several files into a CSV (file, one column per label, warning, error) and a preview table;
        ``track`` wraps the files' loop (the page's progress bar)."""
        name, predictor = self._predictor(model)
        files = [f for f in (files or []) if f]
        if not files:
            raise ServiceError("Upload one or more files.", 400)
        if len(files) > MAX_BATCH:
            raise ServiceError(f"At most {MAX_BATCH} files per batch ({len(files)} given).", 413)
        header = ["file", *predictor.labels, "warning", "error"]
        rows = []
        for f in track(files):
            path = upload_path(f)
            row = {"file": safe_cell(Path(path).name), "warning": "", "error": ""}
            try:
                a = predictor.analyze(read_image(path))
                row.update({k: f"{p:.6f}" for k, p in a.prob_dict().items()})
                row["warning"] = "; ".join(str(w) for w in getattr(a, "warnings", None) or [])
            except ImageReadError as err:
                row["error"] = str(err)
            rows.append(row)
        out = OUT.new_dir() / f"predictions_{file_stem(name)}.csv"
        with out.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=header, restval="")
            writer.writeheader()
            writer.writerows(rows)
        shown = ["file", "error", "warning", *predictor.labels]  # problems first in the on-page preview
        return str(out), {"headers": shown, "data": [[r.get(k, "") for k in shown] for r in rows]}

    @user_errors(model=True)
    def model_card(self, model: str | None) -> str:
        """Loads the chosen model (once) and returns its card."""
        if model:
            self._predictor(model)
        return self.card(model)

    def score(self, data: bytes, model: str | None, cam: str | None = None, method: str = "gradcam",
              alpha: float = 0.4, scale: str = "minmax") -> Scored:
        """One uploaded file's bytes through a model (the HTTP API; the caller holds the model slot): every
        probability, and the overlay of label ``cam`` by ``method`` when asked. Bad parameters stop before the
        file is decoded."""
        name, predictor = self._predictor(model)
        if cam is not None and cam not in predictor.labels:
            raise ServiceError(f"Unknown label {cam!r} for model {name}; choose one of: {', '.join(predictor.labels)}")
        if method not in METHODS:
            raise ServiceError(f"Unknown CAM method {method!r}; choose one of: {', '.join(METHODS)}")
        if scale not in SCALES:
            raise ServiceError(f"Unknown heatmap scale {scale!r}; choose one of: {', '.join(SCALES)}")
        if not 0.0 <= alpha <= 1.0:
            raise ServiceError(f"alpha must be between 0 and 1, got {alpha:g}")
        xray = read_image(data, max_bytes=MAX_UPLOAD_BYTES)
        a = predictor.analyze(xray)
        overlay = None if cam is None else a.overlay(cam, alpha, scale=scale, cam=map_of(predictor, a, cam, method),
                                                     colorbar=True)
        return Scored(name, xray, a, overlay)
