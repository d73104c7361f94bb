"""Every product architecture predicts and explains; the one-forward CAM equals pytorch-grad-cam."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from chestxray.cam import CAM_METHODS, all_label_cams, method_cam, minmax, nhwc_to_nchw, overlay, overlay_reference, upsample
from chestxray.checkpoint import load_folder
from chestxray.models import arch_spec, classifier_weight, create_model, features_and_logits, target_layer
from chestxray.predictor import Predictor, as_pixels
from chestxray.recipes import shipped_recipes
from tests.helpers import make_checkpoint

SIZE = 128  # 4x4 final maps for every arch: small, but not degenerate


@pytest.fixture(scope="module")
def xray(data_dir):
    from PIL import Image

    return np.asarray(Image.open(data_dir / "nih/images_384/00000100_000.png").convert("L"), np.float32) / 255.0


def _archs(fast: str) -> list:
    """The shipped architectures (one recipe each) with all but ``fast`` marked slow (full-size networks take
    seconds each on CPU)."""
    return [a if a == fast else pytest.param(a, marks=pytest.mark.slow) for a in shipped_recipes()]


@pytest.mark.parametrize("arch", _archs("resnet18"))
def test_fast_cam_equals_pytorch_grad_cam(arch, xray):
    torch.manual_seed(0)
    model = create_model(arch, 15, img_size=SIZE).eval()
    from chestxray.transforms import Preprocess

    x = Preprocess((1, SIZE, SIZE))(xray)
    with torch.no_grad():
        feats, logits = features_and_logits(model, x, arch)
    assert feats.shape[-2:] == (SIZE // 32, SIZE // 32)
    fast = upsample(all_label_cams(feats, classifier_weight(model)[0])[0], (SIZE, SIZE))
    # pytorch-grad-cam min-max scales again after upsampling; do the same to compare like with like.
    fast = minmax(torch.from_numpy(fast)).numpy()
    reshape = nhwc_to_nchw if arch_spec(arch).nhwc else None
    compared = 0
    with GradCAM(model=model, target_layers=[target_layer(model, arch)], reshape_transform=reshape) as cam:
        for k in (0, 6, 14):
            ref = cam(input_tensor=x, targets=[ClassifierOutputTarget(k)])[0]
            if ref.max() == 0:  # all-negative map: both must be flat
                assert fast[k].max() < 1e-6
                continue
            np.testing.assert_allclose(fast[k], ref, atol=2e-3)
            assert np.corrcoef(fast[k].ravel(), ref.ravel())[0, 1] > 0.999
            compared += 1
    assert compared >= 1


@pytest.mark.slow  # a full-size Swin
def test_swin_cam_without_reshape_would_be_wrong(xray):
    """The NHWC trap: Swin's final features are B,H,W,C. Read as NCHW (pytorch-grad-cam without the reshape)
    the map is scrambled; with the reshape it equals the one-forward map, which permutes them first."""
    torch.manual_seed(0)
    arch = "swin_tiny_patch4_window7_224"
    model = create_model(arch, 15, img_size=SIZE).eval()
    from chestxray.transforms import Preprocess

    x = Preprocess((1, SIZE, SIZE))(xray)
    raw = model.forward_features(x)
    assert raw.shape == (1, SIZE // 32, SIZE // 32, model.num_features)  # channels last, as timm gives them
    with torch.no_grad():
        feats, _ = features_and_logits(model, x, arch)
    fast = minmax(torch.from_numpy(upsample(all_label_cams(feats, classifier_weight(model)[0])[0], (SIZE, SIZE))))
    k = next(k for k in range(15) if fast[k].max() > 0)
    maps = {}
    for name, reshape in (("right", nhwc_to_nchw), ("wrong", None)):
        with GradCAM(model=model, target_layers=[target_layer(model, arch)], reshape_transform=reshape) as cam:
            maps[name] = cam(input_tensor=x, targets=[ClassifierOutputTarget(k)])[0]
    corr = {n: np.corrcoef(fast[k].numpy().ravel(), m.ravel())[0, 1] for n, m in maps.items()}
    assert corr["right"] > 0.999 and not corr["wrong"] > 0.9, corr


@pytest.mark.parametrize("arch", _archs("resnet18"))
def test_every_arch_predicts_and_explains(arch, tmp_path, data_dir):
    folder = make_checkpoint(tmp_path / arch, arch=arch, img_size=64)
    pred = Predictor(load_folder(folder), device="cpu")
    path = data_dir / "nih/images_384/00000100_000.png"
    probs = pred.predict(path)
    assert list(probs) == pred.labels and all(0.0 <= p <= 1.0 for p in probs.values())
    a = pred.analyze(path)
    assert np.allclose(a.probs, list(probs.values()), atol=1e-5)
    assert a.cams.shape[0] == len(pred.labels) and a.cams.max() <= 1.0 and a.cams.min() >= 0.0
    ov = a.overlay("Effusion", alpha=0.5)
    assert ov.shape == (*a.image.shape, 3) and ov.dtype == np.uint8
    m = pred.explain(path, "Effusion", method="gradcam++")
    assert m.shape == pred.preprocess.size and np.isfinite(m).all()


@pytest.mark.slow
def test_method_cam_targets_the_chosen_label_not_the_argmax(xray):
    torch.manual_seed(0)
    arch = "resnet18"
    model = create_model(arch, 15, img_size=SIZE).eval()
    from chestxray.transforms import Preprocess

    x = Preprocess((1, SIZE, SIZE))(xray)
    maps = [method_cam(model, arch, x, k, "gradcam") for k in range(6)]
    distinct = {np.round(m, 3).tobytes() for m in maps if m.max() > 0}
    assert len(distinct) > 2  # one map per label, not 15 copies of the argmax's map


def test_overlay_opacity():
    gray = np.zeros((32, 32), np.float32)
    cam = np.ones((4, 4), np.float32)
    assert overlay(gray, cam, alpha=0.0).max() == 0
    full = overlay(gray, cam, alpha=1.0)
    assert full.shape == (32, 32, 3) and full[..., 1].mean() > 200  # viridis at 1.0 is yellow
    film = np.full((32, 32), 0.5, np.float32)
    assert np.all(overlay(film, np.zeros((4, 4), np.float32), alpha=1.0) == 128)  # map 0: the film untouched


def test_overlay_colormap_is_viridis_not_jet():
    from matplotlib import colormaps

    gray = np.zeros((8, 8), np.float32)
    for value in (1.0, 0.5):
        px = overlay(gray, np.full((8, 8), value, np.float32), alpha=1.0)[4, 4].astype(int)
        # at opacity 1 x value over black, the pixel is value x colormap(value)
        want = np.round(value * np.round(np.array(colormaps["viridis"](value)[:3]) * 255))
        jet = np.round(value * np.array(colormaps["jet"](value)[:3]) * 255)
        assert np.abs(px - want).max() <= 1 and np.abs(px - jet).max() > 40


def test_probability_scale_is_fainter_for_low_p(xray):
    from chestxray.cam import SCALES, scale_map

    yy, xx = np.mgrid[0:4, 0:4]
    cam = minmax(torch.tensor(-((yy - 1.0) ** 2 + (xx - 2.0) ** 2))).numpy()
    film = xray.round(2)
    shown = np.repeat(np.round(film * 255)[..., None], 3, axis=2)

    def strength(m):  # how far the overlay moves the film's pixels
        return np.abs(overlay(film, m, alpha=0.6).astype(float) - shown).mean()

    assert np.array_equal(scale_map(cam, "minmax", 0.05), cam)
    np.testing.assert_allclose(scale_map(cam, "probability", 0.3), 0.3 * cam)
    minmax_map, low, high = strength(cam), strength(scale_map(cam, "probability", 0.05)), \
        strength(scale_map(cam, "probability", 0.9))
    assert low < 0.1 * minmax_map and low < 0.2 * high < high <= minmax_map
    for name in SCALES:  # every scale the app offers is one scale_map draws, at most as strong as min-max
        assert strength(scale_map(cam, name, 0.05)) <= minmax_map
    with pytest.raises(ValueError):
        scale_map(cam, "log", 0.5)


def test_colorbar_is_appended_with_the_colormap():
    from chestxray.cam import add_colorbar, colormap_lut

    rgb = np.zeros((200, 160, 3), np.uint8)
    out = add_colorbar(rgb)
    assert out.shape[0] == 200 and out.shape[1] > 160 and np.array_equal(out[:, :160], rgb)
    lut = colormap_lut()
    column = out[:, 160 + 6]  # through the bar
    bar = column[(column != column[0]).any(axis=1)]  # the rows off the strip's background
    assert len(bar) > 150 and np.array_equal(bar[0], lut[-1]) and np.array_equal(bar[-1], lut[0])  # 1 top, 0 bottom


def test_analysis_overlay_is_the_one_rendering_path(tmp_path, data_dir):
    folder = make_checkpoint(tmp_path / "tiny", img_size=64)
    a = Predictor(load_folder(folder), device="cpu").analyze(data_dir / "nih/images_384/00000100_000.png")
    label = a.labels[int(np.argmin(a.probs))]
    p = a.prob_dict()[label]
    np.testing.assert_array_equal(a.overlay(label, 0.5), overlay(a.image, a.cam(label), 0.5))
    np.testing.assert_array_equal(a.overlay(label, 0.5, scale="probability"), overlay(a.image, p * a.cam(label), 0.5))
    other = np.ones_like(a.image)
    np.testing.assert_array_equal(a.overlay(label, 0.5, cam=other), overlay(a.image, other, 0.5))
    assert a.overlay(label, 0.5, colorbar=True).shape[1] > a.image.shape[1]


@pytest.fixture(scope="module")
def tiny_predictor(tmp_path_factory):
    return Predictor(load_folder(make_checkpoint(tmp_path_factory.mktemp("cams") / "tiny", arch="resnet10t",
                                                 img_size=64, seed=1)), device="cpu")


@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m == "scorecam" else m
                                    for m in CAM_METHODS])  # Score-CAM: one forward pass per channel
def test_every_registered_cam_method_explains_a_real_film(method, tiny_predictor, data_dir):
    """Each entry of the one table runs through the predictor on a real film and keeps its promises: a map at
    the model's input size in [0,1] for the chosen label; a label-free method gives every label the same map
    (its note says so), the others tell labels apart; a "fast" method is the stored one-forward map and agrees
    with pytorch-grad-cam's own class for it."""
    spec = CAM_METHODS[method]
    pred = tiny_predictor
    film = data_dir / "nih/images_384/00000100_000.png"
    maps = {k: pred.explain(film, k, method=method) for k in ("Effusion", "Cardiomegaly")}
    for m in maps.values():
        assert m.shape == pred.preprocess.size and np.isfinite(m).all() and 0.0 <= m.min() and m.max() <= 1.0
    same = all(np.allclose(maps["Effusion"], m, atol=1e-5) for m in maps.values())
    assert same == ("ignores the label" in spec.note), "label-free methods and only they say so"
    assert ("(fast)" in spec.title) == spec.fast
    if spec.fast:  # the stored map stands for pytorch-grad-cam's class: check that it does
        k = pred.labels.index("Effusion")
        x = pred.preprocess(as_pixels(film))
        slow = method_cam(pred.model, pred.arch, x, k, method)
        assert np.corrcoef(maps["Effusion"].ravel(), slow.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("alpha", [0.0, 0.4, 0.73, 1.0])
def test_fast_overlay_equals_the_straightforward_blend(alpha):
    """The request path's blend gives the same pixels as the plain one (float32 films, as the app draws them)."""
    rng = np.random.default_rng(0)
    gray = rng.random((97, 80)).astype(np.float32)
    gray[0, :3] = (0.0, 1.0, 0.5)
    for cam in (upsample(rng.random((7, 7)), gray.shape), rng.random((7, 7)).astype(np.float32),
                np.zeros(gray.shape, np.float32), np.ones(gray.shape, np.float32)):
        assert np.array_equal(overlay(gray, cam, alpha), overlay_reference(gray, cam, alpha))
    # a float64 film: the same blend up to one grey level of rounding
    g64 = gray.astype(np.float64)
    cam = upsample(rng.random((7, 7)), gray.shape)
    assert np.abs(overlay(g64, cam, alpha).astype(int) - overlay_reference(g64, cam, alpha)).max() <= 1
