"""Metrics (AUROC, thresholds, bootstrap CIs, the JSON report) and the evaluation plots."""
from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from chestxray import metrics as M
from chestxray import plots

N, K = 300, 15
LABELS = [f"Finding{k}" for k in range(K - 1)] + ["No Finding"]


def _data(n: int = N, k: int = K, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random multi-label targets with varied prevalence and informative, tied probabilities."""
    rng = np.random.default_rng(seed)
    prev = np.linspace(0.03, 0.5, k)
    Y = (rng.random((n, k)) < prev).astype(np.float64)
    P = 1 / (1 + np.exp(-(1.5 * Y + rng.normal(0, 1, (n, k)) - 1)))
    return Y, np.round(P, 2)  # rounding makes ties


def _undefined(Y: np.ndarray) -> np.ndarray:
    """Marks label 3 as one-class (no positives) and label 5 as unknown except for negatives."""
    Y = Y.copy()
    Y[:, 3] = 0.0
    Y[: N // 2, 5] = np.nan
    Y[N // 2:, 5] = 0.0
    return Y


def test_auroc_matches_sklearn_with_ties() -> None:
    Y, P = _data()
    for k in range(K):
        assert M.auroc(Y[:, k], P[:, k]) == pytest.approx(roc_auc_score(Y[:, k], P[:, k]), abs=1e-12)
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 2, 50).astype(float), rng.integers(0, 4, 50) / 3  # heavy ties
    assert M.auroc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_roc_curve_matches_sklearn() -> None:
    from sklearn.metrics import roc_curve
    Y, P = _data()
    fpr, tpr, _ = M.roc_curve(Y[:, 14], P[:, 14])
    f2, t2, _ = roc_curve(Y[:, 14], P[:, 14], drop_intermediate=False)
    np.testing.assert_allclose(fpr, f2)
    np.testing.assert_allclose(tpr, t2)


def test_nan_targets_ignored() -> None:
    Y, P = _data()
    y, p = Y[:, 10].copy(), P[:, 10].copy()
    y[::3] = np.nan
    p[::3] = 1.0 - y[1::3].mean()  # garbage scores on unknown rows must not matter
    keep = ~np.isnan(y)
    assert M.auroc(y, p) == pytest.approx(roc_auc_score(y[keep], p[keep]))
    m = M.label_metrics(y, p, 0.5, n_boot=0)
    assert m["n"] == keep.sum() and m["support_pos"] == y[keep].sum()


def test_single_class_is_nan_not_error() -> None:
    p = np.linspace(0, 1, 20)
    assert math.isnan(M.auroc(np.zeros(20), p))
    assert math.isnan(M.auroc(np.ones(20), p))
    assert math.isnan(M.auroc(np.full(20, np.nan), p))
    assert math.isnan(M.auroc(np.array([]), np.array([])))
    assert all(math.isnan(v) for v in M.bootstrap_ci(np.zeros(20), p, n_boot=50))
    assert M.choose_threshold(np.zeros(20), p) == 0.5
    m = M.label_metrics(np.zeros(20), p, 0.5)
    assert m["auroc"] is None and m["auroc_ci"] == [None, None] and m["recall"] is None
    json.dumps(m, allow_nan=False)


@pytest.mark.parametrize("rule", ["youden", "f1"])
def test_threshold_splits_separable_toy(rule: str) -> None:
    rng = np.random.default_rng(2)
    y = np.r_[np.zeros(40), np.ones(20), np.full(5, np.nan)]
    p = np.r_[rng.uniform(0.0, 0.3, 40), rng.uniform(0.7, 1.0, 20), rng.random(5)]
    t = M.choose_threshold(y, p, rule)
    assert 0.3 < t < 0.7
    m = M.label_metrics(y, p, t, n_boot=0)
    assert m["accuracy"] == m["recall"] == m["specificity"] == m["f1"] == 1.0
    with pytest.raises(ValueError):
        M.choose_threshold(y, p, "bogus")


@pytest.mark.parametrize("rule", ["youden", "f1"])
def test_threshold_matches_brute_force(rule: str) -> None:
    Y, P = _data(seed=3)
    y, p = Y[:, 12], P[:, 12]
    t = M.choose_threshold(y, p, rule)
    assert p.min() <= t <= p.max()

    def score(c: float) -> float:
        tp, fp = np.sum(p[y == 1] >= c), np.sum(p[y == 0] >= c)
        return tp / (y == 1).sum() - fp / (y == 0).sum() if rule == "youden" else 2 * tp / (tp + fp + (y == 1).sum())
    assert score(t) == pytest.approx(max(score(c) for c in np.unique(p)))


@pytest.mark.parametrize("spec", [0.9, 0.95])
def test_specificity_rule_is_the_most_sensitive_threshold_within_the_bound(spec: float) -> None:
    Y, P = _data(seed=4)
    y, p = Y[:, 3], P[:, 3]
    t = M.choose_threshold(y, p, f"spec{int(spec * 100)}")
    neg, pos = p[y == 0], p[y == 1]
    assert (neg < t).mean() >= spec
    ok = [c for c in np.unique(p) if (neg < c).mean() >= spec]  # every threshold within the bound
    assert (pos >= t).sum() == max((pos >= c).sum() for c in ok)


def test_flags_on_normal_films() -> None:
    labels = ["A", "B", "No Finding"]
    Y = np.array([[0, 0, 1], [0, 0, 1], [1, 0, 0]], dtype=float)
    P = np.array([[0.9, 0.9, 0.1], [0.2, 0.9, 0.9], [0.9, 0.9, 0.0]])
    assert M.flags_on_normal_films(Y, P, labels, {"A": 0.5, "B": 0.95}) == pytest.approx(0.5)
    assert M.flags_on_normal_films(Y[2:], P[2:], labels, {}) is None  # no normal film
    assert M.flags_on_normal_films(Y[:, :2], P[:, :2], labels[:2], {}) is None  # no No Finding label


def test_bootstrap_ci_contains_estimate_and_narrows() -> None:
    widths = []
    for n in (150, 1500):
        Y, P = _data(n=n, seed=4)
        y, p = Y[:, -1], P[:, -1]  # prevalence 0.5
        lo, hi = M.bootstrap_ci(y, p, n_boot=500, seed=0)
        assert lo < M.auroc(y, p) < hi
        assert M.bootstrap_ci(y, p, n_boot=500, seed=0) == (lo, hi)  # seeded
        widths.append(hi - lo)
    assert widths[1] < 0.6 * widths[0]


def test_bootstrap_generic_metric_and_mean_auroc() -> None:
    Y, P = _data()
    acc = lambda y, p: float(np.mean((p >= 0.5) == (y == 1)))  # noqa: E731
    lo, hi = M.bootstrap_ci(Y[:, 14], P[:, 14], metric=acc, n_boot=100)
    assert lo <= acc(Y[:, 14], P[:, 14]) <= hi
    Yu = _undefined(Y)
    mean = np.nanmean([M.auroc(Yu[:, k], P[:, k]) for k in range(K)])
    lo, hi = M.bootstrap_mean_auroc_ci(Yu, P, n_boot=300)
    assert lo < mean < hi and hi - lo < 0.2


def test_bootstrap_is_fast() -> None:
    Y, P = _data(n=500)
    t0 = time.perf_counter()
    for k in range(K):
        M.bootstrap_ci(Y[:, k], P[:, k], n_boot=1000)
    M.bootstrap_mean_auroc_ci(Y, P, n_boot=1000)
    assert time.perf_counter() - t0 < 3.0  # ~0.2 s here; loose for a shared CPU


def test_evaluate_predictions_report(tmp_path) -> None:
    Y, P = _data()
    Y = _undefined(Y)
    groups = np.array(["nih"] * 200 + ["peds"] * 100)
    Y[200:, :] = np.nan  # the paediatric source only annotates one label
    Y[200:, 6] = (np.arange(100) % 4 == 0).astype(float)
    thresholds = {name: 0.4 for name in LABELS[:10]}
    rep = M.evaluate_predictions(Y, P, LABELS, thresholds=thresholds, groups=groups, n_boot=200)
    text = json.dumps(rep, allow_nan=False)
    assert json.loads(text) == rep
    assert rep["n_images"] == N
    assert rep["undefined_labels"] == [LABELS[3], LABELS[5]]
    defined = [v["auroc"] for v in rep["labels"].values() if v["auroc"] is not None]
    assert len(defined) == K - 2 and rep["mean_auroc"] == pytest.approx(np.mean(defined))
    lo, hi = rep["mean_auroc_ci"]
    assert lo < rep["mean_auroc"] < hi
    first, last = rep["labels"][LABELS[0]], rep["labels"][LABELS[-1]]
    assert first["threshold"] == 0.4 and first["threshold_source"] == "config"
    assert last["threshold"] == 0.5 and last["threshold_source"] == "default-0.5"
    assert set(first) >= {"auroc", "auroc_ci", "accuracy", "precision", "recall", "specificity",
                          "f1", "threshold", "support_pos", "support_neg", "n"}
    # By group: the same structure, computed on that group's rows only.
    assert set(rep["by_group"]) == {"nih", "peds"}
    peds = rep["by_group"]["peds"]
    assert "by_group" not in peds and peds["n_images"] == 100
    assert peds["undefined_labels"] == [n for n in LABELS if n != LABELS[6]]
    assert peds["labels"][LABELS[6]]["support_pos"] == 25
    assert peds["labels"][LABELS[6]]["auroc"] == pytest.approx(M.auroc(Y[200:, 6], P[200:, 6]))
    nih = rep["by_group"]["nih"]["labels"][LABELS[14]]
    assert nih["auroc"] == pytest.approx(roc_auc_score(Y[:200, 14], P[:200, 14]))
    out = M.to_json(rep, tmp_path / "sub" / "metrics.json")
    assert json.loads(out.read_text()) == rep


def test_to_json_converts_numpy(tmp_path) -> None:
    obj = {"a": np.float32(0.5), "b": np.int64(3), "c": np.array([1.0, np.nan]), "d": (np.bool_(True),),
           "e": float("inf")}
    data = json.loads(M.to_json(obj, tmp_path / "x.json").read_text())
    assert data == {"a": 0.5, "b": 3, "c": [1.0, None], "d": [True], "e": None}


def _check_png(path, min_w: int = 300, min_h: int = 200) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= min_w and im.size[1] >= min_h


def test_plots_write_pngs(tmp_path) -> None:
    Y, P = _data()
    Y = _undefined(Y)
    thresholds = {n: 0.3 for n in LABELS[:5]}
    _check_png(plots.plot_roc_curves(Y, P, LABELS, tmp_path / "roc.png", title="test set"))
    _check_png(plots.plot_confusion_matrices(Y, P, LABELS, thresholds, tmp_path / "cm.png"), 800, 500)
    rows = [{"epoch": 1, "train_loss": 0.5, "val_loss": 0.45, "val_mean_auroc": 0.7},
            {"epoch": 2, "train_loss": 0.4, "val_loss": None},
            {"epoch": 3, "train_loss": 0.35, "val_loss": 0.41, "val_mean_auroc": 0.76}]
    _check_png(plots.plot_training_curves(rows, tmp_path / "curves.png"))
    _check_png(plots.plot_training_curves([], tmp_path / "empty.png"))


# -- calibration and precision-recall (chestxray.calibration) -------------------------------------
def test_average_precision_matches_sklearn_with_ties_and_nan() -> None:
    from sklearn.metrics import average_precision_score

    from chestxray.calibration import average_precision
    Y, P = _data()
    for k in range(K):
        assert average_precision(Y[:, k], P[:, k]) == pytest.approx(average_precision_score(Y[:, k], P[:, k]),
                                                                    abs=1e-12)
    # by hand: scores .9 (pos), .8 (neg), .7 (pos), .7 (neg): steps R .5 P 1, then R 1 P 2/4
    y, p = np.array([1, 0, 1, 0, np.nan]), np.array([0.9, 0.8, 0.7, 0.7, 0.1])
    assert average_precision(y, p) == pytest.approx(0.5 * 1 + 0.5 * 0.5)
    assert math.isnan(average_precision(np.zeros(5), np.linspace(0, 1, 5)))
    assert math.isnan(average_precision(np.ones(5), np.linspace(0, 1, 5)))


def test_brier_matches_sklearn() -> None:
    from sklearn.metrics import brier_score_loss

    from chestxray.calibration import brier_score
    Y, P = _data()
    for k in (0, 7, 14):
        assert brier_score(Y[:, k], P[:, k]) == pytest.approx(brier_score_loss(Y[:, k], P[:, k]), abs=1e-12)
    assert brier_score(np.array([1.0, 0.0, np.nan]), np.array([0.8, 0.4, 0.9])) == pytest.approx((0.04 + 0.16) / 2)
    assert math.isnan(brier_score(np.full(3, np.nan), np.ones(3)))


def test_ece_by_hand_calibrated_and_overconfident() -> None:
    from chestxray.calibration import expected_calibration_error as ece
    from chestxray.calibration import reliability_bins
    # by hand, 15 bins: p=0.1 (bin 1) x4 with 1 positive, p=0.9 (bin 13) x2 with 2 positives, p=1 -> last bin
    y = np.array([1, 0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.1, 0.1, 0.1, 0.9, 0.9, 1.0])
    expected = (4 * abs(0.25 - 0.1) + 2 * abs(1.0 - 0.9) + 1 * 0.0) / 7
    assert ece(y, p) == pytest.approx(expected)
    count, mean_p, frac = reliability_bins(y, p)
    assert count.tolist() == [0, 4] + [0] * 11 + [2, 1] and frac[1] == 0.25 and mean_p[14] == 1.0
    rng = np.random.default_rng(0)
    p = rng.random(200_000)
    calibrated = (rng.random(p.size) < p).astype(float)  # y ~ Bernoulli(p)
    assert ece(calibrated, p) < 0.01
    overconfident = np.where(p > 0.5, 0.99, 0.01)  # the same outcomes, said with near certainty
    assert ece(calibrated, overconfident) > 0.2
    assert math.isnan(ece(np.full(3, np.nan), np.ones(3)))


def test_report_has_calibration_per_label_and_mean() -> None:
    from sklearn.metrics import average_precision_score, brier_score_loss
    Y, P = _data()
    Y = _undefined(Y)
    rep = M.evaluate_predictions(Y, P, LABELS, n_boot=0)
    json.dumps(rep, allow_nan=False)
    m = rep["labels"][LABELS[14]]
    assert m["auprc"] == pytest.approx(average_precision_score(Y[:, 14], P[:, 14]))
    assert m["brier"] == pytest.approx(brier_score_loss(Y[:, 14], P[:, 14]))
    assert m["prevalence"] == pytest.approx(Y[:, 14].mean()) and 0 <= m["ece"] <= 1
    assert rep["labels"][LABELS[3]]["auprc"] is None  # one class: undefined, as AUROC
    assert rep["labels"][LABELS[3]]["brier"] is not None  # but its probabilities can still be scored
    auprcs = [v["auprc"] for v in rep["labels"].values() if v["auprc"] is not None]
    assert len(auprcs) == K - 2 and rep["mean_auprc"] == pytest.approx(np.mean(auprcs))
    assert rep["mean_ece"] == pytest.approx(np.mean([v["ece"] for v in rep["labels"].values()]))
    assert rep["mean_brier"] is not None and rep["pooled_ece"] is not None
    assert rep["calibration"]["n_bins"] == 15


def test_reliability_png(tmp_path) -> None:
    Y, P = _data()
    _check_png(plots.plot_reliability(_undefined(Y), P, LABELS, tmp_path / "reliability.png"), 800, 600)
    _check_png(plots.plot_reliability(Y[:, :1], P[:, :1], LABELS[:1], tmp_path / "one.png"))
