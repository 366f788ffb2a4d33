"""Attention statistics recomputed from captured queries and keys, never building the N×N matrix.

One API (`attention_stats`, `pooled_attention`, `attention_tile`, `diagonal_attention`, `grid_distance`) dispatching
to Triton kernels on CUDA, to the fused path through SDPA's own attention ops elsewhere (`fused_stats`), and to a
chunked pure-PyTorch twin (`torch_stats`: the reference, and the path for soft-capped scores); `dense_attention`
is the small-shape oracle for tests. Every one takes the call's `AttentionGeometry` (scale, causal mask, query
positions, padding, window, soft-cap, sinks). `call_stats` reads a captured call's geometry (and returns statistics
the capture already computed inside the model's own SDPA call, `capture(stats=)`).
"""

from __future__ import annotations

import torch

from .api import (
    BACKENDS,
    DEFAULT_STATS,
    STATS,
    AttentionStats,
    attention_stats,
    attention_tile,
    diagonal_attention,
    grid_distance,
    pooled_attention,
)
from .geometry import AttentionGeometry
from .oracle import call_attention, dense_attention, dense_scores


def call_stats(call, *, last_query: bool = False, **kwargs) -> AttentionStats:
    """`attention_stats` of a captured `interp.hooks.AttentionCall` with its geometry; kwargs: the other arguments
    of `attention_stats`. last_query: only the call's last query (Nq = 1), e.g. the row that produces the next
    generated token. When the capture computed these very statistics inside the model's call
    (`capture(stats=kwargs)`), those; when it kept the call's row lse (`call.lse`), the kernels start from it."""
    if call.stats is not None and not last_query and _same_request(call.stats_request, kwargs):
        return call.stats
    q, geometry, lse = call.q, call.geometry, call.lse
    if last_query:
        n = q.shape[2]
        q, geometry = q[:, :, -1:], geometry.rows(n - 1, n)
        lse = None if lse is None else lse[:, :, -1:]
    return attention_stats(q, call.head_keys(), geometry=geometry, lse=kwargs.pop("lse", lse), **kwargs)


def _same_request(a: dict, b: dict) -> bool:
    """Whether two `call_stats` argument sets are the same (tensors by value)."""
    if a.keys() != b.keys():
        return False
    same = lambda x, y: torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x == y  # noqa: E731
    return all(same(a[name], b[name]) for name in a)


__all__ = [
    "BACKENDS", "DEFAULT_STATS", "STATS", "AttentionGeometry", "AttentionStats", "attention_stats", "attention_tile",
    "call_attention", "call_stats", "dense_attention", "dense_scores", "diagonal_attention", "grid_distance", "pooled_attention",
]
