"""The Gradio app over its HTTP API (gradio_client), on two tiny real checkpoints, and the model registry."""
from __future__ import annotations

import csv
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch import nn

from chestxray.ckpt_config import CkptMeta, ReleaseMetrics, Training
from tests.badfiles import BAD, CHEST_CR, GOOD, NIH_IMAGE, PRIVACY_MARKERS
from tests.helpers import make_checkpoint

MODELS = ("tiny_eff", "tiny_res")
META = CkptMeta(
    training=Training(val_mean_auroc=0.6123, val_mean_auroc_ci=[0.58, 0.64], sources=["nih384"],
                      n_images={"train": 10, "val": 5}, split="patient", threshold_rule="youden", pretrained=False),
    # What `release` writes: one entry per test group, the balanced NIH films the headline.
    metrics=ReleaseMetrics(split="test", headline_group="reproduce_chexnet", mixed_group="nih384",
                        mean_auroc={"kermany": 0.9, "nih384": 0.7, "reproduce_chexnet": 0.6},
                        mean_auroc_ci={"kermany": [0.85, 0.95], "nih384": [0.65, 0.75],
                                       "reproduce_chexnet": [0.55, 0.65]},
                        n_test_images={"kermany": 30, "nih384": 60, "reproduce_chexnet": 40}))


def _yaml(path: Path, names, default=None, rev: str | None = "a" * 40) -> Path:
    """A models yaml naming ``names``, their Hub references pinned to ``rev`` (None: unpinned)."""
    lines = [f"default: {default or names[0]}", "models:"]
    lines += [f"  - {{name: {n}, hub: 'hf-hub:nobody/{n}{'@' + rev if rev else ''}', local: {n}}}" for n in names]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Two tiny checkpoints in a tmp weights dir, a models yaml naming them (and one missing), tmp Gradio dirs."""
    root = tmp_path_factory.mktemp("app")
    make_checkpoint(root / "weights" / "tiny_eff", arch="test_efficientnet", seed=0, meta=META)
    make_checkpoint(root / "weights" / "tiny_res", arch="resnet10t", seed=1)
    mp = pytest.MonkeyPatch()
    mp.setenv("CHESTXRAY_WEIGHTS", str(root / "weights"))
    mp.setenv("CHESTXRAY_MODELS", str(_yaml(root / "models.yaml", [*MODELS, "not_installed"])))
    mp.setenv("GRADIO_TEMP_DIR", str(root / "gradio_tmp"))
    mp.setenv("GRADIO_EXAMPLES_CACHE", str(root / "examples_cache"))
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def served(env):
    """(app module, demo, client) with the demo built on the tmp models and served on a free port."""
    import app
    from gradio_client import Client

    demo = app.create_demo()  # reads $CHESTXRAY_MODELS / $CHESTXRAY_WEIGHTS now
    _, url, _ = app.launch(demo, server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    client = Client(url, verbose=False, analytics_enabled=False, download_files=str(env / "client"))
    yield app, demo, client
    client.close()
    demo.close()


@pytest.fixture(scope="module")
def forwards(served):
    """Counts forward passes of each loaded model (a hook on its first convolution)."""
    _, demo, _ = served
    counts = {}
    for name in MODELS:
        model = demo.service.registry.get(name).model
        conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        counts[name] = 0
        conv.register_forward_hook(lambda *_, n=name: counts.__setitem__(n, counts[n] + 1))
    return counts


def _probs(label_output: dict) -> dict[str, float]:
    return {c["label"]: c["confidence"] for c in label_output["confidences"]}


def test_api_endpoints(served):
    _, _, client = served
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/predict", "/explain", "/compare", "/compare_overlay", "/batch", "/model_card", "/window",
            "/report"} <= set(api)
    assert [p["parameter_name"] for p in api["/predict"]["parameters"]][:2] == ["file", "model"]
    assert api["/predict"]["returns"][0]["component"] == "Label"


def test_queue_polls_at_the_apps_interval(served):
    """The polling knob app.tune_queue sets is the one Gradio's queue loop reads (a rename would void it)."""
    import inspect

    from gradio.queueing import Queue

    app, demo, _ = served
    assert "await asyncio.sleep(self.sleep_when_free)" in inspect.getsource(Queue.start_processing)
    assert demo._queue.sleep_when_free == app.QUEUE_POLL_S == 0.005


