"""Release: turn a training run into a shipped checkpoint folder with measured evidence.

``python -m chestxray release runs/resnet18 --name resnet18`` writes ``weights/resnet18/`` with
``config.json`` (metrics summary and per-label temperatures added), ``model.safetensors`` (float16),
``splits.csv``, ``metrics.json``, ROC / confusion / reliability / training-curve plots and the model
card. The float16 weights are evaluated against the run's float32 ones on the same test images, and the
difference is recorded in the card. Per-label temperatures are fitted on the run's validation films
(:func:`fit_on_validation`) and the card reports calibration before and after them on the test films.

``python -m chestxray recard weights/resnet18`` (:func:`recard`) refreshes a shipped folder without its
training run: the same test films (from its ``splits.csv``), the same numbers (checked against the
ones it ships), temperatures fitted on its validation films, localization, a new card; its weights and
input gate are left byte for byte as they are.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import json
import re
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import safetensors.torch
import torch

from chestxray.calibration import fit_temperatures, nll
from chestxray.checkpoint import CONFIG_FILE, WEIGHTS_FILE, half_state, load_folder, own_provenance, weights_dir
from chestxray.ckpt_config import Calibration, CkptMeta, ReleaseMetrics, Training
from chestxray.evaluate import SPLITS_FILE, evaluate_manifest, predict_paths, select_split
from chestxray.gate import GATE_FILE
from chestxray.gate_fit import fit_from_folder, format_rows
from chestxray.localization import card_section as localization_card_section
from chestxray.localization import held_out_pointing_game
from chestxray.localization import summary as localization_summary
from chestxray.metrics import mean_auroc
from chestxray.modelcard import split_counts, write_model_card
from chestxray.plots import plot_training_curves
from chestxray.predictor import Predictor
from chestxray.prevalence import NIH_ADULTS, NIH_LABEL_FILE, fit_shifts, nih_prevalence
from chestxray.recipes import upgrade_run_config
from chestxray.sources import HEADLINE_GROUP, MIXED_GROUP, collection_of

log = logging.getLogger(__name__)
#: The headline group and the one shown beside it (see :mod:`chestxray.sources`).
HEADLINE, MIXED = HEADLINE_GROUP, MIXED_GROUP


def _half_copy(src: Path, dst: Path) -> None:
    state = half_state(safetensors.torch.load_file(str(src / WEIGHTS_FILE)))
    safetensors.torch.save_file(state, str(dst / WEIGHTS_FILE), metadata={"format": "pt"})


def stage_folder(best: Path, manifest: pd.DataFrame, dest: Path, half: bool = True) -> Path:
    """A fresh ``<dest>.tmp`` with the run's ``config.json``, its weights (float16 with ``half``) and
    ``splits.csv`` (every image's split, by file name, so ``evaluate --split test`` finds the card's films)."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy(best / CONFIG_FILE, tmp / CONFIG_FILE)
    if half:
        _half_copy(best, tmp)
    else:
        shutil.copy(best / WEIGHTS_FILE, tmp / WEIGHTS_FILE)
    pd.DataFrame({"image": manifest["path"].map(os.path.basename), "source": manifest["source"],
                  "split": manifest["split"]}).to_csv(tmp / SPLITS_FILE, index=False)
    return tmp


def validation_films(val: pd.DataFrame, meta: CkptMeta, only_val_sources: bool = False) -> tuple[pd.DataFrame, str]:
    """The validation films a checkpoint's temperatures are fitted on, and how to say which.

    By default the whole validation split (every source): one temperature per label serves every kind of
    film the model is shown, and the validation split has the test split's mix. Measured on the shipped
    efficientnet_b0: fitted on its 98 balanced NIH validation films only (its ``val_sources``), Pneumonia
    got T = 12.9 and the ECE on the pediatric and COVID-19 test films rose from 0.03/0.09 to 0.17/0.28;
    fitted on all 1259 validation films, the pooled test ECE fell from 0.080 to 0.068 with no group much
    worse. ``only_val_sources`` restricts the fit to the ``val_sources`` films (that chose the epoch and
    thresholds) when the checkpoint names them.
    """
    names = (meta.training or Training()).val_sources
    if only_val_sources and isinstance(names, list) and names:
        cohort = val["cohort"] if "cohort" in val.columns else val["source"]
        rows = (cohort.isin(names) | val["source"].isin(names)).to_numpy()
        if rows.any():
            return val[rows].reset_index(drop=True), f"validation split, {', '.join(names)}"
    sources = sorted(val["source"].unique()) if "source" in val.columns else []
    return val.reset_index(drop=True), f"validation split, all sources ({', '.join(sources)})"


