"""The app in headless Chromium: upload a real X-ray, analyze, see label bars and the heatmap.

Saves ``artifacts/browser/screenshot.png`` (git-ignored). Skipped only when Chromium is absent.
"""
from __future__ import annotations

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


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.skip(f"Chromium not installed at {CHROMIUM} (apt-get install -y chromium)")
    root = tmp_path_factory.mktemp("browser")
    make_checkpoint(root / "weights" / "tiny_eff", arch="test_efficientnet", seed=0,
                    training={"val_mean_auroc": 0.61, "sources": ["nih384"], "pretrained": False})
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


def test_upload_analyze_screenshot(url, data_dir):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.goto(url, wait_until="domcontentloaded", timeout=60_000)
            expect(page.get_by_text("not a medical device")).to_be_visible(timeout=60_000)
            page.locator("#xray-file input[type=file]").set_input_files(str(data_dir / NIH_IMAGE))
            expect(page.locator("#xray-file").get_by_text(Path(NIH_IMAGE).name)).to_be_visible(timeout=30_000)
            page.locator("#analyze").click()
            probs = page.locator("#probs")
            for name in ("Atelectasis", "Cardiomegaly", "No Finding"):
                expect(probs.get_by_text(name, exact=True)).to_be_visible(timeout=60_000)
            expect(page.locator("#overlay img")).to_be_visible(timeout=30_000)
            expect(page.get_by_text("per-label range (min-max)").first).to_be_visible(timeout=30_000)
            # the decoded film and the gallery follow the answer (a chained event)
            expect(page.locator("#decoded img")).to_be_visible(timeout=30_000)
            expect(page.locator("#gallery img").first).to_be_visible(timeout=30_000)
            # switching the heatmap label re-renders the overlay from the stored analysis
            label_box = page.get_by_label("Heatmap for label")
            label_box.click()
            label_box.fill("Effusion")
            label_box.press("Enter")
            expect(page.get_by_text("Effusion: probability")).to_be_visible(timeout=30_000)
            SHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOT), full_page=True)
            bars = probs.inner_text()
            assert "Effusion" in bars and "Pneumothorax" in bars and "%" in bars
        finally:
            browser.close()
    assert SHOT.stat().st_size > 10_000


def test_window_before_after_and_report_download(url, data_dir, tmp_path):
    """A DICOM windowed with a preset, the before/after slider shown, the PDF report downloaded."""
    from playwright.sync_api import expect, sync_playwright

    from tests.badfiles import CHEST_CR

    shot = SHOT.with_name("viewer_report.png")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000}, accept_downloads=True)
            page.goto(url, wait_until="domcontentloaded", timeout=60_000)
            page.locator("#xray-file input[type=file]").set_input_files(str(data_dir / CHEST_CR))
            expect(page.locator("#xray-file").get_by_text(Path(CHEST_CR).name)).to_be_visible(timeout=30_000)
            page.locator("#analyze").click()
            expect(page.locator("#overlay img")).to_be_visible(timeout=60_000)
            expect(page.locator("#before-after img").first).to_be_visible(timeout=30_000)
            before = page.locator("#overlay img").get_attribute("src")
            lung = page.locator("#window-preset").get_by_label("Lung")
            expect(lung).to_be_enabled(timeout=30_000)  # the controls are on for a DICOM
            lung.check()
            expect(page.locator("#overlay img")).not_to_have_attribute("src", before, timeout=30_000)
            page.locator("#report").click()
            link = page.locator("#report-pdf a").first
            expect(link).to_be_visible(timeout=60_000)
            with page.expect_download(timeout=30_000) as info:
                link.click()
            pdf = tmp_path / "report.pdf"
            info.value.save_as(pdf)
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert pdf.read_bytes().startswith(b"%PDF")
