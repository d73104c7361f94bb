"""Release all-data weights with their recipe's cross-validated figures (``release RUN --cv CV_DIR``).

A recipe is first cross-validated (``chestxray cv``: every labelled film predicted once by a fold model
that never trained on its patient), then trained once more on every film (``split: all``, the same fixed
schedule). No shared film is left to test those weights, so the released folder carries the pooled
out-of-fold figures as its estimate, and the thresholds, temperatures and prior shifts fitted on the
out-of-fold predictions (``cv.json``). The run must be the cross-validated recipe (checked key by key).

The folder is otherwise a release's: ``config.json``, float16 ``model.safetensors`` (checked against the
float32 weights on NIH films), ``splits.csv`` (every film ``train``), the input gate, the cross-validation's
``metrics.json``, ``predictions.csv`` (out of fold) and plots, and a card that says all of this.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from chestxray.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_folder, own_provenance, weights_dir
from chestxray.ckpt_config import Calibration, CkptMeta, Training

#: TrainConfig keys that may differ between the cross-validated recipe and its all-data run: where the
#: run goes and how it is split, never what it learns.
SPLIT_KEYS = frozenset({"folds", "fold", "split", "select", "out", "resume", "recipe_file", "push_to_hub", "workers",
                        "device", "cache_dir", "data_root", "eval_boot", "val_frac", "test_frac", "cohort_fracs",
                        "patience", "split_from", "train_list", "val_list", "test_list"})
#: How many NIH films the float16 weights are checked on (the same files for both, through the product path).
HALF_CHECK_FILMS = 200
EVAL_FILES = ("metrics.json", "predictions.csv", "roc.png", "confusion.png", "reliability.png")


def recipe_differences(run_cfg: dict[str, Any], cv_cfg: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (all-data run's value, cross-validation's value)}`` for every learning key that differs."""
    keys = (set(run_cfg) | set(cv_cfg)) - SPLIT_KEYS
    return {k: (run_cfg.get(k), cv_cfg.get(k)) for k in sorted(keys) if run_cfg.get(k) != cv_cfg.get(k)}


