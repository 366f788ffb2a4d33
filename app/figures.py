"""The generic plotly figure builders (head map, attention map, every head's thumbnail, grid overlay, per-layer
profile, comparison), shared by the dashboard, the analyses' own views and the notebooks (and `ScoreResult.plot`).

Every builder takes tables (pandas) or small arrays and returns a `plotly.graph_objects.Figure`; none reads
the store or touches a model, so a notebook draws exactly what the dashboard shows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.colors as pc
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from interp.compare import Overlap

# Colour scales that suit a score: sequential by default, named here where another reads better; a score with
# both signs (an effect, a difference) gets a diverging scale centred on 0.
COLOR_SCALES = {"entropy": "Cividis", "first_token_mass": "Reds", "distance": "Cividis"}
DIVERGING = "RdBu_r"
ATTENTION_SCALE = "Blues"
ATTENTION_SCALES = ("linear", "power", "log")  # colour axes of an attention map (`scaled`)
LOG_FLOOR = 1e-4     # the log scale's lowest probability
TOKEN_TICKS = 64     # an exact map labels at most this many tokens per axis
# A score's natural range by its name (`score_range`), tried in order.
SCORE_RANGES = ((r"_rate(_|$)", (0.0, 100.0)),
                (r"(recall|mass|portion|share|max_prob|retrieval_score)$|^(cls|sep|delimiter|register|high_norm|"
                 r"image|visual_sink)$", (0.0, 1.0)))
SPAN_COLOURS = ("#e4572e", "#29a329", "#8e44ad", "#f4a300", "#17becf", "#d62728", "#7f7f7f", "#bcbd22")
TEMPLATE = "plotly_white"


def plain(text: str) -> str:
    """`text` (a run's words: a model name, an error) shown as written: plotly reads <a href=…>, <b>… in titles and
    annotations as markup, which would let a run draw a link to another site."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def score_columns(heads: pd.DataFrame) -> list[str]:
    """The score columns of a heads table (everything but the head's coordinates)."""
    return [c for c in heads.columns if c not in ("layer", "head", "kv_head")]


def head_map(heads: pd.DataFrame, score: str, *, title: str | None = None,
             selected: tuple[int, int] | None = None) -> go.Figure:
    """Layer × head heatmap of one score column of a heads table (`layer`, `head`, `kv_head`, scores).

    Hover shows layer, head, KV head and value; heads not in the table are blank. selected: (layer, head)
    outlined."""
    if heads.empty:
        raise ValueError("the heads table is empty: nothing to plot")
    if score not in heads.columns:
        raise ValueError(f"no score {score!r} in this table; it has: {', '.join(score_columns(heads))}")
    n_layers, n_heads = int(heads["layer"].max()) + 1, int(heads["head"].max()) + 1
    z = np.full((n_layers, n_heads), np.nan)
    kv = np.full((n_layers, n_heads), -1)
    layer, head = heads["layer"].to_numpy(int), heads["head"].to_numpy(int)
    z[layer, head] = heads[score].to_numpy(float)
    kv[layer, head] = heads["kv_head"].to_numpy(int)
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(n_heads)), y=list(range(n_layers)), customdata=kv, **color_scale(score, z),
        colorbar={"title": plain(score)},
        hovertemplate="layer %{y}, head %{x}<br>KV head %{customdata}<br>" + plain(score) + " %{z:.4g}<extra></extra>",
    ))
    if selected is not None:
        sl, sh = selected
        fig.add_shape(type="rect", x0=sh - 0.5, x1=sh + 0.5, y0=sl - 0.5, y1=sl + 0.5,
                      line={"color": "#e4572e", "width": 3})
    fig.update_layout(title=plain(title or score), xaxis_title="head", yaxis_title="layer",
                      yaxis={"autorange": "reversed", "dtick": 1}, xaxis={"dtick": 1}, template=TEMPLATE)
    return fig


def color_scale(score: str, values: np.ndarray) -> dict:
    """Heatmap colour arguments for a score: diverging around 0 when it takes both signs, else its own scale; a
    score with a natural range (`score_range`: a recall runs 0–1, a rate 0–100 %) is coloured from its lowest value
    to the largest it reaches, never beyond its highest."""
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() < 0 < finite.max():
        return {"colorscale": DIVERGING, "zmid": 0.0}
    out = {"colorscale": COLOR_SCALES.get(score, "Viridis")}
    bounds = score_range(score)
    if bounds:
        top = min(bounds[1], float(finite.max())) if finite.size else bounds[1]
        out.update(zmin=bounds[0], zmax=top if top > bounds[0] else bounds[1])
    return out


def score_range(score: str) -> tuple[float, float] | None:
    """The range a score takes by its meaning: (0, 1) for a probability, share, mass or recall, (0, 100) for a
    rate in percent; None when its name says nothing of it."""
    for pattern, bounds in SCORE_RANGES:
        if re.search(pattern, score):
            return bounds
    return None


def scaled(values: np.ndarray, scale: str) -> tuple[np.ndarray, dict]:
    """Probabilities on a colour axis: (the values to colour, colour-bar arguments whose ticks read as
    probabilities). scale: "linear", "power" (√p: weak attention shows beside a sink column) or "log" (log10 p,
    floored at LOG_FLOOR)."""
    if scale not in ATTENTION_SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose from {', '.join(ATTENTION_SCALES)}")
    values = np.asarray(values, dtype=float)
    if scale == "linear":
        return values, {}
    if scale == "power":
        ticks = np.array([0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0])
        return np.sqrt(np.clip(values, 0, None)), {"tickvals": np.sqrt(ticks), "ticktext": [f"{t:g}" for t in ticks]}
    ticks = 10.0 ** np.arange(int(np.log10(LOG_FLOOR)), 1)
    return (np.log10(np.clip(values, LOG_FLOOR, None)),
            {"tickvals": np.log10(ticks), "ticktext": [f"{t:g}" for t in ticks]})


def token_label(text: str) -> str:
    """A token's text as an axis label: leading and trailing spaces, newlines and tabs made visible (␣ ↵ ⇥; a space
    inside, as in `patch 1,2`, stays one), markup escaped."""
    core = text.strip(" ")
    lead = len(text) - len(text.lstrip(" "))
    shown = "␣" * lead + core + "␣" * (len(text) - lead - len(core)) if core else "␣" * len(text)
    return plain(shown.replace("\n", "↵").replace("\t", "⇥") or "∅")


