"""The pointing game: Grad-CAM maxima against radiologists' boxes on real NIH films."""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from chestxray.checkpoint import load_folder
from chestxray.imaging import read_image
from chestxray.boxes import Box, box_iou, cam_boxes, mask_iou
from chestxray.localization import _box_mask, card_section, load_boxes, pointing_game, summary
from chestxray.predictor import Analysis, Predictor, cam_at
from tests.helpers import make_checkpoint


@pytest.fixture(scope="module")
def boxes(data_dir) -> pd.DataFrame:
    return load_boxes(data_dir)


def test_boxes_from_both_files(boxes):
    nih = boxes[boxes["box_source"] == "nih"]
    assert len(nih) == 984 and "Infiltration" in set(nih["label"]) and "Infiltrate" not in set(nih["label"])
    assert set(boxes.loc[boxes["box_source"] == "rsna", "label"]) == {"Pneumonia"}
    assert (boxes[["w", "h"]] > 0).all().all()


def test_box_mask_scales_1024_px_coordinates():
    quarter = pd.DataFrame({"x": [512.0], "y": [512.0], "w": [512.0], "h": [512.0]})
    assert _box_mask(quarter, (384, 384)).mean() == pytest.approx(0.25)
    assert _box_mask(quarter, (384, 384))[383, 383] and not _box_mask(quarter, (384, 384))[0, 0]


@pytest.mark.slow
def test_pointing_game_on_real_films(tmp_path, data_dir, boxes):
    pred = Predictor(load_folder(make_checkpoint(tmp_path / "ck")), device="cpu")
    folder = data_dir / "nih/images_384"
    here = boxes[boxes["image"].isin(set(os.listdir(folder)))]
    sample = [sorted(set(here.loc[here["box_source"] == s, "image"]))[:5] for s in ("nih", "rsna")]
    boxes = here[here["image"].isin(sample[0] + sample[1])]  # both kinds of box (a film can have both)
    result = pointing_game(pred, boxes, folder)
    assert result["n_films"] == boxes["image"].nunique() >= 9 and result["n_pairs"] >= 10
    assert set(result["by_box_source"]) == {"nih", "rsna"}
    assert 0 <= result["hit_rate"] <= 1 and 0 < result["chance"] < 0.5
    # One pair recomputed by hand: the map's maximum against the union of that finding's boxes.
    pair = result["pairs"][0]
    a = pred.analyze(read_image(folder / pair["image"]))
    cam = cam_at(a.cams[pred.labels.index(pair["label"])], a.image.shape)
    mine = boxes[(boxes["image"] == pair["image"]) & (boxes["label"] == pair["label"])]
    mask = _box_mask(mine, cam.shape)
    assert pair["hit"] == bool(mask.flat[int(np.argmax(cam))]) and pair["chance"] == pytest.approx(mask.mean())
    # Training films are left out on request.
    fewer = pointing_game(pred, boxes, folder, exclude={pair["image"]})
    assert fewer["n_films"] == result["n_films"] - 1


#: Two real boxed films: one boxed for Pneumonia by NIH and by RSNA (two pairs), one with three RSNA boxes (one pair).
TWO_FILMS = ("00000506_013.png", "00001836_052.png")


@pytest.fixture(scope="module")
def two_films(tmp_path_factory, data_dir, boxes):
    """A tiny untrained model's pointing game on :data:`TWO_FILMS`: ``(predictor, their boxes, result)``."""
    pred = Predictor(load_folder(make_checkpoint(tmp_path_factory.mktemp("loc") / "ck")), device="cpu")
    mine = boxes[boxes["image"].isin(TWO_FILMS)]
    return pred, mine, pointing_game(pred, mine, data_dir / "nih/images_384")


def test_iou_metrics_on_real_films(two_films, data_dir):
    pred, mine, result = two_films
    folder = data_dir / "nih/images_384"
    assert (result["n_films"], result["n_pairs"], result["n_gt_boxes"]) == (2, 3, len(mine)) == (2, 3, 5)
    assert result["n_pred_boxes"] == sum(p["n_pred_boxes"] for p in result["pairs"]) >= 3  # a map has a maximum
    keys = {"n", "hit_rate", "chance", "iou_hit_rate", "mean_iou", "n_gt_boxes", "n_pred_boxes"}
    assert set(result["by_label"]) == {"Pneumonia"} and set(result["by_label"]["Pneumonia"]) == keys
    assert {k: v["n"] for k, v in result["by_box_source"].items()} == {"nih": 1, "rsna": 2}
    assert {k: v["n_gt_boxes"] for k, v in result["by_box_source"].items()} == {"nih": 1, "rsna": 4}
    rates = [result["iou_hit_rate"][k] for k in ("0.1", "0.25", "0.5")]
    assert rates == sorted(rates, reverse=True) and all(r in (0, 1 / 3, 2 / 3, 1) for r in rates)
    assert result["box_threshold"] == 0.5 and result["hit_rate"] is not None  # the pointing game stays
    # The three-box pair by hand: the best map box against the union of the radiologists' three boxes.
    (pair,) = [p for p in result["pairs"] if p["image"] == TWO_FILMS[1]]
    a = pred.analyze(read_image(folder / TWO_FILMS[1]))
    cam = cam_at(a.cams[pred.labels.index("Pneumonia")], a.image.shape)
    union = _box_mask(mine[mine["image"] == TWO_FILMS[1]], cam.shape)
    found = cam_boxes(cam)
    assert pair["n_gt_boxes"] == 3 and pair["n_pred_boxes"] == len(found)
    assert pair["iou"] == pytest.approx(max(mask_iou(f, union) for f in found))
    assert result["mean_iou"] == pytest.approx(np.mean([p["iou"] for p in result["pairs"]]))