def read_cv(cv_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """The cross-validation's summary (``cv.json``) and pooled metrics (``eval/metrics.json``)."""
    cv_dir = Path(cv_dir)
    path = cv_dir / "cv.json"
    if not path.is_file():
        raise ValueError(f"{cv_dir}: no cv.json: run chestxray cv to the end first (all folds, then the pooling)")
    summary = json.loads(path.read_text())
    if not summary.get("calibration") and summary.get("temperatures"):
        raise ValueError(f"{path}: written by an older chestxray cv (no calibration block): run chestxray cv again")
    return summary, json.loads((cv_dir / "eval" / "metrics.json").read_text())


def gate_fold(cv_dir: str | os.PathLike) -> tuple[int, Path]:
    """The first fold whose run folder still holds its ``manifest.csv`` and that manifest, for the input gate
    (train on its training films, calibrate on its held-out ones). A fold restored from ``results/cv`` has
    no manifest (the record keeps small files only), so the fold trained on this machine is used instead."""
    runs = sorted(Path(cv_dir).glob("fold*/manifest.csv"), key=lambda p: int(p.parent.name[4:] or 0))
    if not runs:
        raise ValueError(f"{cv_dir}: no fold holds its manifest.csv (all were restored from a record); run one "
                         "fold here (chestxray cv --only-fold 0 after removing its DONE) or pass fit_gate=False")
    return int(runs[0].parent.name[4:]), runs[0]


def half_check(best: Path, half: Path, films: list[str]) -> dict[str, Any]:
    """Largest probability difference of the float16 weights to the float32 ones on ``films`` (no AUROC: the
    weights trained on these films), and the two files' sizes."""
    from chestxray.evaluate import predict_paths
    from chestxray.predictor import Predictor

    p16, _ = predict_paths(Predictor(load_folder(half), device="cpu"), films, progress=False)
    p32, _ = predict_paths(Predictor(load_folder(best), device="cpu"), films, progress=False)
    return {"max_abs_prob_diff": float(np.nanmax(np.abs(p32 - p16))), "n_films": len(films),
            "size_fp32_mb": round((best / WEIGHTS_FILE).stat().st_size / 2**20, 2),
            "size_fp16_mb": round((half / WEIGHTS_FILE).stat().st_size / 2**20, 2)}


def release_from_cv(run_dir: str | os.PathLike, cv_dir: str | os.PathLike, name: str, *,
                    dest_root: str | os.PathLike | None = None, data_root: str | None = None, fit_gate: bool = True,
                    repo_id: str | None = None) -> Path:
    """Builds ``<dest_root>/<name>`` from an all-data run and its recipe's cross-validation (module docstring)."""
    from chestxray.gate import GATE_FILE
    from chestxray.gate_fit import fit_from_folder, format_rows
    from chestxray.modelcard import write_model_card
    from chestxray.plots import plot_training_curves
    from chestxray.recipes import upgrade_run_config
    from chestxray.release import release_metrics, stage_folder
    from chestxray.sources import HEADLINE_GROUP, MIXED_GROUP, collection_of

    run, cv_dir = Path(run_dir), Path(cv_dir)
    best = run / "best"
    train_cfg = upgrade_run_config(json.loads((run / "train_config.json").read_text()))
    summary, metrics = read_cv(cv_dir)
    if train_cfg.get("split") != "all":
        raise ValueError(f"{run} was not trained on every film (split {train_cfg.get('split')!r}, not 'all')")
    if (diff := recipe_differences(train_cfg, upgrade_run_config(summary["config"]))):
        raise ValueError(f"{run} is not the cross-validated recipe: "
                         + "; ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in diff.items()))
    folds = int(summary["folds"])
    gate = gate_fold(cv_dir) if fit_gate else None  # checked before the slow steps
    data_root = data_root or train_cfg["data_root"]
    manifest = pd.read_csv(run / "manifest.csv")
    dest = Path(dest_root or weights_dir()) / name
    tmp = stage_folder(best, manifest, dest)  # splits.csv: every film "train"
    for f in EVAL_FILES:  # the estimate: the pooled out-of-fold evaluation, as chestxray cv wrote it
        shutil.copy(cv_dir / "eval" / f, tmp / f)
    nih = manifest[manifest["source"].map(collection_of).eq("nih")]
    films = list((nih if len(nih) else manifest).sort_values("path")["path"].head(HALF_CHECK_FILMS))
    check = half_check(best, tmp, films)
    with (run / "log.csv").open() as f:  # the training loss only: there is no validation split to plot
        rows = [{"epoch": float(r["epoch"]), "train_loss": float(r["train_loss"])} for r in csv.DictReader(f)]
    plot_training_curves(rows, tmp / "training_curves.png")

    meta = CkptMeta.read(tmp)
    meta.thresholds = {k: float(v) for k, v in summary["thresholds"].items()}
    meta.calibration = Calibration.from_dict(summary["calibration"]) if summary.get("calibration") else None
    loc = metrics.get("localization") or {}
    meta.metrics = release_metrics(metrics, HEADLINE_GROUP, check, loc)
    meta.metrics.split = "out-of-fold"
    meta.metrics.extra["cross_validation"] = {
        "folds": folds, "n_films": summary["n_films"], "seed": summary["seed"],
        "per_fold_balanced_mean_auroc": [f["balanced_mean_auroc"] for f in summary["per_fold"]],
        "train_seconds": sum(f.get("train_seconds") or 0 for f in summary["per_fold"])}
    meta.training = meta.training or Training()
    meta.training.trained_on = (f"every labelled film of the sources ({int((manifest['split'] == 'train').sum())}); "
                                f"estimate: {folds}-fold cross-validation of the same recipe, out of fold")
    meta.training.threshold_rule = summary.get("threshold_rule") or meta.training.threshold_rule
    meta.training.recipe = {k: train_cfg[k] for k in
                            ("arch", "img_size", "epochs", "batch_size", "lr", "weight_decay", "schedule", "augment",
                             "drop_rate", "pos_weight_max", "source_caps", "seed", "pretrained", "split",
                             "repeat")
                            if k in train_cfg}
    cfg = meta.apply(own_provenance(json.loads((tmp / CONFIG_FILE).read_text())))
    (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))

    extra = {"Float16 weights": (
        f"The shipped weights are float16 ({check['size_fp16_mb']} MB instead of {check['size_fp32_mb']} MB). On "
        f"{check['n_films']} NIH films the largest probability difference to the float32 weights is "
        f"{check['max_abs_prob_diff']:.2e}.")}
    if fit_gate:
        # Fitted on one fold's training films and calibrated on its held-out ones: the all-data weights saw both
        # (the gate never did), so its false-alarm rates on chest films may read a little low.
        _, _, gate_rows = fit_from_folder(tmp, data_root, tmp / GATE_FILE, manifest=gate[1], print_fn=lambda s: None)
        extra["Input gate (is this a frontal chest X-ray?)"] = (
            "`gate.safetensors` holds this model's input gate (see `chestxray/gate.py`), fitted on "
            f"fold {gate[0]}'s training films and calibrated on its held-out films. These weights trained on both "
            "(the gate never did), so the false-alarm rates on shared chest films may read low; the TBX11K films "
            "and the non-chest files were never used by either:\n\n```\n" + format_rows(gate_rows) + "\n```")
    recipe = summary.get("recipe") or "<recipe>"
    extra["Reproduce"] = (
        "```bash\n"
        f"chestxray cv --config {recipe}      # the folds and this card's figures (resumable)\n"
        f"chestxray train --config {train_cfg.get('recipe_file') or '<all-data recipe>'} --resume true\n"
        f"chestxray release {run} --cv {cv_dir} --name {name}\n```")
    write_model_card(tmp, name=name, config=cfg, metrics=metrics, headline_group=HEADLINE_GROUP,
                     mixed_group=MIXED_GROUP, extra_sections=extra, repo_id=repo_id, cv={"folds": folds})
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest

