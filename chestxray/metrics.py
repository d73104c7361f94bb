"""Multi-label evaluation: AUROC, operating thresholds, bootstrap CIs and a JSON report.

Conventions: targets are float arrays with 1 (positive), 0 (negative) or NaN (label unknown for
that image); rows with a NaN target are ignored label by label and targets >= 0.5 count as
positive. Probabilities must be finite (NaN/inf on a known target raises ValueError).
Undefined quantities (AUROC with one class, precision with no predicted positives, ...) are
``float('nan')`` from the scalar functions and ``None`` in the dicts, so reports stay strict JSON.
A prediction is positive when ``p >= threshold``.
Calibration and precision-recall (AUPRC, Brier score, ECE) are defined in :mod:`chestxray.calibration`.
"""
from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from chestxray.calibration import N_BINS, average_precision, brier_score, clean_targets, expected_calibration_error

#: Bootstrap replicates are processed in chunks of about this many (replicate x image) cells.
_CHUNK_CELLS = 2_000_000


_clean = clean_targets  # (pos mask, scores, keep mask) for one label, NaN targets dropped


def _rank_setup(pos: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, ...]:
    """(positive indices, negative indices in score order, lo, hi) for :func:`_auroc_rows`:
    for positive i, ``lo[i]``/``hi[i]`` count the negatives scoring below / not above it."""
    pos_idx, neg_idx = np.flatnonzero(pos), np.flatnonzero(~pos)
    neg_idx = neg_idx[np.argsort(p[neg_idx], kind="stable")]
    ns, ps = p[neg_idx], p[pos_idx]
    return pos_idx, neg_idx, np.searchsorted(ns, ps, "left"), np.searchsorted(ns, ps, "right")


