"""The run page's attention section: its controls, the token text view, the multi-head grid, live prompts, and
their callbacks (`register`). The attention map and image overlay themselves are `Dashboard.show_attention`.

Every callback here is a plain function of its inputs, tested without a browser; the heavy lifting is
`interp.app.attention` (captures and kernels) and `interp.app.figures` (figures).
"""

from __future__ import annotations

import base64

import dash
import numpy as np
from dash import ALL, Input, Output, State, ctx, dcc, html

from . import figures
from .attention import Prompt, default_query, head_thumbnails, key_column, query_row

TEXT_TOKENS = 1024      # the text view shows at most this many tokens, around the selected one
PROMPT_CHARS = 20_000   # a typed prompt's longest text
UPLOAD_BYTES = 8 << 20  # an uploaded image's largest size
DIRECTIONS = {"from": "attention from the selected query", "to": "attention to the selected key"}
SCALE_LABELS = {"linear": "linear", "power": "power (√p)", "log": "log"}
ATTENTION_PLACEHOLDER = "this head's attention on the sample appears here: press the button above"
UPLOAD_HINT = "Drop or choose an image (optional)"
ERROR = {"color": "#a61b1b"}
# Shown while a callback of the section runs (Dash's `running`): a model loading, a sample replaying.
LOADING = [(Output("attention-loading", "style"), {"display": "block"}, {"display": "none"})]


def attention_panel(model_name: str) -> html.Div:
    """The attention section's controls and views (ids: compute, query, key, scale, text-direction, prompt-text,
    prompt-image, run-prompt, clear-prompt, prompt, attention-loading, attention-status, attention, grid-view,
    text-view, head-grid)."""
    controls = html.Div([
        html.Button(f"Compute attention (loads {model_name})", id="compute", n_clicks=0),
        html.Span(" query token ", title="click a cell of the map or a token of the text to choose it; empty: the "
                                         "first token (CLS) of an image-only input, else the last token"),
        dcc.Input(id="query", type="number", value=None, debounce=True, placeholder="auto", style={"width": "80px"}),
        html.Span(" colour scale "),
        dcc.RadioItems(id="scale", options=[{"label": v, "value": k} for k, v in SCALE_LABELS.items()],
                       value="linear", inline=True, style={"display": "inline-block"})],
        style={"display": "flex", "gap": "8px", "alignItems": "center", "flexWrap": "wrap"})
    prompt = html.Details([
        html.Summary("Live prompt: type any text (and, for image models, upload an image) to see this head on it"),
        dcc.Textarea(id="prompt-text", placeholder="Type a prompt…", maxLength=PROMPT_CHARS,
                     style={"width": "100%", "height": "70px"}),
        dcc.Upload(id="prompt-image", children=html.Span(UPLOAD_HINT),
                   accept="image/*", max_size=UPLOAD_BYTES,
                   style={"border": "1px dashed #999", "padding": "6px", "margin": "4px 0", "cursor": "pointer"}),
        html.Button("Run prompt", id="run-prompt", n_clicks=0),
        html.Button("Back to the sample", id="clear-prompt", n_clicks=0, style={"marginLeft": "8px"}),
        html.Span(id="prompt-state", style={"marginLeft": "8px", "color": "#555"})], style={"margin": "6px 0"})
    return html.Div([
        controls, prompt,
        html.Div("Loading the model and recomputing the view… (a run's first view loads its model: this can take "
                 "a while)", id="attention-loading", style={"display": "none", "color": "#8a5a00"}),
        html.Div(id="attention-status", style={"margin": "6px 0"}),
        html.Div([
            dcc.Graph(id="attention", style={"width": "720px", "height": "680px"},
                      figure=figures.placeholder_figure(ATTENTION_PLACEHOLDER)),
            dcc.Graph(id="grid-view", style={"width": "520px", "height": "480px", "display": "none"})],
            style={"display": "flex", "gap": "12px", "flexWrap": "wrap"}),
        html.Div([dcc.RadioItems(id="text-direction", options=[{"label": v, "value": k} for k, v in DIRECTIONS.items()],
                                 value="from", inline=True),
                  html.Div(id="text-view", style={"lineHeight": "1.9", "fontFamily": "ui-monospace, monospace",
                                                   "fontSize": "13px", "maxHeight": "320px", "overflowY": "auto",
                                                   "border": "1px solid #eee", "padding": "6px"})],
                 style={"margin": "8px 0"}),
        dcc.Graph(id="head-grid", style={"display": "none"}),
        dcc.Store(id="live", data=False), dcc.Store(id="region", data=None), dcc.Store(id="key", data=None),
        dcc.Store(id="prompt", data=None)], style={"flex": "1 1 720px"})


