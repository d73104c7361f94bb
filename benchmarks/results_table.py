#!/usr/bin/env python
"""The README's results table: every shipped model evaluated afresh on its own held-out test split.

    python -m benchmarks.results_table [--threads 2] [--runs 20] [--n-boot 1000]

Each model is evaluated with ``chestxray.evaluate`` on the images its ``splits.csv`` puts in the
test split (exactly what ``python -m chestxray evaluate --split test`` does). Columns: NIH mean
AUROC on the label-balanced films (the headline, 95% CI) and on all 384-px NIH test films (mixed),
pediatric pneumonia AUROC (Kermany), COVID-19 set pneumonia AUROC, findings flagged per normal NIH
film, the pointing game on held-out boxed films, the validation mean AUROC that selected the
epoch (and on which films), what initialised and taught the model, weights size, and the median
CPU latency of one predict + all-label Grad-CAM (``Predictor.analyze`` on a decoded 1024-px film).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from chestxray.checkpoint import list_shipped, load_checkpoint, weights_dir
from chestxray.ckpt_config import CkptMeta, Training
from chestxray.evaluate import evaluate
from chestxray.imaging import read_image
from chestxray.layout import default_data_root
from chestxray.localization import held_out_pointing_game
from chestxray.predictor import Predictor
from chestxray.sources import HEADLINE_GROUP, MIXED_GROUP



def _ci(m: dict) -> str:
    ci = m.get("mean_auroc_ci") or [None, None]
    if m.get("mean_auroc") is None:
        return "n/a"
    est = f"{m['mean_auroc']:.3f}"
    return f"{est} ({ci[0]:.3f}-{ci[1]:.3f}, {m['n_images']})" if ci[0] is not None else est


def _label_auc(m: dict, label: str) -> str:
    a = m.get("labels", {}).get(label, {}).get("auroc")
    return "n/a" if a is None else f"{a:.3f}"


def _latency_ms(pred: Predictor, xray, runs: int) -> float:
    for _ in range(3):
        pred.analyze(xray)
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        pred.analyze(xray)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--data-root", default=default_data_root())
    ap.add_argument("--image", default=str(Path(default_data_root()) / "nih/full_res/00000100_000.png"))
    ap.add_argument("--models", nargs="*", help="shipped names (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    xray = read_image(args.image)
    print("| model | NIH balanced films: mean AUROC (95% CI, films) | NIH all 384-px test films (mixed) | "
          "pediatric pneumonia AUROC (Kermany) | COVID-19 set pneumonia AUROC | findings flagged per normal "
          "NIH film | CAM max in box (chance) | val mean AUROC (films) | initialised / taught by | weights MB | "
          "CPU predict + CAMs ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models or list_shipped():
        folder = weights_dir() / name
        sources = sorted(pd.read_csv(folder / "splits.csv")["source"].unique())
        with tempfile.TemporaryDirectory() as tmp:
            m = evaluate(name, tmp, sources=sources, data_root=args.data_root, split="test", n_boot=args.n_boot,
                         progress=False)
        g = m["by_group"]
        train = CkptMeta.read(folder).training or Training()
        pred = Predictor(load_checkpoint(name), device="cpu")
        loc = held_out_pointing_game(pred, args.data_root)
        flags = g.get(MIXED_GROUP, {}).get("flags_per_normal_film")
        val_on = train.val_sources if isinstance(train.val_sources, str) else ", ".join(train.val_sources or ["all"])
        init = (train.initialised_from or ("ImageNet" if train.pretrained else "random")).split(",")[0]
        taught = "teacher" if (train.taught_by or "").startswith("teacher") else "labels"
        size = (folder / "model.safetensors").stat().st_size / 2**20
        print(f"| {name} | {_ci(g.get(HEADLINE_GROUP, {}))} | {_ci(g.get(MIXED_GROUP, {}))} | "
              f"{_label_auc(g.get('kermany', {}), 'Pneumonia')} | {_label_auc(g.get('covid', {}), 'Pneumonia')} | "
              f"{'n/a' if flags is None else f'{flags:.1f}'} | "
              f"{loc['hit_rate']:.0%} of {loc['n_pairs']} ({loc['chance']:.0%}) | "
              f"{train.val_mean_auroc} ({val_on}) | {init} / {taught} | {size:.1f} | "
              f"{_latency_ms(pred, xray, args.runs):.0f} |", flush=True)
    print("| *CheXNet, published (for scale)* | *0.841 (14 findings; DenseNet-121, ImageNet-pretrained, 224 px, "
          "~98k training images)* | | | | | | | | *28 (fp32)* | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
