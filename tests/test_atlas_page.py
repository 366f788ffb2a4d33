"""The dashboard's atlas page without a browser (issue 30): head search, the role grid's filter and multi-role cells,
the head card and its links, attention on demand through the run page's machinery, two atlases compared, and the
store's ids only."""

import json

import dash
import numpy as np
import pandas as pd
import pytest

import interp
from interp.app import figures
from interp.app.atlas_page import (choose_head, compare_section, head_card, load_atlas, parse_head,
                                   sample_choices, show_atlas, show_attention)
from interp.app.dashboard import Dashboard, make_app
from interp.atlases import Atlas, atlas, open_atlas
from interp.store import RunNotFoundError

ANALYSES = ("summary", "taxonomy", "lookback", "sinks")


@pytest.fixture(scope="module")
def atlas_store(tmp_path_factory):
    """A store of stories260k runs and two atlases of them: "a" (summary, taxonomy, lookback, sinks; 2 samples each)
    and "b" (taxonomy and lookback on 3 other samples). Returns (store, {"a": id, "b": id})."""
    root = tmp_path_factory.mktemp("atlas-page")
    model = interp.load_model("stories260k")
    a = atlas(model, {name: {"samples": 2} for name in ANALYSES}, root, analyses=ANALYSES)
    b = atlas(model, {name: {"samples": 3, "seed": 1} for name in ANALYSES}, root,
                    analyses=("taxonomy", "lookback"))
    return root, {"a": a.id, "b": b.id}


@pytest.fixture(scope="module")
def board(atlas_store):
    return Dashboard(atlas_store[0])


def _find(component, id_):
    """The component with this id in a Dash layout tree (None when absent)."""
    if getattr(component, "id", None) == id_:
        return component
    children = getattr(component, "children", None)
    for child in children if isinstance(children, (list, tuple)) else [children]:
        if hasattr(child, "to_plotly_json"):
            found = _find(child, id_)
            if found is not None:
                return found
    return None


def _text(component) -> str:
    """Every string in a layout tree, and every link as `text->href`."""
    if isinstance(component, (str, int, float)):
        return str(component)
    if isinstance(component, (list, tuple)):
        return " ".join(_text(c) for c in component)
    if component is None:
        return ""
    inner = _text(getattr(component, "children", None))
    href = getattr(component, "href", None)
    return f"{inner}->{href}" if href else inner


@pytest.mark.parametrize("text, head", [("L12H3", (12, 3)), ("l12h3", (12, 3)), (" L 12 H 3 ", (12, 3)),
                                        ("12-3", (12, 3)), ("12.3", (12, 3)), ("0-0", (0, 0))])
def test_parse_head_reads_every_notation(text, head):
    assert parse_head(text) == head


@pytest.mark.parametrize("text", ["", "12", "L12", "12-", "-1-2", "H3", "12-3-4", "a.b"])
def test_parse_head_refuses_anything_else(text):
    with pytest.raises(ValueError, match="L12H3, 12-3 or 12.3"):
        parse_head(text)


def test_role_grid_filters_roles_splits_cells_and_outlines_the_head(board, atlas_store):
    atlas = load_atlas(board, atlas_store[1]["a"])
    names = atlas.role_names
    member = atlas.roles[names].to_numpy(bool)
    several = member.sum(1) > 1
    assert several.any(), "the fixture needs a head with several roles"
    fig = figures.role_grid(atlas, selected=(1, 2))
    traces = {t.name: t for t in fig.data}
    row = int(np.flatnonzero(several)[0])
    layer, head = int(atlas.roles["layer"][row]), int(atlas.roles["head"][row])
    spots = [(t.x[i], t.y[i], t.marker.size if np.isscalar(t.marker.size) else t.marker.size[i])
             for n, t in traces.items() if n in names for i in range(len(t.x))
             if (round(t.y[i]), round(t.x[i])) == (layer, head)]
    assert len(spots) == member[row].sum() and len(set((x, y) for x, y, _ in spots)) == len(spots)  # side by side
    assert all(abs(x - head) < 0.5 and abs(y - layer) < 0.5 and s < traces["no role"].marker.size for x, y, s in spots)
    assert len(traces["several roles"].x) == several.sum()
    (box,) = fig.layout.shapes
    assert (box.x0, box.x1, box.y0, box.y1) == (1.5, 2.5, 0.5, 1.5)
    colours = figures.role_colours(names)
    assert all(traces[n].marker.color == colours[n] for n in names) and len(set(colours.values())) == len(names)

    kept = names[1:2]
    only = figures.role_grid(atlas, roles=kept, legend=False)
    assert [t.name for t in only.data][:2] == ["none of the roles shown", kept[0]] and not only.layout.showlegend
    assert len(only.data[1].x) == member[:, 1].sum() and only.data[1].marker.color == colours[kept[0]]
    assert len(only.data[0].x) == len(atlas.roles) - member[:, 1].sum()  # the rest in grey, hidden roles included
    assert "several roles" not in [t.name for t in only.data]


