"""The app's service (``chestxray.serve``) without a browser, and its plain HTTP API against a real server.

The library tests call the handlers, encoders and the shared model limit directly; the ``slow`` ones serve the
app (page and API in one process, on 127.0.0.1) over two tiny real checkpoints and talk to it over HTTP.
"""
from __future__ import annotations

import asyncio
import base64
import html
import io
import json
import re
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chestxray.ckpt_config import CkptMeta, ReleaseMetrics, Training
from tests.badfiles import BAD, CHEST_CR, NIH_IMAGE
from tests.conftest import REPO
from tests.helpers import make_checkpoint

#: Where the HTTP API's README examples are read from.
DOCS = (REPO / "README.md",)
SECTION = "### The HTTP API"
#: The tiny models: the first is named like the shipped default, so that the README's examples run as written.
MODELS = ("efficientnet_b0", "tiny_res")
META = CkptMeta(
    training=Training(val_mean_auroc=0.6123, sources=["nih384"], split="patient", threshold_rule="spec90"),
    metrics=ReleaseMetrics(split="test", headline_group="reproduce_chexnet", mixed_group="nih384",
                           mean_auroc={"nih384": 0.7, "reproduce_chexnet": 0.6},
                           mean_auroc_ci={"nih384": [0.65, 0.75], "reproduce_chexnet": [0.55, 0.65]},
                           n_test_images={"nih384": 60, "reproduce_chexnet": 40}))


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Two tiny checkpoints and a models yaml naming them; the environment points the app at them."""
    root = tmp_path_factory.mktemp("serve")
    make_checkpoint(root / "weights" / MODELS[0], arch="test_efficientnet", seed=0, meta=META)
    make_checkpoint(root / "weights" / MODELS[1], arch="resnet10t", seed=1)
    (root / "models.yaml").write_text("default: efficientnet_b0\nmodels:\n"
                                      + "".join(f"  - {{name: {n}, local: {n}}}\n" for n in MODELS))
    mp = pytest.MonkeyPatch()
    mp.setenv("CHESTXRAY_WEIGHTS", str(root / "weights"))
    mp.setenv("CHESTXRAY_MODELS", str(root / "models.yaml"))
    mp.setenv("GRADIO_TEMP_DIR", str(root / "gradio_tmp"))
    yield root / "weights"
    mp.undo()


@pytest.fixture(scope="module")
def service(weights):
    from chestxray.registry import ModelRegistry
    from chestxray.serve.service import Service

    return Service(ModelRegistry.from_yaml(), warm_up=False)


# -- the library, no server ------------------------------------------------------------------------
def test_handlers_run_on_the_few_work_threads_and_fail_in_one_line():
    """Every handler runs on the WORK_THREADS, whichever thread calls it (torch keeps buffers per thread that ran a
    forward pass: RSS grew with each of Gradio's up to 40 worker threads); errors come back as one line, and a
    handler that calls another one does not wait for a free thread nor for a second model slot."""
    from chestxray.serve import runtime
    from chestxray.serve.errors import ServiceError, user_errors

    @user_errors(model=True)
    def where(nested: bool = False):
        return where() if nested else threading.current_thread().name

    @user_errors
    def fails():
        raise ValueError("not a readable image\nsecond line")

    with ThreadPoolExecutor(12) as pool:
        names = set(pool.map(lambda i: where(nested=i % 2 == 0), range(60)))
    assert all(n.startswith("chestxray-work") for n in names) and 1 <= len(names) <= runtime.WORK_THREADS
    with pytest.raises(ServiceError, match="not a readable image") as err:
        fails()
    assert "second line" not in str(err.value) and err.value.status == 422


@pytest.mark.parametrize("name", BAD)
def test_unreadable_files_get_one_line_and_a_4xx_status(bad_corpus, name):
    from chestxray.imaging import ImageReadError, read_image
    from chestxray.serve.errors import as_service_error

    with pytest.raises(ImageReadError) as read:
        read_image(bad_corpus[name].read_bytes())
    err = as_service_error(read.value)
    assert str(err) == str(read.value) and "\n" not in str(err)
    assert err.status == {"bomb.png": 413, "text.png": 415, "text.dcm": 415, "badcodec.dcm": 415}.get(name, 422)


def test_model_slots_are_shared_first_come_and_bounded():
    """Threads and asyncio tasks share the slots in arrival order; a full queue refuses at once; a waiter that
    gives up leaves its place, and the slot of work whose caller stopped waiting is freed when the work ends."""
    from chestxray.serve.limits import Busy, ModelSlots

    slots = ModelSlots(1, max_waiting=2)
    slots.acquire()  # a thread holds the only slot
    order: list[str] = []

    async def scenario() -> None:
        first = asyncio.ensure_future(slots.run(lambda: _done_future(order, "first")))
        gone = asyncio.ensure_future(slots.acquire_async())
        await asyncio.sleep(0)
        assert slots.waiting == 2
        with pytest.raises(Busy):
            await slots.acquire_async()  # two are waiting already
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        assert slots.waiting == 1  # its place is given up
        slots.release()  # the thread's slot goes to the oldest waiter
        assert await first == "first"

    asyncio.run(scenario())
    assert order == ["first"] and slots.waiting == 0
    slots.acquire()  # free again: the finished work released it
    slots.release()


def _done_future(order: list[str], value: str):
    from concurrent.futures import Future

    order.append(value)
    fut: Future = Future()
    fut.set_result(value)
    return fut


def test_the_page_and_the_api_hold_the_same_model_slots(service, data_dir, monkeypatch):
    """The page's model handlers wait for the slots the HTTP API uses (one limit for both)."""
    from chestxray.predictor import Predictor
    from chestxray.serve.limits import SLOTS

    free = []
    real = Predictor.analyze
    monkeypatch.setattr(Predictor, "analyze", lambda self, *a, **k: (free.append(SLOTS._free), real(self, *a, **k))[1])
    service.predict(str(data_dir / NIH_IMAGE), MODELS[0])
    assert free == [SLOTS.n - 1]


def test_score_equals_the_predictor(service, weights, data_dir):
    from chestxray.predictor import Predictor
    from chestxray.serve.errors import ServiceError

    data = (data_dir / CHEST_CR).read_bytes()
    s = service.score(data, None, cam="Effusion", scale="probability")
    reference = Predictor.load(weights / MODELS[0], device="cpu").predict(data)
    assert s.model == MODELS[0] and s.analysis.prob_dict() == pytest.approx(reference, abs=1e-6)
    assert s.overlay.dtype == np.uint8 and s.overlay.shape[1] > s.analysis.image.shape[1]  # with its colour bar
    for kwargs, text in (({"cam": "Nope"}, "Unknown label"), ({"method": "x"}, "Unknown CAM method"),
                         ({"scale": "x"}, "Unknown heatmap scale"), ({"alpha": 2.0}, "alpha must be")):
        with pytest.raises(ServiceError, match=text):
            service.score(data, None, **kwargs)


def test_fast_png_is_lossless():
    """The PNG writer (Up filter, fast deflate) gives back exactly the array, gray or RGB, any size."""
    from chestxray.serve.encode import encode_png

    rng = np.random.default_rng(0)
    ramp = np.add.outer(np.arange(300), np.arange(257)).astype(np.uint8)
    for arr in (ramp, np.dstack([ramp, ramp[::-1], 255 - ramp]), rng.integers(0, 256, (31, 17, 3), dtype=np.uint8),
                rng.integers(0, 256, (1, 1), dtype=np.uint8), np.zeros((5, 3), np.uint8)):
        with Image.open(io.BytesIO(encode_png(arr))) as im:
            assert im.format == "PNG" and np.array_equal(np.asarray(im), arr)
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4, 4), np.uint8))


