"""Per-label temperature scaling: fitted on real films' logits, stored in config.json, applied by the
predictor with thresholds mapped so that the same films are flagged; evaluate's before/after and
localization; ``recard`` of a shipped-like folder leaves its weights byte-identical."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch

from chestxray.calibration import (apply_temperatures, fit_temperature, fit_temperatures, logit, map_threshold,
                                   nll, sigmoid)
from chestxray.ckpt_config import Calibration, CkptMeta
from chestxray.metrics import auroc
from tests.helpers import make_checkpoint

N_FILMS = 40


@pytest.fixture(scope="module")
def films(data_dir) -> pd.DataFrame:
    """A manifest of 40 real NIH films: NIH's label-balanced ones first (every finding has positives)."""
    from chestxray.data import read_manifest
    from chestxray.labels import get_label_set

    images = data_dir / "nih/images_384"
    labels = pd.read_csv(images / "labels.csv")
    picks = pd.concat([labels[labels["source"] == "reproduce_chexnet"].head(30),
                       labels[labels["source"] == "darkcovidnet"].head(N_FILMS - 30)])
    return read_manifest_from(picks, images, get_label_set("nih14"), read_manifest)


def read_manifest_from(rows: pd.DataFrame, images, labels, read_manifest) -> pd.DataFrame:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "labels.csv"
        rows.to_csv(csv, index=False)
        return read_manifest(csv, images, labels, source="nih384", missing="drop").reset_index(drop=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, films):
    """(folder, raw predictor, logits N x K, targets N x K) of a tiny seeded checkpoint on the real films."""
    from chestxray.evaluate import predict_paths
    from chestxray.predictor import Predictor

    folder = make_checkpoint(tmp_path_factory.mktemp("temp") / "tiny", arch="resnet10t", seed=3)
    predictor = Predictor.load(folder, device="cpu")
    logits, errors = predict_paths(predictor, list(films["path"]), progress=False, logits=True)
    assert not errors
    return folder, predictor, logits.astype(np.float64), films[predictor.labels].to_numpy(np.float64)


def test_fit_lowers_nll_on_its_data_and_keeps_auroc(tiny):
    _, predictor, Z, Y = tiny
    temps = fit_temperatures(Y, Z, predictor.labels)
    assert len(temps) >= 3, temps  # the balanced films give several labels 3+ positives and negatives
    for k, name in enumerate(predictor.labels):
        if name not in temps:
            continue
        t = temps[name]
        assert t != pytest.approx(1.0)
        assert nll(Y[:, k], Z[:, k], t) < nll(Y[:, k], Z[:, k])
        p_raw, p_cal = sigmoid(Z[:, k]), apply_temperatures(Z[:, [k]], [t])[:, 0]
        assert auroc(Y[:, k], p_cal) == pytest.approx(auroc(Y[:, k], p_raw), abs=1e-12)
    # Too few positives: no temperature rather than a made-up one.
    y = np.zeros(20)
    y[:2] = 1
    assert fit_temperature(y, np.linspace(-2, 2, 20)) is None


def test_mapped_thresholds_flag_the_same_films_by_hand():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, 5000)
    for t in (0.05, 0.2, 0.5, 0.9):
        for temp in (0.3, 1.0, 2.5, 7.0):
            flagged_raw = sigmoid(z) >= t
            flagged_cal = sigmoid(z / temp) >= map_threshold(t, temp)
            assert (flagged_raw == flagged_cal).all()
    assert map_threshold(0.3, 1.0) == 0.3 and map_threshold(0.0, 2.0) == 0.0
    assert logit(map_threshold(0.8, 2.0)) == pytest.approx(logit(0.8) / 2.0)


def _with_calibration(folder, temps: dict[str, float], thresholds: dict[str, float]):
    meta = CkptMeta.read(folder)
    meta.thresholds = thresholds
    meta.calibration = Calibration(temperatures=temps, fitted_on="validation split, test", n_films=10)
    meta.write(folder)


