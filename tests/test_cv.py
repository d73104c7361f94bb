"""Cross-validation (``chestxray cv``) on real NIH films: patient-wise folds, out-of-fold predictions
through the product path, pooled evaluation, resume fold by fold."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from chestxray import cv
from chestxray.calibration import sigmoid
from chestxray.data import load_sources, patient_folds, read_manifest
from chestxray.evaluate import predict_paths
from chestxray.labels import get_label_set
from chestxray.metrics import mean_auroc
from chestxray.predictor import Predictor
from chestxray.training import TrainConfig, Trainer

N_IMAGES = 60
FOLDS = 3


@pytest.fixture(scope="module")
def small_csv(data_dir, tmp_path_factory):
    """Real NIH films: label-balanced and darkcovidnet films mixed, with their patients."""
    df = pd.read_csv(data_dir / "nih/images_384/labels.csv")
    balanced = df[df["source"] == "reproduce_chexnet"].head(N_IMAGES // 2)
    other = df[df["source"] != "reproduce_chexnet"].head(N_IMAGES // 2)
    path = tmp_path_factory.mktemp("cvcsv") / "labels.csv"
    pd.concat([balanced, other]).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory, small_csv, data_dir):
    tmp = tmp_path_factory.mktemp("cv")
    cfg = TrainConfig(arch="test_efficientnet", csv=str(small_csv), images=str(data_dir / "nih/images_384"),
                      img_size=64, batch_size=16, epochs=2, lr=3e-3, augment=0.0, drop_rate=0.0, warmup_epochs=0,
                      out=str(tmp / "cv"), cache_dir=str(tmp / "cache"), workers=1, eval_boot=50, half=False,
                      cohort_fracs=["reproduce_chexnet=0.25:0.25"], val_sources=["reproduce_chexnet"],
                      threshold_rule="spec90")
    summary = cv.run_cv(cfg, FOLDS, localize=False, progress=False)
    return cfg, summary


def test_patient_folds_keep_patients_together_and_share_the_balanced_films(data_dir):
    df = load_sources(["nih384", "covid"], data_dir, get_label_set("nih14"))
    fold = patient_folds(df, 5, seed=0, cohorts=["reproduce_chexnet"])
    assert set(fold) == set(range(5))
    assert pd.Series(fold).groupby(df["patient"]).nunique().max() == 1
    sizes = pd.Series(fold).value_counts()
    assert sizes.max() - sizes.min() <= 0.1 * len(df)
    balanced = pd.Series(fold[(df["cohort"] == "reproduce_chexnet").to_numpy()]).value_counts()
    assert len(balanced) == 5 and balanced.min() >= 0.5 * balanced.mean()
    # A rare finding's positives (13 films) are spread over the folds, not piled into a few.
    assert pd.Series(fold[(df["Hernia"] == 1).to_numpy()]).nunique() == 5
    # Same input, same folds (every fold's run rebuilds them on its own).
    assert (patient_folds(df, 5, seed=0, cohorts=["reproduce_chexnet"]) == fold).all()
    with pytest.raises(ValueError, match="at least 2 folds"):
        patient_folds(df, 1)


def test_every_film_is_held_out_once_by_a_model_that_never_trained_on_it(cv_run, small_csv):
    cfg, summary = cv_run
    oof = pd.concat([pd.read_csv(os.path.join(cfg.out, f"fold{i}", cv.OOF_FILE)) for i in range(FOLDS)])
    names = oof["image"].map(os.path.basename)
    assert sorted(names) == sorted(pd.read_csv(small_csv)["Image Index"])
    for i in range(FOLDS):
        m = pd.read_csv(os.path.join(cfg.out, f"fold{i}", "manifest.csv"))
        held = set(m.loc[m["split"] == "val", "patient"])
        assert held == set(oof.loc[oof["fold"] == i, "patient"])
        assert not held & set(m.loc[m["split"] == "train", "patient"])
        assert set(m["split"]) == {"train", "val"}  # no test split: the held-out fold is the test
        # A fixed schedule: the fold's model is its last epoch, whatever the held-out films said.
        saved = json.loads(open(os.path.join(cfg.out, f"fold{i}", "best", "config.json")).read())
        assert saved["chestxray"]["training"]["epoch"] == cfg.epochs
    assert summary["n_films"] == N_IMAGES and summary["folds"] == FOLDS


def test_out_of_fold_logits_are_the_fold_models_product_path(cv_run, data_dir):
    cfg, _ = cv_run
    oof = pd.read_csv(os.path.join(cfg.out, "fold1", cv.OOF_FILE))
    labels = [c[len(cv.LOGIT):] for c in oof.columns if c.startswith(cv.LOGIT)]
    pred = Predictor.load(os.path.join(cfg.out, "fold1", "best"), device="cpu")
    z, _ = predict_paths(pred, [str(data_dir / p) for p in oof["image"][:4]], progress=False, logits=True)
    np.testing.assert_allclose(oof[[cv.LOGIT + k for k in labels]].to_numpy()[:4], z, rtol=1e-4, atol=1e-4)


def test_pooled_evaluation_uses_thresholds_and_temperatures_fitted_out_of_fold(cv_run):
    cfg, summary = cv_run
    metrics = json.loads(open(os.path.join(cfg.out, "eval", "metrics.json")).read())
    oof = pd.concat([pd.read_csv(os.path.join(cfg.out, f"fold{i}", cv.OOF_FILE)) for i in range(FOLDS)])
    labels = [c[len(cv.LOGIT):] for c in oof.columns if c.startswith(cv.LOGIT)]
    Y, Z = oof[labels].to_numpy(np.float64), oof[[cv.LOGIT + k for k in labels]].to_numpy(np.float64)
    bal = (oof["cohort"] == "reproduce_chexnet").to_numpy()
    df = oof.reset_index(drop=True)
    thresholds, cal = cv.fit_on_oof(df, Y, Z, labels, bal, "spec90", cfg.data_root, "oof")
    assert summary["thresholds"] == thresholds and summary["temperatures"] == cal.temperatures
    # The headline is the AUROC of the product's calibrated float32 probabilities of the out-of-fold logits. The
    # calibration keeps each label's order, so it is the logits' AUROC up to float32 ties, which a near-chance
    # tiny model with large temperatures can make (0.5003 against 0.5006 in one run of the whole suite).
    predictor = cv.oof_predictor(Path(cfg.out) / "fold0", thresholds, cal)
    P = predictor.probabilities(torch.from_numpy(Z.astype(np.float32))).numpy().astype(np.float64)
    assert summary["mean_auroc"]["reproduce_chexnet"] == pytest.approx(mean_auroc(Y[bal], P[bal]), abs=1e-4)
    assert summary["mean_auroc"]["reproduce_chexnet"] == pytest.approx(mean_auroc(Y[bal], sigmoid(Z[bal])), abs=0.01)
    assert metrics["by_group"]["reproduce_chexnet"]["n_images"] == int(bal.sum())
    # Beside the headline, the findings alone (No Finding left out), from the same probabilities.
    findings, k = summary["findings_mean_auroc"], [j for j, n in enumerate(labels) if n != "No Finding"]
    assert findings["group"] == "reproduce_chexnet" and findings["labels"] == len(labels) - 1 == len(k)
    assert findings["mean_auroc"] == pytest.approx(mean_auroc(Y[bal][:, k], P[bal][:, k]), abs=1e-4)
    table = metrics["by_group"]["reproduce_chexnet"]["labels"]
    aucs = [table[n]["auroc"] for n in labels if n != "No Finding" and table.get(n, {}).get("auroc") is not None]
    assert findings["mean_auroc"] == pytest.approx(np.mean(aucs), abs=1e-4)
    assert findings["mean_auroc_ci"][0] <= findings["mean_auroc"] <= findings["mean_auroc_ci"][1]
    for name in ("roc.png", "confusion.png", "reliability.png", "predictions.csv"):
        assert os.path.getsize(os.path.join(cfg.out, "eval", name)) > 0
    assert [f["fold"] for f in summary["per_fold"]] == list(range(FOLDS))
    assert all(len(f["val_curve"]) == cfg.epochs for f in summary["per_fold"])


def test_a_second_run_resumes_without_retraining(cv_run):
    cfg, summary = cv_run
    fold = os.path.join(cfg.out, "fold2")
    stamp = os.path.getmtime(os.path.join(fold, "best", "model.safetensors"))
    before = pd.read_csv(os.path.join(fold, cv.OOF_FILE))
    os.remove(os.path.join(fold, cv.OOF_FILE))  # e.g. killed while predicting: predicted again, same numbers
    again = cv.run_cv(cfg, FOLDS, localize=False, progress=False)
    assert os.path.getmtime(os.path.join(fold, "best", "model.safetensors")) == stamp
    pd.testing.assert_frame_equal(pd.read_csv(os.path.join(fold, cv.OOF_FILE)), before, atol=1e-5)
    assert again["mean_auroc"] == summary["mean_auroc"]


def test_a_record_carries_the_finished_folds_to_another_machine_without_weights(cv_run, tmp_path):
    cfg, summary = cv_run
    record = tmp_path / "record"
    cv.run_cv(cfg, FOLDS, localize=False, progress=False, record=record)  # every fold done: kept, not retrained
    assert sorted(p.name for p in record.iterdir()) == ["cv.json", "eval"] + [f"fold{i}" for i in range(FOLDS)]
    assert (record / "fold1" / cv.OOF_FILE).is_file() and (record / "fold1" / "best" / "config.json").is_file()
    assert not list(record.rglob("*.safetensors")) and not list(record.rglob("*.pt"))
    elsewhere = dataclasses.replace(cfg, out=str(tmp_path / "new-machine"))
    again = cv.run_cv(elsewhere, FOLDS, localize=False, progress=False, record=record)
    assert not list((tmp_path / "new-machine").rglob("*.safetensors"))  # nothing trained there
    assert again["mean_auroc"] == summary["mean_auroc"] and again["thresholds"] == summary["thresholds"]
    assert again["temperatures"] == summary["temperatures"]


def test_a_fold_trained_again_never_overwrites_its_record(cv_run, tmp_path, capsys):
    """A fold whose held-out logits differ from the recorded ones (e.g. retrained for a student's teacher
    weights) stops the run with one line before anything is trained or pooled; the record is left as it was."""
    cfg, _ = cv_run
    record = tmp_path / "record"
    cv.run_cv(cfg, FOLDS, localize=False, progress=False, record=record)
    here = dataclasses.replace(cfg, out=str(tmp_path / "here"))
    shutil.copytree(cfg.out, here.out)
    oof = pd.read_csv(Path(here.out) / "fold1" / cv.OOF_FILE)
    logit = [c for c in oof.columns if c.startswith(cv.LOGIT)][0]
    oof[logit] += 0.25  # another training of fold 1
    oof.to_csv(Path(here.out) / "fold1" / cv.OOF_FILE, index=False)
    before = {p: p.read_bytes() for p in record.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="another training of the fold"):
        cv.run_cv(here, FOLDS, localize=False, progress=False, record=record)
    assert {p: p.read_bytes() for p in record.rglob("*") if p.is_file()} == before
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**dataclasses.asdict(here), "folds": FOLDS}))
    assert cv.main(["--config", str(recipe), "--record", str(record), "--localize", "false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another training of the fold" in err[0]
    assert {p: p.read_bytes() for p in record.rglob("*") if p.is_file()} == before


def test_cv_command_rejects_a_fold_outside_the_folds(capsys):
    assert cv.main(["--folds", "3", "--only-fold", "3"]) == 2
    assert "--only-fold 3 is not among the 3 folds" in capsys.readouterr().err


@pytest.fixture(scope="module")
def all_data_run(cv_run):
    """The cross-validated recipe trained once more on every film (split all), as the shipped weights are."""
    cfg, _ = cv_run
    from chestxray.training import train

    acfg = dataclasses.replace(cfg, split="all", select="last", out=os.path.join(os.path.dirname(cfg.out), "all"))
    train(acfg)
    return acfg


def test_all_data_run_trains_on_every_film_for_the_fixed_schedule(all_data_run, small_csv):
    m = pd.read_csv(os.path.join(all_data_run.out, "manifest.csv"))
    assert set(m["split"]) == {"train"} and len(m) == N_IMAGES
    log = pd.read_csv(os.path.join(all_data_run.out, "log.csv"))
    assert list(log["epoch"]) == list(range(1, all_data_run.epochs + 1)) and log["val_mean_auroc"].isna().all()
    saved = json.loads(open(os.path.join(all_data_run.out, "best", "config.json")).read())["chestxray"]
    assert saved["training"]["epoch"] == all_data_run.epochs and not saved["thresholds"]
    with pytest.raises(ValueError, match="select last"):
        Trainer(dataclasses.replace(all_data_run, select="best"))


def test_release_from_cv_ships_the_cross_validated_figures_thresholds_and_calibration(cv_run, all_data_run,
                                                                                       tmp_path, capsys):
    from chestxray.ckpt_config import CkptMeta
    from chestxray.cli import main as cli_main
    from chestxray.release_cv import release_from_cv

    cfg, summary = cv_run
    dest = release_from_cv(all_data_run.out, cfg.out, "allfilms", dest_root=tmp_path, fit_gate=False)
    meta = CkptMeta.read(dest)
    assert meta.thresholds == pytest.approx(summary["thresholds"])
    assert meta.calibration.temperatures == summary["temperatures"]
    assert meta.metrics.split == "out-of-fold" and meta.metrics.extra["cross_validation"]["folds"] == FOLDS
    assert meta.metrics.mean_auroc["reproduce_chexnet"] == pytest.approx(summary["mean_auroc"]["reproduce_chexnet"], abs=1e-4)
    assert json.loads((dest / "metrics.json").read_text()) == json.loads(
        open(os.path.join(cfg.out, "eval", "metrics.json")).read())
    assert set(pd.read_csv(dest / "splits.csv")["split"]) == {"train"}
    card = (dest / "README.md").read_text()
    assert f"## Cross-validated results ({FOLDS}-fold, out of fold)" in card
    assert "no shared film can test them" in card and "Results on held-out patients" not in card
    # The shipped thresholds flag what the cross-validation's thresholds flag, on the reported scale.
    pred = Predictor.load(str(dest), device="cpu")
    assert pred.thresholds == pytest.approx(meta.calibrated_thresholds())
    # A run of another recipe is refused, in one line, naming what differs.
    other = os.path.join(os.path.dirname(all_data_run.out), "other")
    shutil.copytree(all_data_run.out, other)
    tc = json.loads(open(os.path.join(other, "train_config.json")).read())
    tc["lr"] = tc["lr"] * 2
    open(os.path.join(other, "train_config.json"), "w").write(json.dumps(tc))
    assert cli_main(["release", other, "--cv", cfg.out, "--dest", str(tmp_path), "--no-gate"]) != 0
    err = capsys.readouterr().err.strip()
    assert "not the cross-validated recipe: lr" in err and len(err.splitlines()) == 1


def test_the_gate_is_fitted_on_the_first_fold_that_kept_its_manifest(tmp_path):
    """Folds restored from results/cv have no manifest.csv; the release must use one trained here, or say why not."""
    from chestxray.release_cv import gate_fold

    for i in range(3):
        (tmp_path / f"fold{i}").mkdir()
    with pytest.raises(ValueError, match="no fold holds its manifest.csv"):
        gate_fold(tmp_path)
    (tmp_path / "fold2" / "manifest.csv").write_text("path,split\n")
    (tmp_path / "fold1" / "manifest.csv").write_text("path,split\n")
    assert gate_fold(tmp_path) == (1, tmp_path / "fold1" / "manifest.csv")


@pytest.fixture(scope="module")
def cv_members(cv_run, all_data_run, tmp_path_factory):
    """Two cross-validated recipes on the same folds (the second with another learning rate, the same seed),
    each trained once more on every film and released: ``<root>/{m1, m2}``, as weights/ holds them."""
    from chestxray.release_cv import release_from_cv
    from chestxray.training import train

    cfg, _ = cv_run
    base = os.path.dirname(cfg.out)
    cfg2 = dataclasses.replace(cfg, lr=cfg.lr / 3, out=os.path.join(base, "cv2"))
    cv.run_cv(cfg2, FOLDS, localize=False, progress=False)
    all2 = dataclasses.replace(cfg2, split="all", select="last", out=os.path.join(base, "all2"))
    train(all2)
    root = tmp_path_factory.mktemp("cv_members")
    release_from_cv(all_data_run.out, cfg.out, "m1", dest_root=root, fit_gate=False)
    release_from_cv(all2.out, cfg2.out, "m2", dest_root=root, fit_gate=False)
    return root


def test_a_cv_ensemble_is_the_mean_of_its_members_out_of_fold_probabilities(cv_members, cv_run, data_dir,
                                                                            monkeypatch, capsys):
    from chestxray.ckpt_config import CkptMeta
    from chestxray.cli import main as cli_main
    from chestxray.ensemble import EnsemblePredictor, load_model
    from chestxray.ensemble_cv import build_cv_ensemble
    from chestxray.imaging import read_image
    from chestxray.metrics import choose_threshold
    from tests.helpers import make_checkpoint

    monkeypatch.setenv("CHESTXRAY_WEIGHTS", str(cv_members))
    cfg, _ = cv_run
    films = read_manifest(cfg.csv, cfg.images, get_label_set("nih14"), source="labels")  # its own label file
    dest = build_cv_ensemble(["m1", "m2"], "mm", data_root=data_dir, n_boot=50, timing_runs=0, manifest=films)
    oof = pd.concat([pd.read_csv(os.path.join(cfg.out, f"fold{i}", cv.OOF_FILE)) for i in range(FOLDS)])
    oof = oof.assign(image=oof["image"].map(os.path.basename)).set_index("image").sort_index()
    labels = [c[len(cv.LOGIT):] for c in oof.columns if c.startswith(cv.LOGIT)]
    members = [pd.read_csv(cv_members / m / "predictions.csv").set_index("image").loc[oof.index, labels]
               for m in ("m1", "m2")]
    # The mean of the members' shipped out-of-fold probabilities, as the ensemble takes it (float32, torch mean).
    P = torch.from_numpy(np.stack([m.to_numpy(np.float32) for m in members])).mean(dim=0).numpy().astype(np.float64)
    Y = oof[labels].to_numpy(np.float64)
    bal = (oof["cohort"] == "reproduce_chexnet").to_numpy()
    meta = CkptMeta.read(dest)
    assert meta.metrics.split == "out-of-fold" and meta.metrics.extra["cross_validation"]["folds"] == FOLDS
    assert meta.metrics.mean_auroc["reproduce_chexnet"] == pytest.approx(mean_auroc(Y[bal], P[bal]), abs=1e-4)
    for i, k in enumerate(labels):  # fitted on the balanced films' mean out-of-fold probabilities, by the rule
        assert meta.thresholds[k] == pytest.approx(choose_threshold(Y[bal, i], P[bal, i], "spec90"), abs=1e-6)
    metrics = json.loads((dest / "metrics.json").read_text())
    for i, m in enumerate(("m1", "m2")):  # each member's row: its own shipped out-of-fold probabilities, same films
        row = metrics["members"][m]["mean_auroc"]["reproduce_chexnet"]["mean_auroc"]
        assert row == pytest.approx(mean_auroc(Y[bal], members[i].to_numpy(np.float64)[bal]), abs=1e-6)
        # its card's figure, from float32 probabilities: 5 decimals can break a few ties of a near-chance model
        assert row == pytest.approx(CkptMeta.read(cv_members / m).metrics.mean_auroc["reproduce_chexnet"], abs=0.01)
        assert set(metrics["paired_against_members"][m]) == {"reproduce_chexnet"}  # no nih384 films here
    card = (dest / "README.md").read_text()
    assert f"## Cross-validated results ({FOLDS}-fold, out of fold)" in card and "no shared film can test them" in card
    assert "test films in every member" not in card
    # The folder serves like any ensemble: the mean of the all-data members on a film.
    ens = load_model(str(dest))
    assert isinstance(ens, EnsemblePredictor)
    xray = read_image(data_dir / "nih/images_384/00000100_000.png")
    expect = np.mean([m.analyze(xray).probs for m in ens.members], axis=0)
    np.testing.assert_allclose(ens.analyze(xray).probs, expect, atol=1e-6)
    # Members cross-validated on other folds, or not cross-validated at all, are refused in one line.
    other = cv_members / "m3"
    shutil.copytree(cv_members / "m2", other)
    c = json.loads((other / "config.json").read_text())
    c["chestxray"]["training"]["recipe"]["seed"] = 7
    (other / "config.json").write_text(json.dumps(c))
    assert cli_main(["ensemble", "--cv", "--name", "bad", "--members", "m1", "m3", "--dest", str(cv_members),
                     "--data-root", str(data_dir), "--timing-runs", "0"]) != 0
    err = capsys.readouterr().err.strip()
    assert "differ in their cross-validation folds" in err and len(err.splitlines()) == 1
    make_checkpoint(cv_members / "plain", seed=4)
    with pytest.raises(Exception, match="was not released from a cross-validation"):
        build_cv_ensemble(["m1", "plain"], "bad", data_root=data_dir, timing_runs=0, manifest=films)


def test_a_student_cross_validated_with_teacher_cv_holds_out_exactly_its_fold_teachers_patients(cv_run, data_dir,
                                                                                                tmp_path):
    """Fold i of the student is taught by the teacher's fold-i model and holds out the patients that model held
    out; films of patients the teacher never had are folded anew among themselves, each patient in one fold."""
    from chestxray.training import build_manifest

    cfg, _ = cv_run
    teacher = pd.concat([pd.read_csv(os.path.join(cfg.out, f"fold{i}", cv.OOF_FILE)) for i in range(FOLDS)])
    labels = pd.read_csv(data_dir / "nih/images_384/labels.csv")
    full = read_manifest(data_dir / "nih/images_384/labels.csv", cfg.images, get_label_set("nih14"), source="labels")
    never = full.loc[~full["patient"].isin(teacher["patient"]), "path"].map(os.path.basename)
    extra = labels[labels["Image Index"].isin(set(never))].head(12)  # films of patients the teacher never had
    csv_path = tmp_path / "labels.csv"
    pd.concat([pd.read_csv(cfg.csv), extra]).to_csv(csv_path, index=False)
    student = dataclasses.replace(cfg, arch="resnet10t", csv=str(csv_path), teacher_cv=cfg.out, epochs=1,
                                  out=str(tmp_path / "student"))
    for i in range(FOLDS):
        fcfg = cv.fold_config(student, FOLDS, i, student.out)
        assert fcfg.teacher == [os.path.join(cfg.out, f"fold{i}", "best")]
        m = build_manifest(fcfg, get_label_set("nih14"))
        held = m[m["split"] == "val"]
        old = held[held["patient"].isin(teacher["patient"])]
        assert set(old["patient"]) == set(teacher.loc[teacher["fold"] == i, "patient"])
    assert m["fold"].groupby(m["patient"]).nunique().max() == 1
    new = m[~m["patient"].isin(teacher["patient"])]
    assert len(new) == len(extra) and new["fold"].nunique() > 1
    summary = cv.run_fold(student, FOLDS, 0, student.out)  # trains on the teacher's soft targets of fold 0
    assert list(summary.glob("teacher_probs_*.npy"))
    saved = json.loads((summary / "train_config.json").read_text())
    assert saved["teacher"] == [os.path.join(cfg.out, "fold0", "best")] and saved["teacher_cv"] == cfg.out
    with pytest.raises(ValueError, match="3 folds with oof.csv, the recipe has 4"):
        build_manifest(dataclasses.replace(student, folds=4, fold=0), get_label_set("nih14"))
