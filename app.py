"""Gradio demo of the chest X-ray toolkit: upload a film (PNG/JPEG/DICOM), get per-label probabilities
and Grad-CAM maps; compare the installed models; score a batch of files into a CSV.

UI only: reading, models and maps come from the ``chestxray`` library. Run ``python app.py``
(``GRADIO_SERVER_NAME=0.0.0.0`` to serve on the network). ``$CHESTXRAY_MODELS`` picks another model list,
``$CHESTXRAY_WEIGHTS`` another weights folder. API: ``/predict``, ``/explain``, ``/compare``,
``/compare_overlay``, ``/batch``, ``/model_card``, ``/window``, ``/report`` (see "Use via API" at the page's foot).
"""
from __future__ import annotations

import ctypes
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _limit_malloc_arenas(n: int = 2) -> None:
    """glibc gives each of Gradio's worker threads its own malloc arena, and freed image buffers stay there:
    RSS then grows with the number of threads that ever ran a request (measured with 16 clients: +247 MiB
    over 100 requests with the default arenas, +60 MiB with 2). Same as MALLOC_ARENA_MAX=2, which wins if set.

    (Also tried: a fixed 256 KiB mmap threshold, so that every large buffer goes back to the OS when freed:
    RSS growth the same within noise, but 60% more server CPU per request, page faults on every activation.)"""
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, n)  # M_ARENA_MAX; applies to arenas created from now on
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        pass


_limit_malloc_arenas()


def _trim_heap() -> None:
    """Hands the heap pages freed by a request back to the OS (glibc's malloc_trim).

    Even with 2 arenas, glibc keeps freed image and activation buffers mapped, so RSS crept up by
    about 50-60 MiB per 100 requests under 16 clients; trimming after each request bounds it."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


try:
    _LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
    _LIBC.malloc_trim  # noqa: B018 - glibc only (musl has no malloc_trim)
except (OSError, AttributeError):
    _LIBC = None

import atexit  # noqa: E402
import contextvars  # noqa: E402
import csv  # noqa: E402
import functools  # noqa: E402
import html  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import struct  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from chestxray.boxes import describe as describe_boxes  # noqa: E402
from chestxray.cam_methods import CAM_METHODS, FAST_METHODS, METHOD_TITLES, METHODS, SCALES  # noqa: E402
from chestxray.layout import CheckpointError  # noqa: E402
from chestxray.imaging import ImageReadError, XrayImage, read_image, to_uint8  # noqa: E402
from chestxray.registry import NO_MODEL, ModelRegistry  # noqa: E402
from chestxray.windowing import CUSTOM, PRESETS, STORED, Window, film_for_display  # noqa: E402

if TYPE_CHECKING:  # torch: imported after the page is up (configure_torch)
    from chestxray.predictor import Analysis

log = logging.getLogger("chestxray.app")

HERE = Path(__file__).resolve().parent
EXAMPLES_DIR = HERE / "examples"
#: Example files and their labels in the NIH label file (see examples/ATTRIBUTION.md).
EXAMPLES = {"00001369_000.png": "Cardiomegaly", "00012628_000.png": "Effusion",
            "00001968_000.png": "Pneumothorax", "00000550_000.png": "No Finding"}

#: Concurrent model calls: one shared limit (concurrency_id "model") for every event that runs a model: one
#: request per core (at most 4; on a GPU too, unless $CHESTXRAY_CONCURRENCY says otherwise), each forward pass
#: on cores // CONCURRENCY torch threads (1 on 2 cores): most of a request is single-threaded work (decoding,
#: drawing, PNG, HTTP) that a second request overlaps, and
#: OpenMP's two threads on two busy cores (16 clients, other processes) spin against each other: measured here
#: under load, 62 ms per efficientnet_b0 forward on 1 thread against 490 ms on 2. Batching two requests' forwards
#: on 1 thread gave no gain per image (89 ms each), so requests are not batched.
CPU_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
CONCURRENCY = int(os.environ.get("CHESTXRAY_CONCURRENCY", min(4, CPU_CORES)))


@functools.cache
def configure_torch() -> None:
    """Imports torch (once) and sets its threads: cores // CONCURRENCY on a CPU, ``$CHESTXRAY_TORCH_THREADS`` if set.

    torch and timm (about 5 s of imports) are not imported to build the page: the warm-up thread imports them
    once the server is up, and a request that comes first imports them itself (the import lock makes it wait)."""
    import torch

    if os.environ.get("CHESTXRAY_TORCH_THREADS"):
        torch.set_num_threads(int(os.environ["CHESTXRAY_TORCH_THREADS"]))
    elif not torch.cuda.is_available():
        torch.set_num_threads(max(1, CPU_CORES // CONCURRENCY))


QUEUE_SIZE = int(os.environ.get("CHESTXRAY_QUEUE", 32))
MAX_BATCH = int(os.environ.get("CHESTXRAY_MAX_BATCH", 64))
MAX_GALLERY = 8
GALLERY_SIDE = 256  # gallery thumbnails: smaller images to draw, encode and send
#: gr.Label shows (and the API returns) this many labels: more than any label set, so all of them.
NUM_TOP = 32
#: Heatmap scales (chestxray.cam.SCALES) as the app names them.
SCALE_NAMES = {"minmax": "Per-label range (min-max)", "probability": "Scaled by probability"}
#: How often Gradio's queue looks for a free worker while requests wait. Gradio polls every 1 ms, which on
#: 2 cores under 16 clients kept its event loop busy (py-spy: ~20% of a core in select); 5 ms gave +8%
#: requests/s in bench_load (5.53 -> 5.98) for at most 5 ms more wait before a request starts.
QUEUE_POLL_S = float(os.environ.get("CHESTXRAY_QUEUE_POLL_S", 0.005))


def tune_queue(demo: gr.Blocks) -> None:
    """Sets the queue's polling interval (:data:`QUEUE_POLL_S`); call after ``demo.queue()``."""
    demo._queue.sleep_when_free = QUEUE_POLL_S  # Gradio's own knob (tests/test_app.py checks it still exists)


