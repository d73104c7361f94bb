"""The recipes are the one list of shipped architectures; older run folders' keys still read."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from chestxray.models import ARCHS
from chestxray.recipes import load_recipe, shipped_recipes, upgrade_run_config

REPO = Path(__file__).resolve().parents[1]


def test_shipped_architectures_come_from_the_recipes_teachers_first():
    recipes = shipped_recipes()
    assert set(recipes) == {p.stem for p in (REPO / "train/configs").glob("*.yaml")} - {"base", "student"}
    archs = list(recipes)
    for arch, path in recipes.items():
        values = load_recipe(path)
        assert arch in ARCHS and path == REPO / "train/configs" / f"{arch}.yaml"
        assert values["out"] == f"runs/{arch}"  # train_all.sh marks runs/<arch>/DONE
        for teacher in values.get("teacher") or []:
            assert archs.index(teacher) < archs.index(arch), f"{arch} is trained before its teacher {teacher}"


def test_train_all_gets_the_same_list(tmp_path):
    """``train/train_all.sh`` reads its default list from ``python -m chestxray.recipes``."""
    out = subprocess.run([sys.executable, "-m", "chestxray.recipes"], capture_output=True, text=True, cwd=REPO,
                         check=True).stdout.split()
    assert out == list(shipped_recipes())
    assert "chestxray.recipes" in (REPO / "train/train_all.sh").read_text()


def test_order_and_conflicts_on_a_folder_of_its_own(tmp_path):
    (tmp_path / "base.yaml").write_text("lr: 0.1\n")  # names no arch: not a model's recipe
    (tmp_path / "a_student.yaml").write_text("base: base.yaml\narch: resnet10t\nteacher: [z_teacher_arch]\n")
    (tmp_path / "z_teacher.yaml").write_text("arch: z_teacher_arch\n")
    recipes = shipped_recipes(tmp_path)
    assert list(recipes) == ["z_teacher_arch", "resnet10t"]
    assert load_recipe(recipes["resnet10t"]) == {"lr": 0.1, "arch": "resnet10t", "teacher": ["z_teacher_arch"]}
    (tmp_path / "again.yaml").write_text("arch: resnet10t\n")
    with pytest.raises(ValueError, match="two recipes for resnet10t"):
        shipped_recipes(tmp_path)


def test_upgrade_run_config_renames_only_the_path_key():
    assert upgrade_run_config({"recipe": "r.yaml", "lr": 1}) == {"recipe_file": "r.yaml", "lr": 1}
    assert upgrade_run_config({"recipe": "old.yaml", "recipe_file": "new.yaml"}) == {"recipe_file": "new.yaml"}
    knobs = {"recipe": {"arch": "resnet18"}}  # a dict is the checkpoint's knobs, not a path: left alone
    assert upgrade_run_config(knobs) == knobs


def test_every_all_data_recipe_trains_its_cross_validated_recipe_on_every_film():
    """train/configs/all/<name>.yaml is train/configs/cv/<name>.yaml with only the split changed (every film, no
    fold, the final epoch), so the cross-validation's figures are the estimate for its weights."""
    import dataclasses

    from chestxray.training import TrainConfig

    def resolved(path: Path) -> dict:
        cfg = dataclasses.asdict(TrainConfig.from_dict(load_recipe(path)))
        return {k: v for k, v in cfg.items() if k not in ("split", "select", "folds", "fold", "out", "recipe_file")}

    pairs = [(REPO / "train/configs/cv" / p.name, p) for p in sorted((REPO / "train/configs/all").glob("*.yaml"))]
    assert pairs and all(cv.is_file() for cv, _ in pairs), pairs
    for cv, all_data in pairs:
        assert load_recipe(all_data)["split"] == "all" and load_recipe(all_data)["select"] == "last"
        assert resolved(all_data) == resolved(cv), all_data.name
