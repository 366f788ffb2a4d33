"""The run page's attention views (issue 31) in a real headless Chromium: decoded token labels, a click that
selects the query, span overlays, the colour-scale toggle, the token text view, the multi-head grid, the ViT image
overlay and live prompts. Same server, browser and screenshot fixtures as test_app_browser.py; screenshots of every
view go to $INTERP_SCREENSHOTS (default: the test's temporary directory)."""

import io

import pytest
from test_app_browser import browser, click_cell, idle, page, server, shots, wait_text  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow

# Records whether the "loading" notice was ever shown (it may come and go between two polls).
WATCH_LOADING = """() => { window.loadingSeen = false; const e = document.querySelector('#attention-loading');
  new MutationObserver(() => { if (e.style.display === 'block') window.loadingSeen = true; })
    .observe(e, {attributes: true, attributeFilter: ['style']}); }"""


def open_run(page, server, run_id):
    page.goto(f"{server}/run/{run_id}")
    page.wait_for_selector("#head-map .nsewdrag")
    idle(page)


def compute(page):
    page.evaluate(WATCH_LOADING)
    page.get_by_text("Compute attention").click()
    wait_text(page, "#attention-status", "tokens")
    idle(page)
    assert page.evaluate("window.loadingSeen"), "no status text while the model loaded"


def ticks(page, axis="x"):
    return page.locator(f"#attention .{axis}tick text").all_text_contents()


def test_tokens_on_the_axes_and_a_click_selects_the_query(server, page, app_store, shots):
    _, ids, _ = app_store
    open_run(page, server, ids["summary"])
    compute(page)
    page.locator("#attention").scroll_into_view_if_needed()
    box = page.locator("#attention .nsewdrag").first.bounding_box()  # zoom into a corner: an exact map
    page.mouse.move(box["x"] + 0.02 * box["width"], box["y"] + 0.02 * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + 0.15 * box["width"], box["y"] + 0.15 * box["height"], steps=8)
    page.mouse.up()
    wait_text(page, "#attention-status", "exact per token")
    idle(page)
    title = page.locator("#attention .gtitle").text_content()  # "… — queries q0–q1, keys k0–k1 (exact …)"
    (q0, q1), (k0, k1) = (map(int, part.split()[1].split("–")) for part in title.split(" — ")[1].split(", ")[:2])
    labels = ticks(page, "x")
    assert len(labels) == k1 - k0 + 1 and any(t.startswith("␣") for t in labels), labels  # one token per column
    assert not any("▁" in t or "<0x" in t for t in labels + ticks(page, "y")), labels
    page.screenshot(path=str(shots / "views-tokens.png"), full_page=True)

    n_rows = len(ticks(page, "y"))
    click_cell(page, "attention", row=n_rows - 2, col=1, n_rows=n_rows, n_cols=len(labels))
    query = q0 + n_rows - 2
    wait_text(page, "#text-view", f"attention from query {query} ")
    assert page.locator("#query").input_value() == str(query)
    outlined = page.locator("#text-view span[style*='outline']")
    assert outlined.get_attribute("title").startswith(f"{query}: ")

    page.locator("#text-view span[title^='7: ']").click()  # a token of the text view chooses the query
    wait_text(page, "#text-view", "attention from query 7 ")
    assert page.locator("#query").input_value() == "7"
    page.get_by_text("attention to the selected key").click()
    wait_text(page, "#text-view", f"attention to key {k0 + 1} ")  # the key of the clicked cell
    idle(page)
    page.locator("#text-view").scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "views-text.png"), full_page=True)


def test_spans_and_the_scale_toggle(server, page, app_store, shots):
    _, ids, _ = app_store
    open_run(page, server, ids["retrieval"])
    compute(page)
    legend = page.locator("#attention .legendtext").all_text_contents()
    assert "bos" in legend and "answer span" in legend, legend
    assert page.locator("#attention .shapelayer path").count() >= 4  # each span beside both axes
    page.locator("#attention").scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "views-spans-linear.png"), full_page=True)
    before = page.locator("#attention .hm image").get_attribute("href")
    page.locator("#scale").get_by_text("log").click()
    wait_text(page, "#attention .cbtitle", "log scale")
    idle(page)
    assert page.locator("#attention .hm image").get_attribute("href") != before  # other colours
    assert "0.0001" in page.locator("#attention .cbaxis").text_content()
    page.screenshot(path=str(shots / "views-spans-log.png"), full_page=True)


def test_the_head_grid_opens_a_head(server, page, app_store, shots):
    _, ids, _ = app_store
    open_run(page, server, ids["summary"])
    compute(page)
    grid = page.locator("#head-grid")
    grid.scroll_into_view_if_needed()
    page.wait_for_function("() => document.querySelectorAll('#head-grid .heatmaplayer .hm').length === 8",
                           timeout=60_000)
    before = page.locator("#attention .gtitle").text_content()
    page.screenshot(path=str(shots / "views-head-grid.png"), full_page=True)
    cell = grid.locator(".nsewdrag").nth(6).bounding_box()  # head 6's thumbnail
    page.mouse.click(cell["x"] + cell["width"] / 2, cell["y"] + cell["height"] / 2)
    wait_text(page, "#head", "6")
    idle(page)
    assert page.locator("#head").inner_text().strip() == "6"
    assert page.locator("#attention .gtitle").text_content() != before  # the map shows the opened head


def test_a_live_prompt_draws_a_map(server, page, app_store, shots):
    _, ids, _ = app_store
    open_run(page, server, ids["summary"])
    compute(page)
    page.get_by_text("Live prompt").click()
    page.locator("#prompt-text").fill("The cat sat on the mat. The dog ran to the cat.")
    page.get_by_role("button", name="Run prompt").click()
    wait_text(page, "#attention .gtitle", "your prompt")
    idle(page)
    labels = ticks(page, "x")
    status = page.locator("#attention-status").inner_text()
    assert labels[0] == "<s>" and "␣on" in labels and "exact per token" in status and "mean entropy" in status
    assert "attention from query" in page.locator("#text-view").inner_text()
    page.screenshot(path=str(shots / "views-live-prompt.png"), full_page=True)
    page.get_by_role("button", name="Back to the sample").click()
    wait_text(page, "#attention .gtitle", "sample 0")


def test_vit_overlay_starts_at_cls_and_follows_a_click_and_an_uploaded_image(server, page, app_store, shots):
    from interp.analyses.images import synthetic_image

    _, ids, _ = app_store
    open_run(page, server, ids["vit"])
    compute(page)
    wait_text(page, "#grid-view .gtitle", "query 0 ('cls')")
    assert "cls" in page.locator("#attention .legendtext").all_text_contents()
    click_cell(page, "attention", row=5, col=0, n_rows=17, n_cols=17)  # 17 tokens: CLS and 4 × 4 patches
    wait_text(page, "#grid-view .gtitle", "query 5 ('patch 1,0')")
    page.screenshot(path=str(shots / "views-vit-overlay.png"), full_page=True)

    png = io.BytesIO()
    synthetic_image(7).save(png, format="PNG")
    page.get_by_text("Live prompt").click()
    page.locator("#prompt-image input[type=file]").set_input_files(
        files=[{"name": "mine.png", "mimeType": "image/png", "buffer": png.getvalue()}])
    page.get_by_role("button", name="Run prompt").click()
    wait_text(page, "#attention .gtitle", "your prompt")
    idle(page)
    assert page.locator("#grid-view .imagelayer image, #grid-view .layer-below image").count() >= 1
    page.screenshot(path=str(shots / "views-vit-upload.png"), full_page=True)