def test_gallery_thumbnails_match_the_straightforward_ones(weights, data_dir):
    """Gallery thumbnails drawn at thumbnail size look like the full overlay shrunk (the old way)."""
    from chestxray.imaging import read_image
    from chestxray.predictor import Predictor
    from chestxray.serve.encode import gallery_thumbnail, thumbnail
    from chestxray.serve.sessions import pack, unpack

    pred = Predictor.load(weights / MODELS[0], device="cpu")
    for name in (NIH_IMAGE, "nih/full_res/00000100_000.png"):
        a = unpack(pack(pred.analyze(read_image(data_dir / name))))
        for k in a.labels[:5]:
            fast, ref = gallery_thumbnail(a, k, 0.6), thumbnail(a.overlay(k, 0.6))
            diff = np.abs(fast.astype(int) - ref)
            assert fast.shape == ref.shape and fast.dtype == np.uint8
            assert diff.mean() < 1.0 and diff.max() <= 16, (name, k, diff.mean(), diff.max())


def _row_attrs(table: str) -> list[tuple[str, bool, float, float, float]]:
    """(label, above, probability, threshold, tick position %) of each row of the result panel, in page order."""
    rows = re.findall(r'data-label="([^"]+)" data-above="(true|false)" data-probability="([\d.]+)" '
                      r'data-threshold="([\d.]+)".*?class="cxr-tick" data-position="([\d.]+)"', table)
    return [(k, a == "true", float(p), float(t), float(x)) for k, a, p, t, x in rows]