def test_release_summary_and_card_section(two_films):
    _, _, result = two_films
    stored = summary({**result, "held_out": True})
    assert {"hit_rate", "chance", "n_pairs", "n_films", "held_out"} <= set(stored)  # the keys cards always read
    assert stored["iou_hit_rate"] == result["iou_hit_rate"] and stored["n_gt_boxes"] == 5
    assert stored["by_label"]["Pneumonia"]["n"] == 3 and "pairs" not in stored
    json.dumps(stored, allow_nan=False)  # config.json is strict JSON
    text = card_section({**result, "held_out": True})
    assert "outside this model's training split" in text and "Pneumonia" in text
    header, rule, overall, pneumonia = [line for line in text.splitlines() if line.startswith("|")]
    assert header.count("IoU >=") == 3 and overall.startswith("| **all** | 3 (5) |")
    assert pneumonia.startswith("| Pneumonia | 3 (5) |") and overall.count("%") == 4
    assert "training films may be among them" in card_section({**result, "held_out": False})


def _blobs(shape=(200, 300)) -> np.ndarray:
    """Two Gaussian blobs: a strong one at (x=70, y=60), a weaker one at (x=220, y=140)."""
    yy, xx = np.mgrid[:shape[0], :shape[1]].astype(np.float32)
    strong = np.exp(-((xx - 70) ** 2 + (yy - 60) ** 2) / (2 * 15**2))
    weak = 0.8 * np.exp(-((xx - 220) ** 2 + (yy - 140) ** 2) / (2 * 20**2))
    return np.maximum(strong, weak)


def test_cam_boxes_two_blobs():
    boxes = cam_boxes(_blobs())
    assert len(boxes) == 2
    first, second = boxes  # highest peak first
    assert first.score == pytest.approx(1.0, abs=1e-3) and second.score == pytest.approx(0.8, abs=1e-3)
    # At half the maximum a Gaussian of sigma s is cut at radius s * sqrt(2 ln(peak / 0.5)).
    r1, r2 = 15 * np.sqrt(2 * np.log(2)), 20 * np.sqrt(2 * np.log(0.8 / 0.5))
    for b, (cx, cy, r) in ((first, (70, 60, r1)), (second, (220, 140, r2))):
        assert b.x + b.w / 2 == pytest.approx(cx + 0.5, abs=1) and b.y + b.h / 2 == pytest.approx(cy + 0.5, abs=1)
        assert b.w == pytest.approx(2 * r, abs=2) and b.h == pytest.approx(2 * r, abs=2)
    # A higher cut keeps the strong blob only (a region of ~0.25% of the film: under the default
    # minimum area, kept with none); a big minimum area drops both; a flat zero map has none.
    (only,) = cam_boxes(_blobs(), threshold=0.9, min_area=0)
    assert only.x < 70 < only.x + only.w and only.y < 60 < only.y + only.h
    assert cam_boxes(_blobs(), threshold=0.9) == [] and cam_boxes(_blobs(), min_area=0.5) == []
    assert cam_boxes(np.zeros((10, 10))) == []


def test_box_iou_by_hand():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (5, 5, 10, 10)) == pytest.approx(25 / 175)
    assert box_iou((0, 0, 10, 10), (2, 2, 4, 4)) == pytest.approx(16 / 100)  # one inside the other
    assert box_iou((0, 0, 10, 10), (10, 0, 5, 5)) == 0.0  # touching edges share no area
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
    # Against the union of two boxes: a 10 x 10 box over one of two disjoint 10 x 10 boxes = 100 / 200.
    union = np.zeros((50, 50), dtype=bool)
    union[0:10, 0:10] = union[0:10, 30:40] = True
    assert mask_iou(Box(0, 0, 10, 10), union) == pytest.approx(0.5)
    assert mask_iou(Box(5, 0, 10, 10), union) == pytest.approx(50 / 250)
    assert mask_iou(Box(20, 20, 5, 5), union) == 0.0


def test_overlay_draws_box_outlines_only():
    cams = np.zeros((2, 7, 7), np.float32)
    cams[0, 1, 5] = 1.0  # one hot cell of the feature map: upper right
    a = Analysis(["A", "B"], np.array([0.9, 0.1], np.float32), cams, np.full((210, 280), 0.5, np.float32))
    (box,) = a.boxes("A")
    assert box.x > 140 and box.y + box.h < 105  # in the film's upper right, in display pixels
    plain, boxed = a.overlay("A", 0.4), a.overlay("A", 0.4, boxes=True)
    changed = np.any(plain != boxed, axis=2)
    assert changed.any() and changed.mean() < 0.05  # outlines, not fills
    assert changed[box.y, box.x + box.w // 2] and not changed[box.y + box.h // 2, box.x + box.w // 2]
    # Another method's map (given at any size) is boxed the same way; the colour bar still fits.
    other = a.overlay("A", 0.4, cam=_blobs((210, 280)), colorbar=True, boxes=True)
    assert other.shape[0] == 210 and other.shape[1] > 280
    assert len(a.boxes("A", cam=_blobs((210, 280)))) == 2