def test_predict_png_matches_predictor(served, data_dir, forwards):
    from gradio_client import handle_file

    from chestxray.predictor import Predictor
    from chestxray.serve.service import MAX_GALLERY

    _, demo, client = served
    path = data_dir / NIH_IMAGE
    before = forwards["tiny_eff"]
    out = client.predict(handle_file(str(path)), "tiny_eff", "gradcam", 0.4, api_name="/predict")
    assert forwards["tiny_eff"] == before + 1  # probabilities and every label's map from one forward
    probs = _probs(out[0])
    reference = Predictor.load(demo.service.registry.folder("tiny_eff")).predict(path)
    assert list(probs) == sorted(reference, key=lambda k: -reference[k])  # every label, most probable first
    assert all(0.0 <= p <= 1.0 for p in probs.values())
    assert max(abs(probs[k] - reference[k]) for k in reference) < 1e-4
    table, overlay_path, caption = out[1], out[2], out[3]
    assert all(f">{k}<" in table for k in reference) and "above threshold" in table
    top = out[0]["label"]
    assert top in caption and f"{probs[top]:.3f}" in caption
    with Image.open(overlay_path) as im:
        assert im.format == "JPEG" and im.mode == "RGB"  # heatmaps as JPEG, the film lossless
    assert len(out) == 7 and "PNG" in out[6]  # the film and the gallery are not drawn for the answer
    film, gallery = client.predict(0.4, api_name="/extras")  # what the page asks for next, from the state
    assert forwards["tiny_eff"] == before + 1
    with Image.open(film) as im:
        assert im.format == "PNG" and im.size == (384, 384)  # the decoded film shown back
    above = sorted((k for k in reference if reference[k] >= 0.5), key=lambda k: -probs[k])  # tiny_eff: 0.5 each
    assert above and [g["caption"] for g in gallery] == [f"{k} {probs[k]:.2f}" for k in above][:MAX_GALLERY]


def test_predict_dicom(served, data_dir, bad_corpus):
    from gradio_client import handle_file

    _, _, client = served
    out = client.predict(handle_file(str(data_dir / CHEST_CR)), "tiny_res", api_name="/predict")
    probs = _probs(out[0])
    assert len(probs) == 15 and all(0.0 <= p <= 1.0 for p in probs.values())
    assert "DICOM" in out[6] and "MONOCHROME1 inverted" in out[6]
    # a DICOM with identifying header values: none of them may reach any output
    out = client.predict(handle_file(str(bad_corpus["privacy.dcm"])), "tiny_res", api_name="/predict")
    text = repr(out) + repr(client.predict(0.4, api_name="/extras"))  # the film and gallery drawn after it too
    assert not any(v.split("^")[0] in text for v in PRIVACY_MARKERS.values())


@pytest.mark.parametrize("name", BAD)
def test_bad_file_is_one_line_error(served, bad_corpus, data_dir, name):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    from chestxray.imaging import ImageReadError, read_image

    _, _, client = served
    with pytest.raises(ImageReadError) as expected:
        read_image(bad_corpus[name])
    with pytest.raises(AppError) as err:
        client.predict(handle_file(str(bad_corpus[name])), "tiny_eff", api_name="/predict")
    message = str(err.value)
    assert "\n" not in message and str(expected.value) in message and "Traceback" not in message
    out = client.predict(handle_file(str(data_dir / NIH_IMAGE)), "tiny_eff", api_name="/predict")
    assert len(out[0]["confidences"]) == 15  # the server still answers


@pytest.mark.parametrize("name", GOOD)
def test_odd_but_valid_files_are_predicted(served, bad_corpus, name):
    from gradio_client import handle_file

    _, _, client = served
    out = client.predict(handle_file(str(bad_corpus[name])), "tiny_eff", api_name="/predict")
    assert len(out[0]["confidences"]) == 15


