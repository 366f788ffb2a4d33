"""The geometry of an attention call: how its scores are formed and which keys each query sees.

One description, shared by a captured call (`interp.hooks.AttentionCall.geometry`), the dense oracle and every
kernel backend: scores s = scale · q·k in fp32, soft-capped as cap · tanh(s / cap); p = softmax of s over the keys
the query sees (and the sink logit, where there is one); a query that sees no key has lse −inf. Query i (at key
position pos_i) sees key j iff key_mask[b, j] and lo_i ≤ j ≤ hi_i, one run of keys per query:

- base: causal: j ≤ pos_i; window W: pos_i − j < W (and, for a non-causal call, j − pos_i < W: a symmetric
  window, as ModernBERT's local layers and bidirectional sliding windows);
- blocks (bidirectional blocks: Gemma 3's images, a prefix-LM's prefix): a query inside a block also sees every key
  of its block, whatever the base rule says;
- documents (block-diagonal attention: several images in one vision forward, packed sequences, Llama 4's chunks):
  a query sees no key outside its own document.

Blocks and documents are given as an id per key position (B or 1, Nk), each id one contiguous run; blocks take id
−1 where a position is in none. `resolve` turns them into each query's bounds [lo_i, hi_i].
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

_FAR = 1 << 62  # an unbounded end of a query's key run


@dataclass(frozen=True, eq=False)
class AttentionGeometry:
    """How an attention call forms its scores and which keys each query sees (see the module's docstring).

    scale: logits are scale · q·k (default d^-0.5). softcap: they become softcap · tanh(logit / softcap).
    causal: key j visible from query i only if j ≤ query_positions[i].
    query_positions: (Nq,) index among the keys of each query (default: the last Nq keys; decoding: Nk − 1).
    key_mask: (Nk,) or (B, Nk) bool, False for keys never attended (padding).
    window: sliding window W: pos_i − j < W (non-causal calls: |pos_i − j| < W).
    blocks: (Nk,) or (B, Nk) long, bidirectional blocks: positions sharing an id ≥ 0 see each other (−1: none).
    documents: (Nk,) or (B, Nk) long: no query sees a key of another document (`chunks` builds Llama 4's).
    sinks: (H,) learned per-head sink logits (GPT-OSS), one more term of each row's softmax denominator; they do
    not change which keys are visible.
    bounds: filled by `resolve` where blocks, documents or a symmetric window are given: (2, B or 1, Nq) long, the
    first and last key each query may see before the key mask.

    The kernels work on a geometry `resolve`d against their q and k (checked, defaults filled); the methods below
    that read positions, bounds or the key mask expect one.
    """

    scale: float | None = None
    causal: bool = True
    query_positions: Int[Tensor, "queries"] | None = None
    key_mask: Bool[Tensor, "*batch keys"] | None = None
    window: int | None = None
    softcap: float | None = None
    sinks: Float[Tensor, "heads"] | None = None
    blocks: Int[Tensor, "*batch keys"] | None = None
    documents: Int[Tensor, "*batch keys"] | None = None
    bounds: Int[Tensor, "2 batch_or_1 queries"] | None = None

    @staticmethod
    def chunks(n_k: int, size: int) -> Int[Tensor, "keys"]:
        """Document ids (Nk,) of chunked attention (Llama 4): position j in chunk j // size."""
        return torch.arange(n_k) // size

    def resolve(self, q: Float[Tensor, "batch heads queries dim"],
                k: Float[Tensor, "batch kv_heads keys dim"]) -> AttentionGeometry:
        """This geometry checked against q and k, with its defaults filled, on q's device: scale a float,
        query_positions (Nq,) long, key_mask (B, Nk) bool or None (an all-True mask too), sinks (H,) float32,
        bounds where blocks, documents or a non-causal window need them."""
        b, h, n_q, d = q.shape
        n_k = k.shape[2]
        if self.query_positions is None:
            positions = torch.arange(n_k - n_q, n_k, device=q.device)
        else:
            positions = torch.as_tensor(self.query_positions, device=q.device).long()
        if positions.shape != (n_q,):
            raise ValueError(f"query_positions must be ({n_q},), got {tuple(positions.shape)}")
        if int(positions.min()) < 0:
            raise ValueError("query_positions must be ≥ 0")
        key_mask = self.key_mask
        if key_mask is not None:
            key_mask = torch.as_tensor(key_mask, device=q.device).bool()
            if key_mask.ndim == 1:
                key_mask = key_mask.expand(b, -1)
            if key_mask.shape != (b, n_k):
                raise ValueError(f"key_mask must be ({n_k},) or ({b}, {n_k}), got {tuple(key_mask.shape)}")
            if bool(key_mask.all()):
                key_mask = None
        window = self.window
        if window is not None and (isinstance(window, bool) or int(window) != window or window < 1):
            raise ValueError(f"window must be an integer ≥ 1, got {window}")
        if self.softcap is not None and self.softcap <= 0:
            raise ValueError(f"softcap must be > 0, got {self.softcap}")
        sinks = self.sinks
        if sinks is not None:
            sinks = torch.as_tensor(sinks, device=q.device).float()
            if sinks.shape != (h,) or not bool(torch.isfinite(sinks).all()):
                raise ValueError(f"sinks must be ({h},) finite logits, one per query head, got {tuple(sinks.shape)}")
        blocks = _ids("blocks", self.blocks, b, n_k, q.device)
        documents = _ids("documents", self.documents, b, n_k, q.device)
        if documents is not None and int(documents.min()) < 0:
            raise ValueError("document ids must be ≥ 0")
        geo = AttentionGeometry(
            scale=d**-0.5 if self.scale is None else float(self.scale),
            causal=bool(self.causal),
            query_positions=positions,
            key_mask=key_mask,
            window=None if window is None else int(window),
            softcap=None if self.softcap is None else float(self.softcap),
            sinks=sinks,
            blocks=blocks,
            documents=documents,
        )
        if self.bounds is not None:  # already resolved, or read from a model's mask
            bounds = torch.as_tensor(self.bounds, device=q.device).long()
            if bounds.ndim != 3 or bounds.shape[0] != 2 or bounds.shape[1] not in (1, b) or bounds.shape[2] != n_q:
                raise ValueError(f"bounds must be (2, 1 or {b}, {n_q}), got {tuple(bounds.shape)}")
            return replace(geo, bounds=bounds)
        if blocks is None and documents is None and (window is None or self.causal):
            return geo
        if (blocks is not None or documents is not None) and int(positions.max()) >= n_k:
            raise ValueError(f"blocks and documents need every query among the keys: a query position is "
                             f"{int(positions.max())} of {n_k} keys")
        lo, hi = geo._limits()
        lo, hi = lo[None].clone(), hi[None].clone()
        if blocks is not None:
            start, end = _runs(blocks)
            inside = blocks[:, positions] >= 0
            lo = torch.where(inside, torch.minimum(lo, start[:, positions]), lo)
            hi = torch.where(inside, torch.maximum(hi, end[:, positions]), hi)
        if documents is not None:
            start, end = _runs(documents)
            lo = torch.maximum(lo, start[:, positions])
            hi = torch.minimum(hi, end[:, positions])
        return replace(geo, bounds=torch.stack([lo, hi]))

    def rows(self, q0: int, q1: int) -> AttentionGeometry:
        """The geometry of query rows [q0, q1) alone."""
        return replace(self, query_positions=self.query_positions[q0:q1],
                       bounds=None if self.bounds is None else self.bounds[..., q0:q1])

    def keys(self, k0: int, k1: int) -> AttentionGeometry:
        """The geometry of keys [k0, k1) alone, renumbered from k0 (query positions and bounds shift with them)."""
        cut = lambda t: None if t is None else t[:, k0:k1]  # noqa: E731
        return replace(self, query_positions=self.query_positions - k0, key_mask=cut(self.key_mask),
                       blocks=cut(self.blocks), documents=cut(self.documents),
                       bounds=None if self.bounds is None else self.bounds - k0)

    def select(self, batch: slice = slice(None), heads: slice = slice(None)) -> AttentionGeometry:
        """The geometry of some batch rows and query heads alone (per-sample masks, ids and bounds; the sinks' heads)."""
        pick = lambda t: t if t is None or t.shape[0] == 1 else t[batch]  # noqa: E731
        return replace(self, key_mask=pick(self.key_mask), blocks=pick(self.blocks), documents=pick(self.documents),
                       bounds=None if self.bounds is None else pick(self.bounds.transpose(0, 1)).transpose(0, 1),
                       sinks=None if self.sinks is None else self.sinks[heads])

    def logits(self, dots: Float[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
        """Scores from fp32 dot products q·k: scaled, then soft-capped."""
        s = dots * self.scale
        return self.softcap * torch.tanh(s / self.softcap) if self.softcap is not None else s

    def _limits(self) -> tuple[Int[Tensor, "batch_or_1 queries"], Int[Tensor, "batch_or_1 queries"]]:
        """First and last key each query may see before the key mask, unclamped: the bounds, or the causal /
        window rule (then (Nq,))."""
        if self.bounds is not None:
            return self.bounds[0], self.bounds[1]
        pos = self.query_positions
        far = torch.full_like(pos, _FAR)
        lo = pos - self.window + 1 if self.window is not None else -far
        hi = pos if self.causal else pos + self.window - 1 if self.window is not None else far
        return lo, hi

    def visible(self, k0: int, k1: int) -> Bool[Tensor, "batch_or_1 queries keys"]:
        """Visibility of keys [k0, k1) from every query: (B or 1, Nq, k1 − k0)."""
        lo, hi = (t.reshape(-1, t.shape[-1]) for t in self._limits())
        j = torch.arange(k0, k1, device=lo.device)
        vis = (j >= lo[..., None]) & (j <= hi[..., None])
        return vis & self.key_mask[:, None, k0:k1] if self.key_mask is not None else vis

    def sees_all(self, k0: int, k1: int) -> bool:
        """Whether every query sees every key of [k0, k1)."""
        lo, hi = self._limits()
        return self.key_mask is None and int(lo.max()) <= k0 and int(hi.min()) >= k1 - 1

    def span(self, n_k: int) -> tuple[Int[Tensor, "batch_or_1 queries"], Int[Tensor, "batch_or_1 queries"]]:
        """First and last key each query may see among n_k, before the key mask (last < first: none)."""
        lo, hi = (t.reshape(-1, t.shape[-1]) for t in self._limits())
        return lo.clamp(0, n_k), hi.clamp(-1, n_k - 1)

    def key_range(self, n_k: int) -> tuple[int, int]:
        """[lo, hi): the keys some query may see, before the key mask (hi ≤ lo: none)."""
        lo, hi = self.span(n_k)
        some = hi >= lo
        if not bool(some.any()):
            return 0, 0
        return int(lo[some].min()), int(hi[some].max()) + 1

    def unmasked(self, n_k: int) -> tuple[int, int]:
        """[lo, hi): keys that every query sees before the key mask (hi ≤ lo: none)."""
        lo, hi = self.span(n_k)
        return int(lo.max()), int(hi.min()) + 1

    def plain(self, n_k: int) -> str | None:
        """The geometries that need no mask: "all" (every query sees every key), "causal" (the square lower
        triangle: query i at position i of as many keys); else None."""
        if self.key_mask is not None or self.window is not None or self.bounds is not None:
            return None
        if not self.causal:
            return "all"
        pos = self.query_positions
        if pos.shape[0] == n_k and bool((pos == torch.arange(n_k, device=pos.device)).all()):
            return "causal"
        return None

    def reaches_ahead(self) -> bool:
        """Whether some query may see a key after its own position."""
        return not self.causal or (self.bounds is not None and bool((self.bounds[1] > self.query_positions).any()))

    def past(self) -> AttentionGeometry:
        """This geometry limited to the keys at or before each query's position."""
        if self.bounds is None:
            return replace(self, causal=True)
        return replace(self, causal=True,
                       bounds=torch.stack([self.bounds[0], torch.minimum(self.bounds[1], self.query_positions)]))

    def row_counts(self, b: int, n_k: int) -> Float[Tensor, "batch queries"]:
        """Number of keys each query sees, from prefix sums (no scores)."""
        lo, hi = self.span(n_k)
        keys = (self.key_mask if self.key_mask is not None
                else torch.ones(1, n_k, device=lo.device)).float()
        rows = max(lo.shape[0], keys.shape[0])
        cum = torch.nn.functional.pad(keys.cumsum(-1), (1, 0)).expand(rows, -1)
        count = cum.gather(1, (hi + 1).expand(rows, -1)) - cum.gather(1, lo.expand(rows, -1))
        return torch.where(hi >= lo, count, 0.0).expand(b, -1)

    def key_counts(self, b: int, n_k: int) -> Float[Tensor, "batch keys"]:
        """Number of queries that see each key, from a difference array over the queries' runs (no scores)."""
        lo, hi = self.span(n_k)
        ok = (hi >= lo).float()
        edges = torch.zeros(lo.shape[0], n_k + 1, device=lo.device)
        edges.scatter_add_(1, lo, ok).scatter_add_(1, hi + 1, -ok)
        count = edges.cumsum(1)[:, :-1].expand(b, -1)
        return count * self.key_mask.float() if self.key_mask is not None else count.clone()


def _ids(name: str, ids, b: int, n_k: int, device) -> Int[Tensor, "batch_or_1 keys"] | None:
    """Per-position ids checked: (B or 1, Nk) long on `device`."""
    if ids is None:
        return None
    ids = torch.as_tensor(ids, device=device).long()
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.shape[1] != n_k or ids.shape[0] not in (1, b):
        raise ValueError(f"{name} must be ({n_k},) or ({b}, {n_k}) ids, got {tuple(ids.shape)}")
    return ids


def _runs(ids: Int[Tensor, "rows keys"]) -> tuple[Int[Tensor, "rows keys"], Int[Tensor, "rows keys"]]:
    """First and last position (rows, Nk) of the run of equal ids each position is in; each id ≥ 0 must be one
    contiguous run."""
    n = ids.shape[1]
    j = torch.arange(n, device=ids.device).expand_as(ids)
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    for row, at in zip(ids, starts):
        run_ids = row[at]
        run_ids = run_ids[run_ids >= 0]
        if run_ids.unique().numel() != run_ids.numel():
            raise ValueError(f"block and document ids must each be one contiguous run of positions; got {row.tolist()}")
    start = torch.where(starts, j, 0).cummax(1).values
    end = torch.where(ends, j, n).flip(1).cummin(1).values.flip(1)
    return start, end