TITLE = "Chest X-ray findings: research demo"
DISCLAIMER = """
<div style="border:1px solid #d97706;border-radius:8px;padding:10px 14px;background:rgba(217,119,6,.08)">
<b>Research demo: not a medical device, not for diagnosis or treatment decisions.</b>
The probabilities are outputs of small models trained on a few thousand public images
(NIH ChestX-ray14 and others, whose labels were mined from reports and are often wrong): they are not
disease risks (where a model is temperature-calibrated, that only matches them to its validation films), and
the models miss findings and flag normal films. Heatmaps show where a model looked,
not where disease is. See the model card for how each model was trained and how well it did.
Uploaded files are deleted from the server within an hour.
</div>
"""


# -- helpers -------------------------------------------------------------------------------------
#: Every handler runs on these few threads, not on whichever of Gradio's worker threads (up to 40) picked the
#: event: torch keeps buffers per thread that has run a forward pass, so the server's RSS grew with the number
#: of threads that ever ran one. Measured in process (efficientnet_b0, 212 analyses, 2 at a time): flat at
#: ~800 MiB on 2 threads, +95 MiB on 40. Twice the model concurrency: the viewer's events run beside the model's.
WORK_THREADS = 2 * CONCURRENCY
_WORK = ThreadPoolExecutor(WORK_THREADS, thread_name_prefix="chestxray-work")