def test_overlay_changes_run_no_forward(served, data_dir, forwards):
    from gradio_client import handle_file

    _, _, client = served
    out = client.predict(handle_file(str(data_dir / NIH_IMAGE)), "tiny_eff", api_name="/predict")
    count = forwards["tiny_eff"]
    first = client.predict("Effusion", "gradcam", 0.3, api_name="/explain")
    second = client.predict("Effusion", "gradcam", 0.8, api_name="/explain")
    third = client.predict("Cardiomegaly", "hirescam", 0.5, api_name="/explain")
    assert forwards["tiny_eff"] == count  # label, opacity and fast-method changes reuse the stored analysis
    assert "Effusion" in first[1] and "Cardiomegaly" in third[1]
    a, b = (np.asarray(Image.open(p)) for p in (first[0], second[0]))
    assert a.shape == b.shape and not np.array_equal(a, b)  # the opacity took effect
    assert out[0]["label"] in out[3]
    # The heatmap scale is drawing only: per-label range vs scaled by probability, no forward either way.
    probs = _probs(out[0])
    film = np.asarray(Image.open(client.predict(0.4, api_name="/extras")[0]).convert("RGB"), float)

    def change(path):  # how far an overlay moves the film's pixels (left of the colour bar)
        return np.abs(np.asarray(Image.open(path), float)[:, :film.shape[1]] - film).mean()

    # the least probable label whose map is not flat (a random model can give an all-negative map)
    low, mm = next((k, r) for k in sorted(probs, key=probs.get)
                   if change((r := client.predict(k, "gradcam", 0.8, "minmax", api_name="/explain"))[0]) > 1)
    scaled = client.predict(low, "gradcam", 0.8, "probability", api_name="/explain")
    assert forwards["tiny_eff"] == count
    assert "per-label range" in mm[1] and "scaled by probability" in scaled[1] and "Colour bar" in scaled[1]
    assert np.asarray(Image.open(mm[0])).shape[1] > film.shape[1]  # the colour bar on the right edge
    assert change(scaled[0]) < probs[low] * change(mm[0]) + 1  # the low-p label is drawn faint
    client.predict("Effusion", "gradcam++", 0.4, api_name="/explain")  # one forward + backward: expected
    count = forwards["tiny_eff"]
    client.predict("Effusion", "gradcam++", 0.7, api_name="/explain")  # the map is kept: opacity is free
    client.predict("Effusion", "gradcam++", 0.7, "probability", api_name="/explain")  # and so is the scale
    assert forwards["tiny_eff"] == count
    # Boxes are drawn from the stored map: outlines on the same overlay, no forward either.
    plain = client.predict(low, "gradcam", 0.4, "minmax", False, api_name="/explain")
    boxed = client.predict(low, "gradcam", 0.4, "minmax", True, api_name="/explain")
    client.predict("Effusion", "gradcam++", 0.4, "minmax", True, api_name="/explain")  # the kept map, boxed
    assert forwards["tiny_eff"] == count
    a, b = (np.asarray(Image.open(r[0]).convert("RGB")) for r in (plain, boxed))
    moved = np.any(a != b, axis=2)
    assert a.shape == b.shape and 0 < moved.mean() < 0.1  # thin outlines, the film still readable
    assert "Boxes:" in boxed[1] and "Boxes:" not in plain[1]


