"""The generic plotly figure builders (head map, attention map, grid overlay, per-layer profile, comparison),
shared by the dashboard, the analyses' own views and the notebooks (and `ScoreResult.plot`).

Every builder takes tables (pandas) or small arrays and returns a `plotly.graph_objects.Figure`; none reads
the store or touches a model, so a notebook draws exactly what the dashboard shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from interp.compare import Overlap

# Colour scales that suit a score: sequential by default, named here where another reads better; a score with
# both signs (an effect, a difference) gets a diverging scale centred on 0.
COLOR_SCALES = {"entropy": "Cividis", "first_token_mass": "Reds", "distance": "Cividis"}
DIVERGING = "RdBu_r"
ATTENTION_SCALE = "Blues"
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
    """Heatmap colour arguments for a score: diverging around 0 when it takes both signs, else its own scale."""
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() < 0 < finite.max():
        return {"colorscale": DIVERGING, "zmid": 0.0}
    return {"colorscale": COLOR_SCALES.get(score, "Viridis")}


def attention_map(matrix: np.ndarray, q_range: tuple[int, int], k_range: tuple[int, int], *,
                  block: tuple[int, int] | None = None, q_tokens: list[str] | None = None,
                  k_tokens: list[str] | None = None, title: str = "attention") -> go.Figure:
    """One head's attention over queries [q0, q1) × keys [k0, k1): exact per token, or block-pooled.

    matrix: (rows, cols); each cell is the mean probability of a block of block = (bq, bk) queries × keys (default
    ⌈(q1 − q0) / rows⌉ × ⌈(k1 − k0) / cols⌉; the last row and column may be partial); (1, 1) is exact. Cells are
    drawn over the token positions they cover (token i spans i ± 0.5), so a zoom box reads as the token region
    to recompute. q_tokens / k_tokens: the text of each query / key of the region (hover) for an exact map."""
    rows, cols = matrix.shape
    (q0, q1), (k0, k1) = q_range, k_range
    bq, bk = block or (-(-(q1 - q0) // rows), -(-(k1 - k0) // cols))
    q_start = q0 + bq * np.arange(rows)
    k_start = k0 + bk * np.arange(cols)
    q_end, k_end = np.minimum(q_start + bq, q1) - 1, np.minimum(k_start + bk, k1) - 1  # inclusive
    y = np.r_[q_start, q1] - 0.5  # cell edges
    x = np.r_[k_start, k1] - 0.5
    exact = bq == 1 and bk == 1
    cells = np.stack(np.broadcast_arrays(q_start[:, None], q_end[:, None], k_start[None], k_end[None]), -1)
    if exact:
        text = (np.array([[f"{q!r} → {k!r}" for k in k_tokens] for q in q_tokens])
                if q_tokens is not None and k_tokens is not None else None)
        hover = "query %{customdata[0]} → key %{customdata[2]}<br>" + ("%{text}<br>" if text is not None else "") \
            + "p = %{z:.4g}<extra></extra>"
    else:
        text = None
        hover = ("queries %{customdata[0]}–%{customdata[1]}, keys %{customdata[2]}–%{customdata[3]}<br>"
                 "mean p = %{z:.3g}<extra></extra>")
    fig = go.Figure(go.Heatmap(z=matrix, x=x, y=y, text=text, customdata=cells, hovertemplate=hover,
                               colorscale=ATTENTION_SCALE, zmin=0, colorbar={"title": "p" if exact else "mean p"}))
    detail = "exact, one cell per token" if exact else f"blocks of {bq} queries × {bk} keys"
    fig.update_layout(title=f"{title} — queries {q0}–{q1 - 1}, keys {k0}–{k1 - 1} ({detail})",
                      xaxis_title="key position", yaxis_title="query position", template=TEMPLATE,
                      yaxis={"autorange": "reversed"}, dragmode="zoom")
    return fig


def grid_overlay(values: np.ndarray, image: np.ndarray | None = None, *, title: str, label: str = "attention",
                 colorscale: str = "Inferno", opacity: float = 0.6) -> go.Figure:
    """Values on an image's patch grid (rows, cols), laid over the image (H, W, 3) uint8 when given."""
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
            np.arange(cols), np.arange(rows)), -1), colorscale=colorscale, opacity=opacity if image is not None else 1,
        colorbar={"title": label}, hovertemplate="patch row %{customdata[1]}, col %{customdata[0]}<br>"
                                                 + label + " %{z:.4g}<extra></extra>"))
    fig.update_layout(title=title, template=TEMPLATE, xaxis={"visible": False, "range": [-0.5, w - 0.5]},
                      yaxis={"visible": False, "range": [h - 0.5, -0.5], "scaleanchor": "x"})
    return fig


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