def fit_on_validation(predictor: Predictor, val: pd.DataFrame, fitted_on: str = "validation split",
                      progress: bool = True, prevalence: dict[str, float] | None = None) -> Calibration | None:
    """Per-label temperatures fitted on validation films (:func:`chestxray.calibration.fit_temperatures`, on the
    raw logits) and, with reference ``prevalence``, prior shifts fitted on the validation films of NIH
    (:func:`chestxray.prevalence.fit_shifts`); None when no label can be fitted (e.g. no validation films)."""
    if val.empty:
        return None
    for k in predictor.labels:
        if k not in val.columns:
            val = val.assign(**{k: np.nan})
    logits, _ = predict_paths(predictor, list(val["path"]), progress=progress, logits=True)
    ok = ~np.isnan(logits).any(axis=1)
    Y, Z = val[predictor.labels].to_numpy(np.float64)[ok], logits[ok].astype(np.float64)
    nih = val["source"].map(collection_of).eq("nih").to_numpy()[ok]
    return calibration_from_logits(Y, Z, predictor.labels, nih, fitted_on, prevalence)


def calibration_from_logits(Y: np.ndarray, Z: np.ndarray, labels: list[str], nih: np.ndarray, fitted_on: str,
                            prevalence: dict[str, float] | None = None) -> Calibration | None:
    """Temperatures on every film of ``Y``/``Z`` (targets, raw logits), then, with ``prevalence``, the prior
    shifts to NIH's adult population on the films marked ``nih``; None when nothing could be fitted."""
    temps = fit_temperatures(Y, Z, labels)
    shifts = fit_shifts(Y[nih], Z[nih], labels, prevalence, temps) if prevalence and nih.any() else {}
    if not temps and not shifts:
        return None
    val_nll = {k: [round(nll(Y[:, i], Z[:, i]), 6), round(nll(Y[:, i], Z[:, i], temps[k]), 6)]
               for i, k in enumerate(labels) if k in temps}
    return Calibration(method="temperature+prior_shift" if shifts else "temperature",
                       temperatures={k: round(t, 6) for k, t in temps.items()}, fitted_on=fitted_on,
                       n_films=int(len(Y)), val_nll=val_nll, shifts=shifts,
                       reference=NIH_ADULTS if shifts else None,
                       prevalence={k: v for k, v in (prevalence or {}).items() if k in labels} if shifts else {},
                       shift_fitted_on=(f"{int(nih.sum())} NIH films of the {fitted_on.split(',')[0]}, reweighted "
                                        "to NIH's adult label prevalence" if shifts else None))


def reference_prevalence(data_root: str | os.PathLike, labels: list[str]) -> dict[str, float] | None:
    """NIH's adult prevalences of ``labels`` (:func:`chestxray.prevalence.nih_prevalence`), None without its label file."""
    return nih_prevalence(data_root, labels) if (Path(data_root) / NIH_LABEL_FILE).is_file() else None


def _calibrated(predictor: Predictor, calibration: Calibration | None) -> Predictor:
    """The same loaded model with these temperatures (None: none), as a new Predictor (no reload)."""
    meta = copy.deepcopy(predictor.ckpt.meta)
    meta.calibration = calibration
    return Predictor(dataclasses.replace(predictor.ckpt, meta=meta), device=predictor.device)


def headline_group(test: pd.DataFrame) -> str:
    """The test films' headline group: the label-balanced cohort when it is among them, else the mixed NIH set."""
    return HEADLINE if "cohort" in test.columns and (test["cohort"] == HEADLINE).any() else MIXED


def pointing_game_or_none(predictor: Predictor, data_root: str | os.PathLike, localize: bool) -> dict[str, Any]:
    """:func:`held_out_pointing_game` on ``data_root``, or (``localize`` off) an empty result of the same keys."""
    if localize:
        return held_out_pointing_game(predictor, data_root)
    return {"n_pairs": 0, "hit_rate": None, "chance": None, "n_films": 0, "held_out": None}


