"""Release: turn a training run into a shipped checkpoint folder with measured evidence.

``python -m chestxray release runs/resnet18 --name resnet18`` writes ``weights/resnet18/`` with
``config.json`` (metrics summary added), ``model.safetensors`` (float16), ``splits.csv``,
``metrics.json``, ROC / confusion / training-curve plots and the model card. The float16 weights
are evaluated against the run's float32 ones on the same test images, and the difference is
recorded in the card.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import safetensors.torch

from chestxray.checkpoint import CONFIG_FILE, WEIGHTS_FILE, half_state, load_folder, own_provenance, weights_dir
from chestxray.ckpt_config import CkptMeta, ReleaseMetrics, Training
from chestxray.evaluate import SPLITS_FILE, evaluate_manifest, predict_paths
from chestxray.gate import GATE_FILE
from chestxray.gate_fit import fit_from_folder, format_rows
from chestxray.localization import card_section as localization_card_section
from chestxray.localization import held_out_pointing_game
from chestxray.localization import summary as localization_summary
from chestxray.metrics import mean_auroc, to_json
from chestxray.modelcard import write_model_card
from chestxray.plots import plot_training_curves
from chestxray.predictor import Predictor
from chestxray.recipes import upgrade_run_config
from chestxray.sources import HEADLINE_GROUP, MIXED_GROUP

log = logging.getLogger(__name__)
#: The headline group and the one shown beside it (see :mod:`chestxray.sources`).
HEADLINE, MIXED = HEADLINE_GROUP, MIXED_GROUP


def _half_copy(src: Path, dst: Path) -> None:
    state = half_state(safetensors.torch.load_file(str(src / WEIGHTS_FILE)))
    safetensors.torch.save_file(state, str(dst / WEIGHTS_FILE), metadata={"format": "pt"})


def release(run_dir: str | os.PathLike, name: str, *, dest_root: str | os.PathLike | None = None,
            data_root: str | None = None, n_boot: int = 1000, half: bool = True, fit_gate: bool = True,
            repo_id: str | None = None, progress: bool = True, localize: bool = True) -> Path:
    """Builds ``<dest_root>/<name>`` from ``<run_dir>/best`` (see the module docstring)."""
    run = Path(run_dir)
    best = run / "best"
    train_cfg = upgrade_run_config(json.loads((run / "train_config.json").read_text()))
    manifest = pd.read_csv(run / "manifest.csv")
    dest = Path(dest_root or weights_dir()) / name
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy(best / CONFIG_FILE, tmp / CONFIG_FILE)
    if half:
        _half_copy(best, tmp)
    else:
        shutil.copy(best / WEIGHTS_FILE, tmp / WEIGHTS_FILE)
    # Every image's split, by file name, so `evaluate --split test` reproduces the card's numbers.
    splits = pd.DataFrame({"image": manifest["path"].map(os.path.basename), "source": manifest["source"],
                           "split": manifest["split"]})
    splits.to_csv(tmp / SPLITS_FILE, index=False)

    test = manifest[manifest["split"] == "test"].reset_index(drop=True)
    if data_root:  # re-root the run's absolute paths (e.g. a run made on another machine)
        root = Path(train_cfg["data_root"]).resolve()
        test["path"] = [str(Path(data_root) / Path(p).resolve().relative_to(root)) for p in test["path"]]
    predictor = Predictor(load_folder(tmp), device="cpu")
    p16, _ = predict_paths(predictor, list(test["path"]), progress=progress)
    headline = HEADLINE if "cohort" in test.columns and (test["cohort"] == HEADLINE).any() else MIXED
    metrics = evaluate_manifest(predictor, test, tmp, n_boot=n_boot, progress=progress, probs=p16,
                                plot_group=headline,
                                title=f"{name}: ROC on held-out test patients ({headline})")
    # float16 vs float32: same images, same path.
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

    loc = (held_out_pointing_game(predictor, data_root or train_cfg["data_root"]) if localize
           else {"n_pairs": 0, "hit_rate": None, "chance": None, "n_films": 0, "held_out": None})
    if loc["n_pairs"]:  # beside the test metrics, without the per-film pairs (`localize --out` has those)
        metrics["localization"] = {k: v for k, v in loc.items() if k != "pairs"}
        to_json(metrics, tmp / "metrics.json")
    groups = metrics.get("by_group", {})
    meta = CkptMeta.read(tmp)
    meta.metrics = ReleaseMetrics(
        split="test", headline_group=headline, mixed_group=MIXED,
        mean_auroc={g: m["mean_auroc"] for g, m in groups.items()},
        mean_auroc_ci={g: m["mean_auroc_ci"] for g, m in groups.items()},
        auroc={k: v["auroc"] for k, v in groups.get(headline, metrics)["labels"].items()},
        n_test_images={g: m["n_images"] for g, m in groups.items()},
        pneumonia_auroc={g: m["labels"].get("Pneumonia", {}).get("auroc") for g, m in groups.items()},
        flags_per_normal_film={g: m.get("flags_per_normal_film") for g, m in groups.items()},
        float16_check=half_check,
        localization=localization_summary(loc))
    meta.training = meta.training or Training()
    meta.training.recipe = {k: train_cfg[k] for k in
                            ("arch", "img_size", "epochs", "batch_size", "lr", "weight_decay", "schedule",
                             "augment", "pos_weight_max", "source_caps", "seed", "pretrained", "teacher",
                             "kd_weight", "cohort_fracs")
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
        + f" --split test --out eval/{name}\n```")
    write_model_card(tmp, name=name, config=cfg, metrics=metrics, headline_group=headline, mixed_group=MIXED,
                     extra_sections=extra, repo_id=repo_id)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


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
    rows = [summary_row(p) for p in sorted(root.iterdir()) if (p / CONFIG_FILE).is_file() and p.suffix != ".tmp"]
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
