"""Attention statistics from fused attention calls: SDPA's own kernels do the QKᵀ passes (in C++ on CPU,
multithreaded; on CUDA, its memory-efficient kernel), and every statistic linear in the probabilities comes out
of one call with a crafted value matrix (REFERENCES.md §6, "V-trick"):

- lse: the log-sum-exp the fused op returns with its output (SDPA's flash op on CPU, the memory-efficient op on
  CUDA); sinks are folded in afterwards.
- segment_mass: value columns one-hot in the key's segment. mean_distance: a value column holding the key's
  position (for non-causal rows also a second call restricted to keys at or before the query: |i − j| splits
  there). entropy: lse − scale · q · (P K), value columns = K.
- key_mass: the log-sum-exp of the transposed problem (keys as queries, queries as keys) with −lse / scale
  appended to each query and 1 to each key; both sequences reversed, so causality stays lower-triangular.
- key_count, and which rows see no key: counted from the geometry (prefix sums), no scores at all.
- argmax, max_prob, top-k: a max pass over score blocks (no exponentials), as in the twin.

Where it applies: every option but `softcap` (a soft-capped score is not a dot product: the twin,
`torch_stats`, serves it). Scores are formed in fp32 from q and k widened to fp32, like the twin's.
Masking: a plain causal square (query i at position i of as many keys) or nothing masked runs as one call with
no mask; decode offsets, padding, windows, blocks and documents build an additive mask per block of query rows (at
most CHUNK_ELEMENTS cells, with the keys cut to those the rows can see). Nothing N×N is built.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import torch_stats
from .geometry import AttentionGeometry

CHUNK_ELEMENTS = 1 << 24  # additive-mask cells per call (B · rows · keys): 64 MiB in fp32
_NEVER = 1e4  # a stand-in lse for rows that see no key: exp(s − 1e4) underflows to 0, and no NaN appears


def applies(softcap: float | None) -> bool:
    """Whether the fused path computes these statistics (else the twin does)."""
    return softcap is None


def _row_blocks(geo: AttentionGeometry, n_k: int, b: int):
    """Yield (q0, q1, k0, k1): blocks of query rows with the key range they can see, at most CHUNK_ELEMENTS mask
    cells each."""
    n_q = geo.query_positions.shape[0]
    rows = max(1, CHUNK_ELEMENTS // max(1, b * n_k))
    for q0 in range(0, n_q, rows):
        q1 = min(q0 + rows, n_q)
        k0, k1 = geo.rows(q0, q1).key_range(n_k)
        if k1 > k0:
            yield q0, q1, k0, k1


def _fused(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """(output (B, H, Nq, c), lse (B, H, Nq)) of one fused attention call in fp32. q, k: (B, H, N, d); v: (B, H, Nk,
    c); bias: additive (B or 1, 1, Nq, Nk) or None. Head dims are padded with zero columns to one common width
    (the CPU flash op needs q, k and v alike; the CUDA op wants multiples of 8)."""
    c = v.shape[-1]
    width = max(q.shape[-1], c)
    if q.is_cuda:
        width = -(-width // 8) * 8
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[-1])) if t.shape[-1] != width else t  # noqa: E731
    if q.is_cuda:
        if bias is not None:  # the memory-efficient op wants the bias' rows 16-aligned in memory
            n_k = bias.shape[-1]
            aligned = bias.new_empty(*bias.shape[:-1], -(-n_k // 16) * 16)[..., :n_k]
            bias = aligned.copy_(bias).expand(q.shape[0], q.shape[1], -1, -1)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            pad(q), pad(k), pad(v), bias, True, 0.0, causal, scale=scale)[:2]
        lse = lse[..., :q.shape[2]]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            pad(q), pad(k), pad(v), 0.0, causal, attn_mask=bias, scale=scale)
    return out[..., :c], lse.float()


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, *, scale: float,
                       causal: bool) -> tuple[Tensor, Tensor]:
    """(output (B, H, Nq, dv), lse (B, H, Nq) fp32) of one unmasked attention call through SDPA's own kernels that
    return the lse: on CUDA the flash kernel for fp16 / bf16, with grouped KV heads as they are (k, v: (B, H_kv, Nk,
    d)), else `_fused` (KV heads repeated to the query heads)."""
    if q.is_cuda and q.dtype != torch.float32:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
        return out, lse.float()
    group = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(group, dim=1) if group > 1 else t for t in (k, v))
    return _fused(q, k, v, scale=scale, causal=causal, bias=None)


def _bias(vis: Tensor) -> Tensor:
    """The additive mask (B or 1, 1, rows, keys) of a visibility (B or 1, rows, keys): 0 or −inf."""
    return torch.zeros(vis.shape, device=vis.device).masked_fill_(~vis, float("-inf"))[:, None]


def _attend(q: Tensor, k: Tensor, v: Tensor, geo: AttentionGeometry) -> tuple[Tensor, Tensor]:
    """`_fused` over the geometry's visible keys: one unmasked call where it can, else row blocks with an additive
    mask. Rows that see no key come out as zeros (their lse is fixed by the caller)."""
    n_k = k.shape[2]
    plain = geo.plain(n_k)
    if plain is not None:
        return _fused(q, k, v, scale=geo.scale, causal=plain == "causal", bias=None)
    b, h, n_q, _ = q.shape
    out = q.new_zeros(b, h, n_q, v.shape[-1])
    lse = q.new_full((b, h, n_q), float("-inf"))
    for q0, q1, k0, k1 in _row_blocks(geo, n_k, b):
        bias = _bias(geo.rows(q0, q1).visible(k0, k1))
        out[:, :, q0:q1], lse[:, :, q0:q1] = _fused(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], scale=geo.scale,
                                                    causal=False, bias=bias)
    return out, lse


def _key_mass(q: Tensor, k: Tensor, lse: Tensor, geo: AttentionGeometry) -> Tensor:
    """(B, H, Nk) Σ_i exp(s_ij − lse_i): the log-sum-exp of the transposed problem. q: (B, H, Nq, d); k: (B, H,
    Nk, d) (GQA expanded); lse: (B, H, Nq) finite."""
    n_q, n_k = q.shape[2], k.shape[2]
    scale, plain = geo.scale, geo.plain(n_k)
    ones = k.new_ones(*k.shape[:3], 1)
    as_queries = torch.cat([k, ones], -1)                                 # keys j: [k_j, 1]
    as_keys = torch.cat([q, (-lse / scale)[..., None]], -1)               # queries i: [q_i, −lse_i / scale]
    if plain is not None:
        flip = plain == "causal"  # i ≥ j, reversed: lower-triangular again
        rev = (lambda t: t.flip(2)) if flip else (lambda t: t)  # noqa: E731
        _, mass_lse = _fused(rev(as_queries), rev(as_keys), rev(as_keys[..., :1]), scale=scale, causal=flip,
                             bias=None)
        return torch.exp(rev(mass_lse))
    b = q.shape[0]
    mass_lse = q.new_full((b, q.shape[1], n_k), float("-inf"))
    cols = max(1, CHUNK_ELEMENTS // max(1, b * n_q))
    for j0 in range(0, n_k, cols):
        j1 = min(j0 + cols, n_k)
        vis = geo.visible(j0, j1).transpose(-1, -2)                        # (B or 1, keys, queries)
        if not bool(vis.any()):
            continue
        _, mass_lse[:, :, j0:j1] = _fused(as_queries[:, :, j0:j1], as_keys, as_keys[..., :1], scale=scale,
                                          causal=False, bias=_bias(vis))
    return torch.exp(mass_lse)


def stats_fused(q: Tensor, k: Tensor, geo: AttentionGeometry, *, segments: Tensor | None, n_segments: int,
                topk: int, want: frozenset[str]) -> dict[str, Tensor]:
    """`interp.kernels.attention_stats` through fused attention calls (same arguments and results as
    `torch_stats.stats_torch`). The geometry's softcap must be None (see `applies`)."""
    if not applies(geo.softcap):
        raise ValueError("the fused path does not take soft-capped scores: use the twin (backend='torch')")
    h, n_kv = q.shape[1], k.shape[1]
    qf = q.float()
    kf = k.float().repeat_interleave(h // n_kv, dim=1)                    # (B, H, Nk, d)

    columns = value_columns(kf, want, segments, n_segments)
    out, key_lse = _attend(qf, kf, kf[..., :1] if columns is None else columns, geo)
    return _finish(q, k, qf, kf, out, key_lse, geo, want, n_segments, topk)


def stats_in_call(query: Tensor, key: Tensor, value: Tensor, *, scale: float, causal: bool, want: frozenset[str],
                  segments: Tensor | None = None, n_segments: int = 1, topk: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
    """The model's own SDPA call with the statistics riding along: (its output (B, H, N, dv), exactly as
    `F.scaled_dot_product_attention(query, key, value, is_causal=causal, scale=scale, enable_gqa=True)` computes it,
    and the statistics of every query head, as `stats_fused` gives them).

    The value columns are appended to the model's values, and query and key padded with zero columns to match: on
    CPU the flash op then returns the model's output bit for bit (tests check the logits) and the columns and the
    lse from the same pass, so the statistics linear in P cost no pass of their own. For the plain geometries only:
    as many queries as keys, causal or nothing masked, no mask, fp32 on CPU (`in_call_applies`)."""
    h, n_kv = query.shape[1], key.shape[1]
    geo = AttentionGeometry(scale=scale, causal=causal).resolve(query, key)
    k_heads = key.repeat_interleave(h // n_kv, dim=1)
    v_heads = value.repeat_interleave(h // n_kv, dim=1)
    columns = value_columns(k_heads, want, segments, n_segments)
    dv = v_heads.shape[-1]
    out, key_lse = _fused(query, k_heads, v_heads if columns is None else torch.cat([v_heads, columns], -1),
                          scale=scale, causal=geo.plain(key.shape[2]) == "causal", bias=None)
    return out[..., :dv], _finish(query, key, query, k_heads, out[..., dv:], key_lse, geo, want, n_segments, topk)


RIDE_SLACK = 16  # extra head-dim width a riding call may take: beyond it, a call of its own costs about the same


def in_call_applies(query: Tensor, key: Tensor, value: Tensor, want: frozenset[str], n_segments: int) -> bool:
    """Whether `stats_in_call` can stand in for the model's SDPA call on these tensors, and gains by it (the mask
    and the call's options are the caller's to check): fp32 on CPU, as many queries as keys, and value columns
    narrow enough that padding the call to carry them costs less than a call of their own — segment and position
    columns ride; the entropy's key columns (as wide as the head) do not."""
    columns = n_segments * ("segment_mass" in want) + ("mean_distance" in want) + query.shape[-1] * ("entropy" in want)
    return (query.device.type == "cpu" and query.dtype == key.dtype == value.dtype == torch.float32
            and query.shape[2] == key.shape[2] and query.shape[1] % key.shape[1] == 0
            and max(query.shape[-1], value.shape[-1] + columns) <= query.shape[-1] + RIDE_SLACK)


def value_columns(k: Tensor, want: frozenset[str], segments: Tensor | None, n_segments: int) -> Tensor | None:
    """(B, H, Nk, c) fp32: the value columns of the statistics in `want` that are linear in the probabilities —
    one-hot segments (n_segments), the key position (1), the key itself (d, for the entropy) — in that order;
    None when none is asked for. k: (B, H, Nk, d) fp32, one per query head."""
    b, h, n_k, _ = k.shape
    columns = []
    if "segment_mass" in want:
        columns.append(torch.nn.functional.one_hot(segments, n_segments).float()[:, None].expand(b, h, -1, -1))
    if "mean_distance" in want:
        columns.append(torch.arange(n_k, device=k.device, dtype=torch.float32).view(1, 1, n_k, 1).expand(b, h, -1, -1))
    if "entropy" in want:
        columns.append(k)
    return torch.cat(columns, -1) if columns else None


def _finish(q: Tensor, k: Tensor, qf: Tensor, kf: Tensor, out: Tensor, key_lse: Tensor, geo: AttentionGeometry,
            want: frozenset[str], n_segments: int, topk: int) -> dict[str, Tensor]:
    """The statistics from the value columns' output `out` (B, H, Nq, c) and the lse over the keys (B, H, Nq) of one
    fused call, plus the calls and passes the rest need. q, k as given; qf, kf: fp32, k one per query head."""
    b, h, n_q, d = q.shape
    n_k, scale, sinks = k.shape[2], geo.scale, geo.sinks
    seen = geo.row_counts(b, n_k)[:, None].expand(b, h, n_q) > 0          # (B, H, Nq)
    key_lse = torch.where(seen, key_lse, float("-inf"))
    lse = key_lse if sinks is None else torch.logaddexp(key_lse, sinks.to(q.device).view(1, h, 1).expand_as(key_lse))
    keys_share = torch.where(seen, torch.exp(key_lse - torch.where(seen, lse, 0.0)), 0.0)  # 1 − the sink's share
    result: dict[str, Tensor] = {}
    if "lse" in want:
        result["lse"] = lse
    at = 0
    if "segment_mass" in want:
        result["segment_mass"] = out[..., at:at + n_segments] * keys_share[..., None]
        at += n_segments
    if "mean_distance" in want:
        result["mean_distance"] = _mean_distance(qf, kf, out[..., at], key_lse, keys_share, geo, seen)
        at += 1
    if "entropy" in want:
        p_dot_s = scale * (qf * out[..., at:at + d]).sum(-1)               # Σ_j p_j s_j, p over the keys
        entropy = torch.where(seen, keys_share * (lse - torch.where(seen, key_lse, 0.0) + (key_lse - p_dot_s)), 0.0)
        if sinks is not None:  # the sink's own term of the row entropy
            sink = sinks.to(q.device).view(1, h, 1)
            entropy = entropy + torch.exp(sink - lse) * (lse - sink)
        result["entropy"] = entropy
    if "key_mass" in want:
        finite_lse = torch.where(seen, lse, _NEVER)
        result["key_mass"] = torch.where(geo.key_counts(b, n_k)[:, None] > 0, _key_mass(qf, kf, finite_lse, geo), 0.0)
    if "key_count" in want:
        result["key_count"] = geo.key_counts(b, n_k)
    if want & {"argmax", "max_prob", "topk"}:
        best, best_idx, top_val, top_idx = torch_stats.row_max_torch(
            q, k, geo, topk=topk if "topk" in want else 0, index="argmax" in want)
        result.update(torch_stats.max_results(best, best_idx, top_val, top_idx, lse, topk, want))
    return result


def _mean_distance(q: Tensor, k: Tensor, mean_key: Tensor, key_lse: Tensor, keys_share: Tensor,
                   geo: AttentionGeometry, seen: Tensor) -> Tensor:
    """Σ_j p_j |pos_i − j| (B, H, Nq) from the probability-weighted key position E[j] (over the keys alone).
    Rows that see only j ≤ pos_i: pos_i − E[j]. Otherwise |i − j| splits at the query: E[j] − pos_i +
    2 Σ_{j ≤ pos_i} p_j (pos_i − j), that sum from a second call over those keys, rescaled by its share of the row."""
    pos, n_k = geo.query_positions.float(), k.shape[2]
    if not geo.reaches_ahead():
        dist = pos - mean_key
    else:
        before = geo.past()
        j = torch.arange(n_k, device=q.device, dtype=torch.float32)
        part, part_lse = _attend(q, k, torch.stack([torch.ones_like(j), j], -1).expand(*k.shape[:2], -1, -1), before)
        some = (before.row_counts(q.shape[0], n_k)[:, None] > 0) & seen
        share = torch.where(some, torch.exp(part_lse - torch.where(seen, key_lse, 0.0)), 0.0)
        dist = mean_key - pos + 2 * share * (pos - part[..., 1])
    return torch.where(seen, dist.clamp_min(0) * keys_share, 0.0)
