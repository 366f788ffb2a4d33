"""Downloads in a real browser (issue 31): every figure as PNG and SVG from its mode bar, the ranked heads and a
run's tables as CSV, and a run page opened by a prefix of its id. Fixtures: test_app_browser's (system Chromium)."""

import pytest

from test_app_browser import browser, idle, page, server, shots  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow


def _download(page, locator) -> str:
    """The name of the file that a click on `locator` downloads."""
    with page.expect_download(timeout=60_000) as download:
        locator.click(force=True)  # the mode bar shows on hover: clicked as it is
    return download.value.suggested_filename


def test_figures_download_as_png_and_svg_and_tables_as_csv(server, page, app_store, shots):  # noqa: F811
    _, ids, _ = app_store
    run = ids["sinks"]
    page.goto(f"{server}/run/{run[:-3]}")  # a unique prefix, as the CLI takes it
    page.wait_for_selector("#head-map .nsewdrag")
    idle(page)
    assert f"run {run}" in page.locator("#page").inner_text()
    head_map = page.locator("#head-map")
    head_map.hover()
    assert _download(page, head_map.locator('.modebar-btn[data-title="Download plot as SVG"]')).endswith(".svg")
    assert _download(page, head_map.locator('.modebar-btn[data-title="Download plot as a PNG"]')).endswith(".png")
    assert _download(page, page.locator("#ranked button.export")).endswith(".csv")
    assert _download(page, page.locator("#table-links a", has_text="sink_rates")) == f"{run}-sink_rates.csv"
    page.screenshot(path=str(shots / "downloads.png"), full_page=True)
