"""The dense oracle: attention built densely in plain PyTorch, which captured statistics and every kernel backend are
checked against (small shapes only)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from .geometry import AttentionGeometry


def dense_scores(
    q: Float[Tensor, "batch heads queries dim"],
    k: Float[Tensor, "batch kv_heads keys dim"],
    *,
    geometry: AttentionGeometry = AttentionGeometry(),
) -> Float[Tensor, "batch heads queries keys"]:
    """Attention logits (B, H, Nq, Nk) in fp32, −inf where a key is not visible (see `AttentionGeometry`).

    q: (B, H, Nq, d); k: (B, H_kv, Nk, d) with H a multiple of H_kv (query head h uses KV head h // (H / H_kv)).
    """
    h, n_kv = q.shape[1], k.shape[1]
    if h % n_kv:
        raise ValueError(f"{h} query heads is not a multiple of {n_kv} KV heads")
    geo = geometry.resolve(q, k)
    k = k.repeat_interleave(h // n_kv, dim=1)
    scores = geo.logits(torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()))
    return scores.masked_fill(~geo.visible(0, k.shape[2])[:, None], float("-inf"))


def dense_attention(
    q: Float[Tensor, "batch heads queries dim"],
    k: Float[Tensor, "batch kv_heads keys dim"],
    *,
    geometry: AttentionGeometry = AttentionGeometry(),
) -> Float[Tensor, "batch heads queries keys"]:
    """Attention probabilities (B, H, Nq, Nk) in fp32, built densely; a query that sees no key gets a row of zeros.
    The geometry's sinks, (H,) learned sink logits (GPT-OSS), join every row's softmax denominator as one more
    column, dropped afterwards (so rows sum to less than 1)."""
    scores = dense_scores(q, k, geometry=geometry)
    if geometry.sinks is None:
        return torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    column = geometry.sinks.to(scores)[None, :, None, None].expand(*scores.shape[:3], 1)
    return torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1]


def call_attention(call) -> Float[Tensor, "batch heads queries keys"]:
    """Dense probabilities (B, H, Nq, Nk) of the captured heads of an `interp.hooks.AttentionCall`."""
    return dense_attention(call.q, call.head_keys(), geometry=call.geometry)
