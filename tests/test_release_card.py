"""A checkpoint written by ``release`` (from a tiny run on real films): its block, its card, the app's panel."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from chestxray.ckpt_config import CkptMeta
from tests.helpers import make_checkpoint

N_IMAGES = 30


@pytest.fixture(scope="module")
def released(tmp_path_factory, data_dir):
    """``release`` of a fake run (an untrained tiny checkpoint as its best epoch) on 30 real NIH test films."""
    from chestxray.data import read_manifest
    from chestxray.labels import get_label_set
    from chestxray.release import release

    tmp = tmp_path_factory.mktemp("release")
    run = tmp / "run"
    make_checkpoint(run / "best", arch="resnet10t", seed=5,
                    training={"epoch": 1, "val_mean_auroc": 0.5, "sources": ["nih384"], "pretrained": False,
                              "val_sources": ["reproduce_chexnet"], "n_images": {"train": 0, "val": 0}})
    images = data_dir / "nih/images_384"
    labels = pd.read_csv(images / "labels.csv")
    picks = pd.concat([labels[labels["source"] == s].head(N_IMAGES // 2) for s in ("reproduce_chexnet",
                                                                                  "darkcovidnet")])
    picks.to_csv(tmp / "labels.csv", index=False)
    df = read_manifest(tmp / "labels.csv", images, get_label_set("nih14"), source="nih384", missing="drop")
    df.assign(split="test").to_csv(run / "manifest.csv", index=False)
    # A run saved before `recipe` (the recipe file's path) was renamed `recipe_file`: it still reads.
    (run / "train_config.json").write_text(json.dumps({"arch": "resnet10t", "img_size": 64, "epochs": 1,
                                                       "seed": 0, "data_root": str(data_dir),
                                                       "recipe": "train/configs/tiny.yaml"}))
    return release(run, "tiny", dest_root=tmp / "weights", n_boot=20, fit_gate=False, progress=False,
                   localize=False, repo_id="someorg/cxr-tiny")


def test_release_writes_the_block_through_the_writer(released):
    meta = CkptMeta.read(released)
    m = meta.metrics
    assert m.headline_group == "reproduce_chexnet" and m.mixed_group == "nih384"
    assert m.groups()[:2] == ["reproduce_chexnet", "nih384"] and m.ci("reproduce_chexnet")
    assert m.n_test_images["reproduce_chexnet"] == N_IMAGES // 2 and m.float16_check["size_fp16_mb"] > 0
    assert meta.training.recipe == {"arch": "resnet10t", "img_size": 64, "epochs": 1, "seed": 0}  # the knobs
    assert "chestxray train --config train/configs/tiny.yaml\n" in (released / "README.md").read_text()
    assert meta.training.val_sources == ["reproduce_chexnet"] and len(meta.thresholds) == 15
    cfg = json.loads((released / "config.json").read_text())
    assert "origin_url" not in cfg["pretrained_cfg"]


def test_released_card_front_matter(released):
    from huggingface_hub import ModelCard

    card = ModelCard.load(released / "README.md")
    assert card.data.license == "apache-2.0" and card.data.datasets == ["alkzar90/NIH-Chest-X-ray-dataset"]
    results = card.data.eval_results
    assert [r.metric_name.split(",")[0] for r in results[:2]] == ["mean AUROC", "mean AUROC"]
    assert "label-balanced" in results[0].metric_name and "(mixed)" in results[1].metric_name
    assert {(r.dataset_type, r.dataset_split, r.metric_type) for r in results} == {
        ("alkzar90/NIH-Chest-X-ray-dataset", "test", "roc_auc")}
    assert 'timm.create_model("hf-hub:someorg/cxr-tiny", pretrained=True)' in card.text


def test_app_card_panel_shows_the_released_test_auroc(released, monkeypatch, tmp_path):
    from chestxray.registry import ModelRegistry
    from chestxray.serve.text import card_markdown

    monkeypatch.setenv("CHESTXRAY_WEIGHTS", str(released.parent))
    (tmp_path / "m.yaml").write_text("default: tiny\nmodels:\n  - {name: tiny, local: tiny}\n")
    text = card_markdown(ModelRegistry.from_yaml(tmp_path / "m.yaml").card("tiny"))
    m = CkptMeta.read(released).metrics
    balanced = text.index(f"Test, NIH, label-balanced films (reproduce_chexnet sample): mean AUROC "
                          f"**{m.mean_auroc['reproduce_chexnet']:.3f}**")
    assert balanced < text.index("Test, NIH, all 384-px test films (mixed): mean AUROC")
