"""The app in headless Chromium: upload a real X-ray, analyze, read the result panel, the viewer and the report.

Saves screenshots under ``artifacts/browser/`` (git-ignored). Skipped only when Chromium is absent. Every wait is
on a condition (generous timeouts: the machine may be busy), never on a fixed sleep.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.badfiles import NIH_IMAGE
from tests.helpers import make_checkpoint

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
SHOT = REPO / "artifacts" / "browser" / "screenshot.png"
#: Phone width (CSS px) the result page must fit without sideways scrolling.
PHONE = 390


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.skip(f"Chromium not installed at {CHROMIUM} (apt-get install -y chromium)")
    root = tmp_path_factory.mktemp("browser")
    folder = make_checkpoint(root / "weights" / "tiny_eff", arch="test_efficientnet", seed=0,
                             training={"val_mean_auroc": 0.61, "sources": ["nih384"], "pretrained": False})
    cfg = json.loads((folder / "config.json").read_text())  # one threshold per label, 0.22 to 0.78: distinct ticks
    labels = list(cfg["chestxray"]["thresholds"])
    cfg["chestxray"]["thresholds"] = {k: round(0.22 + 0.04 * i, 2) for i, k in enumerate(labels)}
    (folder / "config.json").write_text(json.dumps(cfg))
    (root / "models.yaml").write_text("default: tiny_eff\nmodels:\n  - {name: tiny_eff, local: tiny_eff}\n")
    mp = pytest.MonkeyPatch()
    mp.setenv("CHESTXRAY_WEIGHTS", str(root / "weights"))
    mp.setenv("CHESTXRAY_MODELS", str(root / "models.yaml"))
    mp.setenv("GRADIO_TEMP_DIR", str(root / "gradio_tmp"))
    mp.setenv("GRADIO_EXAMPLES_CACHE", str(root / "examples_cache"))
    import app

    demo = app.create_demo()
    _, local_url, _ = app.launch(demo, server_name="127.0.0.1", server_port=None, prevent_thread_lock=True,
                                 quiet=True)
    yield local_url
    demo.close()
    mp.undo()


def _upload_and_analyze(page, path: Path) -> None:
    """Uploads ``path`` into the Analyze tab (clearing a previous file) and clicks Analyze once it is uploaded."""
    from playwright.sync_api import expect

    clear = page.locator("#xray-file button[aria-label=Clear]")
    if clear.count():
        clear.first.click()
    page.locator("#xray-file input[type=file]").set_input_files(str(path))
    # uploaded once the file's download link is there: its shown name may be truncated or split across elements
    # by the column's width (a CI run saw "00000075_000 .png"), so it is not matched as text
    expect(page.locator(f'#xray-file a[href$="/{path.name}"]')).to_be_visible(timeout=60_000)
    page.locator("#analyze").click()


def _check_result_panel(page) -> list[dict]:
    """The result panel's rows as drawn: every label once, those above threshold first and marked in words, the
    rest after, most probable first; each bar's tick drawn where its threshold lies. Returns the rows."""
    from playwright.sync_api import expect

    rows = page.locator("#probs .cxr-row")
    expect(rows).to_have_count(15, timeout=60_000)
    expect(page.locator("#probs .cxr-tick")).to_have_count(15)
    drawn = rows.evaluate_all("""els => els.map(e => {
        const bar = e.querySelector('.cxr-bar').getBoundingClientRect();
        const tick = e.querySelector('.cxr-tick').getBoundingClientRect();
        const mark = e.querySelector('.cxr-mark');
        return {label: e.dataset.label, above: e.dataset.above === 'true', p: +e.dataset.probability,
                t: +e.dataset.threshold, mark: mark ? mark.innerText : null, bar_width: bar.width,
                tick_at: (tick.left + tick.width / 2 - bar.left) / bar.width, tick_height: tick.height,
                bar_height: bar.height};
    })""")
    above = [r for r in drawn if r["above"]]
    assert above and len(above) < 15, drawn  # the thresholds split the labels (0.22-0.78 on a random model)
    assert [r["above"] for r in drawn] == [True] * len(above) + [False] * (15 - len(above))  # above first
    assert all((r["p"] >= r["t"]) == r["above"] for r in drawn)
    below = [r["p"] for r in drawn if not r["above"]]
    assert below == sorted(below, reverse=True)
    assert all("above threshold" in r["mark"] for r in above) and all(r["mark"] is None for r in drawn[len(above):])
    for r in drawn:  # the tick stands out of the bar, where the threshold lies on its 0-1 scale
        assert r["bar_width"] > 150 and r["tick_height"] > r["bar_height"]
        assert abs(r["tick_at"] - r["t"]) < 0.02, r
    expect(page.locator("#probs").get_by_text("Above their operating threshold")).to_be_visible()
    return drawn


