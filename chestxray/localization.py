"""Does the heatmap point at the finding? The pointing game on radiologists' boxes.

For each boxed (film, finding) pair the map of that finding's logit is computed (all-label
Grad-CAM, the app's map), upsampled to the film, and its maximum is a *hit* when it falls inside
one of the radiologists' boxes for that finding. A random point hits with probability equal to the
boxes' share of the film: that share, averaged, is the chance baseline reported beside the hit rate.

Boxes (1024-px NIH coordinates): ``nih/BBox_List_2017.csv.gz`` (8 findings; "Infiltrate" is NIH's
Infiltration) and ``nih/rsna_boxes_nih.csv`` (RSNA radiologists' lung-opacity boxes, scored on the
Pneumonia map).
"""
from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from chestxray.imaging import read_image
from chestxray.predictor import Predictor, cam_at

NIH_SIDE = 1024  # NIH released every film at 1024 x 1024; both box files use those coordinates
BOX_LABELS = {"Infiltrate": "Infiltration"}
RSNA_LABEL = "Pneumonia"


def load_boxes(data_root: str | os.PathLike) -> pd.DataFrame:
    """All boxes: columns image, label, x, y, w, h (1024-px coordinates), box_source."""
    root = Path(data_root) / "nih"
    nih = pd.read_csv(root / "BBox_List_2017.csv.gz").iloc[:, :6]
    nih.columns = ["image", "label", "x", "y", "w", "h"]
    nih["label"] = nih["label"].replace(BOX_LABELS)
    nih["box_source"] = "nih"
    rsna = pd.read_csv(root / "rsna_boxes_nih.csv")
    rsna = rsna[rsna["Target"] == 1]
    rsna = pd.DataFrame({"image": rsna["nih_image"], "label": RSNA_LABEL, "x": rsna["x"], "y": rsna["y"],
                         "w": rsna["width"], "h": rsna["height"], "box_source": "rsna"})
    return pd.concat([nih, rsna], ignore_index=True)


def _box_mask(boxes: pd.DataFrame, shape: tuple[int, int]) -> np.ndarray:
    """Union of the boxes as a boolean mask on an image of ``shape`` (scaled from 1024 px)."""
    h, w = shape
    sy, sx = h / NIH_SIDE, w / NIH_SIDE
    mask = np.zeros(shape, dtype=bool)
    for b in boxes.itertuples():
        y0, x0 = int(np.floor(b.y * sy)), int(np.floor(b.x * sx))
        y1, x1 = int(np.ceil((b.y + b.h) * sy)), int(np.ceil((b.x + b.w) * sx))
        mask[max(0, y0):min(h, y1), max(0, x0):min(w, x1)] = True
    return mask


def pointing_game(predictor: Predictor, boxes: pd.DataFrame, images_dir: str | os.PathLike,
                  exclude: Collection[str] = ()) -> dict[str, Any]:
    """Hit rate of the maps' maxima in the boxes, over the boxed films found in ``images_dir``.

    Args:
        predictor: the model (its label must exist for a box to count).
        boxes: :func:`load_boxes` output.
        images_dir: folder holding the films by NIH file name (e.g. ``nih/images_384``).
        exclude: file names to leave out (the model's training films: only held-out films count).

    Returns:
        ``{"n_pairs", "n_films", "hit_rate", "chance", "by_label": {label: {n, hit_rate, chance}},
        "by_box_source": {...}, "pairs": [{image, label, hit, chance, prob}]}``.
    """
    folder = Path(images_dir)
    present = set(os.listdir(folder))
    keep = boxes["image"].isin(present) & ~boxes["image"].isin(set(exclude)) & boxes["label"].isin(predictor.labels)
    pairs = []
    for image, per_film in boxes[keep].groupby("image", sort=True):
        analysis = predictor.analyze(read_image(folder / image))
        for (label, source), b in per_film.groupby(["label", "box_source"], sort=True):
            cam = cam_at(analysis.cams[predictor.labels.index(label)], analysis.image.shape)
            mask = _box_mask(b, cam.shape)
            y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
            pairs.append({"image": image, "label": label, "box_source": source, "hit": bool(mask[y, x]),
                          "chance": float(mask.mean()),
                          "prob": float(analysis.probs[predictor.labels.index(label)])})
    table = pd.DataFrame(pairs, columns=["image", "label", "box_source", "hit", "chance", "prob"])

    def summary(t: pd.DataFrame) -> dict[str, Any]:
        return {"n": int(len(t)), "hit_rate": float(t["hit"].mean()) if len(t) else None,
                "chance": float(t["chance"].mean()) if len(t) else None}

    return {"n_pairs": int(len(table)), "n_films": int(table["image"].nunique()),
            "hit_rate": summary(table)["hit_rate"], "chance": summary(table)["chance"],
            "by_label": {k: summary(t) for k, t in table.groupby("label")},
            "by_box_source": {k: summary(t) for k, t in table.groupby("box_source")},
            "pairs": pairs}


def held_out_pointing_game(predictor: Predictor, data_root: str | os.PathLike,
                           folder: str = "nih/images_384") -> dict[str, Any]:
    """:func:`pointing_game` on the boxed films outside the checkpoint's training split.

    The training split comes from the checkpoint's ``splits.csv``; without one every boxed film
    counts and the result says so (``held_out: false``).
    """
    splits = Path(predictor.ckpt.path) / "splits.csv"
    exclude: set[str] = set()
    if splits.is_file():
        s = pd.read_csv(splits)
        exclude = set(s.loc[s["split"] == "train", "image"])
    result = pointing_game(predictor, load_boxes(data_root), Path(data_root) / folder, exclude=exclude)
    result["held_out"] = splits.is_file()
    result["folder"] = folder
    return result
