"""An ensemble of cross-validated models, with out-of-fold evidence: ``chestxray ensemble --cv --name N --members ...``.

Each member is the all-data release of a cross-validated recipe (``chestxray release RUN --cv CV_DIR``): its
weights saw every shared film, so no shared film can test it, nor an ensemble of such members. Its estimate is
out of fold, as theirs is:

- **Same folds**: the members were cross-validated on the same patient-wise folds (same fold count, seed,
  sources and per-source caps; checked), so every film's out-of-fold probability of every member comes from a
  fold model that never trained on its patient, and their mean is the out-of-fold probability of the mean of
  those fold models: the ensemble cross-validated.
- **Films and probabilities**: every film in every member's out-of-fold ``predictions.csv`` (what ``chestxray cv``
  wrote through the product's reader, each member's own preprocessing and calibration, 5 decimals), matched by
  source and file name; the targets are read from the shared labels again.
- **Thresholds**: the members' rule on the ensemble's mean out-of-fold probabilities of the films the members'
  own thresholds were fitted on (their ``val_sources``: NIH's label-balanced films), as ``chestxray cv`` fits
  each member's: threshold-dependent figures on those films are fitted in sample, as the members' are; the AUROCs
  are not fitted at all.
- **No pointing game for the ensemble**: its heatmaps out of fold need every member's fold weights, which the
  record does not keep; each member's own out-of-fold figure is shown beside it.

The folder holds no weights (``config.json`` names the members), and the same files as
:func:`chestxray.ensemble_release.build_ensemble` writes; rebuilding it reproduces every number.
"""
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from chestxray.ckpt_config import CkptMeta, Ensemble, Training
from chestxray.ensemble import member_folder
from chestxray.ensemble_release import (TIMING_FILM, _json, agreed, cpu_cost, figures, in_cohorts,
                                        mean_probabilities, member_figures, stage_ensemble)
from chestxray.evaluate import evaluate_manifest
from chestxray.layout import CONFIG_FILE, CheckpointError, default_data_root
from chestxray.metrics import bootstrap_mean_auroc_ci, choose_threshold, mean_auroc, to_json
from chestxray.predictor import Predictor
from chestxray.sources import HEADLINE_GROUP

log = logging.getLogger(__name__)
#: What must agree between the members' recipes for their folds to be the same folds.
FOLD_KEYS = ("seed", "source_caps")


def fold_protocol(predictor: Predictor) -> dict[str, Any]:
    """What fixes a cross-validated member's folds: fold count, seed, sources, per-source caps. Refuses, in one line,
    a member that was not cross-validated (its figures are not out of fold)."""
    meta = predictor.ckpt.meta
    cv = (meta.metrics.extra.get("cross_validation") if meta.metrics else None) or {}
    if not meta.metrics or meta.metrics.split != "out-of-fold" or not cv.get("folds"):
        raise CheckpointError(f"{predictor.name} was not released from a cross-validation (release --cv): its "
                              "figures are not out of fold, so it cannot join a cross-validated ensemble")
    recipe = (meta.training.recipe if meta.training else None) or {}
    return {"folds": cv["folds"], "sources": sorted(meta.training.sources if meta.training else []),
            **{k: recipe.get(k) for k in FOLD_KEYS}}