def release_metrics(metrics: dict[str, Any], headline: str, half_check: dict[str, Any],
                    loc: dict[str, Any]) -> ReleaseMetrics:
    """What config.json keeps of a release's test metrics (per group), with calibration before/after."""
    groups = metrics.get("by_group", {})
    extra = {}
    if (ts := metrics.get("temperature_scaling")):
        keep = ("mean_ece", "pooled_ece", "mean_brier", "pooled_brier")
        extra["temperature_scaling"] = {
            g: {side: {k: v[side][k] for k in keep} for side in ("before", "after")}
            for g, v in [("all", ts["all"]), *ts["by_group"].items()] if g in ("all", headline, MIXED)}
    return ReleaseMetrics(
        split="test", headline_group=headline, mixed_group=MIXED,
        mean_auroc={g: m["mean_auroc"] for g, m in groups.items()},
        mean_auroc_ci={g: m["mean_auroc_ci"] for g, m in groups.items()},
        auroc={k: v["auroc"] for k, v in groups.get(headline, metrics)["labels"].items()},
        n_test_images={g: m["n_images"] for g, m in groups.items()},
        pneumonia_auroc={g: m["labels"].get("Pneumonia", {}).get("auroc") for g, m in groups.items()},
        flags_per_normal_film={g: m.get("flags_per_normal_film") for g, m in groups.items()},
        float16_check=half_check,
        localization=localization_summary(loc) if loc.get("n_pairs") else {}, extra=extra)


