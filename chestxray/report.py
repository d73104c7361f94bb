"""A per-study report to take away: one PDF page (matplotlib's PdfPages) and the same facts as JSON.

Privacy: a report is built only from the :class:`~chestxray.predictor.Analysis` (probabilities,
thresholds, gate warnings), the technical fields of the :class:`~chestxray.imaging.XrayImage`
(:func:`technical_fields`: format, size, bit depth and the reduced DICOM codes the reader keeps), the
model card and the view settings. It never takes a file name (uploads are often named after the
patient) nor any DICOM element: the reader never decodes the others. The PDF's metadata is set here
(no author, no file name).
"""
from __future__ import annotations

import datetime as _dt
import json
import textwrap
import threading
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure

from chestxray.imaging import XrayImage

#: Bumped when the JSON's fields change meaning.
REPORT_VERSION = 1
TITLE = "Chest X-ray findings: research report"
#: The 14 PDF core fonts (Helvetica) write each string whole into the page stream: searchable text, no
#: embedded font, and a test can read it back. They cover Latin-1 only: no symbols on the page.
_RC = {"pdf.use14corefonts": True, "font.family": "sans-serif", "font.size": 8}
_A4 = (8.27, 11.69)
#: rcParams are process-global: one report is drawn at a time (a Figure, not pyplot, which is not thread-safe).
_LOCK = threading.Lock()


def technical_fields(xray: XrayImage) -> dict[str, Any]:
    """What a report may say about the file: the reader's technical fields only (no names, IDs, dates)."""
    h, w = xray.original_size
    out: dict[str, Any] = {"format": xray.format, "width": w, "height": h, "bit_depth": xray.bit_depth}
    for key in ("modality", "view", "body_part", "photometric"):
        if getattr(xray, key):
            out[key] = getattr(xray, key)
    out["notes"] = list(xray.notes)
    return out


def card_summary(card: dict[str, Any]) -> str:
    """One line from the registry's model card: name, architecture, input size, headline test AUROC."""
    line = f"{card.get('name')}: {card.get('arch')}, {card.get('img_size')} px input"
    metrics = card.get("metrics") or {}
    if metrics:  # the headline group comes first
        title, m = next(iter(metrics.items()))
        ci = m.get("mean_auroc_ci")
        line += f"; {title}: mean AUROC {m['mean_auroc']:.3f}"
        line += f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""
        line += f" on {m['n_images']} images" if "n_images" in m else ""
    elif "val_mean_auroc" in card:
        line += f"; validation mean AUROC {card['val_mean_auroc']:.3f}"
    return line + "."


def probability_scale(analysis) -> str:
    """What the analysis's probabilities are, in words (the report's and the HTTP API's ``probability_scale``)."""
    reference = getattr(analysis, "reference", None)
    if reference:  # the NIH-14 models: a prior shift puts every probability on this population's scale
        return (f"calibrated to {reference} (thresholds mapped to match); a child's film is read on the same "
                "adult scale")
    return ("temperature-calibrated per label on validation (thresholds mapped to match)"
            if getattr(analysis, "calibrated", False) else "raw model output (sigmoid of the logit)")


def report_dict(analysis, *, model: dict[str, Any], image: dict[str, Any], view: dict[str, Any],
                disclaimer: str) -> dict[str, Any]:
    """The JSON report: every label's probability, threshold and mark, the model, the file's technical
    fields, what the pictures show (label, map method and scale, display window), the warnings."""
    probs = analysis.prob_dict()
    rows = [{"label": k, "probability": round(probs[k], 6), "threshold": round(analysis.threshold(k), 6),
             "above_threshold": bool(probs[k] >= analysis.threshold(k))}
            for k in sorted(analysis.labels, key=lambda k: -probs[k])]
    return {
        "report_version": REPORT_VERSION,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": model.get("name"), "arch": model.get("arch"), "img_size": model.get("img_size"),
                  "source": model.get("source"), "summary": card_summary(model),
                  "threshold_rule": model.get("threshold_rule")},
        "image": image,
        "probability_scale": probability_scale(analysis),
        "findings": rows,
        "probabilities": {r["label"]: r["probability"] for r in rows},
        "thresholds": {r["label"]: r["threshold"] for r in rows},
        "above_threshold": analysis.positives(),
        "warnings": [str(w) for w in (analysis.warnings or [])],
        "view": view,
        "disclaimer": disclaimer,
    }


_LATIN1 = str.maketrans({"≥": ">=", "≤": "<=", "×": "x", "–": "-", "—": "-", "▲": "", "⚠": "!", "·": ",",
                         "‘": "'", "’": "'", "“": '"', "”": '"'})


def _pdf_text(text: str) -> str:
    """Text the core fonts can draw (Latin-1): common symbols spelled out, anything else as '?'."""
    return str(text).translate(_LATIN1).encode("latin-1", "replace").decode("latin-1")


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.fill(p, width) for p in _pdf_text(text).split("\n"))


