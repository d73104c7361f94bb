"""``chestxray cv``: patient-wise k-fold cross-validation of a training recipe, resumable fold by fold.

Every labelled film is held out exactly once. Fold ``i`` is an ordinary training run
(:class:`~chestxray.training.TrainConfig` with ``folds=k, fold=i``): its patients are that run's
validation split and the other folds train. The schedule is fixed (``select="last"``: the final epoch
is the model, no early stopping), so nothing is chosen on the held-out films; their per-epoch AUROC
is logged as a learning curve only. The held-out films are then predicted through the product's own
path (:func:`chestxray.evaluate.predict_paths`: ``read_image`` + the checkpoint's preprocessing) and
pooled. The pooled out-of-fold predictions are evaluated like ``chestxray evaluate`` does (headline on
the label-balanced NIH films with a bootstrap CI, mixed and per-source figures, calibration, the
pointing game on each fold's held-out boxed films). Operating thresholds (on the recipe's
``val_sources`` films), temperatures (on every film) and prior shifts to NIH's adult prevalence (on the NIH
films) are fitted on the out-of-fold predictions:
what an all-data model trained with the same recipe ships (:mod:`chestxray.release_cv`).

Layout of ``<out>``::

    fold<i>/            the fold's training run (best/, log.csv, manifest.csv with a ``fold`` column), DONE
    fold<i>/oof.csv     its held-out films' logits (image path + one column per label)
    fold<i>/pointing.json  the pointing-game pairs on its held-out boxed films
    eval/               metrics.json, predictions.csv, roc.png, confusion.png, reliability.png (pooled)
    cv.json             per-fold figures, the fitted thresholds and temperatures, the recipe

A killed run resumes where it stopped: a fold without DONE continues from its last epoch, a fold with
DONE but no ``oof.csv`` is predicted, and the pooled evaluation is redone from the files.

A cross-validation outlasts one machine through its *record* (``--record DIR``, e.g. ``results/cv/<name>``,
committed as folds land): each finished fold's small files (:data:`RECORD_FILES`: DONE, log, oof.csv,
pointing.json and the fold model's config.json; no weights) and, once pooled, cv.json with the pooled
metrics and plots. A fold found in the record is not trained again, and the pooled evaluation needs no
fold's weights (its logits are in ``oof.csv``). A record is never overwritten: a fold here that is another
training of a recorded one (other held-out logits) stops the run before anything is trained or pooled.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from chestxray.labels import NO_FINDING
from chestxray.training import TrainConfig

log = logging.getLogger(__name__)
DEFAULT_FOLDS = 5
OOF_FILE = "oof.csv"
POINTING_FILE = "pointing.json"
SUMMARY_FILE = "cv.json"
LOGIT = "logit:"  # column prefix of the logits in oof.csv
#: A finished fold's files that the record keeps (paths under the fold's run folder): a few hundred KB, no weights.
#: DONE comes last, so a fold whose record holds DONE was copied whole.
RECORD_FILES = ("log.csv", OOF_FILE, POINTING_FILE, "best/config.json", "DONE")
#: The pooled evaluation's files that the record keeps (under ``<out>``).
RECORD_SUMMARY = (SUMMARY_FILE, "eval/metrics.json", "eval/roc.png", "eval/reliability.png", "eval/confusion.png")


def fold_config(cfg: TrainConfig, folds: int, fold: int, out: str | os.PathLike) -> TrainConfig:
    """Fold ``fold``'s training run: the recipe with ``folds``/``fold`` set, a fixed schedule, resumable; with
    ``teacher_cv``, taught by that cross-validation's fold-``fold`` model (which never trained on this fold's
    held-out patients: :func:`chestxray.data.folds_from_cv` keeps its folds)."""
    teacher = [str(Path(cfg.teacher_cv) / f"fold{fold}" / "best")] if cfg.teacher_cv else list(cfg.teacher)
    return dataclasses.replace(cfg, folds=folds, fold=fold, select="last", resume=True, teacher=teacher,
                               out=str(Path(out) / f"fold{fold}"), push_to_hub=None)


def run_fold(cfg: TrainConfig, folds: int, fold: int, out: str | os.PathLike) -> Path:
    """Trains fold ``fold`` unless its DONE marker exists; returns the fold's run folder."""
    fcfg = fold_config(cfg, folds, fold, out)
    run = Path(fcfg.out)
    if not (run / "DONE").exists():
        from chestxray.training import train

        if cfg.teacher_cv and not (Path(fcfg.teacher[0]) / "model.safetensors").is_file():
            raise ValueError(f"teacher_cv: {fcfg.teacher[0]} holds no weights (a fold restored from a record has "
                             "none): train that cross-validation's folds on this machine first")

        t0 = time.perf_counter()
        train(fcfg)
        n_train = int(pd.read_csv(run / "manifest.csv", usecols=["split"])["split"].eq("train").sum())
        (run / "DONE").write_text(json.dumps({"seconds": round(time.perf_counter() - t0, 1), "n_train": n_train}))
    return run


