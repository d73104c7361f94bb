#!/usr/bin/env python
"""Load test: many concurrent gradio_client clients send real X-rays to the running app.

Starts ``app.py`` in its own process on 127.0.0.1 (loopback only), fires ``--requests`` predict calls
from ``--clients`` concurrent clients, and reports: answered / politely refused ("Queue is full") /
lost or failed, latency p50/p95, and the server's resident memory after the first ``--warmup``
requests and at the end (Grad-CAM hook or cache leaks show up as growth).

    python benchmarks/bench_load.py [--clients 16] [--requests 400] [--queue 32] [--client rest,gradio_client]

Clients: gradio_client (default); ``http``: Gradio's plain HTTP API over one kept-alive connection per
client (``bench_app.http_predict``; what curl or another service would send); ``rest``: the app's own HTTP
API, ``POST /v1/predict`` (JSON, no overlay), also one kept-alive connection per client. Several kinds,
comma-separated, run one after the other against the same server (one row each, and each one's req/s
against the first's). The clients run in this process, on the same cores as the server: gradio_client's
polling threads cost the server CPU time.
"""
from __future__ import annotations

import argparse
import itertools
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from chestxray.layout import default_data_root

REPO = Path(__file__).resolve().parents[1]
DATA = Path(default_data_root())
DEFAULT_IMAGES = [DATA / "nih/images_384/00000100_000.png", DATA / "nih/full_res/00000075_000.png",
                  DATA / "dicom/pydicom_RG1_UNCR_chest_CR.dcm"]


def free_port() -> int:
    """An unused TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """The app in a child process."""

    proc: subprocess.Popen
    url: str
    log: Path

    def rss_mb(self) -> float:
        """Resident memory of the server process, in MiB."""
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the server process has used so far: unlike wall time, barely moved by
        other processes on a shared machine."""
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_app(env: dict[str, str] | None = None, timeout: float = 180.0, log_dir: Path | None = None,
              app: Path | None = None) -> Server:
    """Starts ``python app.py`` on a free loopback port and waits until it answers.

    ``app``: another checkout's ``app.py`` (e.g. the main branch, for a before/after in one run); its
    folder is put first on ``PYTHONPATH`` so that it runs with its own ``chestxray``.
    """
    import urllib.request

    app = Path(app or REPO / "app.py").resolve()
    port = free_port()
    log = Path(log_dir or "/tmp") / f"app_{port}.log"
    full_env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
                "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                "PYTHONPATH": os.pathsep.join([str(app.parent), *filter(None, [os.environ.get("PYTHONPATH")])]),
                **(env or {})}
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, str(app)], cwd=app.parent, env=full_env, stdout=f,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return Server(proc, url, log)
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise TimeoutError(f"app did not answer within {timeout:.0f} s")


@dataclass
class LoadResult:
    """Outcome of a burst of requests."""

    outcomes: Counter = field(default_factory=Counter)  # ok / refused / error
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())


def rest_predict(http, url: str, path: str, model: str | None) -> dict:
    """``POST /v1/predict`` with the file (multipart) and the model: the JSON answer; a 503 raises "queue is full"."""
    with open(path, "rb") as fh:
        r = http.post(f"{url}v1/predict", files={"file": (Path(path).name, fh)}, data={"model": model} if model else {})
    if r.status_code != 200:
        raise RuntimeError(f"{r.status_code}: {r.json().get('error', r.text[:200])}")
    return r.json()


def fire(url: str, n_requests: int, n_clients: int, model: str | None, images: list[Path] | None = None,
         timeout: float = 300.0, download: bool = False, kind: str = "gradio_client") -> LoadResult:
    """Sends ``n_requests`` predict calls from ``n_clients`` concurrent clients (one Client each, of ``kind``).

    The clients do not download the output files unless ``download`` (as in ``bench_app``): on a 2-core
    machine the 16 clients share the CPU with the server, and fetching every PNG cost them about as much
    CPU as the server spent answering."""
    from gradio_client import Client, handle_file

    images = images or DEFAULT_IMAGES
    result, lock = LoadResult(), threading.Lock()
    counter = itertools.count()

    def worker(_: int) -> None:
        if kind == "rest":
            import httpx

            http = httpx.Client(timeout=timeout)
            call = lambda path: rest_predict(http, url, path, model)  # noqa: E731
        elif kind == "http":
            import httpx

            from benchmarks.bench_app import http_predict

            http = httpx.Client(timeout=timeout)
            call = lambda path: http_predict(http, url, path, model, "gradcam", 0.4, "minmax", False)  # noqa: E731
        else:
            client = Client(url, verbose=False, analytics_enabled=False,
                            **({} if download else {"download_files": False}))
            call = lambda path: (  # noqa: E731
                client.submit(handle_file(path), model, api_name="/predict").result(timeout))
        while (i := next(counter)) < n_requests:
            t = time.perf_counter()
            try:
                call(str(images[i % len(images)]))
                outcome, msg = "ok", None
            except Exception as err:  # noqa: BLE001 - every failure is classified and counted
                msg = str(err).splitlines()[0] if str(err) else type(err).__name__
                outcome = "refused" if "queue is full" in msg.lower() else "error"
            with lock:
                result.outcomes[outcome] += 1
                if outcome == "ok":
                    result.latencies.append(time.perf_counter() - t)
                elif msg:
                    result.errors.append(msg)

    with ThreadPoolExecutor(n_clients) as pool:
        list(pool.map(worker, range(n_clients)))
    return result


