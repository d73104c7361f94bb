"""evaluate on real films writes the calibration numbers and reliability.png; the card shows them."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from PIL import Image

from tests.helpers import make_checkpoint

N_IMAGES = 24


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, data_dir):
    """(checkpoint folder, config, metrics) of a tiny checkpoint evaluated on 24 real NIH films."""
    from chestxray.data import read_manifest
    from chestxray.evaluate import evaluate_manifest
    from chestxray.predictor import Predictor

    tmp = tmp_path_factory.mktemp("eval")
    folder = make_checkpoint(tmp / "tiny", seed=2)
    labels = pd.read_csv(data_dir / "nih/images_384/labels.csv")
    sick = labels[labels["Finding Labels"] != "No Finding"].head(N_IMAGES // 2)
    healthy = labels[labels["Finding Labels"] == "No Finding"].head(N_IMAGES // 2)
    csv = tmp / "labels.csv"
    pd.concat([sick, healthy]).to_csv(csv, index=False)
    predictor = Predictor.load(folder, device="cpu")
    df = read_manifest(csv, data_dir / "nih/images_384", predictor.labels, source="nih384", missing="drop")
    metrics = evaluate_manifest(predictor, df, folder, n_boot=0, progress=False)
    return folder, json.loads((folder / "config.json").read_text()), metrics


def test_evaluate_writes_calibration_and_reliability_png(evaluated):
    folder, _, metrics = evaluated
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    # The saved figures are those of the saved predictions: recomputed here with scikit-learn.
    from sklearn.metrics import brier_score_loss

    pred = pd.read_csv(folder / "predictions.csv")
    truth = pd.read_csv(folder.parent / "labels.csv").set_index("Image Index").loc[pred["image"], "Finding Labels"]
    y = (truth == "No Finding").to_numpy(float)
    nf = saved["labels"]["No Finding"]
    assert nf["prevalence"] == pytest.approx(y.mean()) == pytest.approx(0.5)
    assert nf["brier"] == pytest.approx(brier_score_loss(y, pred["No Finding"]), abs=1e-4)
    assert nf["auprc"] is not None  # (AP is rank-based: predictions.csv's 5 decimals tie films, so not recomputed)
    briers = [m["brier"] for m in saved["labels"].values() if m["brier"] is not None]
    assert saved["mean_brier"] == pytest.approx(sum(briers) / len(briers)) and 0.0 <= saved["pooled_ece"] <= 1.0
    assert {"brier", "ece"} <= set(saved["by_group"]["nih384"]["labels"]["Effusion"])
    with Image.open(folder / "reliability.png") as im:
        assert im.format == "PNG" and im.size[0] > 800 and im.size[1] > 400


def test_card_has_calibration_section_and_old_metrics_still_render(evaluated):
    from chestxray.modelcard import write_model_card

    folder, config, metrics = evaluated
    card = write_model_card(folder, name="tiny", config=config, metrics=metrics, headline_group="nih384").read_text()
    assert "## Calibration" in card and "![Reliability diagram](reliability.png)" in card
    section = card.split("## Calibration")[1].split("\n## ")[0]
    assert f"{metrics['mean_ece']:.3f}" in section and f"{metrics['mean_brier']:.3f}" in section
    assert "| Effusion |" in section and "15 equal-width bins" in section
    # A metrics.json written before these numbers existed: no section, and no error.
    old = json.loads(json.dumps(metrics))
    for m in [old, *old["by_group"].values()]:
        for key in ("mean_auprc", "mean_brier", "mean_ece", "pooled_ece", "calibration"):
            m.pop(key)
        for lm in m["labels"].values():
            for key in ("auprc", "prevalence", "brier", "ece"):
                lm.pop(key)
    card = write_model_card(folder, name="tiny", config=config, metrics=old, headline_group="nih384").read_text()
    assert "## Calibration" not in card and "## Results on held-out patients" in card


def test_evaluate_reports_the_readers_reason_for_an_unreadable_film(tmp_path, data_dir):
    """A film that cannot be read is left out of the metrics, and metrics.json says why in the reader's words."""
    from chestxray.data import read_manifest
    from chestxray.evaluate import evaluate_manifest
    from chestxray.imaging import ImageReadError, read_image
    from chestxray.predictor import Predictor

    folder = make_checkpoint(tmp_path / "tiny", seed=2)
    labels = pd.read_csv(data_dir / "nih/images_384/labels.csv").head(6)
    images = tmp_path / "images"
    images.mkdir()
    for name in labels["Image Index"]:
        (images / name).write_bytes((data_dir / "nih/images_384" / name).read_bytes())
    bad = images / labels["Image Index"].iloc[0]
    bad.write_bytes(bad.read_bytes()[:200])  # truncated PNG
    with pytest.raises(ImageReadError) as err:
        read_image(bad)
    labels.to_csv(tmp_path / "labels.csv", index=False)
    predictor = Predictor.load(folder, device="cpu")
    df = read_manifest(tmp_path / "labels.csv", images, predictor.labels, source="nih384", missing="drop")
    metrics = evaluate_manifest(predictor, df, tmp_path / "eval", n_boot=0, progress=False)
    assert metrics["n_unreadable"] == 1 and metrics["n_images"] == 5
    assert metrics["unreadable"] == {str(bad): str(err.value)}
