"""Calibration and precision-recall metrics for one label: AUPRC, Brier score, ECE, reliability bins.

AUROC says whether positives score above negatives; these say whether the numbers themselves can
be read as probabilities (Brier, ECE, the reliability diagram) and how precise the positive calls
are at a rare label's low prevalence (AUPRC, whose chance level is the prevalence, not 0.5).

Conventions follow :mod:`chestxray.metrics`: targets 1/0/NaN (NaN ignored), positive when >= 0.5,
finite probabilities in [0, 1]; an undefined value is ``float('nan')``.

Definitions (``n`` known targets of one label, ``y_i`` in {0, 1}, ``p_i`` the probability):

- **AUPRC** (average precision, as scikit-learn's ``average_precision_score``):
  ``sum_t (R_t - R_{t-1}) * P_t`` over the distinct scores ``t`` in decreasing order, where
  ``P_t``/``R_t`` are precision/recall of the rule ``p >= t`` (tied scores form one step; no
  interpolation). Undefined without both classes.
- **Brier score**: ``mean((p_i - y_i)^2)``; 0 is perfect, and always predicting the prevalence
  ``pi`` scores ``pi * (1 - pi)``. Undefined without known targets.
- **ECE** (expected calibration error) with ``B = 15`` equal-width bins on [0, 1]
  (bin ``b`` holds ``b/B <= p < (b+1)/B``, the last one also ``p = 1``):
  ``sum_b (n_b / n) * |mean(y in b) - mean(p in b)|``, empty bins skipped. 0 means every bin's
  mean probability equals its observed frequency. For a rare label most images sit in the first
  bin, so its ECE is small almost by construction: read it with the reliability diagram.
"""
from __future__ import annotations

import math

import numpy as np

#: Equal-width bins of the expected calibration error and the reliability diagram.
N_BINS = 15


def clean_targets(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positive mask, probabilities, keep mask) on the rows with a known (non-NaN) target; every metric
    here and in :mod:`chestxray.metrics` reads a label's targets through it."""
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"targets {y.shape} and probabilities {p.shape} differ in shape")
    keep = ~np.isnan(y)
    if not np.all(np.isfinite(p[keep])):
        raise ValueError("probabilities contain NaN/inf")
    return y[keep] >= 0.5, p[keep], keep


def average_precision(y: np.ndarray, p: np.ndarray) -> float:
    """AUPRC as average precision (see the module docstring); NaN without both classes."""
    pos, ps, _ = clean_targets(y, p)
    n_pos = int(pos.sum())
    if n_pos == 0 or n_pos == pos.size:
        return math.nan
    order = np.argsort(-ps, kind="mergesort")
    ps, pos = ps[order], pos[order]
    last = np.r_[np.flatnonzero(np.diff(ps) != 0), ps.size - 1]  # one step per tie group
    tp = np.cumsum(pos)[last]
    precision = tp / (last + 1)
    recall_gain = np.diff(np.r_[0, tp]) / n_pos
    return float(np.sum(recall_gain * precision))


def brier_score(y: np.ndarray, p: np.ndarray) -> float:
    """Mean squared error of the probabilities against the 0/1 targets; NaN without known targets."""
    pos, ps, _ = clean_targets(y, p)
    return float(np.mean((ps - pos) ** 2)) if ps.size else math.nan


def reliability_bins(y: np.ndarray, p: np.ndarray, n_bins: int = N_BINS
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin: (count, mean probability, observed positive fraction).

    Bins without images have count 0 and NaN means.
    """
    pos, ps, _ = clean_targets(y, p)
    idx = np.clip((ps * n_bins).astype(int), 0, n_bins - 1)  # p = 1 goes to the last bin
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(idx, weights=ps, minlength=n_bins) / count
        frac = np.bincount(idx, weights=pos.astype(np.float64), minlength=n_bins) / count
    return count, mean_p, frac


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = N_BINS) -> float:
    """ECE over ``n_bins`` equal-width bins (see the module docstring); NaN without known targets."""
    count, mean_p, frac = reliability_bins(y, p, n_bins)
    n = count.sum()
    if n == 0:
        return math.nan
    full = count > 0
    return float(np.sum(count[full] / n * np.abs(frac[full] - mean_p[full])))
