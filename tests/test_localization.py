"""The pointing game: Grad-CAM maxima against radiologists' boxes on real NIH films."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from chestxray.checkpoint import load_folder
from chestxray.imaging import read_image
from chestxray.localization import _box_mask, load_boxes, pointing_game
from chestxray.predictor import Predictor, cam_at
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
