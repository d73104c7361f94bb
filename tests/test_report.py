"""The per-study report (chestxray.report): PDF and JSON content, and no patient data from the marker DICOM."""
from __future__ import annotations

import json
import re
import zlib

import numpy as np
import pytest

from chestxray.imaging import read_image, to_uint8
from chestxray.report import card_summary, technical_fields, write_report
from tests.badfiles import PRIVACY_MARKERS
from tests.helpers import make_checkpoint

CARD = {"name": "tiny", "arch": "test_efficientnet", "img_size": 64, "source": "weights/tiny",
        "metrics": {"test, NIH, label-balanced films": {"mean_auroc": 0.6, "mean_auroc_ci": [0.55, 0.65],
                                                        "n_images": 82}}}


def pdf_text(data: bytes) -> bytes:
    """The PDF's bytes with every Flate stream decompressed (page text lives there)."""
    parts = [data]
    for m in re.finditer(rb"stream\r?\n(.*?)endstream", data, re.S):
        try:
            parts.append(zlib.decompress(m.group(1)))
        except zlib.error:  # not Flate (or not a stream): the raw bytes are already in parts[0]
            pass
    return b"\n".join(parts)


def marker_strings() -> list[str]:
    """Every patient string of the marker DICOM, whole and in parts (a name's components, "^" as space)."""
    out = set()
    for value in PRIVACY_MARKERS.values():
        out |= {value, value.replace("^", " "), *value.split("^")}
    return sorted(s for s in out if len(s) >= 4 and s != "NAME")  # "NAME" alone is an ordinary word


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    from chestxray.predictor import Predictor

    return Predictor.load(make_checkpoint(tmp_path_factory.mktemp("report") / "tiny", seed=2), device="cpu")


def test_report_pdf_and_json_from_the_marker_dicom(predictor, bad_corpus, tmp_path):
    xray = read_image(bad_corpus["privacy.dcm"])
    a = predictor.analyze(xray)
    a.warnings.append("This does not look like a frontal chest X-ray")
    label = a.top_label()
    view = {"label": label, "method": "gradcam", "method_title": "Grad-CAM (fast)", "scale": "minmax",
            "scale_title": "per-label range (min-max)", "alpha": 0.4, "window": "Lung (centre 1, width 2)"}
    pdf, js = write_report(tmp_path, a, to_uint8(a.image), a.overlay(label, 0.4, colorbar=True), model=CARD,
                           image=technical_fields(xray), view=view, disclaimer="Research demo: not a medical device.")
    raw = pdf.read_bytes()
    assert raw.startswith(b"%PDF") and raw.rstrip().endswith(b"%%EOF")
    text = pdf_text(raw)
    for k in a.labels:  # every label, with its probability and threshold, and the marks
        assert f"({k})".encode() in text
        assert f"({a.prob_dict()[k]:.3f})".encode() in text
    assert b"(above threshold)" in text and b"not a medical device" in text
    assert b"This does not look like a frontal chest X-ray" in text
    assert card_summary(CARD).encode() in text.replace(b"\\(", b"(").replace(b"\\)", b")")
    data = json.loads(js.read_text())
    assert data["probabilities"] == {k: round(v, 6) for k, v in a.prob_dict().items()}
    assert set(data["thresholds"]) == set(a.labels) and data["above_threshold"] == a.positives()
    assert data["model"]["name"] == "tiny" and data["model"]["arch"] == "test_efficientnet"
    assert data["image"]["modality"] == "CR" and data["view"]["window"].startswith("Lung")
    assert data["warnings"] == a.warnings and "not a medical device" in data["disclaimer"]
    for s in marker_strings():  # no patient string in either file (raw bytes, page text, JSON)
        assert s.encode() not in text, s
        assert s not in js.read_text(), s


def test_report_without_thresholds_or_metrics_and_odd_text(predictor, tmp_path):
    """No card metrics, symbols outside Latin-1 (the core fonts): the page still comes out, symbols spelled."""
    a = predictor.analyze(np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64))
    a.warnings.append("contrast ≥ limit ▲")
    view = {"label": a.labels[0], "method": "gradcam", "method_title": "Grad-CAM", "scale": "probability",
            "scale_title": "scaled by probability", "alpha": 0.5, "window": "Stored window (as decoded)"}
    image = {"format": "png", "width": 64, "height": 64, "bit_depth": 8, "notes": []}
    pdf, js = write_report(tmp_path, a, to_uint8(a.image), a.overlay(a.labels[0], 0.5), model={"name": "m"},
                           image=image, view=view, disclaimer="x")
    assert b"contrast >= limit" in pdf_text(pdf.read_bytes())
    assert json.loads(js.read_text())["warnings"] == ["contrast ≥ limit ▲"]
