"""Manifests, patient-wise splits and the masked multi-label loss.

A *manifest* is a DataFrame with one row per image: ``path`` (absolute), ``patient`` (namespaced,
e.g. ``"nih:100"``), ``source``, ``cohort`` (the sample within a source, e.g. NIH's label-balanced
``reproduce_chexnet`` films; the source's name where the label file names none), ``view`` and one
float32 column per label holding 1.0 / 0.0 / NaN.
NaN means *unknown* (the source does not annotate that finding) and is masked out of the loss;
it is never read as "negative". The image cache, datasets and batch augmentation live in
:mod:`chestxray.cache` and are re-exported here.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from chestxray.cache import (CachedImages, RawXrayDataset, XrayDataset,  # noqa: F401 (re-exports)
                             batch_augment, build_cache)
from chestxray.labels import NO_FINDING, PROXIES, canonical, parse_findings
from chestxray.sources import SOURCES

log = logging.getLogger(__name__)

BASE_COLUMNS = ("path", "patient", "source", "cohort", "view")
SPLITS = ("train", "val", "test")


def default_sources(data_root: str | os.PathLike) -> dict[str, dict]:
    """Returns ``{name: read_manifest kwargs (without labels)}`` for the shared data folder
    (the sources of :data:`chestxray.sources.SOURCES`)."""
    return {name: s.reader_options(name, data_root) for name, s in SOURCES.items()}


def _existing(paths: Sequence[str]) -> np.ndarray:
    """Which paths exist, listing each parent folder once (fast for NIH's 112k-row label file)."""
    listing: dict[str, set[str]] = {}
    out = np.zeros(len(paths), dtype=bool)
    for i, p in enumerate(paths):
        parent, name = os.path.split(p)
        if parent not in listing:
            try:
                listing[parent] = set(os.listdir(parent))
            except OSError:
                listing[parent] = set()
        out[i] = name in listing[parent]
    return out


def _binary(value: str) -> float:
    """One per-label cell: 1/0 (also '1.0', 'True'), blank or anything else (e.g. -1) -> NaN."""
    v = str(value).strip().lower()
    if v in ("1", "1.0", "true", "yes"):
        return 1.0
    if v in ("0", "0.0", "false", "no"):
        return 0.0
    return float("nan")


def _reading(cell: str, label: str) -> float:
    """One cell of a label's own column: blank -> NaN; naming ``label`` (among names joined by
    ``|`` or ``,``, e.g. "COVID-19, ARDS") -> 1; any other reading (e.g. "Normal") -> 0."""
    names = {canonical(t) for t in re.split(r"[|,]", str(cell)) if t.strip()}
    if not names:
        return float("nan")
    return 1.0 if canonical(label) in names else 0.0


def read_manifest(csv_path: str | os.PathLike, images_dir: str | os.PathLike, labels: Sequence[str],
                  source: str, annotated: Sequence[str] | None = None, path_col: str = "Image Index",
                  findings_col: str = "Finding Labels", patient_col: str = "Patient ID",
                  view_col: str = "View Position", cohort_col: str = "source",
                  patient_prefix: str | None = None, missing: str = "warn",
                  diagnosis_cols: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Reads one label file into a manifest (see the module docstring for the columns).

    Two layouts are detected: NIH's pipe-joined ``findings_col`` ("No Finding" for none; an empty
    cell means the row is unlabelled -> all NaN), or one column per label with 1 / 0 / blank
    (blank or other values such as CheXpert's -1 -> NaN). Labels not in ``annotated`` are NaN,
    except ``No Finding``, which is always derived: 1 when the findings are exactly "No Finding",
    0 when the row has any positive finding (even one outside the label set). In the per-label
    layout without a "No Finding" column it is 0 when a label is positive and NaN otherwise.
    A proxy label (:data:`chestxray.labels.PROXIES`) is 1 when the findings name any of its
    findings, 0 when they name none, and annotated where all of its findings are.

    Args:
        csv_path: the label file (``.csv`` or ``.csv.gz``; NIH's ``Data_Entry_2017*.csv.gz`` works).
        images_dir: folder the ``path_col`` entries are relative to.
        labels: the label set (column order of the result).
        source: source name stored in the ``source`` column.
        cohort_col: column naming the sample an image belongs to (NIH's ``source``: the balanced
            ``reproduce_chexnet`` films vs others); blank or absent -> ``source``.
        annotated: labels this source annotates (default: all).
        patient_prefix: patient namespace (default ``source``); ``"{prefix}:{id}"``. Without a
            patient column the image file name is the patient (one image per patient).
        diagnosis_cols: ``{label: column}`` for labels read from a column of their own (a second
            reader's diagnosis, e.g. NIH's ``rsna_class``): see :func:`_reading`. Such a label is
            known exactly where its cell is filled, whatever ``annotated`` says.
        missing: rows whose image file is missing are dropped; ``"warn"`` warns with the count,
            ``"drop"`` only logs it (for NIH's full label file against a sample folder),
            ``"error"`` raises FileNotFoundError.
    """
    labels = [canonical(label) for label in labels]
    annotated_set = set(labels) if annotated is None else {canonical(a) for a in annotated}
    # A proxy is annotated where its findings are (NIH: all of them; Kermany: neither).
    annotated_set |= {p for p, members in PROXIES.items()
                      if annotated is None or set(members) <= annotated_set}
    prefix = source if patient_prefix is None else patient_prefix
    raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    if path_col not in raw.columns:
        raise ValueError(f"{csv_path}: no {path_col!r} column (columns: {list(raw.columns)})")
    notes: list[str] = []
    images_dir = os.path.abspath(images_dir)
    paths = [os.path.normpath(os.path.join(images_dir, p.strip())) for p in raw[path_col]]

    exists = _existing(paths)
    n_missing = int((~exists).sum())
    if n_missing:
        msg = f"{source}: dropped {n_missing} of {len(raw)} rows whose image file is missing in {images_dir}"
        if missing == "error":
            raise FileNotFoundError(msg)
        (warnings.warn if missing == "warn" else log.info)(msg)
        raw = raw.loc[exists].reset_index(drop=True)
        paths = [p for p, e in zip(paths, exists) if e]

    values = np.full((len(raw), len(labels)), np.nan, dtype=np.float32)
    if findings_col in raw.columns:  # layout (a): NIH pipe-joined findings
        for i, text in enumerate(raw[findings_col]):
            found = parse_findings(text)
            if not found:
                continue  # unlabelled row: everything unknown
            positive = found - {NO_FINDING}
            for j, label in enumerate(labels):
                if label == NO_FINDING:
                    values[i, j] = 0.0 if positive else 1.0
                elif label in annotated_set:
                    values[i, j] = 1.0 if label in positive or positive & set(PROXIES.get(label, ())) else 0.0
    else:  # layout (b): one column per label
        columns = {canonical(c): c for c in raw.columns if c not in (path_col, patient_col, view_col, cohort_col)}
        label_cols = [c for c in columns if c in set(labels) or c == NO_FINDING]
        if not label_cols:
            raise ValueError(f"{csv_path}: neither {findings_col!r} nor any label column of {labels}")
        for j, label in enumerate(labels):
            if label in columns and (label in annotated_set or label == NO_FINDING):
                values[:, j] = [_binary(v) for v in raw[columns[label]]]
            elif label in annotated_set and label != NO_FINDING:
                notes.append(f"{label} is annotated but has no column: unknown")
        if NO_FINDING in labels and NO_FINDING not in columns:
            known = [c for c in columns if c in annotated_set]
            any_pos = np.zeros(len(raw), dtype=bool)
            for c in known:
                any_pos |= np.array([_binary(v) == 1.0 for v in raw[columns[c]]], dtype=bool)
            values[any_pos, labels.index(NO_FINDING)] = 0.0

    for label, col in (diagnosis_cols or {}).items():
        if canonical(label) not in labels:
            continue
        j = labels.index(canonical(label))
        if col in raw.columns:
            values[:, j] = [_reading(v, label) for v in raw[col]]
        else:  # the source's reading is not in this file (e.g. a user's CSV): unknown, never "no"
            values[:, j] = np.nan
            notes.append(f"{label}: no {col!r} column: unknown")

    names = [os.path.basename(p) for p in paths]
    if patient_col in raw.columns:
        ids = [pid.strip() or name for pid, name in zip(raw[patient_col], names)]
    else:
        ids = names
        notes.append(f"no {patient_col!r} column: each image file is its own patient")
        log.info("%s: %s", source, notes[-1])
    view = list(raw[view_col].str.strip().replace("", None)) if view_col in raw.columns else [None] * len(raw)

    cohort = ([c.strip() or source for c in raw[cohort_col]] if cohort_col in raw.columns else [source] * len(raw))
    df = pd.DataFrame({"path": paths, "patient": [f"{prefix}:{pid}" for pid in ids], "source": source,
                       "cohort": pd.Series(cohort, dtype=object), "view": pd.Series(view, dtype=object)})
    for j, label in enumerate(labels):
        df[label] = values[:, j]
    df.attrs["notes"] = notes
    df.attrs["dropped_missing"] = n_missing
    return df


def load_sources(names: Sequence[str], data_root: str | os.PathLike, labels: Sequence[str],
                 missing: str = "warn") -> pd.DataFrame:
    """Concatenates the manifests of several shared-data sources (each keeps its ``source``)."""
    known = default_sources(data_root)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown sources {unknown}; known: {', '.join(known)}")
    parts = [read_manifest(labels=labels, missing=missing, **known[n]) for n in names]
    df = pd.concat(parts, ignore_index=True)
    df.attrs["notes"] = [f"{p['source'].iat[0] if len(p) else '?'}: {n}" for p in parts for n in p.attrs["notes"]]
    return df


def label_columns(df: pd.DataFrame) -> list[str]:
    """The label columns of a manifest (everything but the base columns and ``split``)."""
    return [c for c in df.columns if c not in BASE_COLUMNS and c != "split" and df[c].dtype.kind == "f"]


def label_counts(df: pd.DataFrame, by: str = "source") -> pd.DataFrame:
    """Positives / negatives / unknown per label and group: what each source teaches each label.

    Returns:
        A frame indexed by (group, label) with integer columns ``pos``, ``neg``, ``unknown``.
    """
    rows = []
    for group, part in df.groupby(by, sort=True):
        for label in label_columns(df):
            col = part[label]
            rows.append((group, label, int((col == 1.0).sum()), int((col == 0.0).sum()), int(col.isna().sum())))
    return pd.DataFrame(rows, columns=[by, "label", "pos", "neg", "unknown"]).set_index([by, "label"])


def format_label_counts(df: pd.DataFrame, by: str = "source") -> str:
    """:func:`label_counts` as a text table, one row per group and one ``pos/neg/unknown`` cell per label."""
    counts = label_counts(df, by)
    cells = counts.apply(lambda r: f"{r['pos']}/{r['neg']}/{r['unknown']}", axis=1).unstack("label")
    return cells[label_columns(df)].to_string()


def _hash(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big")


def patient_split(df: pd.DataFrame, val_frac: float = 0.15, test_frac: float = 0.15, seed: int = 0,
                  stratify_by: Sequence[str] | None = None) -> pd.Series:
    """Assigns "train"/"val"/"test" to every row, grouping rows by ``patient`` (never by image).

    Greedy iterative stratification on patients (:func:`stratified_groups`), so every split gets its
    share of rare findings (and, with several sources, of each source).

    Args:
        stratify_by: label columns to balance; default all label columns (plus one indicator per
            source when there are several); ``[]`` for a purely seeded random split.
    """
    fracs = {"train": 1.0 - val_frac - test_frac, "val": val_frac, "test": test_frac}
    if min(fracs.values()) < 0:
        raise ValueError(f"val_frac + test_frac must be <= 1, got {val_frac} + {test_frac}")
    return stratified_groups(df, {s: f for s, f in fracs.items() if f > 0}, seed, stratify_by).rename("split")


def patient_folds(df: pd.DataFrame, k: int, seed: int = 0, cohorts: Sequence[str] = ()) -> pd.Series:
    """Patient-wise, label-stratified k-fold assignment: fold numbers 0..k-1 per row (``int``).

    The same greedy stratification as :func:`patient_split`, with k equal shares, so every fold holds
    about 1/k of each label's positives and of each source; a patient's films share one fold. The
    patients of each of ``cohorts`` (e.g. NIH's label-balanced films) are folded on their own first,
    so each fold holds 1/k of that cohort too.
    """
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {k}")
    fracs = {f"fold{i}": 1.0 / k for i in range(k)}
    groups = pd.Series("", index=df.index, dtype=object)
    rest = np.ones(len(df), dtype=bool)
    for cohort in cohorts:
        patients = set(df.loc[(df["cohort"] == cohort).to_numpy() & rest, "patient"])
        rows = df["patient"].isin(patients).to_numpy() & rest
        if rows.any():
            groups[rows] = stratified_groups(df[rows], fracs, seed).to_numpy()
            rest &= ~rows
    if rest.any():
        groups[rest] = stratified_groups(df[rest], fracs, seed).to_numpy()
    return groups.str.slice(4).astype(int).rename("fold")


def folds_from_cv(df: pd.DataFrame, cv_dir: str | os.PathLike, k: int, data_root: str | os.PathLike, seed: int = 0,
                  cohorts: Sequence[str] = ()) -> pd.Series:
    """The folds of an earlier cross-validation for the patients it had; :func:`patient_folds` for the others.

    A student cross-validated with a teacher's fold models (``teacher_cv``) must hold out exactly the patients the
    teacher's fold model held out, or it would be scored on films its teacher trained on. The earlier folds are
    read from its ``fold<i>/oof.csv`` files (every held-out film: image path under ``data_root``, patient, fold);
    a patient with a film there keeps that fold for all its films, and the patients it never had (a source it did
    not train on) are folded anew among themselves.

    Raises:
        ValueError: ``cv_dir`` holds another number of folds than ``k``, or a fold's ``oof.csv`` is missing.
    """
    cv_dir = Path(cv_dir)
    files = sorted(cv_dir.glob("fold*/oof.csv"))
    if len(files) != k:
        raise ValueError(f"teacher_cv {cv_dir}: {len(files)} folds with oof.csv, the recipe has {k}: finish that "
                         "cross-validation first, with the same fold count")
    earlier = pd.concat([pd.read_csv(f, usecols=["image", "patient", "fold"]) for f in files], ignore_index=True)
    by_film = dict(zip(earlier["image"], earlier["fold"]))
    root = Path(data_root).resolve()
    paths = [Path(p).resolve() for p in df["path"]]
    rel = [p.relative_to(root).as_posix() if p.is_relative_to(root) else None for p in paths]
    film_fold = pd.Series([by_film.get(r) for r in rel], index=df.index, dtype=float)
    per_patient = film_fold.dropna().groupby(df["patient"]).first()
    fold = df["patient"].map(per_patient)
    new = fold.isna().to_numpy()
    if new.any():
        fold[new] = patient_folds(df[new], k, seed=seed, cohorts=cohorts).to_numpy()
    return fold.astype(int).rename("fold")


def stratified_groups(df: pd.DataFrame, fracs: Mapping[str, float], seed: int = 0,
                      stratify_by: Sequence[str] | None = None) -> pd.Series:
    """Assigns each patient's rows to one of ``fracs``' groups (shares of the images), stratified.

    Patients holding positives of the rarest labels are placed first, each into the group that still
    lacks most positives of that label (ties: most images lacking, then a seeded hash); the rest fill
    the image quotas in seeded-hash order.

    Args:
        fracs: ``{group name: share}``, every share > 0.
        stratify_by: as for :func:`patient_split`.
    """
    active = list(fracs)
    if stratify_by is None:
        stratify_by = label_columns(df)
        indicators = pd.DataFrame({c: (df[c] == 1.0) for c in stratify_by}, index=df.index)
        if df["source"].nunique() > 1:
            for s in sorted(df["source"].unique()):
                indicators[f"source={s}"] = df["source"] == s
    else:
        indicators = pd.DataFrame({c: (df[c] == 1.0) for c in stratify_by}, index=df.index)
    per_patient = indicators.astype(np.int64).groupby(df["patient"].to_numpy()).sum()
    n_images = df.groupby("patient").size().reindex(per_patient.index).to_numpy()
    totals = per_patient.sum()
    cols = sorted((c for c in per_patient.columns if totals[c] > 0), key=lambda c: (totals[c], c))  # rarest first
    counts = per_patient[cols].to_numpy(dtype=np.float64).reshape(len(per_patient), len(cols))
    has_pos = counts > 0
    rank = np.where(has_pos.any(axis=1), has_pos.argmax(axis=1) if cols else 0, len(cols))  # rarest positive
    pids = list(per_patient.index)
    # Rarest label first; within it the patients with most positive images first (big pieces
    # before small ones keeps the quotas), then a seeded hash.
    own = counts[np.arange(len(pids)), np.minimum(rank, max(len(cols) - 1, 0))] if cols else np.zeros(len(pids))
    order = sorted(range(len(pids)), key=lambda i: (rank[i], -own[i] if rank[i] < len(cols) else 0,
                                                    _hash(seed, pids[i])))
    # Remaining need per split, relative to its fraction (proportional filling: the first
    # positives of a rare label go one to each split before any split gets a second).
    need = {s: totals[cols].to_numpy(dtype=np.float64) if cols else np.zeros(0) for s in active}
    need_n = {s: float(len(df)) for s in active}
    assignment: dict[str, str] = {}
    for i in order:
        pid, r = pids[i], rank[i]
        tie = {s: -_hash(seed, f"{pid}/{s}") for s in active}
        if r < len(cols):
            best = max(active, key=lambda s: (need[s][r], need_n[s], tie[s]))
        else:
            best = max(active, key=lambda s: (need_n[s], tie[s]))
        assignment[pid] = best
        need_n[best] -= n_images[i] / fracs[best]
        need[best] = need[best] - counts[i] / fracs[best]
    return pd.Series([assignment[p] for p in df["patient"]], index=df.index, name="group", dtype=object)


def parse_cohort_fracs(specs: Sequence[str]) -> dict[str, tuple[float, float]]:
    """``["reproduce_chexnet=0.25:0.25"]`` -> ``{"reproduce_chexnet": (0.25, 0.25)}`` (val, test)."""
    out = {}
    for spec in specs:
        name, sep, fracs = spec.partition("=")
        val, sep2, test = fracs.partition(":")
        try:
            out[name.strip()] = (float(val), float(test))
        except ValueError:
            raise ValueError(f"cohort split {spec!r}: expected NAME=VAL_FRAC:TEST_FRAC") from None
        if not (sep and sep2):
            raise ValueError(f"cohort split {spec!r}: expected NAME=VAL_FRAC:TEST_FRAC")
    return out


def repeat_rows(df: pd.DataFrame, specs: Sequence[str]) -> pd.DataFrame:
    """Training films of a cohort or source N times over (``["reproduce_chexnet=3"]``), so the few films
    that show most findings weigh more than the many that show one; ``[]`` keeps ``df`` as it is."""
    times = np.ones(len(df), int)
    for spec in specs:
        name, sep, n = spec.partition("=")
        if not sep or not n.strip().isdigit() or int(n) < 1:
            raise ValueError(f"repeat {spec!r}: expected COHORT_OR_SOURCE=N with N >= 1")
        hit = ((df["cohort"] == name.strip()) | (df["source"] == name.strip())).to_numpy()
        if not hit.any():
            raise ValueError(f"repeat {spec!r}: no training film is of {name.strip()!r}")
        times[hit] *= int(n)
    return df.loc[df.index.repeat(times)] if specs else df


def cohort_patient_split(df: pd.DataFrame, val_frac: float = 0.15, test_frac: float = 0.15, seed: int = 0,
                         cohort_fracs: dict[str, tuple[float, float]] | None = None) -> pd.Series:
    """:func:`patient_split` with larger held-out shares for chosen cohorts.

    A small, label-balanced sample (NIH's 319 ``reproduce_chexnet`` films) is the only fair test
    of the 14 findings, so it gets its own (val, test) fractions: every patient with an image in
    such a cohort is split within that cohort's group (all of the patient's images follow), the
    remaining patients with the default fractions. Patients never cross splits.
    """
    split = pd.Series("train", index=df.index, name="split", dtype=object)
    rest = np.ones(len(df), dtype=bool)
    for cohort, (v, t) in (cohort_fracs or {}).items():
        patients = set(df.loc[(df["cohort"] == cohort).to_numpy() & rest, "patient"])
        rows = df["patient"].isin(patients).to_numpy() & rest
        if rows.any():
            split[rows] = patient_split(df[rows], v, t, seed=seed).to_numpy()
            rest &= ~rows
    if rest.any():
        split[rest] = patient_split(df[rest], val_frac, test_frac, seed=seed).to_numpy()
    return split


def read_name_list(path_or_names: str | os.PathLike | Iterable[str]) -> list[str]:
    """Image file names from a split list (first token per line: NIH and CheXNet formats)."""
    if isinstance(path_or_names, (str, os.PathLike)):
        with open(path_or_names) as f:
            return [line.split()[0] for line in f if line.strip()]
    return [os.path.basename(str(n)) for n in path_or_names]


def split_from_lists(df: pd.DataFrame, train_list, val_list=None, test_list=None,
                     val_frac: float = 0.1, seed: int = 0) -> pd.Series:
    """Splits by official lists (files or name iterables), matching on the image file name.

    Images in no list are "unused". Without ``val_list`` (NIH's ``train_val_list.txt``), val is
    carved out of the train rows by patient (``val_frac`` of them, seeded).

    Raises:
        ValueError: an image name appears in two lists.
    """
    where: dict[str, str] = {}
    for split, lst in (("train", train_list), ("val", val_list), ("test", test_list)):
        if lst is None:
            continue
        for name in read_name_list(lst):
            if where.setdefault(name, split) != split:
                raise ValueError(f"{name} is in both the {where[name]} and the {split} list")
    names = df["path"].map(os.path.basename)
    split = pd.Series([where.get(n, "unused") for n in names], index=df.index, name="split", dtype=object)
    if val_list is None and val_frac > 0:
        train = df[split == "train"]
        if len(train):
            carved = patient_split(train, val_frac=val_frac, test_frac=0.0, seed=seed)
            split.loc[carved.index] = carved
    return split


def assert_patient_disjoint(df: pd.DataFrame, split_col: str | pd.Series = "split") -> None:
    """Raises ValueError when a patient has images in two splits ("unused" rows are ignored)."""
    split = df[split_col] if isinstance(split_col, str) else split_col
    used = split != "unused"
    per = pd.DataFrame({"patient": df["patient"][used], "split": split[used]}).groupby("patient")["split"].nunique()
    crossing = per[per > 1]
    if len(crossing):
        pid = crossing.index[0]
        where = sorted(set(split[df["patient"] == pid]) - {"unused"})
        raise ValueError(f"{len(crossing)} patient(s) cross splits, e.g. {pid!r} is in {where}")


def pos_weights(df: pd.DataFrame, labels: Sequence[str], max_weight: float = 10.0) -> torch.Tensor:
    """Per-label neg/pos ratio over known entries, clipped to [1/max_weight, max_weight] (1 if undefined)."""
    out = []
    for label in labels:
        col = df[label]
        pos, neg = float((col == 1.0).sum()), float((col == 0.0).sum())
        w = neg / pos if pos > 0 and neg > 0 else 1.0
        out.append(min(max(w, 1.0 / max_weight), max_weight))
    return torch.tensor(out, dtype=torch.float32)


def masked_bce_loss(logits: torch.Tensor, targets: torch.Tensor,
                    pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """BCE-with-logits over the known (non-NaN) targets only, averaged over those entries.

    Unknown entries contribute neither loss nor gradient; with no known entry the loss is 0.
    """
    known = ~torch.isnan(targets)
    t = torch.where(known, targets, torch.zeros_like(targets))
    if pos_weight is not None:
        pos_weight = pos_weight.to(device=logits.device, dtype=logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, t.to(logits.dtype), pos_weight=pos_weight, reduction="none")
    loss = torch.where(known, loss, torch.zeros_like(loss))
    return loss.sum() / known.sum().clamp(min=1)