def test_predictor_applies_temperatures_from_config_and_flags_the_same_films(tiny, tmp_path, films):
    import shutil

    from chestxray.predictor import Predictor

    folder, raw, Z, _ = tiny
    cal_folder = tmp_path / "calibrated"
    shutil.copytree(folder, cal_folder)
    # Thresholds at each label's median raw probability: about half the films flagged per label.
    thresholds = {k: float(np.median(sigmoid(Z[:, i]))) for i, k in enumerate(raw.labels)}
    temps = {k: [0.25, 0.5, 2.0, 4.0][i % 4] for i, k in enumerate(raw.labels)}
    _with_calibration(cal_folder, temps, thresholds)
    shutil.copytree(folder, tmp_path / "raw_thr")
    meta = CkptMeta.read(tmp_path / "raw_thr")
    meta.thresholds = thresholds
    meta.write(tmp_path / "raw_thr")

    cal, base = Predictor.load(cal_folder, device="cpu"), Predictor.load(tmp_path / "raw_thr", device="cpu")
    assert cal.calibrated and not base.calibrated
    paths = list(films["path"][:16])
    p_cal, p_raw = cal.predict_batch(paths), base.predict_batch(paths)
    T = np.array([temps[k] for k in cal.labels])
    np.testing.assert_allclose(p_cal, sigmoid(logit(p_raw.astype(np.float64)) / T), atol=2e-5)
    for k in cal.labels:
        assert cal.thresholds[k] == pytest.approx(map_threshold(thresholds[k], temps[k]))
    n_flags = 0
    for path in paths:
        a_cal, a_raw = cal.analyze(path), base.analyze(path)
        np.testing.assert_allclose(a_cal.probs, cal.predict_batch([path])[0], atol=1e-5)
        assert a_cal.positives() and set(a_cal.positives()) == set(a_raw.positives())
        np.testing.assert_array_equal(a_cal.cams, a_raw.cams)  # the maps do not depend on T
        n_flags += len(a_raw.positives())
    assert 0 < n_flags < len(paths) * len(cal.labels)


def test_config_without_temperatures_behaves_as_before(tiny, films):
    from chestxray.checkpoint import load_folder
    from chestxray.predictor import Predictor, as_pixels

    folder, predictor, _, _ = tiny
    assert not predictor.calibrated and predictor.temperatures == {}
    ckpt = load_folder(folder)
    assert predictor.thresholds == {k: ckpt.thresholds.get(k, 0.5) for k in predictor.labels}
    paths = list(films["path"][:4])
    x = torch.cat([predictor.preprocess(as_pixels(p)) for p in paths])
    with torch.inference_mode():
        want = torch.sigmoid(Predictor(ckpt, device="cpu").model(x)).numpy()
    np.testing.assert_array_equal(predictor.predict_batch(paths), want)
    assert "calibration" not in json.loads((folder / "config.json").read_text())["chestxray"]


def test_calibration_block_round_trips_and_bad_ones_read_as_none():
    cal = Calibration(temperatures={"Effusion": 1.7}, fitted_on="validation split, reproduce_chexnet", n_films=98,
                      val_nll={"Effusion": [0.6, 0.5]})
    meta = CkptMeta(label_set="nih14", thresholds={"Effusion": 0.4}, calibration=cal)
    back = CkptMeta.from_dict(json.loads(json.dumps(meta.to_dict())))
    assert back.calibration == cal and back.temperatures == {"Effusion": 1.7}
    assert back.calibrated_thresholds()["Effusion"] == pytest.approx(map_threshold(0.4, 1.7))
    for bad in ({"temperatures": {"Effusion": -1}}, {"temperatures": "x"}, {"method": "isotonic"}, 3):
        assert CkptMeta.from_dict({"calibration": bad}).calibration is None


