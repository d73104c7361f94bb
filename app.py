"""Gradio demo of the chest X-ray toolkit: upload a film (PNG/JPEG/DICOM), get per-label probabilities
and Grad-CAM maps; compare the installed models; score a batch of files into a CSV.

The page and its events only: the handlers, limits, output files and sessions are the library's
(``chestxray.serve``), and so is the plain HTTP API served beside the page (``/v1/predict``, ``/v1/models``,
``/healthz``; docs at ``/v1/docs``). Run ``python app.py`` (``GRADIO_SERVER_NAME=0.0.0.0`` to serve on the
network). ``$CHESTXRAY_MODELS`` picks another model list, ``$CHESTXRAY_WEIGHTS`` another weights folder. Gradio
API: ``/predict``, ``/explain``, ``/compare``, ``/compare_overlay``, ``/batch``, ``/model_card``, ``/window``,
``/report`` (see "Use via API" at the page's foot).
"""
from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from chestxray.serve import runtime  # noqa: E402

runtime.limit_malloc_arenas()  # before the web server starts its threads: arenas are made per thread

import functools  # noqa: E402
import html  # noqa: E402
import logging  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402

from chestxray.cam_methods import METHOD_TITLES, METHODS  # noqa: E402
from chestxray.registry import NO_MODEL, ModelRegistry  # noqa: E402
from chestxray.serve import rest  # noqa: E402
from chestxray.serve.errors import ServiceError  # noqa: E402
from chestxray.serve.limits import MAX_BATCH, MAX_UPLOAD_BYTES, QUEUE_SIZE  # noqa: E402
from chestxray.serve.runtime import CONCURRENCY  # noqa: E402
from chestxray.serve.service import Service  # noqa: E402
from chestxray.serve.sessions import SESSIONS, STATE_TTL  # noqa: E402
from chestxray.serve.text import DISCLAIMER, SCALE_NAMES  # noqa: E402
from chestxray.windowing import CUSTOM, PRESETS, STORED  # noqa: E402

HERE = Path(__file__).resolve().parent
EXAMPLES_DIR = HERE / "examples"
#: Example files and their labels in the NIH label file (see examples/ATTRIBUTION.md).
EXAMPLES = {"00001369_000.png": "Cardiomegaly", "00012628_000.png": "Effusion",
            "00001968_000.png": "Pneumothorax", "00000550_000.png": "No Finding"}
TITLE = "Chest X-ray findings: research demo"
#: gr.Label shows (and the API returns) this many labels: more than any label set, so all of them.
NUM_TOP = 32
#: Largest |window centre| the window sliders accept (stored values: 16-bit, HU and rescaled values fit).
WINDOW_LIMIT = 1_000_000
#: How often Gradio's queue looks for a free worker while requests wait. Gradio polls every 1 ms, which on
#: 2 cores under 16 clients kept its event loop busy (py-spy: ~20% of a core in select); 5 ms gave +8%
#: requests/s in bench_load (5.53 -> 5.98) for at most 5 ms more wait before a request starts.
QUEUE_POLL_S = float(os.environ.get("CHESTXRAY_QUEUE_POLL_S", 0.005))


def tune_queue(demo: gr.Blocks) -> None:
    """Sets the queue's polling interval (:data:`QUEUE_POLL_S`); call after ``demo.queue()``."""
    demo._queue.sleep_when_free = QUEUE_POLL_S  # Gradio's own knob (tests/test_app.py checks it still exists)