def test_upload_analyze_screenshot(url, data_dir):
    """An 8-bit PNG: the result panel (above threshold first, marked, threshold ticks), the heatmap, no window
    panel (one "shown as stored" line), no report outputs before a report; the same page at phone width."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.goto(url, wait_until="domcontentloaded", timeout=60_000)
            expect(page.get_by_text("not a medical device")).to_be_visible(timeout=60_000)
            expect(page.locator("#report")).to_be_visible()
            for hidden in ("#window-panel", "#window-note", "#report-pdf", "#report-json"):  # nothing analysed
                expect(page.locator(hidden)).to_be_hidden()
            _upload_and_analyze(page, data_dir / NIH_IMAGE)
            drawn = _check_result_panel(page)
            expect(page.locator("#overlay img")).to_be_visible(timeout=30_000)
            expect(page.get_by_text("per-label range (min-max)").first).to_be_visible(timeout=30_000)
            # the decoded film and the gallery follow the answer (a chained event)
            expect(page.locator("#decoded img")).to_be_visible(timeout=30_000)
            expect(page.locator("#gallery img").first).to_be_visible(timeout=30_000)
            # an 8-bit film: the one line, no window controls; no report outputs until a report is made
            expect(page.locator("#window-note")).to_have_text("8-bit PNG film: shown as stored.", timeout=30_000)
            for hidden in ("#window-panel", "#window-preset", "#window-center", "#window-width", "#report-pdf",
                           "#report-json"):
                expect(page.locator(hidden)).to_be_hidden()
            # switching the heatmap label re-renders the overlay from the stored analysis
            label_box = page.get_by_label("Heatmap for label")
            label_box.click()
            label_box.fill("Effusion")
            label_box.press("Enter")
            expect(page.get_by_text("Effusion: probability")).to_be_visible(timeout=30_000)
            SHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOT), full_page=True)
            bars = page.locator("#probs").inner_text()
            assert "Effusion" in bars and "Pneumothorax" in bars and "threshold" in bars
            # phone width: the same panel, full width, and nothing wider than the screen
            page.set_viewport_size({"width": PHONE, "height": 900})
            assert [r["label"] for r in _check_result_panel(page)] == [r["label"] for r in drawn]
            page.wait_for_function(f"() => document.documentElement.scrollWidth <= {PHONE}", timeout=30_000)
            page.screenshot(path=str(SHOT.with_name("phone.png")), full_page=True)
        finally:
            browser.close()
    assert SHOT.stat().st_size > 10_000


def test_window_before_after_and_report_download(url, data_dir, tmp_path):
    """A DICOM: the window panel shown with sliders on the film's own values, a preset applied, the before/after
    slider, the report outputs shown only once the report is made; then an 8-bit PNG hides both again."""
    from playwright.sync_api import expect, sync_playwright

    from tests.badfiles import CHEST_CR

    shot = SHOT.with_name("viewer_report.png")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000}, accept_downloads=True)
            page.goto(url, wait_until="domcontentloaded", timeout=60_000)
            _upload_and_analyze(page, data_dir / CHEST_CR)
            expect(page.locator("#overlay img")).to_be_visible(timeout=60_000)
            expect(page.locator("#before-after img").first).to_be_visible(timeout=30_000)
            expect(page.locator("#window-panel")).to_be_visible(timeout=30_000)  # a DICOM gets the controls
            expect(page.locator("#window-note")).to_contain_text("Display only", timeout=30_000)
            center = page.locator("#window-center input[type=range]")
            page.wait_for_function("() => +document.querySelector('#window-center input[type=range]').min > -1e6",
                                   timeout=30_000)  # narrowed to the film's values
            low, high = float(center.get_attribute("min")), float(center.get_attribute("max"))
            assert 0 < low < high and high - low < 100_000  # not the broad API bounds (+-1e6)
            width = page.locator("#window-width input[type=range]")
            assert float(width.get_attribute("max")) < 100_000 and width.input_value() == "30000"
            for hidden in ("#report-pdf", "#report-json"):
                expect(page.locator(hidden)).to_be_hidden()
            before = page.locator("#overlay img").get_attribute("src")
            lung = page.locator("#window-preset").get_by_label("Lung")
            expect(lung).to_be_enabled(timeout=30_000)
            lung.check()
            expect(page.locator("#overlay img")).not_to_have_attribute("src", before, timeout=30_000)
            page.locator("#report").click()
            link = page.locator("#report-pdf a").first
            expect(link).to_be_visible(timeout=60_000)
            expect(page.locator("#report-json a").first).to_be_visible(timeout=30_000)
            with page.expect_download(timeout=30_000) as info:
                link.click()
            pdf = tmp_path / "report.pdf"
            info.value.save_as(pdf)
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            # the next film, 8-bit: the window panel and the old report's outputs go
            _upload_and_analyze(page, data_dir / NIH_IMAGE)
            expect(page.locator("#window-note")).to_have_text("8-bit PNG film: shown as stored.", timeout=60_000)
            for hidden in ("#window-panel", "#report-pdf", "#report-json"):
                expect(page.locator(hidden)).to_be_hidden(timeout=30_000)
        finally:
            browser.close()
    assert pdf.read_bytes().startswith(b"%PDF")
