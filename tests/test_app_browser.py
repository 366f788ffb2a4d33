"""The dashboard end to end in a real headless Chromium driven by Playwright, on a store of real stories260k runs.

Needs the system Chromium (Debian: `apt-get install chromium`; the README's test command installs it) and the
`playwright` package (the `test` extra); Playwright's own browser download is not used. Screenshots of every
page go to $INTERP_SCREENSHOTS (default: the test's temporary directory).
"""

import os
import shutil
import threading
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from interp.app.attention import AttentionSource
from interp.app.dashboard import make_app

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("INTERP_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage"]
# Dash is idle when no callback is queued or running (what Dash's own test fixtures wait for).
DASH_IDLE = """() => { const s = window.store && window.store.getState(); if (!s) return false;
  const cb = Object.assign({}, s.callbacks); delete cb.stored; delete cb.completed;
  return Object.values(cb).every(a => a.length === 0) && !document.querySelector('[data-dash-is-loading="true"]'); }"""


def serving(app):
    """Serve a Dash app on 127.0.0.1 (a free port) in a thread: yields its address; stopped afterwards."""
    srv = make_server("127.0.0.1", 0, app.server, threaded=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}"
    finally:
        srv.shutdown()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def server(app_store):
    root, _, models = app_store
    yield from serving(make_app(root, AttentionSource(models=models)))


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: install it (Debian: apt-get install chromium) or set INTERP_CHROMIUM")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1500, "height": 1100})
    pg = context.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors in the page: {errors}"


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    path = Path(os.environ.get("INTERP_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def wait_text(page, selector: str, text: str, timeout=60_000):
    """Wait until the element's text contains `text` (a callback has answered, however loaded the machine)."""
    page.wait_for_function("([sel, text]) => { const e = document.querySelector(sel); "
                           "return !!e && e.textContent.includes(text); }", arg=[selector, text], timeout=timeout)


def idle(page, timeout=60_000):
    page.wait_for_timeout(150)  # let an event queue its callback first
    page.wait_for_function(DASH_IDLE, timeout=timeout)


def click_cell(page, graph: str, row: int, col: int, n_rows: int, n_cols: int, reversed_y: bool = True):
    """Click the centre of cell (row, col) of a heatmap in the Dash graph with id `graph`."""
    page.locator(f"#{graph}").scroll_into_view_if_needed()
    box = page.locator(f"#{graph} .nsewdrag").first.bounding_box()
    y_frac = (row + 0.5) / n_rows if reversed_y else 1 - (row + 0.5) / n_rows
    page.mouse.click(box["x"] + box["width"] * (col + 0.5) / n_cols, box["y"] + box["height"] * y_frac)


def test_runs_page_lists_runs_with_their_status(server, page, app_store, shots):
    _, ids, _ = app_store
    page.goto(server + "/")
    page.wait_for_selector("#runs-table")
    idle(page)
    text = page.locator("#runs-table").inner_text()
    for run_id in ids.values():
        assert run_id in text
    assert "corrupt" in text and "incomplete" in text
    page.screenshot(path=str(shots / "runs.png"), full_page=True)
    page.locator("#runs-table th.dash-filter.column-3").click()  # the analysis column's filter
    page.keyboard.type("sinks")
    page.keyboard.press("Enter")
    page.wait_for_timeout(300)
    filtered = page.locator("#runs-table").inner_text()
    assert ids["sinks"] in filtered and ids["summary"] not in filtered


def test_choose_a_head_then_see_its_pooled_and_zoomed_attention(server, page, app_store, shots):
    _, ids, _ = app_store
    page.goto(f"{server}/run/{ids['summary']}")
    page.wait_for_selector("#head-map .nsewdrag")
    idle(page)
    click_cell(page, "head-map", row=3, col=5, n_rows=5, n_cols=8)  # stories260k: 5 layers × 8 heads
    wait_text(page, "#detail-title", "head 3-5")
    assert page.locator("#detail-title").inner_text().startswith("head 3-5")
    assert page.locator("#sample-scores .bars path").count() == 3  # one bar per sample
    page.locator("#ranked td").nth(1).click()  # the best-ranked head
    idle(page)
    best = page.locator("#ranked tbody tr").nth(1).inner_text().split()
    assert page.locator("#detail-title").inner_text().startswith(f"head {best[1]}-{best[2]}")

    page.get_by_text("Compute attention").click()
    wait_text(page, "#attention-status", "tokens")
    status = page.locator("#attention-status").inner_text()
    assert "pooled blocks" in status, status
    assert page.locator("#attention .heatmaplayer").count() == 1
    page.screenshot(path=str(shots / "run-pooled.png"), full_page=True)

    page.locator("#attention").scroll_into_view_if_needed()
    box = page.locator("#attention .nsewdrag").first.bounding_box()  # drag a zoom box over a corner
    page.mouse.move(box["x"] + 0.05 * box["width"], box["y"] + 0.6 * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + 0.25 * box["width"], box["y"] + 0.75 * box["height"], steps=8)
    page.mouse.up()
    idle(page)
    page.wait_for_function("() => document.querySelector('#attention-status').innerText.includes('exact per token')",
                           timeout=60_000)
    assert "one cell per token" in page.locator("#attention .gtitle").text_content()
    page.screenshot(path=str(shots / "run-zoomed.png"), full_page=True)


def test_analysis_views(server, page, app_store, shots):
    _, ids, _ = app_store
    for name, expect in (("retrieval", "needle retrieval by depth"), ("sinks", "massive activations per layer"),
                         ("circuits", "faithfulness")):
        page.goto(f"{server}/run/{ids[name]}")
        page.wait_for_selector("#head-map .nsewdrag")
        page.get_by_text(f"{name} view").click()
        page.wait_for_selector("#analysis-view .js-plotly-plot")
        idle(page)
        titles = page.locator("#analysis-view .gtitle").all_text_contents()
        assert any(t.startswith(expect) for t in titles), titles
        page.screenshot(path=str(shots / f"{name}-view.png"), full_page=True)


def test_broken_runs_show_a_message(server, page, app_store):
    _, ids, _ = app_store
    page.goto(f"{server}/run/{ids['corrupt']}")
    page.wait_for_selector(".error")
    assert "corrupt" in page.locator(".error").inner_text()
    page.goto(f"{server}/run/..%2F..%2Fetc")
    page.wait_for_selector(".error")
    assert "no run" in page.locator(".error").inner_text()


def test_compare_page(server, page, app_store, shots):
    _, ids, _ = app_store
    page.goto(f"{server}/compare?a={ids['summary']}&b={ids['sinks']}")
    page.wait_for_selector("#overlap-summary")
    idle(page)
    text = page.locator("#overlap-summary").inner_text()
    assert "Jaccard" in text and "shared:" in text
    assert page.locator("#scatter .scatterlayer .point").count() == 40  # 5 layers × 8 heads
    assert page.locator("#map-a .heatmaplayer").count() == 1 and page.locator("#map-b .heatmaplayer").count() == 1
    page.screenshot(path=str(shots / "compare.png"), full_page=True)


def test_compare_two_circuits_from_the_circuits_view(server, page, app_store, shots):
    """The circuits view links to the compare page with both tasks' scores of the same run, ranked by |effect|."""
    _, ids, _ = app_store
    page.goto(f"{server}/run/{ids['circuits']}")
    page.wait_for_selector("#head-map .nsewdrag")
    page.get_by_text("circuits view").click()
    page.get_by_text("compare them").click()
    page.wait_for_selector("#overlap-summary")
    idle(page)
    text = page.locator("#overlap-summary").inner_text()
    assert "top 2 by |score|: 2 heads shared" in text and "Jaccard 1.000" in text, text
    page.screenshot(path=str(shots / "compare-circuits.png"), full_page=True)


def test_a_vit_query_over_its_patch_grid(server, page, app_store, shots):
    _, ids, _ = app_store
    page.goto(f"{server}/run/{ids['vit']}")
    page.wait_for_selector("#head-map .nsewdrag")
    idle(page)
    page.get_by_text("Compute attention").click()
    wait_text(page, "#attention-status", "tokens")
    assert "exact per token" in page.locator("#attention-status").inner_text()  # 17 tokens: CLS and 4 × 4 patches
    page.locator("#query").fill("0")  # the CLS token as query
    page.keyboard.press("Enter")
    wait_text(page, "#grid-view .gtitle", "query 0")
    grid = page.locator("#grid-view")
    assert grid.is_visible() and grid.locator(".heatmaplayer").count() == 1
    assert grid.locator(".layer-below image, .imagelayer image").count() >= 1  # the image under the grid
    assert "query 0" in grid.locator(".gtitle").text_content()
    page.screenshot(path=str(shots / "vit-grid.png"), full_page=True)
