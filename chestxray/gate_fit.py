"""Fitting the input gate offline: augmentation, features over data sets, calibration, evaluation sets.

The run-time gate (:mod:`chestxray.gate`) only applies what is fitted here, once per shipped model
at release time (``python -m chestxray fit-gate --model weights/resnet18``, or ``release``).

The one-class components are fitted on the training films plus one augmented copy of each
(other exposure, window, processing and collimation: see :func:`augment_chest`). Each gives a
squared distance ``d``; ``z = (log d - median) / scale`` is normalised by out-of-fold distances of
the training films. On *validation* chest films each component's ``1 - target_fa / n`` quantile
(capped so that at least 5 films lie above it) becomes its offset, the gate's score is the
largest ``z - offset``, and the threshold is the ``1 - target_fa`` quantile of the validation
scores. Only chest films set these numbers, never non-chest images, so the few real non-chest
files we have stay an honest test set (:data:`NON_CHEST_FILES`, reported by :func:`evaluate`).
(The offsets matter: the embedding component of some models is heavy-tailed on unseen films, and
it must not raise the bar for the others.)
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chestxray.checkpoint import load_folder
from chestxray.gate import STAT_NAMES, Gate, Gaussian, model_fingerprint, pixel_features
from chestxray.imaging import ImageReadError, XrayImage, read_image
from chestxray.labels import get_label_set
from chestxray.predictor import Predictor
from chestxray.sources import source_names

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# One-class Gaussian components
# --------------------------------------------------------------------------------------------

def ledoit_wolf(x: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf shrunk covariance of the rows of ``x`` (as scikit-learn's ``LedoitWolf``)."""
    x = x - x.mean(0)
    n, p = x.shape
    cov = x.T @ x / n
    x2 = x ** 2
    trace = x2.sum(0) / n
    mu = trace.sum() / p
    delta_ = (cov ** 2).sum()
    beta_ = (x2.T @ x2).sum() / n
    beta = (beta_ - delta_) / (p * n)
    delta = (delta_ - 2 * mu * trace.sum() + p * mu ** 2) / p
    beta = min(beta, delta)
    shrink = 0.0 if beta == 0 else beta / delta
    return (1 - shrink) * cov + shrink * mu * np.eye(p)


def fit_gaussian(x: np.ndarray, k: int) -> Gaussian:
    """Fits a :class:`~chestxray.gate.Gaussian` to the rows of ``x`` keeping ``k`` principal components."""
    x = np.asarray(x, np.float64)
    mu = x.mean(0)
    sd = x.std(0)
    sd = np.where(sd > 1e-6 * max(float(sd.max()), 1e-12), sd, max(float(sd.max()), 1e-6))  # dead dims
    z = (x - mu) / sd
    k = max(1, min(k, x.shape[1], x.shape[0] - 2))
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    basis = vt[:k].T
    y = z @ basis
    precision = np.linalg.pinv(ledoit_wolf(y), hermitian=True)
    resid = z - y @ basis.T
    dof = x.shape[1] - k
    res_var = float((resid ** 2).sum(1).mean() / dof) if dof > 0 else 0.0
    return Gaussian(mu, sd, basis, precision, max(res_var, 1e-9) if dof > 0 else 0.0)