def _on_work_thread(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on one of the :data:`WORK_THREADS`, with the caller's context (Gradio's request and
    progress live in context variables); directly if already on one (no nested wait for a free thread)."""
    if threading.current_thread().name.startswith("chestxray-work"):
        return fn(*args, **kwargs)
    return _WORK.submit(contextvars.copy_context().run, fn, *args, **kwargs).result()


def user_errors(fn):
    """Turns library errors into one-line gr.Error messages; never shows a traceback to the user. The handler
    runs on a work thread (:data:`WORK_THREADS`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            configure_torch()  # a request that comes before the warm-up thread sets the threads itself
            return _on_work_thread(fn, *args, **kwargs)
        except gr.Error:
            raise
        except (ImageReadError, CheckpointError, ValueError) as err:
            text = str(err).splitlines()[0] if str(err).strip() else type(err).__name__
            raise gr.Error(text, print_exception=False) from None
        except Exception:  # noqa: BLE001
            log.exception("unexpected error in %s", fn.__name__)
            raise gr.Error("Unexpected error while processing the request (details are in the server log).",
                           print_exception=False) from None
        finally:
            _trim_heap()

    return wrapper


def _error(text: str) -> gr.Error:
    return gr.Error(text, print_exception=False)


def _analysed(state: dict | None, key: str = "analysis") -> None:
    """Stops with the one-line message when the session holds no analysis (or no ``key``) to draw from."""
    if not state or key not in state:
        raise _error("Analyze an image first.")


def _path(file) -> str:
    if isinstance(file, dict):  # {"path": ...} from some clients
        file = file.get("path")
    if not file:
        raise _error("Upload an image first (PNG, JPEG or DICOM).")
    return str(file)


def image_info(xray: XrayImage) -> str:
    """One harmless line about the decoded file (XrayImage fields only: it holds no patient data)."""
    h, w = xray.original_size
    parts = [xray.format.upper(), f"{w}×{h} px", f"{xray.bit_depth}-bit"]
    parts += [f"{k} {v}" for k, v in (("modality", xray.modality), ("view", xray.view),
                                       ("body part", xray.body_part)) if v]
    text = "Decoded: " + " · ".join(html.escape(p) for p in parts)
    if xray.notes:
        text += "<br>Notes: " + "; ".join(html.escape(n) for n in xray.notes)
    return text


def warning_html(warnings: list[str]) -> str:
    """The prominent box shown when the input gate doubts the image."""
    items = "".join(f"<li>{html.escape(str(w))}</li>" for w in warnings)
    return ('<div style="border:2px solid #dc2626;border-radius:8px;padding:10px 14px;'
            'background:rgba(220,38,38,.10)"><b>⚠ Check the input: these results may be meaningless.</b>'
            f"<ul style='margin:4px 0 0 0'>{items}</ul></div>")


def label_table(analysis) -> str:
    """HTML table: every label, its probability (▲ when above its operating threshold), the threshold."""
    probs = analysis.prob_dict()
    cell = "padding:3px 8px;border-bottom:1px solid rgba(128,128,128,.25)"
    head = "".join(f'<th style="{cell};text-align:{a}">{h}</th>'
                   for h, a in (("Label", "left"), ("Probability", "right"), ("Operating threshold", "right")))
    rows = []
    for k in sorted(analysis.labels, key=lambda k: -probs[k]):
        p, t = probs[k], analysis.threshold(k)
        above = p >= t
        rows.append(f'<tr style="{"font-weight:600" if above else ""}"><td style="{cell}">{html.escape(k)}</td>'
                    f'<td style="{cell};text-align:right;white-space:nowrap">{"▲ " if above else ""}{p:.3f}</td>'
                    f'<td style="{cell};text-align:right">{t:.3f}</td></tr>')
    return (f'<table style="width:100%;border-collapse:collapse;font-size:13px"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table><p style="font-size:12px;margin:6px 0 0 0">▲ bold: probability '
            "at or above the label's operating threshold (above threshold). "
            + ("Probabilities are temperature-calibrated per label on validation films (thresholds mapped to "
               "match). " if getattr(analysis, "calibrated", False) else "")
            + "This is a model output, not a diagnosis.</p>")


def caption(analysis, label: str, method: str, scale: str = "minmax") -> str:
    """The probability shown beside a map, which scale is shown, and what the colour bar's 0 and 1 mean."""
    p, t = analysis.prob_dict()[label], analysis.threshold(label)
    side = "above" if p >= t else "below"
    extra = f" {CAM_METHODS[method].note}" if method in CAM_METHODS and CAM_METHODS[method].note else ""
    if scale == "probability":
        how = (f"**scaled by probability**: the map times p = {p:.3f}, so its brightest point is {p:.2f} on the "
               "colour bar and a low-probability label is drawn faint")
    else:
        how = ("**per-label range (min-max)**: each map is stretched to its own range, so a label with a low "
               "probability still gets a full-range heatmap")
    calibrated = getattr(analysis, "calibrated", False)
    return (f"**{label}**: probability **{p:.3f}**{', temperature-calibrated on validation' if calibrated else ''} "
            f"(operating threshold {t:.3f}{', mapped to match' if calibrated else ''}: {side} threshold). "
            f"Map: {METHOD_TITLES.get(method, method)}, {how}. Colour bar (right edge, viridis): 0 = no evidence "
            f"for the label (the film shows through), 1 = the strongest evidence; colour and opacity rise together."
            f"{extra}")


def card_markdown(card: dict) -> str:
    """The model card panel: architecture, training data, validation AUROC, thresholds."""
    c = card
    lines = [f"**{c['name']}**: `{c.get('arch')}`, {c.get('img_size')} px input, weights from `{c.get('source')}`."]
    data = []
    if c.get("sources"):
        data.append("sources " + ", ".join(map(str, c["sources"])))
    if isinstance(c.get("n_images"), dict):
        data.append(" / ".join(f"{v} {k}" for k, v in c["n_images"].items()) + " images")
    if c.get("split"):
        data.append(f"{c['split']}-wise split")
    if c.get("initialised_from"):
        data.append("initialised from " + str(c["initialised_from"]).split(",")[0])
    elif "pretrained" in c:
        data.append("ImageNet-pretrained" if c["pretrained"] else "trained from scratch")
    if c.get("taught_by"):
        data.append("taught by " + str(c["taught_by"]))
    if data:
        lines.append("Training data: " + "; ".join(data) + ".")

    def ci_text(ci):
        return f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""

    for split, m in (c.get("metrics") or {}).items():  # the headline (balanced NIH films) comes first
        n = f" on {m['n_images']} images" if "n_images" in m else ""
        lines.append(f"{split[:1].upper()}{split[1:]}: mean AUROC **{m['mean_auroc']:.3f}**"
                     f"{ci_text(m.get('mean_auroc_ci'))}{n}.")
    if "val_mean_auroc" in c:
        on = " (" + ", ".join(map(str, c["val_sources"])) + ")" if isinstance(c.get("val_sources"), list) else ""
        lines.append(f"Validation mean AUROC{on}: {c['val_mean_auroc']:.3f}"
                     f"{ci_text(c.get('val_mean_auroc_ci'))}.")
    cal = c.get("calibration")
    if cal:
        on = f" ({cal['n_films']} films of the {cal['fitted_on']})" if cal.get("fitted_on") and cal.get("n_films") else ""
        lines.append(f"Probabilities are **temperature-calibrated on validation**{on}: each label's logit is divided "
                     f"by its own temperature ({len(cal['temperatures'])} labels), which keeps the order of the films; "
                     "the thresholds below are mapped the same way, so the same films are marked.")
    else:
        lines.append("Probabilities are the model's raw outputs (not recalibrated).")
    if c.get("thresholds"):
        rule = f" ({c['threshold_rule']} rule, chosen on validation)" if c.get("threshold_rule") else ""
        lines.append(f"Operating thresholds{rule}: " + ", ".join(f"{k} {v:.2f}" for k, v in c["thresholds"].items())
                     + ". A label is marked *above threshold* when its probability reaches its threshold.")
    else:
        lines.append("No operating thresholds in this checkpoint: 0.5 is used for every label.")
    return "\n\n".join(lines)


def thumbnail(rgb: np.ndarray, side: int = GALLERY_SIDE) -> np.ndarray:
    """Downscales an RGB uint8 image so that its longest side is at most ``side``."""
    im = Image.fromarray(rgb)
    im.thumbnail((side, side), Image.Resampling.BILINEAR)
    return np.asarray(im)


def thumbnail_size(shape: tuple[int, int], side: int = GALLERY_SIDE) -> tuple[int, int]:
    """(H, W) of :func:`thumbnail`'s result for an image of ``shape`` (PIL's rounding)."""
    h, w = shape
    if max(h, w) <= side:
        return h, w
    im = Image.new("L", (w, h))
    im.thumbnail((side, side))
    return im.size[1], im.size[0]


def gallery_thumbnail(analysis, label: str, alpha: float, side: int = GALLERY_SIDE) -> np.ndarray:
    """The label's overlay drawn directly at thumbnail size: the same picture as
    ``thumbnail(analysis.overlay(label, alpha))`` (``tests/test_app.py`` compares them) for a
    ninth of the pixels: the film is downscaled once, the 7 x 7 map is upsampled to the small size."""
    size = thumbnail_size(analysis.image.shape, side)
    small = analysis.image if size == analysis.image.shape else np.asarray(
        Image.fromarray(analysis.image.astype(np.float32)).resize(size[::-1], Image.Resampling.BILINEAR,
                                                                             reducing_gap=None))
    from chestxray.cam import cam_at, overlay

    return overlay(small, cam_at(analysis.cams[analysis.labels.index(label)], size), alpha)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(arr: np.ndarray) -> bytes:
    """A gray (H x W) or RGB (H x W x 3) uint8 array as PNG bytes, quickly: every row "Up"-filtered (one
    vectorised subtraction) and deflated at level 1 with run-length matching. Lossless (PIL reads back
    the same array; tests/test_app.py checks it), about as small as PIL's ``compress_level=1``, in
    about half its time on these films and overlays."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(f"expected a gray or RGB image, got shape {arr.shape}")
    h, w = arr.shape[:2]
    rows = arr.reshape(h, -1)
    raw = np.empty((h, rows.shape[1] + 1), np.uint8)
    raw[:, 0] = 2  # filter type Up: each byte minus the byte above it (mod 256)
    raw[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    data = deflate.compress(raw) + deflate.flush()
    color_type = 0 if arr.ndim == 2 else 2
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0))
            + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b""))


def _safe_cell(text: str) -> str:
    """Keeps spreadsheet programs from reading a file name as a formula."""
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


class OutputFiles:
    """Output images and CSVs, written by the app under unique names and handed to Gradio as paths.

    Gradio saves array outputs under a content-hash name and rewrites that file in place each time the
    same picture is produced again (the same example, many users): a client downloading it meanwhile gets
    a truncated file. A path is instead copied into Gradio's cache atomically and never rewritten. These
    originals are removed after ``max_age`` seconds.
    """

    def __init__(self, max_age: float = 900.0):
        self.root = Path(tempfile.gettempdir()) / f"chestxray_app_{os.getpid()}"
        self.max_age = max_age
        self._pruned = 0.0
        atexit.register(shutil.rmtree, self.root, True)

    def new_dir(self) -> Path:
        """A fresh folder for one request's outputs (old folders are pruned at most once a minute)."""
        self.root.mkdir(parents=True, exist_ok=True)
        now = time.time()
        if now - self._pruned > 60:
            self._pruned = now
            for old in self.root.iterdir():
                try:
                    if now - old.stat().st_mtime > self.max_age:
                        shutil.rmtree(old, ignore_errors=True)
                except OSError:
                    pass
        return Path(tempfile.mkdtemp(dir=self.root))

    @staticmethod
    def png(rgb: np.ndarray, path: Path) -> str:
        """Writes an RGB/gray uint8 array as PNG (:func:`encode_png`: fast, lossless) and returns the path."""
        Path(path).write_bytes(encode_png(rgb))
        return str(path)

    @staticmethod
    def heatmap(rgb: np.ndarray, path: Path) -> str:
        """Writes a heatmap overlay as JPEG (quality :data:`HEATMAP_JPEG_QUALITY`, no chroma subsampling) and
        returns the path (``path``'s suffix becomes ``.jpg``).

        Films stay lossless PNG; an overlay is a picture of where the model looked, not a film to read, and as
        JPEG it is about a fifth of the PNG's size (110 vs 590 KB at 768 px: what a Space's visitor downloads)
        and is written in 2 ms instead of 33."""
        path = Path(path).with_suffix(".jpg")
        Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(path, "JPEG", quality=HEATMAP_JPEG_QUALITY,
                                                                         subsampling=0)
        return str(path)


OUT = OutputFiles()
#: JPEG quality of the heatmap overlays (95 with 4:4:4 colour: the colour bar's digits and the box outlines stay sharp).
HEATMAP_JPEG_QUALITY = 95
#: Seconds a session's stored analysis is kept (overlay changes need it; API clients never "close the tab").
STATE_TTL = int(os.environ.get("CHESTXRAY_STATE_TTL", 1800))
#: Sessions whose stored analysis is kept, most recently used first (Gradio's ``state_session_capacity``; its
#: default, 10,000, would let abandoned sessions hold up to ~3 MB each, a DICOM's film at display size included,
#: for STATE_TTL: API clients open a new session per client and never close it). An older session's next label or
#: window change asks to analyze again. bench_load (16 clients opening 48 sessions over 400 requests, idle machine):
#: RSS +54 to +86 MiB from request 20 to 400 before; +24, -9, +21 MiB with this cap and the work threads.
SESSIONS = int(os.environ.get("CHESTXRAY_SESSIONS", 32))


def pack(a: Analysis) -> dict:
    """What a session keeps of an analysis: probabilities, all-label maps, the display image as uint8 (~0.6 MB)."""
    return {"labels": list(a.labels), "probs": a.probs, "cams": a.cams, "image": to_uint8(a.image),
            "thresholds": dict(a.thresholds), "warnings": list(getattr(a, "warnings", None) or []),
            "calibrated": bool(getattr(a, "calibrated", False))}


def unpack(d: dict) -> Analysis:
    """The stored analysis back as an :class:`Analysis` (no model involved)."""
    from chestxray.predictor import Analysis

    return Analysis(d["labels"], d["probs"], d["cams"], d["image"].astype(np.float32) / 255.0, d["thresholds"],
                    warnings=d["warnings"], calibrated=d.get("calibrated", False))


def _file_stem(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label)[:60] or "label"


# -- viewer (window/level, before/after) and report: drawing from the session's state, never a model --------
#: Largest |window centre| the window endpoint accepts (stored values: 16-bit, HU and rescaled values fit).
WINDOW_LIMIT = 1_000_000
#: The disclaimer as plain text, for the report (the server's upload policy does not belong on a study's page).
DISCLAIMER_TEXT = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", DISCLAIMER)).split()).replace(
    " Uploaded files are deleted from the server within an hour.", "")