def release(run_dir: str | os.PathLike, name: str, *, dest_root: str | os.PathLike | None = None,
            data_root: str | None = None, n_boot: int = 1000, half: bool = True, fit_gate: bool = True,
            repo_id: str | None = None, progress: bool = True, localize: bool = True,
            calibrate: bool = True) -> Path:
    """Builds ``<dest_root>/<name>`` from ``<run_dir>/best`` (see the module docstring)."""
    run = Path(run_dir)
    best = run / "best"
    train_cfg = upgrade_run_config(json.loads((run / "train_config.json").read_text()))
    manifest = pd.read_csv(run / "manifest.csv")
    dest = Path(dest_root or weights_dir()) / name
    tmp = stage_folder(best, manifest, dest, half)

    test = manifest[manifest["split"] == "test"].reset_index(drop=True)
    val = manifest[manifest["split"] == "val"].reset_index(drop=True)
    if data_root:  # re-root the run's absolute paths (e.g. a run made on another machine)
        root = Path(train_cfg["data_root"]).resolve()
        for part in (test, val):
            part["path"] = [str(Path(data_root) / Path(p).resolve().relative_to(root)) for p in part["path"]]
    predictor = Predictor(load_folder(tmp), device="cpu")
    logits16, _ = predict_paths(predictor, list(test["path"]), progress=progress, logits=True)
    p16 = torch.sigmoid(torch.from_numpy(logits16)).numpy()
    # Per-label temperatures on the validation films that chose the epoch and thresholds.
    calibration = None
    if calibrate:
        val_films, fitted_on = validation_films(val, CkptMeta.read(tmp))
        calibration = fit_on_validation(predictor, val_films, fitted_on, progress=progress,
                                        prevalence=reference_prevalence(data_root or train_cfg["data_root"],
                                                                        predictor.labels))
        predictor = _calibrated(predictor, calibration)
    headline = headline_group(test)
    loc = pointing_game_or_none(predictor, data_root or train_cfg["data_root"], localize)
    metrics = evaluate_manifest(predictor, test, tmp, n_boot=n_boot, progress=progress, logits=logits16,
                                plot_group=headline, localization=loc,
                                title=f"{name}: ROC on held-out test patients ({headline})")
    # float16 vs float32: same images, same path (raw probabilities on both sides).
    p32, _ = predict_paths(Predictor(load_folder(best), device="cpu"), list(test["path"]), progress=progress)
    Y = test[predictor.labels].to_numpy(np.float64)
    half_check = {"max_abs_prob_diff": float(np.nanmax(np.abs(p32 - p16))),
                  "mean_auroc_fp32": round(mean_auroc(Y, p32), 5), "mean_auroc_fp16": round(mean_auroc(Y, p16), 5),
                  "size_fp32_mb": round((best / WEIGHTS_FILE).stat().st_size / 2**20, 2),
                  "size_fp16_mb": round((tmp / WEIGHTS_FILE).stat().st_size / 2**20, 2)}
    log_path = run / "log.csv"
    if log_path.is_file():
        with log_path.open() as f:
            rows = [{k: (float(v) if k != "best" else v) for k, v in r.items()} for r in csv.DictReader(f)]
        plot_training_curves(rows, tmp / "training_curves.png")

    meta = CkptMeta.read(tmp)
    meta.calibration = calibration
    meta.metrics = release_metrics(metrics, headline, half_check, loc)
    meta.training = meta.training or Training()
    meta.training.recipe = {k: train_cfg[k] for k in
                            ("arch", "img_size", "epochs", "batch_size", "lr", "weight_decay", "schedule",
                             "augment", "pos_weight_max", "source_caps", "seed", "pretrained", "teacher",
                             "kd_weight", "cohort_fracs", "repeat")
                            if k in train_cfg}
    # A run saved before the checkpoint writer dropped timm's ImageNet provenance still carries it.
    cfg = meta.apply(own_provenance(json.loads((tmp / CONFIG_FILE).read_text())))
    (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))

    gate_report = None
    if fit_gate:
        _, _, rows = fit_from_folder(tmp, data_root or train_cfg["data_root"], tmp / GATE_FILE,
                                          manifest=run / "manifest.csv", print_fn=log.info)
        gate_report = format_rows(rows)

    extra = {"Float16 weights": (
        f"The shipped weights are float16 ({half_check['size_fp16_mb']} MB instead of "
        f"{half_check['size_fp32_mb']} MB). On the {len(test)} test images the largest probability difference "
        f"to the float32 weights is {half_check['max_abs_prob_diff']:.2e}; mean AUROC "
        f"{half_check['mean_auroc_fp32']} (float32) vs {half_check['mean_auroc_fp16']} (float16).")}
    if gate_report:
        extra["Input gate (is this a frontal chest X-ray?)"] = (
            "`gate.safetensors` holds this model's input gate (see `chestxray/gate.py`): it warns when an upload "
            "does not look like the frontal chest films the model was trained on. Flag rates on images never "
            "used to fit or calibrate it (false alarms on real chest X-rays, catches on real non-chest images):"
            "\n\n```\n" + gate_report + "\n```")
    if loc["n_pairs"]:
        extra["Where the heatmap points"] = localization_card_section(loc)
    extra["Reproduce"] = (
        "```bash\n"
        + (f"chestxray train --config {train_cfg['recipe_file']}\n" if train_cfg.get("recipe_file") else
           f"bash train/train_all.sh {train_cfg['arch']}   # recipe: train/configs/{train_cfg['arch']}.yaml\n")
        + f"python -m chestxray evaluate --model {name} "
        + " ".join(f"--source {s}" for s in sorted(test['source'].unique()))
        + f" --split test --out eval/{name}\n"
        + f"python -m chestxray recard weights/{name} --data-root ../shared/data   # this card, from the folder\n```")
    write_model_card(tmp, name=name, config=cfg, metrics=metrics, headline_group=headline, mixed_group=MIXED,
                     extra_sections=extra, repo_id=repo_id)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


#: Files ``recard`` rewrites; everything else in the folder (weights, gate, splits, curves) is left alone.
RECARD_FILES = ("README.md", "metrics.json", CONFIG_FILE, "reliability.png", "roc.png", "confusion.png",
                "predictions.csv")
#: Files ``recard`` must leave byte for byte as they are.
KEPT_FILES = (WEIGHTS_FILE, GATE_FILE)
#: Card sections that ``recard`` recomputes or that :func:`write_model_card` writes itself; any other section
#: of the old card (float16 check, input gate, reproduce, ...) is carried over verbatim.
_GENERATED_SECTIONS = {"Results on held-out patients", "Calibration", "Training data and split", "Intended use",
                       "Limitations and known failure modes", "Use", "Licence", "Citation and data",
                       "Where the heatmap points"}
DEFAULT_SECTION = "The app's default model"