def prompt_of(data: dict | None) -> Prompt | None:
    """The live prompt a `prompt` store holds ({"text", "image": a data: URL or None}), or None (the sample)."""
    if not data:
        return None
    image = data.get("image")
    raw = base64.b64decode(image.split(",", 1)[1]) if image else None
    return Prompt(str(data.get("text") or "")[:PROMPT_CHARS], raw)


def choose_prompt(trigger: str | None, text: str | None, image: str | None) -> dict | None:
    """The `prompt` store after a click on "Run prompt" (the text and image typed), else None (the sample)."""
    if trigger != "run-prompt":
        return None
    if not (text or "").strip() and not image:
        raise ValueError("type a prompt or upload an image first")
    return {"text": (text or "")[:PROMPT_CHARS], "image": image}


def choose_focus(trigger, click: dict | None, query: int | None, key: int | None) -> tuple[int | None, int | None]:
    """(query, key) after a click on a map cell (its first query and key) or on a token of the text view (that
    token as query); (None, None), the defaults, after another sample or prompt; else unchanged."""
    if trigger in ("sample", "prompt"):
        return None, None
    if trigger == "attention" and click:
        cell = click["points"][0]["customdata"]  # a list, or a typed array's JSON: {"0": …, "1": …}
        first = (lambda i: cell[str(i)]) if isinstance(cell, dict) else cell.__getitem__
        return int(first(0)), int(first(2))
    if isinstance(trigger, dict) and trigger.get("type") == "token":
        return int(trigger["index"]), key
    return query, key