def viewer_state(xray: XrayImage, a: Analysis) -> dict:
    """What a session keeps for windowing and the report: the film's stored values at display size (None for
    8-bit files), the window shown (None: the file's own, as the model saw it), the file's technical fields."""
    from chestxray.report import technical_fields

    return {"film": film_for_display(xray, a.image.shape), "window": None, "window_name": STORED,
            "info": technical_fields(xray)}


def viewed(state: dict) -> Analysis:
    """The stored analysis with its display image re-windowed as the user chose (the maps are untouched)."""
    a = unpack(state["analysis"])
    film, win = state.get("film"), state.get("window")
    if film is not None and win is not None:
        a.image = film.render(win)
    return a


def window_text(state: dict) -> str:
    """The window shown, in words (for the report)."""
    film, win, name = state.get("film"), state.get("window"), state.get("window_name", STORED)
    if win is None:
        stored = film.stored if film is not None else None
        return STORED + (f" (centre {stored.center:g}, width {stored.width:g})" if stored else " (as decoded)")
    return f"{name} (centre {win.center:.6g}, width {win.width:.6g}, in the file's stored units)"


def _current_cam(state: dict) -> np.ndarray | None:
    """The map of the view's slow method, kept by ``_render`` (None for the fast methods: stored maps)."""
    v = state["view"]
    return None if v["method"] in FAST_METHODS else state.get("maps", {}).get((v["label"], v["method"]))


