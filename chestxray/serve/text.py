"""What a front end shows as text: the disclaimer, image info, the label table, map captions, the model card.

HTML and Markdown strings built from plain data (an :class:`~chestxray.predictor.Analysis`, an
:class:`~chestxray.imaging.XrayImage`'s technical fields, the registry's card): no patient data, and every
value that came from a file is escaped.
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chestxray.cam_methods import CAM_METHODS, METHOD_TITLES
from chestxray.imaging import XrayImage

if TYPE_CHECKING:  # torch: not needed to build a page
    from chestxray.predictor import Analysis

#: Heatmap scales (chestxray.cam.SCALES) as the app names them.
SCALE_NAMES = {"minmax": "Per-label range (min-max)", "probability": "Scaled by probability"}
#: Shown above every result (HTML).
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
#: The disclaimer as plain text, for the report (the server's upload policy does not belong on a study's page).
DISCLAIMER_TEXT = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", DISCLAIMER)).split()).replace(
    " Uploaded files are deleted from the server within an hour.", "")


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


def shown_as_stored(info: dict | None) -> str:
    """The viewer's one line for a film without stored values to window (8-bit and colour files), from the
    report's technical fields (:func:`chestxray.report.technical_fields`)."""
    info = info or {}
    kind = " ".join(x for x in (f"{info['bit_depth']}-bit" if info.get("bit_depth") else "",
                                html.escape(str(info.get("format") or "").upper(), quote=False)) if x)
    return f"{kind or 'This'} film: shown as stored."


def warning_html(warnings: list[str]) -> str:
    """The prominent box shown when the input gate doubts the image."""
    items = "".join(f"<li>{html.escape(str(w))}</li>" for w in warnings)
    return ('<div style="border:2px solid #dc2626;border-radius:8px;padding:10px 14px;'
            'background:rgba(220,38,38,.10)"><b>⚠ Check the input: these results may be meaningless.</b>'
            f"<ul style='margin:4px 0 0 0'>{items}</ul></div>")


@dataclass(frozen=True)
class LabelRow:
    """One label as the result panel shows it."""

    label: str
    probability: float
    threshold: float
    above: bool  # at or above its operating threshold


def ranked_labels(analysis: Analysis) -> list[LabelRow]:
    """Every label in the result panel's order: those at or above their operating threshold first, then the
    others; most probable first within each group, ties in the checkpoint's label order."""
    probs = analysis.prob_dict()
    rows = [LabelRow(k, probs[k], analysis.threshold(k), probs[k] >= analysis.threshold(k)) for k in analysis.labels]
    return sorted(rows, key=lambda r: (not r.above, -r.probability))  # sorted() is stable


def bar_position(value: float) -> float:
    """Where ``value`` (a probability or a threshold) lies on a 0-1 bar, in percent of its width (clamped)."""
    return round(100.0 * min(max(float(value), 0.0), 1.0), 1)


#: The result panel's marker of a label at or above its operating threshold (a word, not a colour only).
ABOVE_MARK = "▲ above threshold"


def _bar_row(r: LabelRow) -> str:
    """One label: its name (marked when above threshold), probability and threshold, and a 0-1 bar whose tick
    is the threshold."""
    fill = "#ea580c" if r.above else "rgba(100,116,139,.55)"
    mark = (f'<span class="cxr-mark" style="display:inline-block;border:1.5px solid currentColor;border-radius:4px;'
            f'padding:0 4px;margin-right:6px;font-size:11px;font-weight:700">{ABOVE_MARK}</span>' if r.above else "")
    p, t = bar_position(r.probability), bar_position(r.threshold)
    return (f'<div class="cxr-row" data-label="{html.escape(r.label)}" data-above="{str(r.above).lower()}" '
            f'data-probability="{r.probability:.6f}" data-threshold="{r.threshold:.6f}" style="padding:4px 0 6px 0;'
            f'{"font-weight:600" if r.above else ""}">'
            '<div style="display:flex;flex-wrap:wrap;justify-content:space-between;align-items:baseline;gap:0 8px">'
            f'<span>{mark}<span class="cxr-name">{html.escape(r.label)}</span></span>'
            # margin-left:auto: the numbers stay right-aligned when a narrow screen wraps them under the name
            '<span style="margin-left:auto;white-space:nowrap;font-variant-numeric:tabular-nums;font-size:13px">'
            f'<b>{r.probability:.3f}</b> <span style="opacity:.75;font-weight:400">· threshold {r.threshold:.3f}'
            '</span></span></div>'
            f'<div class="cxr-bar" role="img" aria-label="probability {r.probability:.3f}, operating threshold '
            f'{r.threshold:.3f}" style="position:relative;height:9px;margin:3px 0 0 0;border-radius:3px;'
            'background:rgba(128,128,128,.18)">'
            f'<div class="cxr-fill" style="position:absolute;left:0;top:0;bottom:0;width:{p}%;min-width:2px;'
            f'border-radius:3px;background:{fill}"></div>'
            f'<div class="cxr-tick" data-position="{t}" title="operating threshold {r.threshold:.3f}" '
            f'style="position:absolute;top:-3px;bottom:-3px;left:{t}%;width:2px;margin-left:-1px;'
            'background:currentColor"></div></div></div>')


