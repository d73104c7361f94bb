#!/usr/bin/env python
"""Start-up time: ``python app.py`` until its page answers, and ``python -m chestxray --help``.

    python -m benchmarks.bench_startup [--runs 3]

Each run is a fresh process; the clock stops at the first HTTP 200 of the page (the Blocks built, the
server up: torch, timm and the default model are loaded after that, in the background) and again when
the first ``/predict`` on an example film has answered (gradio_client, whose own import is done before
the clock starts). Prints a markdown table (median, min, max).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_load import REPO, fire, start_app


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baseline", default=None, help="another checkout's app.py, timed alternately in the same run")
    args = ap.parse_args(argv)
    import gradio_client  # noqa: F401 - imported before any clock starts

    times: dict[str, list[float]] = {}

    def timed(name: str, app: Path | None, tmp: str) -> None:
        t0 = time.perf_counter()
        server = start_app({"GRADIO_TEMP_DIR": str(Path(tmp) / "gradio")}, log_dir=Path(tmp), app=app)
        times.setdefault(f"{name} (until the page answers)", []).append(time.perf_counter() - t0)
        try:
            res = fire(server.url, 1, 1, None)
            if res.outcomes["ok"] == 1:
                times.setdefault(f"{name} (until the first /predict answers)", []).append(time.perf_counter() - t0)
        finally:
            server.stop()

    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        for _ in range(args.runs):
            timed("python app.py", None, tmp)
            if args.baseline:
                timed(f"baseline {args.baseline}", Path(args.baseline), tmp)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "chestxray", "--help"], cwd=REPO, check=True,
                           stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})
            times.setdefault("python -m chestxray --help", []).append(time.perf_counter() - t0)
    print(f"{args.runs} fresh processes each; {os.cpu_count()} cores\n")
    print("| command | median s | min s | max s |")
    print("|---|---:|---:|---:|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.2f} | {min(ts):.2f} | {max(ts):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
