#!/usr/bin/env python
"""Start-up time: ``python app.py`` until its page answers, and ``python -m chestxray --help``.

    python -m benchmarks.bench_startup [--runs 3]

Each run is a fresh process (imports, the default model loaded, the Blocks built, the server up);
the clock stops at the first HTTP 200 of the page. Prints a markdown table (median, min, max).
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

from benchmarks.bench_load import REPO, start_app


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baseline", default=None, help="another checkout's app.py, timed alternately in the same run")
    args = ap.parse_args(argv)
    app_s, base_s, cli_s = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        for _ in range(args.runs):
            t0 = time.perf_counter()
            server = start_app({"GRADIO_TEMP_DIR": str(Path(tmp) / "gradio")}, log_dir=Path(tmp))
            app_s.append(time.perf_counter() - t0)
            server.stop()
            if args.baseline:
                t0 = time.perf_counter()
                server = start_app({"GRADIO_TEMP_DIR": str(Path(tmp) / "gradio")}, log_dir=Path(tmp),
                                   app=Path(args.baseline))
                base_s.append(time.perf_counter() - t0)
                server.stop()
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "chestxray", "--help"], cwd=REPO, check=True,
                           stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})
            cli_s.append(time.perf_counter() - t0)
    print(f"{args.runs} fresh processes each; {os.cpu_count()} cores\n")
    print("| command | median s | min s | max s |")
    print("|---|---:|---:|---:|")
    rows = [("python app.py (until the page answers)", app_s)]
    rows += [(f"baseline {args.baseline}", base_s)] if base_s else []
    for name, ts in (*rows, ("python -m chestxray --help", cli_s)):
        print(f"| {name} | {statistics.median(ts):.2f} | {min(ts):.2f} | {max(ts):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
