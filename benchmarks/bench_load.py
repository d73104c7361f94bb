#!/usr/bin/env python
"""Load test: many concurrent clients send real X-rays to the running app; does its memory grow?

Starts ``app.py`` in its own process on 127.0.0.1 (loopback only), fires ``--requests`` predict calls
from ``--clients`` concurrent clients, and reports: answered / politely refused ("Queue is full") /
lost or failed, latency p50/p95, throughput, and how the server's resident memory grows with the number of
requests. The same clients keep going for the whole run and stop after every ``--window`` requests until
all have their answers: the server's RSS is read then, with no request in flight. The growth is the
least-squares slope of those readings from request ``--warmup`` on, in MiB per 100 requests (a leak of
k KiB a request adds about k / 10 to it), beside the plain difference from request ``--warmup`` to
10 x ``--warmup`` (100 -> 1,000 with the defaults) and the largest distance of a reading from the fitted
line (the allocator's noise).

    python -m benchmarks.bench_load [--clients 16] [--requests 1000] [--window 50] [--client rest,gradio_client:400]

Clients: gradio_client (default); ``http``: Gradio's plain HTTP API over one kept-alive connection per
client (``bench_app.http_predict``; what curl or another service would send; a new Gradio session per
call); ``rest``: the app's own HTTP API, ``POST /v1/predict`` (JSON, no overlay), also one kept-alive
connection per client; ``rest+http``: half the clients of each, at once. Several kinds, comma-separated,
run one after the other against the same server (one row each, and each one's req/s against the first's);
``KIND:N`` gives that kind N requests instead of ``--requests``.
The clients run in this process, on the same cores as the server: gradio_client's polling threads cost the
server CPU time. ``--leak-kib N`` makes the server keep N KiB per request (``benchmarks/launch_app.py``), to
see what a leak looks like in the table.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chestxray.layout import default_data_root

REPO = Path(__file__).resolve().parents[1]
DATA = Path(default_data_root())
#: How :func:`start_app` runs an ``app.py`` (a patient self-check; the tests' deliberate leak).
LAUNCHER = REPO / "benchmarks/launch_app.py"
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


def start_app(env: dict[str, str] | None = None, timeout: float = 900.0, log_dir: Path | None = None,
              app: Path | None = None, until_loaded: bool = False) -> Server:
    """Starts ``app.py`` in its own process on a free loopback port and waits until it answers.

    It runs through ``benchmarks/launch_app.py``: as ``python app.py``, with a patient Gradio self-check (a
    niced app on busy cores failed its 3 s one) and, with ``$CHESTXRAY_TEST_LEAK_KIB`` in ``env``, a deliberate
    leak. ``app``: another checkout's ``app.py`` (e.g. the main branch, for a before/after in one run); its
    folder is put first on ``PYTHONPATH`` so that it runs with its own ``chestxray``. ``until_loaded``: also
    wait until ``/healthz`` lists a loaded model: the warm-up starts only once ``launch()`` has returned, so no
    request pays for the model's loading. ``timeout`` is generous: a niced app on cores held by other jobs
    imports torch and gradio slowly.
    """
    import json
    import urllib.error
    import urllib.request

    app = Path(app or REPO / "app.py").resolve()
    port = free_port()
    log = Path(log_dir or "/tmp") / f"app_{port}.log"
    full_env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
                "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                "PYTHONPATH": os.pathsep.join([str(app.parent), *filter(None, [os.environ.get("PYTHONPATH")])]),
                **(env or {})}
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, str(LAUNCHER), str(app)], cwd=app.parent, env=full_env, stdout=f,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            # /healthz, not the page: a probe that times out leaves the server rendering the page for nothing,
            # on the CPU its own self-check needs
            with urllib.request.urlopen(f"{url}healthz", timeout=10) as r:
                if not until_loaded or json.load(r).get("loaded"):
                    return Server(proc, url, log)
        except urllib.error.HTTPError as err:  # an older checkout without /healthz: its page
            if err.code == 404 and not until_loaded:
                try:
                    with urllib.request.urlopen(url, timeout=10) as r:
                        if r.status == 200:
                            return Server(proc, url, log)
                except OSError:
                    pass
        except (OSError, ValueError):  # not listening yet, timed out, or a partial answer
            pass
        time.sleep(1.0)
    proc.kill()
    raise TimeoutError(f"app did not answer within {timeout:.0f} s")


@dataclass
class Sample:
    """The server between two windows of a run, with no request in flight."""

    requests: int  # requests answered or refused so far
    t: float  # time.perf_counter()
    rss: float  # resident memory, MiB
    cpu: float  # the server's CPU seconds so far
    answered: int = 0  # of ``requests``, those answered


@dataclass
class LoadResult:
    """Outcome of a burst of requests."""

    outcomes: Counter = field(default_factory=Counter)  # ok / refused / error
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # the failures' messages (not the refusals')
    samples: list[Sample] = field(default_factory=list)  # after every window (fire's ``window``)

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


def make_call(kind: str, url: str, model: str | None, timeout: float, download: bool) -> Callable[[str], Any]:
    """One client of ``kind``: a function that sends one predict call for a file and returns the answer.

    Every HTTP call gets ``timeout``: gradio_client's own default for its config, upload and status calls is
    httpx's 5 s, short for a server busy with 16 clients on shared cores."""
    import httpx

    if kind == "rest":
        http = httpx.Client(timeout=timeout)
        return lambda path: rest_predict(http, url, path, model)
    if kind == "http":
        from benchmarks.bench_app import http_predict

        http = httpx.Client(timeout=timeout)
        return lambda path: http_predict(http, url, path, model, "gradcam", 0.4, "minmax", False)
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False, analytics_enabled=False, httpx_kwargs={"timeout": timeout},
                    **({} if download else {"download_files": False}))
    return lambda path: client.submit(handle_file(path), model, api_name="/predict").result(timeout)


