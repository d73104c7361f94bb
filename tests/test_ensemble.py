"""The ensemble (chestxray/ensemble.py): the mean of its members' calibrated probabilities and Grad-CAMs, its
registry entry built from the registry's own members, its folder's figures reproduced, batched prediction.

Two tiny checkpoints of different input sizes (so different feature grids and preprocessing) check the
mechanics; the shipped ensemble_nih14 over the five NIH-14 models checks the real thing on real films."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from chestxray.cam import upsample
from chestxray.checkpoint import load_folder
from chestxray.ckpt_config import CkptMeta, Ensemble
from chestxray.cli import main
from chestxray.imaging import read_image
from chestxray.labels import get_label_set
from chestxray.layout import CheckpointError
from chestxray.registry import ModelRegistry
from tests.conftest import REPO
from tests.helpers import make_checkpoint

SHIPPED = "ensemble_nih14"
FILM = "nih/full_res/00000100_000.png"


def _write_ensemble(folder: Path, members: list[str], labels: list[str], threshold: float = 0.3) -> Path:
    folder.mkdir(parents=True)
    meta = CkptMeta(label_set="nih14", thresholds={k: threshold for k in labels}, ensemble=Ensemble(members))
    (folder / "config.json").write_text(json.dumps({"label_names": labels, **meta.apply({})}))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """weights/{a (64 px: a 2 x 2 grid), b (128 px: 4 x 4), ab = a + b, ac = a + a missing c} and models.yaml."""
    root = tmp_path_factory.mktemp("ensemble")
    labels = get_label_set("nih14")
    make_checkpoint(root / "weights" / "a", arch="resnet10t", img_size=64, seed=1)
    make_checkpoint(root / "weights" / "b", arch="test_efficientnet", img_size=128, seed=2)
    _write_ensemble(root / "weights" / "ab", ["a", "b"], labels)
    _write_ensemble(root / "weights" / "ac", ["a", "c"], labels)
    (root / "models.yaml").write_text("default: a\nmodels:\n" + "".join(f"  - {{name: {n}, local: {n}}}\n"
                                                                        for n in ("a", "b", "ab", "ac")))
    return root


@pytest.fixture
def tiny_env(tiny, monkeypatch) -> ModelRegistry:
    monkeypatch.setenv("CHESTXRAY_WEIGHTS", str(tiny / "weights"))
    monkeypatch.setenv("CHESTXRAY_MODELS", str(tiny / "models.yaml"))
    return ModelRegistry.from_yaml()


def test_the_mean_of_the_members_on_the_finest_grid(tiny_env, data_dir):
    registry = tiny_env
    ens = registry.get("ab")
    a, b = registry.get("a"), registry.get("b")
    assert ens.members[0] is a and ens.members[1] is b  # the registry's own models: no second copy
    xray = read_image(data_dir / FILM)
    got, ra, rb = ens.analyze(xray), a.analyze(xray), b.analyze(xray)
    assert np.allclose(got.probs, (ra.probs + rb.probs) / 2, atol=1e-6)
    assert ra.cams.shape[1:] == (2, 2) and rb.cams.shape[1:] == (4, 4) and got.cams.shape[1:] == (4, 4)
    assert np.allclose(got.cams, (upsample(ra.cams, (4, 4)) + rb.cams) / 2, atol=1e-6)
    assert got.thresholds == {k: 0.3 for k in ens.labels}  # the ensemble's own, on the mean's scale
    assert got.positives() == sorted((k for k, p in zip(got.labels, got.probs) if p >= 0.3),
                                     key=lambda k: -got.prob_dict()[k])
    assert got.cam("Effusion").shape == got.image.shape and got.overlay("Effusion").shape == (*got.image.shape, 3)
    assert got.warnings == ra.warnings  # the first member's gate
    assert ens.explain(xray, "Effusion").shape == (64, 64)  # the first member's input size
    assert np.allclose(ens.predict_batch([xray.pixels, xray.pixels]), [got.probs] * 2, atol=1e-6)


def test_registry_lists_it_and_a_missing_member_is_one_clear_line(tiny_env, data_dir, capsys):
    registry = tiny_env
    assert registry.available() == ["a", "b", "ab"]  # ac lacks its member c
    assert registry.missing_members("ac") == ["c"] and registry.missing_members("ab") == []
    assert registry.folder("ac").name == "ac"
    with pytest.raises(CheckpointError, match="ensemble 'ac' needs c, which is not installed"):
        registry.get("ac")
    film = str(data_dir / "nih/images_384/00000100_000.png")
    assert main(["predict", "--model", "ac", film]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ensemble member 'c' is not installed")
    with pytest.raises(CheckpointError, match="is an ensemble of a, b.*load_model"):
        load_folder(registry.folder("ab"))


def test_card_of_the_tiny_ensemble(tiny_env):
    from chestxray.report import card_summary
    from chestxray.serve.text import card_markdown

    card = tiny_env.card("ab")
    assert card["arch"].startswith("ensemble: mean of calibrated probabilities of a, b") and card["source"] == "a + b"
    assert card["thresholds"] == {k: 0.3 for k in get_label_set("nih14")} and "calibration" not in card
    text = card_markdown(card)
    assert "**ab**: an ensemble of a, b" in text and "no weights of its own" in text and "None px" not in text
    assert "nothing maps them" in text and "logit is divided" not in text  # no temperature of its own
    assert card_summary(card).startswith("ab: ensemble")


def test_batched_prediction_packs_each_members_own_input_when_they_prepare_films_differently(tiny_env, data_dir,
                                                                                            tmp_path):
    """a (64 px) and b (128 px): `chestxray predict` carries both inputs of each film in one packed row, and each
    member gets exactly its own preprocessing back, so the CSV equals `analyze` film by film."""
    from chestxray.ensemble import PackedPreprocess

    ens = tiny_env.get("ab")
    pre = ens.preprocess
    assert isinstance(pre, PackedPreprocess) and [p.size for p in pre.parts] == [(64, 64), (128, 128)]
    xray = read_image(data_dir / FILM)
    inputs = pre.unpack(torch.cat([pre(xray.pixels), pre(xray.pixels)]))
    for m in ens.members:
        assert torch.equal(inputs[m.preprocess], torch.cat([m.preprocess(xray.pixels)] * 2))
    films = [data_dir / FILM, data_dir / "nih/images_384/00000129_000.png", data_dir / "nih/images_384/00000100_000.png"]
    out = tmp_path / "p.csv"
    assert main(["predict", "--model", "ab", "--workers", "0", "--batch-size", "2", "--out", str(out),
                 *map(str, films)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(films)
    for row, film in zip(rows, films):
        a = ens.analyze(read_image(film))
        assert np.allclose([float(row[k]) for k in a.labels], a.probs, atol=1.01e-5) and row["error"] == ""


def test_config_block_round_trips():
    meta = CkptMeta.from_dict({"thresholds": {"Edema": 0.2}, "ensemble": {"members": ["x", "y"], "gate": "y",
                                                                          "img_size": 224, "future": 1}})
    assert meta.ensemble == Ensemble(["x", "y"], gate="y", img_size=224, extra={"future": 1})
    assert meta.ensemble.gate_member == "y" and CkptMeta.from_dict(meta.to_dict()) == meta
    assert CkptMeta.from_dict({"ensemble": {"members": []}}).ensemble is None  # no members: not an ensemble


# -- the shipped ensemble ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped() -> ModelRegistry:
    registry = ModelRegistry.from_yaml(REPO / "models.yaml")
    if SHIPPED not in registry.entries:
        pytest.fail(f"{SHIPPED} is not in models.yaml")
    return registry


def test_shipped_ensemble_is_the_mean_of_the_five_models(shipped, data_dir):
    assert SHIPPED in shipped.available()
    ens = shipped.get(SHIPPED)
    spec = ens.ckpt.spec
    assert [m.name for m in ens.members] == spec.members and len(spec.members) == 5
    assert all(m is shipped.get(name) for m, name in zip(ens.members, spec.members))  # shared, not reloaded
    assert ens.gate is shipped.get(spec.members[0]).gate is not None  # efficientnet_b0's input gate
    xray = read_image(data_dir / FILM)
    got = ens.analyze(xray)
    refs = [m.analyze(xray) for m in ens.members]
    assert np.allclose(got.probs, np.mean([r.probs for r in refs], axis=0), atol=1e-6)  # calibrated probabilities
    assert np.allclose(got.cams, np.mean([r.cams for r in refs], axis=0), atol=1e-6)  # all on 7 x 7
    config = json.loads((REPO / "weights" / SHIPPED / "config.json").read_text())
    assert got.thresholds == pytest.approx(config["chestxray"]["thresholds"])
    assert list(got.labels) == config["label_names"]
    assert got.calibrated and got.reference == refs[0].reference
    assert set(got.positives()) == {k for k, p in got.prob_dict().items() if p >= got.thresholds[k]}
    photo = read_image(data_dir / "ood/photo_china.jpg")
    warned = ens.analyze(photo).warnings
    assert warned and warned == ens.members[0].analyze(photo).warnings  # efficientnet_b0's gate on its features


def test_shipped_ensemble_in_the_app_service_and_its_card(shipped, data_dir):
    from chestxray.serve.service import Service
    from chestxray.serve.text import card_markdown

    svc = Service(shipped, warm_up=False)
    assert SHIPPED in svc.available
    answer = svc.predict(str(data_dir / FILM), SHIPPED)
    assert answer.labels == shipped.get(SHIPPED).labels and Path(answer.overlay).is_file()
    overlay, caption, _ = svc.explain("Effusion", "gradcam", 0.4, "probability", answer.state)
    assert Path(overlay).is_file() and "Effusion" in caption
    card = shipped.card(SHIPPED)
    assert card["img_size"] == 224 and card["threshold_rule"] == "spec90" and card["calibration"]["reference"]
    headline = next(iter(card["metrics"].values()))
    metrics = json.loads((REPO / "weights" / SHIPPED / "metrics.json").read_text())
    assert headline["mean_auroc"] == metrics["by_group"]["reproduce_chexnet"]["mean_auroc"]
    assert headline["n_images"] == metrics["by_group"]["reproduce_chexnet"]["n_images"]
    text = card_markdown(card)
    assert f"**{SHIPPED}**" in text and "efficientnet_b0" in text


def test_chestxray_predict_with_the_ensemble_equals_analyze(shipped, data_dir, tmp_path, capsys):
    films = [data_dir / FILM, data_dir / "nih/images_384/00000129_000.png"]
    out = tmp_path / "p.csv"
    assert main(["predict", "--model", SHIPPED, "--workers", "0", "--batch-size", "2", "--out", str(out),
                 *map(str, films)]) == 0
    rows = list(csv.DictReader(out.open()))
    ens = shipped.get(SHIPPED)
    for row, film in zip(rows, films):
        a = ens.analyze(read_image(film))
        assert np.allclose([float(row[k]) for k in a.labels], a.probs, atol=1.01e-5)
        assert row["above_threshold"] == ";".join(a.positives()) and row["error"] == ""


def _card_sources() -> list[str]:
    card = (REPO / "weights" / SHIPPED / "README.md").read_text()
    line = next(x for x in card.splitlines() if x.startswith(f"python -m chestxray evaluate --model {SHIPPED}"))
    return [s.split()[0] for s in line.split("--source ")[1:]]


def test_split_test_selects_the_cards_films_and_reproduces_its_numbers(shipped, data_dir, tmp_path):
    """`evaluate --split test` takes the films that are test films of every member: the card's films; the shipped
    probabilities give the card's figures through evaluate's own code; the ensemble reproduces them on a few films."""
    from chestxray.data import load_sources
    from chestxray.evaluate import evaluate_manifest, split_films

    ens = shipped.get(SHIPPED)
    folder = REPO / "weights" / SHIPPED
    metrics = json.loads((folder / "metrics.json").read_text())
    test = split_films(ens, load_sources(_card_sources(), str(data_dir), ens.labels, missing="drop"), "test")
    shipped_probs = pd.read_csv(folder / "predictions.csv")
    assert len(test) == metrics["n_images"] == len(shipped_probs)
    assert list(zip(test["source"], test["path"].map(lambda p: Path(p).name))) == list(
        zip(shipped_probs["source"], shipped_probs["image"]))
    for member in ens.members:  # none of them trained or was selected on any of these films
        s = pd.read_csv(member.split_files[0]).set_index(["source", "image"])["split"]
        assert (s.reindex(pd.MultiIndex.from_frame(shipped_probs[["source", "image"]])) == "test").all()
    again = evaluate_manifest(ens, test.reset_index(drop=True), tmp_path, n_boot=0, progress=False,
                              probs=shipped_probs[ens.labels].to_numpy(np.float32))
    for g, m in metrics["by_group"].items():
        assert again["by_group"][g]["mean_auroc"] == pytest.approx(m["mean_auroc"], abs=1e-4), g
    picks = test.reset_index(drop=True).groupby("source").head(1).index[:3]
    now = ens.predict_batch([read_image(p).pixels for p in test["path"].iloc[picks]])
    assert np.allclose(now, shipped_probs[ens.labels].to_numpy()[picks], atol=2e-5)  # members' 5 decimals, its own


def test_evaluate_on_the_cards_test_films_gives_its_probabilities(shipped, data_dir, tmp_path):
    """`evaluate --split test`'s path with the ensemble's fresh forwards (read, each member's preprocessing, the
    mean) on a few of the card's test films of each source: the card's probabilities. (All 1,182 films take ten
    minutes on 2 cores; the test above gives the card's figures from these probabilities.)"""
    from chestxray.data import load_sources
    from chestxray.evaluate import evaluate_manifest, split_films

    ens = shipped.get(SHIPPED)
    test = split_films(ens, load_sources(_card_sources(), str(data_dir), ens.labels, missing="drop"), "test")
    few = test.groupby("source").head(2).reset_index(drop=True)
    assert few["source"].nunique() >= 4  # covid, kermany, nih384, nih64 (tbx11k carries none of the 14)
    evaluate_manifest(ens, few, tmp_path, n_boot=0, progress=False)
    got = pd.read_csv(tmp_path / "predictions.csv")
    want = pd.read_csv(REPO / "weights" / SHIPPED / "predictions.csv").set_index(["source", "image"])
    want = want.loc[list(zip(got["source"], got["image"]))]
    assert len(got) == len(few)
    np.testing.assert_allclose(got[ens.labels].to_numpy(), want[ens.labels].to_numpy(), atol=2e-5)


@pytest.mark.slow  # the 98 balanced validation films through five models
def test_thresholds_are_spec90_on_every_members_validation_films(shipped, data_dir):
    from chestxray.data import load_sources
    from chestxray.ensemble_release import mean_probabilities, member_probabilities
    from chestxray.evaluate import split_films
    from chestxray.metrics import choose_threshold

    ens = shipped.get(SHIPPED)
    val = split_films(ens, load_sources(_card_sources(), str(data_dir), ens.labels, missing="drop"), "val")
    val = val[(val["cohort"] == "reproduce_chexnet").to_numpy()]
    assert len(val) == json.loads((REPO / "weights" / SHIPPED / "metrics.json").read_text())[
        "thresholds_chosen_on"]["n_images"]
    P = mean_probabilities(member_probabilities(ens, list(val["path"]))).astype(np.float64)
    Y = val[ens.labels].to_numpy(np.float64)
    for i, k in enumerate(ens.labels):
        assert ens.thresholds[k] == pytest.approx(choose_threshold(Y[:, i], P[:, i], "spec90"), abs=1e-6), k


def test_the_shipped_cv_ensemble_is_rebuilt_from_its_members_out_of_fold_predictions(data_dir, tmp_path):
    """weights/ensemble_cv's thresholds and figures come back from its members' shipped out-of-fold
    predictions.csv (`chestxray ensemble --cv`, its card's Reproduce line), and a film's fresh forward through the
    all-data members agrees with the mean of the members' own analyses."""
    from chestxray.ensemble import load_model
    from chestxray.ensemble_cv import build_cv_ensemble

    folder = REPO / "weights" / "ensemble_cv"
    shipped = CkptMeta.read(folder)
    assert shipped.metrics.split == "out-of-fold" and len(shipped.ensemble.members) >= 2
    again = CkptMeta.read(build_cv_ensemble(shipped.ensemble.members, "ensemble_cv", dest_root=tmp_path,
                                            data_root=data_dir, n_boot=20, timing_runs=0))
    assert again.thresholds == shipped.thresholds
    assert again.metrics.n_test_images == shipped.metrics.n_test_images
    for g, v in shipped.metrics.mean_auroc.items():
        assert again.metrics.mean_auroc[g] == pytest.approx(v, abs=1e-6), g
    ens = load_model(str(folder))
    xray = read_image(data_dir / FILM)
    np.testing.assert_allclose(ens.analyze(xray).probs, np.mean([m.analyze(xray).probs for m in ens.members], axis=0),
                               atol=1e-6)