def _copy(names: Sequence[str], src: Path, dst: Path) -> None:
    for name in names:
        if (src / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, dst / name)


def keep_fold(run: Path, record: Path) -> None:
    """Copies a finished fold's :data:`RECORD_FILES` into ``record/<fold>``, which it never overwrites."""
    if not same_as_record(run, record):
        _copy(RECORD_FILES, run, record / run.name)


def same_as_record(run: Path, record: Path) -> bool:
    """Whether ``record/<fold>`` holds this finished fold already (False: not recorded yet).

    Raises:
        ValueError: the record holds another training of the fold (other held-out logits), e.g. a teacher's
            fold retrained for its weights: pooling it would silently change the recorded figures.
    """
    kept = record / run.name
    if not ((kept / "DONE").is_file() and (kept / OOF_FILE).is_file() and (run / OOF_FILE).is_file()):
        return False
    if (kept / OOF_FILE).read_bytes() != (run / OOF_FILE).read_bytes():
        raise ValueError(f"{run} is another training of the fold recorded in {kept} (its {OOF_FILE} differs): "
                         f"move {run} away to pool the record, or the record's fold to record this one")
    return True


def restore_fold(run: Path, record: Path) -> bool:
    """Brings a fold finished on another machine back from ``record/<fold>`` (DONE and ``oof.csv`` there, no
    DONE here); returns whether it did. Its weights stay behind: nothing after training needs them."""
    kept = record / run.name
    if (run / "DONE").exists() or not ((kept / "DONE").is_file() and (kept / OOF_FILE).is_file()):
        return False
    _copy(RECORD_FILES, kept, run)
    return True


def held_out(run: Path) -> pd.DataFrame:
    """The fold's held-out films (its manifest's validation split)."""
    df = pd.read_csv(run / "manifest.csv")
    return df[df["split"] == "val"].reset_index(drop=True)


def fold_logits(run: Path, data_root: str | os.PathLike, progress: bool = True) -> pd.DataFrame:
    """The fold's held-out films with their targets and logits (``oof.csv``; computed once, then read).

    The file stands alone (image path relative to ``data_root``, source, cohort, patient, fold, the targets
    under the label names and the logits as ``logit:<label>``), so the pooled evaluation needs neither the
    fold's checkpoint nor its manifest.
    """
    path = run / OOF_FILE
    if path.is_file():
        return pd.read_csv(path)
    from chestxray.evaluate import predict_paths
    from chestxray.predictor import Predictor

    films = held_out(run)
    predictor = Predictor.load(str(run / "best"), device="cpu")
    z, _ = predict_paths(predictor, list(films["path"]), progress=progress, logits=True)
    root = Path(data_root).resolve()
    out = pd.DataFrame({"image": [Path(p).resolve().relative_to(root).as_posix() for p in films["path"]],
                        "source": films["source"], "cohort": films["cohort"], "patient": films["patient"],
                        "fold": films["fold"]})
    for i, k in enumerate(predictor.labels):
        out[k] = films[k]
    for i, k in enumerate(predictor.labels):
        out[LOGIT + k] = z[:, i]
    tmp = path.with_suffix(".tmp")
    out.to_csv(tmp, index=False, float_format="%.6g")
    tmp.rename(path)  # written whole or not at all: a killed run predicts the fold again
    # Read back, not ``out``: the pooled figures must come from the file's rounded logits whether the fold was
    # predicted in this process or restored from a record, or a re-pooling would not reproduce them.
    return pd.read_csv(path)