def test_result_panel_lists_labels_above_threshold_first_with_threshold_ticks(weights, data_dir):
    """The labels at or above their operating threshold come first, marked in words; the rest follow, most probable
    first; every bar carries a tick where its threshold lies; the probability scale is named."""
    from chestxray.predictor import Predictor
    from chestxray.report import probability_scale
    from chestxray.serve.text import ABOVE_MARK, bar_position, label_table, ranked_labels

    a = Predictor.load(weights / MODELS[0], device="cpu").analyze(data_dir / NIH_IMAGE)
    probs = a.prob_dict()
    # thresholds that put every third label just under its probability, the others above it (and one at 0.97)
    a.thresholds = {k: (probs[k] * 0.9 if i % 3 == 0 else min(0.97, probs[k] + 0.05)) for i, k in enumerate(a.labels)}
    rows = ranked_labels(a)
    assert sorted(r.label for r in rows) == sorted(a.labels)
    above = [r.label for r in rows if r.above]
    assert above == a.positives() and len(above) == 5  # labels 0, 3, 6, 9, 12 of 15
    assert [r.above for r in rows] == [True] * 5 + [False] * 10  # above threshold first
    below = [r.probability for r in rows if not r.above]
    assert below == sorted(below, reverse=True)  # then the others, most probable first
    table = label_table(a)
    shown = _row_attrs(table)
    assert [k for k, *_ in shown] == [r.label for r in rows]  # the page's order is ranked_labels'
    for (k, is_above, p, t, tick), r in zip(shown, rows):
        assert is_above == r.above == (p >= t) and p == pytest.approx(probs[k], abs=1e-6)
        assert t == pytest.approx(a.threshold(k), abs=1e-6) and tick == pytest.approx(100 * t, abs=0.06)
        assert f"left:{bar_position(t)}%" in table
    assert table.count('class="cxr-mark"') == 5 and table.count('class="cxr-tick"') == 15
    marks = [table.index(f'data-label="{k}"') for k in above]
    assert all(table.find('class="cxr-mark"', m) < table.find("data-label=", m + 1) for m in marks)  # each in its row
    assert ABOVE_MARK in table and "Above their operating threshold: 5" in table and "Below threshold: 10" in table
    assert probability_scale(a) in table and "not a diagnosis" in table
    assert (bar_position(-0.2), bar_position(0.0091), bar_position(1.4)) == (0.0, 0.9, 100.0)
    a.thresholds = {k: 1.0 for k in a.labels}  # nothing reaches its threshold: said so, nothing marked
    table = label_table(a)
    assert "No label reaches its operating threshold" in table and 'class="cxr-mark"' not in table
    assert [k for k, *_ in _row_attrs(table)] == sorted(a.labels, key=lambda k: -probs[k])
    # a checkpoint's label names and the scale's words are text, never markup (a Hub checkpoint is anyone's)
    hostile = '<img src=x onerror="alert(1)">'
    a.labels = [hostile, *a.labels[1:]]
    a.thresholds = {**{k: 1.0 for k in a.labels}, hostile: 0.0}
    a.reference = "adult films at NIH's <i>prevalence</i>"
    table = label_table(a)
    assert "<img" not in table and "<i>" not in table and "&lt;img src=x onerror=" in table
    assert f'data-label="{html.escape(hostile)}"' in table  # the attribute stays closed
    assert "adult films at NIH's <i>prevalence</i>" in html.unescape(table)  # read as written
    assert _row_attrs(table)[0][0] == html.escape(hostile) and table.count('class="cxr-mark"') == 1  # first, marked


