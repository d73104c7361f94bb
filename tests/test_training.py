"""Training on real images: the loss falls, runs resume, checkpoints load everywhere, evaluate/release work."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import timm
import torch

from chestxray.checkpoint import load_folder
from chestxray.evaluate import evaluate
from chestxray.predictor import Predictor, as_pixels
from chestxray.training import TrainConfig, Trainer, train
from tests.conftest import REPO

N_IMAGES = 72


@pytest.fixture(scope="module")
def small_csv(data_dir, tmp_path_factory):
    """A real NIH label file cut to a few dozen images (findings and No Finding mixed)."""
    df = pd.read_csv(data_dir / "nih/images_384/labels.csv")
    sick = df[df["Finding Labels"] != "No Finding"].head(N_IMAGES // 2)
    healthy = df[df["Finding Labels"] == "No Finding"].head(N_IMAGES // 2)
    path = tmp_path_factory.mktemp("csv") / "labels.csv"
    pd.concat([sick, healthy]).to_csv(path, index=False)
    return path


def _cfg(tmp_path, small_csv, data_dir, **kw) -> TrainConfig:
    base = dict(arch="test_efficientnet", csv=str(small_csv), images=str(data_dir / "nih/images_384"),
                img_size=64, batch_size=16, epochs=6, lr=3e-3, augment=0.0, drop_rate=0.0, warmup_epochs=0,
                out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), val_frac=0.2, test_frac=0.2,
                patience=100, workers=1, eval_boot=0, half=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_csv, data_dir):
    tmp = tmp_path_factory.mktemp("train")
    cfg = _cfg(tmp, small_csv, data_dir)
    return cfg, train(cfg)


def test_loss_falls_and_checkpoint_is_written(trained):
    cfg, best = trained
    log = pd.read_csv(os.path.join(cfg.out, "log.csv"))
    assert len(log) == cfg.epochs
    assert log["train_loss"].iloc[-1] < 0.8 * log["train_loss"].iloc[0]
    saved = json.loads((best / "config.json").read_text())
    assert saved["chestxray"]["training"]["threshold_rule"] == "youden"
    assert set(saved["chestxray"]["thresholds"]) == set(saved["label_names"])
    resolved = json.loads(open(os.path.join(cfg.out, "train_config.json")).read())
    assert resolved["arch"] == "test_efficientnet" and resolved["img_size"] == 64


def test_split_is_by_patient(trained):
    cfg, _ = trained
    m = pd.read_csv(os.path.join(cfg.out, "manifest.csv"))
    per_patient = m.groupby("patient")["split"].nunique()
    assert per_patient.max() == 1 and set(m["split"]) == {"train", "val", "test"}


def test_trained_checkpoint_loads_in_predictor_and_plain_timm(trained, data_dir):
    _, best = trained
    pred = Predictor(load_folder(best), device="cpu")
    img = data_dir / "nih/images_384/00000100_000.png"
    probs = pred.predict(img)
    plain = timm.create_model(f"local-dir:{best}", pretrained=True).eval()
    x = pred.preprocess(as_pixels(img))
    with torch.no_grad():
        p2 = torch.sigmoid(plain(x))[0].numpy()
    np.testing.assert_allclose(list(probs.values()), p2, atol=1e-5)


@pytest.mark.slow
def test_resume_continues_where_it_stopped(tmp_path, small_csv, data_dir):
    train(_cfg(tmp_path, small_csv, data_dir, epochs=3, max_steps=0))
    first = pd.read_csv(tmp_path / "run/log.csv")
    train(_cfg(tmp_path, small_csv, data_dir, epochs=4, resume=True))
    log = pd.read_csv(tmp_path / "run/log.csv")
    assert list(log["epoch"]) == [1, 2, 3, 4]
    assert log.iloc[:3].equals(first)


@pytest.mark.slow
def test_a_resumed_run_is_the_run_that_never_stopped(tmp_path, small_csv, data_dir):
    # Augmentation and dropout on: both random streams have to go on across the stop, not start again.
    kw = dict(epochs=4, augment=1.0, drop_rate=0.2)
    train(_cfg(tmp_path / "whole", small_csv, data_dir, **kw))
    whole = pd.read_csv(tmp_path / "whole/run/log.csv")
    steps = json.loads((tmp_path / "whole/run/last_state.json").read_text())["step"] // 4
    train(_cfg(tmp_path / "cut", small_csv, data_dir, max_steps=2 * steps, **kw))  # stops after epoch 2
    assert len(pd.read_csv(tmp_path / "cut/run/log.csv")) == 2
    train(_cfg(tmp_path / "cut", small_csv, data_dir, resume=True, **kw))
    resumed = pd.read_csv(tmp_path / "cut/run/log.csv")
    cols = ["epoch", "train_loss", "val_loss", "val_mean_auroc", "lr"]
    pd.testing.assert_frame_equal(resumed[cols], whole[cols])


def test_reshuffle_gives_each_epoch_its_own_film_order(tmp_path, small_csv, data_dir):
    def films(reshuffle: bool) -> list[torch.Tensor]:
        """The training films of epochs 0 and 1, in loader order (one cache built per setting)."""
        trainer = Trainer(_cfg(tmp_path, small_csv, data_dir, reshuffle=reshuffle))
        trainer.prepare()
        return [torch.cat([x for x, _ in trainer.loader("train", True, epoch)]) for epoch in (0, 1)]

    fixed, reshuffled = films(False), films(True)
    assert torch.equal(fixed[0], fixed[1])  # the recorded recipes' order: one for every epoch
    assert not torch.equal(reshuffled[0], reshuffled[1])
    assert torch.equal(reshuffled[0], fixed[0])  # epoch 0 unchanged: recorded folds still retrain


def test_repeat_weighs_training_films_only(tmp_path, small_csv, data_dir):
    """``repeat`` multiplies a source's training films (and their share of pos_weight); validation and test
    films, which choose and score, are never repeated."""
    plain = Trainer(_cfg(tmp_path, small_csv, data_dir))
    plain.prepare()
    source = plain.df["source"].iloc[0]
    twice = Trainer(_cfg(tmp_path, small_csv, data_dir, repeat=[f"{source}=2"]))
    twice.prepare()
    assert len(twice.sets["train"]) == 2 * len(plain.sets["train"]) > 0
    for split in ("val", "test", "select"):
        assert twice.sets[split].df["path"].tolist() == plain.sets[split].df["path"].tolist()
    assert torch.allclose(twice.pos_weight, plain.pos_weight)  # the same films twice: the same balance
    served = sum(len(x) for x, _ in twice.loader("train", True))  # full batches of the repeated films
    assert served == len(twice.sets["train"]) // 16 * 16 > len(plain.sets["train"])
    # The card's "saw N training images" counts films: a film drawn twice an epoch is still one film.
    twice.build_model()
    best = twice.save_best(np.zeros((0, len(twice.labels))), np.zeros((0, len(twice.labels))), 1, float("nan"))
    saw = json.loads((best / "config.json").read_text())["chestxray"]["training"]["n_images"]
    assert saw["train"] == len(plain.sets["train"]) == twice.sets["train"].df["path"].nunique()


def test_evaluate_writes_metrics_and_plots(trained, small_csv, data_dir, tmp_path):
    _, best = trained
    m = evaluate(str(best), tmp_path / "eval", labels_csv=str(small_csv), images=str(data_dir / "nih/images_384"),
                 n_boot=50, progress=False)
    for f in ("metrics.json", "roc.png", "confusion.png", "predictions.csv"):
        assert (tmp_path / "eval" / f).stat().st_size > 0
    saved = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert saved["n_images"] == N_IMAGES and saved["mean_auroc"] == m["mean_auroc"]
    eff = saved["labels"]["No Finding"]
    assert {"auroc", "auroc_ci", "accuracy", "precision", "recall", "f1", "support_pos"} <= set(eff)
    # A label without positives (or negatives) among these films is reported as undefined, the others with
    # their real support: here Hernia, counted from the label file itself.
    rows = pd.read_csv(small_csv)["Finding Labels"].str.split("|")
    hernia = int(rows.map(lambda f: "Hernia" in f).sum())
    assert ("Hernia" in saved["undefined_labels"]) == (hernia in (0, N_IMAGES))
    assert saved["labels"]["Hernia"]["support_pos"] == hernia
    nf = int(rows.map(lambda f: f == ["No Finding"]).sum())
    assert "No Finding" not in saved["undefined_labels"] and eff["support_pos"] == nf == N_IMAGES // 2


def test_release_and_evaluate_reproduce_the_card(trained, tmp_path, data_dir, small_csv):
    from chestxray.release import release

    cfg, _ = trained
    dest = release(cfg.out, "tiny", dest_root=tmp_path / "weights", n_boot=50, fit_gate=False, progress=False,
                   localize=False)  # the pointing game has its own tests (test_localization.py)
    for f in ("config.json", "model.safetensors", "README.md", "splits.csv", "metrics.json", "roc.png",
              "training_curves.png"):
        assert (dest / f).is_file(), f
    card = (dest / "README.md").read_text()
    assert card.startswith("---\n") and "model-index" in card and "Not a medical device" in card
    cfg_json = json.loads((dest / "config.json").read_text())
    half = cfg_json["chestxray"]["metrics"]["float16_check"]
    assert half["max_abs_prob_diff"] < 5e-3
    # The balanced NIH films are their own group and the headline; the mixed set stands beside it.
    summary = cfg_json["chestxray"]["metrics"]
    test_cohorts = set(pd.read_csv(cfg.out + "/manifest.csv").query("split == 'test'")["cohort"])
    assert summary["headline_group"] == ("reproduce_chexnet" if "reproduce_chexnet" in test_cohorts else "nih384")
    assert test_cohorts <= set(summary["mean_auroc"]) and "flags_per_normal_film" in summary
    assert "Initialised from: random (from scratch)" in card and "Grad-CAM grid 2 x 2" in card
    # The evaluate command on the test split gives the numbers stored at release.
    m = evaluate(str(dest), tmp_path / "ev", labels_csv=str(small_csv), images=str(data_dir / "nih/images_384"),
                 split="test", n_boot=50, progress=False)
    stored = json.loads((dest / "metrics.json").read_text())
    assert m["n_images"] == stored["n_images"]
    assert m["mean_auroc"] == pytest.approx(stored["mean_auroc"], abs=1e-9)


def test_distilled_student_keeps_the_teacher_split(trained, tmp_path, small_csv, data_dir):
    """A student learns from the teacher's probabilities and never trains on its val/test patients."""
    teacher_cfg, teacher = trained
    cfg = _cfg(tmp_path, small_csv, data_dir, arch="resnet10t", epochs=2, teacher=[str(teacher)],
               split_from=teacher_cfg.out, seed=7)  # another seed would split differently on its own
    best = train(cfg)
    mine = pd.read_csv(os.path.join(cfg.out, "manifest.csv")).set_index("path")["split"]
    theirs = pd.read_csv(os.path.join(teacher_cfg.out, "manifest.csv")).set_index("path")["split"]
    assert mine.sort_index().equals(theirs.sort_index())
    soft = np.load(next((tmp_path / "run").glob("teacher_probs_*.npy")))
    assert soft.shape == ((mine == "train").sum(), 15) and np.isfinite(soft).all()
    # The soft targets are the teacher's own predictions on those (cached, uint8) films.
    pred = Predictor(load_folder(teacher), device="cpu")
    first = pd.read_csv(os.path.join(cfg.out, "manifest.csv")).query("split == 'train'")["path"].iloc[0]
    np.testing.assert_allclose(soft[0], list(pred.predict(first).values()), atol=5e-3)
    taught = json.loads((best / "config.json").read_text())["chestxray"]["training"]["taught_by"]
    assert taught.startswith("teacher run (soft targets")
    assert np.isfinite(pd.read_csv(os.path.join(cfg.out, "log.csv"))["train_loss"]).all()


