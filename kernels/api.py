"""The one public API of the kernels: validation, defaults and dispatch.

Backends: "triton" (CUDA kernels), "fused" (SDPA's fused attention ops with crafted value columns, any device:
`fused_stats`), "torch" (the chunked twin, any device: the reference). "auto" takes Triton on CUDA, and elsewhere
the fused path, except for soft-capped scores, which only the twin and Triton compute. `$INTERP_KERNELS`
(one of BACKENDS) overrides what "auto" means, e.g. `INTERP_KERNELS=torch` runs every analysis on the twin.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from . import fused_stats, torch_stats

MAX_TOPK = 64
STATS = ("lse", "segment_mass", "argmax", "max_prob", "topk", "entropy", "mean_distance", "key_mass", "key_count")
DEFAULT_STATS = ("lse", "argmax", "max_prob", "entropy")
BACKENDS = ("auto", "triton", "fused", "torch")
BACKEND_ENV = "INTERP_KERNELS"  # what "auto" means when set: every analysis's kernels then take that backend


@dataclass
class AttentionStats:
    """Per-head attention statistics; only those asked for are filled.

    lse (B, H, Nq) natural log · segment_mass (B, H, Nq, S) · argmax, max_prob (B, H, Nq) · topk_index,
    topk_prob (B, H, Nq, K) · entropy (B, H, Nq) nats · mean_distance (B, H, Nq) expected |query position − key
    position| · key_mass (B, H, Nk) attention received, summed over queries · key_count (B, Nk) queries that
    can see each key (so Gu et al.'s per-key mean is key_mass / key_count).
    """

    lse: Tensor | None = None
    segment_mass: Tensor | None = None
    argmax: Tensor | None = None
    max_prob: Tensor | None = None
    topk_index: Tensor | None = None
    topk_prob: Tensor | None = None
    entropy: Tensor | None = None
    mean_distance: Tensor | None = None
    key_mass: Tensor | None = None
    key_count: Tensor | None = None

    @property
    def key_mean(self) -> Tensor:
        """(B, H, Nk) attention received per key averaged over the queries that can see it (Gu et al.'s α_k);
        0 for a key no query sees. Needs key_mass and key_count."""
        if self.key_mass is None or self.key_count is None:
            raise ValueError("key_mean needs stats 'key_mass' and 'key_count'")
        count = self.key_count[:, None, :]
        return torch.where(count > 0, self.key_mass / count.clamp_min(1), 0.0)

    def to_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class _Problem:
    q: Tensor
    k: Tensor
    scale: float
    causal: bool
    query_positions: Tensor
    key_mask: Tensor | None
    window: int | None
    softcap: float | None
    sinks: Tensor | None = None

    def mask_kwargs(self) -> dict:
        """Which scores are visible, and how they are formed. Sinks are not part of it: they only change the row
        log-sum-exp, which the statistics kernels fold them into and every other function reads."""
        return dict(scale=self.scale, causal=self.causal, query_positions=self.query_positions,
                    key_mask=self.key_mask, window=self.window, softcap=self.softcap)


def _problem(q, k, scale, causal, query_positions, key_mask, window, softcap, sinks=None) -> _Problem:
    """Check shapes, dtypes, devices and values before anything runs; fill defaults."""
    if not isinstance(q, Tensor) or not isinstance(k, Tensor) or q.ndim != 4 or k.ndim != 4:
        raise ValueError("q must be (B, H, Nq, d) and k (B, H_kv, Nk, d) tensors")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head dim")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads is not a multiple of {k.shape[1]} KV heads")
    if q.dtype != k.dtype or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q and k must share one of float32 / float16 / bfloat16, got {q.dtype} and {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"q is on {q.device} but k on {k.device}")
    if not (bool(torch.isfinite(q).all()) and bool(torch.isfinite(k).all())):
        raise ValueError("q or k contains NaN or inf")
    n_q, n_k = q.shape[2], k.shape[2]
    if n_q == 0 or n_k == 0:
        raise ValueError(f"need at least one query and one key, got Nq={n_q}, Nk={n_k}")
    if query_positions is None:
        query_positions = torch.arange(n_k - n_q, n_k, device=q.device)
    query_positions = torch.as_tensor(query_positions, device=q.device).long()
    if query_positions.shape != (n_q,):
        raise ValueError(f"query_positions must be ({n_q},), got {tuple(query_positions.shape)}")
    if int(query_positions.min()) < 0:
        raise ValueError("query_positions must be ≥ 0")
    if key_mask is not None:
        key_mask = torch.as_tensor(key_mask, device=q.device).bool()
        if key_mask.ndim == 1:
            key_mask = key_mask.expand(q.shape[0], -1)
        if key_mask.shape != (q.shape[0], n_k):
            raise ValueError(f"key_mask must be ({n_k},) or ({q.shape[0]}, {n_k}), got {tuple(key_mask.shape)}")
    if window is not None and (isinstance(window, bool) or int(window) != window or window < 1):
        raise ValueError(f"window must be an integer ≥ 1, got {window}")
    window = None if window is None else int(window)
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0, got {softcap}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if sinks is not None:
        sinks = torch.as_tensor(sinks, device=q.device).float()
        if sinks.shape != (q.shape[1],) or not bool(torch.isfinite(sinks).all()):
            raise ValueError(f"sinks must be ({q.shape[1]},) finite logits, one per query head, got "
                             f"{tuple(sinks.shape)}")
    return _Problem(q, k, scale, bool(causal), query_positions, key_mask, window, softcap, sinks)


def _segments(segments, n_segments, b: int, n_k: int, device) -> tuple[Tensor, int]:
    seg = torch.as_tensor(segments, device=device)
    if seg.dtype in (torch.bool,) or seg.is_floating_point():
        raise ValueError(f"segments must be integer ids, got {seg.dtype}")
    seg = seg.long()
    if seg.ndim == 1:
        seg = seg.expand(b, -1)
    if seg.shape != (b, n_k):
        raise ValueError(f"segments must be ({n_k},) or ({b}, {n_k}), got {tuple(seg.shape)}")
    top = int(seg.max()) + 1 if seg.numel() else 0
    n = top if n_segments is None else int(n_segments)
    if seg.numel() and (int(seg.min()) < 0 or top > n):
        raise ValueError(f"segment ids must lie in [0, {n}), got [{int(seg.min())}, {top - 1}]")
    return seg.contiguous(), max(n, 1)


def resolve_backend(backend: str, q: Tensor, softcap: float | None = None) -> str:
    """The backend that runs: the one asked for, or auto's choice; "fused" with a soft-cap falls back to the twin."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"${BACKEND_ENV}={backend!r}: choose from {', '.join(BACKENDS)}")
    if backend == "triton" and not (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError("the triton backend needs a CUDA device (or TRITON_INTERPRET=1 for testing on CPU)")
    if backend == "auto":
        backend = "triton" if q.is_cuda else "fused"
    if backend == "fused" and not fused_stats.applies(softcap):
        return "torch"
    return backend


def attention_stats(
    q: Tensor,
    k: Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    segments: Tensor | None = None,
    n_segments: int | None = None,
    query_positions: Tensor | None = None,
    key_mask: Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
    topk: int = 0,
    stats: Iterable[str] = DEFAULT_STATS,
    backend: str = "auto",
) -> AttentionStats:
    """Statistics of each query's attention row, recomputed from q and k without building the N×N matrix.

    q: (B, H, Nq, d); k: (B, H_kv, Nk, d) (GQA: query head h reads KV head h // (H / H_kv)).
    scale: default d^-0.5. causal: key j visible from query i iff j ≤ query_positions[i].
    query_positions: (Nq,) index among the keys of each query (default: the last Nq keys; decoding: Nk − 1).
    key_mask: (Nk,) or (B, Nk) bool, False for keys never attended (padding).
    window: sliding window (visible iff pos − j < window). softcap: logits become cap · tanh(s / cap).
    sinks: (H,) learned per-head sink logits in the softmax denominator (GPT-OSS): each row's probabilities
    over the keys sum to 1 − p_sink; lse includes the sink; max_prob, top-k, segment / key mass and mean distance
    are over the keys; entropy is that of the whole row, the sink's share included.
    segments: (Nk,) or (B, Nk) segment id of each key, in [0, n_segments) (default: max id + 1).
    stats: any of STATS ("topk" needs topk > 0, "segment_mass" needs segments).
    backend: "triton" (CUDA), "fused" (SDPA's fused ops, any device; soft-capped scores go to the twin), "torch"
    (the chunked twin, any device), "auto" (Triton on CUDA, else fused).
    """
    want = frozenset(stats)
    unknown = want - set(STATS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; choose from {', '.join(STATS)}")
    if "topk" in want and topk < 1:
        raise ValueError("stats include 'topk' but topk < 1")
    if topk > MAX_TOPK:
        raise ValueError(f"topk must be ≤ {MAX_TOPK}, got {topk}")
    if topk > 0:
        want = want | {"topk"}
    return _stats(_problem(q, k, scale, causal, query_positions, key_mask, window, softcap, sinks), want, backend,
                  segments, n_segments, topk)


def _stats(pr: _Problem, want: frozenset[str], backend: str, segments=None, n_segments=None, topk: int = 0):
    """Dispatch a validated problem to a backend."""
    q, k = pr.q, pr.k
    seg, n_seg = None, 1
    if "segment_mass" in want:
        if segments is None:
            raise ValueError("'segment_mass' needs segments")
        seg, n_seg = _segments(segments, n_segments, q.shape[0], k.shape[2], q.device)
    which = resolve_backend(backend, q, pr.softcap)
    run = fused_stats.stats_fused if which == "fused" else torch_stats.stats_torch
    if which == "triton":
        from .triton_stats import stats_triton as run
    out = run(q, k, segments=seg, n_segments=n_seg, topk=topk, want=want, sinks=pr.sinks, **pr.mask_kwargs())
    return AttentionStats(**out)


def _lse(pr: _Problem, backend: str, lse: Tensor | None = None) -> Tensor:
    """The row log-sum-exp (B, H, Nq): computed, or the caller's after a shape check."""
    if lse is None:
        return _stats(pr, frozenset({"lse"}), backend).lse
    if lse.shape != pr.q.shape[:3]:
        raise ValueError(f"lse must be {tuple(pr.q.shape[:3])}, got {tuple(lse.shape)}")
    return lse.to(pr.q.device, torch.float32)


def pooled_attention(
    q: Tensor,
    k: Tensor,
    *,
    block_q: int,
    block_k: int,
    reduce: str = "mean",
    q_range: tuple[int, int] | None = None,
    k_range: tuple[int, int] | None = None,
    scale: float | None = None,
    causal: bool = True,
    query_positions: Tensor | None = None,
    key_mask: Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
    lse: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """A block-pooled attention map (B, H, ⌈nq/block_q⌉, ⌈nk/block_k⌉) for viewing long contexts.

    Each cell is the mean (or max) of the exact probabilities in its block of queries × keys (invisible
    cells count as 0). q_range / k_range: pool only queries [q0, q1) × keys [k0, k1) (default: all; nq, nk
    their lengths), still normalised over every key — a zoomed view. lse: (B, H, Nq) if already known.
    Built block by block: nothing N×N.
    """
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    if block_q < 1 or block_k < 1:
        raise ValueError("block_q and block_k must be ≥ 1")
    pr = _problem(q, k, scale, causal, query_positions, key_mask, window, softcap, sinks)
    (q0, q1), (k0, k1) = q_range or (0, q.shape[2]), k_range or (0, k.shape[2])
    _check_region(q0, q1, k0, k1, q.shape[2], k.shape[2])
    fits = torch_stats.one_pass_fits(q.shape[0], q.shape[1], k.shape[2], block_q, block_k)
    if lse is None and (k0, k1) == (0, k.shape[2]) and fits and sinks is None:  # all keys in view: row sums come in the same pass
        mask = dict(pr.mask_kwargs(), query_positions=pr.query_positions[q0:q1])
        return torch_stats.pooled_one_pass(pr.q[:, :, q0:q1], pr.k, block_q=block_q, block_k=block_k, reduce=reduce,
                                           **mask)
    lse = _row_lse(pr, backend, lse, q0, q1)[:, :, q0:q1]
    mask = pr.mask_kwargs()  # keys renumbered from k0: positions shift with them
    mask.update(query_positions=pr.query_positions[q0:q1] - k0,
                key_mask=None if pr.key_mask is None else pr.key_mask[:, k0:k1])
    return torch_stats.pooled_torch(pr.q[:, :, q0:q1], pr.k[:, :, k0:k1], lse, block_q=block_q, block_k=block_k,
                                    reduce=reduce, **mask)


def _check_region(q0: int, q1: int, k0: int, k1: int, n_q: int, n_k: int) -> None:
    if not (0 <= q0 < q1 <= n_q and 0 <= k0 < k1 <= n_k):
        raise ValueError(f"region [{q0}, {q1}) × [{k0}, {k1}) is outside {n_q} queries × {n_k} keys")


def _row_lse(pr: _Problem, backend: str, lse: Tensor | None, q0: int, q1: int) -> Tensor:
    """The (B, H, Nq) log-sum-exp, computed (over every key) only for rows [q0, q1) when not given."""
    if lse is not None:
        return _lse(pr, backend, lse)
    sub = _Problem(pr.q[:, :, q0:q1], pr.k, pr.scale, pr.causal, pr.query_positions[q0:q1], pr.key_mask, pr.window,
                   pr.softcap, pr.sinks)
    out = torch.zeros(*pr.q.shape[:3], device=pr.q.device)
    out[:, :, q0:q1] = _lse(sub, backend)
    return out


def attention_tile(
    q: Tensor,
    k: Tensor,
    q_range: tuple[int, int],
    k_range: tuple[int, int],
    *,
    lse: Tensor | None = None,
    scale: float | None = None,
    causal: bool = True,
    query_positions: Tensor | None = None,
    key_mask: Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Exact probabilities (B, H, q1 − q0, k1 − k0) of queries [q0, q1) on keys [k0, k1), normalised over all keys
    (and the sinks, where given)."""
    pr = _problem(q, k, scale, causal, query_positions, key_mask, window, softcap, sinks)
    (q0, q1), (k0, k1) = q_range, k_range
    _check_region(q0, q1, k0, k1, q.shape[2], k.shape[2])
    lse = _row_lse(pr, backend, lse, q0, q1)  # only the tile's rows are needed
    return torch_stats.probabilities_block(pr.q, pr.k, lse, q0, q1, k0, k1, **pr.mask_kwargs())


def diagonal_attention(
    q: Tensor,
    k: Tensor,
    offsets,
    *,
    lse: Tensor | None = None,
    scale: float | None = None,
    causal: bool = True,
    query_positions: Tensor | None = None,
    key_mask: Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Exact probability of each query on the key `offset` positions before it (its own position minus offset;
    negative offsets look ahead): (B, H, Nq, len(offsets)), 0 where that key does not exist or is invisible.

    The diagonals of the attention matrix (previous-token: offset 1; induction on a sequence repeated with period
    T: offset T − 1; duplicate-token: T) without computing it: O(Nq · d) per offset after the row lse."""
    offsets = [int(o) for o in offsets]
    if not offsets:
        raise ValueError("give at least one offset")
    pr = _problem(q, k, scale, causal, query_positions, key_mask, window, softcap, sinks)
    lse = _lse(pr, backend, lse)
    return torch_stats.diagonal_torch(pr.q, pr.k, lse, offsets, **pr.mask_kwargs())


def grid_distance(
    q: Tensor,
    k: Tensor,
    *,
    query_coords: Tensor,
    key_coords: Tensor,
    special_keys: Tensor | None = None,
    renormalize: bool = True,
    scale: float | None = None,
    causal: bool = False,
    key_mask: Tensor | None = None,
    lse: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Mean attention distance on a 2-D patch grid (ViTs), per query: (B, H, Nq), in grid cells.

    query_coords (Nq, 2) / key_coords (Nk, 2): (row, col) of each token (any value for special tokens).
    special_keys: (Nk,) bool, True for CLS / registers: their attention is dropped; with `renormalize` the rest
    is re-normalised to sum to 1 (the ViT paper), without it the dropped mass simply counts as 0 (common
    re-implementations). Multiply by the patch size for pixels. Drop special *queries* by indexing the result.
    """
    n_q, n_k = q.shape[2], k.shape[2]
    if query_coords.shape != (n_q, 2) or key_coords.shape != (n_k, 2):
        raise ValueError(f"query_coords must be ({n_q}, 2) and key_coords ({n_k}, 2)")
    pr = _problem(q, k, scale, causal, None, key_mask, None, None)
    keep = torch.ones(n_k, device=q.device)
    if special_keys is not None:
        special_keys = torch.as_tensor(special_keys, device=q.device).bool()
        if special_keys.shape != (n_k,):
            raise ValueError(f"special_keys must be ({n_k},), got {tuple(special_keys.shape)}")
        keep = (~special_keys).float()
    lse = _lse(pr, backend, lse)
    return torch_stats.grid_distance_torch(pr.q, pr.k, lse, query_coords=query_coords.to(q.device),
                                           key_coords=key_coords.to(q.device), keep_keys=keep,
                                           renormalize=renormalize, **pr.mask_kwargs())