def label_table(analysis: Analysis) -> str:
    """The result panel (HTML): the labels at or above their operating threshold first, marked
    :data:`ABOVE_MARK`, then the others; each with its probability, its threshold and a 0-1 bar whose tick is
    the threshold; the probability scale in words."""
    rows = ranked_labels(analysis)
    above = [r for r in rows if r.above]
    # headings a screen reader can jump between (the page's own headings are h1/h2)
    head = 'role="heading" aria-level="3" style="font-size:13px;font-weight:700;margin:6px 0 2px 0;' \
           'padding-bottom:2px;border-bottom:1px solid rgba(128,128,128,.35)"'
    parts = [f'<div class="cxr-group" data-group="above" {head}>Above their operating threshold: {len(above)}</div>'
             if above else
             f'<div class="cxr-group" data-group="above" {head}>No label reaches its operating threshold</div>']
    parts += [_bar_row(r) for r in above]
    parts.append(f'<div class="cxr-group" data-group="below" {head}>Below threshold: {len(rows) - len(above)} '
                 '(most probable first)</div>')
    parts += [_bar_row(r) for r in rows if not r.above]
    # quote=False: a text node, where the scale's "NIH's" reads (and is searched) as written
    return (f'<div class="cxr-labels" style="font-size:14px">{"".join(parts)}<p style="font-size:12px;'
            f'margin:8px 0 0 0;line-height:1.4">{ABOVE_MARK}: the probability reaches the label\'s operating '
            "threshold (chosen on validation), marked by the tick on its bar; bars run from 0 to 1. Probabilities "
            f"are {html.escape(_scale(analysis), quote=False)}. This is a model output, not a diagnosis.</p></div>")


def _scale(analysis: Analysis) -> str:
    """The report's words for the probability scale (imported here: the report pulls in matplotlib, which the
    page is built without)."""
    from chestxray.report import probability_scale

    return probability_scale(analysis)


def caption(analysis: Analysis, label: str, method: str, scale: str = "minmax") -> str:
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
    reference = getattr(analysis, "reference", None)
    scale_note = (f", on the scale of {reference} (a child's film is read on the same adult scale)" if reference
                  else ", temperature-calibrated on validation" if calibrated else "")
    return (f"**{label}**: probability **{p:.3f}**{scale_note} "
            f"(operating threshold {t:.3f}{', mapped to match' if calibrated else ''}: {side} threshold). "
            f"Map: {METHOD_TITLES.get(method, method)}, {how}. Colour bar (right edge, viridis): 0 = no evidence "
            f"for the label (the film shows through), 1 = the strongest evidence; colour and opacity rise together."
            f"{extra}")


def card_markdown(card: dict) -> str:
    """The model card panel: architecture, training data, validation AUROC, thresholds."""
    c = card
    ens = c.get("ensemble")
    if ens:  # no weights, no temperatures of its own: its members have them (chestxray/ensemble.py)
        size = f", {c['img_size']} px input" if c.get("img_size") else ""
        lines = [f"**{c['name']}**: an ensemble of {', '.join(map(str, ens.get('members', [])))}{size}; no weights "
                 f"of its own: it shows the {ens.get('combine', 'mean')} and the {ens.get('cam', 'mean Grad-CAM')}."]
    else:
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
    if ens:
        ref = f", then shifted to **{cal['reference']}**" if cal and cal.get("reference") else ""
        lines.append(("Each member's probabilities are temperature-calibrated on its own validation split" + ref
                      if cal else "The members' probabilities are averaged as each member reports them")
                     + "; the mean is not rescaled, and the ensemble's thresholds were chosen on the mean's own scale "
                       "(validation films of every member), so nothing maps them.")
    elif cal:
        on = (f" ({cal['n_films']} films of the {cal['fitted_on']})" if cal.get("fitted_on") and cal.get("n_films")
              else "")
        lines.append(f"Probabilities are **temperature-calibrated on validation**{on}: each label's logit is divided "
                     f"by its own temperature ({len(cal['temperatures'])} labels), which keeps the order of the films; "
                     "the thresholds below are mapped the same way, so the same films are marked.")
        if cal.get("reference"):
            lines.append(f"Then each label's logit is shifted once ({cal['n_shifts']} labels) so that the probabilities "
                         f"refer to **{cal['reference']}**; a child's film is read on the same adult scale.")
    else:
        lines.append("Probabilities are the model's raw outputs (not recalibrated).")
    if c.get("thresholds"):
        rule = f" ({c['threshold_rule']} rule, chosen on validation)" if c.get("threshold_rule") else ""
        lines.append(f"Operating thresholds{rule}: " + ", ".join(f"{k} {v:.2f}" for k, v in c["thresholds"].items())
                     + ". A label is marked *above threshold* when its probability reaches its threshold.")
    else:
        lines.append("No operating thresholds in this checkpoint: 0.5 is used for every label.")
    return "\n\n".join(lines)
