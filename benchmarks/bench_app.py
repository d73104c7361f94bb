"""End-to-end latency of the app's /predict endpoint through gradio_client, per model, against the predictor's own time.

    .venv/bin/python -m benchmarks.bench_app --n 20 [--image path] [--models resnet18,efficientnet_b0] [--download]

Serves the app on 127.0.0.1 (queue and concurrency as in production) on the real shipped weights of
``models.yaml`` when any are installed; otherwise on two tiny random-weight checkpoints, and says so
(those numbers measure the app's overhead, not a real model). Each request uploads the image,
decodes it, runs one forward pass (probabilities + every label's Grad-CAM) and returns the label
probabilities, table, overlay (JPEG) and caption (the page then asks /extras for the decoded film and the
gallery; API clients need not). By default the client does not download the output files
(``download_files=False``; ``--download`` fetches them). Also times, in the same run, the predictor's own
work on the same file in process (``read_image`` + ``Predictor.analyze``) and prints the ratio of the p50s.

Two clients: gradio_client, and Gradio's plain HTTP API (upload, ``POST /gradio_api/call/predict``, read
the event stream: what ``curl`` does) over one kept-alive connection. The same two clients also call a
do-nothing endpoint with the same inputs and the same file (served beside the app): the floor that no
work in the app can go below. Prints a markdown table of p50/p95.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from chestxray.layout import default_data_root  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = Path(default_data_root())
#: A 1024-px NIH film, as a user would upload it (falls back to a 384-px example).
DEFAULT_IMAGE = next((p for p in (DATA / "nih/full_res/00000100_000.png",) if p.is_file()),
                     REPO / "examples" / "00001369_000.png")


def tiny_models(root: Path) -> None:
    """Two tiny random-weight checkpoints and a models yaml naming them (used when nothing is installed)."""
    from tests.helpers import make_checkpoint

    for name, arch in (("tiny_efficientnet", "test_efficientnet"), ("tiny_resnet10t", "resnet10t")):
        make_checkpoint(root / "weights" / name, arch=arch, img_size=64)
    (root / "models.yaml").write_text("default: tiny_efficientnet\nmodels:\n"
                                      "  - {name: tiny_efficientnet, local: tiny_efficientnet}\n"
                                      "  - {name: tiny_resnet10t, local: tiny_resnet10t}\n")
    os.environ["CHESTXRAY_WEIGHTS"] = str(root / "weights")
    os.environ["CHESTXRAY_MODELS"] = str(root / "models.yaml")


def floor_demo():
    """A do-nothing endpoint with /predict's inputs: file, model, method, opacity in; a constant label out."""
    import gradio as gr

    with gr.Blocks() as demo:
        inputs = [gr.File(type="filepath"), gr.Textbox(), gr.Textbox(), gr.Number()]
        out = gr.Label()
        gr.Button().click(lambda *a: {"nothing": 1.0}, inputs, out, api_name="predict")
    return demo


def http_predict(http, url: str, path: str, *args) -> list:
    """/predict through Gradio's HTTP API: upload the file, start the call, read its event stream to the end."""
    import json

    with open(path, "rb") as fh:
        uploaded = http.post(f"{url}gradio_api/upload", files={"files": (Path(path).name, fh)}).json()[0]
    data = [{"path": uploaded, "meta": {"_type": "gradio.FileData"}}, *args]
    event = http.post(f"{url}gradio_api/call/predict", json={"data": data}).json()["event_id"]
    with http.stream("GET", f"{url}gradio_api/call/predict/{event}") as r:
        kind = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind in ("complete", "error"):
                if kind == "error":
                    raise RuntimeError(f"/predict failed: {line[5:].strip()[:200]}")
                return json.loads(line[5:])
    raise RuntimeError("/predict: the event stream ended without a result")


