#!/usr/bin/env python
"""The README's results table, from the shipped folders' metrics.json and a CPU latency measurement.

    python benchmarks/results_table.py [--threads 2] [--runs 20]

Columns: NIH test mean AUROC with 95% CI (384-px images of held-out patients, and the 64-px ones),
pediatric pneumonia AUROC (Kermany test split), COVID-19 set pneumonia AUROC, validation mean AUROC
(what chose the default model), weights size, and the median CPU latency of one predict +
all-label Grad-CAM (``Predictor.analyze`` on a decoded 1024-px film).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from chestxray.checkpoint import list_shipped, load_checkpoint, weights_dir  # noqa: E402
from chestxray.imaging import read_image  # noqa: E402
from chestxray.predictor import Predictor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _ci(m: dict) -> str:
    ci = m.get("mean_auroc_ci") or [None, None]
    if m.get("mean_auroc") is None:
        return "n/a"
    return f"{m['mean_auroc']:.3f} ({ci[0]:.3f}-{ci[1]:.3f})" if ci[0] is not None else f"{m['mean_auroc']:.3f}"


def _label_auc(m: dict, label: str) -> str:
    a = m.get("labels", {}).get(label, {}).get("auroc")
    return "n/a" if a is None else f"{a:.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--image", default=str(REPO.parent / "shared/data/nih/full_res/00000100_000.png"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    xray = read_image(args.image)
    print("| model | NIH test mean AUROC, 384 px (95% CI) | NIH test, 64 px | pediatric pneumonia AUROC | "
          "COVID-19 set pneumonia AUROC | val mean AUROC (NIH) | weights MB | CPU predict + CAMs ms |")
    print("|---|---|---|---|---|---|---|---|")
    for name in list_shipped():
        folder = weights_dir() / name
        m = json.loads((folder / "metrics.json").read_text())
        g = m.get("by_group", {})
        cfg = json.loads((folder / "config.json").read_text())
        val = cfg.get("chestxray", {}).get("training", {}).get("val_mean_auroc")
        pred = Predictor(load_checkpoint(name), device="cpu")
        for _ in range(3):
            pred.analyze(xray)
        ts = []
        for _ in range(args.runs):
            t = time.perf_counter()
            pred.analyze(xray)
            ts.append(time.perf_counter() - t)
        size = (folder / "model.safetensors").stat().st_size / 2**20
        print(f"| {name} | {_ci(g.get('nih384', m))} | {_ci(g.get('nih64', {}))} | "
              f"{_label_auc(g.get('kermany', {}), 'Pneumonia')} | {_label_auc(g.get('covid', {}), 'Pneumonia')} | "
              f"{val} | {size:.1f} | {statistics.median(ts) * 1e3:.0f} |", flush=True)
    print("| CheXNet (published, for scale) | 0.841 (14 findings, official-ish random patient split, 98k images, "
          "DenseNet-121 at 224 px, ImageNet-pretrained) | | | | | 28 (fp32) | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