def report_figure(data: dict[str, Any], film: np.ndarray, overlay: np.ndarray) -> Figure:
    """The report's one A4 page: title, disclaimer, model and image lines, warnings, film and overlay, the table.

    Draw it under :data:`_RC` (as :func:`write_pdf` does) for the PDF's fonts.

    Args:
        data: :func:`report_dict`'s output (the page says nothing the JSON does not).
        film: the film as shown (HxW uint8, display window applied).
        overlay: the heatmap overlay as shown (RGB uint8, colour bar on the right).
    """
    view = data["view"]
    fig = Figure(figsize=_A4)
    fig.text(0.06, 0.965, TITLE, fontsize=14, weight="bold")
    fig.text(0.06, 0.948, f"Created {data['created_utc']} (UTC)", fontsize=7, color="0.35")
    disclaimer = _wrap(data["disclaimer"], 125)
    fig.text(0.06, 0.935, disclaimer, fontsize=7, va="top",
             bbox={"boxstyle": "round,pad=0.5", "fc": "#fdf3e7", "ec": "#d97706"})
    y = 0.935 - 0.0105 * len(disclaimer.splitlines()) - 0.02
    info = data["image"]
    image_line = (f"Image: {info['format'].upper()} {info['width']}x{info['height']} px, {info['bit_depth']}-bit"
                  + "".join(f", {k.replace('_', ' ')} {info[k]}" for k in ("modality", "view", "body_part")
                            if info.get(k)))
    for text in (f"Model: {data['model']['summary']}", image_line,
                 f"Display window: {view['window']}. The model saw the file's own window.",
                 *([f"Probabilities: {data['probability_scale']}."] if data.get("probability_scale") else []),
                 *(f"Note: {n}" for n in info.get("notes", []))):
        text = _wrap(text, 130)
        fig.text(0.06, y, text, fontsize=8, va="top")
        y -= 0.0135 * len(text.splitlines()) + 0.003
    for w in data["warnings"]:
        text = _wrap(f"Input check: {w}. These results may be meaningless.", 115)
        fig.text(0.06, y, text, fontsize=8.5, va="top", color="#b91c1c", weight="bold")
        y -= 0.0145 * len(text.splitlines()) + 0.003
    top = y - 0.01
    ax1 = fig.add_axes((0.05, top - 0.36, 0.42, 0.35))
    ax1.imshow(film, cmap="gray", vmin=0, vmax=255)
    ax1.set_title("Film (as displayed)", fontsize=9)
    ax2 = fig.add_axes((0.50, top - 0.36, 0.47, 0.35))
    ax2.imshow(overlay)
    ax2.set_title(_pdf_text(f"Heatmap: {view['label']} (p = {data['probabilities'][view['label']]:.3f})"),
                  fontsize=9)
    for ax in (ax1, ax2):
        ax.set_axis_off()
    fig.text(0.5, top - 0.37, _wrap(f"Map: {view['method_title']}, {view['scale_title']}. Colour bar "
                                    "(viridis): 0 = no evidence for the label, 1 = strongest evidence. "
                                    "Heatmaps show where the model looked, not where disease is.", 120),
             fontsize=7, ha="center", va="top")
    ax3 = fig.add_axes((0.12, 0.03, 0.76, top - 0.44))
    ax3.set_axis_off()
    cells = [[_pdf_text(r["label"]), f"{r['probability']:.3f}", f"{r['threshold']:.3f}",
              "above threshold" if r["above_threshold"] else ""] for r in data["findings"]]
    table = ax3.table(cells, colLabels=["Label", "Probability", "Operating threshold", ""], loc="upper center",
                      cellLoc="left", colWidths=[0.36, 0.2, 0.24, 0.2])
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    for (row, _), cell in table.get_celld().items():
        cell.set_edgecolor("0.8")
        if row == 0 or (row > 0 and data["findings"][row - 1]["above_threshold"]):
            cell.get_text().set_weight("bold")
    ax3.set_title("Probabilities (bold, 'above threshold': at or above the label's operating threshold; "
                  "a model output, not a diagnosis)", fontsize=8)
    return fig


def write_pdf(path: Path, data: dict[str, Any], film: np.ndarray, overlay: np.ndarray) -> Path:
    """Writes :func:`report_figure` as a one-page PDF (core fonts: its text stays searchable)."""
    with _LOCK, mpl.rc_context(_RC), PdfPages(path, metadata={"Title": TITLE, "Author": None, "Subject": None,
                                                         "Keywords": None}) as pdf:
        pdf.savefig(report_figure(data, film, overlay))
    return path


def write_report(folder: Path, analysis, film: np.ndarray, overlay: np.ndarray, *, model: dict[str, Any],
                 image: dict[str, Any], view: dict[str, Any], disclaimer: str) -> tuple[Path, Path]:
    """Writes ``report.pdf`` and ``report.json`` into ``folder`` and returns both paths.

    Args:
        folder: an empty folder of this request.
        analysis: the study's :class:`~chestxray.predictor.Analysis`.
        film: the film as displayed (HxW uint8).
        overlay: the overlay as displayed (RGB uint8).
        model: the registry's card of the model (:meth:`ModelRegistry.card`).
        image: :func:`technical_fields` of the file.
        view: what the pictures show: ``label``, ``method``, ``method_title``, ``scale``, ``scale_title``,
            ``alpha``, ``window`` (text).
        disclaimer: plain text printed on the page and stored in the JSON.
    """
    folder = Path(folder)
    data = report_dict(analysis, model=model, image=image, view=view, disclaimer=disclaimer)
    json_path = folder / "report.json"
    json_path.write_text(json.dumps(data, indent=2, ensure_ascii=False))
    return write_pdf(folder / "report.pdf", data, film, overlay), json_path
