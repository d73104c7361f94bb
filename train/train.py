#!/usr/bin/env python
"""Train a chest X-ray model: ``python train/train.py --config train/configs/resnet18.yaml [--epochs 3 ...]``.

Precedence: built-in defaults < YAML file (``--config``) < command-line flags. The resolved
configuration is saved as ``<out>/train_config.json`` beside the checkpoint. Several processes:
``torchrun --nproc_per_node 2 train/train.py ...`` (gloo on CPU, NCCL on GPUs).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from chestxray.training import TrainConfig  # noqa: E402


def _bool(v: str) -> bool:
    if v.lower() in {"1", "true", "yes", "on"}:
        return True
    if v.lower() in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")


def build_parser() -> argparse.ArgumentParser:
    """One flag per TrainConfig field, typed from its default."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file overriding the defaults (flags override it)")
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, type=_bool, metavar="BOOL", default=None, help=f"(default {default})")
        elif isinstance(default, list):
            p.add_argument(flag, nargs="+", default=None, help=f"(default {' '.join(default)})")
        else:
            typ = type(default) if default is not None else str
            p.add_argument(flag, type=typ, default=None, help=f"(default {default})")
    return p


def load_yaml(path: Path) -> dict:
    """Reads a recipe; a ``base:`` key names a recipe (relative to this one) that it extends."""
    loaded = yaml.safe_load(path.read_text()) or {}
    base = loaded.pop("base", None)
    values = load_yaml(path.parent / base) if base else {}
    values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    return values


def resolve_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults < YAML < flags."""
    args = build_parser().parse_args(argv)
    values: dict = {}
    if args.config:
        values.update(load_yaml(Path(args.config)))
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    return TrainConfig.from_dict(values)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = resolve_config(argv)
    except (ValueError, OSError, yaml.YAMLError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from chestxray.training import train

    best = train(cfg)
    print(f"best checkpoint: {best}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