# -- the page's events: the service's plain answers as Gradio outputs ----------------------------------
def shown(fn):
    """The service's one-line :class:`ServiceError` as the page's ``gr.Error`` (never a traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ServiceError as err:
            raise gr.Error(str(err), print_exception=False) from None

    return wrapper


class Events:
    """The page's event handlers over one :class:`Service`: Gradio updates around its plain results."""

    def __init__(self, svc: Service):
        self.svc = svc
        for name in ("extras", "explain", "compare_overlay", "model_card", "window", "window_custom",
                     "before_after", "report"):  # plain outputs already
            setattr(self, name, shown(getattr(svc, name)))

    @shown
    def predict(self, file, model, method="gradcam", alpha=0.4, scale="minmax", boxes=False):
        """Probabilities, table, overlay, caption, the label menu, the warning box, image info, state."""
        r = self.svc.predict(file, model, method, alpha, scale, boxes)
        return (r.probs, r.table, r.overlay, r.caption, gr.update(choices=r.labels, value=r.top),
                gr.update(value=r.warning, visible=bool(r.warnings)), r.info, r.state)

    @shown
    def compare(self, file, label=None, alpha=0.4, scale="minmax"):
        """The label x model table, one overlay per model, the label menu, notes, state."""
        table, gallery, labels, label, notes, state = self.svc.compare(file, label, alpha, scale)
        return table, gallery, gr.update(choices=labels, value=label), notes, state

    @shown
    def batch(self, files, model, progress=gr.Progress()):
        """The CSV and its preview, with a progress bar."""
        return self.svc.batch(files, model, track=lambda fs: progress.tqdm(fs, desc="Scoring"))

    def panels(self, state: dict | None) -> tuple[dict, ...]:
        """After an analysis: the window/level panel only for a DICOM or 16-bit film (preset, centre and width
        set to its stored values) with its note, else the "shown as stored" note alone; the report outputs
        hidden until a report is made."""
        c = self.svc.window_controls(state)
        note = gr.update(value=c["note"], visible=bool(c["note"]))
        report = self.report_outputs(state)
        if not c["visible"]:
            return gr.update(visible=False), gr.update(value=STORED), gr.update(), gr.update(), note, report
        return gr.update(visible=True), gr.update(value=STORED), gr.update(**c["center"]), gr.update(**c["width"]), \
            note, report

    def report_outputs(self, state: dict | None) -> dict:
        """The report's files shown once a report is made."""
        return gr.update(visible=self.svc.report_shown(state))


