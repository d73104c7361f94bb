"""What a front end shows as text: the disclaimer, image info, the label table, map captions, the model card.

HTML and Markdown strings built from plain data (an :class:`~chestxray.predictor.Analysis`, an
:class:`~chestxray.imaging.XrayImage`'s technical fields, the registry's card): no patient data, and every
value that came from a file is escaped.
"""
from __future__ import annotations

import html
import re
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


def warning_html(warnings: list[str]) -> str:
    """The prominent box shown when the input gate doubts the image."""
    items = "".join(f"<li>{html.escape(str(w))}</li>" for w in warnings)
    return ('<div style="border:2px solid #dc2626;border-radius:8px;padding:10px 14px;'
            'background:rgba(220,38,38,.10)"><b>⚠ Check the input: these results may be meaningless.</b>'
            f"<ul style='margin:4px 0 0 0'>{items}</ul></div>")


def label_table(analysis: Analysis) -> str:
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
            + (f"Probabilities are {_scale(analysis)}. " if getattr(analysis, "calibrated", False) else "")
            + "This is a model output, not a diagnosis.</p>")


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
