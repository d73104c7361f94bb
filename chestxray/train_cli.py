"""``chestxray train``: a training run's configuration from defaults, a YAML recipe and flags.

Precedence: built-in defaults (:class:`chestxray.training.TrainConfig`) < YAML file (``--config``) <
command-line flags. The resolved configuration is saved as ``<out>/train_config.json`` beside the
checkpoint. Several processes: ``torchrun --nproc_per_node 2 train/train.py ...`` (gloo on CPU, NCCL
on GPUs); ``train/train.py`` is a thin wrapper of :func:`main`.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from chestxray.models import ARCHS
from chestxray.recipes import load_recipe
from chestxray.sources import SOURCES
from chestxray.training import TrainConfig

#: Help text of every TrainConfig field (the default is appended). A field missing here still gets a
#: flag; tests/test_install.py asks for an entry so that no option is left unexplained.
HELP = {
    "arch": f"timm architecture ({', '.join(ARCHS)})",
    "labels": "label set name (nih14) or comma-separated label names",
    "sources": f"shared-data sources to train on ({', '.join(SOURCES)})",
    "data_root": "folder of the shared data sources",
    "csv": "your own label CSV instead of the shared sources (NIH layout or one 0/1/blank column per label)",
    "images": "folder the --csv image names are relative to (default: the CSV's folder)",
    "source_caps": "at most N training images of a source, e.g. kermany=500",
    "repeat": "train on a cohort's or source's films N times an epoch, e.g. reproduce_chexnet=3",
    "val_sources": "choose the epoch and thresholds on the validation images of these sources or cohorts only",
    "cohort_fracs": "larger held-out shares for a cohort, e.g. reproduce_chexnet=0.25:0.25 (val:test)",
    "split": "patient (seeded, patient-wise), lists (--train-list/--val-list/--test-list) or all (every film "
             "trains; with --select last, for a cross-validated recipe's all-data weights)",
    "train_list": "file of training image names (--split lists)",
    "val_list": "file of validation image names (--split lists)",
    "test_list": "file of test image names (--split lists)",
    "val_frac": "share of patients held out for validation",
    "test_frac": "share of patients held out for test",
    "folds": "k-fold cross-validation: fold --fold's patients are held out as validation (0 = off; see chestxray cv)",
    "fold": "the held-out fold (0..folds-1) with --folds",
    "select": "best (best validation epoch, early stopping) or last (the final epoch of a fixed schedule)",
    "img_size": "input side in pixels",
    "epochs": "maximum number of epochs",
    "batch_size": "images per optimizer step (per process)",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "schedule": "learning-rate schedule: cosine (with warm-up) or plateau",
    "warmup_epochs": "linear warm-up length in epochs (cosine schedule)",
    "pos_weight_max": "upper clip of the BCE pos_weight (neg/pos) per label",
    "augment": "strength of the on-device augmentation (0 = none)",
    "drop_rate": "dropout before the classifier",
    "reshuffle": "a new film order each epoch (off: one seeded order for every epoch, as the recorded recipes)",
    "pretrained": "start from ImageNet weights (timm's, or the offline ones where available)",
    "teacher": "distil from these checkpoints (names, folders or hf-hub: references)",
    "kd_weight": "weight of the teachers' soft targets in the loss",
    "teacher_cv": ("in cross-validation, a teacher's cross-validation folder: fold i is taught by its fold-i model, "
                   "and its patients keep their folds"),
    "split_from": "keep an earlier run's (or checkpoint's) split for the images it had",
    "init_from": "start from this checkpoint's backbone (name or folder; same architecture, new classifier)",
    "amp": "bf16/fp16 autocast (GPU only)",
    "channels_last": "NHWC memory layout (faster on GPUs and, for convnets, on CPU)",
    "patience": "early stopping: epochs without a better validation mean AUROC",
    "threshold_rule": "per-label operating threshold chosen on validation: youden, spec90 or f1",
    "seed": "random seed (split, initialisation, batches)",
    "out": "run folder (checkpoint in <out>/best, log.csv, manifest.csv)",
    "cache_dir": "folder of the decoded uint8 image cache",
    "workers": "processes decoding images into the cache",
    "device": "auto, cpu, cuda or cuda:N",
    "resume": "continue the run in --out from its last state",
    "half": "write the checkpoint's weights in float16",
    "max_steps": "stop after this many optimizer steps (smoke tests; 0 = no limit)",
    "eval_boot": "bootstrap resamples for the final evaluation's confidence intervals",
    "push_to_hub": "release the best checkpoint and upload it to this Hub repo (org/name) at the end",
    "recipe_file": "the recipe's path, recorded for the model card's 'Reproduce' line (set by --config)",
}

EPILOG = """examples:
  chestxray train --config train/configs/resnet18.yaml
  chestxray train --arch efficientnet_b0 --sources nih384 nih64 --img-size 224 --pretrained true
  chestxray train --csv my_labels.csv --images my_images/ --labels "Tuberculosis,No Finding"
  torchrun --nproc_per_node 4 train/train.py --config train/configs/resnet18.yaml"""


def _bool(v: str) -> bool:
    if v.lower() in {"1", "true", "yes", "on"}:
        return True
    if v.lower() in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")


def build_parser(prog: str = "chestxray train") -> argparse.ArgumentParser:
    """One flag per TrainConfig field, typed from its default."""
    p = argparse.ArgumentParser(prog=prog, description="Train a chest X-ray model. Precedence: defaults < "
                                "YAML file (--config) < flags.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML recipe overriding the defaults (flags override it; a 'base:' key "
                                    "names a recipe it extends)")
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        text = HELP.get(f.name, f.name.replace("_", " "))
        if isinstance(default, bool):
            p.add_argument(flag, type=_bool, metavar="BOOL", default=None, help=f"{text} (default {default})")
        elif isinstance(default, list):
            p.add_argument(flag, nargs="+", default=None, help=f"{text} (default {' '.join(default) or 'none'})")
        else:
            typ = type(default) if default is not None else str
            p.add_argument(flag, type=typ, default=None, help=f"{text} (default {default})")
    return p


def resolve_config(argv: Sequence[str] | None = None, prog: str = "chestxray train") -> TrainConfig:
    """Defaults < YAML < flags."""
    return config_from_args(build_parser(prog).parse_args(argv))


def config_from_args(args: argparse.Namespace, exclude: Sequence[str] = ()) -> TrainConfig:
    """Defaults < YAML (``args.config``) < the flags given; ``exclude`` names options that are not TrainConfig's."""
    values: dict = {}
    if args.config:
        values.update(load_recipe(args.config))
        values["recipe_file"] = Path(args.config).as_posix()
    values.update({k: v for k, v in vars(args).items() if k != "config" and k not in exclude and v is not None})
    return TrainConfig.from_dict(values)


def main(argv: Sequence[str] | None = None, prog: str = "chestxray train") -> int:
    """Resolves the configuration and trains; returns the exit code (2 and one line for a bad configuration)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = resolve_config(argv, prog)
    except (ValueError, OSError, yaml.YAMLError) as err:
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
    from chestxray.training import train

    best = train(cfg)
    print(f"best checkpoint: {best}")
    return 0