def test_the_page_reads_the_atlas_open_atlas_reads(board, atlas_store):
    root, ids = atlas_store
    for atlas_id in ids.values():
        ours, theirs = load_atlas(board, atlas_id), open_atlas(atlas_id, root)
        assert (ours.id, ours.runs, ours.skipped, ours.role_names) == (theirs.id, theirs.runs, theirs.skipped,
                                                                       theirs.role_names)
        pd.testing.assert_frame_equal(ours.heads, theirs.heads)
        pd.testing.assert_frame_equal(ours.roles, theirs.roles)


def test_runs_table_opens_an_atlas_on_its_page(board, atlas_store):
    _, ids = atlas_store
    rows = {r["id"]: r for r in board.runs_rows()}
    assert rows[ids["a"]]["open"] == f"[open](/atlas/{ids['a']})"
    atlas = load_atlas(board, ids["a"])
    assert all(rows[run]["open"] == f"[open](/run/{run})" for run in atlas.runs.values())


def test_the_page_routes_atlases_and_refuses_runs_paths_and_unknown_ids(board, atlas_store):
    root, ids = atlas_store
    layout = board.page(f"/atlas/{ids['a']}")
    for id_ in ("atlas-grid", "atlas-roles", "atlas-search", "atlas-card", "atlas-compute", "atlas-overlaps"):
        assert _find(layout, id_) is not None, id_
    text = _text(layout)
    atlas = load_atlas(board, ids["a"])
    assert f"Head atlas of {atlas.model}" in text and "12-3 is layer 12, head 3" in text
    assert all(f"{run}->/run/{run}" in text for run in atlas.runs.values())
    assert f"->/atlas/{ids['a']}?compare={ids['b']}" in text  # the other atlas, to compare with
    assert _find(layout, "atlas-roles").value == atlas.role_names
    assert _find(layout, "atlas-compare") is None
    assert _find(board.page(f"/atlas/{ids['a'][:-3]}"), "atlas-grid") is not None  # a unique prefix

    run = atlas.runs["sinks"]
    assert "is a run, not an atlas" in _text(board.page(f"/atlas/{run}"))
    for bad in ("..%2F..%2Fetc", "nothing-here"):
        assert "no run" in _text(board.page(f"/atlas/{bad}"))
    corrupt = root / "20200101-000001-atlas-broken-dddddd"
    corrupt.mkdir()
    (corrupt / "meta.json").write_text("{ not json")
    try:
        assert f"{corrupt.name} is corrupt" in _text(board.page(f"/atlas/{corrupt.name}"))
    finally:
        (corrupt / "meta.json").unlink()
        corrupt.rmdir()


def test_an_atlas_naming_a_run_outside_the_store_is_refused(board, atlas_store, tmp_path):
    root, ids = atlas_store
    planted = root / "20200101-000000-atlas-planted-cccccc"
    planted.mkdir()
    meta = json.loads((root / ids["a"] / "meta.json").read_text())
    meta.update(id=planted.name, runs={"sinks": str(root / load_atlas(board, ids["a"]).runs["sinks"])})
    (planted / "meta.json").write_text(json.dumps(meta))
    try:
        with pytest.raises(RunNotFoundError, match="no run"):
            load_atlas(board, planted.name)
    finally:
        (planted / "meta.json").unlink()
        planted.rmdir()


def test_choose_a_head_by_click_or_search(board, atlas_store):
    atlas_id = atlas_store[1]["a"]
    click = {"points": [{"x": 2.3, "y": 0.7}]}  # a role's small square within cell 1-2
    assert choose_head(board, atlas_id, "atlas-grid", click, None, None) == ([1, 2], "")
    for typed in ("L3H7", "3-7", "3.7"):
        assert choose_head(board, atlas_id, "atlas-search", None, typed, [1, 2]) == ([3, 7], "")
    head, message = choose_head(board, atlas_id, "atlas-search", None, "L9H2", [1, 2])  # stories260k: 5 layers
    assert head == [1, 2] and message == "no run in this atlas scored head 9-2"
    head, message = choose_head(board, atlas_id, "atlas-search", None, "head three", [1, 2])
    assert head == [1, 2] and "L12H3, 12-3 or 12.3" in message
    assert choose_head(board, atlas_id, "atlas-search", None, "  ", [1, 2]) == ([1, 2], "")


def test_the_card_holds_scores_ranks_roles_and_links_to_each_run(board, atlas_store):
    atlas_id = atlas_store[1]["a"]
    atlas = load_atlas(board, atlas_id)
    row = int(np.flatnonzero(atlas.roles[atlas.role_names].sum(axis=1) > 1)[0])
    layer, head = int(atlas.roles["layer"][row]), int(atlas.roles["head"][row])
    fig, card = show_atlas(board, atlas_id, [layer, head], atlas.role_names)
    assert fig.layout.shapes[0].x0 == head - 0.5 and not fig.layout.showlegend
    text = _text(card)
    expected = atlas.card(layer, head)
    assert f"head {layer}-{head} (KV head {expected['kv_head']})" in text
    assert len(expected["roles"]) > 1 and all(role in text for role in expected["roles"])
    for col, entry in expected["scores"].items():
        assert col in text and f"{entry['value']:.4g}" in text and f"{entry['rank']:.0f} / {len(atlas.heads)}" in text
    for analysis, run in atlas.runs.items():
        assert f"{analysis}->/run/{run}" in text
    sinks = Atlas([board.catalog.result(atlas.runs["sinks"])])  # stories260k has no sink head
    assert "no role" in _text(head_card(sinks, layer, head))
    _, hint = show_atlas(board, atlas_id, None, atlas.role_names)
    assert "Click a head" in _text(hint)


