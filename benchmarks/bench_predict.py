#!/usr/bin/env python
"""`chestxray predict` throughput at archive scale: the old one-film-at-a-time loop vs decoding in worker
processes with the model batched (chestxray/batch.py), in one run on the same films.

    .venv/bin/python -m benchmarks.bench_predict --n 300                    # 2 CPU cores
    .venv/bin/python -m benchmarks.bench_predict --n 1000 --device cuda --workers 7 15 --batch-sizes 32 128 \
        --lanes 1 2 --old-threads 16

The films are 1024-px PNGs: the shared data holds only 10 real 1024-px NIH films, so the 384-px NIH films are
upscaled to 1024 x 1024 (bicubic) into a temporary folder (or ``--films DIR``: any folder, e.g. an archive).

The old path is the loop ``chestxray predict`` ran before batching: ``read_image`` then ``Predictor.analyze``
per film (decode, preprocessing, forward, CAMs, gate and display image on one thread of control), with each of
``--old-threads`` torch threads (default 1 and every core: it ran with every core unless OMP_NUM_THREADS said
otherwise, and a busy machine slows a forward spread over the cores more than one on a single core); the
ratios are against the faster. Each new configuration runs ``predict_films`` as the command runs it
(``--workers``, ``--batch-size``, ``--threads`` lanes) and forms the rows' flags and warnings as the CSV does.

The films are cut into ``--rounds`` chunks and every configuration runs on each chunk in turn (the order
rotating), so a machine whose load changes during the run slows them all alike; each configuration pays its
worker start-up once a round.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from chestxray.batch import predict_films, usable_cores
from chestxray.imaging import read_image
from chestxray.layout import default_data_root
from chestxray.predictor import Predictor


def make_films(n: int, folder: Path, side: int = 1024) -> list[Path]:
    """``n`` 1024-px PNGs upscaled from the shared 384-px NIH films (cycled when ``n`` exceeds them)."""
    sources = sorted((Path(default_data_root()) / "nih/images_384").glob("*.png"))
    out = []
    for i, src in zip(range(n), itertools.cycle(sources)):
        dest = folder / f"{i:05d}_{src.name}"
        if not dest.is_file():
            Image.open(src).convert("L").resize((side, side), Image.BICUBIC).save(dest)
        out.append(dest)
    return out


def sync(predictor: Predictor) -> None:
    if predictor.device.type == "cuda":
        torch.cuda.synchronize()


def one_by_one(predictor: Predictor, files: list[Path], threads: int) -> float:
    """Seconds of the old loop: decode, then ``analyze``, one film at a time."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    for f in files:
        a = predictor.analyze(read_image(f))
        a.positives(), a.warnings
    sync(predictor)
    return time.perf_counter() - t0


def batched(predictor: Predictor, files: list[Path], workers: int, batch_size: int, lanes: int = 1) -> float:
    """Seconds of ``predict_films`` as ``chestxray predict`` runs it (worker start-up included, as a run pays
    it): ``lanes`` batches at once, the cores shared out among them on a CPU."""
    threads = max(1, usable_cores() // lanes) if predictor.device.type == "cpu" else None
    t0 = time.perf_counter()
    for batch in predict_films(predictor, files, batch_size=batch_size, workers=workers, lanes=lanes,
                               threads=threads):
        for p in batch:
            p.analysis.positives(), p.analysis.warnings
    sync(predictor)
    return time.perf_counter() - t0


def main() -> int:
    cores = usable_cores()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="films (default 300)")
    ap.add_argument("--films", help="folder of films to use instead of the upscaled NIH set")
    ap.add_argument("--model", default="efficientnet_b0")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, max(0, cores - 1)])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16])
    ap.add_argument("--lanes", type=int, nargs="+",
                    help="batches in the model at once (`predict --threads`; default, as there: the cores on a CPU, 1 "
                         "on a GPU)")
    ap.add_argument("--old-threads", type=int, nargs="+", default=sorted({1, cores}),
                    help="torch threads of the old path (default: 1 and the cores)")
    ap.add_argument("--rounds", type=int, default=3, help="chunks the configurations take turns on (default 3)")
    args = ap.parse_args()
    args.lanes = args.lanes or [cores if args.device == "cpu" else 1]

    predictor = Predictor.load(args.model, device=args.device)
    configs = [(f"old: one film at a time, {t} torch threads", functools.partial(one_by_one, threads=t))
               for t in args.old_threads]
    configs += [(f"workers {w}, batch {bs}, {lanes} lanes", functools.partial(batched, workers=w, batch_size=bs,
                                                                              lanes=lanes))
                for lanes, w, bs in itertools.product(args.lanes, args.workers, args.batch_sizes)]
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        if args.films:
            files = sorted(p for p in Path(args.films).rglob("*") if p.is_file())[: args.n]
            what = f"{len(files)} films from {args.films}"
        else:
            files = make_films(args.n, Path(tmp))
            what = f"{len(files)} 1024-px PNGs upscaled from the shared 384-px NIH films (temporary folder)"
        device = torch.cuda.get_device_name() if predictor.device.type == "cuda" else f"cpu, {cores} usable cores"
        print(f"{args.model} on {device}; {what}; {args.rounds} rounds; torch {torch.__version__}; load average "
              f"{os.getloadavg()[0]:.1f} at the start\n", flush=True)
        batched(predictor, files[: min(8, len(files))], 0, 4)  # warm-up: first forward, allocator
        secs = {name: [] for name, _ in configs}
        for r, chunk in enumerate(np.array_split(np.array(files, dtype=object), args.rounds)):
            for name, run in configs[r % len(configs):] + configs[: r % len(configs)]:
                secs[name].append(run(predictor, list(chunk)))
    films_per_round = [len(c) for c in np.array_split(np.arange(len(files)), args.rounds)]
    fps = {name: len(files) / sum(s) for name, s in secs.items()}
    base = max(fps[name] for name, _ in configs[: len(args.old_threads)])
    print("| path | films/s (each round) | vs the faster old path |")
    print("|---|---|---|")
    for name, s in secs.items():
        rounds = ", ".join(f"{n / t:.1f}" for n, t in zip(films_per_round, s))
        print(f"| {name} | {fps[name]:.1f} ({rounds}) | {fps[name] / base:.2f}x |")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