def _auroc_rows(wpos: np.ndarray, wneg: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC (ties count 1/2) for each row of weights B x n_pos and B x n_neg
    (negatives in score order). With bootstrap multiplicities as weights this gives B resampled
    AUROCs from one sort. Rows without positive or negative weight give NaN."""
    cum = np.zeros((wneg.shape[0], wneg.shape[1] + 1))
    np.cumsum(wneg, axis=1, out=cum[:, 1:])  # cum[:, j]: weight of the j lowest negatives
    num = 0.5 * np.einsum("bi,bi->b", wpos, cum[:, lo] + cum[:, hi])
    den = wpos.sum(axis=1) * cum[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve for one label, ignoring NaN targets.

    Args:
        y: targets (1/0/NaN), shape (N,).
        p: probabilities, shape (N,).

    Returns:
        AUROC (ties count one half, as in sklearn), or NaN without at least one positive and
        one negative. Never raises for degenerate labels.
    """
    pos, ps, _ = _clean(y, p)
    pos_idx, neg_idx, lo, hi = _rank_setup(pos, ps)
    return float(_auroc_rows(np.ones((1, pos_idx.size)), np.ones((1, neg_idx.size)), lo, hi)[0])


def mean_auroc(Y: np.ndarray, P: np.ndarray) -> float:
    """Macro mean AUROC over the labels (columns) with both classes known; NaN if there are none."""
    aucs = [auroc(Y[:, k], P[:, k]) for k in range(Y.shape[1])]
    aucs = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def roc_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points for one label (NaN targets ignored).

    Returns:
        (fpr, tpr, thresholds): thresholds are the distinct scores in decreasing order, preceded
        by ``inf`` (nothing positive); point i is the rule ``p >= thresholds[i]``. Empty arrays
        when the label lacks positives or negatives.
    """
    pos, ps, _ = _clean(y, p)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return np.empty(0), np.empty(0), np.empty(0)
    order = np.argsort(-ps, kind="mergesort")
    ps, pos = ps[order], pos[order]
    last = np.r_[np.flatnonzero(np.diff(ps) != 0), ps.size - 1]  # last index of each tie group
    tp, fp = np.cumsum(pos)[last], np.cumsum(~pos)[last]
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos], np.r_[np.inf, ps[last]]


def choose_threshold(y: np.ndarray, p: np.ndarray, rule: str = "youden") -> float:
    """Chooses one label's operating threshold on validation data.

    Rules: ``"youden"`` maximises Youden's J = TPR - FPR = sensitivity + specificity - 1 over the
    ROC curve; ``"f1"`` maximises F1 = 2TP / (2TP + FP + FN); ``"spec90"`` (any ``"specNN"``) is
    the most sensitive threshold that keeps specificity >= 0.90 (bounds false alarms: Youden's
    rule flags about half of a normal film's 14 findings). Ties go to the highest threshold
    (fewest positive calls). The returned value is the midpoint between the optimal cut score
    and the next lower distinct score, so it reproduces the optimal validation split while
    sitting in the gap rather than on a validation sample.

    Returns:
        Threshold for ``p >= t``; 0.5 when the label lacks positives or negatives.

    Raises:
        ValueError: unknown rule.
    """
    min_spec = None
    if rule.startswith("spec") and rule[4:].isdigit() and 0 < int(rule[4:]) < 100:
        min_spec = int(rule[4:]) / 100
    elif rule not in ("youden", "f1"):
        raise ValueError(f"unknown threshold rule {rule!r}; use 'youden', 'f1' or 'spec90' (specNN)")
    fpr, tpr, thr = roc_curve(y, p)
    if thr.size < 2:
        return 0.5
    pos, _, _ = _clean(y, p)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    tp, fp = np.rint(tpr[1:] * n_pos), np.rint(fpr[1:] * n_neg)  # exact counts: clean ties
    thr = thr[1:]  # drop the 'nothing positive' point
    if min_spec is not None:  # most positive calls among points with FP <= (1 - spec) * negatives
        allowed = fp <= (1.0 - min_spec) * n_neg + 1e-9
        score = np.where(allowed, tp, -1.0) if allowed.any() else -fp
    elif rule == "youden":
        score = tp * n_neg - fp * n_pos  # J * n_pos * n_neg
    else:
        score = 2 * tp / (tp + fp + n_pos)  # 2TP / (2TP + FP + FN)
    i = int(np.argmax(score))
    return float(thr[i] if i == thr.size - 1 else (thr[i] + thr[i + 1]) / 2)


def _counts(rng: np.random.Generator, b: int, m: int) -> np.ndarray:
    """B x m bootstrap multiplicities: m draws with replacement from m items, per row."""
    if m == 0:
        return np.zeros((b, 0))
    draws = rng.integers(0, m, size=(b, m)) + m * np.arange(b)[:, None]
    return np.bincount(draws.ravel(), minlength=b * m).reshape(b, m).astype(np.float64)


def _percentile_ci(values: np.ndarray, alpha: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap_ci(y: np.ndarray, p: np.ndarray, metric: Callable[[np.ndarray, np.ndarray], float] = auroc,
                 n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap CI of a one-label metric, resampling images stratified by class.

    Positives and negatives (NaN targets dropped) are resampled separately to their own counts,
    so every replicate has both classes. ``metric=auroc`` uses a vectorised rank path (one sort
    for all replicates); any other ``metric(y, p) -> float`` is called once per replicate.

    Returns:
        (lo, hi) at level 1 - alpha; (nan, nan) when no replicate gives a finite value or
        ``n_boot <= 0``.
    """
    pos, ps, _ = _clean(y, p)
    strata = [np.flatnonzero(pos), np.flatnonzero(~pos)]
    rng = np.random.default_rng(seed)
    if n_boot <= 0:
        return math.nan, math.nan
    if metric is auroc:
        if strata[0].size == 0 or strata[1].size == 0:
            return math.nan, math.nan
        # Class-wise multiplicities are exchangeable, so they are drawn straight in rank order.
        pos_idx, neg_idx, lo, hi = _rank_setup(pos, ps)
        chunk = max(1, _CHUNK_CELLS // ps.size)
        vals = [_auroc_rows(_counts(rng, b, pos_idx.size), _counts(rng, b, neg_idx.size), lo, hi)
                for b in np.diff(np.r_[0:n_boot:chunk, n_boot])]
        return _percentile_ci(np.concatenate(vals), alpha)
    yt = pos.astype(np.float64)
    vals = np.empty(n_boot)
    for b in range(n_boot):
        idx = np.concatenate([s[rng.integers(0, s.size, s.size)] for s in strata if s.size])
        vals[b] = metric(yt[idx], ps[idx])
    return _percentile_ci(vals, alpha)


def bootstrap_mean_auroc_ci(Y: np.ndarray, P: np.ndarray, n_boot: int = 1000, seed: int = 0,
                            alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap CI of the macro mean AUROC, resampling images (rows) jointly.

    The mean covers the labels with a defined AUROC on the full data; a replicate in which a rare
    label loses all its positives averages over its remaining labels.

    Returns:
        (lo, hi), or (nan, nan) when no label has a defined AUROC.
    """
    Y, P = np.asarray(Y, dtype=np.float64), np.asarray(P, dtype=np.float64)
    if Y.shape != P.shape or Y.ndim != 2:
        raise ValueError(f"Y {Y.shape} and P {P.shape} must be equal N x K arrays")
    setups = []
    for k in range(Y.shape[1]):
        pos, ps, keep = _clean(Y[:, k], P[:, k])
        if pos.any() and not pos.all():  # defined AUROC
            pos_idx, neg_idx, lo, hi = _rank_setup(pos, ps)
            rows = np.flatnonzero(keep)
            setups.append((rows[pos_idx], rows[neg_idx], lo, hi))
    if not setups or n_boot <= 0:
        return math.nan, math.nan
    n = Y.shape[0]
    rng = np.random.default_rng(seed)
    means = []
    for b in np.diff(np.r_[0:n_boot:max(1, _CHUNK_CELLS // n), n_boot]):
        w = _counts(rng, b, n)
        per = np.stack([_auroc_rows(w[:, pi], w[:, ni], lo, hi) for pi, ni, lo, hi in setups], 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # replicate with no defined label
            means.append(np.nanmean(per, axis=1))
    return _percentile_ci(np.concatenate(means), alpha)


def _num(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _ratio(a: float, b: float) -> float | None:
    return float(a / b) if b > 0 else None


def label_metrics(y: np.ndarray, p: np.ndarray, threshold: float, n_boot: int = 1000,
                  seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """Threshold and ranking metrics for one label (NaN targets ignored).

    Returns:
        dict with auroc, auroc_ci ([lo, hi]), auprc (average precision), prevalence (its chance
        level), brier, ece (15 equal-width bins), accuracy, precision, recall (sensitivity),
        specificity, f1, threshold, support_pos, support_neg, n (known targets) and the counts
        tp, fp, tn, fn. A ratio with a zero denominator (e.g. precision with no positive calls)
        and an AUROC without both classes are ``None``, never 0 or NaN.
    """
    pos, ps, _ = _clean(y, p)
    pred = ps >= threshold
    tp, fp = int(np.sum(pred & pos)), int(np.sum(pred & ~pos))
    fn, tn = int(np.sum(~pred & pos)), int(np.sum(~pred & ~pos))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    lo, hi = bootstrap_ci(y, p, auroc, n_boot=n_boot, seed=seed, alpha=alpha)
    return {
        "auroc": _num(auroc(y, p)), "auroc_ci": [_num(lo), _num(hi)],
        "auprc": _num(average_precision(y, p)), "prevalence": _ratio(tp + fn, ps.size),
        "brier": _num(brier_score(y, p)), "ece": _num(expected_calibration_error(y, p)),
        "accuracy": _ratio(tp + tn, ps.size), "precision": precision, "recall": recall,
        "specificity": _ratio(tn, tn + fp), "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "threshold": float(threshold), "support_pos": tp + fn, "support_neg": tn + fp,
        "n": int(ps.size), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }


def evaluate_predictions(Y: np.ndarray, P: np.ndarray, labels: list[str],
                         thresholds: Mapping[str, float] | None = None,
                         groups: np.ndarray | None = None, n_boot: int = 1000,
                         seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """Evaluates N x K predictions; the result is strict-JSON-serialisable (no NaN, no numpy).

    Args:
        Y: targets N x K (1/0/NaN). P: probabilities N x K. labels: the K names.
        thresholds: per-label operating thresholds; a missing (or None) one is 0.5 and the
            label's ``threshold_source`` says ``"default-0.5"`` instead of ``"config"``.
        groups: optional length-N group per image (e.g. data source); adds ``by_group``.
        n_boot: bootstrap replicates for the CIs (0 skips them: CIs are [None, None]).

    Returns:
        {"labels": {name: label_metrics + threshold_source}, "mean_auroc", "mean_auroc_ci",
        "n_images", "undefined_labels", "bootstrap": {n_boot, seed, alpha}, "mean_auprc",
        "mean_brier", "mean_ece", "pooled_ece", "calibration": {n_bins}[, "by_group"]}.
        mean_auroc is the macro mean over labels with a defined AUROC (None if there are none);
        the other means are macro means over the labels where each is defined; pooled_ece is the
        ECE of all known (image, label) pairs together.
    """
    Y, P = np.asarray(Y, dtype=np.float64), np.asarray(P, dtype=np.float64)
    if Y.ndim != 2 or Y.shape != P.shape or Y.shape[1] != len(labels):
        raise ValueError(f"Y {Y.shape} and P {P.shape} must both be N x {len(labels)}")
    thresholds = thresholds or {}
    out: dict[str, Any] = {"labels": {}, "undefined_labels": []}
    aucs = []
    for k, name in enumerate(labels):
        t = thresholds.get(name)
        src = "config" if t is not None and math.isfinite(float(t)) else "default-0.5"
        m = label_metrics(Y[:, k], P[:, k], float(t) if src == "config" else 0.5,
                          n_boot=n_boot, seed=seed, alpha=alpha)
        m["threshold_source"] = src
        out["labels"][name] = m
        if m["auroc"] is None:
            out["undefined_labels"].append(name)
        else:
            aucs.append(m["auroc"])
    lo, hi = bootstrap_mean_auroc_ci(Y, P, n_boot, seed, alpha)
    out["mean_auroc"] = float(np.mean(aucs)) if aucs else None
    out["mean_auroc_ci"] = [_num(lo), _num(hi)]
    for key in ("auprc", "brier", "ece"):
        vals = [m[key] for m in out["labels"].values() if m[key] is not None]
        out[f"mean_{key}"] = float(np.mean(vals)) if vals else None
    out["pooled_ece"] = _num(expected_calibration_error(Y.ravel(), P.ravel()))
    out["calibration"] = {"n_bins": N_BINS, "bins": "equal-width on [0, 1]"}
    out["n_images"] = int(Y.shape[0])
    out["bootstrap"] = {"n_boot": int(n_boot), "seed": int(seed), "alpha": float(alpha)}
    if groups is not None:
        g = np.asarray(groups).astype(str).ravel()
        if g.size != Y.shape[0]:
            raise ValueError(f"groups has {g.size} entries for {Y.shape[0]} images")
        out["by_group"] = {name: evaluate_predictions(Y[g == name], P[g == name], labels, thresholds,
                                                      None, n_boot, seed, alpha)
                           for name in np.unique(g).tolist()}
    return jsonable(out)


def flags_on_normal_films(Y: np.ndarray, P: np.ndarray, labels: list[str], thresholds: Mapping[str, float],
                          normal: str = "No Finding") -> float | None:
    """Mean number of findings at or above threshold on films labelled normal (None if none).

    What a clinician sees on a healthy film: each flag there is a false alarm.
    """
    if normal not in labels:
        return None
    is_normal = np.asarray(Y)[:, labels.index(normal)] == 1.0
    if not is_normal.any():
        return None
    cols = [k for k, name in enumerate(labels) if name != normal]
    t = np.array([float(thresholds.get(labels[k], 0.5)) for k in cols])
    return float((np.asarray(P)[is_normal][:, cols] >= t).sum(axis=1).mean())


def jsonable(obj: Any) -> Any:
    """Recursively converts numpy types/arrays, tuples and Paths to JSON types; NaN/inf -> None."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _num(float(obj))
    if isinstance(obj, Path):
        return str(obj)
    return obj


def to_json(metrics: Mapping[str, Any], path: str | Path) -> Path:
    """Writes ``metrics`` as indented strict JSON (parents created); returns the Path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(metrics), indent=2, allow_nan=False) + "\n")
    return path