def card_sections(text: str) -> dict[str, str]:
    """``{title: body}`` of a card's level-2 sections (``## Title``), in order, outside code blocks."""
    out: dict[str, list[str]] = {}
    title, fence = None, False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        if not fence and line.startswith("## "):
            title = line[3:].strip()
            out[title] = []
        elif title is not None:
            out[title].append(line)
    return {k: "\n".join(v).strip() for k, v in out.items()}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def recard(folder: str | os.PathLike, data_root: str | os.PathLike, *, n_boot: int = 1000,
           progress: bool = True, localize: bool = True, calibrate: bool = True, tolerance: float = 2e-3,
           repo_id: str | None = None, card_only: bool = False) -> dict[str, Any]:
    """Refreshes a shipped checkpoint folder's card, metrics and config without its training run.

    From the folder alone (``config.json``, ``model.safetensors``, ``splits.csv``) and the shared data:
    the test films are found again through the project's own manifest reader and preprocessing, their
    probabilities checked against the shipped ``predictions.csv`` and the test mean AUROCs against the
    shipped ``config.json`` (a difference above ``tolerance`` stops it, changing nothing); per-label
    temperatures are fitted on the validation films (:func:`validation_films`); calibration before/after,
    localization and the card are rewritten (:data:`RECARD_FILES`). The weights and the input gate are
    never written, and their bytes are checked unchanged.

    With ``card_only``, nothing is computed: the card is written again from the folder's own
    ``metrics.json`` and ``config.json`` (after a change to the card's wording).

    Returns:
        ``{"folder", "checks": {...}, "temperatures", "seconds"}``; ``checks`` holds the largest
        probability and AUROC differences to the shipped numbers.
    """
    import tempfile
    import time

    from chestxray.data import load_sources

    start = time.time()
    folder = Path(folder).resolve()
    name = folder.name
    hashes = {f: _sha256(folder / f) for f in KEPT_FILES if (folder / f).is_file()}
    if card_only:
        meta = CkptMeta.read(folder)
        metrics = json.loads((folder / "metrics.json").read_text())
        m = meta.metrics or ReleaseMetrics()
        _write_card(folder, folder, name, json.loads((folder / CONFIG_FILE).read_text()), metrics,
                    m.headline_group or HEADLINE, metrics.get("localization") or {}, repo_id)
        return {"folder": str(folder), "checks": {"card_only": True}, "temperatures": meta.temperatures,
                "seconds": round(time.time() - start, 1)}
    old_meta = CkptMeta.read(folder)
    training = old_meta.training or Training()
    if not training.sources:
        raise ValueError(f"{name}: config.json names no training sources: cannot find its test films")
    if not (folder / SPLITS_FILE).is_file():
        raise ValueError(f"{name}: no {SPLITS_FILE}: cannot tell its test and validation films apart")
    shipped = Predictor(load_folder(folder), device="cpu")  # as shipped (with its temperatures, if any)
    raw = _calibrated(shipped, None)
    manifest = load_sources(list(training.sources), data_root, raw.labels, missing="drop")
    test = select_split(manifest, folder / SPLITS_FILE, "test").reset_index(drop=True)
    val = select_split(manifest, folder / SPLITS_FILE, "val").reset_index(drop=True)

    # 1. The shipped numbers, reproduced from the folder.
    logits, errors = predict_paths(raw, list(test["path"]), progress=progress, logits=True)
    if errors:
        raise ValueError(f"{name}: {len(errors)} test films unreadable, e.g. {next(iter(errors.items()))}")
    checks: dict[str, Any] = {"n_test_images": len(test)}
    as_shipped = shipped.probabilities(torch.from_numpy(logits)).numpy()
    pred_csv = folder / "predictions.csv"
    if pred_csv.is_file():
        # A film's name can be in two sources (NIH's 384-px and 64-px folders): match by (source, image).
        old = pd.read_csv(pred_csv).set_index(["source", "image"])
        keys = pd.MultiIndex.from_arrays([test["source"], test["path"].map(os.path.basename)])
        found = keys.isin(old.index)
        missing = int((~found).sum())
        diff = np.abs(old.loc[keys[found], raw.labels].to_numpy(np.float64) - as_shipped[found])
        checks.update(predictions_max_abs_diff=float(diff.max()) if diff.size else None,
                      predictions_missing=missing, predictions_shipped=int(len(old)))
        if len(old) != len(test) or missing or not old.index.is_unique:
            raise ValueError(f"{name}: {len(test)} test films found, {len(old)} in predictions.csv ({missing} "
                             "missing): the data or splits.csv do not match the shipped folder")
    headline = headline_group(test)

    # 2. Temperatures on the validation films, then the test metrics through evaluate's own code.
    calibration = None
    if calibrate:
        val_films, fitted_on = validation_films(val, old_meta)
        calibration = fit_on_validation(raw, val_films, fitted_on, progress=progress,
                                        prevalence=reference_prevalence(data_root, raw.labels))
    predictor = _calibrated(raw, calibration)
    loc = pointing_game_or_none(predictor, data_root, localize)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{name}.recard.") as tmp_name:
        tmp = Path(tmp_name)
        metrics = evaluate_manifest(predictor, test, tmp, n_boot=n_boot, progress=progress, logits=logits,
                                    plot_group=headline, localization=loc,
                                    title=f"{name}: ROC on held-out test patients ({headline})")
        old_m = old_meta.metrics or ReleaseMetrics()
        new_means = {g: m["mean_auroc"] for g, m in metrics.get("by_group", {}).items()}
        diffs = {g: abs(new_means[g] - v) for g, v in old_m.mean_auroc.items()
                 if v is not None and new_means.get(g) is not None}
        head_labels = metrics["by_group"].get(headline, metrics)["labels"]
        label_diffs = [abs(head_labels[k]["auroc"] - v) for k, v in old_m.auroc.items()
                       if v is not None and head_labels.get(k, {}).get("auroc") is not None]
        checks.update(mean_auroc_max_abs_diff=max(diffs.values(), default=None),
                      label_auroc_max_abs_diff=max(label_diffs, default=None),
                      groups_compared=sorted(diffs), groups_missing=sorted(set(old_m.mean_auroc) - set(new_means)))
        old_loc = old_m.localization
        if old_loc.get("hit_rate") is not None and loc.get("n_pairs"):
            checks["localization_hit_rate"] = {"shipped": old_loc["hit_rate"], "now": loc["hit_rate"],
                                               "n_pairs_shipped": old_loc.get("n_pairs"), "n_pairs_now": loc["n_pairs"]}
        worst = max([v for v in (checks.get("predictions_max_abs_diff"), checks["mean_auroc_max_abs_diff"],
                                 checks["label_auroc_max_abs_diff"]) if v is not None], default=0.0)
        if worst > tolerance or checks["groups_missing"]:
            raise ValueError(f"{name}: the recomputed test numbers differ from the shipped ones ({checks}); "
                             "nothing was changed")

        # 3. The new config, card and plots; the old card's sections that cannot be recomputed are kept.
        meta = CkptMeta.read(folder)
        meta.calibration = calibration
        meta.metrics = release_metrics(metrics, headline, dict(old_m.float16_check), loc)
        cfg = meta.apply(json.loads((folder / CONFIG_FILE).read_text()))
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
        _write_card(tmp, folder, name, cfg, metrics, headline, loc, repo_id)
        for f in RECARD_FILES:
            if (tmp / f).is_file():
                shutil.copyfile(tmp / f, folder / f)
    changed = [f for f, h in hashes.items() if _sha256(folder / f) != h]
    if changed:
        raise RuntimeError(f"{name}: {', '.join(changed)} changed: recard must never write them")
    return {"folder": str(folder), "checks": checks, "kept_identical": sorted(hashes),
            "temperatures": calibration.temperatures if calibration else {},
            "seconds": round(time.time() - start, 1)}


