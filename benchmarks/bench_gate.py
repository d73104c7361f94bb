"""Input gate: false alarms on held-out real chest X-rays and catches on images that are not.

    .venv/bin/python -m benchmarks.bench_gate --model runs/resnet18/best [--gate path/gate.safetensors]

Chest X-rays (false-alarm rate, per source): the *test* split of the model's run manifest (or of a
patient split when the folder has none; TBX11K gets its own split), never used to fit or calibrate
the gate, plus the real chest films in ``misc/`` and ``dicom/`` as a user would upload them.

Non-chest images (catch rate): the real files in ``ood/`` and ``dicom/`` (photos, CT, MR,
ultrasound, a tibia radiograph) as uploaded (DICOM metadata and colour rules apply) and as gray
pixels only (as if exported to a gray PNG: appearance alone); with ``--extra-negatives`` any
other folders of non-chest images; with ``--synthetic`` altered chest films (inverted, rotated
90 degrees, upside down, a small patch), which are hard cases reported separately.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from chestxray.gate import GATE_FILE, Gate
from chestxray.gate_fit import (EXTRA_CHEST_FILES, NON_CHEST_FILES, chest_manifest, evaluate,
                                format_rows, sample_rows)
from chestxray.imaging import SUPPORTED_EXTENSIONS, read_image
from chestxray.layout import default_data_root
from chestxray.predictor import Predictor


def synthetic_negatives(paths: list[str], seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Altered chest films: not what the model was trained to read."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {"synthetic: inverted film": [], "synthetic: rotated 90 degrees": [],
                                        "synthetic: upside down": [], "synthetic: 1/3-size patch": []}
    for p in paths:
        x = read_image(p).pixels
        h, w = x.shape
        s = min(h, w) // 3
        i, j = rng.integers(0, h - s), rng.integers(0, w - s)
        for key, arr in zip(out, (1.0 - x, np.rot90(x), x[::-1], x[i:i + s, j:j + s])):
            out[key].append(np.ascontiguousarray(arr))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint folder")
    ap.add_argument("--gate", default=None, help=f"gate file (default: <model>/{GATE_FILE})")
    ap.add_argument("--data-root", default=default_data_root())
    ap.add_argument("--manifest", default=None, help="the training run's manifest.csv (default: beside the model)")
    ap.add_argument("--max-per-source", type=int, default=300, help="test-split chest X-rays per source")
    ap.add_argument("--extra-negatives", nargs="*", default=[], help="folders of other non-chest images")
    ap.add_argument("--synthetic", type=int, default=0, help="chest films per source to alter (0: none)")
    ap.add_argument("--files", action="store_true", help="list every non-chest file's verdict")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    root = Path(args.data_root)
    predictor = Predictor.load(args.model, device="cpu")
    gate_path = Path(args.gate) if args.gate else Path(args.model) / GATE_FILE
    gate = Gate.load(gate_path)
    if not gate.matches(predictor):
        print(f"warning: {gate_path} was fitted for other weights than {args.model}")
    print(f"model {predictor.name} ({predictor.arch}); gate {gate_path}: threshold {gate.threshold:.3f}, "
          f"components {list(gate.models)}, fitted on {gate.meta.get('n_train')} chest X-rays "
          f"(+{gate.meta.get('n_train_augmented', 0)} augmented) of {gate.meta.get('sources')}")

    df = chest_manifest(args.model, root, manifest=args.manifest)
    print(f"chest split: {df['from'].iloc[0]}")
    test = df[df["split"] == "test"]
    groups = {f"test chest {s}": list(sample_rows(g, args.max_per_source, 0)["path"])
              for s, g in test.groupby("source")}
    groups["extra chest files (misc, dicom)"] = [str(root / f) for f in EXTRA_CHEST_FILES if (root / f).is_file()]
    chest = set(groups)
    non_chest = [str(root / f) for f in NON_CHEST_FILES if (root / f).is_file()]
    groups["non-chest files, as uploaded"] = non_chest
    groups["non-chest files, gray pixels only"] = non_chest
    pixels_only = {"non-chest files, gray pixels only"}
    for folder in args.extra_negatives:
        files = sorted(str(p) for p in Path(folder).rglob("*") if p.suffix.lower() in SUPPORTED_EXTENSIONS)
        groups[f"extra non-chest: {Path(folder).name}"] = files
    if args.synthetic:
        picks = [p for s, g in test.groupby("source") for p in sample_rows(g, args.synthetic, 1)["path"]]
        groups.update(synthetic_negatives(picks))

    t0 = time.perf_counter()
    rows = evaluate(gate, predictor, groups, chest, pixels_only)
    n = sum(r["n"] for r in rows)
    print(format_rows(rows))
    fa = [r for r in rows if r["kind"] == "chest"]
    total_fa = sum(r["flagged"] for r in fa) / max(1, sum(r["n"] for r in fa))
    print(f"\nall held-out chest X-rays: false-alarm rate {total_fa:.1%} "
          f"({sum(r['flagged'] for r in fa)}/{sum(r['n'] for r in fa)}); "
          f"{(time.perf_counter() - t0) / max(n, 1) * 1000:.0f} ms per image (read + embed + gate, 1 thread)")
    if args.files:
        print(format_rows([r for r in rows if r["kind"] == "non-chest" and not r["group"].startswith("synthetic")
                           or r["group"].startswith("extra chest")], show_files=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
