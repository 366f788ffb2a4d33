"""Plotly figure builders, shared by the dashboard and the notebooks (and `ScoreResult.plot`).

Every builder takes tables (pandas) or small arrays and returns a `plotly.graph_objects.Figure`; none reads
the store or touches a model, so a notebook draws exactly what the dashboard shows.
"""

from __future__ import annotations

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
        colorbar={"title": score},
        hovertemplate="layer %{y}, head %{x}<br>KV head %{customdata}<br>" + score + " %{z:.4g}<extra></extra>",
    ))
    if selected is not None:
        sl, sh = selected
        fig.add_shape(type="rect", x0=sh - 0.5, x1=sh + 0.5, y0=sl - 0.5, y1=sl + 0.5,
                      line={"color": "#e4572e", "width": 3})
    fig.update_layout(title=title or score, xaxis_title="head", yaxis_title="layer",
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


def retrieval_grid(samples: pd.DataFrame, value: str = "accepted") -> go.Figure:
    """NIAH accuracy (or mean `value`) per needle depth × context length, one value per sample."""
    per = samples.drop_duplicates("sample")
    grid = per.groupby(["depth", "length"])[value].mean().unstack("length").sort_index()
    z = grid.to_numpy(float) * (100 if value == "accepted" else 1)
    fig = go.Figure(go.Heatmap(z=z, x=[str(c) for c in grid.columns], y=[f"{d:g}%" for d in grid.index],
                               colorscale="RdYlGn", zmin=0, zmax=100 if value == "accepted" else None,
                               text=np.round(z, 1), texttemplate="%{text}",
                               colorbar={"title": "% accepted" if value == "accepted" else value},
                               hovertemplate="depth %{y}, length %{x}<br>%{z:.1f}<extra></extra>"))
    fig.update_layout(title="needle retrieval by depth × length" + ("" if value == "accepted" else f" ({value})"),
                      xaxis_title="context length (tokens)", yaxis_title="needle depth", template=TEMPLATE,
                      xaxis={"type": "category"}, yaxis={"type": "category", "autorange": "reversed"})
    return fig


def masking_bars(masking: pd.DataFrame) -> go.Figure:
    """The masking test: NIAH score with the top-k retrieval heads knocked out against k random heads."""
    fig = go.Figure()
    for condition, part in masking.groupby("condition", sort=False):
        fig.add_trace(go.Bar(x=[str(k) for k in part["k"]], y=part["niah_score"], name=str(condition)))
    mode = masking["mode"].iloc[0] if "mode" in masking else ""
    fig.update_layout(title=f"masking test ({mode})", xaxis_title="heads masked (k)", yaxis_title="NIAH score",
                      barmode="group", template=TEMPLATE)
    return fig


def index_axis(values) -> dict:
    """A layer or head axis: integer ticks only, at most about 25 of them."""
    values = [int(v) for v in values]
    span = max(values) - min(values) + 1 if values else 1
    return {"tickmode": "linear", "tick0": 0, "dtick": max(1, -(-span // 25)), "tickformat": "d"}


def placeholder_figure(message: str) -> go.Figure:
    """A figure with no axes that says what will appear there (a view before it has data)."""
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font={"color": "#666"})
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


def sink_rates_by_layer(rates: pd.DataFrame) -> go.Figure:
    """Sink_ε per layer for each input kind (the `sink_rates` table of a sinks run)."""
    per_layer = rates[rates["layer"] >= 0]
    fig = go.Figure()
    for kind, part in per_layer.groupby("input", sort=False):
        fig.add_trace(go.Scatter(x=part["layer"], y=part["first_token"], mode="lines+markers",
                                 name=f"{kind}, first token"))
        fig.add_trace(go.Scatter(x=part["layer"], y=part["any_token"], mode="lines", line={"dash": "dot"},
                                 name=f"{kind}, any token"))
    fig.update_layout(title="attention-sink rate per layer (Sink_ε, % of heads × samples)", xaxis_title="layer",
                      yaxis_title="%", template=TEMPLATE, xaxis=index_axis(per_layer["layer"]))
    return fig


def massive_activations(layers: pd.DataFrame) -> go.Figure:
    """The largest |activation| of each layer's output against the layer median (log scale), with the
    dimension and token that hold it (the `massive_layers` table of a sinks run)."""
    hover = "layer %{x}<br>|x| %{y:.4g}<br>dim %{customdata[0]}, token “%{customdata[1]}”<extra></extra>"
    fig = go.Figure([
        go.Bar(x=layers["layer"], y=layers["top_abs"], name="largest |x|", hovertemplate=hover,
               customdata=layers[["top_dim", "top_token"]].to_numpy()),
        go.Scatter(x=layers["layer"], y=layers["median"].abs(), mode="lines+markers", name="median |x|"),
    ])
    fig.update_layout(title="massive activations per layer", xaxis_title="layer", yaxis_title="|activation|",
                      yaxis_type="log", template=TEMPLATE, xaxis=index_axis(layers["layer"]))
    return fig


def norm_histogram(hist: pd.DataFrame, threshold: float | None = None) -> go.Figure:
    """The last layer's token norms of a ViT (from the `norm_histogram` table), with the high-norm threshold."""
    last = hist[hist["layer"] == hist["layer"].max()]
    fig = go.Figure(go.Bar(x=(last["low"] + last["high"]) / 2, y=last["count"], name="tokens",
                           width=(last["high"] - last["low"]).to_numpy()))
    if threshold is not None:
        fig.add_vline(x=threshold, line={"color": "#e4572e", "dash": "dash"}, annotation_text="high-norm threshold")
    fig.update_layout(title=f"output token norms, layer {int(last['layer'].iloc[0])}", xaxis_title="‖x‖",
                      yaxis_title="tokens", template=TEMPLATE)
    return fig


def visual_sinks_by_layer(table: pd.DataFrame) -> go.Figure:
    """Share of image tokens that are visual sinks (φ > τ) per layer (the `visual_sinks` table)."""
    fig = go.Figure(go.Bar(x=table["layer"], y=table["percent_of_image"], customdata=table[["visual_sinks",
                           "image_tokens"]].to_numpy(), hovertemplate="layer %{x}: %{y:.1f}% (%{customdata[0]} of "
                                                                      "%{customdata[1]} image tokens)<extra></extra>"))
    fig.update_layout(title="visual sink tokens per layer", xaxis_title="layer", yaxis_title="% of image tokens",
                      template=TEMPLATE, xaxis=index_axis(table["layer"]))
    return fig


def distance_by_layer(heads: pd.DataFrame, column: str = "distance") -> go.Figure:
    """Each head's mean attention distance at its layer (the ViT paper's Figure 11): one point per head."""
    fig = go.Figure(go.Scatter(x=heads["layer"], y=heads[column], mode="markers", customdata=heads[["head"]],
                               marker={"size": 8, "opacity": 0.7},
                               hovertemplate="head %{x}-%{customdata[0]}<br>" + column + " %{y:.3g}<extra></extra>"))
    fig.update_layout(title=f"mean attention distance of every head ({column})", xaxis_title="layer",
                      yaxis_title=column, template=TEMPLATE, xaxis=index_axis(heads["layer"]))
    return fig


def pruning_curves(pruning: pd.DataFrame) -> go.Figure:
    """Accuracy as the k most (or least) important heads are pruned together (the `pruning` table)."""
    fig = go.Figure()
    for order, part in pruning.groupby("order", sort=False):
        fig.add_trace(go.Scatter(x=part["k"], y=part["accuracy"], mode="lines+markers", name=f"{order} important first",
                                 customdata=part[["loss"]], hovertemplate="%{x} heads pruned<br>accuracy %{y:.1f} %"
                                                                          "<br>loss %{customdata[0]:.3f}<extra></extra>"))
    fig.update_layout(title="accuracy as heads are pruned", xaxis_title="heads pruned (k)", yaxis_title="accuracy (%)",
                      template=TEMPLATE)
    return fig


def strength_by_distance(strength: pd.DataFrame, layer: int) -> go.Figure:
    """Mean attention per key against grid distance for each head of one layer (the `strength` table)."""
    rows = strength[strength["layer"] == layer]
    w = rows["n_images"] if "n_images" in rows else pd.Series(1.0, index=rows.index)
    part = rows.assign(wv=rows["per_key"] * w, w=w).groupby(["head", "distance"], as_index=False)[["wv", "w"]].sum()
    part["per_key"] = part["wv"] / part["w"]  # weighted by each batch's images
    fig = go.Figure([go.Scatter(x=g["distance"], y=g["per_key"], mode="lines+markers", name=f"head {head}")
                     for head, g in part.groupby("head")])
    fig.update_layout(title=f"attention strength against distance, layer {layer}", xaxis_title="distance (patches)",
                      yaxis_title="mean attention per key", template=TEMPLATE)
    return fig


def ablation_bars(ablation: pd.DataFrame) -> go.Figure:
    """Loss on the repeated half with heads ablated (the taxonomy's `ablation` table)."""
    fig = go.Figure([go.Bar(x=ablation["condition"], y=ablation[col], name=name)
                     for col, name in (("loss_first", "first copy"), ("loss_repeated", "repeated copy"))])
    mode = ablation["mode"].iloc[0] if "mode" in ablation else ""
    fig.update_layout(title=f"next-token loss with heads ablated ({mode})", xaxis_title="heads ablated",
                      yaxis_title="loss (nats)", barmode="group", template=TEMPLATE)
    return fig


def tvhd_along_text(tvhd: pd.DataFrame, sample: int) -> go.Figure:
    """T-VHD of each generated token of one sample (the `tvhd` table of a vhd run), in generation order."""
    part = tvhd[tvhd["sample"] == sample].sort_values("step")
    fig = go.Figure(go.Bar(x=[f"{s}: {t}" for s, t in zip(part["step"], part["token"])], y=part["tvhd"],
                           hovertemplate="%{x}<br>T-VHD %{y:.4g}<extra></extra>"))
    fig.update_layout(title=f"T-VHD along the generated text, sample {sample}", xaxis_title="generated token",
                      yaxis_title="T-VHD", template=TEMPLATE)
    return fig


def faithfulness_curves(faith: pd.DataFrame) -> go.Figure:
    """Logit difference kept (% of the clean model's) against circuit size, per task, with every head outside the
    circuit mean-ablated (the `faithfulness` table of a circuits run); the chosen circuit marked."""
    fig = go.Figure()
    for task, part in faith.groupby("task", sort=False):
        part = part.sort_values("heads")
        fig.add_trace(go.Scatter(x=part["heads"], y=100 * part["recovered"], mode="lines+markers", name=str(task),
                                 customdata=part[["percent", "ld", "top1"]].to_numpy(),
                                 hovertemplate="%{x} heads (%{customdata[0]:.1f} %)<br>kept %{y:.1f} %<br>logit diff "
                                               "%{customdata[1]:.3f}<br>top-1 %{customdata[2]:.2f}<extra></extra>"))
        chosen = part[part["circuit"]]
        fig.add_trace(go.Scatter(x=chosen["heads"], y=100 * chosen["recovered"], mode="markers", showlegend=False,
                                 marker={"size": 14, "symbol": "star", "color": "#e4572e"},
                                 hovertemplate=f"{task}: the circuit<extra></extra>"))
    fig.add_hline(y=100, line={"dash": "dot", "color": "#888"})
    fig.update_layout(title="faithfulness: logit difference kept with only the top heads (the rest mean-ablated)",
                      xaxis_title="heads kept (by |effect|)", yaxis_title="% of the clean logit difference",
                      xaxis={"type": "log"}, template=TEMPLATE)
    return fig


def position_effects(positions: pd.DataFrame, sample: int, heads: list[tuple[int, int]], value: str = "eap") -> go.Figure:
    """Each chosen head's effect at each position of one sample's first prompt (the `positions` table of a circuits
    run: `eap` always, `patching` with per_position), heads × tokens, diverging around 0."""
    part = positions[positions["sample"] == sample]
    if part.empty:
        raise ValueError(f"no positions for sample {sample}")
    tokens = part.drop_duplicates("position").sort_values("position")["token"].tolist()
    z = np.array([part[(part["layer"] == layer) & (part["head"] == head)].sort_values("position")[value].to_numpy(float)
                  for layer, head in heads])
    labels = [f"{layer}.{head}" for layer, head in heads]
    bound = float(np.nanmax(np.abs(z))) if z.size else 1.0
    fig = go.Figure(go.Heatmap(z=z, x=[f"{i}: {t}" for i, t in enumerate(tokens)], y=labels, colorscale=DIVERGING,
                               zmid=0.0, zmin=-bound, zmax=bound, colorbar={"title": value},
                               hovertemplate="head %{y}<br>token %{x}<br>" + value + " %{z:.4g}<extra></extra>"))
    fig.update_layout(title=f"sample {sample}: {value} of each head at each position (Δ logit difference)",
                      xaxis_title="position: token (first prompt)", yaxis_title="head",
                      yaxis={"autorange": "reversed", "type": "category"}, template=TEMPLATE)
    return fig