def fold_pointing(run: Path, data_root: str | os.PathLike, folder: str = "nih/images_384") -> list[dict[str, Any]]:
    """Pointing-game pairs of the fold's final model on its held-out boxed films (``pointing.json``)."""
    path = run / POINTING_FILE
    if path.is_file():
        return json.loads(path.read_text())
    from chestxray.localization import load_boxes, pointing_game
    from chestxray.predictor import Predictor

    keep = set(held_out(run)["path"].map(os.path.basename))
    images = Path(data_root) / folder
    exclude = set(os.listdir(images)) - keep  # only this fold's held-out films count here
    result = pointing_game(Predictor.load(str(run / "best"), device="cpu"), load_boxes(data_root), images,
                           exclude=exclude)
    path.write_text(json.dumps(result["pairs"]))
    return result["pairs"]


def fit_on_oof(df: pd.DataFrame, Y: np.ndarray, Z: np.ndarray, labels: list[str], select_rows: np.ndarray,
               rule: str, data_root: str | os.PathLike, fitted_on: str):
    """Operating thresholds (raw ``sigmoid(logit)`` scale, rule ``rule``, on ``select_rows``) and the calibration
    (temperatures on every film, prior shifts to NIH's adult prevalence on the NIH films: the same fit as a
    release's, :func:`chestxray.release.calibration_from_logits`) fitted on pooled out-of-fold logits."""
    from chestxray.calibration import sigmoid
    from chestxray.metrics import choose_threshold
    from chestxray.release import calibration_from_logits, reference_prevalence
    from chestxray.sources import collection_of

    P = sigmoid(Z)
    thresholds = {k: round(float(choose_threshold(Y[select_rows, i], P[select_rows, i], rule)), 6)
                  for i, k in enumerate(labels)}
    nih = df["source"].map(collection_of).eq("nih").to_numpy()
    return thresholds, calibration_from_logits(Y, Z, labels, nih, fitted_on, reference_prevalence(data_root, labels))


def oof_predictor(run: Path, thresholds: dict[str, float], calibration):
    """Fold ``run``'s loaded model carrying the out-of-fold thresholds and calibration: it stands for the
    recipe's labels, thresholds and probability scale when the pooled predictions are evaluated."""
    from chestxray.checkpoint import load_folder
    from chestxray.predictor import Predictor

    # the logits are given: only the config is needed (a fold restored from its record has no weights)
    base = Predictor(load_folder(run / "best", device="cpu", weights=False), device="cpu")
    meta = copy.deepcopy(base.ckpt.meta)
    meta.calibration = calibration
    ckpt = dataclasses.replace(base.ckpt, thresholds=dict(thresholds), meta=meta)
    return Predictor(ckpt, device="cpu")


def _log_rows(run: Path) -> list[dict[str, Any]]:
    path = run / "log.csv"
    return pd.read_csv(path).to_dict("records") if path.is_file() else []