@pytest.fixture(scope="module")
def shipped_like(tmp_path_factory, data_dir, films):
    """A tiny checkpoint folder laid out as a shipped one: splits.csv (test/val films, the other boxed NIH films
    as train except 6), training sources, thresholds; no predictions or metrics yet."""
    from chestxray.localization import load_boxes

    folder = make_checkpoint(tmp_path_factory.mktemp("shipped") / "tiny_shipped", arch="resnet10t", seed=4,
                             training={"sources": ["nih384"], "val_sources": ["reproduce_chexnet"],
                                       "split": "patient", "seed": 0, "epoch": 1, "val_mean_auroc": 0.5,
                                       "threshold_rule": "spec90", "n_images": {"train": 0, "val": 20, "test": 20}})
    names = films["path"].map(lambda p: p.rsplit("/", 1)[-1])
    split = ["val" if i % 2 else "test" for i in range(len(names))]
    boxed = sorted(set(load_boxes(data_dir)["image"]) & set(pd.read_csv(data_dir / "nih/images_384/labels.csv")
                                                             ["Image Index"]) - set(names))
    rows = pd.DataFrame({"image": list(names) + boxed, "source": "nih384",
                         "split": split + ["test" if i < 6 else "train" for i in range(len(boxed))]})
    rows.to_csv(folder / "splits.csv", index=False)
    (folder / "gate.safetensors").write_bytes(b"not read by recard")  # must stay byte for byte
    return folder


def test_evaluate_reports_localization_and_calibration_before_after(shipped_like, tmp_path, data_dir):
    import shutil

    from chestxray.evaluate import evaluate

    folder = tmp_path / "m"
    shutil.copytree(shipped_like, folder)
    (folder / "gate.safetensors").unlink()
    _with_calibration(folder, {"Effusion": 2.0, "No Finding": 0.5}, CkptMeta.read(folder).thresholds)
    metrics = evaluate(str(folder), tmp_path / "eval", sources=["nih384"], data_root=str(data_dir), split="test",
                       n_boot=0, progress=False)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    loc = saved["localization"]
    assert loc["held_out"] is True and loc["n_pairs"] >= 6 and "pairs" not in loc
    assert set(loc["iou_hit_rate"]) == {"0.1", "0.25", "0.5"} and loc["n_gt_boxes"] >= loc["n_pairs"]
    assert set(loc["by_label"]) <= set(metrics["labels"])
    ts = saved["temperature_scaling"]
    assert ts["temperatures"] == {"Effusion": 2.0, "No Finding": 0.5}
    for side in ("before", "after"):
        assert 0 <= ts["all"][side]["pooled_ece"] <= 1 and 0 <= ts["all"][side]["mean_brier"] <= 1
    # Labels without a temperature are unchanged; the "after" side is what metrics.json reports.
    assert ts["all"]["before"]["ece"]["Mass"] == ts["all"]["after"]["ece"]["Mass"]
    assert ts["all"]["before"]["ece"]["Effusion"] != ts["all"]["after"]["ece"]["Effusion"]
    assert ts["all"]["after"]["mean_brier"] == pytest.approx(saved["mean_brier"])


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_recard_keeps_weights_byte_identical_and_reproduces_itself(shipped_like, data_dir):
    from chestxray.release import recard

    folder = shipped_like
    before = {f: _sha(folder / f) for f in ("model.safetensors", "gate.safetensors")}
    first = recard(folder, data_root=data_dir, n_boot=10, progress=False)
    assert {f: _sha(folder / f) for f in before} == before
    meta = CkptMeta.read(folder)
    assert meta.calibration is not None and meta.temperatures == first["temperatures"] != {}
    assert meta.calibration.fitted_on == "validation split, all sources (nih384)"
    assert meta.calibration.n_films == 20
    assert meta.metrics.localization["held_out"] is True and meta.metrics.localization["n_pairs"] >= 6
    metrics = json.loads((folder / "metrics.json").read_text())
    assert {"temperature_scaling", "localization"} <= set(metrics)
    card = (folder / "README.md").read_text()
    for text in ("## Calibration", "### Temperature scaling", "temperature-calibrated", "## Where the heatmap points",
                 "IoU >= 0.25"):
        assert text in card, text
    # A second run reads back what the first wrote (predictions.csv, config metrics) and matches it.
    second = recard(folder, data_root=data_dir, n_boot=10, progress=False)
    assert second["checks"]["predictions_max_abs_diff"] < 1e-4
    assert second["checks"]["mean_auroc_max_abs_diff"] == pytest.approx(0, abs=1e-9)
    assert second["temperatures"] == first["temperatures"]
    assert {f: _sha(folder / f) for f in before} == before
    # The card alone, again from the folder's own metrics.json and config.json: the same card.
    card = (folder / "README.md").read_text()
    recard(folder, data_root=data_dir, card_only=True)
    assert (folder / "README.md").read_text() == card


