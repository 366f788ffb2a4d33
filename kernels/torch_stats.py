"""The PyTorch reference twin of the Triton kernels: the same statistics, chunked over queries and keys.

Memory is O(B · H · chunk_q · chunk_k) whatever the length; it runs on any device. Semantics: those of
`geometry.AttentionGeometry` (every function here takes one resolved against its q and k). A query that sees no key
has lse −inf, argmax −1 and zeros elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from .geometry import AttentionGeometry

CHUNK_K = 1024
CHUNK_ELEMENTS = 1 << 23  # score elements per block: 32 MiB in fp32


def _chunk_q(b: int, h: int, n_q: int, chunk_k: int) -> int:
    return max(1, min(n_q, CHUNK_ELEMENTS // max(1, b * h * chunk_k)))


def _block_scores(q5: Tensor, k: Tensor, geo: AttentionGeometry, k0: int, k1: int) -> tuple[Tensor, Tensor]:
    """Scores (B, H_kv, G, Cq, Ck) of grouped queries q5 (B, H_kv, G, Cq, d), those of `geo`, on keys [k0, k1),
    soft-capped, −inf where invisible; and the visibility mask."""
    s = geo.logits(torch.einsum("bhgqd,bhkd->bhgqk", q5, k[:, :, k0:k1].float()))
    if geo.sees_all(k0, k1):
        return s, torch.ones((1,) * s.ndim, dtype=torch.bool, device=s.device)  # every key visible: no mask
    vis = geo.visible(k0, k1)[:, None, None]  # (B or 1, 1, 1, Cq, Ck)
    return s.masked_fill(~vis, float("-inf")), vis


def _blocks(q5: Tensor, k: Tensor, geo: AttentionGeometry, q0: int, q1: int,
            chunk_k: int) -> Iterator[tuple[int, int, Tensor, Tensor]]:
    """Yield (k0, k1, s, visible) for the key blocks that some query of [q0, q1) can see.

    q5: (B, H_kv, G, Nq, d) fp32; s: (B, H_kv, G, Cq, Ck) with −inf where invisible.
    """
    n_k = k.shape[2]
    rows = geo.rows(q0, q1)
    lo, hi = rows.key_range(n_k)
    for k0 in range(lo - lo % chunk_k, hi, chunk_k):
        k1 = min(k0 + chunk_k, n_k)
        yield k0, k1, *_block_scores(q5[:, :, :, q0:q1], k, rows, k0, k1)


def _grouped(q: Tensor, n_kv: int) -> Tensor:
    b, h, n, d = q.shape
    return q.float().view(b, n_kv, h // n_kv, n, d)


def stats_torch(q: Tensor, k: Tensor, geo: AttentionGeometry, *, segments: Tensor | None, n_segments: int,
                topk: int, want: frozenset[str], lse: Tensor | None = None,
                chunk_k: int | None = None) -> dict[str, Tensor]:
    """Statistics of softmax(scale · q kᵀ) without the N×N matrix; see `interp.kernels.attention_stats`.

    q: (B, H, Nq, d); k: (B, H_kv, Nk, d); geo resolved; segments: (B, Nk) long in [0, n_segments) or None. The
    sinks are folded into the row lse after the first pass. lse: (B, H, Nq) the rows' known lse (sinks included):
    the first pass then only runs for argmax / max_prob / top-k, without exponentials. Returns only the entries
    named in `want`.
    """
    b, h, n_q, _ = q.shape
    n_kv, n_k = k.shape[1], k.shape[2]
    g = h // n_kv
    dev = q.device
    chunk_k = chunk_k or CHUNK_K
    q5 = _grouped(q, n_kv)
    shape5 = (b, n_kv, g)
    given = lse is not None
    lse = lse.reshape(*shape5, n_q).clone() if given else torch.empty(*shape5, n_q, device=dev)
    first = not given or bool(want & {"argmax", "max_prob", "topk"})
    best = torch.full((*shape5, n_q), float("-inf"), device=dev)
    best_idx = torch.full((*shape5, n_q), -1, dtype=torch.long, device=dev)
    k_top = min(topk, n_k) if "topk" in want else 0
    top_val = torch.full((*shape5, n_q, k_top), float("-inf"), device=dev)
    top_idx = torch.full((*shape5, n_q, k_top), -1, dtype=torch.long, device=dev)
    second = want & {"segment_mass", "entropy", "mean_distance", "key_mass", "key_count"}
    seg_mass = torch.zeros(*shape5, n_q, n_segments, device=dev) if "segment_mass" in want else None
    p_dot_gap = torch.zeros(*shape5, n_q, device=dev)  # Σ p · (lse − s): the entropy, without cancellation
    p_dot_dist = torch.zeros(*shape5, n_q, device=dev)
    key_mass = torch.zeros(*shape5, n_k, device=dev) if "key_mass" in want else None
    key_count = torch.zeros(b, n_k, device=dev) if "key_count" in want else None
    onehot = (torch.nn.functional.one_hot(segments, n_segments).float() if seg_mass is not None else None)
    sink = None if geo.sinks is None else geo.sinks.to(dev).view(1, n_kv, g, 1)
    cq = _chunk_q(b, h, n_q, chunk_k)
    for q0 in range(0, n_q, cq):
        q1 = min(q0 + cq, n_q)
        m = torch.full((*shape5, q1 - q0), float("-inf"), device=dev)
        total = torch.zeros_like(m)
        for k0, k1, s, _ in _blocks(q5, k, geo, q0, q1, chunk_k) if first else ():
            blk_max = _track_max(best[..., q0:q1], best_idx[..., q0:q1], top_val[..., q0:q1, :],
                                 top_idx[..., q0:q1, :], s, k0, k1, k_top)
            if not given:
                new_m = torch.maximum(m, blk_max)
                safe = torch.where(torch.isinf(new_m), torch.zeros_like(new_m), new_m)
                total = total * torch.exp(m - safe) + torch.exp(s - safe[..., None]).sum(-1)
                m = new_m
        if not given:
            lse[..., q0:q1] = torch.where(total > 0, m + torch.log(total), torch.full_like(m, float("-inf")))
            if sink is not None:
                lse[..., q0:q1] = torch.logaddexp(lse[..., q0:q1], sink.expand_as(m))
        if not second:
            continue
        row_lse = lse[..., q0:q1, None]
        for k0, k1, s, vis in _blocks(q5, k, geo, q0, q1, chunk_k):
            p = torch.where(vis, torch.exp(s - torch.where(torch.isinf(row_lse), 0.0, row_lse)), 0.0)
            if "entropy" in want:
                p_dot_gap[..., q0:q1] += torch.where(vis, p * (row_lse - s), 0.0).sum(-1)
            if "mean_distance" in want:
                gap = geo.query_positions[q0:q1, None].to(dev, p.dtype) - torch.arange(k0, k1, device=dev, dtype=p.dtype)
                p_dot_dist[..., q0:q1] += (p * gap.abs()).sum(-1)
            if seg_mass is not None:
                seg_mass[..., q0:q1, :] += torch.einsum("bhgqk,bks->bhgqs", p, onehot[:, k0:k1])
            if key_mass is not None:
                key_mass[..., k0:k1] += p.sum(-2)
            if key_count is not None:
                key_count[:, k0:k1] += vis.expand(b, 1, 1, *s.shape[-2:])[:, 0, 0].sum(-2).float()
    if sink is not None and "entropy" in want:  # the sink's own term of the row entropy
        p_dot_gap += torch.exp(sink - lse) * (lse - sink)
    flat = lambda t: t.reshape(b, h, n_q, *t.shape[4:])  # noqa: E731
    out = max_results(flat(best), flat(best_idx), flat(top_val), flat(top_idx), flat(lse), topk, want)
    if "lse" in want:
        out["lse"] = flat(lse)
    if "entropy" in want:
        out["entropy"] = flat(p_dot_gap)
    if "mean_distance" in want:
        out["mean_distance"] = flat(p_dot_dist)
    if seg_mass is not None:
        out["segment_mass"] = seg_mass.reshape(b, h, n_q, n_segments)
    if key_mass is not None:
        out["key_mass"] = key_mass.reshape(b, h, n_k)
    if key_count is not None:
        out["key_count"] = key_count
    return out


def _track_max(best: Tensor, best_idx: Tensor, top_val: Tensor, top_idx: Tensor, s: Tensor, k0: int, k1: int,
               k_top: int) -> Tensor:
    """Fold a score block s (…, Cq, k1 − k0) into the running row max, its first index, and the top k_top (views of
    the running tensors, updated in place). Returns the block's row max."""
    blk_max, blk_arg = s.max(dim=-1)
    better = blk_max > best
    best_idx.copy_(torch.where(better, blk_arg + k0, best_idx))
    best.copy_(torch.where(better, blk_max, best))
    if k_top:
        idx = torch.arange(k0, k1, device=s.device).expand_as(s)
        val, ind = _merge_topk(top_val, top_idx, s, idx, k_top)
        top_val.copy_(val)
        top_idx.copy_(ind)
    return blk_max