def test_window_and_report_run_no_forward(served, data_dir, forwards):
    """Re-windowing a DICOM and exporting the report draw from the stored analysis: no forward pass."""
    from gradio_client import handle_file

    from tests.test_report import pdf_text

    _, _, client = served
    out = client.predict(handle_file(str(data_dir / CHEST_CR)), "tiny_eff", "gradcam", 0.6, api_name="/predict")
    count = forwards["tiny_eff"]
    stored = np.asarray(Image.open(out[2]))
    lung = client.predict("Lung", 0, 1, api_name="/window")
    custom = client.predict("Custom", 5000, 4000, api_name="/window")
    back = client.predict("Stored window", 0, 1, api_name="/window")
    assert lung[0] == "Lung" and custom[0] == "Custom" and back[0] == "Stored window"
    assert (custom[1], custom[2]) == (5000, 4000) and (back[1], back[2]) == (15000, 30000)  # the file's window
    images = [np.asarray(Image.open(r[3])) for r in (lung, custom, back)]
    assert all(im.shape == stored.shape for im in images)
    assert not np.array_equal(images[0], stored) and not np.array_equal(images[1], images[0])
    assert np.array_equal(images[2], stored)  # back to the decoded film, exactly
    client.predict("Lung", 0, 1, api_name="/window")
    client.predict("Effusion", "gradcam", 0.3, "probability", api_name="/explain")  # label change keeps the window
    pdf, js = client.predict(api_name="/report")
    assert forwards["tiny_eff"] == count  # windowing, a label change and the report: no model run
    raw = Path(pdf).read_bytes()
    assert raw.startswith(b"%PDF") and b"(Effusion)" in pdf_text(raw) and b"(Cardiomegaly)" in pdf_text(raw)
    data = json.loads(Path(js).read_text())
    assert data["model"]["name"] == "tiny_eff" and data["model"]["arch"] == "test_efficientnet"
    assert "0.600" in data["model"]["summary"]  # the card's headline AUROC
    assert set(data["probabilities"]) == set(data["thresholds"]) and len(data["probabilities"]) == 15
    assert max(abs(data["probabilities"][k] - v) for k, v in _probs(out[0]).items()) < 1e-5
    assert data["view"]["label"] == "Effusion" and data["view"]["scale"] == "probability"
    assert data["view"]["window"].startswith("Lung") and data["image"]["modality"] == "CR"


def test_report_has_no_patient_data_and_8bit_has_no_window(served, data_dir, bad_corpus):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    from tests.test_report import marker_strings, pdf_text

    _, _, client = served
    client.predict(handle_file(str(bad_corpus["privacy.dcm"])), "tiny_res", api_name="/predict")
    client.predict("Mediastinum", 0, 1, api_name="/window")
    pdf, js = client.predict(api_name="/report")
    text, doc = pdf_text(Path(pdf).read_bytes()), Path(js).read_text()
    assert b"(Atelectasis)" in text and "Atelectasis" in doc
    for s in marker_strings():
        assert s.encode() not in text and s not in doc, s
    assert "privacy" not in doc and b"privacy" not in text  # nor the uploaded file's name
    client.predict(handle_file(str(data_dir / NIH_IMAGE)), "tiny_res", api_name="/predict")
    with pytest.raises(AppError, match="DICOM or 16-bit"):
        client.predict("Lung", 0, 1, api_name="/window")


def test_compare(served, data_dir, forwards):
    from gradio_client import handle_file

    _, _, client = served
    table, gallery, _, notes = client.predict(handle_file(str(data_dir / NIH_IMAGE)), None, 0.4,
                                              api_name="/compare")
    assert table["headers"] == ["label", *MODELS]  # one column per installed model
    assert len(table["data"]) == 15
    assert all(0.0 <= v <= 1.0 for row in table["data"] for v in row[1:])
    assert len(gallery) == 2 and all(m in notes for m in MODELS)
    count = dict(forwards)
    gallery = client.predict("Hernia", 0.5, api_name="/compare_overlay")
    assert forwards == count and len(gallery) == 2 and all("Hernia" in g["caption"] for g in gallery)
    gallery = client.predict("Hernia", 0.5, "probability", api_name="/compare_overlay")
    assert forwards == count and all("scaled by probability" in g["caption"] for g in gallery)