def token_ticks(tokens: list[str], start: int) -> dict:
    """Axis arguments labelling positions start, start + 1, … with their tokens: every token up to TOKEN_TICKS, else
    every k-th (hover names them all)."""
    step = -(-len(tokens) // TOKEN_TICKS)
    return {"tickvals": list(range(start, start + len(tokens), step)),
            "ticktext": [token_label(t) for t in tokens[::step]], "tickfont": {"size": 10 if len(tokens) <= 40 else 8},
            "ticks": "outside", "ticklen": 4, "tickcolor": "rgba(0,0,0,0)", "automargin": True}


def attention_map(matrix: np.ndarray, q_range: tuple[int, int], k_range: tuple[int, int], *,
                  block: tuple[int, int] | None = None, q_tokens: list[str] | None = None,
                  k_tokens: list[str] | None = None, title: str = "attention",
                  spans: list[tuple[str, int, int]] = (), scale: str = "linear",
                  selected: tuple[int, int | None] | None = None) -> go.Figure:
    """One head's attention over queries [q0, q1) × keys [k0, k1): exact per token, or block-pooled.

    matrix: (rows, cols); each cell is the mean probability of a block of block = (bq, bk) queries × keys (default
    ⌈(q1 − q0) / rows⌉ × ⌈(k1 − k0) / cols⌉; the last row and column may be partial); (1, 1) is exact. Cells are
    drawn over the token positions they cover (token i spans i ± 0.5), so a zoom box reads as the token region
    to recompute. q_tokens / k_tokens: the text of each query / key of the region, on the axes and on hover of an
    exact map. spans: (name, start, end) token spans drawn as bands beside both axes (`span_shapes`). scale: the
    colour axis (`scaled`). selected: (query, key or None) outlined. Each cell's customdata: first query, last
    query, first key, last key, probability."""
    rows, cols = matrix.shape
    (q0, q1), (k0, k1) = q_range, k_range
    bq, bk = block or (-(-(q1 - q0) // rows), -(-(k1 - k0) // cols))
    q_start = q0 + bq * np.arange(rows)
    k_start = k0 + bk * np.arange(cols)
    q_end, k_end = np.minimum(q_start + bq, q1) - 1, np.minimum(k_start + bk, k1) - 1  # inclusive
    y = np.r_[q_start, q1] - 0.5  # cell edges
    x = np.r_[k_start, k1] - 0.5
    exact = bq == 1 and bk == 1
    cells = np.stack(np.broadcast_arrays(q_start[:, None], q_end[:, None], k_start[None], k_end[None], matrix), -1)
    labelled = exact and q_tokens is not None and k_tokens is not None
    if exact:
        text = np.array([[f"{q!r} → {k!r}" for k in k_tokens] for q in q_tokens]) if labelled else None
        hover = "query %{customdata[0]} → key %{customdata[2]}<br>" + ("%{text}<br>" if labelled else "") \
            + "p = %{customdata[4]:.4g}<extra></extra>"
    else:
        text = None
        hover = ("queries %{customdata[0]}–%{customdata[1]}, keys %{customdata[2]}–%{customdata[3]}<br>"
                 "mean p = %{customdata[4]:.3g}<extra></extra>")
    z, ticks = scaled(matrix, scale)
    label = ("p" if exact else "mean p") + {"linear": "", "power": " (√ scale)", "log": " (log scale)"}[scale]
    fig = go.Figure(go.Heatmap(z=z, x=x, y=y, text=text, customdata=cells, hovertemplate=hover,
                               colorscale=ATTENTION_SCALE, zmin=None if scale == "log" else 0,
                               colorbar={"title": label, "x": 1.05, **ticks}))
    detail = "exact, one cell per token" if exact else f"blocks of {bq} queries × {bk} keys"
    xaxis, yaxis = {"title": "key position"}, {"title": "query position", "autorange": "reversed"}
    if labelled:
        xaxis.update(title="key", tickangle=-90, **token_ticks(k_tokens, k0))
        yaxis.update(title="query", **token_ticks(q_tokens, q0))
    fig.update_layout(title=f"{title} — queries {q0}–{q1 - 1}, keys {k0}–{k1 - 1} ({detail})", template=TEMPLATE,
                      xaxis=xaxis, yaxis=yaxis, dragmode="zoom", legend={"orientation": "h", "y": -0.15})
    for shape in span_shapes(spans, q_range, k_range) + _selection(selected, q_range, k_range):
        fig.add_shape(**shape)
    return fig


def _selection(selected: tuple[int, int | None] | None, q_range: tuple[int, int],
               k_range: tuple[int, int]) -> list[dict]:
    """Outlines of the selected query's row and key's column, where they are inside the map."""
    if selected is None:
        return []
    (q0, q1), (k0, k1) = q_range, k_range
    query, key = selected
    line = {"color": "#e4572e", "width": 1.5}
    out = []
    if q0 <= query < q1:
        out.append({"type": "rect", "x0": k0 - 0.5, "x1": k1 - 0.5, "y0": query - 0.5, "y1": query + 0.5,
                    "line": line, "name": "selected query"})
    if key is not None and k0 <= key < k1:
        out.append({"type": "rect", "x0": key - 0.5, "x1": key + 0.5, "y0": q0 - 0.5, "y1": q1 - 0.5,
                    "line": {**line, "dash": "dot"}, "name": "selected key"})
    return out


def span_shapes(spans: list[tuple[str, int, int]], q_range: tuple[int, int],
                k_range: tuple[int, int]) -> list[dict]:
    """Shapes marking token spans (name, start, end exclusive) on a map: a coloured band above the keys and one
    right of the queries, a colour per name, each name once in the legend; clipped to the map's region."""
    colours = {n: SPAN_COLOURS[i % len(SPAN_COLOURS)] for i, n in enumerate(dict.fromkeys(n for n, _, _ in spans))}
    out, named = [], set()
    for name, a, b in spans:
        for axis, (lo, hi) in (("x", k_range), ("y", q_range)):
            a0, b0 = max(a, lo), min(b, hi)
            if a0 >= b0:
                continue
            band = ({"xref": "x", "yref": "paper", "x0": a0 - 0.5, "x1": b0 - 0.5, "y0": 1.0, "y1": 1.03}
                    if axis == "x" else
                    {"xref": "paper", "yref": "y", "x0": 1.0, "x1": 1.02, "y0": a0 - 0.5, "y1": b0 - 0.5})
            out.append({"type": "rect", **band, "fillcolor": colours[name], "line": {"width": 0},
                        "name": plain(name), "legendgroup": plain(name), "showlegend": name not in named})
            named.add(name)
    return out


def head_grid(thumbs: np.ndarray, block: int, n_tokens: int, *, layer: int, selected: int | None = None,
              scale: str = "linear") -> go.Figure:
    """Every head of a layer as a thumbnail of its pooled attention map on one input. thumbs: (H, rows, cols) mean
    probabilities over blocks of `block` × `block` tokens; selected: the head outlined. Head h is trace h (a click's
    curveNumber)."""
    n_heads = thumbs.shape[0]
    cols = min(n_heads, 8)
    rows = -(-n_heads // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"head {h}" for h in range(n_heads)],
                        horizontal_spacing=0.015, vertical_spacing=0.25 / rows)
    edges = np.minimum(np.arange(thumbs.shape[1] + 1) * block, n_tokens) - 0.5
    for h in range(n_heads):
        z, _ = scaled(thumbs[h], scale)
        fig.add_trace(go.Heatmap(z=z, x=edges, y=edges, colorscale=ATTENTION_SCALE, showscale=False,
                                 hovertemplate=f"head {h}: open it<extra></extra>"),
                      row=h // cols + 1, col=h % cols + 1)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed")
    if selected is not None and 0 <= selected < n_heads:
        axis = "" if selected == 0 else str(selected + 1)
        fig.add_shape(type="rect", xref=f"x{axis} domain", yref=f"y{axis} domain", x0=-0.02, x1=1.02, y0=-0.02,
                      y1=1.02, line={"color": "#e4572e", "width": 3})
    fig.update_layout(title=f"layer {layer}: every head on this input (click one to open it)", template=TEMPLATE,
                      margin={"l": 10, "r": 10, "t": 70, "b": 10}, height=150 * rows + 90)
    return fig


def grid_overlay(values: np.ndarray, image: np.ndarray | None = None, *, title: str, label: str = "attention",
                 colorscale: str = "Inferno", opacity: float = 0.6) -> go.Figure:
    """Values on an image's patch grid (rows, cols), laid over the image (H, W, 3) uint8 when given: the image at
    its true brightness under colours that fade from transparent (lowest value) to `opacity` (highest), with the
    patch grid's lines drawn."""
    rows, cols = values.shape
    fig = go.Figure()
    if image is not None:
        h, w = image.shape[:2]
        fig.add_trace(go.Image(z=image, hoverinfo="skip"))
        dy, dx = h / rows, w / cols
    else:
        h, w, dy, dx = rows, cols, 1.0, 1.0
    # pixel i of an image covers [i − 0.5, i + 0.5]: the grid's cells cover the same extent
    fig.add_trace(go.Heatmap(
        z=values, x=dx * (np.arange(cols) + 0.5) - 0.5, y=dy * (np.arange(rows) + 0.5) - 0.5, customdata=np.stack(np.meshgrid(
            np.arange(cols), np.arange(rows)), -1), colorscale=fading(colorscale, opacity) if image is not None
        else colorscale, colorbar={"title": label}, hovertemplate="patch row %{customdata[1]}, col %{customdata[0]}<br>"
                                                                  + label + " %{z:.4g}<extra></extra>"))
    if image is not None:
        lines = "".join(f"M{dx * c - 0.5},-0.5V{h - 0.5}" for c in range(cols + 1)) \
            + "".join(f"M-0.5,{dy * r - 0.5}H{w - 0.5}" for r in range(rows + 1))
        fig.add_shape(type="path", path=lines, line={"color": "rgba(255,255,255,0.6)", "width": 1})
    fig.update_layout(title=title, template=TEMPLATE, xaxis={"visible": False, "range": [-0.5, w - 0.5]},
                      yaxis={"visible": False, "range": [h - 0.5, -0.5], "scaleanchor": "x"})
    return fig


def fading(colorscale: str, opacity: float) -> list[list]:
    """A plotly colour scale fading in: transparent at its lowest value, `opacity` at its highest."""
    out = []
    for at, colour in pc.get_colorscale(colorscale):
        r, g, b = pc.unlabel_rgb(pc.convert_colors_to_same_type(colour, "rgb")[0][0])
        out.append([at, f"rgba({r:.0f},{g:.0f},{b:.0f},{opacity * at:.3f})"])
    return out


def sample_scores(samples: pd.DataFrame, layer: int, head: int, score: str, *, selected: int | None = None,
                  describe: list[str] = ()) -> go.Figure:
    """One head's per-sample `score` (a bar per sample; `selected` highlighted; `describe` columns on hover)."""
    rows = samples[(samples["layer"] == layer) & (samples["head"] == head)].sort_values("sample")
    if rows.empty:
        raise ValueError(f"no sample rows for head {layer}-{head}")
    if score not in rows.columns:
        raise ValueError(f"no per-sample {score!r}; the samples table has: {', '.join(score_columns(rows))}")
    describe = [c for c in describe if c in rows.columns]
    hover = "".join(f"<br>{c} %{{customdata[{i}]}}" for i, c in enumerate(describe))
    colours = ["#e4572e" if s == selected else "#4c78a8" for s in rows["sample"]]
    fig = go.Figure(go.Bar(x=rows["sample"], y=rows[score], marker_color=colours,
                           customdata=rows[describe].to_numpy() if describe else None,
                           hovertemplate="sample %{x}<br>" + score + " %{y:.4g}" + hover + "<extra></extra>"))
    fig.update_layout(title=f"head {layer}-{head}: {score} per sample", xaxis_title="sample", yaxis_title=score,
                      template=TEMPLATE, xaxis={"type": "category"})
    return fig


def compare_scatter(a: pd.DataFrame, score_a: str, b: pd.DataFrame, score_b: str, *, name_a: str = "A",
                    name_b: str = "B", highlight: Overlap | None = None) -> go.Figure:
    """Each head's score in run A against run B (heads matched on layer and head); shared top heads marked."""
    both = a[["layer", "head", score_a]].merge(b[["layer", "head", score_b]], on=["layer", "head"],
                                               suffixes=("_a", "_b"))
    if both.empty:
        raise ValueError("the two runs have no head in common (different models or layer / head subsets)")
    xa = score_a + ("_a" if score_a == score_b else "")
    yb = score_b + ("_b" if score_a == score_b else "")
    shared = set(highlight.shared) if highlight else set()
    group = np.array(["top in both" if (l, h) in shared else "other" for l, h in zip(both["layer"], both["head"])])
    fig = go.Figure()
    for g, colour in (("other", "#9ab"), ("top in both", "#e4572e")):
        part = both[group == g]
        if len(part):
            fig.add_trace(go.Scatter(x=part[xa], y=part[yb], mode="markers", name=g, marker={"color": colour},
                                     customdata=part[["layer", "head"]].to_numpy(),
                                     hovertemplate="head %{customdata[0]}-%{customdata[1]}<br>A %{x:.4g}<br>"
                                                   "B %{y:.4g}<extra></extra>"))
    fig.update_layout(title=f"{name_a}: {score_a} vs {name_b}: {score_b} ({len(both)} heads)",
                      xaxis_title=f"{name_a}: {score_a}", yaxis_title=f"{name_b}: {score_b}", template=TEMPLATE)
    return fig






def index_axis(values) -> dict:
    """A layer or head axis: integer ticks only, at most about 25 of them."""
    values = [int(v) for v in values]
    span = max(values) - min(values) + 1 if values else 1
    return {"tickmode": "linear", "tick0": 0, "dtick": max(1, -(-span // 25)), "tickformat": "d"}


def placeholder_figure(message: str, *, error: bool = False) -> go.Figure:
    """A figure with no axes that says what will appear there (a view before it has data), or what went wrong."""
    fig = go.Figure()
    fig.add_annotation(text=plain(message), showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font={"color": "#a61b1b" if error else "#666"})
    fig.update_layout(xaxis={"visible": False}, yaxis={"visible": False}, template=TEMPLATE)
    return fig


def score_by_layer(heads: pd.DataFrame, score: str) -> go.Figure:
    """Mean and maximum over each layer's heads of one score (e.g. first-token mass per layer)."""
    g = heads.groupby("layer")[score]
    fig = go.Figure([go.Scatter(x=g.mean().index, y=g.mean(), mode="lines+markers", name="mean over heads"),
                     go.Scatter(x=g.max().index, y=g.max(), mode="lines+markers", name="max over heads")])
    fig.update_layout(title=f"{score} per layer", xaxis_title="layer", yaxis_title=score, template=TEMPLATE,
                      xaxis=index_axis(heads["layer"]))
    return fig


@dataclass(frozen=True)
class Note:
    """A line of text in an analysis's view, with an optional link (label, href); drawn across the view."""

    text: str
    link: tuple[str, str] | None = None


def text_table(table: pd.DataFrame, title: str, limit: int = 20) -> go.Figure:
    """The first `limit` rows of a table of words (prompts, expected answers, responses) as a figure, every cell shown
    as written (`plain`), numbers to 4 significant digits."""
    shown = table.head(limit)
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else plain(v)  # noqa: E731
    cells = [[cell(v) for v in shown[c]] for c in shown.columns]
    widths = [min(60, max(10, len(str(c)), *(len(v) for v in column))) for c, column in zip(shown.columns, cells)]
    fig = go.Figure(go.Table(header={"values": [plain(c) for c in shown.columns], "align": "left"},
                             cells={"values": cells, "align": "left"}, columnwidth=widths))
    more = f" (first {limit} of {len(table)})" if len(table) > limit else ""
    fig.update_layout(title=plain(title) + more, template=TEMPLATE)
    return fig


def _role_hover(roles: pd.DataFrame, names: list[str]) -> list[str]:
    """Per row of a roles table: `head L-H` and every role it has (plain text), for hovers."""
    member = roles[names].to_numpy(bool) if names else np.zeros((len(roles), 0), bool)
    return [f"head {int(l)}-{int(h)}<br>" + ("<br>".join(plain(n) for n, m in zip(names, row) if m) or "no role")
            for l, h, row in zip(roles["layer"], roles["head"], member)]


def role_colours(names: list[str]) -> dict[str, str]:
    """A colour per role, by its place in `names` (an atlas's `role_names`): the same in every figure and legend."""
    palette = pc.qualitative.D3 if len(names) <= len(pc.qualitative.D3) else pc.qualitative.Dark24
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def role_grid(atlas, *, roles: list[str] | None = None, selected: tuple[int, int] | None = None, legend: bool = True,
              title: str | None = None) -> go.Figure:
    """An atlas's layer × head grid coloured by role: a square per head, grey where it has none of the roles shown;
    a head with several roles is split into that many small squares, one in each role's colour (`role_colours`), and
    outlined ("several roles"). One trace per role (the legend toggles it). roles: the roles shown (default: all).
    selected: (layer, head) outlined in red. Every hover names the head (`L-H`) and lists all its roles; every point
    lies within its head's cell (±0.5 around it). Cells are a fixed number of pixels: the figure sets its own size."""
    table, names = atlas.roles, atlas.role_names
    if table.empty:
        raise ValueError("the atlas has no heads: nothing to plot")
    shown = names if roles is None else [n for n in names if n in set(roles)]
    hover = np.array(_role_hover(table, names), dtype=object)
    member = table[shown].to_numpy(bool) if shown else np.zeros((len(table), 0), bool)
    count = member.sum(1)
    x, y = table["head"].to_numpy(int), table["layer"].to_numpy(int)
    n_layers, n_heads = int(y.max()) + 1, int(x.max()) + 1
    cell = max(8, min(48, 600 // max(n_layers, n_heads)))  # pixels per cell
    fig = go.Figure()

    def add(name, at, dx, dy, size, marker):
        fig.add_trace(go.Scatter(x=x[at] + dx, y=y[at] + dy, mode="markers", name=plain(name), text=hover[at],
                                 hovertemplate="%{text}<extra></extra>",
                                 marker={"symbol": "square", "size": size, **marker}))

    none = count == 0
    add("no role" if roles is None else "none of the roles shown", none, 0, 0, cell - 2, {"color": "#e6e6e6"})
    side = np.ceil(np.sqrt(np.maximum(count, 1))).astype(int)  # a head's k roles tile a ⌈√k⌉ × ⌈√k⌉ sub-grid
    slot = np.cumsum(member, 1) - 1  # (heads, roles): each role's place among its head's roles
    fill = (cell - 2) / cell
    colours = role_colours(names)
    for j, name in enumerate(shown):
        at = member[:, j]
        s, k = side[at], slot[at, j]
        add(name, at, ((k % s + 0.5) / s - 0.5) * fill, ((k // s + 0.5) / s - 0.5) * fill, (cell - 2) / s - 1,
            {"color": colours[name]})
    multi = count > 1
    if multi.any():
        add("several roles", multi, 0, 0, cell - 1,
            {"symbol": "square-open", "color": "#333", "line": {"width": 1.5}})
    margin = {"l": 60, "r": 250 if legend else 20, "t": 50, "b": 50}
    fig.update_layout(title=plain(title or f"roles of {atlas.model}'s heads"), xaxis_title="head",
                      yaxis_title="layer", template=TEMPLATE, showlegend=legend, margin=margin,
                      width=n_heads * cell + margin["l"] + margin["r"], height=n_layers * cell + margin["t"] + margin["b"],
                      xaxis={**index_axis(range(n_heads)), "range": [-0.5, n_heads - 0.5], "showgrid": False,
                             "zeroline": False},
                      yaxis={**index_axis(range(n_layers)), "range": [n_layers - 0.5, -0.5], "showgrid": False,
                             "zeroline": False})
    if selected is not None:
        layer, head = selected
        fig.add_shape(type="rect", x0=head - 0.5, x1=head + 0.5, y0=layer - 0.5, y1=layer + 0.5,
                      line={"color": "#e4572e", "width": 3})
    return fig


CHANGES = (("in neither", "#e6e6e6"), ("only in A", "#4c78a8"), ("only in B", "#f58518"), ("in both", "#54a24b"))


def role_changes(a, b, role: str, *, title: str | None = None) -> go.Figure:
    """Where one role's heads lie in two atlases (A, B) of models with the same heads, matched by layer and head:
    each head both atlases have coloured by whether A, B, both or neither give it the role (`CHANGES`)."""
    keys = ["layer", "head"]
    for name, atlas in (("A", a), ("B", b)):
        if role not in atlas.rules:
            raise ValueError(f"atlas {name} has no role {role!r}")
    both = a.roles[[*keys, role]].merge(b.roles[[*keys, role]], on=keys, suffixes=("_a", "_b"))
    if both.empty:
        raise ValueError("the two atlases have no head in common")
    state = both[f"{role}_a"].to_numpy(int) + 2 * both[f"{role}_b"].to_numpy(int)  # 0 neither … 3 both
    layer, head = both["layer"].to_numpy(int), both["head"].to_numpy(int)
    z = np.full((layer.max() + 1, head.max() + 1), np.nan)
    z[layer, head] = state
    labels = np.array([name for name, _ in CHANGES], dtype=object)
    text = np.full(z.shape, "", dtype=object)
    text[layer, head] = labels[state]
    n = len(CHANGES)
    scale = [[edge, colour] for i, (_, colour) in enumerate(CHANGES) for edge in (i / n, (i + 1) / n)]
    counts = ", ".join(f"{int((state == i).sum())} {name}" for i, (name, _) in reversed(list(enumerate(CHANGES)))
                       if i)
    fig = go.Figure(go.Heatmap(z=z, text=text, colorscale=scale, zmin=-0.5, zmax=n - 0.5, xgap=1, ygap=1,
                               colorbar={"tickvals": list(range(n)), "ticktext": list(labels)},
                               hovertemplate="head %{y}-%{x}: %{text}<extra></extra>"))
    fig.update_layout(title=plain(title or f"{role}: {counts}"), xaxis_title="head", yaxis_title="layer",
                      template=TEMPLATE, xaxis=index_axis(range(z.shape[1])),
                      yaxis={**index_axis(range(z.shape[0])), "autorange": "reversed"})
    return fig


P_SIGNIFICANT = 0.05  # the overlap matrix stars pairs whose permutation p-value is below this


def overlap_matrix(atlas, overlaps: pd.DataFrame | None = None, *, title: str | None = None) -> go.Figure:
    """Role × role Jaccard heatmap of an atlas (`atlas.overlaps()` unless `overlaps` is given); hover shows the
    Jaccard, its chance value, the p-value and the heads both roles share; a pair that overlaps beyond chance
    (p < `P_SIGNIFICANT`) is starred. The diagonal is left blank."""
    names = atlas.role_names
    if len(names) < 2:
        return placeholder_figure("fewer than two roles: no overlap to show")
    overlaps = atlas.overlaps() if overlaps is None else overlaps
    at = {n: i for i, n in enumerate(names)}
    k = len(names)
    z = np.full((k, k), np.nan)
    info = np.full((k, k, 3), np.nan)
    for row in overlaps.itertuples():
        i, j = at[row.role_a], at[row.role_b]
        for a, b in ((i, j), (j, i)):
            z[a, b] = row.jaccard
            info[a, b] = (row.expected, row.p_value, row.both)
    labels = [plain(n) for n in names]
    stars = np.where(info[..., 1] < P_SIGNIFICANT, "★", "")  # NaN compares False: no star
    fig = go.Figure(go.Heatmap(
        z=z, x=labels, y=labels, customdata=info, colorscale="Viridis", zmin=0, zmax=1,
        colorbar={"title": "Jaccard"}, text=stars, texttemplate="%{text}", textfont={"color": "white"},
        hovertemplate="%{y} & %{x}<br>Jaccard %{z:.3f}<br>chance %{customdata[0]:.3f}<br>"
                      "p = %{customdata[1]:.4f}<br>%{customdata[2]} heads in both<extra></extra>"))
    fig.update_layout(title=plain(title or f"role overlaps of {atlas.model} (Jaccard; ★ beyond chance, "
                                            f"p < {P_SIGNIFICANT})"), template=TEMPLATE,
                      yaxis={"autorange": "reversed"})
    return fig
