"""The run page's attention views without a browser (issue 31): decoded tokens on the axes, span overlays, the
colour-scale toggle, the token text view, the multi-head grid, the image overlay and live prompts."""

import base64
import io

import numpy as np
import pytest
import torch

from transformers import AutoTokenizer

import interp
from interp.app import figures, views
from interp.app.attention import (AttentionSource, LayerCapture, Prompt, default_query, head_statistics,
                                  head_thumbnails, key_column, query_row, token_spans, token_text)
from interp.app.dashboard import Dashboard, make_app
from interp.kernels import AttentionGeometry
from interp.layout import TokenLayout
from interp.models import alias_path


@pytest.fixture(scope="module")
def board(app_store):
    root, _, models = app_store
    return Dashboard(root, attention=AttentionSource(models=models))


@pytest.fixture(scope="module")
def eager():
    return interp.load_model("stories260k", attn_implementation="eager")


def _summary_capture(board, app_store, layer=2):
    _, ids, _ = app_store
    meta = board.catalog.replay_meta(ids["summary"], 0)
    return meta, board.attention.layer(meta, 0, layer)


def _png(seed=3) -> bytes:
    from interp.analyses.images import synthetic_image

    out = io.BytesIO()
    synthetic_image(seed).save(out, format="PNG")
    return out.getvalue()


# ---- tokens

def test_tokens_are_decoded_text_with_specials_named(eager):
    tok = eager.tokenizer
    ids = tok("Once upon a time,\nthe cat")["input_ids"]
    texts = [token_text(tok, i) for i in ids]
    # SentencePiece: a special token by its name, ▁ as a space, <0x0A> as a newline
    assert texts == ["<s>", " Once", " upon", " a", " time", ",", "\n", "t", "he", " c", "at"]
    bpe = AutoTokenizer.from_pretrained(alias_path("smollm2-135m"))  # byte-level BPE: Ġ for a space, Ċ a newline
    ids = bpe("<|im_start|>Hello world,\n the cat")["input_ids"]
    assert [token_text(bpe, i) for i in ids] == ["<|im_start|>", "Hello", " world", ",", "\n", " the", " cat"]
    assert figures.token_label(" upon") == "␣upon" and figures.token_label("\n") == "↵"
    assert figures.token_label("  ") == "␣␣" and figures.token_label("patch 1,2") == "patch 1,2"
    assert figures.token_label("<s>") == "&lt;s&gt;"


def test_exact_maps_carry_the_tokens_on_both_axes():
    tokens = ["<s>", " The", " cat"]
    fig = figures.attention_map(np.tril(np.ones((3, 3))) / np.arange(1, 4)[:, None], (0, 3), (0, 3),
                                q_tokens=tokens, k_tokens=tokens)
    assert list(fig.layout.xaxis.ticktext) == ["&lt;s&gt;", "␣The", "␣cat"]
    assert list(fig.layout.yaxis.ticktext) == list(fig.layout.xaxis.ticktext)
    assert list(fig.layout.xaxis.tickvals) == [0, 1, 2]
    many = [f" w{i}" for i in range(100)]  # every second token labelled: no overlapping labels
    wide = figures.attention_map(np.ones((100, 100)), (5, 105), (5, 105), q_tokens=many, k_tokens=many).layout
    assert list(wide.xaxis.tickvals) == list(range(5, 105, 2)) and wide.yaxis.ticktext[1] == "␣w2"
    pooled = figures.attention_map(np.ones((2, 2)), (0, 10), (0, 10), block=(5, 5))
    assert pooled.layout.xaxis.ticktext is None  # positions, not tokens, on a pooled map


# ---- spans, selection, scales

def test_spans_are_bands_beside_both_axes_with_one_legend_entry_each():
    spans = [("bos", 0, 1), ("image", 2, 6), ("image", 8, 9), ("sink", 30, 31)]
    fig = figures.attention_map(np.ones((10, 10)), (0, 10), (0, 10), spans=spans, selected=(4, 7))
    bands = [s for s in fig.layout.shapes if s.name in ("bos", "image", "sink")]
    assert len(bands) == 6  # bos and both image runs, on each axis; the sink lies outside the region
    assert sum(bool(s.showlegend) for s in bands) == 2
    keys = [s for s in bands if s.yref == "paper"]
    assert {(s.x0, s.x1) for s in keys} == {(-0.5, 0.5), (1.5, 5.5), (7.5, 8.5)}
    outlines = {s.name: s for s in fig.layout.shapes if s.name and s.name.startswith("selected")}
    assert (outlines["selected query"].y0, outlines["selected key"].x0) == (3.5, 6.5)