class ViewerReport:
    """Handlers of the viewer and the report (mixed into :class:`Service`): display only, no forward pass."""

    @user_errors
    def window(self, preset: str, center: float, width: float, state: dict):
        """Re-windows the film (a preset, or "Custom" with centre and width in the file's stored units) and
        redraws the overlay from the stored analysis. The model's input is not affected."""
        _analysed(state)
        film = state.get("film")
        if film is None:
            raise _error("Window/level needs a DICOM or 16-bit image; this file's 8-bit pixels are shown as stored.")
        if preset == CUSTOM:
            win = Window(float(center), max(float(width), 1.0))
        elif preset in PRESETS:
            win = None if preset == STORED else film.preset(preset)
        else:
            raise _error("Unknown window preset: choose one of " + ", ".join((*PRESETS, CUSTOM)) + ".")
        state["window"], state["window_name"] = win, preset
        shown = win or film.preset(STORED)
        v = state.get("view") or {}
        image, text = self._render(state, v.get("label"), v.get("method", "gradcam"), v.get("alpha", 0.4),
                                   v.get("scale", "minmax"), boxes=v.get("boxes", False))
        return preset, shown.center, shown.width, image, text, state

    def window_custom(self, center: float, width: float, state: dict):
        """The centre/width sliders: a custom window."""
        return self.window(CUSTOM, center, width, state)

    @staticmethod
    def window_controls(state: dict):
        """The window controls for the analysed file: slider ranges from its stored values; off for 8-bit files."""
        film = (state or {}).get("film")
        if film is None:
            off = gr.update(interactive=False)
            return (gr.update(value=STORED, interactive=False), off, off,
                    "Window/level applies to DICOM and 16-bit images; this file is 8-bit and is shown as stored.")
        w = film.preset(STORED)
        span = (film.high - film.low) or 1.0
        step = 1.0 if span >= 200 else span / 200
        return (gr.update(value=STORED, interactive=True),
                gr.update(minimum=min(film.low, w.center), maximum=max(film.high, w.center), value=w.center,
                          step=step, interactive=True),
                gr.update(minimum=1, maximum=max(2 * span, w.width), value=w.width, step=step, interactive=True),
                f"Display only: the model always sees the file's own window. Stored values {film.low:g} to "
                f"{film.high:g}" + (" (MONOCHROME1: high values are dark)." if film.invert else "."))

    @staticmethod
    @user_errors
    def before_after(state: dict):
        """The film and its heatmap (same size, no colour bar) for the before/after slider."""
        if not state or "view" not in state:
            return None
        a, v = viewed(state), state["view"]
        folder = OUT.new_dir()
        film = np.repeat(to_uint8(a.image)[..., None], 3, axis=2)
        heat = a.overlay(v["label"], v["alpha"], scale=v["scale"], cam=_current_cam(state),
                         boxes=v.get("boxes", False))
        return OUT.png(film, folder / "film.png"), OUT.heatmap(heat, folder / f"heatmap_{_file_stem(v['label'])}")

    @user_errors
    def report(self, state: dict):
        """The study as shown now (label, map, scale, window) as a PDF and a JSON file: every probability with
        its threshold, the model and its card line, the input warnings, the disclaimer. No forward pass; no
        file name and no DICOM header field other than the technical ones the reader keeps."""
        _analysed(state, "view")
        a, v = viewed(state), state["view"]
        overlay = a.overlay(v["label"], v["alpha"], scale=v["scale"], cam=_current_cam(state), colorbar=True,
                            boxes=v.get("boxes", False))
        view = {**v, "method_title": METHOD_TITLES.get(v["method"], v["method"]),
                "scale_title": SCALE_NAMES[v["scale"]].lower(), "window": window_text(state)}
        from chestxray.report import write_report  # matplotlib: not needed to build the page

        pdf, js = write_report(OUT.new_dir(), a, to_uint8(a.image), overlay, model=self.registry.card(state["model"]),
                               image=state["info"], view=view, disclaimer=DISCLAIMER_TEXT)
        return str(pdf), str(js)