def test_window_panel_only_for_dicom_and_16_bit_films(service, data_dir, bad_corpus):
    """The window/level panel is offered for a DICOM and a 16-bit PNG, narrowed to the film's stored values; an 8-bit
    PNG or a colour DICOM gets the one line "shown as stored" and no controls; nothing before an analysis."""
    from chestxray.imaging import read_image

    assert service.window_controls(None) == {"visible": False, "note": ""}
    for path, visible, note in ((data_dir / NIH_IMAGE, False, "8-bit PNG film: shown as stored."),
                                (bad_corpus["us_rgb.dcm"], False, "8-bit DICOM film: shown as stored."),
                                (data_dir / CHEST_CR, True, "Display only"),
                                (bad_corpus["gray16.png"], True, "Display only")):
        state = service.predict(str(path), MODELS[0]).state
        c = service.window_controls(state)
        assert c["visible"] is visible and c["note"].startswith(note), path
        if not visible:
            assert set(c) == {"visible", "note"}
            continue
        raw = read_image(path).raw
        lo, hi, center, width = float(raw.min()), float(raw.max()), c["center"], c["width"]
        assert center["minimum"] <= center["value"] <= center["maximum"] and center["step"] > 0
        assert center["maximum"] - center["minimum"] <= hi - lo + width["value"]  # the film's values, not +-1e6
        assert width["minimum"] == 1 < width["value"] <= width["maximum"] <= max(2 * (hi - lo), width["value"])
        assert f"Stored values {lo:g} to {hi:g}" in c["note"]


def test_report_outputs_show_only_once_a_report_is_made(service, data_dir):
    """No report outputs after an analysis; shown once the report is made; hidden again for the next film."""
    assert not service.report_shown(None)
    state = service.predict(str(data_dir / CHEST_CR), MODELS[0]).state
    assert not service.report_shown(state)
    pdf, js = service.report(state)
    assert service.report_shown(state) and state["report"] == {"pdf": pdf, "json": js}
    assert Path(pdf).read_bytes().startswith(b"%PDF")
    assert not service.report_shown(service.predict(str(data_dir / NIH_IMAGE), MODELS[0]).state)