def test_teacher_probs_are_recomputed_when_the_teacher_changes(trained, tmp_path):
    """Soft targets are cached by the teachers' weights, not only their names: a re-trained teacher
    under the same name (e.g. a new release of efficientnet_b0) must not reuse stale targets."""
    import shutil

    import safetensors.torch

    from chestxray.cache import build_cache
    from chestxray.distill import teacher_probs

    cfg, teacher = trained
    paths = list(pd.read_csv(os.path.join(cfg.out, "manifest.csv"))["path"][:6])
    cache = build_cache(paths, cfg.img_size, tmp_path / "cache", workers=1, progress=False)
    labels = json.loads((teacher / "config.json").read_text())["label_names"]
    folder = tmp_path / "teacher"
    shutil.copytree(teacher, folder)
    first = teacher_probs([str(folder)], cache, paths, labels, tmp_path / "out", progress=False)
    again = teacher_probs([str(folder)], cache, paths, labels, tmp_path / "out", progress=False)
    assert len(list((tmp_path / "out").glob("teacher_probs_*.npy"))) == 1 and np.array_equal(first, again)
    weights = folder / "model.safetensors"
    state = safetensors.torch.load_file(str(weights))
    head = [k for k in state if k.endswith("bias") and state[k].numel() == len(labels)][-1]
    state[head] = state[head] + 3.0  # every logit up by 3: a different teacher, same name and path
    safetensors.torch.save_file(state, str(weights))
    changed = teacher_probs([str(folder)], cache, paths, labels, tmp_path / "out", progress=False)
    assert len(list((tmp_path / "out").glob("teacher_probs_*.npy"))) == 2
    assert (changed > first).all()


