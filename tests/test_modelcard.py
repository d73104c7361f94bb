"""The model card: per-source evidence, confounding, Hub front matter (model-index) and the plain-timm snippet."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from chestxray.data import load_sources
from chestxray.evaluate import evaluate_manifest
from chestxray.labels import LUNG_CANCER_PROXY, get_label_set
from chestxray.modelcard import confounded_labels, eval_results, within_source_table, write_model_card
from chestxray.predictor import Predictor
from tests.helpers import make_checkpoint

SIX = get_label_set("six")


@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory, data_dir):
    """A tiny six-label checkpoint evaluated on 40 real films of all five sources: (folder, metrics)."""
    df = load_sources(["nih384", "nih64", "kermany", "covid", "tbx11k"], data_dir, SIX)
    picks = [df[df["source"] == "tbx11k"].head(6),
             df[df["Lung Opacity"] == 1.0].head(4), df[df["Lung Opacity"] == 0.0].head(4),  # NIH, RSNA-read
             df[(df["source"] == "nih64") & (df[LUNG_CANCER_PROXY] == 1.0)].head(3),
             df[(df["source"] == "covid") & (df["COVID-19"] == 1.0)].head(5),
             df[(df["source"] == "covid") & (df["COVID-19"] == 0.0) & (df["Pneumonia"] == 1.0)].head(5),
             df[df["source"] == "kermany"].iloc[::1000].head(5), df[df["source"] == "kermany"].tail(3),
             df[(df["source"] == "nih384") & (df["No Finding"] == 1.0)].head(5)]
    test = pd.concat(picks).drop_duplicates("path").reset_index(drop=True)
    tmp = tmp_path_factory.mktemp("card")
    folder = make_checkpoint(tmp / "six", labels=SIX, img_size=64, seed=1)
    metrics = evaluate_manifest(Predictor.load(folder, device="cpu"), test, tmp / "eval", n_boot=20,
                                progress=False)
    return folder, metrics


def test_confounded_labels_come_from_the_data(tiny_eval):
    _, metrics = tiny_eval
    assert metrics["sites"]["nih384"] == metrics["sites"]["nih64"] == "nih"  # one hospital, two folders
    # TB and COVID-19: all positives from one source, negatives from other hospitals. Lung Opacity's
    # positives and negatives are all NIH's (either folder): not confounded.
    assert confounded_labels(metrics) == {"Tuberculosis": ["tbx11k"], "COVID-19": ["covid"]}
    table = within_source_table(metrics)
    lines = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:]}
    assert set(lines) == {"Pneumonia", "Tuberculosis (confounded)", "COVID-19 (confounded)", "Lung Opacity",
                          LUNG_CANCER_PROXY, "No Finding"}
    cols = table.splitlines()[0].strip("| ").split(" | ")
    assert cols[:2] == ["label", "all sources"] and set(cols[2:]) == {"nih384", "nih64", "kermany", "covid",
                                                                       "tbx11k"}
    tb = dict(zip(cols, lines["Tuberculosis (confounded)"].strip("| ").split(" | ")))
    assert tb["tbx11k"] == "positives only (6)" and tb["kermany"] == "not annotated"
    assert tb["nih384"].startswith("negatives only")
    covid = dict(zip(cols, lines["COVID-19 (confounded)"].strip("| ").split(" | ")))
    auc = metrics["by_group"]["covid"]["labels"]["COVID-19"]["auroc"]
    assert covid["covid"].startswith(f"{auc:.3f}") and covid["covid"].endswith("; 5 / 5")  # within the source


def test_card_states_the_confounding(tiny_eval):
    folder, metrics = tiny_eval
    config = json.loads((folder / "config.json").read_text())
    card = write_model_card(folder, name="six-tiny", config=config, metrics=metrics,
                            headline_group="nih384").read_text()
    assert "### Per-label AUROC within each source (test split)" in card
    tb = next(line for line in card.splitlines() if line.startswith("- **Tuberculosis**"))
    assert "positives only from TBX11K tuberculosis" in tb and "no within-source figure exists" in tb
    assert "its films without Tuberculosis are not in this data" in tb
    assert "negatives only from NIH, all 384-px test films (mixed); NIH, 64-px films" in tb
    covid = next(line for line in card.splitlines() if line.startswith("- **COVID-19**"))
    assert "within COVID-19 image collection (5 positives / 5 negatives)" in covid
    assert f"**{LUNG_CANCER_PROXY}** is a proxy, not a diagnosis" in card and "Mass or Nodule" in card
    assert "TBX11K tuberculosis only Tuberculosis, No Finding" in card  # partial labels, from the data


def test_no_confounding_section_for_one_hospital(tiny_eval):
    folder, metrics = tiny_eval
    nih_only = dict(metrics, sources=["nih384", "nih64"])
    assert confounded_labels(nih_only) == {}
    config = json.loads((folder / "config.json").read_text())
    card = write_model_card(folder, name="six-tiny", config=config, metrics=nih_only,
                            headline_group="nih384").read_text()
    assert "within each source" not in card and "Confounded with their source" not in card
    # Prose from the model's sources: one collection cited, no site-confounding bullet for one hospital.
    cites = card.split("## Citation and data")[1]
    assert "Wang et al." in cites and "Kermany" not in cites and "Cohen" not in cites
    assert "Site confounding" not in card


def test_front_matter_is_a_valid_hub_card(tiny_eval):
    """ModelCard parses the front matter back: model-index with a Hub dataset id, split and metrics."""
    from huggingface_hub import ModelCard

    folder, metrics = tiny_eval
    config = json.loads((folder / "config.json").read_text())
    path = write_model_card(folder, name="six-tiny", config=config, metrics=metrics, headline_group="nih384",
                            repo_id="someorg/cxr-tiny")
    text = path.read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["license"] == "apache-2.0" and front["library_name"] == "timm" and front["metrics"] == ["roc_auc"]
    assert set(front["datasets"]) == {"alkzar90/NIH-Chest-X-ray-dataset", "hf-vision/chest-xray-pneumonia"}
    (entry,) = front["model-index"]
    (result,) = entry["results"]  # one NIH result: the headline (nih384) is also the mixed group here
    assert entry["name"] == "six-tiny" and result["task"]["type"] == "image-classification"
    assert result["dataset"]["type"] == "alkzar90/NIH-Chest-X-ray-dataset" and result["dataset"]["split"] == "test"
    first = result["metrics"][0]
    assert first["type"] == "roc_auc" and first["name"].startswith("mean AUROC, NIH, all 384-px test films")
    assert first["value"] == pytest.approx(metrics["by_group"]["nih384"]["mean_auroc"], abs=1e-4)
    card = ModelCard.load(path)  # huggingface_hub's own parser, eval results included
    assert card.data.eval_results[0].dataset_split == "test" and card.data.eval_results[0].metric_type == "roc_auc"
    licence = text.split("## Licence")[1].split("\n## ")[0]
    assert "CC BY 4.0" in licence and "many are non-commercial" in licence and "NIH Clinical Center" in licence
    assert "RSNA" in licence  # the six-label set has Lung Opacity, read from RSNA's readings
    cites = text.split("## Citation and data")[1]
    assert all(k in cites for k in ("Wang et al.", "Kermany et al.", "Cohen et al.", "Liu et al."))
    assert "the films come from 4 collections" in text  # NIH, Kermany, COVID-19 and TBX11K: four hospitals


def test_headline_and_mixed_groups_are_both_in_the_model_index(tiny_eval):
    _, metrics = tiny_eval
    two = json.loads(json.dumps(metrics))
    two["by_group"]["reproduce_chexnet"] = dict(two["by_group"]["nih384"], mean_auroc=0.55, n_images=7)
    results = eval_results(two, "reproduce_chexnet", "nih384")
    names = [r.metric_name for r in results]
    assert names[0] == "mean AUROC, NIH, label-balanced films (reproduce_chexnet sample), 7 films"
    assert names[1].startswith("mean AUROC, NIH, all 384-px test films (mixed)")
    assert {r.dataset_split for r in results} == {"test"} and results[0].metric_value == 0.55
    # A headline group with no Hub dataset id (TBX11K) is left out rather than given a made-up id.
    assert all(r.dataset_type != "tbx11k" for r in eval_results(two, "tbx11k", "nih384"))


def test_usage_snippet_runs_with_plain_timm(tiny_eval, tmp_path, monkeypatch, data_dir):
    """The card's plain-timm snippet, run as written (from an offline HF cache) on a real 1024-px film,
    gives the Predictor's probabilities."""
    import shutil

    import huggingface_hub.constants as c

    from chestxray.checkpoint import FOREIGN_PROVENANCE

    folder, metrics = tiny_eval
    config = json.loads((folder / "config.json").read_text())
    assert not set(FOREIGN_PROVENANCE) & set(config["pretrained_cfg"])
    card = write_model_card(folder, name="six-tiny", config=config, metrics=metrics, headline_group="nih384",
                            repo_id="someorg/cxr-tiny").read_text()
    code = card.split("## Use")[1].split("```python\n")[1].split("```")[0]
    assert len(code.strip().splitlines()) == 6 and "chestxray" not in code
    snap = tmp_path / "hub" / "models--someorg--cxr-tiny" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, snap / name)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    film = data_dir / "nih/full_res/00000100_000.png"
    scope: dict = {}
    exec(code.replace('"chest.png"', repr(str(film))), scope)  # noqa: S102 - the card's own snippet
    expected = Predictor.load(folder, device="cpu").predict(str(film))
    assert list(scope["probs"]) == list(expected) == SIX
    assert scope["probs"] == pytest.approx(expected, abs=2e-3)


@pytest.mark.parametrize("folder", sorted(p for p in (Path(__file__).parents[1] / "weights").iterdir()
                                          if (p / "splits.csv").is_file()), ids=lambda p: p.name)
def test_shipped_card_counts_its_split_from_splits_csv(folder):
    # The trainer's own validation set is only the selection films (e.g. 98 balanced NIH films);
    # the card's split line must count the whole split that splits.csv (and temperature scaling) uses.
    counts = pd.read_csv(folder / "splits.csv")["split"].value_counts()
    card = (folder / "README.md").read_text()
    if set(counts.index) == {"train"}:  # all-data weights (split: all): every film trained
        line = next(x for x in card.splitlines() if x.startswith("- Sources:"))
        assert f"trained on every labelled film ({counts['train']} images" in line
        return
    line = next(x for x in card.splitlines() if x.startswith("- Split by patient"))
    assert f"{counts['train']} train / {counts['val']} val / {counts['test']} test images" in line