# -- event handlers ------------------------------------------------------------------------------
class Service(ViewerReport):
    """The app's handlers over one model registry (every model call goes through the library)."""

    def __init__(self, registry: ModelRegistry, load_default: bool = True, warm_up: bool = True):
        self.registry = registry
        self.available = registry.available()
        self.default = registry.default()
        self._load_default = load_default
        #: Imports torch and loads the default model (the others load on first use) in the background: start-up
        #: does not wait for it, and a request that comes first waits on the import lock and the registry's
        #: per-model lock. Not a daemon: a process that exits while torch is still loading weights in a daemon
        #: thread aborts. ``python app.py`` starts it once the server is up (:func:`main`), so that the imports do
        #: not compete with building and serving the page for the interpreter lock.
        self.warm = threading.Thread(target=self._warm_up, name="warm-up")
        if warm_up:
            self.warm.start()

    def start_warm_up(self) -> None:
        """Starts the warm-up thread (once)."""
        if not self.warm.is_alive() and self.warm.ident is None:
            self.warm.start()

    def _warm_up(self) -> None:
        from chestxray.cam import colormap_lut

        configure_torch()
        colormap_lut()  # matplotlib's colormap, imported once here rather than in the first request
        if self.default and self._load_default:
            try:
                self.registry.get(self.default)
            except Exception as err:  # noqa: BLE001 - the UI still starts and reports the error on use
                log.error("could not load the default model %s: %s", self.default, err)

    def _predictor(self, model: str | None):
        if not self.available:
            raise _error(NO_MODEL)
        name = model or self.default
        if name not in self.available:
            raise _error(f"Model {name!r} is not installed; choose one of: {', '.join(self.available)}")
        return name, self.registry.get(name)

    def card(self, name: str | None) -> str:
        if not name:
            return f"**{NO_MODEL}**"
        try:
            return card_markdown(self.registry.card(name))
        except Exception as err:  # noqa: BLE001
            text = str(err).splitlines()[0] if str(err).strip() else type(err).__name__
            return f"Model card unavailable: {html.escape(text)}"

    def _render(self, state: dict, label: str | None, method: str, alpha: float, scale: str = "minmax",
                folder: Path | None = None, boxes: bool = False):
        """The overlay for one label from the stored analysis (no forward pass for the fast methods, and
        none for a scale or opacity change: both only change how the stored map is drawn)."""
        a = viewed(state)  # drawn on the film as currently windowed (display only)
        label = label if label in a.labels else a.top_label()
        method = method if method in METHODS else "gradcam"
        scale = scale if scale in SCALES else "minmax"
        cam = None
        if method not in FAST_METHODS:  # one backward pass; the last map is kept so that opacity changes stay free
            maps = state.setdefault("maps", {})
            if (label, method) not in maps:
                maps.clear()
                maps[(label, method)] = self.registry.get(state["model"]).explain(a.image, label, method)
            cam = maps[(label, method)]
        state["view"] = {"label": label, "method": method, "alpha": float(alpha), "scale": scale,
                         "boxes": bool(boxes)}
        image = a.overlay(label, alpha, scale=scale, cam=cam, colorbar=True, boxes=bool(boxes))
        path = OUT.heatmap(image, (folder or OUT.new_dir()) / f"overlay_{_file_stem(label)}")
        text = caption(a, label, method, scale)
        return path, (text + "\n\n" + describe_boxes(a.boxes(label, cam)) if boxes else text)

    @staticmethod
    def _gallery(analysis, alpha: float, folder: Path) -> list:
        probs = analysis.prob_dict()
        return [(OUT.heatmap(gallery_thumbnail(analysis, k, alpha), folder / f"above_{_file_stem(k)}"),
                 f"{k} {probs[k]:.2f}") for k in analysis.positives()[:MAX_GALLERY]]

    @user_errors
    def predict(self, file, model, method="gradcam", alpha=0.4, scale="minmax", boxes=False):
        """Probabilities of every label (one forward pass), the label table, the top label's overlay.

        The decoded film and the gallery are not drawn here: the page asks for them (:meth:`extras`) once
        the bars and the overlay are shown, and API clients that only want the answer never pay for them.
        """
        name, predictor = self._predictor(model)
        path = _path(file)
        xray = read_image(path)
        a = predictor.analyze(xray)  # the XrayImage carries what the gate reads (metadata, colour)
        # the display image (longest side <= 768, uint8) stands in for the film in later explain calls: it
        # bounds the memory a session holds, and every model input is far smaller
        state = {"model": name, "analysis": pack(a), "maps": {}, **viewer_state(xray, a)}
        top = a.top_label()
        image, text = self._render(state, top, method, alpha, scale, OUT.new_dir(), boxes)
        warnings = [str(w) for w in (getattr(a, "warnings", None) or [])]
        return (a.prob_dict(), label_table(a), image, text,
                gr.update(choices=list(a.labels), value=top),
                gr.update(value=warning_html(warnings) if warnings else "", visible=bool(warnings)),
                image_info(xray), state)

    @user_errors
    def extras(self, alpha, state):
        """The decoded film as analysed and the gallery of labels above threshold, from the stored analysis."""
        _analysed(state)
        folder = OUT.new_dir()
        decoded = OUT.png(state["analysis"]["image"], folder / "image.png")  # the uint8 film pack() kept
        return decoded, self._gallery(viewed(state), alpha, folder)

    @user_errors
    def explain(self, label, method, alpha, scale, state, boxes=False):
        """Re-renders the overlay for another label, method, opacity, scale or boxes without running the model."""
        _analysed(state)
        return (*self._render(state, label, method, alpha, scale, boxes=boxes), state)

    @user_errors
    def compare(self, file, label=None, alpha=0.4, scale="minmax"):
        """Every installed model on the same image: a label x model table and one overlay per model."""
        if not self.available:
            raise _error(NO_MODEL)
        path = _path(file)
        xray = read_image(path)
        results, notes = {}, []
        for name in self.available:
            try:
                results[name] = self.registry.get(name).analyze(xray)
            except CheckpointError as err:
                notes.append(f"{name}: could not be loaded ({err})")
        if not results:
            raise _error("; ".join(notes) or NO_MODEL)
        labels = list(dict.fromkeys(k for a in results.values() for k in a.labels))
        rows = [[k, *[round(a.prob_dict()[k], 4) if k in a.labels else None for a in results.values()]]
                for k in labels]
        label = label if label in labels else next(iter(results.values())).top_label()
        for name, a in results.items():
            notes.append(f"**{name}**, above threshold: {', '.join(a.positives()) or 'none'}")
            notes += [f"{name}: ⚠ {html.escape(str(w))}" for w in getattr(a, "warnings", None) or []]
        state = {"results": {name: pack(a) for name, a in results.items()}}
        return ({"headers": ["label", *results], "data": rows}, self._compare_gallery(state, label, alpha, scale),
                gr.update(choices=labels, value=label), "\n\n".join(notes), state)

    @staticmethod
    def _compare_gallery(state: dict, label: str, alpha: float, scale: str = "minmax") -> list:
        folder, scale = OUT.new_dir(), scale if scale in SCALES else "minmax"
        return [(OUT.heatmap(a.overlay(label, alpha, scale=scale, colorbar=True), folder / _file_stem(name)),
                 f"{name}: {label} p={a.prob_dict()[label]:.2f}, {SCALE_NAMES[scale].lower()}")
                for name, a in ((n, unpack(d)) for n, d in state["results"].items()) if label in a.labels]

    @user_errors
    def compare_overlay(self, label, alpha, scale, state):
        """The side-by-side overlays for another label or scale, without running the models again."""
        if not state:
            raise _error("Run the comparison first.")
        return self._compare_gallery(state, label, alpha, scale)

    @user_errors
    def batch(self, files, model, progress=gr.Progress()):
        """Scores several files into a CSV: file, one column per label, warning, error."""
        name, predictor = self._predictor(model)
        files = [f for f in (files or []) if f]
        if not files:
            raise _error("Upload one or more files.")
        if len(files) > MAX_BATCH:
            raise _error(f"At most {MAX_BATCH} files per batch ({len(files)} given).")
        header = ["file", *predictor.labels, "warning", "error"]
        rows = []
        for f in progress.tqdm(files, desc="Scoring"):
            path = _path(f)
            row = {"file": _safe_cell(Path(path).name), "warning": "", "error": ""}
            try:
                a = predictor.analyze(read_image(path))
                row.update({k: f"{p:.6f}" for k, p in a.prob_dict().items()})
                row["warning"] = "; ".join(str(w) for w in getattr(a, "warnings", None) or [])
            except ImageReadError as err:
                row["error"] = str(err)
            rows.append(row)
        out = OUT.new_dir() / f"predictions_{_file_stem(name)}.csv"
        with out.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=header, restval="")
            writer.writeheader()
            writer.writerows(rows)
        shown = ["file", "error", "warning", *predictor.labels]  # problems first in the on-page preview
        return str(out), {"headers": shown, "data": [[r.get(k, "") for k in shown] for r in rows]}

    @user_errors
    def model_card(self, model):
        """Loads the chosen model (once) and returns its card."""
        if model:
            self._predictor(model)
        return self.card(model)