def test_yaml_recipe_and_flags_precedence(tmp_path):
    from chestxray.train_cli import resolve_config  # what train/train.py and `chestxray train` run

    recipe = tmp_path / "r.yaml"
    recipe.write_text("base: " + str(REPO / "train/configs/base.yaml") + "\narch: resnet18\nepochs: 3\n")
    cfg = resolve_config(["--config", str(recipe), "--epochs", "5"])
    assert (cfg.arch, cfg.epochs, cfg.labels) == ("resnet18", 5, "nih14")
    assert cfg.recipe_file == recipe.as_posix()  # the card's "Reproduce" line names it
    (tmp_path / "bad.yaml").write_text("epochz: 3\n")
    with pytest.raises(ValueError, match="unknown training options: epochz"):
        resolve_config(["--config", str(tmp_path / "bad.yaml")])


def test_run_configs_saved_before_the_rename_still_load(tmp_path):
    """A run folder's train_config.json from before ``recipe`` became ``recipe_file`` reads the same."""
    import dataclasses
    import json

    from chestxray.training import TrainConfig

    saved = dataclasses.asdict(TrainConfig(arch="resnet18", epochs=3))
    del saved["recipe_file"]
    saved["recipe"] = "train/configs/resnet18.yaml"
    (tmp_path / "train_config.json").write_text(json.dumps(saved))
    cfg = TrainConfig.from_dict(json.loads((tmp_path / "train_config.json").read_text()))
    assert (cfg.recipe_file, cfg.arch, cfg.epochs) == ("train/configs/resnet18.yaml", "resnet18", 3)
    both = TrainConfig.from_dict({"recipe": "old.yaml", "recipe_file": "new.yaml"})
    assert both.recipe_file == "new.yaml"  # the current key wins
    with pytest.raises(ValueError, match="unknown training options: recipe"):
        TrainConfig.from_dict({"recipe": {"lr": 0.1}})  # the checkpoint's knobs dict is not a run option


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path, small_csv, data_dir):
    """torchrun with 2 CPU processes (gloo): both ranks train, rank 0 writes the checkpoint."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(REPO / "train/train.py"), "--arch", "test_efficientnet", "--csv", str(small_csv),
           "--images", str(data_dir / "nih/images_384"), "--img-size", "64", "--epochs", "2", "--batch-size", "8",
           "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--workers", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / "best/model.safetensors").is_file()
    assert len(pd.read_csv(out / "log.csv")) == 2
