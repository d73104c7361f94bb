#!/usr/bin/env python
"""CPU inference cost per architecture: one forward vs. predict + all-label Grad-CAM (one forward).

The ratio column compares, on the same preprocessed tensor, the predictor's probabilities + every
label's map (+ the pooled embedding the input gate reads) with one plain forward pass of the model;
the "analyze" column is the whole ``Predictor.analyze`` on the decoded film (resize to the input,
display image, input gate included).

Prints a Markdown table: median and p95 over many runs, at each model's input size, with
``--threads`` torch threads (2 = the free Hugging Face Spaces tier). Uses the shipped weights when
present (their input size), else random weights at ``--size``. Also times pytorch-grad-cam's
GradCAM for ONE label, for comparison with the all-label path.

    python -m benchmarks.bench_inference [--threads 2] [--runs 30]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from chestxray.cam import method_cam
from chestxray.checkpoint import Checkpoint, list_shipped, load_checkpoint, weights_dir
from chestxray.labels import get_label_set
from chestxray.layout import default_data_root
from chestxray.models import create_model
from chestxray.predictor import Predictor
from chestxray.recipes import shipped_recipes
from chestxray.transforms import Preprocess


def timed(fn, runs: int, warmup: int = 3) -> tuple[float, float]:
    """(median, p95) seconds of ``fn()`` over ``runs`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), float(np.percentile(ts, 95))


def predictor_for(arch: str, size: int) -> tuple[Predictor, str]:
    """The shipped checkpoint of this arch, or random weights (labelled as such)."""
    if arch in list_shipped():
        return Predictor(load_checkpoint(arch), device="cpu"), "shipped"
    labels = get_label_set("nih14")
    model = create_model(arch, len(labels), img_size=size).eval()
    ck = Checkpoint(model=model, arch=arch, labels=labels, preprocess=Preprocess((1, size, size)), thresholds={},
                    config={}, path=weights_dir() / arch)
    return Predictor(ck, device="cpu"), "random"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--size", type=int, default=128, help="input side for archs without shipped weights")
    ap.add_argument("--image", default=str(Path(default_data_root()) / "nih/full_res/00000100_000.png"))
    ap.add_argument("--archs", nargs="+", default=list(shipped_recipes()))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from chestxray.imaging import read_image

    xray = read_image(args.image)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.runs} runs, image {Path(args.image).name} "
          f"{xray.pixels.shape[1]}x{xray.pixels.shape[0]}\n")
    print("| arch | weights | input | forward ms (median / p95) | probs + all-label CAMs, same tensor ms | "
          "ratio | analyze (decoded film) ms | pytorch-grad-cam, 1 label ms |")
    print("|---|---|---|---|---|---|---|---|")
    for arch in args.archs:
        pred, kind = predictor_for(arch, args.size)
        x = pred.preprocess(xray.pixels)

        def forward():
            with torch.inference_mode():
                pred.model(x)

        def probs_and_cams():
            return pred.infer(x)  # what analyze() runs on the preprocessed tensor

        # interleaved, so that a slower stretch of the machine hits both alike
        f_ts, c_ts = [], []
        for _ in range(3):
            forward(), probs_and_cams()
        for _ in range(args.runs):
            f_ts.append(timed(forward, 1, 0)[0])
            c_ts.append(timed(probs_and_cams, 1, 0)[0])
        f_med, f_p95 = statistics.median(f_ts), float(np.percentile(f_ts, 95))
        c_med, c_p95 = statistics.median(c_ts), float(np.percentile(c_ts, 95))
        a_med, a_p95 = timed(lambda: pred.analyze(xray), args.runs)
        g_med, g_p95 = timed(lambda: method_cam(pred.model, arch, x, 0, "gradcam"), max(5, args.runs // 3))
        print(f"| {arch} | {kind} | {x.shape[-1]} px | {f_med * 1e3:.1f} / {f_p95 * 1e3:.1f} | "
              f"{c_med * 1e3:.1f} / {c_p95 * 1e3:.1f} | {c_med / f_med:.2f}x | "
              f"{a_med * 1e3:.1f} / {a_p95 * 1e3:.1f} | {g_med * 1e3:.1f} / {g_p95 * 1e3:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