def test_batch_csv(served, data_dir, bad_corpus):
    from gradio_client import handle_file

    from chestxray.labels import get_label_set

    _, _, client = served
    files = [data_dir / NIH_IMAGE, data_dir / CHEST_CR, bad_corpus["text.png"]]
    csv_path, preview = client.predict([handle_file(str(f)) for f in files], "tiny_eff", api_name="/batch")
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    labels = get_label_set("nih14")
    assert list(rows[0]) == ["file", *labels, "warning", "error"]
    assert [r["file"] for r in rows] == [f.name for f in files]
    for r in rows[:2]:
        assert r["error"] == "" and all(0.0 <= float(r[k]) <= 1.0 for k in labels)
    assert rows[2]["error"].startswith("not a readable image") and rows[2]["Atelectasis"] == ""
    assert len(preview["data"]) == 3


def test_model_card(served):
    _, _, client = served
    card = client.predict("tiny_eff", api_name="/model_card")
    assert "0.612" in card and "0.580-0.640" in card and "youden" in card
    balanced = card.index("Test, NIH, label-balanced films (reproduce_chexnet sample): mean AUROC **0.600** "
                          "(95% CI 0.550-0.650) on 40 images")
    assert balanced < card.index("Test, NIH, all 384-px test films (mixed): mean AUROC **0.700**")
    assert card.index("Test, Kermany pediatric (children): mean AUROC **0.900**") > balanced
    card = client.predict("tiny_res", api_name="/model_card")  # no training block: still a card
    assert "resnet10t" in card and "Operating thresholds" in card


@pytest.mark.slow  # builds and serves the Gradio demo
def test_no_model_installed(env, tmp_path, data_dir, monkeypatch):
    import app
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from chestxray.registry import NO_MODEL, ModelRegistry

    monkeypatch.setenv("CHESTXRAY_WEIGHTS", str(tmp_path / "empty"))
    demo = app.create_demo(ModelRegistry.from_yaml(Path(app.HERE) / "models.yaml"))
    assert demo.service.available == [] and demo.service.default is None
    _, url, _ = app.launch(demo, server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        client = Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path / "dl"))
        assert NO_MODEL in json.dumps(client.config)  # the page says so plainly
        for args, api in (((handle_file(str(data_dir / NIH_IMAGE)), None), "/predict"),
                          ((handle_file(str(data_dir / NIH_IMAGE)),), "/compare")):
            with pytest.raises(AppError) as err:
                client.predict(*args, api_name=api)
            assert str(err.value).strip() == NO_MODEL
        client.close()
    finally:
        demo.close()


# -- registry -----------------------------------------------------------------------------------
def test_registry_available_default_and_single_load(env, monkeypatch):
    from chestxray import registry as reg

    r = reg.ModelRegistry.from_yaml(_yaml(env / "r.yaml", ["absent", "tiny_res", "tiny_eff"], default="absent"))
    assert r.available() == ["tiny_res", "tiny_eff"] and r.default() == "tiny_res"
    import chestxray.checkpoint as ckpt  # the registry imports load_folder from there on the first load

    calls = []
    real = ckpt.load_folder
    monkeypatch.setattr(ckpt, "load_folder", lambda f: (calls.append(f), real(f))[1])
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: r.get("tiny_res"), range(4)))
    assert len(calls) == 1 and all(p is got[0] for p in got)
    assert r.loaded() == ["tiny_res"]
    with pytest.raises(ValueError, match="unknown model"):
        r.get("nope")
    bad = env / "bad.yaml"
    bad.write_text("models:\n  - {name: x, local: ../x}\n")
    with pytest.raises(ValueError, match="folder name"):
        reg.ModelRegistry.from_yaml(bad)
    assert reg.ModelRegistry([]).available() == [] and reg.ModelRegistry([]).default() is None


