"""Input-pipeline throughput: decoding files every epoch vs the uint8 memmap cache.

    .venv/bin/python benchmarks/bench_pipeline.py --n 300 --size 128

(a) RawXrayDataset: read_image + resize_gray per item, through a DataLoader, every epoch.
(b) CachedImages + XrayDataset: one-time build (timed separately), then uint8 reads.
Both apply batch_augment to every batch, so the only difference is decoding vs the cache.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from chestxray.data import (RawXrayDataset, XrayDataset, batch_augment, build_cache,  # noqa: E402
                            load_sources)
from chestxray.labels import get_label_set  # noqa: E402


def run_epochs(loader, epochs: int, device: torch.device) -> tuple[float, int]:
    """Seconds and images for ``epochs`` passes, each batch moved to ``device`` and augmented."""
    g = torch.Generator().manual_seed(0)
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for x, y in loader:
            out = batch_augment(x.to(device, non_blocking=True), g)
            n += out.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, n


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--sources", default="nih384", help="comma list of shared-data sources")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--n", type=int, default=300, help="images")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for the raw path / cache build")
    ap.add_argument("--epochs", type=int, default=3, help="epochs over the cache (raw: 1)")
    ap.add_argument("--cache-dir", default=None, help="default: a temporary folder (cold build)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    device = torch.device(args.device)

    labels = get_label_set("nih14")
    df = load_sources(args.sources.split(","), args.data_root, labels).head(args.n)
    dl = dict(batch_size=args.batch, shuffle=True, drop_last=False)

    raw = RawXrayDataset(df, labels, args.size)
    loader = torch.utils.data.DataLoader(raw, num_workers=args.workers, persistent_workers=False, **dl)
    raw_s, raw_n = run_epochs(loader, 1, device)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cache = build_cache(df, args.size, args.cache_dir or tmp, workers=args.workers, progress=False)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        build_cache(df, args.size, args.cache_dir or tmp, progress=False)
        reuse_s = time.perf_counter() - t0
        ds = XrayDataset(cache, df, labels)
        cached_s, cached_n = run_epochs(torch.utils.data.DataLoader(ds, num_workers=0, **dl), args.epochs, device)

    print(f"\n{len(df)} images ({args.sources}), {args.size}px, batch {args.batch}, device {device}, "
          f"{args.workers} workers, torch threads {torch.get_num_threads()}\n")
    print("| pipeline | images | seconds | images/s |")
    print("|---|---:|---:|---:|")
    print(f"| raw: decode + resize every epoch ({args.workers} loader workers) + batch_augment "
          f"| {raw_n} | {raw_s:.2f} | {raw_n / raw_s:,.0f} |")
    print(f"| cache build, once ({args.workers} threads){' [reused]' if not cache.built else ''} "
          f"| {len(cache)} | {build_s:.2f} | {len(cache) / build_s:,.0f} |")
    print(f"| cache reuse check (key only) | {len(cache)} | {reuse_s:.3f} | - |")
    print(f"| cached uint8 memmap + batch_augment ({args.epochs} epochs, 0 loader workers) "
          f"| {cached_n} | {cached_s:.2f} | {cached_n / cached_s:,.0f} |")
    print(f"\ncached / raw speed-up per epoch: {(cached_n / cached_s) / (raw_n / raw_s):.1f}x")


if __name__ == "__main__":
    main()