def summarize(cfg: TrainConfig, folds: int, out: str | os.PathLike, *, localize: bool = True,
              progress: bool = True) -> dict[str, Any]:
    """Pools the folds' held-out predictions, fits thresholds and temperatures on them and evaluates.

    Returns the ``cv.json`` summary (also written), with the pooled metrics' headline figures.
    """
    from chestxray.calibration import sigmoid
    from chestxray.evaluate import evaluate_manifest, has_boxes
    from chestxray.localization import pairs_result
    from chestxray.metrics import bootstrap_mean_auroc_ci, mean_auroc
    from chestxray.sources import HEADLINE_GROUP, MIXED_GROUP

    out = Path(out)
    runs = [out / f"fold{i}" for i in range(folds)]
    frames, pairs, per_fold = [], [], []
    for i, run in enumerate(runs):
        films = fold_logits(run, cfg.data_root, progress=progress)
        labels = [c[len(LOGIT):] for c in films.columns if c.startswith(LOGIT)]
        frames.append(films)
        if localize and ((run / POINTING_FILE).is_file() or has_boxes(cfg.data_root)):
            pairs += fold_pointing(run, cfg.data_root)
        rows = _log_rows(run)
        done = json.loads((run / "DONE").read_text() or "{}")
        bal = (films["cohort"] == HEADLINE_GROUP).to_numpy()
        Yf, Zf = films[labels].to_numpy(np.float64), films[[LOGIT + k for k in labels]].to_numpy(np.float64)
        per_fold.append({
            "fold": i, "n_train": done.get("n_train"), "n_held_out": len(films), "n_balanced": int(bal.sum()),
            "balanced_mean_auroc": _round(mean_auroc(Yf[bal], sigmoid(Zf[bal]))),
            "epochs": len(rows), "train_seconds": done.get("seconds"),
            # The learning curve on the held-out films: shown, never used to choose anything.
            "val_curve": [_round(r.get("val_mean_auroc")) for r in rows],
            "best_epoch_on_held_out": (int(max(rows, key=lambda r: r["val_mean_auroc"])["epoch"]) if rows else None)})
    df = pd.concat(frames, ignore_index=True)
    Z = df[[LOGIT + k for k in labels]].to_numpy(np.float64)
    ok = ~np.isnan(Z).any(axis=1)
    df, Z = df[ok].reset_index(drop=True), Z[ok]
    df["path"] = [str(Path(cfg.data_root) / p) for p in df["image"]]
    Y = df[labels].to_numpy(np.float64)
    select = np.ones(len(df), dtype=bool)
    if cfg.val_sources:
        select = (df["source"].isin(cfg.val_sources) | df["cohort"].isin(cfg.val_sources)).to_numpy()
    fitted_on = f"out-of-fold predictions of {folds}-fold cross-validation, all sources ({len(df)} films)"
    thresholds, calibration = fit_on_oof(df, Y, Z, labels, select, cfg.threshold_rule, cfg.data_root, fitted_on)
    predictor = oof_predictor(runs[0], thresholds, calibration)
    loc = pairs_result(pairs) if pairs else None
    name = Path(cfg.out).name
    metrics = evaluate_manifest(predictor, df, out / "eval", n_boot=cfg.eval_boot, progress=progress, logits=Z,
                                plot_group=HEADLINE_GROUP, localization=loc,
                                title=f"{name}: ROC, {folds}-fold cross-validation, out of fold ({HEADLINE_GROUP})")
    groups = metrics["by_group"]
    # The headline averages No Finding in; CheXNet's 0.841 (and the goals of issue 21) are over the findings
    # alone: the same calibrated probabilities as the headline, without the No Finding column.
    bal, k = (df["cohort"] == HEADLINE_GROUP).to_numpy(), [j for j, n in enumerate(labels) if n != NO_FINDING]
    P = predictor.probabilities(torch.from_numpy(Z.astype(np.float32))).numpy().astype(np.float64)
    Yb, Pb = Y[bal][:, k], P[bal][:, k]
    findings = {"group": HEADLINE_GROUP, "labels": len(k), "mean_auroc": _round(mean_auroc(Yb, Pb)),
                "mean_auroc_ci": [_round(x) for x in bootstrap_mean_auroc_ci(Yb, Pb, cfg.eval_boot or 1000)]}
    summary = {
        "recipe": cfg.recipe_file, "arch": cfg.arch, "img_size": cfg.img_size, "epochs": cfg.epochs,
        "folds": folds, "seed": cfg.seed, "n_films": len(df), "sources": sorted(df["source"].unique().tolist()),
        "headline_group": HEADLINE_GROUP, "mixed_group": MIXED_GROUP,
        "mean_auroc": {g: _round(m["mean_auroc"]) for g, m in groups.items()},
        "mean_auroc_ci": {g: m["mean_auroc_ci"] for g, m in groups.items()},
        "n_images": {g: m["n_images"] for g, m in groups.items()},
        "findings_mean_auroc": findings,
        "pneumonia_auroc": {g: _round(m["labels"].get("Pneumonia", {}).get("auroc")) for g, m in groups.items()},
        "localization": ({k: loc[k] for k in ("n_pairs", "n_films", "hit_rate", "chance", "iou_hit_rate")}
                         if loc else None),
        "threshold_rule": cfg.threshold_rule, "thresholds_fitted_on": list(cfg.val_sources) or "all",
        "thresholds": thresholds, "temperatures": calibration.temperatures if calibration else {},
        "temperatures_fitted_on": fitted_on, "shifts": calibration.shifts if calibration else {},
        "shift_fitted_on": calibration.shift_fitted_on if calibration else None,
        "calibration": calibration.to_dict() if calibration else None,  # what the all-data release ships
        "per_fold": per_fold, "config": dataclasses.asdict(cfg),
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=_jsonable))
    return summary