def test_registry_hf_cache(env, tmp_path, monkeypatch):
    """A Hub repo already in the HF cache is available and loads offline (no shipped folder)."""
    import shutil

    from huggingface_hub import constants

    from chestxray.registry import ModelRegistry

    snap = tmp_path / "hub" / "models--nobody--cached" / "snapshots" / ("a" * 40)
    shutil.copytree(env / "weights" / "tiny_eff", snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    r = ModelRegistry.from_yaml(_yaml(tmp_path / "m.yaml", ["cached"]))
    assert r.available() == ["cached"]
    assert r.get("cached").ckpt.path == snap
    card = r.card("cached")
    assert card["arch"] == "test_efficientnet" and card["val_mean_auroc"] == pytest.approx(0.6123)
    first = next(iter(card["metrics"]))  # the balanced NIH films come first
    assert first == "test, NIH, label-balanced films (reproduce_chexnet sample)"
    assert card["metrics"][first] == {"mean_auroc": 0.6, "mean_auroc_ci": [0.55, 0.65], "n_images": 40}
    assert len(card["metrics"]) == 3 and len(card["thresholds"]) == 15


def test_registry_never_follows_an_unpinned_hub_reference(env, tmp_path, monkeypatch, caplog):
    """An unpinned reference is ignored, even when cached (one log line): the shipped folder is used."""
    import shutil

    from huggingface_hub import constants

    from chestxray import hub
    from chestxray.registry import ModelRegistry

    snap = tmp_path / "hub" / "models--nobody--tiny_res" / "snapshots" / ("b" * 40)
    shutil.copytree(env / "weights" / "tiny_eff", snap)  # the "newest upload" differs from the shipped folder
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("b" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "download", lambda *a, **k: pytest.fail("an unpinned reference was followed"))
    r = ModelRegistry.from_yaml(_yaml(tmp_path / "m.yaml", ["tiny_res", "cached_only"], rev=None))
    assert r.available() == ["tiny_res"]  # cached_only exists only in the cache, unpinned: not offered
    with caplog.at_level("WARNING", logger="chestxray.registry"):
        assert r.folder("tiny_res") == env / "weights" / "tiny_res"
        r.folder("tiny_res")
    lines = [rec.getMessage() for rec in caplog.records if "not pinned" in rec.getMessage()]
    assert len(lines) <= 1 and all("hf-hub:nobody/tiny_res" in m for m in lines)
    with pytest.raises(ValueError, match="not pinned to a commit and there is no"):
        r.folder("cached_only")
    assert hub.is_pinned("hf-hub:org/x@" + "0" * 40) and not hub.is_pinned("hf-hub:org/x@main")
    assert not hub.is_pinned("hf-hub:org/x") and hub.split_repo("hf-hub:org/x@" + "0" * 40)[1] == "0" * 40


def test_card_panel_shows_test_auroc(env):
    """The panel's text from the block the writer stored: balanced test films first, then the mixed set."""
    from chestxray.registry import ModelRegistry
    from chestxray.serve.text import card_markdown

    text = card_markdown(ModelRegistry.from_yaml().card("tiny_eff"))
    balanced = text.index("Test, NIH, label-balanced films (reproduce_chexnet sample): mean AUROC **0.600** "
                          "(95% CI 0.550-0.650) on 40 images.")
    assert balanced < text.index("Test, NIH, all 384-px test films (mixed): mean AUROC **0.700**")
    assert "Validation mean AUROC: 0.612 (95% CI 0.580-0.640)" in text


def test_registry_card_is_defensive(env, tmp_path, monkeypatch):
    import shutil

    from chestxray.registry import ModelRegistry

    weights = tmp_path / "w"
    shutil.copytree(env / "weights" / "tiny_res", weights / "odd")
    cfg = json.loads((weights / "odd" / "config.json").read_text())
    cfg["chestxray"] = {"thresholds": {"Atelectasis": "x", "Edema": 0.3}, "training": "garbage", "metrics": [1]}
    (weights / "odd" / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setenv("CHESTXRAY_WEIGHTS", str(weights))
    card = ModelRegistry.from_yaml(_yaml(tmp_path / "m.yaml", ["odd"])).card("odd")
    assert card["thresholds"] == {"Edema": 0.3} and "val_mean_auroc" not in card and "metrics" not in card


def test_input_gate_warning_is_shown(served, data_dir, monkeypatch):
    """Warnings the predictor attaches (e.g. the input gate's) reach the page and the batch CSV."""
    from gradio_client import handle_file

    from chestxray.predictor import Predictor

    _, _, client = served
    real = Predictor.analyze
    text = "This does not look like a frontal chest X-ray"
    monkeypatch.setattr(Predictor, "analyze",
                        lambda self, image, *args, **kw: (a := real(self, image, *args, **kw), a.warnings.append(text))[0])
    out = client.predict(handle_file(str(data_dir / NIH_IMAGE)), "tiny_eff", api_name="/predict")
    assert out[5]["visible"] is True and text in out[5]["value"]
    csv_path, _ = client.predict([handle_file(str(data_dir / NIH_IMAGE))], "tiny_eff", api_name="/batch")
    with open(csv_path, newline="") as fh:
        assert next(csv.DictReader(fh))["warning"] == text


def test_caption_carries_each_methods_note(env, data_dir):
    """A method's caveat (the CAM table's ``note``, e.g. EigenCAM's) is shown with its map, and only with it."""
    from chestxray.cam import CAM_METHODS
    from chestxray.predictor import Predictor
    from chestxray.serve.text import caption

    a = Predictor.load(env / "weights" / "tiny_res", device="cpu").analyze(data_dir / NIH_IMAGE)
    notes = [n for n in {s.note for s in CAM_METHODS.values()} if n]
    assert notes  # the table has at least one caveat to show
    for method, spec in CAM_METHODS.items():
        text = caption(a, "Effusion", method)
        assert [n for n in notes if n in text] == ([spec.note] if spec.note else [])


def test_service_errors_reach_the_page_as_one_line(env):
    """The page shows the service's one-line ServiceError as gr.Error (chestxray.serve's own tests cover the rest)."""
    import gradio as gr

    import app
    from chestxray.serve.errors import user_errors

    @app.shown
    @user_errors
    def fails():
        raise ValueError("not a readable image\nsecond line")

    with pytest.raises(gr.Error, match="not a readable image") as err:
        fails()
    assert "second line" not in str(err.value)


def test_page_panels_follow_the_film(env, data_dir):
    """After an analysis the page shows the window/level panel only for a DICOM (its sliders narrowed to the film's
    stored values), else the one line "shown as stored"; the report outputs stay hidden until a report is made."""
    import app
    from chestxray.registry import ModelRegistry
    from chestxray.serve.service import Service

    ev = app.Events(Service(ModelRegistry.from_yaml(), warm_up=False))
    png = ev.svc.predict(str(data_dir / NIH_IMAGE), "tiny_eff").state
    panel, preset, center, width, note, report = ev.panels(png)
    assert panel["visible"] is False and preset["value"] == "Stored window"
    assert "minimum" not in center and "minimum" not in width  # no controls for an 8-bit film
    assert note["visible"] is True and note["value"] == "8-bit PNG film: shown as stored."
    assert report["visible"] is False
    dicom = ev.svc.predict(str(data_dir / CHEST_CR), "tiny_eff").state
    panel, preset, center, width, note, report = ev.panels(dicom)
    assert panel["visible"] is True and preset["value"] == "Stored window" and report["visible"] is False
    assert (center["value"], width["value"]) == (15000, 30000)  # the file's own window
    assert center["minimum"] < center["value"] < center["maximum"] and center["maximum"] - center["minimum"] < 1e5
    assert width["minimum"] == 1 and width["maximum"] < 2 * app.WINDOW_LIMIT
    assert note["visible"] is True and note["value"].startswith("Display only")
    assert ev.report_outputs(dicom)["visible"] is False
    pdf, _ = ev.report(dicom)
    assert Path(pdf).is_file() and ev.report_outputs(dicom)["visible"] is True
    assert ev.panels(ev.svc.predict(str(data_dir / CHEST_CR), "tiny_eff").state)[-1]["visible"] is False  # new film
    assert ev.panels(None)[0]["visible"] is False and ev.panels(None)[4]["visible"] is False  # nothing analysed


@pytest.mark.slow
def test_importing_the_app_and_exiting_at_once_is_clean():
    """``import app`` starts loading the shipped default model in the background; a process that exits
    right away (a script, a test collector) must wait for it, not abort inside torch (exit 134)."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    done = subprocess.run([sys.executable, "-c", "import app"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