# -- layout --------------------------------------------------------------------------------------
def create_demo(registry: ModelRegistry | None = None, warm_up: bool = True) -> gr.Blocks:
    """Builds the Blocks app over ``registry`` (default: ``models.yaml`` / ``$CHESTXRAY_MODELS``), queued as in
    production; ``warm_up=False`` leaves the warm-up thread to ``demo.service.start_warm_up()``."""
    svc = Service(registry if registry is not None else ModelRegistry.from_yaml(), warm_up=warm_up)
    ev = Events(svc)
    model_work = {"concurrency_id": "model", "concurrency_limit": CONCURRENCY}
    examples = [f for f in EXAMPLES if (EXAMPLES_DIR / f).is_file()]
    with gr.Blocks(title=TITLE, delete_cache=(600, 3000)) as demo:
        gr.Markdown(f"# {TITLE}\nProbabilities for the 14 NIH ChestX-ray14 findings and *No Finding*, with "
                    "Grad-CAM heatmaps. Upload a frontal chest film (PNG, JPEG or DICOM).")
        gr.HTML(DISCLAIMER)
        if not svc.available:
            gr.HTML('<div style="border:2px solid #dc2626;border-radius:8px;padding:10px 14px;margin-top:6px;'
                    f'background:rgba(220,38,38,.10)"><b>{html.escape(NO_MODEL)}</b> The app does not predict '
                    "with untrained (random) weights, so Analyze, Compare and Batch are disabled.</div>",
                    elem_id="no-model")
        with gr.Row(equal_height=False):
            model_dd = gr.Dropdown(svc.available, value=svc.default, label="Model", allow_custom_value=True,
                                   scale=1, min_width=220, info=None if svc.available else NO_MODEL)
            with gr.Accordion("Model card", open=False), gr.Column(scale=3):
                card_md = gr.Markdown(svc.card(svc.default), label="Model card", show_label=False)
        with gr.Tabs():
            with gr.Tab("Analyze"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=2, min_width=280):
                        file_in = gr.File(label="Chest X-ray: PNG, JPEG or DICOM (also without extension)",
                                          type="filepath", file_types=None, height=120, elem_id="xray-file")
                        run_btn = gr.Button("Analyze", variant="primary", elem_id="analyze")
                        if examples:
                            gr.Examples([[str(EXAMPLES_DIR / f)] for f in examples], inputs=[file_in],
                                        cache_examples=False, label="Examples (NIH ChestX-ray14)",
                                        example_labels=[EXAMPLES[f] for f in examples])
                        decoded = gr.Image(label="Decoded image", type="numpy", format="png", interactive=False,
                                           height=300, elem_id="decoded")
                        info_md = gr.Markdown(label="Image info", show_label=False)
                    with gr.Column(scale=3, min_width=320):
                        warn_html = gr.HTML(visible=False, elem_id="input-warning", label="Input warning")
                        # the labels above their threshold first, marked, each bar with its threshold's tick
                        table_md = gr.HTML("Analyze a film to see every label's probability against its "
                                           "operating threshold.", label="Label table", elem_id="probs")
                        # the API's answer (/predict returns it first); the page shows the table above
                        probs = gr.Label(num_top_classes=NUM_TOP, show_heading=False, label="Probabilities",
                                         visible=False, elem_id="probs-api")
                    with gr.Column(scale=3, min_width=320):
                        with gr.Row():
                            label_dd = gr.Dropdown([], value=None, label="Heatmap for label",
                                                   allow_custom_value=True)
                            method_dd = gr.Dropdown([(METHOD_TITLES[k], k) for k in METHODS],
                                                    value="gradcam", label="Method")
                        with gr.Row():
                            alpha = gr.Slider(0.0, 1.0, value=0.4, step=0.05, label="Heatmap opacity (at value 1)")
                            scale_rd = gr.Radio([(v, k) for k, v in SCALE_NAMES.items()], value="minmax",
                                                label="Heatmap scale", elem_id="heatmap-scale")
                            boxes_cb = gr.Checkbox(False, label="Show boxes", elem_id="show-boxes",
                                                   info="Outline the map's strongest regions")
                        overlay_img = gr.Image(label="Heatmap overlay", type="numpy", format="jpeg",
                                               interactive=False, height=400, elem_id="overlay")
                        caption_md = gr.Markdown(label="Heatmap caption", show_label=False)
                        gallery = gr.Gallery(label="Labels above their threshold (Grad-CAM, per-label range)",
                                             columns=4, height="auto", format="jpeg", object_fit="contain",
                                             elem_id="gallery")
                with gr.Row(equal_height=False):  # viewer and report (display only: no model runs here)
                    with gr.Column(scale=2, min_width=280):
                        # DICOM and 16-bit films only (Events.panels); an 8-bit film gets the note alone
                        with gr.Accordion("Window / level (display only)", open=True, visible=False,
                                          elem_id="window-panel") as window_acc:
                            window_rd = gr.Radio([*PRESETS, CUSTOM], value=STORED, label="Window preset",
                                                 elem_id="window-preset")
                            # broad bounds: the server checks API values against them; the page narrows them
                            # to the analysed file's range (Events.panels)
                            center_sl = gr.Slider(-WINDOW_LIMIT, WINDOW_LIMIT, value=0, label="Window centre "
                                                  "(stored units)", elem_id="window-center")
                            width_sl = gr.Slider(1, 2 * WINDOW_LIMIT, value=1, label="Window width (stored units)",
                                                 elem_id="window-width")
                        window_md = gr.Markdown(label="Window note", show_label=False, visible=False,
                                                elem_id="window-note")
                        report_btn = gr.Button("Export report (PDF + JSON)", elem_id="report")
                        with gr.Column(visible=False, elem_id="report-files") as report_box:  # once made
                            report_pdf = gr.File(label="Report (PDF)", interactive=False, elem_id="report-pdf")
                            report_json = gr.File(label="Report (JSON)", interactive=False, elem_id="report-json")
                    with gr.Column(scale=4, min_width=320):
                        slider_img = gr.ImageSlider(label="Before / after: film | heatmap (drag the handle; "
                                                    "scroll to zoom, drag to pan)", type="filepath", format="png",
                                                    interactive=False, max_height=640, elem_id="before-after")
                state = gr.State(time_to_live=STATE_TTL)
            with gr.Tab("Compare models"):
                gr.Markdown("Runs every installed model on the same image.")
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1, min_width=280):
                        cmp_file = gr.File(label="Chest X-ray", type="filepath", file_types=None, height=120)
                        cmp_btn = gr.Button("Compare all models", variant="primary")
                        cmp_label = gr.Dropdown([], value=None, label="Heatmap for label", allow_custom_value=True)
                        cmp_notes = gr.Markdown(label="Comparison notes", show_label=False)
                    with gr.Column(scale=2):
                        cmp_table = gr.Dataframe(label="Probability per label (rows) and model (columns)",
                                                 interactive=False, max_height=520)
                        cmp_gallery = gr.Gallery(label="Grad-CAM per model", columns=5, height="auto", format="jpeg",
                                                 object_fit="contain")
                cmp_state = gr.State(time_to_live=STATE_TTL)
            with gr.Tab("Batch"):
                gr.Markdown(f"Score up to {MAX_BATCH} files with the selected model. The CSV has one row per file: "
                            "the file name, one column per label (probability), a *warning* and an *error* "
                            "column (unreadable files get an error row).")
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1, min_width=280):
                        batch_files = gr.File(label="Files", file_count="multiple", type="filepath",
                                              file_types=None)
                        batch_btn = gr.Button("Score files", variant="primary")
                        batch_csv = gr.File(label="Results (CSV)", interactive=False)
                    with gr.Column(scale=2):
                        batch_table = gr.Dataframe(label="Results", interactive=False, max_height=520)

        # the bars and the overlay first; the decoded film and the gallery follow from the stored analysis
        analysed = run_btn.click(ev.predict, [file_in, model_dd, method_dd, alpha, scale_rd, boxes_cb],
                                 [probs, table_md, overlay_img, caption_md, label_dd, warn_html, info_md, state],
                                 api_name="predict", **model_work)
        analysed.success(ev.extras, [alpha, state], [decoded, gallery], api_name="extras", show_progress="hidden")
        analysed.success(ev.panels, [state], [window_acc, window_rd, center_sl, width_sl, window_md, report_box],
                         api_visibility="private", show_progress="hidden")
        gr.on([label_dd.input, method_dd.input, alpha.release, scale_rd.input, boxes_cb.input], ev.explain,
              [label_dd, method_dd, alpha, scale_rd, state, boxes_cb], [overlay_img, caption_md, state],
              api_name="explain",
              show_progress="minimal", **model_work)
        cmp_btn.click(ev.compare, [cmp_file, cmp_label, alpha, scale_rd],
                      [cmp_table, cmp_gallery, cmp_label, cmp_notes, cmp_state], api_name="compare", **model_work)
        cmp_label.input(ev.compare_overlay, [cmp_label, alpha, scale_rd, cmp_state], [cmp_gallery],
                        api_name="compare_overlay", show_progress="minimal", **model_work)
        batch_btn.click(ev.batch, [batch_files, model_dd], [batch_csv, batch_table], api_name="batch", **model_work)
        model_dd.change(ev.model_card, [model_dd], [card_md], api_name="model_card", **model_work)
        # viewer and report: drawing from the stored analysis only, so outside the model's concurrency limit
        window_out = [window_rd, center_sl, width_sl, overlay_img, caption_md, state]
        window_rd.input(ev.window, [window_rd, center_sl, width_sl, state], window_out, api_name="window",
                        show_progress="minimal")
        gr.on([center_sl.release, width_sl.release], ev.window_custom, [center_sl, width_sl, state], window_out,
              api_visibility="private", show_progress="minimal")
        overlay_img.change(ev.before_after, [state], [slider_img], api_visibility="private", show_progress="hidden")
        report_btn.click(ev.report, [state], [report_pdf, report_json], api_name="report").success(
            ev.report_outputs, [state], [report_box], api_visibility="private", show_progress="hidden")
    demo.service = svc  # for tests and benchmarks
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
    tune_queue(demo)
    return demo


def launch(demo: gr.Blocks, **kwargs):
    """Serves ``demo`` with the app's limits and the HTTP API (:mod:`chestxray.serve.rest`) beside it, in the
    same server; ``kwargs`` go to ``demo.launch`` (which returns ``(app, url, share_url)``)."""
    return demo.launch(max_file_size=MAX_UPLOAD_BYTES, show_error=False, state_session_capacity=SESSIONS,
                       app_kwargs={"routes": rest.routes(demo.service)}, **kwargs)


demo = create_demo(warm_up=__name__ != "__main__")


def main() -> None:
    """``python app.py``: the page is served first, then torch is imported and the default model loaded."""
    logging.basicConfig(level=logging.INFO)
    launch(demo, server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), prevent_thread_lock=True)
    demo.service.start_warm_up()
    demo.block_thread()


if __name__ == "__main__":
    main()
