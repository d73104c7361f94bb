"""The model card's per-source evidence: AUROC within each source and the confounding statement."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from chestxray.data import load_sources
from chestxray.evaluate import evaluate_manifest
from chestxray.labels import LUNG_CANCER_PROXY, get_label_set
from chestxray.modelcard import confounded_labels, within_source_table, write_model_card
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
