#!/usr/bin/env python
"""CPU cost per film of the ensemble against the default single model and each member.

One decoded 1024-px film, ``analyze`` (every label's probability and Grad-CAM, the input gate), with 1 and 2
torch threads; the models interleaved run by run, so a busy stretch of the machine hits all of them alike.
Prints a Markdown table: median and p95 ms, and each one's ratio to the default model in the same run.

    python -m benchmarks.bench_ensemble [--runs 15] [--threads 1 2] [--ensemble ensemble_nih14]
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from chestxray.ensemble_release import TIMING_FILM, cpu_cost
from chestxray.layout import default_data_root
from chestxray.registry import ModelRegistry


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--ensemble", default="ensemble_nih14", help="the ensemble's name in models.yaml")
    ap.add_argument("--image", default=str(Path(default_data_root()) / TIMING_FILM))
    args = ap.parse_args()
    registry = ModelRegistry.from_yaml()
    ensemble = registry.get(args.ensemble)  # its members are the registry's own models
    default = registry.default() or ensemble.ckpt.spec.members[0]
    models = {default: registry.get(default), args.ensemble: ensemble,
              **{m.name: m for m in ensemble.members if m.name != default}}
    result = cpu_cost(models, args.image, threads=args.threads, runs=args.runs)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{result['film']} {result['size'][1]}x{result['size'][0]}, {args.runs} runs, load average {load:.1f} "
          f"(at the end), {os.cpu_count()} CPUs\n")
    print("| model | torch threads | analyze ms (median / p95) | vs the default model |")
    print("|---|---|---|---|")
    for n, row in result["threads"].items():
        base = row[default]["median_ms"]
        for name, t in row.items():
            print(f"| {name} | {n} | {t['median_ms']:.0f} / {t['p95_ms']:.0f} | {t['median_ms'] / base:.2f}x |")
        members = sum(row[m.name]["median_ms"] for m in ensemble.members if m.name in row)
        print(f"| *sum of the members alone* | {n} | {members:.0f} | {members / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