def _write_card(dest: Path, folder: Path, name: str, cfg: dict[str, Any], metrics: dict[str, Any], headline: str,
                loc: dict[str, Any], repo_id: str | None) -> None:
    """Writes ``dest/README.md`` for ``recard``: the sections it computes, and the old card's (in ``folder``)
    other sections carried over verbatim (float16 check, input gate, reproduce; the default-model note last)."""
    old_card = (folder / "README.md").read_text() if (folder / "README.md").is_file() else ""
    sections = card_sections(old_card)
    default_section = sections.pop(DEFAULT_SECTION, None)
    extra = {k: v for k, v in sections.items() if k not in _GENERATED_SECTIONS}
    if loc.get("n_pairs"):
        extra["Where the heatmap points"] = localization_card_section(loc)
    if "Reproduce" in extra and "chestxray recard" not in extra["Reproduce"]:
        extra["Reproduce"] = re.sub(r"\n```\s*$", f"\npython -m chestxray recard weights/{name} --data-root "
                                    "../shared/data   # this card, from the folder\n```", extra["Reproduce"])
    extra = {k: extra[k] for k in sorted(extra, key=lambda k: k == "Reproduce")}  # Reproduce last
    hub = re.search(r'create_model\("hf-hub:([^"@]+)', old_card)
    write_model_card(dest, name=name, config=cfg, metrics=metrics, headline_group=headline, mixed_group=MIXED,
                     extra_sections=extra, repo_id=repo_id or (hub.group(1) if hub else None),
                     splits=split_counts(folder))
    if default_section is not None:
        with (dest / "README.md").open("a") as f:
            f.write(f"\n## {DEFAULT_SECTION}\n\n{default_section}\n")


