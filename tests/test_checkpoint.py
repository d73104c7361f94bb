"""Checkpoints: round trips (folder, plain timm local-dir:, hf-hub: from an offline cache), refusals."""
from __future__ import annotations

import json
import shutil

import pytest
import safetensors.torch
import timm
import torch

from chestxray.checkpoint import CheckpointError, init_from_checkpoint, load_checkpoint, load_folder
from chestxray.ckpt_config import CkptMeta, Training
from chestxray.hub import resolve
from chestxray.models import create_model
from tests.helpers import make_checkpoint


def _same_outputs(a, b, size=64):
    x = torch.randn(2, 1, size, size)
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=1e-5)


def test_round_trip_folder_and_plain_timm(tmp_path):
    folder = make_checkpoint(tmp_path / "ck", arch="resnet10t", seed=1)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    ck = load_folder(folder)
    assert ck.labels[0] == "Atelectasis" and ck.labels[-1] == "No Finding"
    assert ck.preprocess.input_size == (1, 64, 64)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["pretrained_cfg"]["crop_pct"] == 1.0 and cfg["pretrained_cfg"]["crop_mode"] == "squash"
    assert cfg["chestxray"]["thresholds"]["Effusion"] == 0.5
    plain = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert plain.pretrained_cfg["label_names"] == ck.labels
    assert _same_outputs(ck.model, plain)


def test_half_precision_weights_load_as_float32(tmp_path):
    full = load_folder(make_checkpoint(tmp_path / "f32", seed=2))
    half = load_folder(make_checkpoint(tmp_path / "f16", seed=2, half=True))
    assert next(half.model.parameters()).dtype == torch.float32
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        diff = (torch.sigmoid(full.model(x)) - torch.sigmoid(half.model(x))).abs().max().item()
    assert diff < 1e-2
    assert (tmp_path / "f16/model.safetensors").stat().st_size < 0.6 * (tmp_path / "f32/model.safetensors").stat().st_size
    # Kernels are float16; BatchNorm statistics and biases (1-D) keep float32.
    stored = safetensors.torch.load_file(str(tmp_path / "f16/model.safetensors"))
    assert {v.dtype for k, v in stored.items() if v.ndim > 1} == {torch.float16}
    assert stored["bn2.running_var"].dtype == torch.float32


