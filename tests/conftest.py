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

from chestxray.layout import default_data_root  # noqa: E402

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
#: The shared real data lies beside the checkout (read-only in CI).
DATA = Path(default_data_root())  # $CHESTXRAY_DATA, else shared/data beside the checkout


#: Every test that uses one of these fixtures is ``slow``: the fixture costs tens of seconds.
SLOW_FIXTURES = {
    "served",  # tests/test_app.py: the Gradio app built and served over HTTP, then each call through it
    "trained",  # tests/test_training.py: a model trained for six epochs
    "cv_run",  # tests/test_cv.py: three folds trained, predicted and pooled
}
#: Slow tests in files owned elsewhere just now, marked by node id (a decorator in the file is better).
SLOW_TESTS: set[str] = set()  # test IDs to mark slow from here (prefer a decorator in the test file)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks :data:`SLOW_TESTS` and the users of :data:`SLOW_FIXTURES` as ``slow``."""
    for item in items:
        if item.nodeid in SLOW_TESTS or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Root of the shared real data (:func:`chestxray.layout.default_data_root`)."""
    if not DATA.is_dir():
        pytest.fail(f"shared data not found at {DATA}; set CHESTXRAY_DATA")
    return DATA


@pytest.fixture(scope="session")
def bad_corpus(tmp_path_factory, data_dir) -> dict[str, Path]:
    """Bad and odd input files (see ``tests/badfiles.py``): ``{name: path}``."""
    from tests.badfiles import make_bad_corpus

    return make_bad_corpus(tmp_path_factory.mktemp("bad_corpus"), data_dir)


def _chest_files(data: Path) -> list[Path]:
    nih = sorted((data / "nih/images_384").glob("*.png"))[:24]
    kermany = sorted((data / "kermany/train/NORMAL").glob("*.jpeg"))[:9] + sorted(
        (data / "kermany/train/PNEUMONIA").glob("*.jpeg"))[:9]
    covid = sorted((data / "covid/images").glob("*"))[:18]
    return nih + kermany + covid


@pytest.fixture(scope="session")
def fitted_gate(tmp_path_factory, data_dir):
    """A tiny checkpoint with a gate fitted on 40 real chest X-rays and calibrated on 20 others:
    ``(folder, predictor, gate, stats, files used)`` (shared by test_gate.py and test_gate_fit.py)."""
    from chestxray.gate import GATE_FILE
    from chestxray.gate_fit import fit_gate
    from chestxray.predictor import Predictor
    from tests.helpers import make_checkpoint

    folder = make_checkpoint(tmp_path_factory.mktemp("gate") / "tiny", seed=3)
    predictor = Predictor.load(folder, device="cpu")
    files = _chest_files(data_dir)
    train = [str(p) for i, p in enumerate(files) if i % 3]
    val = [str(p) for i, p in enumerate(files) if i % 3 == 0]
    gate, stats = fit_gate(predictor, train, val, folder / GATE_FILE, target_fa=0.05)
    return folder, predictor, gate, stats, set(train) | set(val)