def timed_ms(fn, n: int) -> tuple[float, float]:
    """(p50, p95) milliseconds of ``n`` calls of ``fn`` after 2 untimed ones (first load, caches)."""
    from benchmarks.bench_inference import timed

    return tuple(1000 * t for t in timed(fn, n, warmup=2))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20, help="timed requests per model (after 2 warm-up requests)")
    ap.add_argument("--image", default=str(DEFAULT_IMAGE), help="image or DICOM to send")
    ap.add_argument("--models", default="", help="comma list (default: every installed model)")
    ap.add_argument("--method", default="gradcam", help="CAM method sent with each request")
    ap.add_argument("--tiny", action="store_true", help="use tiny random-weight models even if real ones exist")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--download", action="store_true", help="download every output file (default: not)")
    args = ap.parse_args(argv)

    if args.threads:
        os.environ["CHESTXRAY_TORCH_THREADS"] = str(args.threads)  # applied by app at import
    tmp = tempfile.TemporaryDirectory(prefix="bench_app_")
    os.environ.setdefault("GRADIO_TEMP_DIR", str(Path(tmp.name) / "gradio"))
    from chestxray.registry import ModelRegistry

    tiny = args.tiny or not ModelRegistry.from_yaml().available()
    if tiny:
        print("No trained model installed (or --tiny): timing TINY RANDOM-WEIGHT models (64 px); "
              "these numbers are the app's overhead, not a real model's latency.\n")
        tiny_models(Path(tmp.name))

    import httpx
    import torch
    from gradio_client import Client, handle_file

    import app
    from chestxray.imaging import read_image

    demo = app.create_demo()
    _, url, _ = app.launch(demo, server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    floor = floor_demo().queue()
    _, floor_url, _ = floor.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    opts = dict(verbose=False, analytics_enabled=False)
    client = Client(url, download_files=str(Path(tmp.name) / "client") if args.download else False, **opts)
    floor_client = Client(floor_url, download_files=False, **opts)
    http = httpx.Client(timeout=120)
    names = [m for m in args.models.split(",") if m] or demo.service.available
    image = handle_file(args.image)
    rows = []
    try:
        floors = (timed_ms(lambda: floor_client.predict(image, "x", "y", 0.4, api_name="/predict"), args.n),
                  timed_ms(lambda: http_predict(http, floor_url, args.image, "x", "y", 0.4), args.n))
        for name in names:
            p50, p95 = timed_ms(lambda: client.predict(image, name, args.method, 0.4, api_name="/predict"), args.n)
            plain, _ = timed_ms(lambda: http_predict(http, url, args.image, name, args.method, 0.4, "minmax",
                                                     False), args.n)
            # the same work called in-process: the app's own cost without HTTP/Gradio transport
            handler, _ = timed_ms(lambda: demo.service.predict(args.image, name, args.method, 0.4),
                                  max(3, args.n // 2))
            predictor = demo.service.registry.get(name)
            # the predictor's own work on the same file: decode + analyze, in process
            own, _ = timed_ms(lambda: predictor.analyze(read_image(args.image)), max(5, args.n))
            card = demo.service.registry.card(name)
            rows.append((name, card.get("arch"), card.get("img_size"), p50, p95, plain, handler, own, args.n))
    finally:
        http.close()
        client.close()
        floor_client.close()
        demo.close()
        floor.close()
        tmp.cleanup()

    device = "cuda: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"cpu ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"
    print(f"/predict latency, sequential requests via gradio_client; image {Path(args.image).name}; "
          f"method {args.method}; {device}; {platform.python_implementation()} {platform.python_version()}"
          f"{'; TINY random-weight models' if tiny else ''}\n")
    print("| model | arch | input px | gradio_client p50 ms | p95 ms | HTTP API p50 ms | handler p50 ms | "
          "predictor p50 ms | gradio_client ÷ predictor | HTTP API ÷ predictor | n |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, arch, size, p50, p95, h50, hand, own, n in rows:
        print(f"| {name} | {arch} | {size} | {p50:.0f} | {p95:.0f} | {h50:.0f} | {hand:.0f} | {own:.0f} | "
              f"{p50 / own:.1f}x | {h50 / own:.1f}x | {n} |")
    print(f"| (do-nothing endpoint, same inputs and file) | | | {floors[0][0]:.0f} | {floors[0][1]:.0f} | "
          f"{floors[1][0]:.0f} | | | | | {args.n} |")
    print(f"\np50/p95: client-side, upload to result (outputs {'downloaded' if args.download else 'not downloaded'}; "
          "clients and servers share this process). HTTP API: upload + /gradio_api/call/predict + its event "
          "stream over one kept-alive httpx connection. handler: the predict function called directly (decode, "
          "forward, overlay; no HTTP). predictor: read_image + Predictor.analyze on the same file, in process. "
          "The do-nothing row is each client's floor: what it costs before the app does any work.")


if __name__ == "__main__":
    main()