def text_view(tokens: list[str], values: np.ndarray, selected: int, scale: str = "linear") -> list:
    """The tokens of an input as text, each shaded by its value (a query's attention over keys, or a key's from
    queries), the selected token outlined; at most TEXT_TOKENS tokens around it. Every token is a clickable span
    with id {"type": "token", "index": position} and its value on hover."""
    n = len(tokens)
    start = min(max(0, selected - TEXT_TOKENS // 2), max(0, n - TEXT_TOKENS))
    shown = range(start, min(n, start + TEXT_TOKENS))
    z, _ = figures.scaled(np.asarray(values, dtype=float), scale)
    low, high = (np.nanmin(z), np.nanmax(z)) if scale == "log" else (0.0, np.nanmax(z))
    weight = (z - low) / (high - low) if high > low else np.zeros_like(z)
    spans = [html.Span(f"… {start} tokens before · ")] if start else []
    for i in shown:
        style = {"background": f"rgba(33,102,172,{0.85 * weight[i]:.3f})", "cursor": "pointer",
                 "whiteSpace": "pre-wrap", "color": "white" if weight[i] > 0.55 else "black",
                 "border": "1px solid #e8e8e8", "borderRadius": "2px"}
        if i == selected:
            style["outline"] = "2px solid #e4572e"
        spans.append(html.Span(tokens[i].replace("\n", "↵\n") or "∅", id={"type": "token", "index": i},
                               n_clicks=0, title=f"{i}: {values[i]:.4g}", style=style))
    if shown.stop < n:
        spans.append(html.Span(f" · … {n - shown.stop} tokens after"))
    return spans


def show_text(board, run_id: str, layer: int, head: int, sample: int, query: int | None, key: int | None,
              direction: str, scale: str = "linear", prompt: Prompt | None = None) -> list:
    """The text view of the chosen head on the sample (or live prompt): shaded by the attention from the selected
    query (`direction` "from"), or to the selected key ("to"; default: the query's most attended key)."""
    meta = board.catalog.replay_meta(run_id, sample)
    cap = board.attention.layer(meta, sample, layer, prompt)
    q = default_query(cap) if query is None or query < 0 else int(query)
    row = query_row(cap, head, q)
    if direction == "from":
        return [html.Div(f"attention from query {q} ({cap.tokens[q]!r}); click a token to choose the query",
                         style={"color": "#555"}), *text_view(cap.tokens, row, q, scale)]
    k = int(np.argmax(row)) if key is None else int(key)
    return [html.Div(f"attention to key {k} ({cap.tokens[k]!r}) from every query; click a cell of the map to "
                     "choose the key", style={"color": "#555"}), *text_view(cap.tokens, key_column(cap, head, k), k,
                                                                            scale)]


def show_head_grid(board, run_id: str, layer: int, head: int, sample: int, scale: str = "linear",
                   prompt: Prompt | None = None):
    """Every head of the layer as thumbnails on the same sample (or live prompt), the chosen head outlined."""
    meta = board.catalog.replay_meta(run_id, sample)
    cap = board.attention.layer(meta, sample, layer, prompt)
    thumbs, block = head_thumbnails(cap)
    return figures.head_grid(thumbs, block, cap.n_tokens, layer=layer, selected=head, scale=scale)


def describe_statistics(stats: dict) -> str:
    """A head's statistics (`head_statistics`) in a line."""
    sinks = ", ".join(map(str, stats["sinks"][:10])) + (" …" if len(stats["sinks"]) > 10 else "")
    return (f"mean entropy {stats['entropy']:.3g} nats · mean max p {stats['max_prob']:.3g} · mean distance "
            f"{stats['mean_distance']:.3g} tokens · first-token mass {stats['first_token_mass']:.3g} · sink tokens: "
            f"{sinks or 'none'}")


def sample_spans(result, sample: int) -> dict[str, tuple[int, int]]:
    """Token spans a run's samples table records for one sample: every `<name>_start` / `<name>_end` column pair
    (a retrieval sample's `span`: the answer inside the needle)."""
    rows = result.samples[result.samples["sample"] == sample]
    if rows.empty:
        return {}
    row = rows.iloc[0]
    names = [c.removesuffix("_start") for c in rows.columns
             if c.endswith("_start") and f"{c.removesuffix('_start')}_end" in rows.columns]
    return {("answer span" if n == "span" else n): (int(row[f"{n}_start"]), int(row[f"{n}_end"])) for n in names
            if np.isfinite(row[f"{n}_start"]) and np.isfinite(row[f"{n}_end"])}


def register(app: dash.Dash, board) -> None:
    """The attention section's callbacks beside the attention map's own (in `make_app`)."""
    @app.callback(Output("query", "value"), Output("key", "data"), Input("attention", "clickData"),
                  Input({"type": "token", "index": ALL}, "n_clicks"), Input("sample", "value"),
                  Input("prompt", "data"), State("query", "value"), State("key", "data"), prevent_initial_call=True)
    def _focus(click, _clicks, _sample, _prompt, query, key):
        if isinstance(ctx.triggered_id, dict) and not ctx.triggered[0]["value"]:
            raise dash.exceptions.PreventUpdate  # a token span drawn anew, not clicked
        return choose_focus(ctx.triggered_id, click, query, key)

    @app.callback(Output("prompt", "data"), Output("prompt-state", "children"), Input("run-prompt", "n_clicks"),
                  Input("clear-prompt", "n_clicks"), Input("sample", "value"), State("prompt-text", "value"),
                  State("prompt-image", "contents"), prevent_initial_call=True)
    def _prompt(_run, _clear, _sample, text, image):
        try:
            data = choose_prompt(ctx.triggered_id, text, image)
        except ValueError as e:
            return None, html.Span(str(e), style=ERROR)
        return data, "showing the live prompt" if data else ""

    @app.callback(Output("prompt-image", "children"), Input("prompt-image", "filename"), prevent_initial_call=True)
    def _image_name(name):
        return html.Span(f"image: {name} (drop or choose another)" if name else UPLOAD_HINT)

    @app.callback(Output("text-view", "children"), Input("live", "data"), Input("layer", "value"),
                  Input("head", "value"), Input("sample", "value"), Input("query", "value"), Input("key", "data"),
                  Input("text-direction", "value"), Input("scale", "value"), Input("prompt", "data"),
                  State("run-id", "data"), prevent_initial_call=True, running=LOADING)
    def _text(live, layer, head, sample, query, key, direction, scale, prompt, run_id):
        if not live:
            raise dash.exceptions.PreventUpdate
        try:
            return show_text(board, run_id, layer, head, sample, query, key, direction, scale, prompt_of(prompt))
        except Exception as e:  # noqa: BLE001
            return html.Span(str(e), style=ERROR)

    @app.callback(Output("head-grid", "figure"), Output("head-grid", "style"), Input("live", "data"),
                  Input("layer", "value"), Input("head", "value"), Input("sample", "value"), Input("scale", "value"),
                  Input("prompt", "data"), State("run-id", "data"), prevent_initial_call=True, running=LOADING)
    def _grid(live, layer, head, sample, scale, prompt, run_id):
        if not live:
            raise dash.exceptions.PreventUpdate
        try:
            fig = show_head_grid(board, run_id, layer, head, sample, scale, prompt_of(prompt))
            return fig, {"width": "100%", "height": f"{fig.layout.height}px"}
        except Exception as e:  # noqa: BLE001
            return figures.placeholder_figure(str(e), error=True), {"height": "200px"}

    @app.callback(Output("head", "value", allow_duplicate=True), Input("head-grid", "clickData"),
                  prevent_initial_call=True)
    def _open(click):
        if not click:
            raise dash.exceptions.PreventUpdate
        return int(click["points"][0]["curveNumber"])  # head h is trace h
