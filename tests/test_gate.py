"""The input gate: fitted on real chest X-rays only, saved as safetensors, judged on real non-chest files.

The classifier here is a tiny random model, so its embedding carries little; what must hold
regardless are the metadata rules, the colour rule and the model-free appearance components.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from chestxray.gate import (APPEARANCE_MSG, GATE_FILE, NON_CHEST_FILES, Gate, GateResult, _embed, colour_fraction,
                            extract_features, fit_gate, main, metadata_rules)
from chestxray.imaging import XrayImage, read_image
from chestxray.predictor import Predictor
from tests.helpers import make_checkpoint

OOD_PHOTOS = ("photo_china.jpg", "photo_flower.jpg", "photo_grace_hopper.jpg")
OOD_SCANS = ("ct_abdomen_kcr2019.png", "mri_brain_matplotlib_s1045.png", "mri_pydicom_MR2.png")


def _chest_files(data: Path) -> list[Path]:
    nih = sorted((data / "nih/images_384").glob("*.png"))[:24]
    kermany = sorted((data / "kermany/train/NORMAL").glob("*.jpeg"))[:9] + sorted(
        (data / "kermany/train/PNEUMONIA").glob("*.jpeg"))[:9]
    covid = sorted((data / "covid/images").glob("*"))[:18]
    return nih + kermany + covid


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, data_dir):
    """A tiny checkpoint with a gate fitted on 40 real chest X-rays and calibrated on 20 others."""
    folder = make_checkpoint(tmp_path_factory.mktemp("gate") / "tiny", seed=3)
    predictor = Predictor.load(folder, device="cpu")
    files = _chest_files(data_dir)
    train = [str(p) for i, p in enumerate(files) if i % 3]
    val = [str(p) for i, p in enumerate(files) if i % 3 == 0]
    gate, stats = fit_gate(predictor, train, val, folder / GATE_FILE, target_fa=0.05)
    return folder, predictor, gate, stats, set(train) | set(val)


def test_fit_saves_safetensors_only_and_round_trips(fitted):
    folder, predictor, gate, stats, _ = fitted
    path = folder / GATE_FILE
    assert stats.path == path and path.is_file()
    assert stats.n_train == 40 and stats.n_val == 20 and stats.components == ["thumb", "stats", "embedding"]
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])  # safetensors: u64 header length + JSON header, no pickle opcodes
    header = json.loads(raw[8: 8 + n])
    meta = json.loads(header["__metadata__"]["gate"])
    assert meta["fingerprint"] and meta["model"] == "tiny" and meta["n_train"] == 40
    assert not raw.startswith(b"\x80") and b"torch._utils" not in raw
    loaded = Gate.load(path)
    assert loaded.threshold == pytest.approx(gate.threshold) and loaded.matches(predictor)
    feats = extract_features([np.linspace(0, 1, 80 * 64, dtype=np.float32).reshape(80, 64)], predictor)
    args = (feats.thumbs, feats.stats, feats.embeddings)
    np.testing.assert_allclose(loaded.scores(*args), gate.scores(*args), rtol=1e-6)


def test_bad_gate_file_is_refused(tmp_path):
    bad = tmp_path / GATE_FILE
    bad.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(ValueError, match="not a valid gate file"):
        Gate.load(bad)


@pytest.mark.parametrize("name,rule", [
    ("pydicom_MR2_UNCR_mr.dcm", "modality"), ("pydicom_US1_UNCR_us.dcm", "modality"),
    ("kcr2019_anon_apct_abdomen_CT.dcm", "modality"), ("pydicom_RG3_UNCR_tibia_CR.dcm", "body_part"),
])
def test_metadata_rules_fire_on_real_non_chest_dicoms(fitted, data_dir, name, rule):
    x = read_image(data_dir / "dicom" / name)
    assert rule in [r for r, _ in metadata_rules(x)]
    result = fitted[2].assess(x)
    assert not result.ok and rule in result.rules
    assert all("\n" not in m and m.endswith("not meaningful.") for m in result.reasons)


def test_metadata_rules_pass_a_chest_cr_and_catch_a_lateral_view(fitted, data_dir):
    chest = read_image(data_dir / "dicom" / "pydicom_RG1_UNCR_chest_CR.dcm")
    assert chest.modality == "CR" and chest.view == "PA" and metadata_rules(chest) == []
    lateral = XrayImage(chest.pixels, "dicom", chest.original_size, 15, modality="DX", view="LL", body_part="CHEST")
    result = fitted[2].assess(lateral)
    assert "view" in result.rules and any("lateral view" in m for m in result.reasons)


def test_held_out_chest_x_rays_pass(fitted, data_dir):
    _, predictor, gate, _, used = fitted
    held = sorted((data_dir / "nih/full_res").glob("*.png"))[:5] + sorted((data_dir / "misc").glob("*.png")) + [
        data_dir / "dicom" / "pydicom_RG1_UNCR_chest_CR.dcm"] + sorted((data_dir / "tbx11k/images").glob("*"))[:5]
    held = [p for p in held if str(p) not in used]
    results = {}
    for p in held:
        x = read_image(p)
        results[p.name] = gate.assess(x, x.pixels, _embed(predictor, [x.pixels])[0], colour=colour_fraction(p))
    passed = [n for n, r in results.items() if r.ok]
    assert len(held) >= 15 and len(passed) >= 0.8 * len(held), {n: r.rules for n, r in results.items()}
    assert results["pydicom_RG1_UNCR_chest_CR.dcm"].ok  # a real CR film in MONOCHROME1 as a clinician uploads it


def test_real_non_chest_images_are_flagged_by_pixels_alone(fitted, data_dir):
    """No metadata and no colour: the photos, CT and MR slices are caught by their appearance."""
    _, predictor, gate, _, _ = fitted
    for name in OOD_PHOTOS + OOD_SCANS:
        x = read_image(data_dir / "ood" / name)
        r = gate.assess(None, x.pixels, _embed(predictor, [x.pixels])[0])
        assert not r.ok and "appearance" in r.rules and r.reasons == [APPEARANCE_MSG], (name, r.components)
        assert r.score > gate.threshold


def test_colour_and_shape_rules(fitted, data_dir):
    gate = fitted[2]
    for name in OOD_PHOTOS:
        assert colour_fraction(data_dir / "ood" / name) > 0.3
    assert colour_fraction(data_dir / "misc" / "h0001.png") == 0.0  # an RGB-stored chest film is gray
    assert colour_fraction(data_dir / "ood" / "mri_pydicom_MR2.png") is None  # gray file
    r = gate.assess(None, read_image(data_dir / "ood" / "photo_flower.jpg").pixels, colour=0.8)
    assert "colour" in r.rules and r.reasons[0].startswith("This is a colour picture")
    strip = read_image(data_dir / "misc" / "h0001.png").pixels[:100]  # 100 x 512: no chest film's shape
    assert "shape" in gate.assess(None, strip).rules


def test_predictor_with_gate_file_warns(fitted, data_dir):
    folder = fitted[0]
    predictor = Predictor.load(folder, device="cpu")
    assert isinstance(predictor.gate, Gate)
    photo = predictor.analyze(data_dir / "ood" / "photo_china.jpg")  # path: the colour rule can look at the file
    assert photo.warnings and not photo.gate.ok and {"colour", "appearance"} <= set(photo.gate.rules)
    scan = predictor.analyze(read_image(data_dir / "ood" / "ct_abdomen_kcr2019.png"))  # XrayImage, as the app does
    assert scan.warnings == [APPEARANCE_MSG]
    mr = predictor.analyze(read_image(data_dir / "dicom" / "pydicom_MR2_UNCR_mr.dcm"))
    assert any("MR image" in w for w in mr.warnings)
    film = predictor.analyze(data_dir / "dicom" / "pydicom_RG1_UNCR_chest_CR.dcm")
    assert film.warnings == [] and film.gate.ok and film.probs.shape == (15,)
    arr = read_image(data_dir / "dicom" / "pydicom_US1_UNCR_us.dcm")  # bare pixels + the file's metadata
    assert any("ultrasound" in w for w in predictor.analyze(arr.pixels, xray=arr).warnings)


def test_predictor_without_gate_still_applies_rules_and_refuses_foreign_gate(fitted, tmp_path, data_dir):
    other = make_checkpoint(tmp_path / "other", seed=4)
    predictor = Predictor.load(other, device="cpu")
    assert predictor.gate is None
    mr = predictor.analyze(data_dir / "dicom" / "pydicom_MR2_UNCR_mr.dcm")
    assert isinstance(mr.gate, GateResult) and "modality" in mr.gate.rules and mr.warnings
    assert predictor.analyze(data_dir / "ood" / "photo_flower.jpg").gate.rules == ["colour"]
    assert predictor.analyze(data_dir / "misc" / "h0001.png").warnings == []
    shutil.copy(fitted[0] / GATE_FILE, other / GATE_FILE)  # fitted for other weights: not used
    assert Predictor.load(other, device="cpu").gate is None


def test_cli_fit_small(fitted, tmp_path, data_dir, capsys):
    folder = fitted[0]
    out = tmp_path / "g.safetensors"
    torch_threads = torch.get_num_threads()
    try:
        assert main(["fit", "--model", str(folder), "--data-root", str(data_dir), "--out", str(out),
                     "--max-train-per-source", "8", "--max-eval-per-source", "3", "--threads", "1",
                     "--no-embedding"]) == 0
    finally:
        torch.set_num_threads(torch_threads)
    text = capsys.readouterr().out
    assert out.is_file() and "false alarm" in text and "catch" in text
    assert list(Gate.load(out).models) == ["thumb", "stats"]
    assert all(Path(f).name in text for f in NON_CHEST_FILES)


def test_heavy_tailed_component_does_not_raise_the_bar_for_the_others():
    """Each component is calibrated on its own: outliers of one (here the embedding, as with some
    real models on unseen films) must not hide a clear outlier of another."""
    from chestxray.gate import Features

    rng = np.random.default_rng(0)

    def feats(n, emb_scale=1.0):
        emb = rng.normal(size=(n, 16))
        emb[: n // 20] *= emb_scale  # 5% heavy tail
        return Features(rng.normal(size=(n, 1024)), rng.normal(size=(n, 14)), emb, list(range(n)),
                        np.zeros(n, bool))

    val = feats(300, emb_scale=8.0)
    gate, stats = fit_gate(None, [], [], train_features=feats(300), val_features=val)
    assert stats.components == ["thumb", "stats", "embedding"] and stats.val_false_alarm <= 0.02
    assert gate.offsets["embedding"] > gate.offsets["stats"] + 1.0
    odd = rng.normal(size=(1, 14)) * 3.0  # far outside in the gray statistics only
    z = gate.component_z(rng.normal(size=(1, 1024)), odd, rng.normal(size=(1, 16)))
    val_z = gate.component_z(val.thumbs, val.stats, val.embeddings)
    plain_max = np.quantile(np.max(np.stack(list(val_z.values())), axis=0), 0.99)  # one bar for all components
    assert z["stats"][0] < plain_max  # ... under which this image would pass
    assert gate.combine(z)[0] > gate.threshold
