"""Knowledge distillation: a teacher's probabilities as soft targets for a student.

Most chest films here carry no NIH finding labels (Kermany, COVID-19, TBX11K). A teacher that has
learnt the findings labels every one of them with its probabilities; the student is trained on
``BCE(labels, where known) + kd_weight * BCE(teacher probabilities)``. The teacher sees each film
once, without augmentation, through its own checkpoint's preprocessing (from the same uint8
cache the student reads), and the result is stored beside the run so a resumed run reuses it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from chestxray.cache import CachedImages

log = logging.getLogger(__name__)


def _key(teachers: Sequence[str], paths: Sequence[str], labels: Sequence[str],
         weights: Sequence[dict[str, torch.Tensor]] = ()) -> str:
    """Names, labels, image paths and the teachers' weights: a re-trained teacher under the same
    name must not reuse the soft targets of its predecessor."""
    h = hashlib.sha256(json.dumps([list(teachers), list(labels)]).encode())
    for p in paths:
        h.update(p.encode())
    for state in weights:
        for name, t in sorted(state.items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def _one_teacher(ck, cache: CachedImages, rows: np.ndarray, labels: Sequence[str], batch_size: int,
                 progress: bool) -> np.ndarray:
    """One teacher's sigmoid probabilities in the student's label order (NaN where it lacks a label)."""
    cols = [labels.index(name) if name in labels else -1 for name in ck.labels]
    out = np.full((len(rows), len(labels)), np.nan, dtype=np.float32)
    for start in tqdm(range(0, len(rows), batch_size), desc=f"teacher {ck.name}", disable=not progress,
                      leave=False):
        x = torch.from_numpy(np.asarray(cache.array[rows[start:start + batch_size]])).float().div_(255.0)
        p = torch.sigmoid(ck.model(ck.preprocess(x))).numpy()
        for j, c in enumerate(cols):
            if c >= 0:
                out[start:start + len(p), c] = p[:, j]
    log.info("teacher %s labelled %d images", ck.name, len(rows))
    return out


def teacher_probs(teachers: Sequence[str], cache: CachedImages, paths: Sequence[str], labels: Sequence[str],
                  out_dir: str | os.PathLike | None = None, batch_size: int = 64,
                  progress: bool = True) -> np.ndarray:
    """Mean sigmoid probability of the teachers for each path (N x len(labels), NaN where no
    teacher has that label). Each teacher's pass is cached on its own as
    ``<out_dir>/teacher_probs_<key>.npy``, so a run killed during the second teacher's pass (an hour
    on two CPU cores) keeps the first one's.

    Args:
        teachers: model references (shipped names, folders, ``hf-hub:``).
        cache: the uint8 image cache holding every path.
        paths: the images, in the order of the result.
        labels: the student's labels; teachers' labels are matched by name.
    """
    from chestxray.checkpoint import load_checkpoint

    rows = np.array([cache.index_of(p) for p in paths], dtype=np.int64)
    each = []
    for ref in teachers:
        ck = load_checkpoint(ref)
        key = _key([ref], paths, labels, [ck.model.state_dict()])
        stored = Path(out_dir) / f"teacher_probs_{key}.npy" if out_dir else None
        if stored is not None and stored.is_file():
            each.append(np.load(stored))
            continue
        probs = _one_teacher(ck, cache, rows, labels, batch_size, progress)
        if stored is not None:
            stored.parent.mkdir(parents=True, exist_ok=True)
            np.save(stored, probs)
        each.append(probs)
    stack = np.stack(each)
    known = np.isfinite(stack)
    count = known.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 -> NaN: no teacher knows this label
        return (np.where(known, stack, 0.0).sum(axis=0) / count).astype(np.float32)


def splits_from_run(df: pd.DataFrame, run: str | os.PathLike) -> pd.Series:
    """Each row's split in an earlier run (its ``manifest.csv``, or a released ``splits.csv``),
    matched by (source, file name); NaN for images that run did not have.

    A student must keep its teacher's validation and test patients out of training, or the
    teacher's knowledge of them leaks in.
    """
    run = Path(run)
    if (run / "manifest.csv").is_file():
        m = pd.read_csv(run / "manifest.csv", usecols=["path", "source", "split"])
        m["image"] = m["path"].map(os.path.basename)
    elif (run / "splits.csv").is_file():
        m = pd.read_csv(run / "splits.csv")
    else:
        raise ValueError(f"split_from: {run} has neither manifest.csv nor splits.csv")
    table = dict(zip(zip(m["source"], m["image"]), m["split"]))
    keys = zip(df["source"], df["path"].map(os.path.basename))
    return pd.Series([table.get(k) for k in keys], index=df.index, name="split", dtype=object)
