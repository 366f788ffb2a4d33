"""Regenerate the README's dashboard screenshot, `docs/dashboard.png`, from real runs.

Scores SmolLM2-135M with `summary` (3 built-in texts of at most 48 tokens: a small, fast run) into a temporary store,
serves the dashboard on 127.0.0.1 (a free port, stopped at the end), and in the system Chromium (Playwright) opens
the run, chooses its best `first_token_mass` head, computes its attention on the first sample and saves the page.
Needs the `test` extra (Playwright) and Chromium (`INTERP_CHROMIUM` or `chromium` on the PATH). About a minute.

    python docs/screenshots.py [--out docs/dashboard.png] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
from pathlib import Path

from werkzeug.serving import make_server

import interp
from interp.app.attention import AttentionSource
from interp.app.dashboard import make_app

HERE = Path(__file__).resolve().parent
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-dev-shm-usage"]
IDLE = """() => { const s = window.store && window.store.getState(); if (!s) return false;
  const cb = Object.assign({}, s.callbacks); delete cb.stored; delete cb.completed;
  return Object.values(cb).every(a => a.length === 0) && !document.querySelector('[data-dash-is-loading="true"]'); }"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "dashboard.png"))
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    chromium = os.environ.get("INTERP_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    model = interp.load_model(args.model)
    with tempfile.TemporaryDirectory(prefix="interp-shots-") as store:
        run = interp.score(model, "summary", samples=3, max_tokens=48, store=store)
        best = run.top("first_token_mass", k=1).iloc[0]
        app = make_app(store, AttentionSource(models={model.name: model}))
        server = make_server("127.0.0.1", 0, app.server, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            _shoot(chromium, f"http://127.0.0.1:{server.server_port}/run/{run.id}", best, args.out)
        finally:
            server.shutdown()
            thread.join(timeout=5)
    print(f"wrote {args.out} (run {run.id}, head {int(best['layer'])}-{int(best['head'])})")


def _shoot(chromium: str, url: str, head, out: str) -> None:
    """Open the run page, choose `head` (score first_token_mass), compute its attention, save a screenshot."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1250})
        page.goto(url)
        page.wait_for_selector("#head-map .nsewdrag")
        page.wait_for_function(IDLE, timeout=120_000)
        page.locator("#score").click()
        page.get_by_text("first_token_mass", exact=True).last.click()
        page.wait_for_function(IDLE, timeout=120_000)
        page.locator("#ranked td").nth(1).click()  # the best-ranked head
        page.wait_for_function(IDLE, timeout=120_000)
        page.get_by_text("Compute attention").click()
        page.wait_for_function("() => (document.querySelector('#attention-status') || {}).innerText?.includes('tok')",
                               timeout=300_000)
        page.wait_for_function(IDLE, timeout=120_000)
        page.screenshot(path=out, full_page=True)
        browser.close()


if __name__ == "__main__":
    main()