def test_app_and_report_say_when_probabilities_are_calibrated(tiny, tmp_path, films, monkeypatch):
    import shutil

    from chestxray.predictor import Predictor
    from chestxray.registry import ModelRegistry
    from chestxray.report import report_dict
    from chestxray.serve.sessions import pack, unpack
    from chestxray.serve.text import caption, card_markdown, label_table

    folder, raw, _, _ = tiny
    cal_folder = tmp_path / "weights" / "cal"
    shutil.copytree(folder, cal_folder)
    thresholds = {k: 0.4 for k in raw.labels}
    _with_calibration(cal_folder, {"Effusion": 2.0}, thresholds)
    a_cal = Predictor.load(cal_folder, device="cpu").analyze(films["path"][0])
    a_raw = raw.analyze(films["path"][0])
    assert a_cal.calibrated and not a_raw.calibrated
    assert unpack(pack(a_cal)).calibrated
    assert "temperature-calibrated on validation" in caption(a_cal, "Effusion", "gradcam")
    assert "temperature-calibrated" not in caption(a_raw, "Effusion", "gradcam")
    assert "temperature-calibrated" in label_table(a_cal)
    monkeypatch.setenv("CHESTXRAY_WEIGHTS", str(cal_folder.parent))
    (tmp_path / "m.yaml").write_text("default: cal\nmodels:\n  - {name: cal, local: cal}\n")
    card = ModelRegistry.from_yaml(tmp_path / "m.yaml").card("cal")
    assert card["thresholds"]["Effusion"] == pytest.approx(map_threshold(0.4, 2.0))
    assert card["thresholds"]["Mass"] == 0.4
    assert "temperature-calibrated on validation" in card_markdown(card)
    data = report_dict(a_cal, model=card, image={}, view={}, disclaimer="x")
    assert data["probability_scale"].startswith("temperature-calibrated")
    assert data["thresholds"]["Effusion"] == pytest.approx(map_threshold(0.4, 2.0), abs=1e-6)


def test_release_fits_temperatures_on_the_runs_validation_films(tmp_path, films, data_dir):
    from chestxray.release import release

    run = tmp_path / "run"
    make_checkpoint(run / "best", arch="resnet10t", seed=6,
                    training={"epoch": 1, "val_mean_auroc": 0.5, "sources": ["nih384"], "pretrained": False,
                              "val_sources": ["reproduce_chexnet"], "n_images": {"train": 0, "val": 20, "test": 20}})
    films.assign(split=["val" if i % 2 else "test" for i in range(len(films))]).to_csv(run / "manifest.csv",
                                                                                        index=False)
    (run / "train_config.json").write_text(json.dumps({"arch": "resnet10t", "img_size": 64, "epochs": 1,
                                                       "seed": 0, "data_root": str(data_dir)}))
    dest = release(run, "tiny", dest_root=tmp_path / "weights", n_boot=10, fit_gate=False, progress=False,
                   localize=False)
    meta = CkptMeta.read(dest)
    assert meta.calibration is not None and meta.calibration.n_films == 20 and meta.temperatures
    assert meta.metrics.extra["temperature_scaling"]["all"]["after"]["pooled_ece"] >= 0
    metrics = json.loads((dest / "metrics.json").read_text())
    assert metrics["temperature_scaling"]["temperatures"] == meta.temperatures
    # The float16 check compares raw probabilities on both sides (temperatures would move only one).
    assert meta.metrics.float16_check["max_abs_prob_diff"] < 0.05
    card = (dest / "README.md").read_text()
    assert "### Temperature scaling" in card and "chestxray recard weights/tiny" in card
    assert release(run, "tiny2", dest_root=tmp_path / "weights", n_boot=0, fit_gate=False, progress=False,
                   localize=False, calibrate=False) and CkptMeta.read(tmp_path / "weights/tiny2").calibration is None
