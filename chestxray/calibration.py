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

from chestxray.ckpt_config import map_threshold  # noqa: F401 (re-exported: the run-time half lives there)

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


def reliability_bins(y: np.ndarray, p: np.ndarray, n_bins: int = N_BINS, weights: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin: (count, mean probability, observed positive fraction).

    Bins without images have count 0 and NaN means. With ``weights`` (one per film, e.g. to stand for a
    population with other label frequencies: :func:`chestxray.prevalence.reference_weights`) counts and
    means are weighted.
    """
    pos, ps, keep = clean_targets(y, p)
    w = np.ones(ps.size) if weights is None else np.asarray(weights, dtype=np.float64).ravel()[keep]
    idx = np.clip((ps * n_bins).astype(int), 0, n_bins - 1)  # p = 1 goes to the last bin
    count = np.bincount(idx, weights=w, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(idx, weights=w * ps, minlength=n_bins) / count
        frac = np.bincount(idx, weights=w * pos, minlength=n_bins) / count
    return count, mean_p, frac


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = N_BINS,
                               weights: np.ndarray | None = None) -> float:
    """ECE over ``n_bins`` equal-width bins (see the module docstring; weighted with ``weights``); NaN without
    known targets."""
    count, mean_p, frac = reliability_bins(y, p, n_bins, weights)
    n = count.sum()
    if n <= 0:
        return math.nan
    full = count > 0
    return float(np.sum(count[full] / n * np.abs(frac[full] - mean_p[full])))


# -- temperature scaling ---------------------------------------------------------------------------
#: Range of a fitted temperature. Few validation positives can make a label separable, where the
#: likelihood keeps improving as T -> 0 (hard 0/1 outputs): the bound stops that.
T_BOUNDS = (0.05, 20.0)
#: A label's temperature is fitted only with at least this many validation positives and negatives
#: (fewer: it keeps T = 1, i.e. is left as it was).
MIN_EACH_CLASS = 3


def logit(p: np.ndarray | float, eps: float = 1e-12) -> np.ndarray:
    """log(p / (1 - p)) in float64, with p clipped to [eps, 1 - eps]."""
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


def sigmoid(z: np.ndarray | float) -> np.ndarray:
    """1 / (1 + exp(-z)) in float64, without overflow."""
    z = np.asarray(z, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


def nll(y: np.ndarray, logits: np.ndarray, temperature: float = 1.0) -> float:
    """Mean binary cross-entropy (negative log-likelihood) of ``sigmoid(logits / temperature)`` on the known
    targets; NaN without known targets."""
    pos, z, _ = clean_targets(y, logits)
    if not z.size:
        return math.nan
    z = z / temperature
    return float(np.mean(np.logaddexp(0.0, z) - pos * z))


def fit_temperature(y: np.ndarray, logits: np.ndarray, bounds: tuple[float, float] = T_BOUNDS,
                    min_each: int = MIN_EACH_CLASS) -> float | None:
    """The temperature ``T`` that minimises :func:`nll` of one label's ``sigmoid(logit / T)``.

    One positive scalar per label: dividing a logit by ``T`` keeps the order of the films (AUROC and the
    films flagged at a mapped threshold are unchanged) and only stretches (``T < 1``) or flattens
    (``T > 1``) the probabilities. Returns None when the label has fewer than ``min_each`` known
    positives or negatives (too few to fit one number honestly).
    """
    from scipy.optimize import minimize_scalar  # scipy comes with scikit-learn

    pos, z, _ = clean_targets(y, logits)
    if pos.sum() < min_each or (~pos).sum() < min_each:
        return None
    lo, hi = np.log(bounds[0]), np.log(bounds[1])

    def loss(log_t: float) -> float:
        zt = z / np.exp(log_t)
        return float(np.mean(np.logaddexp(0.0, zt) - pos * zt))

    res = minimize_scalar(loss, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
    t = float(np.exp(res.x))
    return t if loss(res.x) <= loss(0.0) else 1.0  # never worse than leaving the label alone


def fit_temperatures(Y: np.ndarray, logits: np.ndarray, labels: list[str], **kw) -> dict[str, float]:
    """:func:`fit_temperature` per label (columns of the N x K arrays); labels that cannot be fitted are left out."""
    out = {}
    for k, name in enumerate(labels):
        t = fit_temperature(Y[:, k], logits[:, k], **kw)
        if t is not None:
            out[name] = t
    return out


def apply_temperatures(logits: np.ndarray, temperatures: np.ndarray) -> np.ndarray:
    """``sigmoid(logits / T)`` per label column (``temperatures``: length K, 1.0 = unchanged)."""
    return sigmoid(np.asarray(logits, dtype=np.float64) / np.asarray(temperatures, dtype=np.float64))