def out_of_fold_films(preds: Sequence[Predictor], data_root: str | os.PathLike, sources: Sequence[str],
                      manifest: pd.DataFrame | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """The films every member predicted out of fold, with their targets (a manifest: ``manifest``, else the
    shared data's ``sources``), and every member's calibrated out-of-fold probabilities of them (M x N x K), from
    the members' ``predictions.csv``."""
    from chestxray.data import load_sources

    labels = list(preds[0].labels)
    if manifest is None:
        manifest = load_sources(list(sources), str(data_root), labels, missing="drop")
    manifest = manifest.copy()
    manifest["image"] = manifest["path"].map(os.path.basename)
    manifest = manifest.drop_duplicates(["source", "image"]).set_index(["source", "image"])
    shipped = []
    for p in preds:
        path = Path(p.ckpt.path) / "predictions.csv"
        if not path.is_file():
            raise CheckpointError(f"{p.name} has no predictions.csv (its out-of-fold probabilities)")
        shipped.append(pd.read_csv(path).drop_duplicates(["source", "image"]).set_index(["source", "image"]))
    keys = shipped[0].index
    for s in shipped[1:]:
        keys = keys.intersection(s.index)
    keys = keys.intersection(manifest.index)
    if len(keys) == 0:
        raise ValueError("the members' out-of-fold predictions share no film")
    keys = keys.sort_values()
    films = manifest.loc[keys].reset_index()
    P = np.stack([s.loc[keys, labels].to_numpy(np.float32) for s in shipped])
    return films, P


def paired_against_members(films: pd.DataFrame, Y: np.ndarray, Pm: np.ndarray, P: np.ndarray,
                           members: Sequence[str], n_boot: int) -> dict[str, dict[str, Any]]:
    """Ensemble minus each member, film by film (paired bootstrap CI), on the balanced and the mixed NIH films:
    ``{member: {group: {"difference", "ci", "n_films"}}}``."""
    from chestxray.compare import paired_difference
    from chestxray.sources import MIXED_GROUP

    rows = {HEADLINE_GROUP: in_cohorts(films, [HEADLINE_GROUP]), MIXED_GROUP: films["source"].to_numpy() == MIXED_GROUP}
    out: dict[str, dict[str, Any]] = {}
    for i, m in enumerate(members):
        out[m] = {}
        for g, r in rows.items():
            if r.any():
                d = paired_difference(Y[r], Pm[i][r], P[r], n_boot=n_boot)
                out[m][g] = {"difference": round(d["difference"], 4), "ci": [round(x, 4) for x in d["ci"]],
                             "n_films": int(r.sum())}
    return out


def build_cv_ensemble(members: Sequence[str], name: str, *, dest_root: str | os.PathLike | None = None,
                      data_root: str | os.PathLike | None = None, n_boot: int = 1000, timing_runs: int = 15,
                      timing_threads: Sequence[int] = (1,), manifest: pd.DataFrame | None = None) -> Path:
    """Writes ``<dest_root>/<name>`` (default: the weights folder): see the module docstring.

    Args:
        members: cross-validated models (``models.yaml`` entries or shipped folders); the first one's input gate
            is used.
        name: the folder's name (and the model's name in ``models.yaml``).
        n_boot: bootstrap resamples for the CIs.
        timing_runs: runs of the CPU cost per film (0: not measured); ``timing_threads``: torch thread counts.
        manifest: the films and their targets, for members whose recipe read its own label file (``csv``)
            rather than the shared data's named sources (default: those sources under ``data_root``).
    """
    from chestxray.ensemble_card import write_ensemble_card
    from chestxray.release import release_metrics

    if len(set(members)) != len(members) or len(members) < 2:
        raise ValueError(f"an ensemble needs two or more distinct members, got {', '.join(members)}")
    data_root = str(data_root or default_data_root())
    preds = [Predictor.load(member_folder(m), device="cpu") for m in members]
    protocol = agreed("cross-validation folds (fold count, seed, sources, source caps)",
                      [fold_protocol(p) for p in preds])
    trainings = [p.ckpt.meta.training or Training() for p in preds]
    rule = agreed("threshold rule", [t.threshold_rule or "youden" for t in trainings])
    val_sources = agreed("films their thresholds were fitted on (val_sources)", [t.val_sources for t in trainings])
    label_set = agreed("label sets", [p.ckpt.meta.label_set for p in preds])
    labels = agreed("labels", [list(p.labels) for p in preds])

    films, Pm = out_of_fold_films(preds, data_root, protocol["sources"], manifest)
    P = mean_probabilities(Pm).astype(np.float64)
    Y = films[labels].to_numpy(np.float64)
    fit = in_cohorts(films, val_sources) if val_sources else np.ones(len(films), dtype=bool)
    thresholds = {k: round(float(choose_threshold(Y[fit, i], P[fit, i], rule)), 6) for i, k in enumerate(labels)}
    sizes = {m: p.preprocess.input_size[-1] for m, p in zip(members, preds)}
    folds = int(protocol["folds"])
    meta = CkptMeta(label_set=label_set, thresholds=thresholds,
                    ensemble=Ensemble(members=list(members), gate=members[0],
                                      img_size=next(iter(sizes.values())) if len(set(sizes.values())) == 1 else None,
                                      extra={"input_sizes": sizes}),
                    training=Training(threshold_rule=rule, val_sources=val_sources, sources=protocol["sources"],
                                      val_mean_auroc=round(mean_auroc(Y[fit], P[fit]), 4),
                                      val_mean_auroc_ci=[round(float(x), 4)
                                                         for x in bootstrap_mean_auroc_ci(Y[fit], P[fit], n_boot)],
                                      split="all",  # as its members: no shared film is held out
                                      trained_on=f"every member: every labelled film of the sources; estimate: "
                                                 f"{folds}-fold cross-validation on shared folds, out of fold"))
    dest, tmp, ensemble = stage_ensemble(dest_root, name, labels, meta, preds)

    metrics = evaluate_manifest(ensemble, films, tmp, n_boot=n_boot, progress=False, probs=P.astype(np.float32),
                                plot_group=HEADLINE_GROUP,
                                title=f"{name}: ROC, {folds}-fold cross-validation, out of fold ({HEADLINE_GROUP})")
    compared = {name: figures(metrics)}
    for i, (m, p) in enumerate(zip(members, preds)):
        compared[m] = member_figures(p, films, Pm[i], n_boot)
    paired = paired_against_members(films, Y, Pm, P, members, n_boot)
    film = Path(data_root) / TIMING_FILM
    timing = (cpu_cost({members[0]: preds[0], name: ensemble}, film, threads=timing_threads, runs=timing_runs)
              if timing_runs and film.is_file() else {})
    cv = {"folds": folds, "n_films": len(films), "seed": protocol["seed"]}
    metrics.update(members=compared, paired_against_members=paired, cpu_ms_per_film=timing, cross_validation=cv,
                   thresholds_chosen_on={"rule": rule, "n_images": int(fit.sum()), "films": val_sources,
                                         "probabilities": "out of fold"})
    to_json(metrics, tmp / "metrics.json")
    meta.metrics = release_metrics(metrics, HEADLINE_GROUP, {}, {})
    meta.metrics.split = "out-of-fold"
    meta.metrics.extra["cross_validation"] = cv
    cfg = {"label_names": labels, **meta.apply({})}
    (tmp / CONFIG_FILE).write_text(_json(cfg))
    write_ensemble_card(tmp, name=name, config=cfg, metrics=metrics, headline_group=HEADLINE_GROUP,
                        sources=protocol["sources"], cv=cv)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest
