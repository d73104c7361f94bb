"""Does the heatmap point at the finding? The pointing game on radiologists' boxes.

For each boxed (film, finding) pair the map of that finding's logit is computed (all-label
Grad-CAM, the app's map), upsampled to the film, and its maximum is a *hit* when it falls inside
one of the radiologists' boxes for that finding. A random point hits with probability equal to the
boxes' share of the film: that share, averaged, is the chance baseline reported beside the hit rate.

Beside the pointing game, the map is turned into boxes (:func:`chestxray.boxes.cam_boxes`: cut at
half its maximum, one box per connected region) and the best of them is compared with the
radiologists' region by intersection over union. That region is the union of the finding's boxes on
the film (RSNA often boxes both lungs): a box covering one of two boxed lungs scores about 0.5, not
1. A finding counts as found at IoU ``t`` when its best box reaches ``t``; the shares at
:data:`IOU_THRESHOLDS` are reported beside the hit rate, with the numbers of boxes.

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

from chestxray.boxes import BOX_MIN_AREA, BOX_THRESHOLD, cam_boxes, mask_iou
from chestxray.imaging import read_image
from chestxray.predictor import Predictor, cam_at

NIH_SIDE = 1024  # NIH released every film at 1024 x 1024; both box files use those coordinates
BOX_LABELS = {"Infiltrate": "Infiltration"}
RSNA_LABEL = "Pneumonia"
#: The box files under the data root.
BOX_FILES = ("nih/BBox_List_2017.csv.gz", "nih/rsna_boxes_nih.csv")
#: A finding's best map box must reach this IoU with the radiologists' region to count (0.1: roughly
#: the right place; 0.25 and 0.5: increasingly the right extent).
IOU_THRESHOLDS = (0.1, 0.25, 0.5)


def iou_key(t: float) -> str:
    """The JSON key of an IoU threshold (``"0.1"``, ``"0.25"``, ``"0.5"``)."""
    return f"{t:g}"


def load_boxes(data_root: str | os.PathLike) -> pd.DataFrame:
    """All boxes: columns image, label, x, y, w, h (1024-px coordinates), box_source."""
    nih = pd.read_csv(Path(data_root) / BOX_FILES[0]).iloc[:, :6]
    nih.columns = ["image", "label", "x", "y", "w", "h"]
    nih["label"] = nih["label"].replace(BOX_LABELS)
    nih["box_source"] = "nih"
    rsna = pd.read_csv(Path(data_root) / BOX_FILES[1])
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
        ``{"n_pairs", "n_films", "hit_rate", "chance", "iou_hit_rate": {"0.1", "0.25", "0.5"}, "mean_iou",
        "n_gt_boxes", "n_pred_boxes", "by_label": {label: {n, hit_rate, chance, iou_hit_rate, mean_iou,
        n_gt_boxes, n_pred_boxes}}, "by_box_source": {...}, "box_threshold", "box_min_area",
        "pairs": [{image, label, box_source, hit, chance, prob, iou, n_gt_boxes, n_pred_boxes}]}``.
        A pair is one boxed finding on one film; ``n_gt_boxes`` counts the radiologists' boxes and
        ``n_pred_boxes`` the map's boxes; ``iou`` is the best map box's IoU with the union of the
        radiologists' boxes (0 when the map gives none).
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
            found = cam_boxes(cam, BOX_THRESHOLD, BOX_MIN_AREA)
            pairs.append({"image": image, "label": label, "box_source": source, "hit": bool(mask[y, x]),
                          "chance": float(mask.mean()),
                          "prob": float(analysis.probs[predictor.labels.index(label)]),
                          "iou": max((mask_iou(f, mask) for f in found), default=0.0),
                          "n_gt_boxes": int(len(b)), "n_pred_boxes": len(found)})
    return pairs_result(pairs)


def pairs_result(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """The :func:`pointing_game` result of a list of its pairs (e.g. pooled over cross-validation folds)."""
    table = pd.DataFrame(pairs, columns=["image", "label", "box_source", "hit", "chance", "prob", "iou",
                                         "n_gt_boxes", "n_pred_boxes"])
    overall = _summary(table)
    return {"n_pairs": int(len(table)), "n_films": int(table["image"].nunique()),
            **{k: overall[k] for k in ("hit_rate", "chance", "iou_hit_rate", "mean_iou", "n_gt_boxes",
                                       "n_pred_boxes")},
            "by_label": {k: _summary(t) for k, t in table.groupby("label")},
            "by_box_source": {k: _summary(t) for k, t in table.groupby("box_source")},
            "box_threshold": BOX_THRESHOLD, "box_min_area": BOX_MIN_AREA, "pairs": pairs}


def _summary(t: pd.DataFrame) -> dict[str, Any]:
    """One group of pairs: its size, pointing-game hit rate and chance, IoU hit rates and box counts."""
    n = len(t)
    return {"n": int(n), "hit_rate": float(t["hit"].mean()) if n else None,
            "chance": float(t["chance"].mean()) if n else None,
            "iou_hit_rate": {iou_key(v): (float((t["iou"] >= v).mean()) if n else None) for v in IOU_THRESHOLDS},
            "mean_iou": float(t["iou"].mean()) if n else None,
            "n_gt_boxes": int(t["n_gt_boxes"].sum()), "n_pred_boxes": int(t["n_pred_boxes"].sum())}


def held_out_pointing_game(predictor: Predictor, data_root: str | os.PathLike,
                           folder: str = "nih/images_384") -> dict[str, Any]:
    """:func:`pointing_game` on the boxed films outside the checkpoint's training split.

    The training split comes from the checkpoint's ``splits.csv`` (an ensemble's members' together); without
    one every boxed film counts and the result says so (``held_out: false``).
    """
    files = predictor.split_files  # an ensemble's: each member's (a film any member trained on is left out)
    exclude: set[str] = set()
    for splits in filter(Path.is_file, files):
        s = pd.read_csv(splits)
        exclude |= set(s.loc[s["split"] == "train", "image"])
    result = pointing_game(predictor, load_boxes(data_root), Path(data_root) / folder, exclude=exclude)
    result["held_out"] = all(p.is_file() for p in files)
    result["folder"] = folder
    return result


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """What a release stores of a :func:`held_out_pointing_game` result (``config.json``'s
    ``localization``): the overall numbers and, per finding, n, hit rate, IoU hit rates and box counts
    (no per-film pairs)."""
    keys = ("hit_rate", "chance", "n_pairs", "n_films", "held_out", "iou_hit_rate", "mean_iou", "n_gt_boxes",
            "n_pred_boxes", "box_threshold")
    out = {k: result[k] for k in keys if k in result}
    if result.get("by_label"):
        out["by_label"] = {label: {k: m[k] for k in ("n", "hit_rate", "iou_hit_rate", "n_gt_boxes") if k in m}
                           for label, m in sorted(result["by_label"].items())}
    return out


def card_section(result: dict[str, Any]) -> str:
    """The model card's "Where the heatmap points" section: the pointing game, then a compact table of
    the hit rate and the IoU hit rates per finding with their counts."""
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.0%}"

    cols = [iou_key(t) for t in IOU_THRESHOLDS]
    rows = [("**all**", result)] + sorted(result["by_label"].items())
    table = "\n".join(
        [f"| finding | boxed findings (boxes) | max in box | {' | '.join(f'IoU >= {c}' for c in cols)} |",
         "|---|---|---|" + "---|" * len(cols)]
        + [f"| {name} | {m.get('n', result['n_pairs'])} ({m['n_gt_boxes']}) | {pct(m['hit_rate'])} | "
           + " | ".join(pct(m["iou_hit_rate"][c]) for c in cols) + " |" for name, m in rows])
    films = ("boxed NIH films outside this model's training split" if result.get("held_out")
             else "boxed NIH films (no training split known: training films may be among them)")
    return (
        f"On {result['n_films']} {films} (NIH's own boxes and the RSNA radiologists' lung-opacity boxes, the "
        "latter scored on the Pneumonia map), the maximum of the finding's Grad-CAM falls inside the box for "
        f"**{result['hit_rate']:.0%}** of {result['n_pairs']} boxed findings; a random point would for "
        f"{result['chance']:.0%}. Per finding: "
        + ", ".join(f"{k} {m['hit_rate']:.0%} of {m['n']}" for k, m in sorted(result["by_label"].items()))
        + f".\n\nThe map cut at {result['box_threshold']:g} of its maximum gives one box per region "
        f"({result['n_pred_boxes']} in all); a finding counts as found at IoU t when its best box overlaps the "
        "union of the radiologists' boxes for it on that film by at least t (a box over one of two boxed lungs "
        "scores about 0.5):\n\n" + table
        + "\n\n(`python -m chestxray localize --model NAME` reproduces it.)")