def test_pickle_is_refused(tmp_path):
    folder = make_checkpoint(tmp_path / "ck")
    state = load_folder(folder).model.state_dict()
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing pickled weights"):
        load_folder(folder)
    # A pickle renamed to .safetensors is not parsed as a pickle either.
    shutil.move(folder / "pytorch_model.bin", folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_folder(folder)


def test_config_that_disagrees_with_weights(tmp_path):
    folder = make_checkpoint(tmp_path / "ck")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["label_names"] = cfg["label_names"][:5]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match the weights.*5 labels"):
        load_folder(folder)
    cfg["label_names"] = json.loads((tmp_path / "ck/config.json").read_text())["label_names"]
    cfg["architecture"] = "resnet10t"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match the weights"):
        load_folder(folder)


def test_unknown_reference(tmp_path):
    with pytest.raises(CheckpointError, match="unknown model"):
        resolve("no-such-model-anywhere")


def _fill_hf_cache(cache, repo_id: str, src) -> None:
    """Lays out a checkpoint as huggingface_hub's cache does (refs/main -> snapshots/<sha>)."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    sha = "0123456789abcdef0123456789abcdef01234567"
    snap = repo_dir / "snapshots" / sha
    snap.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copy(f, snap / f.name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(sha)


def test_hf_hub_from_offline_cache(tmp_path, monkeypatch):
    src = make_checkpoint(tmp_path / "src", seed=3)
    cache = tmp_path / "hf"
    _fill_hf_cache(cache, "someorg/cxr-tiny", src)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    ck = load_checkpoint("hf-hub:someorg/cxr-tiny")
    assert ck.path.parent.parent == cache / "models--someorg--cxr-tiny"
    plain = timm.create_model("hf-hub:someorg/cxr-tiny", pretrained=True, cache_dir=str(cache)).eval()
    assert _same_outputs(ck.model, plain)


def test_hf_hub_falls_back_to_shipped(tmp_path, monkeypatch, caplog):
    weights = tmp_path / "weights"
    make_checkpoint(weights / "cxr-tiny", seed=4)
    monkeypatch.setenv("CHESTXRAY_WEIGHTS", str(weights))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with caplog.at_level("WARNING"):
        ck = load_checkpoint("hf-hub:someorg/cxr-tiny")
    assert ck.path == weights / "cxr-tiny"
    assert sum("using shipped weights/cxr-tiny" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(CheckpointError, match="no shipped"):
        load_checkpoint("hf-hub:someorg/absent-model")


def test_pretrained_offline_trains_from_scratch_with_a_warning(monkeypatch, caplog):
    """--pretrained needs the Hub; offline it must say so and fall back to random init, not crash."""
    import huggingface_hub.constants as c

    from chestxray.models import create_model

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with caplog.at_level("WARNING"):
        model = create_model("resnet10t", 3, pretrained=True)
    assert model.get_classifier().out_features == 3
    assert any("training from scratch" in r.getMessage() for r in caplog.records)


def test_mark_default_compares_balanced_validation_within_one_label_set(tmp_path):
    """The default is the best NIH-14 model on balanced validation films; a model selected on a mixed
    set or trained on other labels never wins on its (incomparable) higher number."""
    from chestxray.release import mark_default

    def ship(name: str, val: float, val_sources: list[str], label_set: str = "nih14") -> None:
        folder = tmp_path / "weights" / name
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"0" * 1024)
        (folder / "README.md").write_text(f"# {name}\n")
        meta = CkptMeta(label_set=label_set, training=Training(val_mean_auroc=val, val_sources=val_sources))
        (folder / "config.json").write_text(json.dumps(meta.apply({"architecture": "resnet18"})))

    ship("fair_low", 0.60, ["reproduce_chexnet"])
    ship("fair_best", 0.63, ["reproduce_chexnet"])
    ship("mixed", 0.75, ["nih384", "nih64"])
    ship("six_labels", 0.90, [], label_set="six")
    ensemble = tmp_path / "weights" / "ensemble"  # a config naming members, no weights: not a competitor
    ensemble.mkdir()
    (ensemble / "config.json").write_text(json.dumps(
        {"label_names": ["a"], "chestxray": {"label_set": "nih14", "ensemble": {"members": ["fair_low", "fair_best"]}}}))
    models = tmp_path / "models.yaml"
    models.write_text("default: mixed\nmodels: []\n")
    assert mark_default(models, tmp_path / "weights") == "fair_best"
    assert models.read_text().startswith("default: fair_best\n")
    card = (tmp_path / "weights/fair_best/README.md").read_text()
    assert "## The app's default model" in card and "fair_low 0.600" in card and "six_labels" not in card


def test_a_release_in_progress_is_not_listed(tmp_path, monkeypatch):
    from chestxray.checkpoint import list_shipped

    for name in ("done", "half_written.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        (tmp_path / name / "model.safetensors").write_bytes(b"0")
    monkeypatch.setenv("CHESTXRAY_WEIGHTS", str(tmp_path))
    assert list_shipped() == ["done"]


def test_init_from_checkpoint_copies_the_backbone_not_the_head(tmp_path):
    src = load_folder(make_checkpoint(tmp_path / "nih14", seed=3))
    torch.manual_seed(4)
    model = create_model("test_efficientnet", 6, img_size=64)
    head_before = model.get_classifier().weight.detach().clone()
    report = init_from_checkpoint(model, tmp_path / "nih14")
    assert "nih14" in report and "all but the classifier" in report
    for k, v in src.model.state_dict().items():
        if not k.startswith("classifier."):
            assert torch.equal(model.state_dict()[k], v), k
    assert torch.equal(model.get_classifier().weight, head_before)  # 6 new labels: a fresh head
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():  # same features: the backbone now is the checkpoint's
        assert torch.allclose(model.eval().forward_features(x), src.model.forward_features(x), atol=1e-5)


def test_init_from_checkpoint_refuses_another_build(tmp_path):
    make_checkpoint(tmp_path / "resnet", arch="resnet10t")
    with pytest.raises(CheckpointError, match="not built like"):
        init_from_checkpoint(create_model("test_efficientnet", 6, img_size=64), tmp_path / "resnet")
