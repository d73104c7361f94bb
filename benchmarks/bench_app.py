"""End-to-end latency of the app's /predict endpoint through gradio_client, per model, against the predictor's own time.

    .venv/bin/python -m benchmarks.bench_app --n 20 [--image path] [--models resnet18,efficientnet_b0] [--download]

Serves the app on 127.0.0.1 (queue and concurrency as in production) on the real shipped weights of
``models.yaml`` when any are installed; otherwise on two tiny random-weight checkpoints, and says so
(those numbers measure the app's overhead, not a real model). Each request uploads the image,
decodes it, runs one forward pass (probabilities + every label's Grad-CAM) and returns the label
probabilities, table, overlay (JPEG), decoded film (PNG) and gallery. By default the client does not download
the output files (``download_files=False``; ``--download`` fetches them). Also times, in the same run, the
predictor's own work on the same file in process (``read_image`` + ``Predictor.analyze``) and prints the
ratio of the two p50s. Prints a markdown table of p50/p95.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

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

    import torch
    from gradio_client import Client, handle_file

    import app
    from chestxray.imaging import read_image

    demo = app.create_demo()
    demo.queue(default_concurrency_limit=app.CONCURRENCY, max_size=app.QUEUE_SIZE)
    _, url, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, max_file_size="25mb")
    client = Client(url, verbose=False, analytics_enabled=False,
                    download_files=str(Path(tmp.name) / "client") if args.download else False)
    names = [m for m in args.models.split(",") if m] or demo.service.available
    image = handle_file(args.image)
    rows = []
    try:
        for name in names:
            for _ in range(2):  # warm-up: first load, allocator, caches
                client.predict(image, name, args.method, 0.4, api_name="/predict")
            times = []
            for _ in range(args.n):
                t0 = time.perf_counter()
                client.predict(image, name, args.method, 0.4, api_name="/predict")
                times.append((time.perf_counter() - t0) * 1000)
            handler = []  # the same work called in-process: the app's own cost without HTTP/Gradio transport
            for _ in range(max(3, args.n // 2)):
                t0 = time.perf_counter()
                demo.service.predict(args.image, name, args.method, 0.4)
                handler.append((time.perf_counter() - t0) * 1000)
            own = []  # the predictor's own work on the same file: decode + analyze, in process
            predictor = demo.service.registry.get(name)
            for _ in range(max(5, args.n)):
                t0 = time.perf_counter()
                predictor.analyze(read_image(args.image))
                own.append((time.perf_counter() - t0) * 1000)
            card = demo.service.registry.card(name)
            rows.append((name, card.get("arch"), card.get("img_size"), np.percentile(times, 50),
                         np.percentile(times, 95), np.percentile(handler, 50), np.percentile(own, 50), len(times)))
    finally:
        client.close()
        demo.close()
        tmp.cleanup()

    device = "cuda: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"cpu ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"
    print(f"/predict latency, sequential requests via gradio_client; image {Path(args.image).name}; "
          f"method {args.method}; {device}; {platform.python_implementation()} {platform.python_version()}"
          f"{'; TINY random-weight models' if tiny else ''}\n")
    print("| model | arch | input px | /predict p50 ms | p95 ms | handler p50 ms | predictor p50 ms | "
          "/predict ÷ predictor | n |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, arch, size, p50, p95, h50, own, n in rows:
        print(f"| {name} | {arch} | {size} | {p50:.0f} | {p95:.0f} | {h50:.0f} | {own:.0f} | {p50 / own:.1f}x | {n} |")
    print(f"\np50/p95: client-side, upload to result (outputs {'downloaded' if args.download else 'not downloaded'}; "
          "client and server share this process). handler: the predict function called directly (decode, "
          "forward, overlays; no HTTP). predictor: read_image + Predictor.analyze on the same file, in process.")


if __name__ == "__main__":
    main()
