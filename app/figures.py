"""Plotly figure builders, shared by the dashboard and the notebooks (and `ScoreResult.plot`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

# Colour scales that suit a score: sequential by default, named here where another reads better.
COLOR_SCALES = {"entropy": "Cividis", "first_token_mass": "Reds"}


def head_map(heads: pd.DataFrame, score: str, *, title: str | None = None) -> go.Figure:
    """Layer × head heatmap of one score column of a heads table (`layer`, `head`, `kv_head`, scores).

    Hover shows layer, head, KV head and value; heads not in the table are blank."""
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
        z=z, x=list(range(n_heads)), y=list(range(n_layers)), customdata=kv,
        colorscale=COLOR_SCALES.get(score, "Viridis"), colorbar={"title": score},
        hovertemplate="layer %{y}, head %{x}<br>KV head %{customdata}<br>" + score + " %{z:.4g}<extra></extra>",
    ))
    fig.update_layout(title=title or score, xaxis_title="head", yaxis_title="layer",
                      yaxis={"autorange": "reversed"}, xaxis={"dtick": 1}, template="plotly_white")
    return fig


def score_columns(heads: pd.DataFrame) -> list[str]:
    """The score columns of a heads table (everything but the head's coordinates)."""
    return [c for c in heads.columns if c not in ("layer", "head", "kv_head")]