def test_attention_on_demand_uses_the_run_pages_views(board, atlas_store):
    atlas = load_atlas(board, atlas_store[1]["a"])
    run = atlas.runs["taxonomy"]
    options, first = sample_choices(board, run)
    assert [o["value"] for o in options] == [0, 1] and first == 0
    fig, style, grid, grid_style, status, region = show_attention(board, "atlas-head", run, [1, 2], 0, None, None)
    assert style == grid_style == {"display": "none"} and region is None and "press Compute attention" in status
    fig, style, grid, grid_style, status, region = show_attention(board, "atlas-compute", run, [1, 2], 0, None,
                                                                  {"q": [0, 3], "k": [0, 3]})
    expected = board.show_attention(run, 1, 2, 0)  # the run page's view, of the whole input
    assert np.allclose(np.array(fig.data[0].z, float), np.array(expected[0].data[0].z, float), equal_nan=True)
    assert fig.layout.title.text.startswith("head 1-2, sample 0") and "tokens" in status and region == expected[4]
    assert style["height"] == "600px" and grid_style == {"display": "none"}  # a text model: no image grid
    n = region["q"][1]
    zoom = {"xaxis.range[0]": -0.5, "xaxis.range[1]": 9.5, "yaxis.range[0]": n - 10.5, "yaxis.range[1]": n - 0.5}
    fig, _, _, _, status, zoomed = show_attention(board, "atlas-attention", run, [1, 2], 0, zoom, region)
    assert zoomed == {"q": [n - 10, n], "k": [0, 10]} and "exact per token" in status
    whole = show_attention(board, "atlas-attention", run, [1, 2], 0, {"xaxis.autorange": True}, zoomed)
    assert whole[-1] == region  # a double-click: the whole input again
    with pytest.raises(dash.exceptions.PreventUpdate):
        show_attention(board, "atlas-attention", run, [1, 2], 0, {"autosize": True}, zoomed)
    with pytest.raises(dash.exceptions.PreventUpdate):  # a relayout of the hidden map
        show_attention(board, "atlas-attention", run, [1, 2], 0, {"xaxis.range[0]": 0, "xaxis.range[1]": 3}, None)
    assert "choose a head first" in show_attention(board, "atlas-compute", run, None, 0, None, None)[4]


def test_two_atlases_compared_by_layer_and_head(board, atlas_store):
    _, ids = atlas_store
    a, b = load_atlas(board, ids["a"]), load_atlas(board, ids["b"])
    section = compare_section(board, a, ids["b"])
    table = _find(section, "atlas-compare-table")
    rows = {r["role"]: r for r in table.data}
    assert set(rows) == set(a.role_names) | set(b.role_names)
    for role in b.role_names:
        assert rows[role]["match"] == "layer-head"
        both = int((a.roles[role] & b.roles[role]).sum())
        assert rows[role]["both"] == both
    assert rows["sinks.sink"]["match"] == "only in A"
    role = _find(section, "atlas-compare-role").value
    assert rows[role]["n_a"] + rows[role]["n_b"] > 0  # a role with heads is shown first
    z = np.array(_find(section, "atlas-changes").figure.data[0].z, float)
    state = a.roles.set_index(["layer", "head"])[role].astype(int) + 2 * b.roles.set_index(["layer", "head"])[role]
    assert all(z[layer, head] == value for (layer, head), value in state.items())
    assert (z == 3).sum() == rows[role]["both"] and (z == 1).sum() + (z == 3).sum() == rows[role]["n_a"]
    with pytest.raises(ValueError, match="atlas B has no role 'sinks.sink'"):
        figures.role_changes(a, b, "sinks.sink")
    assert f"Compared with atlas {ids['b']}" in _text(section)
    assert _find(board.page(f"/atlas/{ids['a']}", f"?compare={ids['b']}"), "atlas-compare-table") is not None
    failed = compare_section(board, a, "nothing-here")
    assert "no run" in _text(failed) and _find(failed, "atlas-compare-table") is None


def test_make_app_wires_the_atlas_callbacks(atlas_store):
    app = make_app(atlas_store[0])
    outputs = " ".join(app.callback_map)
    for output in ("atlas-grid.figure", "atlas-card.children", "atlas-head.data", "atlas-attention.figure",
                   "atlas-attn-sample.options", "atlas-changes.figure"):
        assert output in outputs, output
