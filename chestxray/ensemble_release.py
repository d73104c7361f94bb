"""Builds an ensemble folder with its evidence: ``chestxray ensemble --name NAME --members A B ...``.

The folder (``weights/NAME/``) holds no weights: ``config.json`` names the members
(:class:`chestxray.ckpt_config.Ensemble`) and stores the operating thresholds, chosen on the mean probability;
``metrics.json``, ``predictions.csv``, the ROC / confusion / reliability plots and ``README.md`` (the card) hold
what was measured. Which films, and why they are fair:

- **Test films**: the films that are test films in *every* member's ``splits.csv`` (the members share one
  patient split where their films overlap), so no member trained or was selected on any of them. The headline
  is NIH's label-balanced test films; the mixed NIH set and every source are reported beside it, and every
  member is evaluated on exactly the same films.
- **Thresholds**: chosen by the members' threshold rule (``spec90``) on the mean probabilities of the films that
  are validation films of every member *and* of the members' ``val_sources`` (NIH's label-balanced validation
  films), never on test films.

Everything runs on the CPU, through the product's own reader and each member's own preprocessing, so
``chestxray evaluate --model NAME --split test`` reproduces the numbers. On the test films each member's
probabilities are taken from its folder's ``predictions.csv`` (what its release wrote through the same path,
5 decimals) when it holds every test film and a fresh forward pass of a few of them agrees
(:data:`REUSE_TOLERANCE`); otherwise (or with ``reuse=False``) every test film is run again: on 2 busy cores that
is hours of the build.
"""
from __future__ import annotations

import logging
import os
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from chestxray.ckpt_config import CkptMeta, Ensemble, Training
from chestxray.ensemble import EnsemblePredictor, member_folder
from chestxray.evaluate import evaluate_manifest, has_boxes, split_films
from chestxray.imaging import read_image
from chestxray.layout import CONFIG_FILE, default_data_root, weights_dir
from chestxray.metrics import (bootstrap_mean_auroc_ci, choose_threshold, evaluate_predictions, flags_on_normal_films,
                               mean_auroc, to_json)
from chestxray.predictor import Predictor
from chestxray.sources import HEADLINE_GROUP, MIXED_GROUP

log = logging.getLogger(__name__)
#: The film the CPU cost is measured on (a 1024-px NIH film, as in the other benchmarks).
TIMING_FILM = "nih/full_res/00000100_000.png"
#: Films per forward pass, as :func:`chestxray.evaluate.predict_paths` (same batches: the same rounding).
BATCH = 16
#: Largest difference accepted between a member's shipped test probabilities (5 decimals) and a fresh forward.
REUSE_TOLERANCE = 2e-5


def agreed(what: str, values: Sequence[Any]) -> Any:
    """The one value every member has for ``what`` (e.g. the threshold rule); stops when they differ."""
    distinct = {repr(v): v for v in values}
    if len(distinct) != 1:
        raise ValueError(f"the members differ in their {what} ({', '.join(distinct)}): they cannot share thresholds")
    return next(iter(distinct.values()))


def member_probabilities(ensemble: EnsemblePredictor, paths: Sequence[str], progress: bool = False) -> np.ndarray:
    """Every member's calibrated probabilities of the films (M x N x K), in batches of :data:`BATCH`."""
    out = []
    for start in range(0, len(paths), BATCH):
        out.append(ensemble.member_probabilities([read_image(p).pixels for p in paths[start:start + BATCH]]))
        if progress:
            log.info("predicted %d / %d films", min(start + BATCH, len(paths)), len(paths))
    return np.concatenate(out, axis=1)


def mean_probabilities(member_probs: np.ndarray) -> np.ndarray:
    """The ensemble's probabilities from its members' (N x K): the same torch mean as ``EnsemblePredictor.combine``."""
    return torch.from_numpy(member_probs).mean(dim=0).numpy()


def shipped_test_probabilities(ensemble: EnsemblePredictor, test: pd.DataFrame, checks: int = 4
                               ) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Every member's test probabilities (M x N x K) from its folder's ``predictions.csv``, and how they were
    checked: a fresh forward of ``checks`` films (one per source first) must agree to :data:`REUSE_TOLERANCE`.
    None when a member's file lacks a test film or disagrees (then the films are run again)."""
    keys = pd.MultiIndex.from_arrays([test["source"], test["path"].map(os.path.basename)])
    out = []
    for m in ensemble.members:
        path = Path(m.ckpt.path) / "predictions.csv"
        if not path.is_file():
            return None, {"reused": False, "why": f"{m.name} has no predictions.csv"}
        shipped = pd.read_csv(path).drop_duplicates(["source", "image"]).set_index(["source", "image"])
        if not keys.isin(shipped.index).all():
            return None, {"reused": False, "why": f"{m.name}'s predictions.csv lacks test films"}
        out.append(shipped.loc[keys, ensemble.labels].to_numpy(np.float32))
    P = np.stack(out)
    picks = list(dict.fromkeys([*test.groupby("source").head(1).index, *range(len(test))]))[:checks]
    fresh = member_probabilities(ensemble, list(test["path"].iloc[picks]))
    diff = float(np.abs(fresh - P[:, picks]).max())
    check = {"reused": diff <= REUSE_TOLERANCE, "checked_films": len(picks), "max_abs_diff": diff}
    return (P if check["reused"] else None), check


