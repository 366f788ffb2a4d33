"""The dense oracle: attention built densely in plain PyTorch, which captured statistics and every kernel backend are
checked against (small shapes only)."""

from __future__ import annotations

import torch
from torch import Tensor


def dense_scores(
    q: Tensor,
    k: Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    query_positions: Tensor | None = None,
    key_mask: Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> Tensor:
    """Attention logits (B, H, Nq, Nk) in fp32, −inf where a key is not visible.

    q: (B, H, Nq, d); k: (B, H_kv, Nk, d) with H a multiple of H_kv (query head h uses KV head h // (H / H_kv)).
    query_positions: (Nq,) index among the keys of each query (default: the last Nq keys, as in decoding).
    key_mask: (B, Nk) bool, False for keys never attended (padding). window: key j visible from query i iff
    i - j < window. softcap: logits become softcap · tanh(logits / softcap) before masking.
    """
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    if h % k.shape[1]:
        raise ValueError(f"{h} query heads is not a multiple of {k.shape[1]} KV heads")
    k = k.repeat_interleave(h // k.shape[1], dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * (d**-0.5 if scale is None else scale)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if query_positions is None:
        query_positions = torch.arange(n_k - n_q, n_k, device=q.device)
    i = query_positions.to(q.device)[:, None]
    j = torch.arange(n_k, device=q.device)[None, :]
    visible = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device)
    if causal:
        visible &= j <= i
    if window is not None:
        visible &= (i - j) < window
    visible = visible[None, None]
    if key_mask is not None:
        visible = visible & key_mask.to(q.device, torch.bool)[:, None, None, :]
    return scores.masked_fill(~visible, float("-inf"))


def dense_attention(q: Tensor, k: Tensor, *, sinks: Tensor | None = None, **mask) -> Tensor:
    """Attention probabilities (B, H, Nq, Nk) in fp32, built densely (see `dense_scores` for the arguments);
    a query that sees no key gets a row of zeros. sinks: (H,) learned sink logits (GPT-OSS) that join every
    row's softmax denominator as one more column, dropped afterwards (so rows sum to less than 1)."""
    scores = dense_scores(q, k, **mask)
    if sinks is None:
        return torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    column = sinks.to(scores)[None, :, None, None].expand(*scores.shape[:3], 1)
    return torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1]


def call_attention(call) -> Tensor:
    """Dense probabilities (B, H, Nq, Nk) of the captured heads of an `interp.hooks.AttentionCall`."""
    return dense_attention(
        call.q,
        call.head_keys(),
        scale=call.scale,
        causal=call.causal,
        query_positions=call.query_positions,
        key_mask=call.key_mask,
        window=call.window,
        softcap=call.softcap,
        sinks=call.sinks,
    )
