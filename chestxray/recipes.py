"""Training recipes (``train/configs/*.yaml``): reading them, and the architectures the project ships.

A recipe is a YAML file of :class:`chestxray.training.TrainConfig` fields; a ``base:`` key names a
recipe (relative to this one) that it extends. The top-level recipes that name an ``arch`` are the
shipped models' recipes, one per architecture: ``train/train_all.sh``, the benchmarks and the tests
take the architecture list from them (:func:`shipped_recipes`), so adding one is a spec in
:data:`chestxray.models.ARCHS` plus its recipe. Nothing here imports torch.

Run as ``python -m chestxray.recipes`` it prints those architectures, teachers first.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from chestxray.layout import checkout_root

#: Where the recipes lie in a checkout.
RECIPES_DIR = Path("train") / "configs"
#: Keys older run folders (``train_config.json``) used, and their current names. ``recipe`` was the
#: recipe file's path; the checkpoint's ``training.recipe`` (the run's knobs, written by ``release``)
#: keeps that name.
LEGACY_KEYS = {"recipe": "recipe_file"}


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a recipe, following its ``base:`` chain (keys with ``-`` read as ``_``)."""
    path = Path(path)
    loaded = yaml.safe_load(path.read_text()) or {}
    base = loaded.pop("base", None)
    values = load_recipe(path.parent / base) if base else {}
    values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    return values


def upgrade_run_config(d: Mapping[str, Any]) -> dict[str, Any]:
    """A run's saved configuration with older keys renamed (:data:`LEGACY_KEYS`); the current key wins."""
    out = dict(d)
    for old, new in LEGACY_KEYS.items():
        if old in out and isinstance(out[old], (str, type(None))):
            value = out.pop(old)
            out.setdefault(new, value)
    return out


def recipes_dir() -> Path | None:
    """The checkout's ``train/configs`` (None for an installed package, which carries no recipes)."""
    root = checkout_root()
    return root / RECIPES_DIR if root is not None and (root / RECIPES_DIR).is_dir() else None


def shipped_recipes(folder: str | os.PathLike | None = None) -> dict[str, Path]:
    """``{arch: recipe}`` for the top-level recipes that name an architecture, teachers before students.

    A recipe whose ``teacher`` names another recipe's architecture comes after it (the students learn
    from the released teachers); otherwise by name.
    """
    folder = Path(folder) if folder is not None else recipes_dir()
    if folder is None:
        return {}
    found: dict[str, tuple[Path, list[str]]] = {}
    for path in sorted(folder.glob("*.yaml")):
        values = load_recipe(path)
        arch = values.get("arch")
        if arch:
            if arch in found:
                raise ValueError(f"two recipes for {arch}: {found[arch][0].name} and {path.name}")
            found[arch] = (path, [str(t) for t in values.get("teacher") or []])
    order: list[str] = []

    def place(arch: str, seen: tuple[str, ...] = ()) -> None:
        if arch in order or arch in seen:
            return
        for teacher in found[arch][1]:
            if teacher in found:
                place(teacher, seen + (arch,))
        order.append(arch)

    for arch in sorted(found):
        place(arch)
    return {arch: found[arch][0] for arch in order}


def main() -> int:
    """Prints the shipped architectures, one a line (for ``train/train_all.sh``)."""
    for arch in shipped_recipes():
        print(arch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