def _round(x: Any, nd: int = 4) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), nd)


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    raise TypeError(type(x).__name__)


def run_cv(cfg: TrainConfig, folds: int = DEFAULT_FOLDS, only_fold: int | None = None, localize: bool = True,
           progress: bool = True, record: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """Trains the folds not yet done (or only ``only_fold``), then, once all are done, pools and evaluates.

    With ``record``, folds finished there are restored instead of trained, and each fold finished here, and
    the pooled evaluation, are kept there (see the module's docstring).
    """
    from chestxray.evaluate import has_boxes

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    record = Path(record) if record else None
    for i in range(folds):
        if record and restore_fold(out / f"fold{i}", record):
            log.info("fold %d restored from %s", i, record)
        elif record and (out / f"fold{i}" / "DONE").exists():
            same_as_record(out / f"fold{i}", record)  # before any training: a differing fold stops the run
    for i in ([only_fold] if only_fold is not None else range(folds)):
        run = run_fold(cfg, folds, i, out)
        fold_logits(run, cfg.data_root, progress=progress)
        if localize and has_boxes(cfg.data_root):
            fold_pointing(run, cfg.data_root)
        if record:
            keep_fold(run, record)
    if not all((out / f"fold{i}" / "DONE").exists() for i in range(folds)):
        log.info("folds still to train: %s", [i for i in range(folds) if not (out / f"fold{i}" / "DONE").exists()])
        return None
    summary = summarize(cfg, folds, out, localize=localize, progress=progress)
    if record:
        _copy(RECORD_SUMMARY, out, record)
    return summary


EPILOG = """examples:
  chestxray cv --config train/configs/cv/efficientnet_lite0.yaml            # all folds, then the pooled evaluation
  chestxray cv --config train/configs/cv/efficientnet_lite0.yaml --only-fold 2   # one fold (e.g. on another machine)"""


def build_parser() -> argparse.ArgumentParser:
    """``chestxray cv``'s flags: every ``train`` flag (``--out`` is the cross-validation folder) plus the fold options."""
    from chestxray.train_cli import _bool, build_parser as train_parser

    p = train_parser("chestxray cv")
    p.description = ("Patient-wise k-fold cross-validation of a training recipe: each fold trains on the other "
                     "folds for a fixed schedule, its held-out films are predicted, and the pooled out-of-fold "
                     "predictions are evaluated. Resumable: run it again to continue.")
    p.epilog = EPILOG
    p.add_argument("--only-fold", type=int, default=None, metavar="I", help="train and predict only fold I")
    p.add_argument("--record", default=None, metavar="DIR",
                   help="keep each finished fold's small files (no weights) and the pooled evaluation here, and "
                        "restore folds finished there instead of training them (e.g. results/cv/NAME, committed)")
    p.add_argument("--localize", type=_bool, default=True, metavar="BOOL",
                   help="pointing game on each fold's held-out boxed films (default true)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``chestxray cv``: trains the folds left, then pools and evaluates; returns the exit code."""
    from chestxray.train_cli import config_from_args

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args, exclude=("only_fold", "localize", "record"))
        folds = cfg.folds or DEFAULT_FOLDS
        if args.only_fold is not None and not 0 <= args.only_fold < folds:
            raise ValueError(f"--only-fold {args.only_fold} is not among the {folds} folds")
    except (ValueError, OSError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    try:
        summary = run_cv(cfg, folds, args.only_fold, localize=args.localize, record=args.record)
    except ValueError as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    if summary is None:
        print("folds left to train: run the same command again")
        return 0
    h, m = summary["headline_group"], summary["mixed_group"]
    print(f"out-of-fold mean AUROC: {h} {summary['mean_auroc'].get(h)} {summary['mean_auroc_ci'].get(h)}, "
          f"{m} {summary['mean_auroc'].get(m)}; the {summary['findings_mean_auroc']['labels']} findings alone ({h}) "
          f"{summary['findings_mean_auroc']['mean_auroc']} {summary['findings_mean_auroc']['mean_auroc_ci']}; "
          f"{Path(cfg.out) / SUMMARY_FILE}")
    return 0
