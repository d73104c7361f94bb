"""Shared fixtures. The environment variables must be set before gradio/huggingface_hub import."""
from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
#: The shared real data lies beside the checkout (read-only in CI).
DATA = Path(os.environ.get("CHESTXRAY_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Root of the shared real data (``../shared/data``)."""
    if not DATA.is_dir():
        pytest.fail(f"shared data not found at {DATA}; set CHESTXRAY_DATA")
    return DATA


@pytest.fixture(scope="session")
def bad_corpus(tmp_path_factory, data_dir) -> dict[str, Path]:
    """Bad and odd input files (see ``tests/badfiles.py``): ``{name: path}``."""
    from tests.badfiles import make_bad_corpus

    return make_bad_corpus(tmp_path_factory.mktemp("bad_corpus"), data_dir)
