"""Probabilities on adult NIH's scale: reference prevalences from the real label file, reweighting, the
prior shift, and a predictor that applies it without changing a ranking or a flag."""
from __future__ import annotations

import html
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from chestxray.calibration import logit, map_threshold, sigmoid
from chestxray.ckpt_config import Calibration, CkptMeta
from chestxray.labels import get_label_set
from chestxray.metrics import auroc
from chestxray.prevalence import (NIH_ADULTS, fit_shift, fit_shifts, nih_prevalence, reference_report,
                                  reference_weights, weighted_mean)
from tests.helpers import make_checkpoint
from tests.test_temperature import films  # noqa: F401 (fixture: 40 real NIH films)


def test_nih_adult_prevalence_from_the_full_label_file(data_dir):
    labels = get_label_set("nih14") + ["Lung Opacity", "Lung Cancer (proxy: Mass/Nodule)", "Tuberculosis"]
    prev = nih_prevalence(data_root=data_dir, labels=labels)
    raw = pd.read_csv(data_dir / "nih/Data_Entry_2017_v2020.csv.gz", usecols=["Finding Labels", "Patient Age"])
    adult = raw[raw["Patient Age"] >= 18]["Finding Labels"]
    assert prev["Pneumonia"] == pytest.approx(adult.str.contains("Pneumonia").mean(), abs=1e-6)
    assert 0.01 < prev["Pneumonia"] < 0.015 and 0.5 < prev["No Finding"] < 0.56  # 1.2% and 54% of 106,718 films
    assert prev["Lung Cancer (proxy: Mass/Nodule)"] == pytest.approx(
        adult.str.contains("Mass|Nodule").mean(), abs=1e-6)
    assert 0.1 < prev["Lung Opacity"] < 0.4  # RSNA's readings of NIH films
    assert "Tuberculosis" not in prev  # NIH has no such label: no reference, never a made-up one


def test_reweighted_films_have_the_reference_prevalence_and_normal_share():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0, np.nan], dtype=np.float64)  # a label-enriched sample
    nf = np.array([0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0], dtype=np.float64)
    w = reference_weights(y, nf, prevalence=0.02, no_finding_prevalence=0.55)
    assert w[-1] == 0 and w.sum() == pytest.approx(10)
    assert weighted_mean(y[:-1], w[:-1]) == pytest.approx(0.02)
    assert weighted_mean(nf[:-1], w[:-1]) == pytest.approx(0.55)


def test_fitted_shift_makes_the_weighted_mean_the_prevalence_and_keeps_the_order():
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.3).astype(np.float64)
    z = rng.normal(0, 1, 400) + 1.5 * y + 1.0  # a model that overstates the label
    w = reference_weights(y, None, prevalence=0.05)
    b = fit_shift(y, z, w)
    assert b < 0
    assert weighted_mean(sigmoid(z + b), w) == pytest.approx(0.05, abs=1e-6)
    assert auroc(y, sigmoid(z + b)) == pytest.approx(auroc(y, sigmoid(z)), abs=1e-12)
    assert fit_shift(np.zeros(50), z[:50], np.ones(50)) is None  # no positive: nothing to fit, nothing made up


def test_mapped_thresholds_with_a_shift_flag_the_same_films():
    z = np.random.default_rng(1).normal(0, 3, 5000)
    for t in (0.05, 0.3, 0.7):
        for temp, b in ((1.0, -4.1), (0.5, 1.2), (2.4, -1.5)):
            assert ((sigmoid(z) >= t) == (sigmoid(z / temp + b) >= map_threshold(t, temp, b))).all()
    assert logit(map_threshold(0.8, 2.0, -1.0)) == pytest.approx(logit(0.8) / 2.0 - 1.0)


def test_calibration_with_shifts_round_trips():
    cal = Calibration(method="temperature+prior_shift", temperatures={"Pneumonia": 1.1}, shifts={"Pneumonia": -4.0},
                      reference=NIH_ADULTS, prevalence={"Pneumonia": 0.0124}, shift_fitted_on="300 NIH films")
    meta = CkptMeta(label_set="nih14", thresholds={"Pneumonia": 0.4}, calibration=cal)
    back = CkptMeta.from_dict(json.loads(json.dumps(meta.to_dict())))
    assert back.calibration == cal and back.shifts == {"Pneumonia": -4.0} and back.reference == NIH_ADULTS
    assert back.calibrated_thresholds()["Pneumonia"] == pytest.approx(map_threshold(0.4, 1.1, -4.0))
    # A shift alone (no temperature) is a calibration too; an older block without shifts reads as before.
    assert CkptMeta.from_dict({"calibration": {"shifts": {"Pneumonia": -1}}}).shifts == {"Pneumonia": -1.0}
    assert CkptMeta.from_dict({"calibration": {"temperatures": {"Edema": 2.0}}}).reference is None