def member_figures(predictor: Predictor, test: pd.DataFrame, probs: np.ndarray, n_boot: int) -> dict[str, Any]:
    """:func:`figures` of one member on the test films from its probabilities: the groups :func:`evaluate_manifest`
    reports (each source, and the headline cohort within NIH's 384-px films), without its plots."""
    labels, thr = predictor.labels, predictor.thresholds
    Y, P = test[labels].to_numpy(np.float64), probs.astype(np.float64)
    sources = test["source"].to_numpy().astype(str)
    rows = {g: sources == g for g in np.unique(sources)}
    if "cohort" in test.columns and (cohort := (test["cohort"] == HEADLINE_GROUP).to_numpy()).any():
        rows[HEADLINE_GROUP] = cohort
    groups = {g: {**evaluate_predictions(Y[r], P[r], labels, thr, n_boot=n_boot),
                  "flags_per_normal_film": flags_on_normal_films(Y[r], P[r], labels, thr)} for g, r in rows.items()}
    loc = predictor.ckpt.meta.metrics.localization if predictor.ckpt.meta.metrics else None
    return figures({"by_group": groups}, loc)


def in_cohorts(df: pd.DataFrame, names: Sequence[str]) -> np.ndarray:
    """Which rows are of one of ``names``, by cohort (e.g. ``reproduce_chexnet``) or by source (a boolean mask)."""
    cohort = df["cohort"] if "cohort" in df.columns else df["source"]
    return (cohort.isin(names) | df["source"].isin(names)).to_numpy()


