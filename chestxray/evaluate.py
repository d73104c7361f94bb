"""Evaluation: run a model on labelled images through the product's own path and write the evidence.

Images are decoded by :func:`chestxray.imaging.read_image` and preprocessed by the checkpoint's
:class:`~chestxray.transforms.Preprocess`, exactly as in the app, so the numbers describe what a
user gets. Outputs: ``metrics.json`` (per label AUROC with bootstrap CI, accuracy, precision,
recall, F1 at the stored threshold, support; AUPRC, Brier score and ECE (see
:mod:`chestxray.calibration`); ``mean_auroc`` and the other means; per-source breakdown), ``roc.png``,
``confusion.png``, ``reliability.png`` and ``predictions.csv``.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from chestxray.calibration import N_BINS, brier_score, expected_calibration_error
from chestxray.imaging import ImageReadError, read_image
from chestxray.layout import default_data_root
from chestxray.metrics import evaluate_predictions, flags_on_normal_films, to_json
from chestxray.plots import plot_confusion_matrices, plot_reliability, plot_roc_curves
from chestxray.predictor import Predictor
from chestxray.prevalence import NIH_LABEL_FILE, nih_prevalence, reference_report
from chestxray.sources import HEADLINE_GROUP, collection_of

log = logging.getLogger(__name__)
SPLITS_FILE = "splits.csv"
#: The fair test of the 14 findings, always reported as a group of its own (see :mod:`chestxray.sources`).
BALANCED_COHORT = HEADLINE_GROUP


def predict_paths(predictor: Predictor, paths: Sequence[str], batch_size: int = 16,
                  progress: bool = True, logits: bool = False) -> tuple[np.ndarray, dict[str, str]]:
    """Probabilities (or, with ``logits``, the raw logits) for many files (NaN rows for unreadable ones) and
    {path: one-line error}."""
    probs = np.full((len(paths), len(predictor.labels)), np.nan, dtype=np.float32)
    errors: dict[str, str] = {}
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress, leave=False)
    for start in range(0, len(paths), batch_size):
        chunk, idx = [], []
        for i in range(start, min(start + batch_size, len(paths))):
            try:
                chunk.append(read_image(paths[i]).pixels)
                idx.append(i)
            except ImageReadError as err:
                errors[str(paths[i])] = str(err)
        if chunk:
            probs[idx] = predictor.predict_logits(chunk) if logits else predictor.predict_batch(chunk)
        bar.update(min(batch_size, len(paths) - start))
    bar.close()
    return probs, errors


def select_split(df: pd.DataFrame, splits_csv: str | os.PathLike, split: str) -> pd.DataFrame:
    """Keeps the rows a checkpoint's ``splits.csv`` assigns to ``split``, matched by file name.

    File names are unique within each public set (NIH's ``00000100_000.png``); a name listed in two
    splits would be ambiguous and is dropped rather than guessed.
    """
    s = pd.read_csv(splits_csv, dtype=str)
    by_name = s.groupby("image")["split"].agg(lambda v: v.iat[0] if v.nunique() == 1 else "ambiguous")
    names = df["path"].map(os.path.basename)
    out = df[(names.map(by_name) == split).to_numpy()]
    if out.empty:
        raise ValueError(f"no image of these sources is in the {split!r} split of {splits_csv}")
    return out


def split_films(predictor, df: pd.DataFrame, split: str) -> pd.DataFrame:
    """The rows of ``df`` in ``split`` of every ``splits.csv`` the predictor names (:attr:`Predictor.split_files
    <chestxray.predictor.Predictor.split_files>`: its own; for an ensemble, each member's), so an ensemble's test
    films are the films that are test films of every member."""
    df = df.reset_index(drop=True)
    keep = np.ones(len(df), dtype=bool)
    for path in predictor.split_files:
        if not path.is_file():
            raise ValueError(f"--split needs {SPLITS_FILE} in the checkpoint folder {path.parent}")
        keep &= df.index.isin(select_split(df, path, split).index)
    if not keep.any():
        raise ValueError(f"no image of these sources is in the {split!r} split of every member of {predictor.name}")
    return df[keep]


def source_sites(df: pd.DataFrame) -> dict[str, str]:
    """``{source: site}``, the site being the patient namespace (``"nih:100"`` -> ``"nih"``).

    Sources that share patients share a hospital (NIH's 384-px and 64-px folders): a label taught
    by both is not confounded with either (see :func:`chestxray.modelcard.confounded_labels`).
    """
    first = df.groupby("source")["patient"].first()
    return {src: str(pid).partition(":")[0] if ":" in str(pid) else src for src, pid in first.items()}


def evaluate_manifest(predictor: Predictor, df: pd.DataFrame, out_dir: str | os.PathLike, *, n_boot: int = 1000,
                      seed: int = 0, progress: bool = True, title: str | None = None,
                      probs: np.ndarray | None = None, plot_group: str | None = None,
                      logits: np.ndarray | None = None,
                      localization: dict[str, Any] | None = None,
                      prevalence: dict[str, float] | None = None) -> dict[str, Any]:
    """Evaluates a manifest (see :mod:`chestxray.data`) and writes metrics.json, plots and predictions.

    Labels of the model that the manifest lacks are reported as undefined (no known targets).

    Args:
        probs: this predictor's probabilities for ``df``'s rows, when already computed
            (:func:`predict_paths`; NaN rows = unreadable).
        logits: the raw logits for ``df``'s rows instead (``predict_paths(..., logits=True)``): the
            probabilities are the predictor's (temperature-scaled when its config has temperatures), and a
            calibrated predictor's metrics get ``temperature_scaling``: Brier and ECE before and after, per group.
            Without ``probs`` or ``logits`` the logits are computed here.
        localization: a :func:`chestxray.localization.held_out_pointing_game` result, stored (without its
            per-film pairs) as ``localization``.
        plot_group: draw the ROC, confusion and reliability plots on this group's images only (e.g. the
            headline cohort), when it is present.
        prevalence: reference prevalences (:func:`chestxray.prevalence.nih_prevalence`; default: the ones the
            checkpoint's calibration stores): with logits, ``reference_scale`` reports how the probabilities
            read on the NIH films against them, before and after the checkpoint's prior shift.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = predictor.labels
    for k in labels:
        if k not in df.columns:
            df = df.assign(**{k: np.nan})
    raw, errors = None, None
    if probs is None and logits is None:  # the reader's own one-line errors are kept for unreadable files
        if hasattr(predictor, "predict_logits"):
            logits, errors = predict_paths(predictor, list(df["path"]), progress=progress, logits=True)
        else:  # an ensemble (chestxray.ensemble): the mean of its members' calibrated probabilities, no logit
            probs, errors = predict_paths(predictor, list(df["path"]), progress=progress)
    if probs is None:
        z = torch.from_numpy(np.asarray(logits, dtype=np.float32))
        probs, raw = predictor.probabilities(z).numpy(), torch.sigmoid(z).numpy()
    if errors is None:
        errors = {p: "unreadable" for p, bad in zip(df["path"], np.isnan(probs).any(axis=1)) if bad}
    ok = ~np.isnan(probs).any(axis=1)
    Y = df[labels].to_numpy(np.float64)[ok]
    P = probs[ok].astype(np.float64)
    sources = df["source"].to_numpy()[ok].astype(str)
    cohorts = (df["cohort"].fillna(df["source"]) if "cohort" in df.columns else df["source"]).to_numpy()[ok].astype(str)
    metrics = evaluate_predictions(Y, P, labels, predictor.thresholds, groups=sources, n_boot=n_boot, seed=seed)
    # Beside each source, each cohort that is a proper part of its source: NIH's label-balanced
    # reproduce_chexnet films are the fair test of the 14 findings, its darkcovidnet sample
    # (No Finding / Pneumonia only) is not.
    parts = {s: sources == s for s in metrics["by_group"]}
    for c in np.unique(cohorts):
        rows = cohorts == c
        if c not in parts and (c == BALANCED_COHORT or rows.sum() < parts[sources[rows][0]].sum()):
            parts[c] = rows
            metrics["by_group"][c] = evaluate_predictions(Y[rows], P[rows], labels, predictor.thresholds,
                                                          n_boot=n_boot, seed=seed)
    metrics["flags_per_normal_film"] = flags_on_normal_films(Y, P, labels, predictor.thresholds)
    for name, rows in parts.items():
        metrics["by_group"][name]["flags_per_normal_film"] = flags_on_normal_films(Y[rows], P[rows], labels,
                                                                                   predictor.thresholds)
    if predictor.calibrated and raw is not None:
        metrics["temperature_scaling"] = temperature_comparison(Y, raw[ok].astype(np.float64), P, labels, parts,
                                                                predictor.temperatures)
    prevalence = prevalence or (predictor.ckpt.meta.calibration.prevalence if predictor.ckpt.meta.calibration else {})
    nih = np.array([collection_of(src) == "nih" for src in sources], dtype=bool)
    if prevalence and raw is not None and nih.any():
        Z = np.asarray(logits, dtype=np.float64)[ok]
        metrics["reference_scale"] = reference_report(Y[nih], Z[nih], labels, prevalence, predictor.temperatures,
                                                      predictor.shifts)
    if localization and localization.get("n_pairs"):
        metrics["localization"] = {k: v for k, v in localization.items() if k != "pairs"}
    metrics.update(model=predictor.name, arch=predictor.arch, n_unreadable=len(errors),
                   unreadable=dict(list(errors.items())[:20]),
                   sources=sorted(df["source"].unique().tolist()), sites=source_sites(df))
    to_json(metrics, out / "metrics.json")
    pred = pd.DataFrame(P, columns=labels)
    pred.insert(0, "image", [os.path.basename(p) for p in df["path"][ok]])
    pred.insert(1, "source", df["source"].to_numpy()[ok])
    pred.insert(2, "cohort", cohorts)
    pred.to_csv(out / "predictions.csv", index=False, float_format="%.5f")
    rows = parts.get(plot_group, np.ones(len(Y), dtype=bool))
    plot_roc_curves(Y[rows], P[rows], labels, out / "roc.png",
                    title=title or f"{predictor.name}: ROC ({int(rows.sum())} images)")
    plot_confusion_matrices(Y[rows], P[rows], labels, predictor.thresholds, out / "confusion.png")
    plot_reliability(Y[rows], P[rows], labels, out / "reliability.png",
                     title=f"{predictor.name}: reliability ({int(rows.sum())} images, {N_BINS} equal-width bins)")
    return metrics


def _calibration_numbers(Y: np.ndarray, P: np.ndarray, labels: list[str]) -> dict[str, Any]:
    ece = {k: expected_calibration_error(Y[:, i], P[:, i]) for i, k in enumerate(labels)}
    brier = {k: brier_score(Y[:, i], P[:, i]) for i, k in enumerate(labels)}

    def mean(d: dict[str, float]) -> float | None:
        vals = [v for v in d.values() if v == v]
        return float(np.mean(vals)) if vals else None

    return {"mean_ece": mean(ece), "pooled_ece": expected_calibration_error(Y.ravel(), P.ravel()),
            "mean_brier": mean(brier), "pooled_brier": brier_score(Y.ravel(), P.ravel()),
            "ece": ece, "brier": brier}


def temperature_comparison(Y: np.ndarray, raw: np.ndarray, P: np.ndarray, labels: list[str],
                           parts: dict[str, np.ndarray], temperatures: dict[str, float]) -> dict[str, Any]:
    """ECE and Brier score before (``sigmoid(logit)``) and after (``sigmoid(logit / T)``) temperature scaling,
    on all films and per group: ``{"temperatures", "all": {"before", "after"}, "by_group": {g: {...}}}``,
    each side holding mean/pooled ECE and Brier and the per-label values (NaN where undefined)."""
    def both(rows: np.ndarray | slice) -> dict[str, Any]:
        return {"n_images": int(Y[rows].shape[0]), "before": _calibration_numbers(Y[rows], raw[rows], labels),
                "after": _calibration_numbers(Y[rows], P[rows], labels)}

    return {"method": "temperature", "temperatures": dict(temperatures), "all": both(slice(None)),
            "by_group": {g: both(rows) for g, rows in parts.items()}}


def has_boxes(data_root: str | os.PathLike) -> bool:
    """Whether ``data_root`` holds the NIH and RSNA box files and NIH's 384-px films (what localization reads)."""
    from chestxray.localization import BOX_FILES

    root = Path(data_root)
    return all((root / f).is_file() for f in BOX_FILES) and (root / "nih" / "images_384").is_dir()


def evaluate(model: str, out_dir: str | os.PathLike, *, labels_csv: str | None = None, images: str | None = None,
             sources: Sequence[str] = (), data_root: str | None = None, split: str | None = None,
             n_boot: int = 1000, progress: bool = True, localize: bool = True) -> dict[str, Any]:
    """The ``evaluate`` command: a label CSV + image folder, or shared-data sources by name.

    Args:
        model: model reference (shipped name, folder, ``hf-hub:``; an ensemble folder too).
        out_dir: where metrics.json and the plots go.
        labels_csv, images: a label file (NIH layout or one 0/1/blank column per label) and its folder.
        sources: shared-data source names (see :data:`chestxray.sources.SOURCES`) instead.
        split: keep only the images the checkpoint's ``splits.csv`` puts in this split (e.g. "test"; for an
            ensemble, the images every member's ``splits.csv`` puts there).
        localize: also play the pointing game on the boxed NIH films of ``data_root`` outside the model's
            training split (:func:`chestxray.localization.held_out_pointing_game`), when the box files are there.
    """
    from chestxray.data import load_sources, read_manifest
    from chestxray.ensemble import load_model

    predictor = load_model(model)
    data_root = data_root or default_data_root()
    if labels_csv:
        df = read_manifest(labels_csv, images or Path(labels_csv).parent, predictor.labels,
                           source=Path(images or Path(labels_csv).parent).name, missing="drop")
    elif sources:
        df = load_sources(list(sources), data_root, predictor.labels, missing="drop")
    else:
        raise ValueError("give --labels (and --images) or --source")
    if split:
        df = split_films(predictor, df, split)
    if df.empty:
        raise ValueError("no labelled images found")
    loc = None
    if localize and has_boxes(data_root):
        from chestxray.localization import held_out_pointing_game

        loc = held_out_pointing_game(predictor, data_root)
    prevalence = None
    if (Path(data_root) / NIH_LABEL_FILE).is_file():
        prevalence = nih_prevalence(data_root, predictor.labels)
    return evaluate_manifest(predictor, df.reset_index(drop=True), out_dir, n_boot=n_boot, progress=progress,
                             localization=loc, prevalence=prevalence)
