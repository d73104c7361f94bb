"""Evaluation figures: ROC curves, per-label confusion matrices, reliability diagrams and training curves (PNG).

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
from matplotlib.ticker import MaxNLocator, NullFormatter

from chestxray.calibration import N_BINS, brier_score, expected_calibration_error, reliability_bins
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


def _reliability_panel(ax, y: np.ndarray, p: np.ndarray, title: str, n_bins: int) -> None:
    """One reliability diagram: observed frequency against mean probability per bin, counts behind."""
    count, mean_p, frac = reliability_bins(y, p, n_bins)
    edges = np.linspace(0, 1, n_bins + 1)
    hist = ax.twinx()  # image counts per bin, log scale: most images sit in the lowest bins
    hist.bar(edges[:-1], np.where(count > 0, count, np.nan), width=1 / n_bins, align="edge", color="0.85",
             edgecolor="0.7", lw=0.5, zorder=0)
    hist.set_yscale("log")
    top = max(10.0, count.max())
    hist.set_ylim(0.8, top ** 2.5)  # log scale: the bars stay in the lower ~40% of the panel
    hist.set_yticks([10.0 ** e for e in range(int(np.log10(top)) + 1)])
    hist.yaxis.set_minor_formatter(NullFormatter())
    hist.tick_params(labelsize=7, colors="0.45")
    hist.set_ylabel("images per bin", fontsize=7, color="0.45")
    ax.set_zorder(hist.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.plot([0, 1], [0, 1], ls="--", color="0.4", lw=1, label="perfectly calibrated")
    full = count > 0
    few = full & (count < 10)  # hollow markers: too few images to trust the bin
    ax.plot(mean_p[full], frac[full], "-", color="C0", lw=1.5)
    ax.plot(mean_p[full & ~few], frac[full & ~few], "o", color="C0", ms=5, label="bins with >= 10 images")
    ax.plot(mean_p[few], frac[few], "o", mfc="white", mec="C0", ms=5, label="bins with < 10 images")
    ece, brier = expected_calibration_error(y, p, n_bins), brier_score(y, p)
    n_pos = int(np.nansum(np.asarray(y) >= 0.5))
    ax.set_title(f"{title}\n{n_pos} positives of {int(count.sum())} · ECE {ece:.3f} · Brier {brier:.3f}",
                 fontsize=9)
    ax.set(xlim=(0, 1), ylim=(0, 1))
    ax.set_box_aspect(1)  # square; aspect="equal" fights the twin axis
    hist.set_box_aspect(1)
    ax.set_xlabel("mean predicted probability", fontsize=8)
    ax.set_ylabel("observed frequency", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def plot_reliability(Y: np.ndarray, P: np.ndarray, labels: Sequence[str], path: str | Path, n_labels: int = 5,
                     n_bins: int = N_BINS, title: str | None = None) -> Path:
    """Reliability diagrams: all labels pooled, then the ``n_labels`` labels with the most positives.

    Each panel plots, per equal-width probability bin, the observed positive fraction against the
    mean predicted probability (on the diagonal = calibrated; below it = overconfident), with the
    image count per bin (log scale) behind and the panel's ECE and Brier score in its title.
    """
    Y, P = np.asarray(Y, dtype=np.float64), np.asarray(P, dtype=np.float64)
    npos = [int(np.nansum(Y[:, k] >= 0.5)) for k in range(len(labels))]
    chosen = [k for k in sorted(range(len(labels)), key=lambda k: -npos[k]) if npos[k] > 0][:n_labels]
    panels = [("All labels pooled", Y.ravel(), P.ravel())]
    panels += [(labels[k], Y[:, k], P[:, k]) for k in chosen]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 4.0 * nrows + 0.4), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (name, y, p) in zip(axes, panels):
        _reliability_panel(ax, y, p, name, n_bins)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    axes[0].legend(loc="upper left", fontsize=7, frameon=False)
    fig.suptitle(title or f"Reliability ({n_bins} equal-width bins)", fontsize=11)
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
