#!/usr/bin/env python
"""The app as a user sees it: in headless Chromium, the time from clicking Analyze to the label bars
and the heatmap overlay shown.

    python -m benchmarks.bench_browser [--n 10] [--model efficientnet_b0]

Starts ``app.py`` in its own process (the installed models, default model unless ``--model``), opens
the page, and for each run uploads one of two 1024-px NIH films (alternating, so that the bars and
the overlay must change), then clicks Analyze. In the page, a script notes the click time, the time
the result panel's bars show the new film's numbers, and the time the new overlay image has loaded
(``img.complete``, natural size > 0). Prints a markdown table: first click, p50 and p95 of the rest.
Needs Chromium (``apt-get install -y chromium``) and playwright.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from benchmarks.bench_load import DATA, start_app

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
FILMS = [DATA / "nih/full_res/00000100_000.png", DATA / "nih/full_res/00000075_000.png"]

#: Clicks Analyze and resolves with {bars, overlay} in ms after the click.
CLICK_JS = """
async (before) => {
  const probs = document.querySelector('#probs');
  const img = () => document.querySelector('#overlay img');
  const tracker = () => document.querySelector('#probs [data-testid=status-tracker]');
  const busy = () => { const t = tracker(); return !!t && !t.classList.contains('hide'); };
  let sawBusy = false;
  const t0 = performance.now();
  document.querySelector('#analyze').click();
  let bars = null, overlay = null;
  while (bars === null || overlay === null) {
    const now = performance.now();
    if (now - t0 > 60000) throw new Error('timeout');
    const text = probs.innerText;
    const b = busy();
    sawBusy = sawBusy || b;
    if (bars === null && (sawBusy || text !== before.bars) && text.includes('Below threshold') && !b) bars = now - t0;
    const im = img();
    if (overlay === null && im && im.src !== before.src && im.complete && im.naturalWidth > 0) overlay = now - t0;
    await new Promise(r => requestAnimationFrame(r));
  }
  return {bars, overlay};
}
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10, help="clicks (the first is reported on its own)")
    ap.add_argument("--model", default=None, help="model name (default: the app's default)")
    args = ap.parse_args(argv)
    from playwright.sync_api import expect, sync_playwright

    with tempfile.TemporaryDirectory(prefix="bench_browser_") as tmp:
        server = start_app({"GRADIO_TEMP_DIR": str(Path(tmp) / "gradio")}, log_dir=Path(tmp))
        rows = []
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
                page = browser.new_page(viewport={"width": 1440, "height": 1000})
                page.goto(server.url, wait_until="domcontentloaded", timeout=60_000)
                expect(page.get_by_text("not a medical device")).to_be_visible(timeout=60_000)
                if args.model:
                    dd = page.get_by_label("Model")
                    dd.click(), dd.fill(args.model), dd.press("Enter")
                for i in range(args.n):
                    film = FILMS[i % len(FILMS)]
                    if i:
                        page.locator("#xray-file button[aria-label=Clear]").first.click()
                    page.locator("#xray-file input[type=file]").set_input_files(str(film))
                    expect(page.locator("#xray-file").get_by_text(film.name)).to_be_visible(timeout=30_000)
                    page.wait_for_timeout(300)  # the upload settles
                    before = page.evaluate("() => ({bars: document.querySelector('#probs').innerText, "
                                           "src: document.querySelector('#overlay img')?.src || null})")
                    rows.append(page.evaluate(CLICK_JS, before))
                    page.wait_for_timeout(500)  # let the chained events (before/after slider) finish
                browser.close()
        finally:
            server.stop()
    rest = rows[1:] or rows

    def p(key, q):
        xs = sorted(r[key] for r in rest)
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]

    print(f"Headless Chromium, {args.n} clicks on Analyze (two 1024-px films alternating), model "
          f"{args.model or 'default'}\n")
    print("| shown | first click ms | p50 ms (later clicks) | p95 ms | n |")
    print("|---|---:|---:|---:|---:|")
    for key, name in (("bars", "probability bars"), ("overlay", "heatmap overlay")):
        print(f"| {name} | {rows[0][key]:.0f} | {statistics.median(r[key] for r in rest):.0f} | {p(key, 0.95):.0f} "
              f"| {len(rest)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