def _in_cohorts(df: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    return df[in_cohorts(df, names)].reset_index(drop=True)


def figures(metrics: dict[str, Any], loc: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the card compares per model: each group's mean AUROC (CI, films), Pneumonia AUROC per group, findings
    flagged per normal film (mixed NIH films), the pointing game."""
    groups = metrics.get("by_group", {})
    out: dict[str, Any] = {
        "mean_auroc": {g: {"mean_auroc": m.get("mean_auroc"), "ci": m.get("mean_auroc_ci"), "n_images": m["n_images"]}
                       for g, m in groups.items()},
        "pneumonia_auroc": {g: m["labels"].get("Pneumonia", {}).get("auroc") for g, m in groups.items()},
        "flags_per_normal_film": groups.get(MIXED_GROUP, {}).get("flags_per_normal_film")}
    if loc and loc.get("n_pairs"):
        out["localization"] = {k: loc.get(k) for k in ("hit_rate", "chance", "n_pairs", "n_films")}
    return out


def cpu_cost(predictors: dict[str, Any], film: str | os.PathLike, threads: Sequence[int] = (1, 2),
             runs: int = 15) -> dict[str, Any]:
    """Milliseconds of ``analyze`` (probabilities + every label's Grad-CAM + the input gate) on one decoded film,
    per model and torch thread count: median and p95 of ``runs``, the models interleaved so that a busy stretch of
    the machine hits all of them alike."""
    xray = read_image(film)
    before = torch.get_num_threads()
    out: dict[str, Any] = {"film": Path(film).name, "size": list(xray.pixels.shape), "runs": runs, "threads": {}}
    try:
        for n in threads:
            torch.set_num_threads(n)
            times: dict[str, list[float]] = {name: [] for name in predictors}
            for p in predictors.values():  # warm-up: first-call allocations and lazy imports
                p.analyze(xray), p.analyze(xray)
            for _ in range(runs):
                for name, p in predictors.items():
                    t = time.perf_counter()
                    p.analyze(xray)
                    times[name].append((time.perf_counter() - t) * 1e3)
            out["threads"][str(n)] = {name: {"median_ms": round(statistics.median(ts), 1),
                                             "p95_ms": round(float(np.percentile(ts, 95)), 1)}
                                      for name, ts in times.items()}
    finally:
        torch.set_num_threads(before)
    out["load_average"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return out


def stage_ensemble(dest_root: str | os.PathLike | None, name: str, labels: Sequence[str], meta: CkptMeta,
                   preds: Sequence[Predictor]) -> tuple[Path, Path, EnsemblePredictor]:
    """The folder's final path, a fresh staging folder beside it holding ``config.json`` (renamed into place once
    every file is written, so a failed build leaves the shipped folder as it was) and the ensemble over it."""
    dest = Path(dest_root or weights_dir()) / name
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / CONFIG_FILE).write_text(_json({"label_names": list(labels), **meta.apply({})}))
    return dest, tmp, EnsemblePredictor.from_folder(tmp, preds)


def build_ensemble(members: Sequence[str], name: str, *, dest_root: str | os.PathLike | None = None,
                   data_root: str | os.PathLike | None = None, n_boot: int = 1000, localize: bool = True,
                   timing_runs: int = 15, timing_threads: Sequence[int] = (1,), reuse: bool = True,
                   progress: bool = False) -> Path:
    """Writes ``<dest_root>/<name>`` (default: the weights folder): see the module docstring.

    Args:
        members: model names (``models.yaml`` entries or shipped folders); the first one's input gate is used.
        name: the folder's name (and the model's name in ``models.yaml``).
        n_boot: bootstrap resamples for the CIs.
        localize: also play the pointing game on the boxed NIH films no member trained on.
        timing_runs: runs of the CPU cost per film (0: not measured).
        reuse: take the members' test probabilities from their ``predictions.csv`` when a fresh forward of a
            few films agrees (see the module docstring); False: run every test film again.
        timing_threads: torch thread counts it is measured with (1, as the app runs each request; on a machine
            whose other core is busy two threads collapse several-fold: ``benchmarks.bench_ensemble`` shows both).
    """
    from chestxray.data import load_sources
    from chestxray.ensemble_card import write_ensemble_card
    from chestxray.localization import held_out_pointing_game
    from chestxray.release import headline_group, release_metrics

    if len(set(members)) != len(members) or len(members) < 2:
        raise ValueError(f"an ensemble needs two or more distinct members, got {', '.join(members)}")
    data_root = str(data_root or default_data_root())
    preds = [Predictor.load(member_folder(m), device="cpu") for m in members]  # CPU: as `evaluate` reproduces it
    trainings = [p.ckpt.meta.training or Training() for p in preds]
    rule = agreed("threshold rule", [t.threshold_rule or "youden" for t in trainings])
    val_sources = agreed("validation films (val_sources)", [t.val_sources for t in trainings])
    label_set = agreed("label sets", [p.ckpt.meta.label_set for p in preds])
    sources = sorted(set().union(*(t.sources for t in trainings)))
    labels = list(preds[0].labels)

    manifest = load_sources(sources, data_root, labels, missing="drop")
    draft = EnsemblePredictor(preds)  # thresholds 0.5 until chosen
    test = split_films(draft, manifest, "test").reset_index(drop=True)
    val_all = split_films(draft, manifest, "val").reset_index(drop=True)
    val = _in_cohorts(val_all, val_sources) if isinstance(val_sources, list) and val_sources else val_all
    if val.empty:
        raise ValueError(f"no film is a validation film of every member and of {val_sources}")

    # Thresholds on the mean probabilities of the validation films that chose the members' thresholds.
    Yv = val[labels].to_numpy(np.float64)
    Pv = mean_probabilities(member_probabilities(draft, list(val["path"]), progress)).astype(np.float64)
    thresholds = {k: round(float(choose_threshold(Yv[:, i], Pv[:, i], rule)), 6) for i, k in enumerate(labels)}
    val_ci = [round(float(x), 4) for x in bootstrap_mean_auroc_ci(Yv, Pv, n_boot)]
    sizes = {p.preprocess.input_size[-1] for p in preds}
    meta = CkptMeta(label_set=label_set, thresholds=thresholds,
                    ensemble=Ensemble(members=list(members), gate=members[0],
                                      img_size=sizes.pop() if len(sizes) == 1 else None),
                    training=Training(threshold_rule=rule, val_sources=val_sources, sources=sources,
                                      val_mean_auroc=round(mean_auroc(Yv, Pv), 4), val_mean_auroc_ci=val_ci,
                                      split="patient"))  # the films counted are in metrics
    dest, tmp, ensemble = stage_ensemble(dest_root, name, labels, meta, preds)

    # The test films: the ensemble, then every member on the very same films.
    Pm, reuse_check = shipped_test_probabilities(ensemble, test) if reuse else (None, {"reused": False})
    if Pm is None:
        log.info("running every test film through the members (%s)", reuse_check)
        Pm = member_probabilities(ensemble, list(test["path"]), progress)
    loc = held_out_pointing_game(ensemble, data_root) if localize and has_boxes(data_root) else {}
    headline = headline_group(test)
    metrics = evaluate_manifest(ensemble, test, tmp, n_boot=n_boot, progress=progress, probs=mean_probabilities(Pm),
                                plot_group=headline, localization=loc,
                                title=f"{name}: ROC on the test films of every member ({headline})")
    compared = {name: figures(metrics, loc)}
    for i, (m, p) in enumerate(zip(members, preds)):
        compared[m] = member_figures(p, test, Pm[i], n_boot)
    film = Path(data_root) / TIMING_FILM
    timing = (cpu_cost({members[0]: preds[0], name: ensemble}, film, threads=timing_threads, runs=timing_runs)
              if timing_runs else {})
    metrics.update(members=compared, cpu_ms_per_film=timing, test_probabilities=reuse_check,
                   thresholds_chosen_on={"rule": rule, "n_images": len(val), "films": val_sources})
    to_json(metrics, tmp / "metrics.json")
    meta.metrics = release_metrics(metrics, headline, {}, loc)
    cfg = {"label_names": labels, **meta.apply({})}
    (tmp / CONFIG_FILE).write_text(_json(cfg))
    write_ensemble_card(tmp, name=name, config=cfg, metrics=metrics, headline_group=headline, sources=sources)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2) + "\n"
