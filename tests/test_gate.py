"""The input gate at run time: rules, scoring, loading, and the predictor's use of it.

The gate is fitted once per session on real chest X-rays only (``fitted_gate`` in conftest.py).
The classifier here is a tiny random model, so its embedding carries little; what must hold
regardless are the metadata rules, the colour rule and the model-free appearance components.
"""
from __future__ import annotations

import shutil

import pytest

from chestxray import gate as gate_module
from chestxray.gate import APPEARANCE_MSG, GATE_FILE, Gate, GateResult, metadata_rules
from chestxray.imaging import XrayImage, read_image
from chestxray.predictor import Predictor
from tests.helpers import make_checkpoint

OOD_PHOTOS = ("photo_china.jpg", "photo_flower.jpg", "photo_grace_hopper.jpg")
OOD_SCANS = ("ct_abdomen_kcr2019.png", "mri_brain_matplotlib_s1045.png", "mri_pydicom_MR2.png")


def test_bad_gate_file_is_refused(tmp_path):
    bad = tmp_path / GATE_FILE
    bad.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(ValueError, match="not a valid gate file"):
        Gate.load(bad)


@pytest.mark.parametrize("name,rule", [
    ("pydicom_MR2_UNCR_mr.dcm", "modality"), ("pydicom_US1_UNCR_us.dcm", "modality"),
    ("kcr2019_anon_apct_abdomen_CT.dcm", "modality"), ("pydicom_RG3_UNCR_tibia_CR.dcm", "body_part"),
])
def test_metadata_rules_fire_on_real_non_chest_dicoms(fitted_gate, data_dir, name, rule):
    x = read_image(data_dir / "dicom" / name)
    assert rule in [r for r, _ in metadata_rules(x)]
    result = fitted_gate[2].assess(x)
    assert not result.ok and rule in result.rules
    assert all("\n" not in m and m.endswith("not meaningful.") for m in result.reasons)


def test_metadata_rules_pass_a_chest_cr_and_catch_a_lateral_view(fitted_gate, data_dir):
    chest = read_image(data_dir / "dicom" / "pydicom_RG1_UNCR_chest_CR.dcm")
    assert chest.modality == "CR" and chest.view == "PA" and metadata_rules(chest) == []
    lateral = XrayImage(chest.pixels, "dicom", chest.original_size, 15, modality="DX", view="LL", body_part="CHEST")
    result = fitted_gate[2].assess(lateral)
    assert "view" in result.rules and any("lateral view" in m for m in result.reasons)


def test_held_out_chest_x_rays_pass(fitted_gate, data_dir):
    _, predictor, gate, _, used = fitted_gate
    held = sorted((data_dir / "nih/full_res").glob("*.png"))[:5] + sorted((data_dir / "misc").glob("*.png")) + [
        data_dir / "dicom" / "pydicom_RG1_UNCR_chest_CR.dcm"] + sorted((data_dir / "tbx11k/images").glob("*"))[:5]
    held = [p for p in held if str(p) not in used]
    results = {}
    for p in held:
        x = read_image(p)  # carries the colour fraction: the gate applies the colour rule from it
        results[p.name] = gate.assess(x, x.pixels, predictor.embed([x.pixels])[0])
    passed = [n for n, r in results.items() if r.ok]
    assert len(held) >= 15 and len(passed) >= 0.8 * len(held), {n: r.rules for n, r in results.items()}
    assert results["pydicom_RG1_UNCR_chest_CR.dcm"].ok  # a real CR film in MONOCHROME1 as a clinician uploads it


def test_real_non_chest_images_are_flagged_by_pixels_alone(fitted_gate, data_dir):
    """No metadata and no colour: the photos, CT and MR slices are caught by their appearance."""
    _, predictor, gate, _, _ = fitted_gate
    for name in OOD_PHOTOS + OOD_SCANS:
        x = read_image(data_dir / "ood" / name)
        r = gate.assess(None, x.pixels, predictor.embed([x.pixels])[0])
        assert not r.ok and "appearance" in r.rules and r.reasons == [APPEARANCE_MSG], (name, r.components)
        assert r.score > gate.threshold


def test_colour_and_shape_rules(fitted_gate, data_dir):
    gate = fitted_gate[2]
    photo = read_image(data_dir / "ood" / "photo_flower.jpg")
    r = gate.assess(None, photo.pixels, colour=0.8)
    assert "colour" in r.rules and r.reasons[0].startswith("This is a colour picture")
    assert "colour" in gate.assess(photo).rules  # the colour fraction recorded at decode time
    assert "colour" not in gate.assess(read_image(data_dir / "misc" / "h0001.png")).rules  # RGB-stored film
    strip = read_image(data_dir / "misc" / "h0001.png").pixels[:100]  # 100 x 512: no chest film's shape
    assert "shape" in gate.assess(None, strip).rules


def test_predictor_with_gate_file_warns(fitted_gate, data_dir):
    folder = fitted_gate[0]
    predictor = Predictor.load(folder, device="cpu")
    assert isinstance(predictor.gate, Gate)
    photo = predictor.analyze(data_dir / "ood" / "photo_china.jpg")
    assert photo.warnings and not photo.gate.ok and {"colour", "appearance"} <= set(photo.gate.rules)
    scan = predictor.analyze(read_image(data_dir / "ood" / "ct_abdomen_kcr2019.png"))  # XrayImage, as the app does
    assert scan.warnings == [APPEARANCE_MSG]
    mr = predictor.analyze(read_image(data_dir / "dicom" / "pydicom_MR2_UNCR_mr.dcm"))
    assert any("MR image" in w for w in mr.warnings)
    film = predictor.analyze(data_dir / "dicom" / "pydicom_RG1_UNCR_chest_CR.dcm")
    assert film.warnings == [] and film.gate.ok and film.probs.shape == (15,)
    arr = read_image(data_dir / "dicom" / "pydicom_US1_UNCR_us.dcm")  # bare pixels + the file's metadata
    assert any("ultrasound" in w for w in predictor.analyze(arr.pixels, xray=arr).warnings)


def test_analysis_never_reopens_the_file(fitted_gate, data_dir, tmp_path):
    """Data flows one way: the decoded XrayImage carries the colour fraction, so the photo is
    caught after its file is gone (and ``source=`` is accepted but not needed)."""
    predictor = fitted_gate[1]
    copy = tmp_path / "photo.jpg"
    shutil.copy(data_dir / "ood" / "photo_flower.jpg", copy)
    xray = read_image(copy)
    copy.unlink()
    assert "colour" in predictor.analyze(xray).gate.rules
    with pytest.deprecated_call():
        assert "colour" in predictor.analyze(xray, source=copy).gate.rules


def test_embed_is_the_analysis_embedding(fitted_gate, data_dir):
    predictor = fitted_gate[1]
    x = read_image(data_dir / "misc" / "h0001.png")
    emb = predictor.embed([x, x.pixels])
    assert emb.shape == (2, predictor.classifier_weight.shape[1])
    assert emb == pytest.approx(predictor.analyze(x).embedding[None].repeat(2, 0), rel=1e-5, abs=1e-6)


def test_predictor_without_gate_still_applies_rules_and_refuses_foreign_gate(fitted_gate, tmp_path, data_dir):
    other = make_checkpoint(tmp_path / "other", seed=4)
    predictor = Predictor.load(other, device="cpu")
    assert predictor.gate is None
    mr = predictor.analyze(data_dir / "dicom" / "pydicom_MR2_UNCR_mr.dcm")
    assert isinstance(mr.gate, GateResult) and "modality" in mr.gate.rules and mr.warnings
    assert predictor.analyze(data_dir / "ood" / "photo_flower.jpg").gate.rules == ["colour"]
    assert predictor.analyze(read_image(data_dir / "ood" / "photo_flower.jpg")).gate.rules == ["colour"]
    assert predictor.analyze(data_dir / "misc" / "h0001.png").warnings == []
    shutil.copy(fitted_gate[0] / GATE_FILE, other / GATE_FILE)  # fitted for other weights: not used
    assert Predictor.load(other, device="cpu").gate is None
