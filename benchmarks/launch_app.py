#!/usr/bin/env python
"""Runs an ``app.py`` as ``python app.py`` does, for the benchmarks and the load tests (``bench_load.start_app``);
never imported by the app or the library.

    python benchmarks/launch_app.py [PATH/TO/app.py]

Two differences, both for measuring on a busy machine:

- Gradio's start-up self-check is patient. ``launch()`` sends its own page HEAD requests with a 3 s timeout
  (``gradio.networking.url_ok``, Gradio 6.31) and raises ("When localhost is not accessible, a shareable link
  must be created") at the first one that times out: a niced app on cores held by other jobs may take longer
  than that to render its page the first time. Here the check waits up to :data:`SELF_CHECK_S`.
- A deliberate leak, for the tests that show the memory checks catch one: with ``$CHESTXRAY_TEST_LEAK_KIB``,
  every handler call (page and HTTP API alike: each ends in :func:`chestxray.serve.runtime.trim_heap`) keeps
  that many KiB for good, written so that every page is resident, as a leaked image buffer would be; with
  ``$CHESTXRAY_TEST_LEAK_SWITCH`` (a file path) too, only while that file exists, so that one server can be
  measured without and then with the leak. Unset (the default), nothing is patched.
"""
from __future__ import annotations

import os
import runpy
import sys
import time
from pathlib import Path

#: Seconds Gradio's self-check may take (its own: 5 tries of 3 s each, given up at the first timeout).
SELF_CHECK_S = 300.0
#: What each handler call keeps, in bytes (0: no leak).
LEAK_BYTES = int(os.environ.get("CHESTXRAY_TEST_LEAK_KIB", "0")) * 1024
#: While set, the leak is on only while this file exists.
SWITCH = os.environ.get("CHESTXRAY_TEST_LEAK_SWITCH")
KEPT: list[bytes] = []


def patient_self_check() -> None:
    """Replaces ``gradio.networking.url_ok`` (what ``launch()`` calls) with one that retries until
    :data:`SELF_CHECK_S` when the page is slow to answer."""
    import httpx
    from gradio import networking

    def url_ok(url: str) -> bool:
        deadline = time.monotonic() + SELF_CHECK_S
        while True:
            try:
                if httpx.head(url, timeout=30, verify=False).status_code in (200, 401, 301, 302, 303, 307, 308):
                    return True
            except (httpx.ConnectError, httpx.TimeoutException):
                pass
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)

    networking.url_ok = url_ok  # blocks.launch looks it up on the module


def install_leak() -> None:
    """Makes the heap trim that ends every handler call keep :data:`LEAK_BYTES` first."""
    from chestxray.serve import runtime

    trim = runtime.trim_heap

    def leaky_trim_heap() -> None:
        if SWITCH is None or os.path.exists(SWITCH):
            KEPT.append(b"\x01" * LEAK_BYTES)  # filled, not calloc'ed: resident like a real buffer
        trim()

    runtime.trim_heap = leaky_trim_heap  # errors.guarded looks it up on the module at every call


def main() -> None:
    """Patches what the environment asks for, then runs the app as ``__main__``."""
    app = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "app.py").resolve()
    sys.argv = [str(app)]  # its own checkout comes first on PYTHONPATH (start_app puts it there)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # as app.py does, before gradio is imported
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:  # before gradio starts any thread: glibc makes arenas per thread (app.py calls it again, harmlessly)
        from chestxray.serve.runtime import limit_malloc_arenas

        limit_malloc_arenas()
    except ImportError:  # an older checkout
        pass
    patient_self_check()
    if LEAK_BYTES:
        install_leak()
    runpy.run_path(str(app), run_name="__main__")


if __name__ == "__main__":
    main()
