"""The geometry of an attention call: how its scores are formed and which keys each query sees.

One description, shared by a captured call (`interp.hooks.AttentionCall.geometry`), the dense oracle and every
kernel backend: scores s = scale · q·k in fp32, soft-capped as cap · tanh(s / cap); key j is visible from query i
iff (not causal or j ≤ pos_i) and (window is None or pos_i − j < window) and key_mask[b, j]; p = softmax of s over
the visible keys (and the sink logit, where there is one). A query that sees no key has lse −inf.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


@dataclass(frozen=True, eq=False)
class AttentionGeometry:
    """How an attention call forms its scores and which keys each query sees.

    scale: logits are scale · q·k (default d^-0.5). softcap: they become softcap · tanh(logit / softcap).
    causal: key j visible from query i only if j ≤ query_positions[i].
    query_positions: (Nq,) index among the keys of each query (default: the last Nq keys; decoding: Nk − 1).
    key_mask: (Nk,) or (B, Nk) bool, False for keys never attended (padding).
    window: sliding window W: key j visible from query i only if query_positions[i] − j < W.
    sinks: (H,) learned per-head sink logits (GPT-OSS), one more term of each row's softmax denominator; they do
    not change which keys are visible.

    The kernels work on a geometry `resolve`d against their q and k (checked, defaults filled); the methods below
    that read positions or the key mask expect one.
    """

    scale: float | None = None
    causal: bool = True
    query_positions: Int[Tensor, "queries"] | None = None
    key_mask: Bool[Tensor, "*batch keys"] | None = None
    window: int | None = None
    softcap: float | None = None
    sinks: Float[Tensor, "heads"] | None = None

    def resolve(self, q: Float[Tensor, "batch heads queries dim"],
                k: Float[Tensor, "batch kv_heads keys dim"]) -> AttentionGeometry:
        """This geometry checked against q and k, with its defaults filled, on q's device: scale a float,
        query_positions (Nq,) long, key_mask (B, Nk) bool or None (an all-True mask too), sinks (H,) float32."""
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
        return AttentionGeometry(
            scale=d**-0.5 if self.scale is None else float(self.scale),
            causal=bool(self.causal),
            query_positions=positions,
            key_mask=key_mask,
            window=None if window is None else int(window),
            softcap=None if self.softcap is None else float(self.softcap),
            sinks=sinks,
        )

    def rows(self, q0: int, q1: int) -> AttentionGeometry:
        """The geometry of query rows [q0, q1) alone."""
        return replace(self, query_positions=self.query_positions[q0:q1])

    def keys(self, k0: int, k1: int) -> AttentionGeometry:
        """The geometry of keys [k0, k1) alone, renumbered from k0 (query positions shift with them)."""
        return replace(self, query_positions=self.query_positions - k0,
                       key_mask=None if self.key_mask is None else self.key_mask[:, k0:k1])

    def select(self, batch: slice = slice(None), heads: slice = slice(None)) -> AttentionGeometry:
        """The geometry of some batch rows and query heads alone (a (B, Nk) key mask's rows, the sinks' heads)."""
        return replace(self, key_mask=None if self.key_mask is None else self.key_mask[batch],
                       sinks=None if self.sinks is None else self.sinks[heads])

    def logits(self, dots: Float[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
        """Scores from fp32 dot products q·k: scaled, then soft-capped."""
        s = dots * self.scale
        return self.softcap * torch.tanh(s / self.softcap) if self.softcap is not None else s

    def allowed(self, i: Int[Tensor, "*shape"], j: Int[Tensor, "*shape"]) -> Bool[Tensor, "*shape"]:
        """Whether key j may be seen from a query at position i by causality and the window (broadcast), before
        the key mask."""
        ok = torch.ones(torch.broadcast_shapes(i.shape, j.shape), dtype=torch.bool, device=i.device)
        if self.causal:
            ok = ok & (j <= i)
        if self.window is not None:
            ok = ok & (i - j < self.window)
        return ok

    def visible(self, k0: int, k1: int) -> Bool[Tensor, "batch_or_1 queries keys"]:
        """Visibility of keys [k0, k1) from every query: (B or 1, Nq, k1 − k0)."""
        i = self.query_positions[:, None]
        vis = self.allowed(i, torch.arange(k0, k1, device=i.device)[None, :])[None]
        return vis & self.key_mask[:, None, k0:k1] if self.key_mask is not None else vis

    def sees_all(self, k0: int, k1: int) -> bool:
        """Whether every query sees every key of [k0, k1)."""
        pos = self.query_positions
        return (self.key_mask is None and (not self.causal or k1 - 1 <= int(pos.min()))
                and (self.window is None or int(pos.max()) - k0 < self.window))

    def span(self, n_k: int) -> tuple[Int[Tensor, "queries"], Int[Tensor, "queries"]]:
        """First and last key each query may see, before the key mask (last < first: none)."""
        pos = self.query_positions
        lo = (pos - self.window + 1).clamp_min(0) if self.window is not None else torch.zeros_like(pos)
        hi = pos.clamp_max(n_k - 1) if self.causal else torch.full_like(pos, n_k - 1)
        return lo, hi

    def key_range(self, n_k: int) -> tuple[int, int]:
        """[lo, hi): the keys some query may see, before the key mask (hi ≤ lo: none)."""
        pos = self.query_positions
        lo = max(0, int(pos.min()) - self.window + 1) if self.window is not None else 0
        hi = min(n_k, int(pos.max()) + 1) if self.causal else n_k
        return lo, hi

    def plain(self, n_k: int) -> str | None:
        """The geometries that need no mask: "all" (every query sees every key), "causal" (the square lower
        triangle: query i at position i of as many keys); else None."""
        if self.key_mask is not None or self.window is not None:
            return None
        if not self.causal:
            return "all"
        pos = self.query_positions
        if pos.shape[0] == n_k and bool((pos == torch.arange(n_k, device=pos.device)).all()):
            return "causal"
        return None

    def row_counts(self, b: int, n_k: int) -> Float[Tensor, "batch queries"]:
        """Number of keys each query sees, from prefix sums (no scores)."""
        lo, hi = self.span(n_k)
        keys = (self.key_mask if self.key_mask is not None
                else torch.ones(1, n_k, device=lo.device)).float()
        cum = torch.nn.functional.pad(keys.cumsum(-1), (1, 0))
        count = cum[:, (hi + 1).clamp_min(0)] - cum[:, lo.clamp_max(n_k)]
        return torch.where(hi[None] >= lo[None], count, 0.0).expand(b, -1)

    def key_counts(self, b: int, n_k: int) -> Float[Tensor, "batch keys"]:
        """Number of queries that see each key, from a difference array over the queries' spans (no scores)."""
        lo, hi = self.span(n_k)
        ok = hi >= lo
        edges = torch.zeros(n_k + 1, device=lo.device)
        edges.index_add_(0, lo[ok], torch.ones(int(ok.sum()), device=edges.device))
        edges.index_add_(0, hi[ok] + 1, -torch.ones(int(ok.sum()), device=edges.device))
        count = edges.cumsum(0)[:-1].expand(b, -1)
        return count * self.key_mask.float() if self.key_mask is not None else count.clone()
