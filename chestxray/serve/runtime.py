"""The serving process's tuning: malloc arenas, heap trimming, torch threads, and the app's own work threads.

Importing this module changes nothing; a front end calls :func:`limit_malloc_arenas` first thing (before its
web framework starts threads), and every handler runs through :func:`on_work_thread` or :func:`submit`.
"""
from __future__ import annotations

import contextvars
import ctypes
import functools
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

#: Concurrent model calls: one request per core (at most 4; on a GPU too, unless $CHESTXRAY_CONCURRENCY says
#: otherwise), each forward pass on cores // CONCURRENCY torch threads (1 on 2 cores): most of a request is
#: single-threaded work (decoding, drawing, PNG, HTTP) that a second request overlaps, and OpenMP's two threads on
#: two busy cores (16 clients, other processes) spin against each other: measured here under load, 62 ms per
#: efficientnet_b0 forward on 1 thread against 490 ms on 2. Batching two requests' forwards on 1 thread gave no
#: gain per image (89 ms each), so requests are not batched.
CPU_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
CONCURRENCY = int(os.environ.get("CHESTXRAY_CONCURRENCY", min(4, CPU_CORES)))
#: Every handler runs on these few threads, not on whichever of the web framework's threads (Gradio: up to 40)
#: picked the request: torch keeps buffers per thread that has run a forward pass, so the server's RSS grew with
#: the number of threads that ever ran one. Measured in process (efficientnet_b0, 212 analyses, 2 at a time):
#: flat at ~800 MiB on 2 threads, +95 MiB on 40. Twice the model concurrency: the viewer's events run beside the
#: model's.
WORK_THREADS = 2 * CONCURRENCY
_PREFIX = "chestxray-work"
_WORK = ThreadPoolExecutor(WORK_THREADS, thread_name_prefix=_PREFIX)


def limit_malloc_arenas(n: int = 1) -> None:
    """Caps glibc's malloc arenas at ``n`` for the threads created from now on (MALLOC_ARENA_MAX wins if set).

    glibc gives each worker thread its own arena, and freed image buffers stay there: RSS then grows with the
    number of threads that ever ran a request (measured with 16 clients: +247 MiB over 100 requests with the
    default arenas, +60 MiB with 2). One arena, because :func:`trim_heap` cannot empty the others: glibc's
    malloc_trim releases the whole free pages inside every arena but shrinks only the main arena's top (malloc.c,
    ``mtrim``), and another arena's free top goes back only once it exceeds the trim threshold, which glibc raises
    with the largest freed mmapped buffer (up to 64 MiB on 64-bit). Measured with tests/test_load.py's server (tiny
    model, 16 clients, half the app's HTTP API and half Gradio's, the 7 MB DICOM once every 16 requests, RSS read
    after every 16 requests with none in flight, 2 cores shared with a training job and a test run), 672 requests:
    with 1 arena the readings stayed within 890-899 and 885-894 MiB (two servers), with 2 (MALLOC_ARENA_MAX=2)
    they jumped within 896-913 MiB; server CPU 42.9 ms a request with 1 arena, 44.9 with 2 (one run each).
    (Also tried: a fixed 256 KiB mmap threshold, so that every large buffer goes back to the OS when freed: RSS
    growth the same within noise, but 60% more server CPU per request.)
    """
    if os.environ.get("MALLOC_ARENA_MAX") or _LIBC is None:
        return
    _LIBC.mallopt(-8, n)  # M_ARENA_MAX


def trim_heap() -> None:
    """Hands the heap pages freed by a request back to the OS (glibc's malloc_trim).

    Even with 2 arenas, glibc keeps freed image and activation buffers mapped, so RSS crept up by about
    50-60 MiB per 100 requests under 16 clients; trimming after each request bounds it."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc() -> ctypes.CDLL | None:
    """glibc, or None (musl has no malloc_trim; macOS and Windows have neither)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 - both or nothing
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


@functools.cache
def configure_torch() -> None:
    """Imports torch (once) and sets its threads: cores // CONCURRENCY on a CPU, ``$CHESTXRAY_TORCH_THREADS`` if set.

    torch and timm (about 5 s of imports) are not needed to build a page: a warm-up thread imports them once the
    server is up, and a request that comes first imports them itself (the import lock makes it wait)."""
    import torch

    if os.environ.get("CHESTXRAY_TORCH_THREADS"):
        torch.set_num_threads(int(os.environ["CHESTXRAY_TORCH_THREADS"]))
    elif not torch.cuda.is_available():
        torch.set_num_threads(max(1, CPU_CORES // CONCURRENCY))


def on_work_thread() -> bool:
    """Whether the calling thread is one of the :data:`WORK_THREADS`."""
    return threading.current_thread().name.startswith(_PREFIX)


def submit(fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
    """Starts ``fn(*args, **kwargs)`` on a work thread with the caller's context (Gradio keeps its request and
    progress in context variables)."""
    return _WORK.submit(contextvars.copy_context().run, fn, *args, **kwargs)


def run_on_work_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on a work thread, waiting for it; directly if already on one (a handler that calls
    another one must not wait for a free thread)."""
    if on_work_thread():
        return fn(*args, **kwargs)
    return submit(fn, *args, **kwargs).result()