def test_the_scale_toggle_changes_the_colours_and_keeps_probabilities_on_the_bar():
    m = np.array([[1.0, 0.0], [0.99, 0.01]])
    linear, power, log = (figures.attention_map(m, (0, 2), (0, 2), scale=s).data[0] for s in figures.ATTENTION_SCALES)
    np.testing.assert_allclose(np.array(power.z, dtype=float), np.sqrt(m))
    np.testing.assert_allclose(np.array(log.z, dtype=float), np.log10(np.clip(m, 1e-4, None)))
    assert "0.0001" in list(log.colorbar.ticktext) and linear.colorbar.ticktext is None
    assert np.array(log.customdata)[1, 1, 4] == pytest.approx(0.01)  # hover shows p itself
    with pytest.raises(ValueError, match="unknown scale"):
        figures.scaled(m, "cubic")


def test_score_colour_scales_fit_the_quantity():
    recall = figures.color_scale("a_shape_recall", np.array([0.2, 1.0 + 1e-7, np.nan]))  # rounding over 1
    assert (recall["zmin"], recall["zmax"]) == (0.0, 1.0)
    mass = figures.color_scale("first_token_mass", np.array([0.05, 0.06]))  # from 0: equal heads look equal
    assert (mass["zmin"], mass["zmax"]) == (0.0, 0.06)
    assert figures.color_scale("sink_rate_random", np.array([30.0, 130.0]))["zmax"] == 100.0
    assert figures.color_scale("sink_rate", np.array([0.0]))["zmax"] == 100.0
    assert "zmax" not in figures.color_scale("entropy", np.array([0.5, 3.0]))
    assert figures.color_scale("eap", np.array([-1.0, 2.0]))["zmid"] == 0.0


# ---- image overlay

def test_the_image_keeps_its_brightness_under_the_grid():
    image = np.full((20, 30, 3), 200, np.uint8)
    fig = figures.grid_overlay(np.arange(6.0).reshape(2, 3), image, title="t")
    picture, heat = fig.data
    np.testing.assert_array_equal(np.asarray(picture.z), image)
    assert heat.colorscale[0][1].endswith(",0.000)")  # the lowest value leaves the image as it is
    (lines,) = fig.layout.shapes
    assert lines.path.count("M") == (3 + 1) + (2 + 1)  # every patch border


# ---- kernels' views equal eager attention

