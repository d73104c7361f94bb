"""Probabilities on a stated population's scale: reference prevalences and the prior shift to them.

A model trained on a mix of sources (pediatric pneumonia, COVID-19 collections, NIH's label-balanced
films) and with positive-class weights in its loss learns that mix's label frequencies: on a normal
adult film it says "Pneumonia 30%" where 1.2% of NIH's adult films carry Pneumonia. Bayes' rule moves
a probability from one prior to another by shifting its logit (Saerens et al., Neural Computation
2002): ``logit p_ref = logit p + b``. Here ``b`` is fitted per label on held-out adult NIH films,
reweighted so that they stand for NIH's whole adult population (:func:`reference_weights`), as the
intercept that makes the weighted log-likelihood of ``sigmoid(logit / T + b)`` largest; its score
equation says the weighted mean probability then equals the reference prevalence. A shift moves
every film's logit by the same amount: rankings, AUROC and (with the mapped thresholds) the films
flagged are unchanged.

Reference prevalences come from the full NIH label file (``nih/Data_Entry_2017_v2020.csv.gz``, films of
patients aged 18 or more); Lung Opacity from the RSNA radiologists' readings of NIH films
(``nih/rsna_to_nih.csv``). Labels with no such figure (Tuberculosis, COVID-19: NIH's films predate the
pandemic and carry no tuberculosis label) are not shifted, and the card says so.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from chestxray.labels import NO_FINDING, PROXIES, canonical, parse_findings

#: The reference population of the NIH-14 models' probabilities.
NIH_ADULTS = "adult NIH ChestX-ray14 films (age >= 18) at NIH's label prevalence"
NIH_LABEL_FILE = "nih/Data_Entry_2017_v2020.csv.gz"
RSNA_FILE = "nih/rsna_to_nih.csv"
ADULT_AGE = 18
#: A shift is fitted only with at least this many positives and negatives among the fitting films.
MIN_POSITIVES, MIN_NEGATIVES = 1, 10
#: Range of a fitted shift (logits): a label that cannot be moved further is left at the bound.
SHIFT_BOUNDS = (-12.0, 12.0)


def nih_prevalence(data_root: str | os.PathLike, labels: Sequence[str]) -> dict[str, float]:
    """``{label: prevalence}`` among NIH's adult films, for the labels that have one.

    NIH's findings and No Finding from its full label file; a proxy label (e.g. the cancer proxy, Mass or
    Nodule) from its findings; Lung Opacity from the RSNA readings of NIH films.
    """
    root = Path(data_root)
    df = pd.read_csv(root / NIH_LABEL_FILE, usecols=["Finding Labels", "Patient Age"])
    findings = [parse_findings(t) for t in df.loc[df["Patient Age"] >= ADULT_AGE, "Finding Labels"]]
    out: dict[str, float] = {}
    named = {name for f in findings for name in f}
    for label in (canonical(k) for k in labels):
        if label == NO_FINDING or label in named:
            out[label] = sum(label in f for f in findings) / len(findings)
        elif label in PROXIES:
            members = set(PROXIES[label])
            out[label] = sum(bool(members & f) for f in findings) / len(findings)
        elif label == "Lung Opacity" and (root / RSNA_FILE).is_file():
            rsna = pd.read_csv(root / RSNA_FILE, usecols=["rsna_class"])
            out[label] = float((rsna["rsna_class"] == "Lung Opacity").mean())
    return {k: round(v, 6) for k, v in out.items()}


def reference_weights(y: np.ndarray, no_finding: np.ndarray | None, prevalence: float,
                      no_finding_prevalence: float | None = None) -> np.ndarray:
    """Per-film weights that give the films one label's reference prevalence (NaN targets get weight 0).

    Cells: positives; and the negatives split into normal films (No Finding) and other abnormal films, when
    ``no_finding`` and its prevalence are given, because a sample of label-balanced films holds far more
    abnormal negatives than the population does (their scores run higher). Each cell is weighted to its
    population share over its share of the films; the weights sum to the number of known films.
    """
    y = np.asarray(y, dtype=np.float64)
    known = ~np.isnan(y)
    pos = known & (y >= 0.5)
    cells = [(pos, prevalence)]
    neg = known & ~pos
    if no_finding is not None and no_finding_prevalence is not None:
        nf = neg & (np.asarray(no_finding, dtype=np.float64) >= 0.5)
        other = neg & ~nf
        if nf.any() and other.any():
            cells += [(nf, no_finding_prevalence), (other, max(1.0 - prevalence - no_finding_prevalence, 0.0))]
        else:
            cells.append((neg, 1.0 - prevalence))
    else:
        cells.append((neg, 1.0 - prevalence))
    total = sum(share for rows, share in cells if rows.any())
    w = np.zeros(len(y))
    n = known.sum()
    for rows, share in cells:
        if rows.any():
            w[rows] = share / total * n / rows.sum()
    return w


def label_weights(Y: np.ndarray, labels: list[str], k: int, prevalence: dict[str, float]) -> np.ndarray:
    """:func:`reference_weights` of label ``k`` (column of ``Y``), its negatives split by No Finding where the
    label set and the reference have it (and ``k`` is not No Finding itself)."""
    nf = labels.index(NO_FINDING) if NO_FINDING in labels and NO_FINDING in prevalence else None
    split = nf is not None and k != nf
    return reference_weights(Y[:, k], Y[:, nf] if split else None, prevalence[labels[k]],
                             prevalence[NO_FINDING] if split else None)


def fit_shift(y: np.ndarray, z: np.ndarray, weights: np.ndarray) -> float | None:
    """The logit shift ``b`` that maximises the weighted log-likelihood of ``sigmoid(z + b)``.

    ``z`` is the logit on the scale before the shift (already divided by the temperature). Its score
    equation is ``sum w (y - sigmoid(z + b)) = 0``: the weighted mean probability equals the weighted
    prevalence. Returns None with fewer than :data:`MIN_POSITIVES` / :data:`MIN_NEGATIVES` known films.
    """
    from scipy.optimize import brentq  # scipy comes with scikit-learn

    y, z, w = (np.asarray(a, dtype=np.float64) for a in (y, z, weights))
    known = ~np.isnan(y) & (w > 0)
    pos = y[known] >= 0.5
    if pos.sum() < MIN_POSITIVES or (~pos).sum() < MIN_NEGATIVES:
        return None
    yk, zk, wk = pos.astype(np.float64), z[known], w[known]
    target = float(np.sum(wk * yk))

    def excess(b: float) -> float:  # weighted expected positives minus observed: increasing in b
        return float(np.sum(wk * np.exp(-np.logaddexp(0.0, -(zk + b))))) - target

    lo, hi = SHIFT_BOUNDS
    if excess(lo) >= 0:
        return lo
    if excess(hi) <= 0:
        return hi
    return float(brentq(excess, lo, hi, xtol=1e-8))


def fit_shifts(Y: np.ndarray, Z: np.ndarray, labels: list[str], prevalence: dict[str, float],
               temperatures: dict[str, float] | None = None) -> dict[str, float]:
    """:func:`fit_shift` per label with a reference prevalence, on held-out films of the reference population.

    ``Z`` holds raw logits; each label's is divided by its temperature first. The films are reweighted per
    label (:func:`reference_weights`, negatives split by No Finding where the label set has it).
    """
    temperatures = temperatures or {}
    out = {}
    for k, name in enumerate(labels):
        if name not in prevalence:
            continue
        w = label_weights(Y, labels, k, prevalence)
        b = fit_shift(Y[:, k], Z[:, k] / temperatures.get(name, 1.0), w)
        if b is not None and math.isfinite(b):
            out[name] = round(b, 6)
    return out


def weighted_mean(p: np.ndarray, w: np.ndarray) -> float:
    """Weighted mean of the probabilities (NaN without weight)."""
    s = float(np.sum(w))
    return float(np.sum(w * p) / s) if s > 0 else math.nan


def reference_report(Y: np.ndarray, Z: np.ndarray, labels: list[str], prevalence: dict[str, float],
                     temperatures: dict[str, float], shifts: dict[str, float]) -> dict[str, object]:
    """How the probabilities read on films of the reference population, before and after the prior shift.

    ``Y``/``Z``: targets and raw logits of films of that population (e.g. NIH test films). Before is
    ``sigmoid(logit / T)``, after ``sigmoid(logit / T + b)``. Per label with a reference prevalence: the
    mean probability on all the films and on the normal (No Finding) ones, the mean and the ECE with the
    films reweighted to the reference prevalence (:func:`reference_weights`).
    """
    from chestxray.calibration import expected_calibration_error, sigmoid

    nf = labels.index(NO_FINDING) if NO_FINDING in labels else None
    normal = (Y[:, nf] >= 0.5) if nf is not None else np.zeros(len(Y), dtype=bool)
    per_label: dict[str, dict[str, object]] = {}
    for k, name in enumerate(labels):
        if name not in prevalence:
            continue
        z = Z[:, k] / temperatures.get(name, 1.0)
        before, after = sigmoid(z), sigmoid(z + shifts.get(name, 0.0))
        w = label_weights(Y, labels, k, prevalence)
        row: dict[str, object] = {"prevalence": prevalence[name], "shift": shifts.get(name),
                                  "n_films": int((~np.isnan(Y[:, k])).sum()), "n_normal": int(normal.sum())}
        for side, p in (("before", before), ("after", after)):
            row[side] = {"mean_prob": _mean(p), "mean_prob_normal": _mean(p[normal]) if normal.any() else None,
                         "reweighted_mean_prob": weighted_mean(p, w),
                         "reweighted_ece": expected_calibration_error(Y[:, k], p, weights=w)}
        per_label[name] = row
    return {"reference": NIH_ADULTS, "n_films": int(len(Y)), "labels": per_label,
            "mean_reweighted_ece": {side: _mean([r[side]["reweighted_ece"] for r in per_label.values()])
                                    for side in ("before", "after")}}


def _mean(values) -> float | None:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else None