@dataclass
class Run:
    """One client kind's burst against the server: outcomes, wall time, RSS and CPU along the way."""

    kind: str
    warm: LoadResult
    res: LoadResult
    wall: float
    rss: tuple[float, float, float]  # after the warm-up, half-way, at the end (MiB)
    cpu_server: float
    cpu_clients: float


def measure(server: Server, kind: str, args: argparse.Namespace) -> Run:
    """``args.warmup`` requests, then the rest in two halves (RSS read after each), from ``args.clients`` clients."""
    warm = fire(server.url, args.warmup, min(args.clients, args.warmup), args.model, download=args.download,
                kind=kind)
    rss_warm = server.rss_mb()
    cpu0, own0 = server.cpu_s(), time.process_time()
    t0 = time.perf_counter()
    half = (args.requests - args.warmup) // 2
    res = fire(server.url, half, args.clients, args.model, download=args.download, kind=kind)
    rss_mid = server.rss_mb()
    res2 = fire(server.url, args.requests - args.warmup - half, args.clients, args.model, download=args.download,
                kind=kind)
    wall = time.perf_counter() - t0
    res.outcomes.update(res2.outcomes)
    res.latencies += res2.latencies
    res.errors += res2.errors
    return Run(kind, warm, res, wall, (rss_warm, rss_mid, server.rss_mb()), server.cpu_s() - cpu0,
               time.process_time() - own0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--queue", type=int, default=32, help="the app's queue max_size")
    ap.add_argument("--model", default=None, help="model name (default: the app's default)")
    ap.add_argument("--app", default=None, help="another checkout's app.py (default: this one's)")
    ap.add_argument("--download", action="store_true", help="clients download every output file")
    ap.add_argument("--client", default="gradio_client",
                    help="comma list of gradio_client, http (Gradio's plain HTTP API), rest (the app's /v1/predict)")
    args = ap.parse_args()
    kinds = args.client.split(",")
    if not set(kinds) <= {"gradio_client", "http", "rest"}:
        ap.error(f"unknown --client: {args.client}")
    server = start_app({"CHESTXRAY_QUEUE": str(args.queue)}, app=args.app)
    try:
        runs = [measure(server, kind, args) for kind in kinds]
    finally:
        server.stop()
    half = args.warmup + (args.requests - args.warmup) // 2
    print(f"{args.app or 'app.py'}: {args.clients} clients of each kind, {args.requests} requests each "
          f"({args.warmup} warm-up), queue max_size {args.queue}, outputs "
          f"{'downloaded' if args.download else 'not downloaded'}; the kinds ran one after the other\n")
    print("| client | answered | refused (queue full) | failed | lost | p50 s | p95 s | throughput req/s | "
          f"vs {kinds[0]} | RSS after {args.warmup} MiB | after {half} | after {args.requests} | growth MiB | "
          "server CPU ms/request | clients' CPU ms/request |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    failed = False
    for r in runs:
        ok, lat = r.res.outcomes["ok"], sorted(r.res.latencies)
        lost = args.requests - args.warmup - r.res.total
        failed |= bool(r.res.outcomes["error"] or lost)
        p50 = statistics.median(lat) if lat else float("nan")
        p95 = lat[int(0.95 * (len(lat) - 1))] if lat else float("nan")
        rate = ok / r.wall
        print(f"| {r.kind} | {ok + r.warm.outcomes['ok']} | {r.res.outcomes['refused']} | {r.res.outcomes['error']} | "
              f"{lost} | {p50:.2f} | {p95:.2f} | {rate:.2f} | {rate / (runs[0].res.outcomes['ok'] / runs[0].wall):.2f}x"
              f" | {r.rss[0]:.0f} | {r.rss[1]:.0f} | {r.rss[2]:.0f} | {r.rss[2] - r.rss[0]:+.0f} | "
              f"{1e3 * r.cpu_server / max(ok, 1):.0f} | {1e3 * r.cpu_clients / max(ok, 1):.0f} |")
    print(f"\nload average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for r in runs:
        for msg, n in Counter(r.res.errors).most_common(5):
            print(f"- {r.kind}: {n} x {msg}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