def test_rows_columns_statistics_and_thumbnails_equal_eager_attention(board, app_store, eager):
    _, ids, _ = app_store
    meta, cap = _summary_capture(board, app_store)
    result = interp.open_run(ids["summary"], store=app_store[0])
    inputs = interp.analyses.get_analysis("summary").sample_inputs(
        eager, meta["plan"][0], interp.analyses.Options.from_json(meta["options"]), result.meta["params"])
    with torch.no_grad():
        p = eager.hf(**inputs, output_attentions=True).attentions[2][0].float().numpy()  # (H, N, N)
    n, head = p.shape[1], 5
    np.testing.assert_allclose(query_row(cap, head, n - 3), p[head, n - 3], atol=1e-5)
    np.testing.assert_allclose(key_column(cap, head, 0), p[head, :, 0], atol=1e-5)
    stats = head_statistics(cap, head)
    entropy = -(p[head] * np.log(np.clip(p[head], 1e-30, None))).sum(-1)
    assert stats["entropy"] == pytest.approx(entropy.mean(), abs=1e-4)
    assert stats["first_token_mass"] == pytest.approx(p[head, :, 0].mean(), abs=1e-5)
    seen = np.arange(n, 0, -1)  # causal: key j is seen by n − j queries
    for h in range(p.shape[0]):
        assert head_statistics(cap, h)["sinks"] == list(np.flatnonzero((p[h].sum(0) / seen >= 0.3) & (seen >= 16)))
    thumbs, block = head_thumbnails(cap)
    assert thumbs.shape == (p.shape[0], -(-n // block), -(-n // block)) and block == -(-n // 32)
    np.testing.assert_allclose(thumbs[head, 0, 0], p[head, :block, :block].mean(), atol=1e-5)


def test_a_key_every_query_attends_to_is_a_sink_and_draws_a_span():
    n, d = 40, 4
    q = torch.ones(1, 1, n, d)
    k = torch.zeros(1, 1, n, d)
    k[0, 0, 0] = k[0, 0, 20] = 5.0  # keys 0 and 20 take nearly all the attention of the queries that see them
    cap = LayerCapture(q, k, AttentionGeometry(), ["t"] * n, TokenLayout(["text"], torch.zeros(1, n, dtype=torch.long)),
                       None)
    stats = head_statistics(cap, 0)
    assert stats["sinks"] == [0, 20] and stats["first_token_mass"] > 0.5
    assert token_spans(cap, sinks=stats["sinks"]) == [("sink", 0, 1), ("sink", 20, 21)]
    k[0, 0, 35] = 50.0  # seen by only 5 queries: too few to call it a sink
    assert head_statistics(cap, 0)["sinks"] == [0, 20]


def test_spans_come_from_the_layout_the_run_and_the_sinks(board, app_store):
    _, ids, _ = app_store
    meta = board.catalog.replay_meta(ids["retrieval"], 0)
    cap = board.attention.layer(meta, 0, 1)
    extra = views.sample_spans(board.catalog.result(ids["retrieval"]), 0)
    samples = board.catalog.result(ids["retrieval"]).samples
    row = samples[samples["sample"] == 0].iloc[0]
    assert extra == {"answer span": (int(row["span_start"]), int(row["span_end"]))}
    spans = token_spans(cap, extra, sinks=[0])
    assert ("bos", 0, 1) in spans and ("sink", 0, 1) in spans
    assert ("answer span", int(row["span_start"]), int(row["span_end"])) in spans

    fig, *_, status, _ = board.show_attention(ids["retrieval"], 1, 0, 0)
    names = {s.name for s in fig.layout.shapes}
    assert {"bos", "answer span"} <= names and "mean entropy" in status and "sink tokens" in status


# ---- the dashboard's attention section

def test_show_attention_outlines_the_selection_and_scales_the_map(board, app_store):
    _, ids, _ = app_store
    zoom = {"q": [20, 40], "k": [0, 30]}
    fig, *_ = board.show_attention(ids["summary"], 1, 0, 0, 25, zoom, key=3, scale="log")
    assert list(fig.layout.yaxis.tickvals) == list(range(20, 40)) and len(fig.layout.xaxis.ticktext) == 30
    assert {"selected query", "selected key"} <= {s.name for s in fig.layout.shapes}
    assert "log" in fig.data[0].colorbar.title.text
    linear, *_ = board.show_attention(ids["summary"], 1, 0, 0, 25, zoom, key=3)
    assert not np.allclose(np.array(linear.data[0].z, float), np.array(fig.data[0].z, float))


def test_clicks_choose_the_query_and_key():
    cell = {"points": [{"customdata": [12, 12, 4, 4, 0.3]}]}
    assert views.choose_focus("attention", cell, 0, None) == (12, 4)
    typed = {"points": [{"customdata": {"0": 12, "1": 12, "2": 4, "3": 4, "4": 0.3}}]}  # a typed array's JSON
    assert views.choose_focus("attention", typed, 0, None) == (12, 4)
    assert views.choose_focus({"type": "token", "index": 7}, None, 12, 4) == (7, 4)
    assert views.choose_focus("head", None, 12, 4) == (12, 4)  # the same position on another head
    assert views.choose_focus("sample", None, 12, 4) == (None, None)


def test_the_text_view_colours_tokens_from_the_query_and_to_the_key(board, app_store):
    _, ids, _ = app_store
    meta, cap = _summary_capture(board, app_store, layer=1)
    q = 30
    view = views.show_text(board, ids["summary"], 1, 0, 0, q, None, "from")
    spans = [c for c in view if isinstance(getattr(c, "id", None), dict)]
    assert [s.id["index"] for s in spans] == list(range(cap.n_tokens))
    assert "".join(s.children for s in spans).replace("↵\n", "\n") == "".join(cap.tokens)
    row = query_row(cap, 0, q)
    shade = np.array([float(s.style["background"].rsplit(",", 1)[1][:-1]) for s in spans])
    assert shade.argmax() == row.argmax() and np.all(shade[q + 1:] == 0)  # causal: no later key
    assert spans[q].style["outline"].startswith("2px")
    view = views.show_text(board, ids["summary"], 1, 0, 0, q, 2, "to")
    spans = [c for c in view if isinstance(getattr(c, "id", None), dict)]
    shade = np.array([float(s.style["background"].rsplit(",", 1)[1][:-1]) for s in spans])
    assert np.all(shade[:2] == 0) and shade[2:].max() > 0 and "key 2" in view[0].children
    assert spans[5].title == f"5: {key_column(cap, 0, 2)[5]:.4g}"


def test_the_multi_head_grid_shows_every_head_and_opens_one(board, app_store):
    _, ids, _ = app_store
    fig = views.show_head_grid(board, ids["summary"], 1, 3, 0)
    assert len(fig.data) == 8 and [a.text for a in fig.layout.annotations] == [f"head {h}" for h in range(8)]
    (box,) = fig.layout.shapes
    assert box.xref == "x4 domain" and box.yref == "y4 domain"


def test_vit_views_start_from_cls(board, app_store):
    _, ids, _ = app_store
    meta = board.catalog.replay_meta(ids["vit"], 0)
    cap = board.attention.layer(meta, 0, 1)
    assert default_query(cap) == 0
    _, grid, style, status, _ = board.show_attention(ids["vit"], 1, 0, 0)
    assert "query 0" in grid.layout.title.text and style.get("display") != "none"
    assert ("cls", 0, 1) in token_spans(cap)


def test_live_prompts_draw_the_head_on_any_text_or_image(board, app_store):
    _, ids, _ = app_store
    prompt = views.prompt_of(views.choose_prompt("run-prompt", "The cat sat on the mat.", None))
    fig, _, _, status, _ = board.show_attention(ids["summary"], 1, 0, 0, prompt=prompt)
    assert "your prompt" in fig.layout.title.text and "exact per token" in status and "mean entropy" in status
    assert "␣on" in fig.layout.xaxis.ticktext and "␣the" in fig.layout.yaxis.ticktext
    assert views.show_head_grid(board, ids["summary"], 1, 0, 0, prompt=prompt).data[0].z is not None
    assert views.choose_prompt("clear-prompt", "x", None) is None
    with pytest.raises(ValueError, match="type a prompt"):
        views.choose_prompt("run-prompt", "  ", None)

    url = "data:image/png;base64," + base64.b64encode(_png()).decode()
    image_prompt = views.prompt_of({"text": "", "image": url})
    assert image_prompt == Prompt("", _png())
    _, grid, style, status, _ = board.show_attention(ids["vit"], 1, 0, 0, prompt=image_prompt)
    assert "exact per token" in status and [t.type for t in grid.data] == ["image", "heatmap"]
    with pytest.raises(ValueError, match="upload an image"):
        board.show_attention(ids["vit"], 1, 0, 0, prompt=Prompt("words only"))


def test_the_section_is_wired(app_store):
    app = make_app(app_store[0])
    outputs = " ".join(app.callback_map)
    for target in ("text-view.children", "head-grid.figure", "prompt.data", "query.value", "head.value@"):
        assert target in outputs, target


def test_a_live_prompt_with_an_image_on_a_vision_language_model(tmp_path):
    """An LVLM's live prompt: typed words with an uploaded image put the image's tokens on the map (a span) and the
    query's attention over the image; the same words without an image are a text-only input."""
    from tiny_models import llava_with_processor

    hf, proc = llava_with_processor(n_layers=2)
    llava = interp.load_model(hf, processor=proc)
    run = interp.score(llava, "sinks", samples=1, store=tmp_path)
    board = Dashboard(tmp_path, attention=AttentionSource(models={llava.name: llava}))
    with_image = Prompt("w5 w6 w7", _png())
    fig, grid, style, status, _ = board.show_attention(run.id, 1, 0, 0, prompt=with_image)
    assert "image" in {s.name for s in fig.layout.shapes} and style.get("display") != "none"
    assert [t.type for t in grid.data] == ["image", "heatmap"] and "query" in grid.layout.title.text
    cap = board.attention.layer(board.catalog.replay_meta(run.id, 0), 0, 1, with_image)
    assert cap.tokens[:2] == ["<s>", "patch 0,0"] and cap.tokens[-3:] == ["w5", "w6", "w7"]
    _, _, style, status, _ = board.show_attention(run.id, 1, 0, 0, prompt=Prompt("w5 w6 w7"))
    assert style == {"display": "none"} and "exact per token" in status
