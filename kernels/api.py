"""The one public API of the kernels: validation, defaults and dispatch.

Backends: "triton" (CUDA kernels), "fused" (SDPA's fused attention ops with crafted value columns, any device:
`fused_stats`), "torch" (the chunked twin, any device: the reference). "auto" takes Triton on CUDA, and elsewhere
the fused path, except for soft-capped scores, which only the twin and Triton compute. `$INTERP_KERNELS`
(one of BACKENDS) overrides what "auto" means, e.g. `INTERP_KERNELS=torch` runs every analysis on the twin.

The maps (`pooled_attention`, `attention_tile`, `diagonal_attention`, `grid_distance`) read exact probabilities
block by block in the twin's arithmetic once each row's log-sum-exp is known: their `backend` is the one that
computes that log-sum-exp (the pass over every key), where the caller does not give it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, fields

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from . import fused_stats, torch_stats
from .geometry import AttentionGeometry

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

    lse: Float[Tensor, "batch heads queries"] | None = None
    segment_mass: Float[Tensor, "batch heads queries segments"] | None = None
    argmax: Int[Tensor, "batch heads queries"] | None = None
    max_prob: Float[Tensor, "batch heads queries"] | None = None
    topk_index: Int[Tensor, "batch heads queries topk"] | None = None
    topk_prob: Float[Tensor, "batch heads queries topk"] | None = None
    entropy: Float[Tensor, "batch heads queries"] | None = None
    mean_distance: Float[Tensor, "batch heads queries"] | None = None
    key_mass: Float[Tensor, "batch heads keys"] | None = None
    key_count: Float[Tensor, "batch keys"] | None = None

    @property
    def key_mean(self) -> Float[Tensor, "batch heads keys"]:
        """(B, H, Nk) attention received per key averaged over the queries that can see it (Gu et al.'s α_k);
        0 for a key no query sees. Needs key_mass and key_count."""
        if self.key_mass is None or self.key_count is None:
            raise ValueError("key_mean needs stats 'key_mass' and 'key_count'")
        count = self.key_count[:, None, :]
        return torch.where(count > 0, self.key_mass / count.clamp_min(1), 0.0)

    def to_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def _resolve(q: Tensor, k: Tensor, geometry: AttentionGeometry) -> AttentionGeometry:
    """Check q and k (shapes, dtypes, devices, values) before anything runs; the geometry resolved against them."""
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
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"need at least one query and one key, got Nq={q.shape[2]}, Nk={k.shape[2]}")
    return geometry.resolve(q, k)


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
    q: Float[Tensor, "batch heads queries dim"],
    k: Float[Tensor, "batch kv_heads keys dim"],
    *,
    geometry: AttentionGeometry = AttentionGeometry(),
    segments: Int[Tensor, "*batch keys"] | None = None,
    n_segments: int | None = None,
    topk: int = 0,
    stats: Iterable[str] = DEFAULT_STATS,
    backend: str = "auto",
    lse: Float[Tensor, "batch heads queries"] | None = None,
) -> AttentionStats:
    """Statistics of each query's attention row, recomputed from q and k without building the N×N matrix.

    q: (B, H, Nq, d); k: (B, H_kv, Nk, d) (GQA: query head h reads KV head h // (H / H_kv)).
    geometry: scale, causal mask, query positions, padding, window, soft-cap and sinks (default: causal, the last
    Nq keys' positions, scale d^-0.5). With sinks each row's probabilities over the keys sum to 1 − p_sink; lse
    includes the sink; max_prob, top-k, segment / key mass and mean distance are over the keys; entropy is that
    of the whole row, the sink's share included.
    segments: (Nk,) or (B, Nk) segment id of each key, in [0, n_segments) (default: max id + 1).
    stats: any of STATS ("topk" needs topk > 0, "segment_mass" needs segments).
    backend: "triton" (CUDA), "fused" (SDPA's fused ops, any device; soft-capped scores go to the twin), "torch"
    (the chunked twin, any device), "auto" (Triton on CUDA, else fused).
    lse: (B, H, Nq) each row's natural-log log-sum-exp (sinks included), when already known — the model's own
    attention call returns it (`interp.hooks.AttentionCall.lse`): Triton and the twin then take one pass over the
    keys instead of two (the fused path gets it from its own call at no cost); it is returned as the lse.
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
    if lse is not None:
        lse = _given_lse(q, lse)
    return _stats(q, k, _resolve(q, k, geometry), want, backend, segments, n_segments, topk, lse)


def _given_lse(q: Tensor, lse: Tensor) -> Tensor:
    """A caller's row lse checked against q: (B, H, Nq), finite or −inf (a row that sees no key), as fp32."""
    if not isinstance(lse, Tensor) or lse.shape != q.shape[:3]:
        raise ValueError(f"lse must be a {tuple(q.shape[:3])} tensor, got {getattr(lse, 'shape', type(lse))}")
    lse = lse.to(q.device, torch.float32)
    if bool((torch.isnan(lse) | (lse == float("inf"))).any()):  # one host sync: this runs for every captured layer
        raise ValueError("lse contains NaN or +inf")
    return lse


def _stats(q: Tensor, k: Tensor, geo: AttentionGeometry, want: frozenset[str], backend: str, segments=None,
           n_segments=None, topk: int = 0, lse: Tensor | None = None) -> AttentionStats:
    """Dispatch checked inputs and their resolved geometry to a backend (lse: the rows' known lse, or None)."""
    seg, n_seg = None, 1
    if "segment_mass" in want:
        if segments is None:
            raise ValueError("'segment_mass' needs segments")
        seg, n_seg = _segments(segments, n_segments, q.shape[0], k.shape[2], q.device)
    which = resolve_backend(backend, q, geo.softcap)
    if which == "fused":
        out = fused_stats.stats_fused(q, k, geo, segments=seg, n_segments=n_seg, topk=topk, want=want)
        if lse is not None and "lse" in want:
            out["lse"] = lse
        return AttentionStats(**out)
    run = torch_stats.stats_torch
    if which == "triton":
        from .triton_stats import stats_triton as run
    return AttentionStats(**run(q, k, geo, segments=seg, n_segments=n_seg, topk=topk, want=want, lse=lse))


def _lse(q: Tensor, k: Tensor, geo: AttentionGeometry, backend: str, lse: Tensor | None = None) -> Tensor:
    """The row log-sum-exp (B, H, Nq): computed by `backend`, or the caller's after a shape check."""
    if lse is None:
        return _stats(q, k, geo, frozenset({"lse"}), backend).lse
    return _given_lse(q, lse)


def _row_lse(q: Tensor, k: Tensor, geo: AttentionGeometry, backend: str, lse: Tensor | None, q0: int,
             q1: int) -> Tensor:
    """The (B, H, Nq) log-sum-exp, computed (over every key) only for rows [q0, q1) when not given."""
    if lse is not None:
        return _lse(q, k, geo, backend, lse)
    out = torch.zeros(*q.shape[:3], device=q.device)
    out[:, :, q0:q1] = _lse(q[:, :, q0:q1], k, geo.rows(q0, q1), backend)
    return out


def _check_region(q0: int, q1: int, k0: int, k1: int, n_q: int, n_k: int) -> None:
    if not (0 <= q0 < q1 <= n_q and 0 <= k0 < k1 <= n_k):
        raise ValueError(f"region [{q0}, {q1}) × [{k0}, {k1}) is outside {n_q} queries × {n_k} keys")


def pooled_attention(
    q: Float[Tensor, "batch heads queries dim"],
    k: Float[Tensor, "batch kv_heads keys dim"],
    *,
    block_q: int,
    block_k: int,
    reduce: str = "mean",
    q_range: tuple[int, int] | None = None,
    k_range: tuple[int, int] | None = None,
    geometry: AttentionGeometry = AttentionGeometry(),
    lse: Float[Tensor, "batch heads queries"] | None = None,
    backend: str = "auto",
) -> Float[Tensor, "batch heads row_blocks col_blocks"]:
    """A block-pooled attention map (B, H, ⌈nq/block_q⌉, ⌈nk/block_k⌉) for viewing long contexts.

    Each cell is the mean (or max) of the exact probabilities in its block of queries × keys (invisible
    cells count as 0). q_range / k_range: pool only queries [q0, q1) × keys [k0, k1) (default: all; nq, nk
    their lengths), still normalised over every key — a zoomed view. lse: (B, H, Nq) if already known.
    Built block by block by the twin: nothing N×N. Over every key, without sinks or a given lse, one pass finds
    the row sums as it goes; otherwise `backend` computes the row lse first (see `attention_stats`).
    """
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    if block_q < 1 or block_k < 1:
        raise ValueError("block_q and block_k must be ≥ 1")
    geo = _resolve(q, k, geometry)
    resolve_backend(backend, q, geo.softcap)
    (q0, q1), (k0, k1) = q_range or (0, q.shape[2]), k_range or (0, k.shape[2])
    _check_region(q0, q1, k0, k1, q.shape[2], k.shape[2])
    fits = torch_stats.one_pass_fits(q.shape[0], q.shape[1], k.shape[2], block_q, block_k)
    if lse is None and (k0, k1) == (0, k.shape[2]) and fits and geo.sinks is None:
        return torch_stats.pooled_one_pass(q[:, :, q0:q1], k, geo.rows(q0, q1), block_q=block_q, block_k=block_k,
                                           reduce=reduce)
    lse = _row_lse(q, k, geo, backend, lse, q0, q1)[:, :, q0:q1]
    return torch_stats.pooled_torch(q[:, :, q0:q1], k[:, :, k0:k1], lse, geo.rows(q0, q1).keys(k0, k1),
                                    block_q=block_q, block_k=block_k, reduce=reduce)


def attention_tile(
    q: Float[Tensor, "batch heads queries dim"],
    k: Float[Tensor, "batch kv_heads keys dim"],
    q_range: tuple[int, int],
    k_range: tuple[int, int],
    *,
    geometry: AttentionGeometry = AttentionGeometry(),
    lse: Float[Tensor, "batch heads queries"] | None = None,
    backend: str = "auto",
) -> Float[Tensor, "batch heads tile_queries tile_keys"]:
    """Exact probabilities (B, H, q1 − q0, k1 − k0) of queries [q0, q1) on keys [k0, k1), normalised over all keys
    (and the sinks, where given). lse: (B, H, Nq) if already known, else `backend` computes it for the tile's rows;
    the tile itself is the twin's, O((q1 − q0) · (k1 − k0) · d)."""
    geo = _resolve(q, k, geometry)
    (q0, q1), (k0, k1) = q_range, k_range
    _check_region(q0, q1, k0, k1, q.shape[2], k.shape[2])
    lse = _row_lse(q, k, geo, backend, lse, q0, q1)
    return torch_stats.probabilities_block(q, k, lse, q0, q1, k0, k1, geo)


def diagonal_attention(
    q: Float[Tensor, "batch heads queries dim"],
    k: Float[Tensor, "batch kv_heads keys dim"],
    offsets: Iterable[int],
    *,
    geometry: AttentionGeometry = AttentionGeometry(),
    lse: Float[Tensor, "batch heads queries"] | None = None,
    backend: str = "auto",
) -> Float[Tensor, "batch heads queries offsets"]:
    """Exact probability of each query on the key `offset` positions before it (its own position minus offset;
    negative offsets look ahead): (B, H, Nq, len(offsets)), 0 where that key does not exist or is invisible.

    The diagonals of the attention matrix (previous-token: offset 1; induction on a sequence repeated with period
    T: offset T − 1; duplicate-token: T) without computing it: O(Nq · d) per offset (the twin's) after the row
    lse, which `backend` computes unless given."""
    offsets = [int(o) for o in offsets]
    if not offsets:
        raise ValueError("give at least one offset")
    geo = _resolve(q, k, geometry)
    return torch_stats.diagonal_torch(q, k, _lse(q, k, geo, backend, lse), offsets, geo)


def grid_distance(
    q: Float[Tensor, "batch heads queries dim"],
    k: Float[Tensor, "batch kv_heads keys dim"],
    *,
    query_coords: Float[Tensor, "queries 2"],
    key_coords: Float[Tensor, "keys 2"],
    special_keys: Bool[Tensor, "keys"] | None = None,
    renormalize: bool = True,
    geometry: AttentionGeometry = AttentionGeometry(causal=False),
    lse: Float[Tensor, "batch heads queries"] | None = None,
    backend: str = "auto",
) -> Float[Tensor, "batch heads queries"]:
    """Mean attention distance on a 2-D patch grid (ViTs), per query: (B, H, Nq), in grid cells.

    query_coords (Nq, 2) / key_coords (Nk, 2): (row, col) of each token (any value for special tokens).
    special_keys: (Nk,) bool, True for CLS / registers: their attention is dropped; with `renormalize` the rest
    is re-normalised to sum to 1 (the ViT paper), without it the dropped mass simply counts as 0 (common
    re-implementations). Multiply by the patch size for pixels. Drop special *queries* by indexing the result.
    geometry: default bidirectional (a ViT's). The row lse comes from `backend` unless given; the distances
    from the twin, block by block.
    """
    n_q, n_k = q.shape[2], k.shape[2]
    if query_coords.shape != (n_q, 2) or key_coords.shape != (n_k, 2):
        raise ValueError(f"query_coords must be ({n_q}, 2) and key_coords ({n_k}, 2)")
    geo = _resolve(q, k, geometry)
    keep = torch.ones(n_k, device=q.device)
    if special_keys is not None:
        special_keys = torch.as_tensor(special_keys, device=q.device).bool()
        if special_keys.shape != (n_k,):
            raise ValueError(f"special_keys must be ({n_k},), got {tuple(special_keys.shape)}")
        keep = (~special_keys).float()
    return torch_stats.grid_distance_torch(q, k, _lse(q, k, geo, backend, lse), geo,
                                           query_coords=query_coords.to(q.device),
                                           key_coords=key_coords.to(q.device), keep_keys=keep,
                                           renormalize=renormalize)
