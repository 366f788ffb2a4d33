"""Attention statistics in Triton, streamed over key blocks: no (Nq, Nk) tensor is ever materialised.

One program per (query block, batch·head) (`_stats_kernel`). It sweeps the key blocks that its queries can see at all
(`_key_span`: blocks wholly hidden by causality or the sliding window are skipped), first those every query sees,
unmasked, then the masked band (the causal diagonal; every visible block under a window or a key mask), each block's
scores formed by `_scores` and masked by `_visible` (the geometry of `geometry.AttentionGeometry`), in `_sweep`:

* without a known lse, two passes: pass 1, the running max (argmax, no exponentials needed), the online
  log-sum-exp and the top-k merge (`_merge_topk`); pass 2, only when a linear statistic is asked for, with the final
  lse: p = exp2(s − lse) and Σ p·(lse − s) (entropy), Σ p·|i − j| (mean distance), p @ one-hot(segment) (segment
  mass, `_segment_dot`, an fp32 dot) and atomic column sums of p (key mass);
* with the lse known (the model's own SDPA call returns it: `interp.hooks.AttentionCall.lse`), one pass does all:
  one QKᵀ and one exponential per score.

Scores are kept in base 2 (s·log2 e) so the exponentials are exp2. Every statistic is a `tl.constexpr` flag, so an
unused one costs nothing. Counts of queries per key need no scores and come from the geometry on the host. On a GPU
the block sizes are autotuned (`_configs`, keyed on the length's power of two, the head dim, the geometry and the
statistics). The key mass is summed with atomics, so its last bits may differ from run to run. Under
`TRITON_INTERPRET=1` (CPU tensors) the same kernel runs in the interpreter with 32 × 32 blocks, with bf16 inputs
widened to fp32 inside the kernel (the interpreter's bf16 dot is wrong; the widening is exact).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .geometry import AttentionGeometry

__all__ = ["stats_triton"]

SEGMENT_CHUNK = 64  # segments accumulated per launch (one-hot tile width); more segments → extra launches
INTERPRET_BLOCK = 32  # block sizes under the interpreter (small, so that small test shapes span several blocks)
TUNE_FROM = 1 << 20  # query × key pairs from which a problem is worth autotuning (below: the first candidate)
MAX_HEADS = 16  # query heads of one KV head stacked in one program (more: several programs per KV head)

_LOG2E = 1.4426950408889634


@triton.jit
def _tanh(x):
    """tanh within ~2 ulp of fp32 (so that saturated soft-capped scores tie exactly as with torch.tanh)."""
    a = tl.abs(x)
    t = tl.exp2(-2.8853900817779268 * a)  # e^(−2|x|)
    big = 1.0 - 2.0 * t / (1.0 + t)
    y = 0.5 * a  # small |x|: Taylor series of tanh(|x|/2), then the double-angle formula
    y2 = y * y
    h = y + y * y2 * (-0.3333333333333333 + y2 * (0.13333333333333333 + y2 * (
        -0.05396825396825397 + y2 * (0.021869488536155203 - y2 * 0.008863235529902197))))
    th = tl.where(a < 0.625, 2.0 * h / (1.0 + h * h), big)
    return tl.where(x < 0, -th, th)


@triton.jit
def _key_span(qpos, row_ok, row_lo, row_hi, Nk, window, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_WINDOW: tl.constexpr, HAS_KMASK: tl.constexpr, HAS_BOUNDS: tl.constexpr):
    """(lo, mid, hi): [lo, hi) the keys that some query of the block can see (lo aligned down to a key block; the
    blocks wholly hidden by causality, the window or the rows' bounds lie outside), and [lo, mid) whole key blocks
    that every query of the block sees, which need no masking (with a window, bounds or a key mask: none, mid = lo).
    Causal: only the diagonal band [mid, hi) is masked, as in Triton's fused-attention tutorial."""
    lo = 0
    hi = Nk
    if HAS_BOUNDS:  # each row's own run [row_lo, row_hi] (blocks, documents, symmetric windows)
        lo = (tl.min(tl.where(row_ok, row_lo, 2147483647), axis=0) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(tl.max(tl.where(row_ok, row_hi, -1), axis=0) + 1, Nk)
    if CAUSAL:
        hi = tl.minimum(tl.max(tl.where(row_ok, qpos, -1), axis=0) + 1, Nk)
    if HAS_WINDOW:
        lo = tl.maximum(tl.min(tl.where(row_ok, qpos, 2147483647), axis=0) - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    mid = lo
    if not HAS_WINDOW and not HAS_KMASK and not HAS_BOUNDS:
        seen_by_all = Nk
        if CAUSAL:
            seen_by_all = tl.minimum(tl.min(tl.where(row_ok, qpos, 2147483647), axis=0) + 1, Nk)
        mid = (seen_by_all // BLOCK_N) * BLOCK_N
    return lo, mid, hi


@triton.jit
def _scores(q, k_base, skn, d_ok, offs_n, Nk, qk_scale, cap_in, cap_out,
            SOFTCAP: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Base-2 scores (BLOCK_M, BLOCK_N) of the block's queries on keys offs_n, soft-capped; nothing masked."""
    kt = tl.load(k_base + offs_n.to(tl.int64)[None, :] * skn, mask=d_ok[:, None] & (offs_n < Nk)[None, :], other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
    acc = tl.dot(q, kt, input_precision=PREC)  # fp32 accumulation
    if SOFTCAP:
        return _tanh(acc * cap_in) * cap_out  # softcap·tanh((q·k)·scale / softcap)·log2 e
    return acc * qk_scale  # scale·log2 e


@triton.jit
def _visible(offs_n, qpos_col, row_ok_col, lo_col, hi_col, Nk, window, kmask_ptr, stride_mb, stride_mn, b64,
             CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KMASK: tl.constexpr, HAS_BOUNDS: tl.constexpr):
    """(BLOCK_M, BLOCK_N) whether each query of the block sees key offs_n (the geometry of
    `geometry.AttentionGeometry`)."""
    col_ok = offs_n < Nk
    vis = row_ok_col & col_ok[None, :]
    if CAUSAL:
        vis = vis & (offs_n[None, :] <= qpos_col)
    if HAS_WINDOW:
        vis = vis & ((qpos_col - offs_n[None, :]) < window)
    if HAS_BOUNDS:
        vis = vis & (offs_n[None, :] >= lo_col) & (offs_n[None, :] <= hi_col)
    if HAS_KMASK:
        km = tl.load(kmask_ptr + b64 * stride_mb + offs_n.to(tl.int64) * stride_mn, mask=col_ok, other=0)
        vis = vis & (km != 0)[None, :]
    return vis


@triton.jit
def _first_index(s2, value, offs_n):
    """Per row, the smallest key index in offs_n whose score equals value (2^31 − 1 where none does)."""
    return tl.min(tl.where(s2 == value[:, None], offs_n[None, :], 2147483647), axis=1)


@triton.jit
def _merge_topk(run_v, run_i, kth, s2, bm, offs_n, BLOCK_M: tl.constexpr, TOPK: tl.constexpr, K_PAD: tl.constexpr):
    """Merge a score block (row maxima bm) into each row's running top-k, sorted by score, ties to the smaller key
    index (running entries have smaller indices: they win ties); only where some row can gain an entry over its
    k-th best so far, kth. Returns (values, indices, kth)."""
    if tl.max((bm > kth).to(tl.int32), axis=0) > 0:
        cols = tl.arange(0, K_PAD)
        s_rem = s2
        ptr = tl.zeros([BLOCK_M], tl.int32)
        new_v = tl.full([BLOCK_M, K_PAD], float("-inf"), tl.float32)
        new_i = tl.full([BLOCK_M, K_PAD], -1, tl.int32)
        for t in tl.static_range(TOPK):
            at = cols[None, :] == ptr[:, None]
            a_val = tl.max(tl.where(at, run_v, float("-inf")), axis=1)
            a_idx = tl.max(tl.where(at, run_i, -1), axis=1)
            b_val = tl.max(s_rem, axis=1)
            b_idx = _first_index(s_rem, b_val, offs_n)
            take_b = b_val > a_val
            val = tl.where(take_b, b_val, a_val)
            idx = tl.where(val == float("-inf"), -1, tl.where(take_b, b_idx, a_idx))
            new_v = tl.where(cols[None, :] == t, val[:, None], new_v)
            new_i = tl.where(cols[None, :] == t, idx[:, None], new_i)
            ptr = ptr + (1 - take_b.to(tl.int32))
            s_rem = tl.where(take_b[:, None] & (offs_n[None, :] == b_idx[:, None]), float("-inf"), s_rem)
            kth = val
        run_v = new_v
        run_i = new_i
    return run_v, run_i, kth


@triton.jit
def _segment_dot(seg_acc, p, onehot):
    """seg_acc + p @ onehot (BLOCK_M, S_PAD), exact in fp32 (`input_precision="ieee"`: no tensor cores). Splitting p
    into bf16 parts for the tensor cores gave garbage segment masses on an H200 (±4.6e27 through one accumulator,
    errors of 0.3 to 1e19 with one accumulator per part); the fp32 dot was exact there."""
    return tl.dot(p, onehot, seg_acc, input_precision="ieee")


@triton.jit
def _sweep(m_i, l_i, arg, run_v, run_i, kth, ent, dist, seg_acc,
           q, k_base, skn, d_ok, start, stop, qpos_col, row_ok_col, lo_col, hi_col, Nk, window, kmask_ptr, smb, smn,
           b64, qk_scale, cap_in, cap_out, lse2, seg_ptr, ssb, ssn, seg_base, km_heads_ptr, head_ok,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEADS: tl.constexpr, CAUSAL: tl.constexpr,
           HAS_WINDOW: tl.constexpr, HAS_KMASK: tl.constexpr, HAS_BOUNDS: tl.constexpr, SOFTCAP: tl.constexpr,
           PREC: tl.constexpr,
           UPCAST: tl.constexpr, MASKED: tl.constexpr, MAX: tl.constexpr, SUM: tl.constexpr, W_ARGMAX: tl.constexpr, TOPK: tl.constexpr,
           K_PAD: tl.constexpr, W_ENT: tl.constexpr, W_DIST: tl.constexpr, W_SEG: tl.constexpr, S_PAD: tl.constexpr,
           W_KM: tl.constexpr):
    """One sweep over the key blocks [start, stop), carrying each row's running state:

    MAX: the max m (base 2), first argmax (−1: none) and top-k values and indices (no exponentials); SUM: Σ exp2(s −
    m), online (pass 1 of two, for the lse); W_ENT / W_DIST / W_SEG / W_KM, with the row's final base-2 lse lse2:
    p = exp2(s − lse2) (one exponential per score) and Σ p·(lse − s) (entropy, base 2), Σ p·|i − j| (mean
    distance), p @ one-hot(segment − seg_base) (`_segment_dot`) and each head's column sums of p (rows r·HEADS + g: head g), added
    atomically to its row of key mass (km_heads_ptr: (HEADS,) pointers; head_ok: which heads exist).
    MASKED: the geometry masks the scores; else every row sees every key of these blocks (`_key_span`), and the rows
    past Nq carry lse2 = 1e30, so that their p is 0."""
    lse_safe = tl.where(lse2 == float("-inf"), 0.0, lse2)
    seg_cols = tl.arange(0, S_PAD)
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        s2 = _scores(q, k_base, skn, d_ok, offs_n, Nk, qk_scale, cap_in, cap_out, SOFTCAP, PREC, UPCAST)
        if MASKED:
            vis = _visible(offs_n, qpos_col, row_ok_col, lo_col, hi_col, Nk, window, kmask_ptr, smb, smn, b64, CAUSAL,
                           HAS_WINDOW, HAS_KMASK, HAS_BOUNDS)
            s2 = tl.where(vis, s2, float("-inf"))
        if MAX:
            if W_ARGMAX:  # the block's max and its first index in one reduction; strict: an earlier block wins ties
                bm, bi = tl.max(s2, axis=1, return_indices=True, return_indices_tie_break_left=True)
                arg = tl.where(bm > m_i, start_n + bi, arg)
            else:
                bm = tl.max(s2, axis=1)
            m_new = tl.maximum(m_i, bm)
            if SUM:  # online sum, rescaled to the new max
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s2 - m_safe[:, None]), axis=1)
            m_i = m_new
            if TOPK > 0:
                run_v, run_i, kth = _merge_topk(run_v, run_i, kth, s2, bm, offs_n, BLOCK_M, TOPK, K_PAD)
        if W_ENT or W_DIST or W_SEG or W_KM:
            if MASKED:
                p = tl.where(vis, tl.exp2(s2 - lse_safe[:, None]), 0.0)
                if W_ENT:
                    ent += tl.sum(p * (lse_safe[:, None] - tl.where(vis, s2, lse_safe[:, None])), axis=1)
            else:
                p = tl.exp2(s2 - lse2[:, None])
                if W_ENT:
                    ent += tl.sum(p * (lse2[:, None] - s2), axis=1)
            if W_DIST:
                dist += tl.sum(p * tl.abs(qpos_col - offs_n[None, :]).to(tl.float32), axis=1)
            if W_SEG:
                sid = tl.load(seg_ptr + b64 * ssb + offs_n.to(tl.int64) * ssn, mask=offs_n < Nk, other=-1)
                onehot = ((sid.to(tl.int32) - seg_base)[:, None] == seg_cols[None, :]).to(tl.float32)
                seg_acc = _segment_dot(seg_acc, p, onehot)
            if W_KM:
                col = tl.sum(tl.reshape(p, [BLOCK_M // HEADS, HEADS, BLOCK_N]), axis=0)  # (HEADS, BLOCK_N)
                tl.atomic_add(km_heads_ptr[:, None] + offs_n[None, :], col,
                              mask=head_ok[:, None] & (offs_n < Nk)[None, :])
    return m_i, l_i, arg, run_v, run_i, kth, ent, dist, seg_acc


@triton.jit
def _stats_kernel(
    q_ptr, k_ptr, qpos_ptr, kmask_ptr, seg_ptr, sink_ptr, bounds_ptr,
    lse_ptr, lse2_ptr, argmax_ptr, maxp_ptr, topi_ptr, topp_ptr, ent_ptr, dist_ptr, segm_ptr, km_ptr,
    H, GROUP, HEAD_CHUNKS, Nq, Nk, D,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    smb, smn,
    ssb, ssn,
    sbs, sbb,
    window, qk_scale, cap_in, cap_out, seg_base, n_segments, len_bucket,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEADS: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KMASK: tl.constexpr, HAS_BOUNDS: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    LOAD_LSE: tl.constexpr, NEED_EXP: tl.constexpr, MAX_IN_PASS2: tl.constexpr, LINEAR: tl.constexpr,
    W_LSE: tl.constexpr, W_LSE2: tl.constexpr, W_ARGMAX: tl.constexpr, W_MAXP: tl.constexpr,
    TOPK: tl.constexpr, K_PAD: tl.constexpr,
    W_ENT: tl.constexpr, W_DIST: tl.constexpr, W_SEG: tl.constexpr, S_PAD: tl.constexpr, W_KM: tl.constexpr,
):
    """One block of BLOCK_M rows: BLOCK_M // HEADS queries of HEADS query heads that share one KV head (row r·HEADS +
    g: query r, head g of the block's chunk of the group), so that each K tile is loaded once for all of them. Without a known lse: pass 1 (max, argmax, top-k and the
    online sum), then pass 2 (the statistics linear in p: LINEAR) where one is asked for. LOAD_LSE: the base-2 lse
    is read (e.g. the model's own attention call returned it) and one pass does both (MAX_IN_PASS2: the max too). Each pass sweeps the key blocks every
    query sees unmasked, then the masked band (`_key_span`)."""
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)  # (batch, KV head, chunk of its query heads)
    chunk = pid_h % HEAD_CHUNKS
    b = pid_h // HEAD_CHUNKS // (H // GROUP)
    kv = pid_h // HEAD_CHUNKS % (H // GROUP)
    b64 = b.to(tl.int64)

    rows = tl.arange(0, BLOCK_M)
    g = chunk * HEADS + rows % HEADS  # each row's query head within the group
    offs_m = pid_m * (BLOCK_M // HEADS) + rows // HEADS
    h = kv * GROUP + g
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = (offs_m < Nq) & (g < GROUP)
    d_ok = offs_d < D
    qpos = tl.load(qpos_ptr + offs_m, mask=row_ok, other=0).to(tl.int32)
    q_ptrs = (q_ptr + b64 * sqb + h.to(tl.int64)[:, None] * sqh + offs_m.to(tl.int64)[:, None] * sqm
              + offs_d[None, :] * sqd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + b64 * skb + kv.to(tl.int64) * skh + offs_d[:, None] * skd
    row_lo = qpos
    row_hi = qpos
    if HAS_BOUNDS:  # bounds: (2, B or 1, Nq) int32, strides sbs (first → last) and sbb (batch; 0: shared)
        row_lo = tl.load(bounds_ptr + b64 * sbb + offs_m, mask=row_ok, other=0)
        row_hi = tl.load(bounds_ptr + sbs + b64 * sbb + offs_m, mask=row_ok, other=-1)
    lo, mid, hi = _key_span(qpos, row_ok, row_lo, row_hi, Nk, window, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_KMASK,
                            HAS_BOUNDS)
    qpos_col = qpos[:, None]  # formed once, outside the sweeps' loops (inside them MLIR failed to compile on Hopper)
    row_ok_col = row_ok[:, None]
    lo_col = row_lo[:, None]
    hi_col = row_hi[:, None]
    out_rows = (b64 * H + h) * Nq + offs_m
    sink2 = tl.zeros([BLOCK_M], tl.float32)
    if HAS_SINKS:  # each row's head's sink logit, base 2: one more term of the row's denominator
        sink2 = tl.load(sink_ptr + h, mask=row_ok, other=0.0) * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    arg = tl.full([BLOCK_M], -1, tl.int32)
    run_v = tl.full([BLOCK_M, K_PAD], float("-inf"), tl.float32)
    run_i = tl.full([BLOCK_M, K_PAD], -1, tl.int32)
    kth = tl.full([BLOCK_M], float("-inf"), tl.float32)
    ent = tl.zeros([BLOCK_M], tl.float32)
    dist = tl.zeros([BLOCK_M], tl.float32)
    seg_acc = tl.zeros([BLOCK_M, S_PAD], tl.float32)
    heads = chunk * HEADS + tl.arange(0, HEADS)  # the chunk's heads within the group
    km_heads_ptr = km_ptr + (b64 * H + kv * GROUP + heads) * Nk
    head_ok = heads < GROUP
    if LOAD_LSE:
        lse2 = tl.load(lse2_ptr + out_rows, mask=row_ok, other=float("-inf"))
    else:
        for stage in tl.static_range(2):  # the blocks every row sees, unmasked; then the masked band
            m_i, l_i, arg, run_v, run_i, kth, ent, dist, seg_acc = _sweep(
                m_i, l_i, arg, run_v, run_i, kth, ent, dist, seg_acc,
                q, k_base, skn, d_ok, lo if stage == 0 else mid, mid if stage == 0 else hi, qpos_col, row_ok_col, lo_col, hi_col, Nk,
                window,
                kmask_ptr, smb, smn, b64, qk_scale, cap_in, cap_out, m_i, seg_ptr, ssb, ssn, seg_base, km_heads_ptr,
                head_ok, BLOCK_M, BLOCK_N, HEADS, CAUSAL, HAS_WINDOW, HAS_KMASK, HAS_BOUNDS, SOFTCAP, PREC, UPCAST,
                stage == 1, True, NEED_EXP, W_ARGMAX, TOPK, K_PAD, False, False, False, S_PAD, False)
        lse2 = tl.where(m_i == float("-inf"), float("-inf"), m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)))
        if HAS_SINKS:
            top = tl.maximum(lse2, sink2)
            lse2 = top + tl.log2(tl.exp2(lse2 - top) + tl.exp2(sink2 - top))
        if W_LSE:
            tl.store(lse_ptr + out_rows, lse2 * 0.6931471805599453, mask=row_ok)
        if W_LSE2:
            tl.store(lse2_ptr + out_rows, lse2, mask=row_ok)

    if LINEAR or MAX_IN_PASS2:
        for stage in tl.static_range(2):
            lse_row = tl.where(row_ok, lse2, 1.0e30) if stage == 0 else lse2
            m_i, l_i, arg, run_v, run_i, kth, ent, dist, seg_acc = _sweep(
                m_i, l_i, arg, run_v, run_i, kth, ent, dist, seg_acc,
                q, k_base, skn, d_ok, lo if stage == 0 else mid, mid if stage == 0 else hi, qpos_col, row_ok_col, lo_col, hi_col, Nk,
                window,
                kmask_ptr, smb, smn, b64, qk_scale, cap_in, cap_out, lse_row, seg_ptr, ssb, ssn, seg_base,
                km_heads_ptr, head_ok, BLOCK_M, BLOCK_N, HEADS, CAUSAL, HAS_WINDOW, HAS_KMASK, HAS_BOUNDS, SOFTCAP, PREC, UPCAST,
                stage == 1, MAX_IN_PASS2, False, W_ARGMAX, TOPK, K_PAD, W_ENT, W_DIST, W_SEG, S_PAD, W_KM)

    lse_safe = tl.where(lse2 == float("-inf"), 0.0, lse2)
    if W_MAXP:
        tl.store(maxp_ptr + out_rows, tl.where(m_i == float("-inf"), 0.0, tl.exp2(m_i - lse_safe)), mask=row_ok)
    if W_ARGMAX:
        tl.store(argmax_ptr + out_rows, arg.to(tl.int64), mask=row_ok)
    if TOPK > 0:
        cols = tl.arange(0, K_PAD)
        top_p = tl.where(run_v == float("-inf"), 0.0, tl.exp2(run_v - lse_safe[:, None]))
        t_off = out_rows.to(tl.int64)[:, None] * TOPK + cols[None, :]
        t_ok = row_ok[:, None] & (cols[None, :] < TOPK)
        tl.store(topi_ptr + t_off, run_i.to(tl.int64), mask=t_ok)
        tl.store(topp_ptr + t_off, top_p, mask=t_ok)
    if W_ENT:
        if HAS_SINKS:  # the sink's own term of the row entropy
            ent += tl.exp2(sink2 - lse2) * (lse2 - sink2)
        tl.store(ent_ptr + out_rows, ent * 0.6931471805599453, mask=row_ok)
    if W_DIST:
        tl.store(dist_ptr + out_rows, dist, mask=row_ok)
    if W_SEG:
        seg_cols = tl.arange(0, S_PAD)
        s_off = out_rows.to(tl.int64)[:, None] * n_segments + seg_base + seg_cols[None, :]
        tl.store(segm_ptr + s_off, seg_acc, mask=row_ok[:, None] & ((seg_base + seg_cols) < n_segments)[None, :])


_INTERPRETED = not isinstance(_stats_kernel, triton.runtime.JITFunction)  # decorated under TRITON_INTERPRET=1


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# (BLOCK_M, BLOCK_N, num_warps, num_stages) that autotuning tries on a GPU, by operand width and head dim; the first
# of each list was chosen from ptxas register / spill reports for sm_90a (every statistic on, top-16 or 64 segments)
_CANDIDATES = {
    ("half", 128): [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3)],
    ("half", 256): [(64, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2)],
    ("fp32", 64): [(128, 64, 8, 2), (64, 64, 4, 2)],  # tf32x3 operand splits: twice the shared memory per tile
    ("fp32", 128): [(64, 32, 4, 2), (32, 32, 4, 2)],
    ("fp32", 256): [(64, 32, 4, 1), (32, 32, 4, 1)],
}
# what selects a tuned configuration: the length (rounded up to a power of two), the head dim, the geometry and the
# statistics (each a different compiled kernel); the tensors' dtypes are added by Triton
_TUNING_KEY = ["len_bucket", "D", "HEADS", "CAUSAL", "HAS_WINDOW", "HAS_KMASK", "HAS_BOUNDS", "SOFTCAP", "LOAD_LSE", "LINEAR", "MAX_IN_PASS2",
               "TOPK", "W_SEG", "W_KM", "S_PAD"]
_tuners: dict[tuple, object] = {}


def _configs(d_pad: int, elem: int, n_q: int, k_pad: int, heads: int) -> tuple[tuple[int, int, int, int], ...]:
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates for these operands, BLOCK_M rows holding `heads` query
    heads each: a long top-k list (it lives in registers) caps BLOCK_M at 64, and a few queries (decoding) take one
    small block of rows."""
    if elem <= 2:
        candidates = _CANDIDATES[("half", 128 if d_pad <= 128 else 256)]
    else:
        candidates = _CANDIDATES[("fp32", 64 if d_pad <= 64 else 128 if d_pad <= 128 else 256)]
    out = []
    for bm, bn, warps, stages in candidates:
        if k_pad >= 32:
            bm = min(bm, 64)
        bm = max(min(bm, max(16, _pow2(n_q) * heads)), heads)
        config = (bm, bn, 4 if bm < 64 else warps, stages)
        if config not in out:
            out.append(config)
    return tuple(out)


def _tuned(configs: tuple[tuple[int, int, int, int], ...]):
    """`_stats_kernel` autotuned over `configs` (one autotuner per candidate list). The key mass is zeroed before
    each timing run (it is accumulated atomically)."""
    if configs not in _tuners:
        _tuners[configs] = triton.autotune(
            [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in configs],
            key=_TUNING_KEY, reset_to_zero=["km_ptr"])(_stats_kernel)
    return _tuners[configs]


def stats_triton(q: torch.Tensor, k: torch.Tensor, geo: AttentionGeometry, *, segments: torch.Tensor | None,
                 n_segments: int, topk: int, want: frozenset[str],
                 lse: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Streamed attention statistics of q (B, H, Nq, d) against k (B, H_kv, Nk, d) with a resolved geometry; the
    arguments and results of `torch_stats.stats_torch` (checked by `interp.kernels.attention_stats`). lse: (B, H,
    Nq) fp32 natural-log row lse (the sinks included), when known: one pass over the keys instead of two."""
    b, n_h, n_q, d = q.shape
    n_kv, n_k = k.shape[1], k.shape[2]
    device = q.device
    group = n_h // n_kv
    heads = min(_pow2(group), MAX_HEADS)  # query heads of one KV head stacked in one program
    head_chunks = -(-group // heads)
    topk = int(topk) if "topk" in want else 0
    f32 = dict(device=device, dtype=torch.float32)

    out: dict[str, torch.Tensor] = {}
    if "key_count" in want:
        out["key_count"] = geo.key_counts(b, n_k)

    w_lse = "lse" in want and lse is None
    w_arg = "argmax" in want
    w_maxp = "max_prob" in want
    w_ent = "entropy" in want
    w_dist = "mean_distance" in want
    w_seg = "segment_mass" in want and n_segments > 0
    w_km = "key_mass" in want
    if "topk" in want:
        out["topk_index"] = torch.full((b, n_h, n_q, topk), -1, device=device, dtype=torch.int64)
        out["topk_prob"] = torch.zeros((b, n_h, n_q, topk), **f32)
    if "lse" in want:
        out["lse"] = torch.full((b, n_h, n_q), float("-inf"), **f32) if lse is None else lse.clone()
    if w_arg:
        out["argmax"] = torch.full((b, n_h, n_q), -1, device=device, dtype=torch.int64)
    if w_maxp:
        out["max_prob"] = torch.zeros((b, n_h, n_q), **f32)
    if w_ent:
        out["entropy"] = torch.zeros((b, n_h, n_q), **f32)
    if w_dist:
        out["mean_distance"] = torch.zeros((b, n_h, n_q), **f32)
    if "segment_mass" in want:
        out["segment_mass"] = torch.zeros((b, n_h, n_q, n_segments), **f32)
    if w_km:
        out["key_mass"] = torch.zeros((b, n_h, n_k), **f32)  # atomically accumulated
    w_max = w_arg or w_maxp or topk > 0
    linear = w_ent or w_dist or w_seg or w_km
    if not (w_lse or w_max or linear) or n_q == 0 or b * n_h == 0:
        return out

    interpret = device.type != "cuda"
    if interpret and not _INTERPRETED:
        raise RuntimeError(f"{device.type} tensors need the Triton interpreter: set TRITON_INTERPRET=1 before "
                           "interp.kernels.triton_stats (or triton) is first imported")
    prec = "tf32x3" if q.dtype == torch.float32 else "tf32"  # fp32: ~fp32-exact on tensor cores; else ignored
    block_d = max(16, _pow2(d))
    k_pad = max(2, _pow2(topk)) if topk else 2
    s_pad = max(16, _pow2(min(n_segments, SEGMENT_CHUNK))) if w_seg else 16  # segments per launch
    n_chunks = -(-n_segments // s_pad) if w_seg else 0

    qpos = geo.query_positions.contiguous()
    if geo.key_mask is not None:
        kmask = geo.key_mask.view(torch.uint8)
        smb, smn = kmask.stride()
    else:
        kmask, smb, smn = qpos, 0, 0
    if w_seg:
        seg = segments.to(device=device)
        ssb, ssn = seg.stride()
    else:
        seg, ssb, ssn = qpos, 0, 0
    by_rule = geo.bounds is None  # else each row's run of keys: bounds (2, B or 1, Nq) int32
    if by_rule:
        bounds, sbs, sbb = qpos, 0, 0
    else:
        bounds = torch.stack(geo.span(n_k)).to(torch.int32).contiguous()
        sbs, sbb = bounds.stride(0), bounds.stride(1) if bounds.shape[1] > 1 else 0
    given = lse is not None
    store_lse2 = not given and n_chunks > 1  # pass 1 keeps its base-2 lse for the further segment chunks
    lse2_buf = (lse.float() * _LOG2E).contiguous() if given else torch.empty((b, n_h, n_q), **f32) if store_lse2 else None
    dummy = torch.empty(1, **f32)

    def buf(name):
        return out.get(name, dummy) if name != "lse" or w_lse else dummy

    softcap, window = geo.softcap, geo.window
    cap = softcap if softcap is not None else 0.0
    scalars = dict(
        window=window if window is not None else 0,
        qk_scale=geo.scale * _LOG2E,
        cap_in=geo.scale / cap if softcap is not None else 0.0,
        cap_out=cap * _LOG2E,
        n_segments=int(n_segments),
        len_bucket=_pow2(n_k),  # the autotuning key: one tuning per power-of-two length
    )
    flags = dict(
        BLOCK_D=block_d, HEADS=heads,
        CAUSAL=geo.causal and by_rule, HAS_WINDOW=window is not None and by_rule,
        HAS_KMASK=geo.key_mask is not None, HAS_BOUNDS=not by_rule,
        SOFTCAP=softcap is not None, HAS_SINKS=geo.sinks is not None, PREC=prec, UPCAST=interpret,
        K_PAD=k_pad, S_PAD=s_pad,
    )
    if interpret:  # small blocks, so that small test shapes span several; no timing runs
        kernel = _stats_kernel
        flags.update(BLOCK_M=INTERPRET_BLOCK, BLOCK_N=INTERPRET_BLOCK, num_warps=4, num_stages=1)
    else:
        configs = _configs(block_d, q.element_size(), n_q, k_pad, heads)
        kernel = _tuned(configs if n_q * n_k >= TUNE_FROM else configs[:1])  # one candidate: no timing runs

    def grid(meta):
        return triton.cdiv(n_q, meta["BLOCK_M"] // heads), b * n_kv * head_chunks

    common = (q, k, qpos, kmask, seg, dummy if geo.sinks is None else geo.sinks.contiguous(), bounds)
    shapes = (n_h, group, head_chunks, n_q, n_k, d, *q.stride(), *k.stride(), smb, smn, ssb, ssn, sbs, sbb)
    kernel[grid](
        *common,
        buf("lse"), dummy if lse2_buf is None else lse2_buf, buf("argmax"), buf("max_prob"), buf("topk_index"),
        buf("topk_prob"), buf("entropy"), buf("mean_distance"), buf("segment_mass"), buf("key_mass"),
        *shapes, seg_base=0, **scalars,
        LOAD_LSE=given, NEED_EXP=w_lse or w_maxp or topk > 0 or linear, MAX_IN_PASS2=given and w_max, LINEAR=linear,
        W_LSE=w_lse, W_LSE2=store_lse2, W_ARGMAX=w_arg, W_MAXP=w_maxp, TOPK=topk,
        W_ENT=w_ent, W_DIST=w_dist, W_SEG=w_seg, W_KM=w_km, **flags,
    )
    for chunk in range(1, n_chunks):  # further segment chunks: one pass each, from the base-2 lse
        kernel[grid](
            *common,
            dummy, lse2_buf, dummy, dummy, dummy, dummy, dummy, dummy, buf("segment_mass"), dummy,
            *shapes, seg_base=chunk * s_pad, **scalars,
            LOAD_LSE=True, NEED_EXP=True, MAX_IN_PASS2=False, LINEAR=True,
            W_LSE=False, W_LSE2=False, W_ARGMAX=False, W_MAXP=False, TOPK=0,
            W_ENT=False, W_DIST=False, W_SEG=True, W_KM=False, **flags,
        )
    return out