# -- layout --------------------------------------------------------------------------------------
def create_demo(registry: ModelRegistry | None = None, warm_up: bool = True) -> gr.Blocks:
    """Builds the Blocks app over ``registry`` (default: ``models.yaml`` / ``$CHESTXRAY_MODELS``); ``warm_up=False``
    leaves the warm-up thread to ``demo.service.start_warm_up()``."""
    svc = Service(registry if registry is not None else ModelRegistry.from_yaml(), warm_up=warm_up)
    model_work = {"concurrency_id": "model", "concurrency_limit": CONCURRENCY}
    examples = [f for f in EXAMPLES if (EXAMPLES_DIR / f).is_file()]
    with gr.Blocks(title=TITLE, delete_cache=(600, 3000)) as demo:
        gr.Markdown(f"# {TITLE}\nProbabilities for the 14 NIH ChestX-ray14 findings and *No Finding*, with "
                    "Grad-CAM heatmaps. Upload a frontal chest film (PNG, JPEG or DICOM).")
        gr.HTML(DISCLAIMER)
        if not svc.available:
            gr.HTML('<div style="border:2px solid #dc2626;border-radius:8px;padding:10px 14px;margin-top:6px;'
                    f'background:rgba(220,38,38,.10)"><b>{html.escape(NO_MODEL)}</b> The app does not predict '
                    "with untrained (random) weights, so Analyze, Compare and Batch are disabled.</div>",
                    elem_id="no-model")
        with gr.Row(equal_height=False):
            model_dd = gr.Dropdown(svc.available, value=svc.default, label="Model", allow_custom_value=True,
                                   scale=1, min_width=220, info=None if svc.available else NO_MODEL)
            with gr.Accordion("Model card", open=False), gr.Column(scale=3):
                card_md = gr.Markdown(svc.card(svc.default), label="Model card", show_label=False)
        with gr.Tabs():
            with gr.Tab("Analyze"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=2, min_width=280):
                        file_in = gr.File(label="Chest X-ray: PNG, JPEG or DICOM (also without extension)",
                                          type="filepath", file_types=None, height=120, elem_id="xray-file")
                        run_btn = gr.Button("Analyze", variant="primary", elem_id="analyze")
                        if examples:
                            gr.Examples([[str(EXAMPLES_DIR / f)] for f in examples], inputs=[file_in],
                                        cache_examples=False, label="Examples (NIH ChestX-ray14)",
                                        example_labels=[EXAMPLES[f] for f in examples])
                        decoded = gr.Image(label="Decoded image", type="numpy", format="png", interactive=False,
                                           height=300, elem_id="decoded")
                        info_md = gr.Markdown(label="Image info", show_label=False)
                    with gr.Column(scale=3, min_width=320):
                        warn_html = gr.HTML(visible=False, elem_id="input-warning", label="Input warning")
                        probs = gr.Label(num_top_classes=NUM_TOP, show_heading=False, label="Probabilities",
                                         elem_id="probs")
                        with gr.Accordion("All labels with operating thresholds", open=True):
                            table_md = gr.HTML(label="Label table")
                    with gr.Column(scale=3, min_width=320):
                        with gr.Row():
                            label_dd = gr.Dropdown([], value=None, label="Heatmap for label",
                                                   allow_custom_value=True)
                            method_dd = gr.Dropdown([(METHOD_TITLES[k], k) for k in METHODS],
                                                    value="gradcam", label="Method")
                        with gr.Row():
                            alpha = gr.Slider(0.0, 1.0, value=0.4, step=0.05, label="Heatmap opacity (at value 1)")
                            scale_rd = gr.Radio([(v, k) for k, v in SCALE_NAMES.items()], value="minmax",
                                                label="Heatmap scale", elem_id="heatmap-scale")
                            boxes_cb = gr.Checkbox(False, label="Show boxes", elem_id="show-boxes",
                                                   info="Outline the map's strongest regions")
                        overlay_img = gr.Image(label="Heatmap overlay", type="numpy", format="jpeg",
                                               interactive=False, height=400, elem_id="overlay")
                        caption_md = gr.Markdown(label="Heatmap caption", show_label=False)
                        gallery = gr.Gallery(label="Labels above their threshold (Grad-CAM, per-label range)",
                                             columns=4, height="auto", format="jpeg", object_fit="contain",
                                             elem_id="gallery")
                with gr.Row(equal_height=False):  # viewer and report (display only: no model runs here)
                    with gr.Column(scale=2, min_width=280):
                        with gr.Accordion("Window / level (display only)", open=True):
                            window_rd = gr.Radio([*PRESETS, CUSTOM], value=STORED, label="Window preset",
                                                 interactive=False, elem_id="window-preset")
                            # broad bounds: the server checks API values against them; the page narrows them
                            # to the analysed file's range (window_controls)
                            center_sl = gr.Slider(-WINDOW_LIMIT, WINDOW_LIMIT, value=0, label="Window centre "
                                                  "(stored units)", interactive=False, elem_id="window-center")
                            width_sl = gr.Slider(1, 2 * WINDOW_LIMIT, value=1, label="Window width (stored units)",
                                                 interactive=False, elem_id="window-width")
                            window_md = gr.Markdown("Analyze a DICOM or 16-bit image to window it.",
                                                    label="Window note", show_label=False)
                        report_btn = gr.Button("Export report (PDF + JSON)", elem_id="report")
                        report_pdf = gr.File(label="Report (PDF)", interactive=False, elem_id="report-pdf")
                        report_json = gr.File(label="Report (JSON)", interactive=False, elem_id="report-json")
                    with gr.Column(scale=4, min_width=320):
                        slider_img = gr.ImageSlider(label="Before / after: film | heatmap (drag the handle; "
                                                    "scroll to zoom, drag to pan)", type="filepath", format="png",
                                                    interactive=False, max_height=640, elem_id="before-after")
                state = gr.State(time_to_live=STATE_TTL)
            with gr.Tab("Compare models"):
                gr.Markdown("Runs every installed model on the same image.")
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1, min_width=280):
                        cmp_file = gr.File(label="Chest X-ray", type="filepath", file_types=None, height=120)
                        cmp_btn = gr.Button("Compare all models", variant="primary")
                        cmp_label = gr.Dropdown([], value=None, label="Heatmap for label", allow_custom_value=True)
                        cmp_notes = gr.Markdown(label="Comparison notes", show_label=False)
                    with gr.Column(scale=2):
                        cmp_table = gr.Dataframe(label="Probability per label (rows) and model (columns)",
                                                 interactive=False, max_height=520)
                        cmp_gallery = gr.Gallery(label="Grad-CAM per model", columns=5, height="auto", format="jpeg",
                                                 object_fit="contain")
                cmp_state = gr.State(time_to_live=STATE_TTL)
            with gr.Tab("Batch"):
                gr.Markdown(f"Score up to {MAX_BATCH} files with the selected model. The CSV has one row per file: "
                            "the file name, one column per label (probability), a *warning* and an *error* "
                            "column (unreadable files get an error row).")
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1, min_width=280):
                        batch_files = gr.File(label="Files", file_count="multiple", type="filepath",
                                              file_types=None)
                        batch_btn = gr.Button("Score files", variant="primary")
                        batch_csv = gr.File(label="Results (CSV)", interactive=False)
                    with gr.Column(scale=2):
                        batch_table = gr.Dataframe(label="Results", interactive=False, max_height=520)

        # the bars and the overlay first; the decoded film and the gallery follow from the stored analysis
        run_btn.click(svc.predict, [file_in, model_dd, method_dd, alpha, scale_rd, boxes_cb],
                      [probs, table_md, overlay_img, caption_md, label_dd, warn_html, info_md, state],
                      api_name="predict", **model_work
                      ).success(svc.extras, [alpha, state], [decoded, gallery], api_name="extras",
                                show_progress="hidden")
        gr.on([label_dd.input, method_dd.input, alpha.release, scale_rd.input, boxes_cb.input], svc.explain,
              [label_dd, method_dd, alpha, scale_rd, state, boxes_cb], [overlay_img, caption_md, state],
              api_name="explain",
              show_progress="minimal", **model_work)
        cmp_btn.click(svc.compare, [cmp_file, cmp_label, alpha, scale_rd],
                      [cmp_table, cmp_gallery, cmp_label, cmp_notes, cmp_state], api_name="compare", **model_work)
        cmp_label.input(svc.compare_overlay, [cmp_label, alpha, scale_rd, cmp_state], [cmp_gallery],
                        api_name="compare_overlay", show_progress="minimal", **model_work)
        batch_btn.click(svc.batch, [batch_files, model_dd], [batch_csv, batch_table], api_name="batch", **model_work)
        model_dd.change(svc.model_card, [model_dd], [card_md], api_name="model_card", **model_work)
        # viewer and report: drawing from the stored analysis only, so outside the model's concurrency limit
        window_out = [window_rd, center_sl, width_sl, overlay_img, caption_md, state]
        window_rd.input(svc.window, [window_rd, center_sl, width_sl, state], window_out, api_name="window",
                        show_progress="minimal")
        gr.on([center_sl.release, width_sl.release], svc.window_custom, [center_sl, width_sl, state], window_out,
              api_visibility="private", show_progress="minimal")
        decoded.change(svc.window_controls, [state], [window_rd, center_sl, width_sl, window_md],
                       api_visibility="private", show_progress="hidden")
        overlay_img.change(svc.before_after, [state], [slider_img], api_visibility="private", show_progress="hidden")
        report_btn.click(svc.report, [state], [report_pdf, report_json], api_name="report")
    demo.service = svc  # for tests and benchmarks
    return demo


demo = create_demo(warm_up=__name__ != "__main__")
demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
tune_queue(demo)


def main() -> None:
    """``python app.py``: the page is served first, then torch is imported and the default model loaded."""
    logging.basicConfig(level=logging.INFO)
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), max_file_size="25mb",
                show_error=False, state_session_capacity=SESSIONS, prevent_thread_lock=True)
    demo.service.start_warm_up()
    demo.block_thread()


if __name__ == "__main__":
    main()