def _oof_distances(x: np.ndarray, k: int, groups: np.ndarray | None = None, folds: int = 5,
                   seed: int = 0) -> np.ndarray:
    """Out-of-fold squared distances of the training rows (an unbiased picture of 'typical');
    rows of one group (an image and its augmented copies) share a fold."""
    n = len(x)
    groups = np.arange(n) if groups is None else np.asarray(groups)
    uniq = np.unique(groups)
    folds = max(2, min(folds, len(uniq) // 10))
    fold_of = dict(zip(np.random.default_rng(seed).permutation(uniq).tolist(), np.arange(len(uniq)) % folds))
    fold = np.array([fold_of[g] for g in groups.tolist()])
    out = np.empty(n)
    for f in range(folds):
        held = fold == f
        out[held] = fit_gaussian(x[~held], k).distance(x[held])
    return out


def _robust_norm(d: np.ndarray) -> tuple[float, float]:
    ld = np.log(d)
    med = float(np.median(ld))
    q25, q75 = np.percentile(ld, [25, 75])
    return med, float(max((q75 - q25) / 1.349, 1e-3))


@dataclass
class GateStats:
    """What :func:`fit_gate` measured (rates on chest films are false alarms of the score alone)."""

    path: Path | None
    n_train: int
    n_val: int
    threshold: float
    target_fa: float
    val_false_alarm: float
    components: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Features of data sets
# --------------------------------------------------------------------------------------------

def augment_chest(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible variant of a chest film: another exposure/window (gamma, black and white points,
    sometimes histogram equalisation) and another collimation (margins cropped). Fitting on these
    teaches the one-class components that such variation is normal, so washed-out, heavily
    processed or tightly cropped films do not raise alarms."""
    x = np.asarray(pixels, np.float32)
    h, w = x.shape
    top, bottom, left, right = (rng.uniform(0, 0.08, 4) * [h, h, w, w]).astype(int)
    x = x[top: h - bottom or None, left: w - right or None]
    lo, hi = rng.uniform(0.0, 0.12), rng.uniform(0.85, 1.0)
    x = np.clip((x - lo) / (hi - lo), 0.0, 1.0) if rng.random() < 0.5 else x
    if rng.random() < 0.3:  # strong processing (as in many exported films): partial equalisation
        hist = np.histogram(x, bins=256, range=(0.0, 1.0))[0].cumsum()
        eq = (hist / hist[-1]).astype(np.float32)[np.minimum((x * 256).astype(np.int32), 255)]
        a = np.float32(rng.uniform(0.3, 1.0))
        x = (1 - a) * x + a * eq
    x = np.power(x, np.float32(np.exp(rng.uniform(-0.6, 0.6))))
    return np.ascontiguousarray(x, dtype=np.float32)


def _pixels_of(item: Any) -> np.ndarray:
    """The gray pixels in [0,1] of a path, bytes, an XrayImage or an array."""
    if isinstance(item, XrayImage):
        return item.pixels
    if isinstance(item, (str, os.PathLike, bytes, bytearray)):
        return read_image(bytes(item) if isinstance(item, bytearray) else item).pixels
    arr = np.asarray(item)
    return arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr


@dataclass
class Features:
    """Gate features of a set of images (rows aligned)."""

    thumbs: np.ndarray  # N x THUMB*THUMB
    stats: np.ndarray  # N x len(STAT_NAMES)
    embeddings: np.ndarray | None  # N x C (None without a predictor)
    kept: list[int]  # index into the input list of each row's image
    augmented: np.ndarray  # N bool: row is an augmented copy

    def __len__(self) -> int:
        return len(self.kept)


def extract_features(images: Sequence, predictor: Predictor | None = None, batch_size: int = 16, augment: int = 0,
                     seed: int = 0, progress: Callable[[int, int], None] | None = None) -> Features:
    """Reads the images once and computes their gate features (plus ``augment`` augmented copies
    of each, see :func:`augment_chest`). Unreadable files are skipped with a logged warning."""
    rng = np.random.default_rng(seed)
    thumbs, stats, embs, kept, aug, pending = [], [], [], [], [], []

    def flush():
        if predictor is not None and pending:
            embs.append(predictor.embed(pending).astype(np.float64))
        pending.clear()

    for i, item in enumerate(images):
        try:
            pixels = np.asarray(_pixels_of(item), np.float32)
        except ImageReadError as err:
            log.warning("skipped %s: %s", item if isinstance(item, (str, os.PathLike)) else i, err)
            continue
        for copy in range(1 + augment):
            x = pixels if copy == 0 else augment_chest(pixels, rng)
            t, s = pixel_features(x)
            thumbs.append(t)
            stats.append(s)
            kept.append(i)
            aug.append(copy > 0)
            pending.append(x)
            if len(pending) >= batch_size:
                flush()
        if progress is not None and (i + 1) % 100 == 0:
            progress(i + 1, len(images))
    flush()
    emb = np.concatenate(embs) if embs else None
    return Features(np.array(thumbs).reshape(len(kept), -1), np.array(stats).reshape(len(kept), -1), emb, kept,
                    np.array(aug, dtype=bool))


def _one_blas_thread() -> contextlib.AbstractContextManager:
    """One BLAS thread while fitting (small matrices: more threads only fight the other jobs)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(1)


def fit_gate(predictor: Predictor | None, train_images: Sequence, val_images: Sequence,
             out_path: str | os.PathLike | None = None, *, target_fa: float = 0.01, k_thumb: int = 24, k_embedding: int = 32, augment: int = 1,
             use_embedding: bool = True, seed: int = 0, meta: dict[str, Any] | None = None,
             train_features: Features | None = None, val_features: Features | None = None) -> tuple[Gate, GateStats]:
    """Fits the gate on chest X-rays only and calibrates its threshold on held-out chest X-rays.

    Args:
        predictor: the :class:`~chestxray.predictor.Predictor` whose embeddings the gate models
            (None: appearance components only).
        train_images: frontal chest X-rays the model was trained on (paths, bytes, XrayImages or
            arrays): the Gaussians are fitted on them (and on ``augment`` augmented copies of each).
        val_images: other frontal chest X-rays (not in ``train_images``, ideally patients the model
            did not see): the threshold is the ``1 - target_fa`` quantile of their scores.
        out_path: where to save ``gate.safetensors`` (None: do not save).
        target_fa: the false-alarm rate aimed at on chest X-rays.
        k_thumb, k_embedding: principal components kept (capped by the number of images).
        train_features, val_features: precomputed :func:`extract_features` results (skip reading).

    Returns:
        (gate, stats).
    """
    emb_pred = predictor if use_embedding else None
    tr = train_features or extract_features(train_images, emb_pred, augment=augment, seed=seed)
    va = val_features or extract_features(val_images, emb_pred)
    n_tr, n_va = int((~tr.augmented).sum()), int((~va.augmented).sum())
    if n_tr < 10 or n_va < 5:
        raise ValueError(f"too few readable images to fit a gate: {n_tr} train, {n_va} val")
    data = {"thumb": (tr.thumbs, va.thumbs, k_thumb), "stats": (tr.stats, va.stats, len(STAT_NAMES))}
    if use_embedding and tr.embeddings is not None and va.embeddings is not None:
        data["embedding"] = (tr.embeddings, va.embeddings, k_embedding)
    groups = np.asarray(tr.kept)
    models, norms = {}, {}
    with _one_blas_thread():  # small matrices: extra BLAS threads only fight the other jobs
        for name, (x, _, k) in data.items():
            kk = min(k, max(2, n_tr // 5))
            models[name] = fit_gaussian(x, kk)
            norms[name] = _robust_norm(_oof_distances(x, kk, groups=groups, seed=seed))
    gate = Gate(models, norms, threshold=np.inf)
    val_z = gate.component_z(va.thumbs, va.stats, va.embeddings if "embedding" in models else None)
    # Each component is first calibrated on its own (its 1 - target_fa / n quantile on val becomes
    # 0; at least 5 val films above it, so that small val sets give stable offsets), then the
    # combined score's 1 - target_fa quantile is the threshold.
    q = min(1.0 - target_fa / len(val_z), 1.0 - 5.0 / n_va)
    gate.offsets = {k: float(np.quantile(v, q)) for k, v in val_z.items()}
    val_scores = gate.combine(val_z)
    threshold = float(np.quantile(val_scores, 1.0 - target_fa, method="higher"))
    gate.threshold = threshold
    gate.meta = {"target_fa": target_fa, "n_train": n_tr, "n_train_augmented": int(tr.augmented.sum()),
                 "n_val": n_va, "val_false_alarm": float((val_scores > threshold).mean()), **(meta or {})}
    if predictor is not None:
        gate.meta.update(model=str(predictor.name), arch=str(predictor.arch), fingerprint=model_fingerprint(predictor),
                         embedding_dim=int(tr.embeddings.shape[1]) if "embedding" in models else 0)
    path = gate.save(out_path) if out_path is not None else None
    stats = GateStats(path, n_tr, n_va, threshold, target_fa, gate.meta["val_false_alarm"], list(models),
                      dict(gate.meta))
    return gate, stats


# --------------------------------------------------------------------------------------------
# Evaluation sets and the CLI
# --------------------------------------------------------------------------------------------

#: Real non-chest files in the shared data (file name -> what it is).
NON_CHEST_FILES = {
    "ood/photo_china.jpg": "photo", "ood/photo_flower.jpg": "photo", "ood/photo_grace_hopper.jpg": "photo",
    "ood/ct_abdomen_kcr2019.png": "CT (png)", "ood/mri_brain_matplotlib_s1045.png": "MR (png)",
    "ood/mri_pydicom_MR2.png": "MR (png)", "dicom/kcr2019_anon_apct_abdomen_CT.dcm": "CT (dicom)",
    "dicom/pydicom_MR2_UNCR_mr.dcm": "MR (dicom)", "dicom/pydicom_US1_UNCR_us.dcm": "ultrasound (dicom)",
    "dicom/pydicom_RG3_UNCR_tibia_CR.dcm": "tibia radiograph (dicom)",
}
#: Real chest X-rays outside the training sources' folders (uploads as a user would make them).
EXTRA_CHEST_FILES = ("dicom/pydicom_RG1_UNCR_chest_CR.dcm", "dicom/pydicom_RG1_J2KI_chest_CR_jpeg2000.dcm",
                     "misc/16747_3_1.jpg", "misc/covid-19-pneumonia-58-prior.jpg", "misc/h0001.png",
                     "misc/tb0005.png", "misc/tb0007.png")


def chest_manifest(model_dir: str | os.PathLike, data_root: str | os.PathLike,
                   extra_sources: Sequence[str] = ("tbx11k",), seed: int = 0,
                   manifest: str | os.PathLike | None = None):
    """Chest X-ray manifest with a ``split`` column: ``manifest`` or the run's ``manifest.csv`` (in the
    model folder or its parent: the model's own split), else a patient split of the shared sources;
    sources in ``extra_sources`` that the run did not use get their own patient split."""
    import pandas as pd  # (pandas and the data sources: only fitting from the shared data needs them)

    from chestxray.data import load_sources, patient_split

    labels = get_label_set("nih14")
    folder = Path(model_dir).resolve()
    found = [Path(p) for p in (manifest, folder / "manifest.csv", folder.parent / "manifest.csv")
             if p is not None and Path(p).is_file()]
    if manifest is not None and not Path(manifest).is_file():
        raise FileNotFoundError(f"manifest not found: {manifest}")
    if found:
        df = pd.read_csv(found[0], usecols=["path", "patient", "source", "split"])
        df["from"] = f"run manifest {found[0]}"  # (the path is printed, not stored in the gate)
    else:
        names = source_names(include_repeats=False)  # every film once
        df = load_sources(names, data_root, labels, missing="drop")
        df["split"] = patient_split(df, seed=seed, stratify_by=[])
        df = df[["path", "patient", "source", "split"]].assign(**{"from": "patient split"})
    extra = [s for s in extra_sources if s not in set(df["source"])]
    if extra:
        ex = load_sources(extra, data_root, labels, missing="drop")
        ex["split"] = patient_split(ex, seed=seed, stratify_by=[])
        df = pd.concat([df, ex[["path", "patient", "source", "split"]].assign(**{"from": "gate split"})],
                       ignore_index=True)
    return df


def sample_rows(df, n: int, seed: int):
    """At most ``n`` rows of a data frame, drawn with ``seed``."""
    return df if len(df) <= n else df.sample(n=n, random_state=seed)


def evaluate(gate: Gate, predictor: Predictor | None, groups: dict[str, Sequence], chest: set[str] | None = None,
             pixels_only: set[str] | None = None) -> list[dict]:
    """Flag rates per group: ``{group: [paths or arrays]}`` -> rows with n, flagged, rate, per-rule counts.

    Groups named in ``chest`` count flags as false alarms, the others as catches. Files are read
    as a user would upload them (metadata and colour rules apply), except for groups named in
    ``pixels_only``: these are judged on their gray pixels alone, as if exported to gray PNG.
    Arrays (float HxW in [0,1]) are judged on their pixels.
    """
    rows = []
    for name, items in groups.items():
        flagged, n, by_rule, files = 0, 0, {}, []
        for i, item in enumerate(items):
            is_file = isinstance(item, (str, os.PathLike))
            try:
                x = read_image(item) if is_file else None
            except ImageReadError:
                continue
            pixels = x.pixels if x is not None else _pixels_of(item)
            emb = predictor.embed([pixels])[0] if predictor is not None and "embedding" in gate.models else None
            # x carries the file's metadata and colour fraction; None judges the gray pixels alone
            r = gate.assess(None if pixels_only and name in pixels_only else x, pixels, emb)
            n += 1
            flagged += not r.ok
            for rule in r.rules:
                by_rule[rule] = by_rule.get(rule, 0) + 1
            files.append((Path(item).name if is_file else f"#{i}", r.ok, round(r.score, 2), r.rules))
        rows.append({"group": name, "kind": "chest" if chest and name in chest else "non-chest", "n": n,
                     "flagged": flagged, "rate": flagged / n if n else float("nan"), "rules": by_rule,
                     "files": files})
    return rows


def format_rows(rows: list[dict], show_files: bool = False) -> str:
    """A plain-text table of :func:`evaluate` rows."""
    lines = [f"{'group':34s} {'kind':9s} {'n':>5s} {'flagged':>7s} {'rate':>7s}  metric          by rule"]
    for r in rows:
        metric = "false alarm" if r["kind"] == "chest" else "catch"
        lines.append(f"{r['group']:34s} {r['kind']:9s} {r['n']:5d} {r['flagged']:7d} {r['rate']:7.1%}  "
                     f"{metric:15s} {r['rules']}")
        if show_files:
            lines += [f"    {f:40s} ok={ok!s:5s} score={s:6.2f} {rules}" for f, ok, s, rules in r["files"]]
    return "\n".join(lines)


def fit_from_folder(model_dir: str | os.PathLike, data_root: str | os.PathLike, out: str | os.PathLike | None,
                    *, max_train_per_source: int = 600, max_eval_per_source: int = 300, target_fa: float = 0.01,
                    seed: int = 0, report: bool = True, extra_sources: Sequence[str] = ("tbx11k",),
                    manifest: str | os.PathLike | None = None,
                    use_embedding: bool = True,
                    print_fn: Callable[[str], None] = print) -> tuple[Gate, GateStats, list]:
    """Fits a gate for a checkpoint folder from the shared data and reports its rates.

    Gaussians: the train split (at most ``max_train_per_source`` per source); threshold: the val
    split; report: the test split per source, the extra real chest files and the real non-chest
    files (never used in fitting or calibration).
    """
    root = Path(data_root)
    predictor = Predictor(load_folder(model_dir), device="cpu")
    df = chest_manifest(model_dir, root, extra_sources=extra_sources, seed=seed, manifest=manifest)
    if not str(df["from"].iloc[0]).startswith("run manifest"):
        print_fn("warning: no run manifest.csv beside the model (pass --manifest runs/<arch>/manifest.csv): a fresh "
                 "patient split is used, so 'val' and 'test' may hold images the model was trained on")
    parts = {}
    for split, cap in (("train", max_train_per_source), ("val", max_eval_per_source), ("test", max_eval_per_source)):
        sub = df[df["split"] == split]
        parts[split] = {s: list(sample_rows(g, cap, seed)["path"]) for s, g in sub.groupby("source")}
    train = [p for ps in parts["train"].values() for p in ps]
    val = [p for ps in parts["val"].values() for p in ps]
    t0 = time.perf_counter()
    print_fn(f"fitting on {len(train)} train / calibrating on {len(val)} val chest X-rays "
             f"({df['from'].iloc[0]}); model {predictor.name} ({predictor.arch})")
    gate, stats = fit_gate(predictor, train, val, out, target_fa=target_fa, use_embedding=use_embedding,
                           meta={"sources": sorted(parts["train"]),
                                 "split_from": str(df["from"].iloc[0]).split(" /")[0]})
    print_fn(f"threshold {stats.threshold:.3f} (val false alarm {stats.val_false_alarm:.1%}); "
             f"{time.perf_counter() - t0:.0f} s; saved to {stats.path}")
    rows = []
    if report:
        groups = {f"val chest {s}": ps for s, ps in parts["val"].items()}
        groups.update({f"test chest {s}": ps for s, ps in parts["test"].items()})
        groups["extra chest files (misc, dicom)"] = [str(root / f) for f in EXTRA_CHEST_FILES if (root / f).is_file()]
        chest = set(groups)
        non_chest = [str(root / f) for f in NON_CHEST_FILES if (root / f).is_file()]
        groups["non-chest files (ood, dicom)"] = non_chest
        groups["non-chest, gray pixels only"] = non_chest
        rows = evaluate(gate, predictor, groups, chest, pixels_only={"non-chest, gray pixels only"})
        print_fn(format_rows(rows, show_files=False))
        print_fn(format_rows([r for r in rows if r["kind"] == "non-chest" or "extra" in r["group"]], show_files=True))
    return gate, stats, rows