def _role_hover(roles: pd.DataFrame, names: list[str]) -> list[str]:
    """Per row of a roles table: `head L-H` and every role it has (plain text), for hovers."""
    member = roles[names].to_numpy(bool) if names else np.zeros((len(roles), 0), bool)
    return [f"head {int(l)}-{int(h)}<br>" + ("<br>".join(plain(n) for n, m in zip(names, row) if m) or "no role")
            for l, h, row in zip(roles["layer"], roles["head"], member)]


def role_grid(atlas, *, title: str | None = None) -> go.Figure:
    """An atlas's layer × head grid coloured by role: one trace per role (the legend toggles it), grey squares for
    heads with no role, and a head with several roles drawn as a star labelled with its number of roles. Every
    hover names the head (`L-H`) and lists all its roles."""
    roles, names = atlas.roles, atlas.role_names
    if roles.empty:
        raise ValueError("the atlas has no heads: nothing to plot")
    hover = np.array(_role_hover(roles, names), dtype=object)
    member = roles[names].to_numpy(bool) if names else np.zeros((len(roles), 0), bool)
    count = member.sum(1)
    n_layers, n_heads = int(roles["layer"].max()) + 1, int(roles["head"].max()) + 1
    size = max(6, min(22, 560 // max(n_layers, n_heads)))
    x, y = roles["head"].to_numpy(int), roles["layer"].to_numpy(int)
    fig = go.Figure()
    none = count == 0
    fig.add_trace(go.Scatter(x=x[none], y=y[none], mode="markers", name="no role", text=hover[none],
                             hovertemplate="%{text}<extra></extra>",
                             marker={"symbol": "square", "size": size, "color": "#e6e6e6"}))
    for name, col in zip(names, member.T):
        fig.add_trace(go.Scatter(x=x[col], y=y[col], mode="markers", name=plain(name), text=hover[col],
                                 hovertemplate="%{text}<extra></extra>", marker={"symbol": "square", "size": size,
                                                                                "opacity": 0.75}))
    multi = count > 1
    if multi.any():
        fig.add_trace(go.Scatter(x=x[multi], y=y[multi], mode="markers+text", name="several roles",
                                 text=[str(c) for c in count[multi]], customdata=hover[multi],
                                 hovertemplate="%{customdata}<extra></extra>", textfont={"size": max(6, size // 2)},
                                 marker={"symbol": "star", "size": size, "color": "black", "opacity": 0.35}))
    fig.update_layout(title=plain(title or f"roles of {atlas.model}'s heads"), xaxis_title="head",
                      yaxis_title="layer", template=TEMPLATE, xaxis=index_axis(range(n_heads)),
                      yaxis={**index_axis(range(n_layers)), "autorange": "reversed"})
    return fig


def overlap_matrix(atlas, overlaps: pd.DataFrame | None = None, *, title: str | None = None) -> go.Figure:
    """Role × role Jaccard heatmap of an atlas (`atlas.overlaps()` unless `overlaps` is given); hover shows the
    Jaccard, its chance value, the p-value and the heads both roles share. The diagonal is left blank."""
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
    fig = go.Figure(go.Heatmap(
        z=z, x=labels, y=labels, customdata=info, colorscale="Viridis", zmin=0, zmax=1,
        colorbar={"title": "Jaccard"},
        hovertemplate="%{y} & %{x}<br>Jaccard %{z:.3f}<br>chance %{customdata[0]:.3f}<br>"
                      "p = %{customdata[1]:.4f}<br>%{customdata[2]} heads in both<extra></extra>"))
    fig.update_layout(title=plain(title or f"role overlaps of {atlas.model} (Jaccard)"), template=TEMPLATE,
                      yaxis={"autorange": "reversed"})
    return fig
