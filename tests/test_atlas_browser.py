"""The dashboard's atlas page end to end in a real headless Chromium driven by Playwright (issue 30), on a store of
stories260k runs and two atlases of them: the role grid drawn, the legend filtering it, the search box choosing a
head, a click opening the head's card with links to its runs, its attention on demand, two atlases compared.

Needs the system Chromium and the `playwright` package, as tests/test_app_browser.py; screenshots go to
$INTERP_SCREENSHOTS (default: the test's temporary directory).
"""

import pytest
from test_app_browser import browser, idle, page, serving, shots, wait_text  # noqa: F401  (fixtures, waits shared)
from test_atlas_page import atlas_store  # noqa: F401  (the store of two atlases)

from interp.app.attention import AttentionSource
from interp.app.dashboard import make_app
from interp.atlases import open_atlas

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(atlas_store):  # noqa: F811
    yield from serving(make_app(atlas_store[0], AttentionSource()))


@pytest.fixture(scope="module")
def atlas(atlas_store):  # noqa: F811
    root, ids = atlas_store
    return open_atlas(ids["a"], root)


def open_page(page, url):  # noqa: F811
    page.goto(url)
    page.wait_for_selector("#atlas-grid .scatterlayer .point")
    idle(page)


def traces(page) -> dict[str, int]:  # noqa: F811
    """The role grid as drawn: trace name -> its number of points (plotly draws no trace without points)."""
    return page.evaluate("""() => Object.fromEntries(document.querySelector('#atlas-grid .js-plotly-plot')._fullData
        .filter(t => t._length).map(t => [t.name, t._length]))""")


def traces_of(member, shown: str = "no role") -> dict[str, int]:
    """What the grid should draw of a roles table's boolean columns: grey heads, each role's, the multi-role ones."""
    count = member.sum(axis=1)
    expected = {shown: int((count == 0).sum()), **{n: int(member[n].sum()) for n in member.columns},
                "several roles": int((count > 1).sum())}
    return {name: n for name, n in expected.items() if n}


def click_head(page, layer: int, head: int, n_layers: int, n_heads: int):  # noqa: F811
    """Click the centre of a head's cell of the role grid (layer 0 at the top)."""
    box = page.locator("#atlas-grid .nsewdrag").first.bounding_box()
    page.mouse.click(box["x"] + box["width"] * (head + 0.5) / n_heads,
                     box["y"] + box["height"] * (layer + 0.5) / n_layers)


def test_grid_legend_filters_and_search_selects_a_head(server, page, atlas_store, atlas, shots):  # noqa: F811
    _, ids = atlas_store
    open_page(page, f"{server}/atlas/{ids['a']}")
    names = atlas.role_names
    member = atlas.roles[names]
    page.screenshot(path=str(shots / "atlas.png"), full_page=True)
    assert traces(page) == traces_of(member)

    role = next(n for n in names if member[n].any())
    page.locator("#atlas-roles label", has_text=role).locator("input").click()  # untick it in the legend
    idle(page)
    assert traces(page) == traces_of(member.drop(columns=role), shown="none of the roles shown")

    page.locator("#atlas-search").fill("L3H7")
    page.keyboard.press("Enter")
    wait_text(page, "#atlas-card", "head 3-7")
    assert page.locator("#atlas-grid .layer-above path, #atlas-grid .shapelayer path").count() >= 1  # its outline
    page.locator("#atlas-search").fill("9-2")
    page.keyboard.press("Enter")
    wait_text(page, "#atlas-search-status", "no run in this atlas scored head 9-2")
    assert "head 3-7" in page.locator("#atlas-card").inner_text()  # the card stays
    page.locator("#atlas-search").fill("1.2")
    page.keyboard.press("Enter")
    wait_text(page, "#atlas-card", "head 1-2")


def test_click_opens_the_card_with_run_links_and_attention_on_demand(server, page, atlas_store, atlas,  # noqa: F811
                                                                     shots):
    _, ids = atlas_store
    open_page(page, f"{server}/atlas/{ids['a']}")
    several = atlas.roles[atlas.roles[atlas.role_names].sum(axis=1) > 1].iloc[0]
    layer, head = int(several["layer"]), int(several["head"])
    click_head(page, layer, head, n_layers=5, n_heads=8)  # stories260k: 5 layers × 8 heads
    wait_text(page, "#atlas-card", f"head {layer}-{head}")
    card = page.locator("#atlas-card").inner_text()
    assert all(role in card for role in atlas.card(layer, head)["roles"])
    for run in atlas.runs.values():
        assert page.locator(f'#atlas-card a[href="/run/{run}"]').count() >= 1

    page.locator("#atlas-attn-run").click()
    page.get_by_text(f"taxonomy · {atlas.runs['taxonomy']}").click()
    idle(page)
    page.locator("#atlas-compute").click()
    wait_text(page, "#atlas-attention-status", "tokens")
    assert page.locator("#atlas-attention .heatmaplayer").count() == 1
    assert f"head {layer}-{head}, sample 0" in page.locator("#atlas-attention .gtitle").text_content()
    page.screenshot(path=str(shots / "atlas-card.png"), full_page=True)

    page.locator(f'#atlas-card a[href="/run/{atlas.runs["sinks"]}"]').first.click()  # to the run's page
    page.wait_for_selector("#head-map .nsewdrag")
    assert "sinks on stories260k" in page.locator("h2").first.inner_text()


def test_runs_page_opens_an_atlas_and_two_atlases_compare(server, page, atlas_store, shots):  # noqa: F811
    _, ids = atlas_store
    page.goto(server + "/")
    page.wait_for_selector("#runs-table")
    page.locator(f'#runs-table a[href="/atlas/{ids["a"]}"]').click()
    page.wait_for_selector("#atlas-grid .scatterlayer .point")
    page.locator(f'#atlas-others a[href="/atlas/{ids["a"]}?compare={ids["b"]}"]').click()
    page.wait_for_selector("#atlas-compare-table")
    idle(page)
    table = page.locator("#atlas-compare-table").inner_text()
    assert "layer-head" in table and "only in A" in table
    page.locator("#atlas-compare-role").click()  # another role, head by head
    page.get_by_role("option", name="lookback.lookback", exact=True).click()
    wait_text(page, "#atlas-changes .gtitle", "lookback.lookback: ")
    assert page.locator("#atlas-changes .heatmaplayer").count() == 1
    page.locator("#atlas-compare").scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "atlas-compare.png"), full_page=True)
