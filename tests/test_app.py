"""The dashboard without a browser: figure builders, the attention views against eager attention, the callbacks,
and its safety (store confinement, broken runs, no pickle)."""

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import interp
from interp.analyses.retrieval import masking_bars, retrieval_grid
from interp.analyses.taxonomy import ablation_bars
from interp.analyses.vit import distance_by_layer, pruning_curves, strength_by_distance
from interp.app import figures
from interp.app.attention import AttentionSource
from interp.app.dashboard import Dashboard, make_app
from interp.app.parts import zoom_region
from interp.cli import build_parser, main
from interp.compare import rank_correlation, top_overlap
from interp.files import UnreadableFileError, confined
from interp.store import CorruptRunError, RunNotFoundError
from tiny_models import make, vit_processor


def _heads(values, n_layers=3, n_heads=4, score="s"):
    layer, head = np.divmod(np.arange(n_layers * n_heads), n_heads)
    return pd.DataFrame({"layer": layer, "head": head, "kv_head": head // 2, score: values})


# ---- figure builders

def test_head_map_places_every_score_and_outlines_the_chosen_head():
    heads = _heads(np.arange(12.0)).drop(index=5)  # head 1-1 not scored
    fig = figures.head_map(heads, "s", selected=(2, 3))
    z = np.array(fig.data[0].z, dtype=float)
    assert z.shape == (3, 4) and z[2, 3] == 11 and z[0, 1] == 1 and np.isnan(z[1, 1])
    assert np.array(fig.data[0].customdata)[2, 3] == 1  # the KV head on hover
    (box,) = fig.layout.shapes
    assert (box.x0, box.x1, box.y0, box.y1) == (2.5, 3.5, 1.5, 2.5)
    with pytest.raises(ValueError, match="no score 'x'"):
        figures.head_map(heads, "x")
    assert fig.data[0].zmid is None  # a positive score: sequential
    signed = figures.head_map(_heads(np.arange(12.0) - 5), "s").data[0]  # an effect with both signs: diverging
    assert signed.zmid == 0 and signed.colorscale != fig.data[0].colorscale


def test_a_runs_words_in_titles_and_messages_are_text_not_markup():
    """Plotly reads <a href> in titles and annotations: a model name or an error quoting one draws no link."""
    link = '<a href="https://example.com">fix it here</a> & more'
    title = figures.head_map(_heads(np.arange(12.0)), "s", title=f"s — {link}").layout.title.text
    message = figures.placeholder_figure(f"cannot load {link}", error=True).layout.annotations[0].text
    for text in (title, message):
        assert "<a" not in text and "&lt;a href=" in text and "&amp; more" in text


def test_attention_map_cells_cover_their_tokens():
    pooled = figures.attention_map(np.ones((3, 2)), (10, 37), (0, 20), block=(10, 10))  # the last row: 7 queries
    assert list(pooled.data[0].y) == [9.5, 19.5, 29.5, 36.5] and list(pooled.data[0].x) == [-0.5, 9.5, 19.5]
    assert list(pooled.data[0].customdata[2][1][:4]) == [30, 36, 10, 19]  # queries 30–36, keys 10–19 (then p)
    assert "blocks of 10 queries × 10 keys" in pooled.layout.title.text
    exact = figures.attention_map(np.eye(2), (5, 7), (5, 7), q_tokens=["a", "b"], k_tokens=["a", "b"])
    assert list(exact.data[0].x) == [4.5, 5.5, 6.5] and exact.data[0].text[1][0] == "'b' → 'a'"


def test_sample_scores_are_the_heads_rows():
    samples = pd.DataFrame({"sample": [0, 0, 1, 1], "layer": [0, 1, 0, 1], "head": 0, "kv_head": 0,
                            "score": [0.1, 0.2, 0.3, 0.4], "length": [100, 100, 200, 200]})
    fig = figures.sample_scores(samples, 1, 0, "score", selected=1, describe=["length", "absent"])
    assert list(fig.data[0].y) == [0.2, 0.4] and list(fig.data[0].marker.color)[1] == "#e4572e"
    assert [list(c) for c in fig.data[0].customdata] == [[100], [200]]


def test_retrieval_grid_is_the_share_of_accepted_samples():
    samples = pd.DataFrame({"sample": [0, 0, 1, 2, 3], "length": [100, 100, 100, 200, 100],
                            "depth": [0.0, 0.0, 0.0, 50.0, 50.0], "accepted": [True, True, False, True, False]})
    fig = retrieval_grid(samples)
    z = np.array(fig.data[0].z, dtype=float)  # rows: depth 0, 50; columns: length 100, 200
    assert z[0, 0] == 50 and z[1, 0] == 0 and z[1, 1] == 100 and np.isnan(z[0, 1])


def test_masking_bars_group_conditions_by_k():
    masking = pd.DataFrame({"condition": ["none", "top", "random", "top", "random"], "k": [0, 2, 2, 4, 4],
                            "mode": "uniform", "niah_score": [90.0, 40.0, 85.0, 10.0, 80.0]})
    fig = masking_bars(masking)
    bars = {t.name: (list(t.x), list(t.y)) for t in fig.data}
    assert bars == {"none": (["0"], [90.0]), "top": (["2", "4"], [40.0, 10.0]), "random": (["2", "4"], [85.0, 80.0])}


def test_grid_overlay_scales_the_grid_onto_the_image():
    fig = figures.grid_overlay(np.arange(6.0).reshape(2, 3), np.zeros((20, 30, 3), np.uint8), title="t")
    image, heat = fig.data
    assert image.type == "image" and list(heat.x) == [4.5, 14.5, 24.5] and list(heat.y) == [4.5, 14.5]


def test_top_overlap_counts_jaccard_and_rank_correlation():
    a = _heads(np.arange(12.0))                         # best: 11, 10, 9, 8 ...
    b = _heads(np.r_[np.arange(12.0)[:10], -1.0, 20.0])  # head 2-2 (index 10) is last in B, 2-3 first
    ov = top_overlap(a, "s", b, "s", 3)
    assert ov.top_a == [(2, 3), (2, 2), (2, 1)] and ov.top_b == [(2, 3), (2, 1), (2, 0)]
    assert ov.shared == [(2, 3), (2, 1)] and ov.only_a == [(2, 2)] and ov.only_b == [(2, 0)]
    assert ov.jaccard == pytest.approx(2 / 4) and ov.of_smaller == pytest.approx(2 / 3)
    assert rank_correlation(a, "s", a, "s") == pytest.approx(1.0)
    assert rank_correlation(a, "s", a.assign(s=-a["s"]), "s") == pytest.approx(-1.0)
    fig = figures.compare_scatter(a, "s", b, "s", highlight=ov)
    assert {t.name: len(t.x) for t in fig.data} == {"other": 10, "top in both": 2}


# ---- attention views equal the model's eager attention

@pytest.fixture(scope="module")
def eager_stories():
    return interp.load_model("stories260k", attn_implementation="eager")


def _eager(model, inputs, layer, head):
    with torch.no_grad():
        out = model.hf(**inputs, output_attentions=True)
    return out.attentions[layer][0, head].float().numpy()


def test_pattern_views_equal_eager_attention(app_store, eager_stories):
    root, ids, _ = app_store
    result = interp.open_run(ids["summary"], store=root)
    source = AttentionSource()  # loads stories260k with its default (sdpa) attention, as `interp app` does
    layer, head = 3, 5
    sample = int(result.samples["sample"].iloc[0])
    inputs = interp.analyses.get_analysis("summary").sample_inputs(
        eager_stories, result.meta["plan"][sample], interp.analyses.Options.from_json(result.meta["options"]),
        result.meta["params"])
    p = _eager(eager_stories, inputs, layer, head)
    n = p.shape[0]
    assert n > 128  # long enough to be pooled

    whole = source.pattern(result.meta, sample, layer, head)
    block = -(-n // 128)
    assert not whole.exact and whole.matrix.shape == (-(-n // block),) * 2
    padded = np.zeros((whole.matrix.shape[0] * block,) * 2)
    padded[:n, :n] = p
    sums = padded.reshape(whole.matrix.shape[0], block, -1, block).sum((1, 3))
    rows = np.minimum(block, n - block * np.arange(len(sums)))
    np.testing.assert_allclose(whole.matrix, sums / np.outer(rows, rows), atol=1e-5)

    zoom = source.pattern(result.meta, sample, layer, head, (n - 40, n), (3, 43))
    assert zoom.exact and zoom.q_tokens[-1] == eager_stories.tokenizer.decode([int(inputs["input_ids"][0, -1])])
    np.testing.assert_allclose(zoom.matrix, p[n - 40:, 3:43], atol=1e-5)


def test_query_on_the_patch_grid_equals_eager_attention(tmp_path):
    hf, _ = make("vit", attn="eager")
    model = interp.load_model(hf, processor=vit_processor())
    run = interp.score(model, "sinks", samples=1, store=tmp_path)
    source = AttentionSource(models={model.name: model})
    values, image = source.query_on_grid(run.meta, 0, 1, 2, query=0)
    inputs = interp.analyses.get_analysis("sinks").sample_inputs(model, run.meta["plan"][0], None, run.meta["params"])
    p = _eager(model, inputs, 1, 2)
    grid = interp.layout.token_layout(model, inputs).grids[0]
    np.testing.assert_allclose(values, p[0][grid.positions.numpy()], atol=1e-5)
    assert image.dtype == np.uint8 and image.shape[2] == 3
    with pytest.raises(ValueError, match="outside"):
        source.query_on_grid(run.meta, 0, 1, 2, query=10_000)

    board = Dashboard(tmp_path, attention=source)  # the head detail shows the grid view for image inputs
    _, grid_fig, style, status, _ = board.show_attention(run.id, 1, 2, 0, query=0)
    assert style.get("display") != "none" and "exact per token" in status
    assert [t.type for t in grid_fig.data] == ["image", "heatmap"]
    np.testing.assert_allclose(np.array(grid_fig.data[1].z, dtype=float), values, atol=1e-6)


# ---- callbacks

@pytest.fixture(scope="module")
def board(app_store):
    return Dashboard(app_store[0])


def test_runs_page_lists_every_run_with_its_status(board, app_store):
    rows = {r["id"]: r for r in board.runs_rows()}
    _, ids, _ = app_store
    assert {rows[ids[k]]["status"] for k in ("summary", "retrieval", "sinks")} == {"complete"}
    assert rows[ids["incomplete"]]["status"] == "incomplete" and rows[ids["corrupt"]]["status"] == "corrupt"
    assert rows[ids["corrupt"]]["error"]
    assert rows[ids["retrieval"]]["samples"] == "6/6"


def test_broken_runs_become_messages(board, app_store):
    _, ids, _ = app_store
    assert "corrupt" in str(board.page(f"/run/{ids['corrupt']}"))
    assert "no finished sample" in str(board.page(f"/run/{ids['incomplete']}"))
    assert "no page" in str(board.page("/nowhere"))


def test_run_names_are_plain_text_in_the_runs_table(app_store, tmp_path):
    """Run directories named like markdown links to another site are listed as text: every row's one link, "open",
    leads to its own run page, which the link's (percent-encoded) address opens."""
    import re
    from urllib.parse import quote

    from markdown_it import MarkdownIt

    root, ids, _ = app_store
    names = ["click me](https:\\example.com\\x)[b", "[see](https:example.com) 100%"]
    for name in names:
        shutil.copytree(root / ids["summary"], tmp_path / name)
    board = Dashboard(tmp_path)
    [table] = [c for c in board.runs_page().children if getattr(c, "id", None) == "runs-table"]
    markdown = [c["id"] for c in table.columns if c.get("presentation") == "markdown"]
    for row in table.data:
        links = [re.findall(r'<a href="([^"]*)">(.*?)</a>', MarkdownIt("commonmark").render(row[c])) for c in markdown]
        assert row["id"] in names and links == [[(f"/run/{quote(row['id'], safe='')}", "open")]]
    assert "summary on stories260k" in str(board.page(f"/run/{quote(names[1], safe='')}"))


@pytest.mark.parametrize("run_id", ["../x", "/etc", "..", ".hidden", "a\\b", ""])
def test_run_ids_never_leave_the_store(board, run_id):
    with pytest.raises(RunNotFoundError):
        board.catalog.info(run_id)
    assert "no run" in str(board.page(f"/run/{run_id}")) or "no page" in str(board.page(f"/run/{run_id}"))


def test_a_run_directory_outside_the_store_is_refused(board, app_store, tmp_path):
    root, ids, _ = app_store
    outside = tmp_path / ids["summary"]
    outside.mkdir()
    (outside / "meta.json").write_text((root / ids["summary"] / "meta.json").read_text())
    with pytest.raises(RunNotFoundError):
        board.catalog.info(str(outside))


def test_choosing_a_head_updates_map_table_and_samples(board, app_store):
    _, ids, _ = app_store
    rows, columns = board.ranked(ids["summary"], "entropy")
    assert [c["id"] for c in columns] == ["rank", "layer", "head", "kv_head", "entropy"]
    heads = board.catalog.result(ids["summary"]).heads
    assert [r["entropy"] for r in rows] == list(heads["entropy"].sort_values(ascending=False).head(20).round(4))
    assert board.choose_head("head-map", {"points": [{"x": 6, "y": 2}]}, None, rows, 0, 0) == (2, 6)
    assert board.choose_head("ranked", None, {"row": 1}, rows, 0, 0) == (rows[1]["layer"], rows[1]["head"])
    run = ids["retrieval"]  # stories260k retrieves no needle: no retrieval score, but per-sample copy scores
    hmap, bars, title = board.show_head(run, "retrieval_score", 2, 6, 3)
    assert title.startswith("head 2-6 (KV head 3)")
    assert hmap.layout.shapes[0].x0 == 5.5
    samples = board.catalog.result(run).samples
    expected = samples[(samples["layer"] == 2) & (samples["head"] == 6)].sort_values("sample")["score"]
    assert list(bars.data[0].y) == list(expected)  # the per-sample retrieval score of that head
    assert board.choose_sample({"points": [{"x": 4}]}, 0) == 4


def test_attention_callback_zooms_from_pooled_to_exact(board, app_store):
    _, ids, _ = app_store
    fig, grid, style, status, region = board.show_attention(ids["summary"], 1, 0, 0)
    assert "pooled blocks" in status and style == {"display": "none"}
    relayout = {"xaxis.range[0]": 9.6, "xaxis.range[1]": 60.2, "yaxis.range[0]": 120.3, "yaxis.range[1]": 70.5}
    zoom = zoom_region(relayout, region)
    assert zoom == {"q": [71, 121], "k": [10, 61]}
    fig, _, _, status, region = board.show_attention(ids["summary"], 1, 0, 0, None, zoom)
    assert "exact per token" in status and region == zoom and np.array(fig.data[0].z).shape == (50, 51)
    assert zoom_region({"xaxis.autorange": True, "yaxis.autorange": True}, zoom) is None
    assert zoom_region({"autosize": True}, zoom) == zoom
    for bad in (float("nan"), float("inf"), "1e999", None):  # a crafted relayoutData: the region is kept
        assert zoom_region({"xaxis.range[0]": bad, "xaxis.range[1]": 3, "yaxis.range[0]": 0, "yaxis.range[1]": 3},
                     zoom) == {"q": [0, 4], "k": zoom["k"]}


def test_analysis_views_and_compare(board, app_store):
    _, ids, _ = app_store
    titles = lambda run: [g.figure.layout.title.text for g in board.analysis_view(board.catalog.result(run))]  # noqa: E731
    assert titles(ids["retrieval"])[0].startswith("needle retrieval by depth × length")
    sinks = titles(ids["sinks"])
    assert any(t.startswith("attention-sink rate per layer") for t in sinks)
    assert "massive activations per layer" in sinks and "first_token_mass per layer" in sinks
    summary, scatter, map_a, map_b = board.compare(ids["summary"], "first_token_mass", ids["sinks"],
                                                    "first_token_mass", 5)
    assert "top 5:" in str(summary) and len(scatter.data) >= 1 and map_b.layout.title.text.startswith("B:")
    assert board.score_choices(ids["retrieval"]) == (["retrieval_score"], "retrieval_score")
    assert board.score_choices(ids["circuits"], "again_eap") == (
        ["first_patching", "first_eap", "again_patching", "again_eap"], "again_eap")


def test_circuits_view_and_compare_by_magnitude(board, app_store):
    """The planted circuit: both tasks' circuits are heads 0.1 and 1.2, fully faithful; the view links to the
    compare page, which ranks by |effect| there."""
    _, ids, _ = app_store
    result = board.catalog.result(ids["circuits"])
    view = board.analysis_view(result)
    text = " ".join(str(x) for x in view)
    assert "first: circuit of 2 heads by first_patching" in text and "2 heads shared" in text
    link = next(x for x in view if "compare them" in str(x)).children[1].href
    assert link.startswith(f"/compare?a={ids['circuits']}&b={ids['circuits']}&sa=first_patching&sb=again_patching")
    graphs = [x.figure for x in view if hasattr(x, "figure")]
    faith = next(g for g in graphs if g.layout.title.text.startswith("faithfulness"))
    kept = dict(zip(faith.data[0].x, faith.data[0].y))
    assert kept[2] == pytest.approx(100, abs=1e-3)
    positions = [g for g in graphs if "at each position" in g.layout.title.text]
    assert len(positions) == 2 and sorted(positions[0].data[0].y) == ["0-1", "1-2"]
    page = board.page("/compare", "?" + link.split("?", 1)[1])
    assert "value='first_patching'" in str(page) and "value=['abs']" in str(page)
    summary, *_ = board.compare(ids["circuits"], "first_patching", ids["circuits"], "again_patching", 2, True)
    assert "top 2 by |score|: 2 heads shared" in str(summary)
    # the ranked table and the best head go by |effect| for a signed analysis
    rows, _ = board.ranked(ids["circuits"], "first_eap")
    assert {(r["layer"], r["head"]) for r in rows[:2]} == {(0, 1), (1, 2)}


def test_pages_never_unpickle(board, app_store, monkeypatch):
    calls = []  # recorded, not raised: the pages turn any exception into a message
    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, lambda *a, _n=name, **k: calls.append(_n))
    _, ids, _ = app_store
    board.catalog._cache.clear()
    pages = [board.page(path) for path in ["/", "/compare", *(f"/run/{i}" for i in ids.values())]]
    assert not calls
    assert sum("className='error'" in str(p) for p in pages) == 2  # only the corrupt and the empty run


def test_app_layout_and_cli(app_store, capsys):
    app = make_app(app_store[0])
    assert app.layout is not None and len(app.callback_map) >= 8
    args = build_parser().parse_args(["app"])
    assert (args.host, args.port, args.models) == ("127.0.0.1", 8050, None)
    assert build_parser().parse_args(["app", "--models", "a", "--models", "b/c"]).models == ["a", "b/c"]
    assert main(["app", "--store", str(app_store[0] / "nope")]) == 1
    assert "no store at" in capsys.readouterr().err
    assert main(["app", "--store", str(app_store[0]), "--port", "70000"]) == 2
    assert "--port 70000" in capsys.readouterr().err


def test_vision_views_paint_tokens_over_the_image(tmp_path):
    """Visual sink tokens (LLaVA, φ > τ) and ViT output norms are drawn on the image's patch grid, the values
    those of the run's tables; the head detail lays a text query's attention over the image."""
    from tiny_models import llava_with_processor

    hf, proc = llava_with_processor(n_layers=4)
    with torch.no_grad():  # a massive BOS dimension, as in test_sinks, so that there are visual sinks
        hf.get_input_embeddings().weight[1, 7] = 2000.0
    llava = interp.load_model(hf, processor=proc)
    run = interp.score(llava, "sinks", samples=1, tau=0.0, store=tmp_path)
    board = Dashboard(tmp_path, attention=AttentionSource(models={llava.name: llava}))
    views = {g.figure.layout.title.text: g.figure for g in board.analysis_view(board.catalog.result(run.id))}
    (title,) = [t for t in views if "visual sink tokens (φ > τ)" in t]
    phi = run.tables["phi"]
    layer = int(title.rsplit(" ", 1)[1])
    expect = phi[(phi["layer"] == layer) & (phi["segment"] == "image")].sort_values("position")["phi"].to_numpy()
    heat = views[title].data[-1]
    np.testing.assert_allclose(np.array(heat.z, dtype=float).ravel(), expect, rtol=1e-6)
    assert views[title].data[0].type == "image"
    _, grid_fig, style, _, _ = board.show_attention(run.id, 2, 1, 0)  # the last (text) token as query
    assert style.get("display") != "none" and np.array(grid_fig.data[1].z).shape == (4, 4)

    hf, _ = make("vit")
    vit = interp.load_model(hf, processor=vit_processor())
    run = interp.score(vit, "sinks", samples=2, store=tmp_path)
    views = {g.figure.layout.title.text: g.figure for g in board.analysis_view(board.catalog.result(run.id))}
    norms = run.tables["norms"]
    last = norms[(norms["sample"] == 0) & (norms["layer"] == norms["layer"].max()) & (norms["segment"] != "cls")]
    heat = views["sample 0: high-norm tokens"].data[-1]
    np.testing.assert_allclose(np.array(heat.z, dtype=float).ravel(), last.sort_values("position")["norm"], rtol=1e-6)
    assert any(t.startswith("output token norms") for t in views)


def test_taxonomy_and_vit_figures():
    pruning = pd.DataFrame({"order": ["most", "least", "most", "least"], "k": [0, 0, 1, 1],
                            "accuracy": [90.0, 90.0, 40.0, 89.0], "loss": [0.3, 0.3, 1.5, 0.31]})
    fig = pruning_curves(pruning)
    assert {t.name: list(t.y) for t in fig.data} == {"most important first": [90.0, 40.0],
                                                      "least important first": [90.0, 89.0]}
    strength = pd.DataFrame({"sample": [0, 1, 0, 1], "layer": 0, "head": 0, "distance": [0, 0, 1, 1],
                             "mass": 0.5, "per_key": [0.2, 0.4, 0.1, 0.3]})
    assert list(strength_by_distance(strength, 0).data[0].y) == pytest.approx([0.3, 0.2])
    ablation = pd.DataFrame({"condition": ["none", "induction"], "k": [0, 2], "mode": "zero",
                             "loss_first": [6.0, 6.1], "loss_repeated": [1.0, 5.0]})
    assert list(ablation_bars(ablation).data[1].y) == [1.0, 5.0]
    heads = _heads(np.arange(12.0))
    assert list(distance_by_layer(heads, "s").data[0].y) == list(np.arange(12.0))


def test_requests_for_other_hosts_are_refused(app_store):
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 reaches the app with Host: evil.example."""
    client = make_app(app_store[0]).server.test_client()
    for host in ("127.0.0.1:8050", "localhost:8050", "[::1]:8050", "LOCALHOST"):
        assert client.get("/", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example:8050", "evil.example", "127.0.0.1.evil.example"):
        refused = client.get("/", headers={"Host": host})
        assert refused.status_code == 403 and b"--allow-host" in refused.data, host
    assert client.post("/_dash-update-component", headers={"Host": "evil.example"}, json={}).status_code == 403
    assert make_app(app_store[0], hosts=["*"]).server.test_client().get(
        "/", headers={"Host": "evil.example"}).status_code == 200


def test_a_planted_run_cannot_make_the_app_read_files_outside_the_store(app_store, tmp_path, monkeypatch):
    """A run whose plan names an image outside the store (or through a symlink leaving it): serving its page opens
    nothing outside the store; the same image copied into the store is drawn."""
    import os

    import interp.files
    from interp.analyses.images import synthetic_image

    store = tmp_path / "store"
    secret = tmp_path / "secret.png"
    synthetic_image(0).save(secret)
    source = interp.list_runs(app_store[0])
    vit_run = next(i for i in source if i.meta and i.meta["analysis"] == "sinks" and i.meta["model"]["family"] == "vit")
    opened, real_open = [], interp.files.open_regular

    def recording(path, limit):  # every file read through interp.files, as the file it opened
        f = real_open(path, limit)
        opened.append((os.fstat(f.fileno()).st_dev, os.fstat(f.fileno()).st_ino))
        return f

    monkeypatch.setattr(interp.files, "open_regular", recording)
    inside = store / "inside.png"
    for name, image in [("outside", secret), ("link", store / "link.png"), ("inside", inside)]:
        run = store / f"{vit_run.id[:-6]}{name}"
        shutil.copytree(vit_run.path, run)
        meta = json.loads((run / "meta.json").read_text())
        meta["id"] = run.name
        for entry in meta["plan"]:
            entry["image"] = str(image)
        (run / "meta.json").write_text(json.dumps(meta))
    (store / "link.png").symlink_to(secret)
    shutil.copy(secret, inside)
    client = make_app(store).server.test_client()
    for run in sorted(p.name for p in store.iterdir() if p.is_dir()):
        body = {"output": "page.children", "outputs": {"id": "page", "property": "children"},
                "inputs": [{"id": "url", "property": "pathname", "value": f"/run/{run}"},
                           {"id": "url", "property": "search", "value": ""}], "changedPropIds": ["url.pathname"]}
        assert client.post("/_dash-update-component", json=body, headers={"Host": "127.0.0.1"}).status_code == 200
    identity = lambda path: (path.stat().st_dev, path.stat().st_ino)  # noqa: E731
    assert identity(secret) not in opened and identity(inside) in opened  # the store's own copy is drawn


def test_a_run_keeps_its_inputs_and_the_app_replays_them_without_the_originals(app_store, tmp_path):
    """User images and a prompts file are copied into the run; with the originals deleted, the app still draws the
    image under the grid view (as drawn from the original) and recomputes the attention of a prompt-file sample."""
    from interp.analyses.images import synthetic_image

    originals = tmp_path / "mine"
    originals.mkdir()
    for i in range(2):
        synthetic_image(10 + i).save(originals / f"scene {i}.png")
    prompts = originals / "prompts.txt"
    prompts.write_text("Once upon a time there was a cat.\nThe dog ran to the park and played.\n")
    vit = next(m for m in app_store[2].values() if m.family.kind == "vit")
    store = tmp_path / "store"
    vit_run = interp.score(vit, "sinks", images=str(originals), samples=2, store=store)
    text_run = interp.score("stories260k", "summary", prompts=str(prompts), samples=2, store=store)
    kept = vit_run.meta["kept_inputs"]
    assert sorted(Path(p).name for p in kept) == ["scene 0.png", "scene 1.png"]
    for recorded, name in kept.items():
        assert (vit_run.path / name).read_bytes() == Path(recorded).read_bytes()
    assert list(text_run.meta["kept_inputs"]) == [str(prompts.resolve())]
    _, expected = AttentionSource(models={vit.name: vit}).query_on_grid(vit_run.meta, 0, 1, 0, query=0)
    shutil.rmtree(originals)

    board = Dashboard(store, attention=AttentionSource(models={vit.name: vit}))
    _, grid_fig, style, status, _ = board.show_attention(vit_run.id, 1, 0, 0, query=0)
    assert style.get("display") != "none" and "exact per token" in status
    np.testing.assert_array_equal(np.asarray(grid_fig.data[0].z), expected)
    _, _, _, status, _ = board.show_attention(text_run.id, 1, 0, 1)
    tokens = board.attention.layer(board.catalog.replay_meta(text_run.id, 1), 1, 1).tokens
    assert "exact per token" in status and "played" in "".join(tokens)


def test_a_copied_run_claiming_the_same_id_never_shows_in_the_genuine_one(app_store, tmp_path):
    """A copy of a run keeping its meta.json's id but planting another input, viewed first: the genuine run's view
    is its own (the captures are cached by what they replay, not by the id a run claims)."""
    root, ids, _ = app_store
    genuine, planted = tmp_path / ids["summary"], tmp_path / f"{ids['summary'][:-6]}planted"
    shutil.copytree(root / ids["summary"], genuine)
    shutil.copytree(genuine, planted)
    meta = json.loads((planted / "meta.json").read_text())
    meta["plan"][0]["text"] = "The zebra ate the planted secret. " * 4
    (planted / "meta.json").write_text(json.dumps(meta))
    board = Dashboard(tmp_path)
    assert board.catalog.result(planted.name).id == board.catalog.result(genuine.name).id
    board.show_attention(planted.name, 1, 0, 0)
    assert "zebra" in "".join(board.attention.layer(board.catalog.replay_meta(planted.name, 0), 0, 1).tokens)
    board.show_attention(genuine.name, 1, 0, 0)
    shown = board.attention.layer(board.catalog.replay_meta(genuine.name, 0), 0, 1).tokens
    assert shown == AttentionSource().layer(Dashboard(tmp_path).catalog.replay_meta(genuine.name, 0), 0, 1).tokens
    assert "zebra" not in "".join(shown)


def test_an_input_copy_changed_or_hard_linked_out_of_the_store_is_not_replayed(tmp_path):
    """A run's kept prompts file edited after the run (its sha256 is no longer the recorded one), or replaced by a hard
    link to a file outside the store: the attention view refuses it instead of showing its words."""
    prompts, secret = tmp_path / "prompts.txt", tmp_path / "secret.txt"
    prompts.write_text("Once upon a time there was a cat.\nThe dog ran to the park and played.\n")
    secret.write_text("The zebra password is hunter two.\n")
    store = tmp_path / "store"
    run = interp.score("stories260k", "summary", prompts=str(prompts), samples=2, store=store)
    copy = run.path / run.meta["kept_inputs"][str(prompts.resolve())]
    board = Dashboard(store)
    copy.write_text("The zebra ate the cat.\nThe zebra ran to the park.\n")
    with pytest.raises(CorruptRunError, match="differs from the sha256 the run recorded"):
        board.show_attention(run.id, 1, 0, 0)
    copy.unlink()
    copy.hardlink_to(secret)
    with confined(store), pytest.raises(UnreadableFileError, match="2 names"):  # as the app confines every request
        board.show_attention(run.id, 1, 0, 0)
    copy.unlink()
    shutil.copy(prompts, copy)  # the genuine copy again: replayed, as the app serves it (the model loads from its
    with confined(store):     # own folder, outside the store; the input from the run's copy)
        assert "exact per token" in Dashboard(store).show_attention(run.id, 1, 0, 0)[3]


def test_the_dashboard_loads_only_aliases_and_the_models_it_is_allowed(app_store, tmp_path, monkeypatch):
    """A run naming a model folder (one that loads, a system folder, a missing one, a hub id) is refused with one
    message, and nothing is loaded; `allow` (interp app --models DIR) admits the folders below DIR, not a symlink
    out of it."""
    import interp.app.attention as attention
    from interp.models import alias_path

    root, ids, _ = app_store
    meta = interp.open_run(ids["summary"], store=root).meta
    models = tmp_path / "models"
    shutil.copytree(alias_path("stories260k"), models / "ctx")
    (models / "out").symlink_to(alias_path("stories260k"))
    loaded, load = [], attention.load_model
    monkeypatch.setattr(attention, "load_model", lambda name, **kw: (loaded.append(name), load(name, **kw))[1])

    def refusal(source, name):
        with pytest.raises(ValueError) as e:
            source.model({**meta, "model": {**meta["model"], "name": name}})
        return str(e.value).replace(repr(name), "NAME")

    names = [str(models / "ctx"), "/etc", str(tmp_path / "missing"), "someone/model", str(models / "out")]
    assert len({refusal(AttentionSource(), name) for name in names}) == 1 and loaded == []
    allowed = AttentionSource(allow=[models])
    assert refusal(allowed, str(models / "out")) == refusal(allowed, "/etc") and loaded == []
    assert allowed.model({**meta, "model": {**meta["model"], "name": str(models / "ctx")}}).n_layers() == 5
    assert AttentionSource(allow=["someone/model"]).may_load("someone/model") and loaded == [str(models / "ctx")]


def test_views_read_well(board, app_store):
    """Every layer axis of the analysis views has integer ticks only; the views sit in a responsive grid; the
    attention panel shows no empty axes before "Compute attention"."""
    _, ids, _ = app_store
    layer_axes = 0
    for kind in ("sinks", "vit", "summary"):
        for graph in board.analysis_view(board.catalog.result(ids[kind])):
            axis = graph.figure.layout.xaxis
            if axis.title.text == "layer":
                layer_axes += 1
                assert axis.tickmode == "linear" and axis.tick0 == 0 and axis.tickformat == "d", graph.figure.layout.title
                assert axis.dtick == int(axis.dtick) >= 1
    assert layer_axes >= 4
    page = board.page(f"/run/{ids['sinks']}", "")
    found = {}

    def walk(node):
        if getattr(node, "id", None) in ("analysis-view", "attention"):
            found[node.id] = node
        children = getattr(node, "children", None)
        for child in children if isinstance(children, (list, tuple)) else [children] if children is not None else []:
            walk(child)

    walk(page)
    assert found["analysis-view"].style["display"] == "grid"
    attention = found["attention"].figure
    assert attention.layout.xaxis.visible is False and attention.layout.yaxis.visible is False
    assert "press the button" in attention.layout.annotations[0].text