def row_max_torch(q: Tensor, k: Tensor, geo: AttentionGeometry, *, topk: int,
                  index: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The max pass alone, for scores without soft-cap: each row's max score (B, H, Nq) (−inf: it sees no key), its
    first index (−1; only with `index`), and its top min(topk, Nk) scores and indices (B, H, Nq, k). No
    exponentials; each block of rows meets all the keys it can see in one product, only the keys some row of the
    block cannot see are masked, and the scale is applied to the maxima only."""
    b, h, n_q, _ = q.shape
    n_kv, n_k = k.shape[1], k.shape[2]
    shape5 = (b, n_kv, h // n_kv, n_q)
    best = torch.full(shape5, float("-inf"), device=q.device)
    best_idx = torch.full(shape5, -1, dtype=torch.long, device=q.device)
    k_top = min(topk, n_k)
    top_val = torch.full((*shape5, k_top), float("-inf"), device=q.device)
    top_idx = torch.full((*shape5, k_top), -1, dtype=torch.long, device=q.device)
    q5, kf = _grouped(q, n_kv), k.float()
    step = max(1, CHUNK_ELEMENTS // max(1, b * h * n_k))
    for q0 in range(0, n_q, step):
        q1 = min(q0 + step, n_q)
        rows = geo.rows(q0, q1)
        lo, hi = rows.key_range(n_k)
        if hi <= lo:
            continue
        s = torch.einsum("bhgqd,bhkd->bhgqk", q5[:, :, :, q0:q1], kf[:, :, lo:hi])
        # only keys some row cannot see need masking: with no key mask, those outside the run every row sees
        a, e = rows.unmasked(n_k) if geo.key_mask is None else (hi, hi)
        a = min(max(a, lo), hi)
        e = min(max(e, a), hi)
        for m0, m1 in ((lo, a), (e, hi)):
            if m0 < m1:
                s[..., m0 - lo:m1 - lo].masked_fill_(~rows.visible(m0, m1)[:, None, None], float("-inf"))
        if k_top or index:
            _track_max(best[..., q0:q1], best_idx[..., q0:q1], top_val[..., q0:q1, :], top_idx[..., q0:q1, :], s, lo,
                       hi, k_top)
        else:
            torch.maximum(best[..., q0:q1], s.amax(-1), out=best[..., q0:q1])
    flat = lambda t: t.reshape(b, h, n_q, *t.shape[4:])  # noqa: E731
    return flat(best * geo.scale), flat(best_idx), flat(top_val * geo.scale), flat(top_idx)


def max_results(best: Tensor, best_idx: Tensor, top_val: Tensor, top_idx: Tensor, lse: Tensor, topk: int,
                want: frozenset[str]) -> dict[str, Tensor]:
    """argmax, max_prob and topk_index / topk_prob (always `topk` columns; missing entries −1 / 0), as asked in
    `want`, from the max pass's results (B, H, Nq[, k]) and the row lse (B, H, Nq)."""
    out: dict[str, Tensor] = {}
    seen = torch.isfinite(best)
    row = torch.where(seen, lse, 0.0)
    if "argmax" in want:
        out["argmax"] = torch.where(seen, best_idx, -1)
    if "max_prob" in want:
        out["max_prob"] = torch.where(seen, torch.exp(best - row), 0.0)
    if "topk" in want:
        prob = torch.where(top_idx >= 0, torch.exp(top_val - row[..., None]), 0.0)
        pad = topk - top_idx.shape[-1]
        out["topk_index"] = torch.nn.functional.pad(top_idx, (0, pad), value=-1)
        out["topk_prob"] = torch.nn.functional.pad(prob, (0, pad))
    return out


def _merge_topk(val: Tensor, idx: Tensor, s: Tensor, s_idx: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of the union of (val, idx) and a new block: by score descending, then index ascending."""
    v = torch.cat([val, s], -1)
    i = torch.cat([idx, torch.where(torch.isinf(s), -1, s_idx)], -1)
    order = torch.sort(torch.where(i < 0, torch.iinfo(torch.long).max, i), dim=-1, stable=True).indices
    v, i = v.gather(-1, order), i.gather(-1, order)
    order = torch.sort(v, dim=-1, descending=True, stable=True).indices[..., :k]
    return v.gather(-1, order), i.gather(-1, order)


def probabilities_block(q: Tensor, k: Tensor, lse: Tensor, q0: int, q1: int, k0: int, k1: int,
                        geo: AttentionGeometry) -> Tensor:
    """Exact probabilities of queries [q0, q1) on keys [k0, k1), normalised over all keys by `lse`.

    lse: (B, H, Nq) from `stats_torch`. Returns (B, H, q1 − q0, k1 − k0) fp32.
    """
    b, h = q.shape[:2]
    n_kv = k.shape[1]
    s, vis = _block_scores(_grouped(q[:, :, q0:q1], n_kv), k, geo.rows(q0, q1), k0, k1)
    row = lse[:, :, q0:q1].reshape(b, n_kv, h // n_kv, q1 - q0, 1)
    p = torch.where(vis & torch.isfinite(row), torch.exp(s - torch.where(torch.isfinite(row), row, 0.0)), 0.0)
    return p.reshape(b, h, q1 - q0, k1 - k0)


def _block_means(sums: Tensor, n_q: int, n_k: int, block_q: int, block_k: int) -> Tensor:
    """Block sums (B, H, rows, cols) divided by each block's cell count (the last row / column may be partial)."""
    rq = torch.full((sums.shape[2],), float(block_q), device=sums.device)
    rq[-1] = n_q - block_q * (sums.shape[2] - 1)
    rk = torch.full((sums.shape[3],), float(block_k), device=sums.device)
    rk[-1] = n_k - block_k * (sums.shape[3] - 1)
    return sums / (rq[:, None] * rk[None, :])


def pooled_torch(q: Tensor, k: Tensor, lse: Tensor, geo: AttentionGeometry, *, block_q: int, block_k: int,
                 reduce: str) -> Tensor:
    """Block-pooled probabilities (B, H, ⌈Nq/block_q⌉, ⌈Nk/block_k⌉): mean or max over each block's cells."""
    b, h, n_q, _ = q.shape
    n_k = k.shape[2]
    out = torch.zeros(b, h, math.ceil(n_q / block_q), math.ceil(n_k / block_k), device=q.device)
    step_q = block_q * max(1, _chunk_q(b, h, n_q, CHUNK_K) // block_q)
    step_k = block_k * max(1, CHUNK_K // block_k)
    for q0 in range(0, n_q, step_q):
        q1 = min(q0 + step_q, n_q)
        for k0 in range(0, n_k, step_k):
            k1 = min(k0 + step_k, n_k)
            p = probabilities_block(q, k, lse, q0, q1, k0, k1, geo)
            pad_q, pad_k = (-(q1 - q0)) % block_q, (-(k1 - k0)) % block_k
            p = torch.nn.functional.pad(p, (0, pad_k, 0, pad_q))
            p = p.view(b, h, p.shape[2] // block_q, block_q, p.shape[3] // block_k, block_k)
            rows = slice(q0 // block_q, q0 // block_q + p.shape[2])
            cols = slice(k0 // block_k, k0 // block_k + p.shape[4])
            if reduce == "max":
                out[:, :, rows, cols] = p.amax(dim=(3, 5))
            else:
                out[:, :, rows, cols] = p.sum(dim=(3, 5))
    return _block_means(out, n_q, n_k, block_q, block_k) if reduce == "mean" else out


def diagonal_torch(q: Tensor, k: Tensor, lse: Tensor, offsets: list[int], geo: AttentionGeometry) -> Tensor:
    """Probability of each query on the key `offset` positions before its own: (B, H, Nq, len(offsets)) fp32,
    0 where that key does not exist or is not visible. O(Nq · d) per offset."""
    b, h, n_q, _ = q.shape
    n_kv, n_k = k.shape[1], k.shape[2]
    kv = torch.arange(h, device=q.device) // (h // n_kv)  # each query head's KV head
    row = torch.where(torch.isfinite(lse), lse, 0.0)
    out = torch.zeros(b, h, n_q, len(offsets), device=q.device)
    pos = geo.query_positions
    lo, hi = geo.span(n_k)                                                  # (B or 1, Nq)
    for c, off in enumerate(offsets):
        j = pos - off                                                       # (Nq,)
        ok = (j >= lo) & (j <= hi)
        jj = j.clamp(0, n_k - 1)
        s = geo.logits((q.float() * k[:, kv[:, None], jj[None, :]].float()).sum(-1))  # (B, H, Nq)
        vis = ok[:, None] & (geo.key_mask[:, None, jj] if geo.key_mask is not None else True) & torch.isfinite(lse)
        out[..., c] = torch.where(vis, torch.exp(s - row), 0.0)
    return out


def one_pass_fits(b: int, h: int, n_k: int, block_q: int, block_k: int) -> bool:
    """Whether `pooled_one_pass`'s per-row block sums for block_q rows stay within one chunk's memory."""
    return b * h * block_q * math.ceil(n_k / block_k) <= CHUNK_ELEMENTS


def pooled_one_pass(q: Tensor, k: Tensor, geo: AttentionGeometry, *, block_q: int, block_k: int, reduce: str,
                    chunk_k: int | None = None) -> Tensor:
    """`pooled_torch` without a known lse: one pass over the visible key blocks, keeping per query and key block
    the running Σ exp(s − m) (or max s) with an online max m, normalised by the row's lse at the end. It keeps
    (B, H, rows, ⌈Nk/block_k⌉) sums for a chunk of rows: see `one_pass_fits`."""
    chunk_k = chunk_k or CHUNK_K
    b, h, n_q, _ = q.shape
    n_kv, n_k = k.shape[1], k.shape[2]
    n_kb = math.ceil(n_k / block_k)
    out = torch.zeros(b, h, math.ceil(n_q / block_q), n_kb, device=q.device)
    q5 = _grouped(q, n_kv)
    step_q = block_q * max(1, min(_chunk_q(b, h, n_q, chunk_k), CHUNK_ELEMENTS // (b * h * n_kb)) // block_q)
    step_k = block_k * max(1, chunk_k // block_k)
    for q0 in range(0, n_q, step_q):
        q1 = min(q0 + step_q, n_q)
        shape = (b, n_kv, h // n_kv, q1 - q0)
        m = torch.full(shape, float("-inf"), device=q.device)
        total = torch.zeros(shape, device=q.device)
        acc = torch.full((*shape, n_kb), 0.0 if reduce == "mean" else float("-inf"), device=q.device)
        rows = geo.rows(q0, q1)
        lo, hi = rows.key_range(n_k)
        for k0 in range(lo - lo % step_k, hi, step_k):
            k1 = min(k0 + step_k, n_k)
            s, _ = _block_scores(q5[:, :, :, q0:q1], k, rows, k0, k1)
            pad = (-(k1 - k0)) % block_k
            s = (torch.nn.functional.pad(s, (0, pad), value=float("-inf")) if pad else s).unflatten(-1, (-1, block_k))
            cols = slice(k0 // block_k, k0 // block_k + s.shape[-2])
            new_m = torch.maximum(m, s.amax((-2, -1)))
            safe = torch.where(torch.isinf(new_m), 0.0, new_m)
            rescale = torch.exp(torch.where(torch.isinf(m), float("-inf"), m) - safe)
            e = torch.exp(s - safe[..., None, None])
            total = total * rescale + e.sum((-2, -1))
            if reduce == "max":
                acc[..., cols] = s.amax(-1)
            else:
                acc *= rescale[..., None]
                acc[..., cols] += e.sum(-1)
            m = new_m
        if reduce == "max":
            safe = torch.where(torch.isinf(m), 0.0, m)
            probs = torch.where(total[..., None] > 0, torch.exp(acc - safe[..., None]) / total[..., None].clamp_min(1e-30),
                                0.0)
        else:
            probs = torch.where(total[..., None] > 0, acc / total[..., None].clamp_min(1e-30), 0.0)
        probs = probs.reshape(b, h, q1 - q0, n_kb)
        pad_q = (-(q1 - q0)) % block_q
        probs = torch.nn.functional.pad(probs, (0, 0, 0, pad_q)).unflatten(2, (-1, block_q))
        rows = slice(q0 // block_q, q0 // block_q + probs.shape[2])
        out[:, :, rows] = probs.amax(3) if reduce == "max" else probs.sum(3)
    return _block_means(out, n_q, n_k, block_q, block_k) if reduce == "mean" else out


def grid_distance_torch(q: Tensor, k: Tensor, lse: Tensor, geo: AttentionGeometry, *, query_coords: Tensor,
                        key_coords: Tensor, keep_keys: Tensor, renormalize: bool) -> Tensor:
    """Σ_j p_ij · ‖c_i − c_j‖ over the kept keys (divided by their mass when `renormalize`); (B, H, Nq)."""
    b, h, n_q, _ = q.shape
    n_k = k.shape[2]
    total = torch.zeros(b, h, n_q, device=q.device)
    mass = torch.zeros_like(total)
    cq = _chunk_q(b, h, n_q, CHUNK_K)
    for q0 in range(0, n_q, cq):
        q1 = min(q0 + cq, n_q)
        for k0 in range(0, n_k, CHUNK_K):
            k1 = min(k0 + CHUNK_K, n_k)
            p = probabilities_block(q, k, lse, q0, q1, k0, k1, geo) * keep_keys[k0:k1]
            dist = torch.cdist(query_coords[q0:q1].float(), key_coords[k0:k1].float())
            total[:, :, q0:q1] += (p * dist).sum(-1)
            mass[:, :, q0:q1] += p.sum(-1)
    if renormalize:
        return torch.where(mass > 0, total / mass.clamp_min(1e-30), 0.0)
    return total