def test_predictor_reports_the_shifted_scale_with_the_same_flags_and_maps(films, tmp_path, data_dir):  # noqa: F811
    from chestxray.evaluate import evaluate_manifest, predict_paths
    from chestxray.predictor import Predictor

    folder = make_checkpoint(tmp_path / "raw", arch="resnet10t", seed=3)
    raw = Predictor.load(folder, device="cpu")
    paths = list(films["path"])
    Z = predict_paths(raw, paths, progress=False, logits=True)[0].astype(np.float64)
    Y = films[raw.labels].to_numpy(np.float64)
    prevalence = nih_prevalence(data_dir, raw.labels)
    shifts = fit_shifts(Y, Z, raw.labels, prevalence)
    assert set(shifts) == {k for k in raw.labels if (Y[:, raw.labels.index(k)] == 1).any()}
    thresholds = {k: float(np.median(sigmoid(Z[:, i]))) for i, k in enumerate(raw.labels)}
    for name, cal in (("base", None), ("shifted", Calibration(method="temperature+prior_shift", shifts=shifts,
                                                                  reference=NIH_ADULTS, prevalence=prevalence))):
        shutil.copytree(folder, tmp_path / name)
        meta = CkptMeta.read(tmp_path / name)
        meta.thresholds, meta.calibration = thresholds, cal
        meta.write(tmp_path / name)
    base, shifted = (Predictor.load(tmp_path / n, device="cpu") for n in ("base", "shifted"))
    assert shifted.reference == NIH_ADULTS and base.reference is None
    b = np.array([shifts.get(k, 0.0) for k in raw.labels])
    np.testing.assert_allclose(shifted.predict_batch(paths[:8]), sigmoid(Z[:8] + b), atol=2e-5)
    for path in paths[:8]:
        a, a0 = shifted.analyze(path), base.analyze(path)
        assert set(a.positives()) == set(a0.positives()) and a.reference == NIH_ADULTS
        np.testing.assert_array_equal(a.cams, a0.cams)
    # The page's caption, the report and the HTTP API say which population the numbers refer to, also
    # after the analysis went through the session store.
    from chestxray.report import probability_scale
    from chestxray.serve.sessions import pack, unpack
    from chestxray.serve.text import caption

    kept = unpack(pack(a))
    assert NIH_ADULTS in caption(kept, "Pneumonia", "gradcam") and "child" in caption(kept, "Pneumonia", "gradcam")
    assert NIH_ADULTS in probability_scale(kept) and NIH_ADULTS not in probability_scale(a0)
    from chestxray.registry import ModelRegistry
    from chestxray.serve.text import card_markdown, label_table

    # the panel is HTML: its text (">=" escaped as "&gt;=") reads the population as written
    assert NIH_ADULTS in html.unescape(label_table(kept)) and NIH_ADULTS not in html.unescape(label_table(a0))
    (tmp_path / "m.yaml").write_text("default: shifted\nmodels:\n  - {name: shifted, local: shifted}\n"
                                     "  - {name: base, local: base}\n")
    with pytest.MonkeyPatch.context() as mp:  # the app's card panel says the same as the config
        mp.setenv("CHESTXRAY_WEIGHTS", str(tmp_path))
        registry = ModelRegistry.from_yaml(tmp_path / "m.yaml")
        assert NIH_ADULTS in card_markdown(registry.card("shifted"))
        assert NIH_ADULTS not in card_markdown(registry.card("base"))
    # evaluate: AUROC unchanged, and the report says how the numbers read against NIH's prevalence.
    m = evaluate_manifest(shifted, films, tmp_path / "eval", n_boot=0, progress=False, logits=Z)
    m0 = evaluate_manifest(base, films, tmp_path / "eval0", n_boot=0, progress=False, logits=Z)
    assert m["mean_auroc"] == pytest.approx(m0["mean_auroc"], abs=1e-12)
    rep = m["reference_scale"]["labels"]
    for k in shifts:
        assert rep[k]["after"]["reweighted_mean_prob"] == pytest.approx(prevalence[k], abs=1e-4)
    assert rep == reference_report(Y, Z, raw.labels, prevalence, {}, shifts)["labels"]