# -- the HTTP API of the served app ------------------------------------------------------------------
@pytest.fixture(scope="module")
def api(weights):
    """(base URL, httpx client) of the app served on a free loopback port: the page and the API, one process."""
    import httpx

    import app

    demo = app.create_demo()
    _, url, _ = app.launch(demo, server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    client = httpx.Client(base_url=url, timeout=120)
    yield url, client
    client.close()
    demo.close()


def _predict(client, path: Path, name: str | None = None, **data):
    with open(path, "rb") as fh:
        return client.post("/v1/predict", files={"file": (name or path.name, fh)}, data=data)


def _one_line_error(r, status: int) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and body["error"] and "\n" not in body["error"] and "Traceback" not in r.text
    return body["error"]


@pytest.mark.slow
def test_health_models_and_docs(api):
    _, client = api
    assert client.get("/healthz").json()["status"] == "ok"
    listed = client.get("/v1/models").json()
    assert listed["default"] == MODELS[0] and [m["name"] for m in listed["models"]] == list(MODELS)
    first = listed["models"][0]
    assert first["headline"] == {"group": "test, NIH, label-balanced films (reproduce_chexnet sample)",
                                 "mean_auroc": 0.6, "mean_auroc_ci": [0.55, 0.65], "n_images": 40}
    assert first["validation_mean_auroc"] == pytest.approx(0.6123) and first["threshold_rule"] == "spec90"
    assert first["arch"] == "test_efficientnet" and len(first["labels"]) == 15 and not first["calibrated"]
    assert listed["models"][1]["headline"] is None  # no test block in that checkpoint: still listed
    spec = client.get("/v1/openapi.json").json()
    assert {"/predict", "/models"} <= set(spec["paths"]) and client.get("/v1/docs").status_code == 200


@pytest.mark.slow
def test_predict_json_and_overlay_equal_the_library(api, weights, data_dir):
    from chestxray.predictor import Predictor

    _, client = api
    path = data_dir / NIH_IMAGE
    r = _predict(client, path, model=MODELS[1], cam="Effusion", alpha="0.6")
    assert r.status_code == 200, r.text
    body = r.json()
    pred = Predictor.load(weights / MODELS[1], device="cpu")
    reference = pred.predict(path)
    assert body["model"] == MODELS[1] and body["labels"] == list(pred.labels)
    assert body["probabilities"] == pytest.approx(reference, abs=1e-6)
    assert body["thresholds"] == {k: 0.5 for k in pred.labels}
    assert body["above_threshold"] == sorted((k for k in reference if reference[k] >= 0.5), key=lambda k: -reference[k])
    assert body["warnings"] == [] and body["probability_scale"].startswith("raw model output")
    assert body["image"] == {"format": "png", "width": 384, "height": 384, "bit_depth": 8, "photometric": "L",
                             "notes": []}
    png = base64.b64decode(body["cam"].pop("png_base64"))
    assert body["cam"] == {"label": "Effusion", "method": "gradcam", "scale": "minmax", "alpha": 0.6}
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.width > im.height  # the colour bar on the right
    raw = _predict(client, path, model=MODELS[1], cam="Effusion", alpha="0.6").content
    alone = client.post("/v1/predict", files={"file": path.read_bytes()}, headers={"Accept": "image/png"},
                        data={"model": MODELS[1], "cam": "Effusion", "alpha": "0.6"})
    assert raw and alone.headers["content-type"] == "image/png" and alone.content == png  # the same picture
    plain = _predict(client, path).json()  # the default model, no overlay
    assert plain["model"] == MODELS[0] and "cam" not in plain


@pytest.mark.slow
def test_dicom_answer_and_logs_carry_no_patient_data(api, bad_corpus, data_dir, caplog):
    from tests.test_report import marker_strings

    _, client = api
    with caplog.at_level("DEBUG"):
        ok = _predict(client, bad_corpus["privacy.dcm"], name="MARKER^NAME^ZQX_MARKERID-ZQX-4711.dcm", cam="Mass")
        bad = client.post("/v1/predict", files={"file": ("MARKER^NAME^ZQX.dcm", b"not an image")})
        cr = _predict(client, data_dir / CHEST_CR)
    assert ok.status_code == 200 and ok.json()["image"]["format"] == "dicom"
    assert cr.json()["image"]["modality"] == "CR" and "MONOCHROME1 inverted" in " ".join(cr.json()["image"]["notes"])
    _one_line_error(bad, 415)
    answer = ok.json()
    answer["cam"].pop("png_base64")  # base64 may spell anything
    server_log = [r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]  # not ours
    text = json.dumps(answer) + bad.text + "\n".join(server_log) + json.dumps(dict(ok.headers))
    for s in marker_strings():
        assert s not in text, s
    assert "privacy" not in text and "ZQX" not in text  # nor the upload's file name


@pytest.mark.slow
@pytest.mark.parametrize("name", BAD)
def test_bad_files_are_one_line_4xx(api, bad_corpus, name):
    from chestxray.imaging import ImageReadError, read_image

    _, client = api
    with pytest.raises(ImageReadError) as expected:
        read_image(bad_corpus[name].read_bytes())
    r = _predict(client, bad_corpus[name])
    assert _one_line_error(r, r.status_code) == str(expected.value) and r.status_code in (413, 415, 422)


@pytest.mark.slow
def test_bad_requests_are_one_line_4xx(api, data_dir):
    from chestxray.serve.limits import MAX_UPLOAD_BYTES

    _, client = api
    path = data_dir / NIH_IMAGE
    assert "Unknown label" in _one_line_error(_predict(client, path, cam="Nope"), 422)
    assert "not installed" in _one_line_error(_predict(client, path, model="nope"), 422)
    assert "heatmap scale" in _one_line_error(_predict(client, path, cam="Mass", scale="x"), 422)
    assert "alpha" in _one_line_error(_predict(client, path, alpha="abc"), 422)
    assert "multipart/form-data" in _one_line_error(client.post("/v1/predict", data={"model": MODELS[0]}), 422)
    assert "cam=LABEL" in _one_line_error(client.post("/v1/predict", files={"file": path.read_bytes()},
                                                      headers={"Accept": "image/png"}), 400)
    big = b"\0" * (MAX_UPLOAD_BYTES + 2**17)
    assert "too large" in _one_line_error(client.post("/v1/predict", files={"file": big}), 413)

    def streamed():  # no Content-Length: refused as the body passes the limit
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
        yield from (b"\0" * 2**20 for _ in range(MAX_UPLOAD_BYTES // 2**20 + 2))
        yield b"\r\n--b--\r\n"

    r = client.post("/v1/predict", content=streamed(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert "too large" in _one_line_error(r, 413)
    assert _one_line_error(client.get("/v1/predict"), 405)
    assert client.get("/healthz").status_code == 200  # the server still answers


@pytest.mark.slow
def test_a_full_queue_answers_503_and_nothing_hangs(api, data_dir, monkeypatch):
    """With every model slot taken and the queue before them full, a request is refused at once (503,
    Retry-After); the waiting one is answered as soon as a slot frees."""
    from chestxray.serve.limits import SLOTS

    _, client = api
    monkeypatch.setattr(SLOTS, "max_waiting", 1)
    for _ in range(SLOTS.n):
        SLOTS.acquire()
    try:
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(_predict, client, data_dir / NIH_IMAGE)
            deadline = time.monotonic() + 60
            while SLOTS.waiting < 1 and time.monotonic() < deadline:  # synchronisation, not a timing check
                time.sleep(0.01)
            refused = _predict(client, data_dir / NIH_IMAGE)
            assert "queue is full" in _one_line_error(refused, 503) and refused.headers["Retry-After"] == "1"
            for _ in range(SLOTS.n):
                SLOTS.release()
            assert waiting.result(timeout=120).status_code == 200
    finally:
        while SLOTS._free < SLOTS.n:  # whatever the test left held
            SLOTS.release()


def _examples() -> tuple[str, str]:
    """The bash and Python blocks of README's HTTP API section."""
    heading = f"\n{SECTION}\n"
    doc = next(p.read_text() for p in DOCS if p.is_file() and heading in p.read_text())
    section = re.split(r"\n(?:#{1,3} |---)", doc[doc.index(heading) + len(heading):])[0]  # to the next heading
    return (re.search(r"```bash\n(.*?)```", section, re.S).group(1),
            re.search(r"```python\n(.*?)```", section, re.S).group(1))


@pytest.mark.slow
def test_readme_examples_run_against_the_server(api, data_dir, tmp_path):
    """The README's curl and Python examples, as written (only the address is the test server's)."""
    import sys

    url, _ = api
    shutil.copy(data_dir / CHEST_CR, tmp_path / "film.dcm")
    bash, python = (block.replace("http://127.0.0.1:7860/", url) for block in _examples())
    if shutil.which("curl"):
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", bash], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        first, _ = json.JSONDecoder().raw_decode(done.stdout)  # curl's answers follow each other on one line
        assert len(first["probabilities"]) == 15 and '"status":"ok"' in done.stdout
        with Image.open(tmp_path / "effusion.png") as im:
            assert im.format == "PNG"
        (tmp_path / "effusion.png").unlink()
    done = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("[")  # the labels above threshold, printed
    with Image.open(tmp_path / "effusion.png") as im:
        assert im.format == "PNG"
