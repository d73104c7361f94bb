"""Two models' predictions on the same films, compared paired: ``chestxray compare``.

Two ``predictions.csv`` files (what ``evaluate``, ``release`` and ``cv`` write: ``image``, ``source``,
``cohort`` and one probability column per label; a fold's ``oof.csv`` reads too, by its logits, which rank the films as the probabilities do) are scored on the films they share, optionally only one
cohort's films (e.g. NIH's label-balanced ``reproduce_chexnet`` films) and only the films of one split of a
checkpoint's ``splits.csv`` (e.g. the test films of one model, which the other's out-of-fold predictions
also never trained on). The difference of the two mean AUROCs gets a *paired* bootstrap CI: each replicate
resamples the same films for both models, so the film-to-film noise they share cancels, which two separate
CIs cannot show.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from chestxray.data import load_sources
from chestxray.metrics import auroc

#: The columns of a predictions.csv (or a fold's oof.csv) that are not labels' probabilities.
KEYS = ("image", "source", "cohort", "patient", "fold")


def _mean_auroc(Y: np.ndarray, P: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a replicate where a label has no positive
        return float(np.nanmean([auroc(Y[:, k], P[:, k]) for k in range(Y.shape[1])]))


def paired_difference(Y: np.ndarray, PA: np.ndarray, PB: np.ndarray, n_boot: int = 1000, seed: int = 0,
                      alpha: float = 0.05) -> dict[str, Any]:
    """Mean AUROC of A and of B on the same films, and B - A with a paired percentile bootstrap CI.

    Args:
        Y: N x K labels (1, 0, NaN unknown).
        PA, PB: N x K probabilities of models A and B for the same films in the same order.
        n_boot: bootstrap replicates (films resampled jointly for both models).

    Returns:
        ``{"a", "b", "difference", "ci", "p_b_better", "n_undefined"}``; ``p_b_better`` is the share of the
        defined replicates where B scores higher (a description of the resampling, not a significance test);
        ``n_undefined`` counts the replicates with no AUROC for any label, left out of both.
    """
    Y, PA, PB = (np.asarray(x, dtype=np.float64) for x in (Y, PA, PB))
    if not (Y.shape == PA.shape == PB.shape) or Y.ndim != 2 or not len(Y):
        raise ValueError(f"labels {Y.shape} and both predictions {PA.shape}, {PB.shape} must be equal N x K arrays")
    a, b = _mean_auroc(Y, PA), _mean_auroc(Y, PB)
    rng = np.random.default_rng(seed)
    diffs = np.array([_mean_auroc(Y[i], PB[i]) - _mean_auroc(Y[i], PA[i])
                      for i in (rng.integers(0, len(Y), len(Y)) for _ in range(n_boot))])
    # A replicate where every label lacks a positive or a negative has no AUROC (few films, a rare class): it
    # counts in neither the CI nor the share where B is higher, and the caller is told how many there were.
    ok = diffs[np.isfinite(diffs)]
    lo, hi = np.percentile(ok, [100 * alpha / 2, 100 * (1 - alpha / 2)]) if len(ok) else (np.nan, np.nan)
    return {"a": a, "b": b, "difference": b - a, "ci": [float(lo), float(hi)],
            "p_b_better": float(np.mean(ok > 0)) if len(ok) else None, "n_undefined": int(n_boot - len(ok))}


def _read(path: str | os.PathLike) -> pd.DataFrame:
    df = pd.read_csv(path)
    if missing := [k for k in KEYS[:2] if k not in df.columns]:
        raise ValueError(f"{path} is not a predictions.csv: it lacks {', '.join(missing)}")
    df["image"] = df["image"].map(lambda x: Path(str(x)).name)  # oof.csv keeps the path under the data root
    logits = {c[len("logit:"):]: c for c in df.columns if c.startswith("logit:")}
    if logits:  # a fold's oof.csv: the label columns are the film's labels, the logits are the model's scores
        df = df.drop(columns=[k for k in logits if k in df.columns]).rename(columns={v: k for k, v in logits.items()})
    return df.drop_duplicates(["source", "image"]).set_index(["source", "image"])


def compare_predictions(a_csv: str | os.PathLike, b_csv: str | os.PathLike, data_root: str | os.PathLike, *,
                        source: str = "nih384", cohort: str | None = None, split_of: str | None = None,
                        n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """:func:`paired_difference` of two predictions files on their common films of ``source``.

    Args:
        a_csv, b_csv: the two predictions.csv files (A is the reference: the difference is B - A).
        data_root: the shared data (the films' labels come from the source's own label file).
        source: the source whose films are compared.
        cohort: only this cohort's films (e.g. ``reproduce_chexnet``, NIH's label-balanced films).
        split_of: ``FOLDER:SPLIT``: only the films in SPLIT of FOLDER/splits.csv (e.g. ``weights/efficientnet_b0:test``).
    """
    A, B = _read(a_csv), _read(b_csv)
    labels = [c for c in A.columns if c in B.columns and c not in KEYS]
    if not labels:
        raise ValueError(f"{a_csv} and {b_csv} share no label column")
    truth = load_sources([source], data_root, labels)
    truth = truth.assign(image=truth["path"].map(lambda p: Path(p).name)).drop_duplicates("image")
    if cohort:
        truth = truth[truth["cohort"] == cohort]
    if split_of:
        folder, _, split = split_of.rpartition(":")
        if not folder or not split:
            raise ValueError(f"--split-of takes FOLDER:SPLIT (e.g. weights/efficientnet_b0:test), got {split_of!r}")
        s = pd.read_csv(Path(folder) / "splits.csv")
        truth = truth[truth["image"].isin(s.loc[(s["split"] == split) & (s["source"] == source), "image"])]
    keys = [(source, im) for im in truth["image"] if (source, im) in A.index and (source, im) in B.index]
    if not keys:
        raise ValueError("the two files share no film of these (source, cohort, split)")
    truth = truth.set_index("image").loc[[im for _, im in keys]]
    out = paired_difference(truth[labels].to_numpy(float), A.loc[keys, labels].to_numpy(float),
                            B.loc[keys, labels].to_numpy(float), n_boot=n_boot, seed=seed)
    return {**out, "n_films": len(keys), "labels": labels, "source": source, "cohort": cohort, "split_of": split_of}


def report_lines(r: dict[str, Any], a_name: str, b_name: str, n_boot: int) -> list[str]:
    """What ``chestxray compare`` prints of :func:`compare_predictions`'s result ``r``."""
    films = " ".join(x for x in (r["source"], r["cohort"] or "", f"films in {r['split_of']}" if r["split_of"] else "")
                     if x)
    lines = [f"{r['n_films']} common films ({films}), mean AUROC over {len(r['labels'])} labels",
             f"A {a_name}: {r['a']:.3f}", f"B {b_name}: {r['b']:.3f}",
             f"B - A: {r['difference']:+.3f} (paired bootstrap 95% CI {r['ci'][0]:+.3f} to {r['ci'][1]:+.3f}, "
             f"{n_boot} resamples; B higher in {100 * r['p_b_better']:.0f}% of them)"]
    if r["n_undefined"]:
        lines.append(f"note: {r['n_undefined']} of the {n_boot} resamples had no AUROC for any label (too few "
                     "positives or negatives among these films) and were left out")
    return lines
