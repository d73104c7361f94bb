"""The ``chestxray`` block of config.json: one typed reader/writer, tolerant of older and odd files."""
from __future__ import annotations

import json

import pytest

from chestxray.checkpoint import FOREIGN_PROVENANCE, list_shipped, load_folder, weights_dir
from chestxray.ckpt_config import ALL, KEY, CkptMeta, ReleaseMetrics, Training
from tests.helpers import make_checkpoint


@pytest.mark.parametrize("name", list_shipped())
def test_shipped_blocks_read_and_round_trip(name):
    """Every shipped config.json reads through the typed reader and writes back the same block."""
    folder = weights_dir() / name
    raw = json.loads((folder / "config.json").read_text())[KEY]
    meta = CkptMeta.read(folder)
    config = json.loads((folder / "config.json").read_text())
    assert meta.label_set in ("nih14", "six") and list(meta.thresholds) == config["label_names"]
    assert meta.training is not None and meta.training.sources
    # `training.recipe` is the run's knobs (not the recipe file's path, which runs call `recipe_file`)
    assert meta.training.recipe["arch"] == config["architecture"] and "recipe_file" not in meta.training.extra
    m = meta.metrics
    assert m is not None and m.headline_group in m.mean_auroc
    if meta.training.split == "all":  # all-data weights: no validation split; the figures are out of fold
        assert m.split == "out-of-fold" and meta.training.val_mean_auroc is None
    else:
        assert m.split == "test" and meta.training.val_mean_auroc is not None
    assert m.groups()[0] == m.headline_group and m.ci(m.headline_group)
    if "headline_source" in raw["metrics"]:  # v1 name, read as today's
        raw["metrics"]["headline_group"] = raw["metrics"].pop("headline_source")
    assert json.loads(json.dumps(meta.to_dict())) == raw


def test_older_and_malformed_blocks_read_as_empty_fields():
    assert CkptMeta.from_dict(None) == CkptMeta()
    assert CkptMeta.from_config({"architecture": "resnet18"}) == CkptMeta()
    odd = CkptMeta.from_dict({"thresholds": {"Atelectasis": "x", "Edema": 0.3}, "training": "garbage",
                              "metrics": [1], "future_field": {"kept": True}})
    assert odd.thresholds == {"Edema": 0.3} and odd.training is None and odd.metrics is None
    assert odd.to_dict()["future_field"] == {"kept": True}  # unknown fields survive a read-modify-write
    t = Training.from_dict({"epoch": "3", "val_mean_auroc": 0.61, "val_sources": "all", "n_images": {"train": 9},
                            "pretrained": 1, "new_knob": 2})
    assert (t.epoch, t.val_mean_auroc, t.val_sources, t.n_images, t.pretrained) == (None, 0.61, "all",
                                                                                    {"train": 9}, None)
    assert t.to_dict() == {"val_mean_auroc": 0.61, "val_sources": "all", "n_images": {"train": 9}, "new_knob": 2}
    # The first toolkit versions: one flat test result, under "evaluation".
    flat = CkptMeta.from_dict({"evaluation": {"mean_auroc": 0.7, "mean_auroc_ci": [0.6, 0.8], "n_images": 50}})
    assert flat.metrics.split == "evaluation" and flat.metrics.groups() == [ALL]
    assert flat.metrics.ci(ALL) == [0.6, 0.8] and flat.metrics.n_test_images == {ALL: 50}


def test_undefined_group_keeps_its_nulls():
    m = ReleaseMetrics.from_dict({"mean_auroc": {"nih384": 0.7, "tbx11k": None},
                               "mean_auroc_ci": {"nih384": [0.6, 0.8], "tbx11k": [None, None]}})
    assert m.groups() == ["nih384"] and m.ci("tbx11k") is None
    assert m.to_dict()["mean_auroc_ci"]["tbx11k"] == [None, None]


def test_checkpoint_writer_owns_the_block_and_drops_imagenet_provenance(tmp_path):
    meta = CkptMeta(training=Training(epoch=3, val_mean_auroc=0.6, sources=["nih384"], pretrained=False))
    folder = make_checkpoint(tmp_path / "ck", arch="resnet10t", meta=meta)
    cfg = json.loads((folder / "config.json").read_text())
    assert not set(FOREIGN_PROVENANCE) & set(cfg["pretrained_cfg"])  # resnet10t's timm cfg has origin_url
    assert cfg["pretrained_cfg"]["tag"] == "chestxray" and cfg["pretrained_cfg"]["license"] == "apache-2.0"
    read = CkptMeta.read(folder)
    assert read.label_set == "nih14" and read.thresholds["Effusion"] == 0.5
    assert read.training == meta.training and read.metrics is None
    assert load_folder(folder).meta == read
    read.metrics = ReleaseMetrics(headline_group="nih384", mean_auroc={"nih384": 0.7})
    read.write(folder)
    again = json.loads((folder / "config.json").read_text())
    assert again[KEY]["metrics"] == {"split": "test", "headline_group": "nih384", "mean_auroc": {"nih384": 0.7}}
    assert {k: v for k, v in again.items() if k != KEY} == {k: v for k, v in cfg.items() if k != KEY}
