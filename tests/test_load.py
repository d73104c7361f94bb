"""Load, short version of benchmarks/bench_load.py: 16 concurrent clients against the real app process.

Every request is answered or politely refused by the queue limit, none is lost, and the server's
memory does not grow with the number of requests (Grad-CAM hooks and caches are a known leak).
"""
from __future__ import annotations

import pytest

from benchmarks.bench_load import fire, start_app
from tests.helpers import make_checkpoint

pytestmark = pytest.mark.load
#: RSS growth allowed over 100 requests after 20 warm-up ones (see the test for how it was set).
MEMORY_LIMIT_MB = 64


@pytest.fixture(scope="module")
def app_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    make_checkpoint(root / "weights/tiny", arch="resnet10t", seed=7)
    (root / "models.yaml").write_text("default: tiny\nmodels:\n  - name: tiny\n    local: tiny\n")
    return {"CHESTXRAY_WEIGHTS": str(root / "weights"), "CHESTXRAY_MODELS": str(root / "models.yaml"),
            "GRADIO_TEMP_DIR": str(root / "gradio_tmp"), "CHESTXRAY_TORCH_THREADS": "1"}, root


def test_sixteen_clients_none_lost_and_no_memory_growth(app_env):
    env, root = app_env
    server = start_app(env, log_dir=root)
    try:
        warm = fire(server.url, 20, 16, "tiny")
        assert warm.outcomes["ok"] == 20, warm.errors[:3]
        rss_warm = server.rss_mb()
        res = fire(server.url, 100, 16, "tiny")
        growth = server.rss_mb() - rss_warm
    finally:
        server.stop()
    assert res.total == 100  # nothing lost silently
    assert res.outcomes["error"] == 0, res.errors[:3]
    assert res.outcomes["ok"] == 100  # max_size 32 >= 16 clients: nobody is refused
    # The limit comes from the spread of repeated runs of exactly this test's load (tiny resnet10t, 16 clients,
    # 20 warm-up + 100 requests, 2 shared cores; issue 11): growth -19, +6, +23, +29 MiB in four runs of the same
    # code, so RSS moves by about +/-25 MiB from run to run with no leak (allocator, Gradio's sessions: each
    # fire() opens 16 new ones). 50 MiB failed some runs; 64 MiB = the largest seen + about the run-to-run
    # spread, and a leak of 0.6 MiB or more per request still fails it.
    assert growth < MEMORY_LIMIT_MB, f"server memory grew {growth:.0f} MiB over 100 requests"


def test_full_queue_refuses_politely(app_env):
    env, root = app_env
    server = start_app({**env, "CHESTXRAY_QUEUE": "2"}, log_dir=root)
    try:
        res = fire(server.url, 32, 16, "tiny")
    finally:
        server.stop()
    assert res.total == 32
    assert res.outcomes["error"] == 0, res.errors[:3]
    assert res.outcomes["refused"] >= 1 and res.outcomes["ok"] >= 2
