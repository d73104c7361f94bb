"""Evaluation figures: ROC curves, per-label confusion matrices and training curves (PNG).

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas directly, never pyplot, so
there is no global figure registry to leak into, no GUI backend and no shared state between
threads. Targets follow ``chestxray.metrics``: 1/0/NaN, NaN ignored per label.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from chestxray.metrics import auroc, roc_curve

DPI = 120


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, format="png", bbox_inches="tight")
    fig.clear()
    return path


def plot_roc_curves(Y: np.ndarray, P: np.ndarray, labels: Sequence[str], path: str | Path,
                    title: str | None = None) -> Path:
    """One ROC curve per label (AUROC in the legend) plus the chance diagonal, saved as PNG.

    Labels without both classes are not drawn; the legend lists them as undefined.
    """
    Y, P = np.asarray(Y, dtype=np.float64), np.asarray(P, dtype=np.float64)
    fig = Figure(figsize=(8, 7))
    ax = fig.add_subplot()
    for k, name in enumerate(labels):
        fpr, tpr, _ = roc_curve(Y[:, k], P[:, k])
        if fpr.size == 0:
            ax.plot([], [], " ", label=f"{name}: undefined (one class only)")
            continue
        style = ("-", "--", ":", "-.")[(k // 10) % 4]  # 10 colours, then a new line style
        ax.plot(fpr, tpr, color=f"C{k % 10}", ls=style, lw=1.4,
                label=f"{name}: {auroc(Y[:, k], P[:, k]):.3f}")
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate (1 - specificity)",
           ylabel="True positive rate (sensitivity)", title=title or "ROC curves", aspect="equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, title="AUROC",
              frameon=False)
    return _save(fig, path)


def plot_confusion_matrices(Y: np.ndarray, P: np.ndarray, labels: Sequence[str],
                            thresholds: Mapping[str, float] | None, path: str | Path) -> Path:
    """Grid of per-label 2x2 confusion matrices at each label's threshold, counts annotated.

    Rows are the truth (negative, positive), columns the call ``p >= threshold``; cells show the
    count and the share of their row (colour). A label missing
    from ``thresholds`` uses 0.5 and its title says "default".
    """
    Y, P = np.asarray(Y, dtype=np.float64), np.asarray(P, dtype=np.float64)
    thresholds = thresholds or {}
    k_all = max(len(labels), 1)
    ncols = min(5, k_all)
    nrows = math.ceil(k_all / ncols)
    fig = Figure(figsize=(2.6 * ncols, 2.6 * nrows + 0.3), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for k, ax in enumerate(axes):
        if k >= len(labels):
            ax.set_axis_off()
            continue
        name = labels[k]
        t = thresholds.get(name)
        default = t is None or not math.isfinite(float(t))
        t = 0.5 if default else float(t)
        keep = ~np.isnan(Y[:, k])
        pos, pred = Y[keep, k] >= 0.5, P[keep, k] >= t
        cm = np.array([[np.sum(~pos & ~pred), np.sum(~pos & pred)],
                       [np.sum(pos & ~pred), np.sum(pos & pred)]])
        rows = cm.sum(axis=1, keepdims=True)
        frac = cm / np.maximum(rows, 1)  # colour by row share, so the rare positive row shows
        ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(cm):
            share = f"\n{frac[i, j]:.0%}" if rows[i, 0] else ""
            ax.text(j, i, f"{int(v)}{share}", ha="center", va="center", fontsize=10,
                    color="white" if frac[i, j] > 0.5 else "black")
        ax.set_xticks([0, 1], ["pred −", "pred +"], fontsize=8)
        ax.set_yticks([0, 1], ["true −", "true +"], fontsize=8)
        note = " (default)" if default else ""
        ax.set_title(f"{name}\nthreshold {t:.3f}{note}", fontsize=9)
    return _save(fig, path)


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) for rows carrying a finite ``key``; a missing epoch is the row number."""
    xs, ys = [], []
    for i, row in enumerate(rows):
        v = row.get(key)
        if v is None or not math.isfinite(float(v)):
            continue
        e = row.get("epoch")
        xs.append(float(e) if e is not None else float(i + 1))
        ys.append(float(v))
    return xs, ys


def plot_training_curves(log_rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Loss (train/val) and validation mean AUROC per epoch, from rows with keys ``epoch``,
    ``train_loss``, ``val_loss``, ``val_mean_auroc`` (any may be missing or None)."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_loss, ax_auc = fig.subplots(1, 2)
    for key, style in (("train_loss", "-o"), ("val_loss", "-s")):
        xs, ys = _series(log_rows, key)
        if xs:
            ax_loss.plot(xs, ys, style, ms=3, label=key.replace("_", " "))
    xs, ys = _series(log_rows, "val_mean_auroc")
    if xs:
        best = int(np.argmax(ys))
        ax_auc.plot(xs, ys, "-o", ms=3, color="C2", label="val mean AUROC")
        ax_auc.plot([xs[best]], [ys[best]], "*", ms=12, color="C3",
                    label=f"best {ys[best]:.3f} (epoch {xs[best]:g})")
    for ax, ylabel in ((ax_loss, "loss"), (ax_auc, "mean AUROC")):
        ax.set(xlabel="epoch", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax_loss.set_title("Loss")
    ax_auc.set_title("Validation mean AUROC")
    return _save(fig, path)