def fire(url: str, n_requests: int, n_clients: int, model: str | None, images: list[Path] | None = None,
         timeout: float = 300.0, download: bool = False, kind: str = "gradio_client", window: int = 0,
         sample: Callable[[int], Sample] | None = None) -> LoadResult:
    """Sends ``n_requests`` predict calls from ``n_clients`` concurrent clients (one client each, of ``kind``;
    ``"rest+http"``: every other client of each).

    With ``window``, the clients stop after every ``window`` requests until all have their answers, then
    ``sample(requests so far)`` reads the server (into ``samples``) and the same clients (same sessions, same
    connections) go on: memory read with no request in flight is what the server keeps, not the buffers of the
    requests it is working on (the 7 MB DICOM's 1841 x 1955 film alone is 14 MiB as float32).

    The clients do not download the output files unless ``download`` (as in ``bench_app``): on a 2-core
    machine the 16 clients share the CPU with the server, and fetching every PNG cost them about as much
    CPU as the server spent answering."""
    images = images or DEFAULT_IMAGES
    result, lock = LoadResult(), threading.Lock()
    window = window or n_requests
    ends = [*range(window, n_requests, window), n_requests]
    taken = 0

    def take(end: int) -> int | None:
        nonlocal taken
        with lock:
            if taken >= end:
                return None
            taken += 1
            return taken - 1

    def at_barrier() -> None:
        if sample is not None:
            result.samples.append(sample(result.total))
            result.samples[-1].answered = result.outcomes["ok"]

    # bounded: a client waits for the others' calls of one window at most, each call bounded by ``timeout``
    barrier = threading.Barrier(n_clients, action=at_barrier, timeout=timeout * window + 60)

    kinds = kind.split("+")

    def worker(k: int) -> None:
        try:
            call = make_call(kinds[k % len(kinds)], url, model, timeout, download)
            for end in ends:
                while (i := take(end)) is not None:
                    t = time.perf_counter()
                    try:
                        call(str(images[i % len(images)]))
                        outcome, msg = "ok", None
                    except Exception as err:  # noqa: BLE001 - every failure is classified and counted
                        msg = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                        outcome = "refused" if "queue is full" in msg.lower() else "error"
                    with lock:
                        result.outcomes[outcome] += 1
                        if outcome == "ok":
                            result.latencies.append(time.perf_counter() - t)
                        elif outcome == "error":  # the failures alone: a refusal is counted, its text is known
                            result.errors.append(msg)
                barrier.wait()
        except threading.BrokenBarrierError:
            return  # another client failed: its exception is the one reported
        except BaseException:
            barrier.abort()  # the others must not wait for this client at the next window
            raise

    with ThreadPoolExecutor(n_clients) as pool:
        list(pool.map(worker, range(n_clients)))
    return result


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of ``[(x, y), ...]`` (0 with fewer than two distinct x)."""
    n = len(points)
    if n < 2:
        return 0.0
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


def growth_per_100(samples: list[Sample], after: int) -> float:
    """Memory growth in MiB per 100 requests: the least-squares slope of RSS over the windows from request
    ``after`` on (one line through every window, so that one window's allocator step moves it little)."""
    return 100 * slope([(s.requests, s.rss) for s in samples if s.requests >= after])


def rss_at(samples: list[Sample], requests: int) -> float:
    """RSS (MiB) at the window that ended nearest ``requests``."""
    return min(samples, key=lambda s: abs(s.requests - requests)).rss


@dataclass
class Run:
    """One client kind's run against the server: outcomes, the per-window samples, the clients' CPU."""

    kind: str
    requests: int
    res: LoadResult
    cpu_clients: float

    def after(self, requests: int) -> list[Sample]:
        """The samples from ``requests`` on."""
        return [s for s in self.res.samples if s.requests >= requests]


def measure(server: Server, kind: str, n_requests: int, args: argparse.Namespace) -> Run:
    """``n_requests`` requests from ``args.clients`` clients, the server sampled after every ``args.window``
    (and at 0, before the first)."""

    def sample(done: int) -> Sample:
        time.sleep(args.settle)  # the last answer's bookkeeping (Gradio's file cache, the event stream's end)
        return Sample(done, time.perf_counter(), server.rss_mb(), server.cpu_s())

    own0, first = time.process_time(), sample(0)
    res = fire(server.url, n_requests, args.clients, args.model, download=args.download, kind=kind,
               window=args.window, sample=sample)
    res.samples.insert(0, first)
    return Run(kind, n_requests, res, time.process_time() - own0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=1000, help="requests per client kind (KIND:N in --client: N)")
    ap.add_argument("--window", type=int, default=50, help="requests between two memory samples")
    ap.add_argument("--warmup", type=int, default=100,
                    help="requests before the growth is measured (model loaded, sessions and arenas filled)")
    ap.add_argument("--settle", type=float, default=0.3, help="seconds to wait before each sample")
    ap.add_argument("--queue", type=int, default=32, help="the app's queue max_size")
    ap.add_argument("--model", default=None, help="model name (default: the app's default)")
    ap.add_argument("--app", default=None, help="another checkout's app.py (default: this one's)")
    ap.add_argument("--download", action="store_true", help="clients download every output file")
    ap.add_argument("--client", default="gradio_client",
                    help="comma list of gradio_client, http (Gradio's plain HTTP API), rest (the app's /v1/predict); "
                         "A+B: every other client of each, at once; KIND:N: N requests of that kind")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="for the server (repeatable)")
    ap.add_argument("--leak-kib", type=int, default=0,
                    help="the server keeps this many KiB a request (benchmarks/launch_app.py): what a leak looks like")
    args = ap.parse_args()
    parts = [c.partition(":") for c in args.client.split(",")]
    if not {k for kind, _, _ in parts for k in kind.split("+")} <= {"gradio_client", "http", "rest"} or \
            not all(n.isdigit() for _, colon, n in parts if colon):
        ap.error(f"unknown --client: {args.client}")
    kinds = [(kind, int(n) if colon else args.requests) for kind, colon, n in parts]
    if min(n for _, n in kinds) < args.warmup + 2 * args.window:
        ap.error("every kind's requests must leave at least two windows after --warmup")
    env = {"CHESTXRAY_QUEUE": str(args.queue), **dict(e.split("=", 1) for e in args.env)}
    if args.leak_kib:
        env["CHESTXRAY_TEST_LEAK_KIB"] = str(args.leak_kib)
    server = start_app(env, app=args.app, until_loaded=True)
    try:
        runs = [measure(server, kind, n, args) for kind, n in kinds]
    finally:
        server.stop()
    w = args.warmup
    leak = f" leaking {args.leak_kib} KiB a request" if args.leak_kib else ""
    counts = ", ".join(f"{r.kind} {r.requests}" for r in runs)
    print(f"{args.app or 'app.py'}{leak}: {args.clients} clients of each kind; requests: {counts}; queue max_size "
          f"{args.queue}, outputs {'downloaded' if args.download else 'not downloaded'}; the kinds ran one after "
          f"the other against one server, each with the same clients throughout. Server RSS read after every "
          f"{args.window} requests with none in flight; growth = least-squares slope over the windows from request "
          f"{w} on; throughput over the same windows (the waits before the readings left out)\n")
    print(f"| client | requests | answered | refused (queue full) | failed | lost | p50 s | p95 s | throughput req/s | "
          f"vs {runs[0].kind} | RSS at {w} MiB | at the end | growth {w}->{10 * w} MiB | slope MiB/100 requests | "
          "largest residual MiB | server CPU ms/request | clients' CPU ms/request |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    failed, rate0 = False, None
    for r in runs:
        res, tail = r.res, r.after(w)
        ok, lat = res.outcomes["ok"], sorted(res.latencies)
        lost = r.requests - res.total
        failed |= bool(res.outcomes["error"] or lost)
        p50 = statistics.median(lat) if lat else float("nan")
        p95 = lat[int(0.95 * (len(lat) - 1))] if lat else float("nan")
        first, last = tail[0], tail[-1]
        rate = (last.answered - first.answered) / (last.t - first.t - args.settle * (len(tail) - 1))
        rate0 = rate0 or rate
        per100 = growth_per_100(res.samples, w)
        mean_x = sum(s.requests for s in tail) / len(tail)
        mean_y = sum(s.rss for s in tail) / len(tail)
        resid = max(abs(s.rss - (mean_y + per100 / 100 * (s.requests - mean_x))) for s in tail)
        n_after = max(last.answered - first.answered, 1)
        far = f"{rss_at(res.samples, 10 * w) - first.rss:+.1f}" if r.requests >= 10 * w else "-"
        print(f"| {r.kind} | {r.requests} | {ok} | {res.outcomes['refused']} | {res.outcomes['error']} | {lost} | "
              f"{p50:.2f} | {p95:.2f} | {rate:.2f} | {rate / rate0:.2f}x | {first.rss:.0f} | {last.rss:.0f} | "
              f"{far} | {per100:+.2f} | {resid:.1f} | {1e3 * (last.cpu - first.cpu) / n_after:.0f} | "
              f"{1e3 * r.cpu_clients / max(ok, 1):.0f} |")
    print(f"\nload average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for r in runs:
        print(f"- {r.kind}, RSS MiB after " + ", ".join(f"{s.requests}: {s.rss:.0f}" for s in r.res.samples))
        for msg, n in Counter(r.res.errors).most_common(5):
            print(f"- {r.kind}: {n} x {msg}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