def summary_row(folder: Path) -> dict[str, Any]:
    """One row of the README's results table from a shipped folder's config.json."""
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    meta = CkptMeta.from_config(cfg)
    m, t = meta.metrics or ReleaseMetrics(), meta.training or Training()
    return {"name": folder.name, "arch": cfg["architecture"], "val_mean_auroc": t.val_mean_auroc,
            "label_set": meta.label_set,
            "val_sources": t.val_sources if isinstance(t.val_sources, list) else None,
            "headline_group": m.headline_group,
            "mean_auroc": m.mean_auroc, "mean_auroc_ci": m.mean_auroc_ci,
            "size_mb": round((folder / WEIGHTS_FILE).stat().st_size / 2**20, 1)}


def mark_default(models_yaml: str | os.PathLike, dest_root: str | os.PathLike | None = None,
                 label_set: str = "nih14") -> str:
    """Makes the shipped model with the best validation mean AUROC (NIH's balanced films) the default.

    Only models of ``label_set`` compete: a mean AUROC over other labels is not comparable. Sets
    ``default:`` in ``models.yaml`` and says so, with the comparison, in that model's card.
    """
    import re

    root = Path(dest_root or weights_dir())
    # models of their own only: an ensemble folder (config, no weights) has no validation figure to compete with
    rows = [summary_row(p) for p in sorted(root.iterdir())
            if (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file() and p.suffix != ".tmp"]
    rows = [r for r in rows if r["val_mean_auroc"] is not None and r["label_set"] in (label_set, None)]
    # Only a selection on balanced validation films is a fair comparison; older models chosen on
    # a mixed validation set compete only when no model was selected the fair way.
    balanced = [r for r in rows if HEADLINE in (r["val_sources"] or [])]
    n_mixed = len(rows) - len(balanced)
    rows = balanced or rows
    best = max(rows, key=lambda r: r["val_mean_auroc"])
    path = Path(models_yaml)
    path.write_text(re.sub(r"(?m)^default:.*$", f"default: {best['name']}", path.read_text(), count=1))
    others = ", ".join(f"{r['name']} {r['val_mean_auroc']:.3f}" for r in rows if r is not best)
    on = "NIH's label-balanced validation films" if balanced else "NIH validation images"
    among = (f"the best of the {len(rows)} shipped models selected on {on}, by validation mean AUROC "
             f"({best['val_mean_auroc']:.3f}; {others})" if others else
             f"the only shipped model selected on {on} (validation mean AUROC {best['val_mean_auroc']:.3f})"
             + ("; the others were selected on mixed validation sets, which favour telling normal from abnormal"
                if balanced and n_mixed else ""))
    section = f"\n## The app's default model\n\nThis is the demo's default model: {among}.\n"
    marker = "\n## The app's default model\n"
    for card in root.glob("*/README.md"):
        if marker in (text := card.read_text()):  # the default may have moved: only one card says it
            card.write_text(text[:text.index(marker)].rstrip("\n") + "\n")
    card = root / best["name"] / "README.md"
    card.write_text(card.read_text() + section)
    return best["name"]
