"""One forward pass for several analyses: each brings its part of the pass (a `Pass`: inputs, probe, statistics
request, residual probe, and what the sample gives once the pass has run); parts with the same inputs run as one
forward with the union of their statistics requests, and every probe sees each call as if its part ran alone (the
statistics it asked for, under its own request)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from interp.kernels import AttentionStats, call_stats
from interp.models import Model
from interp.progress import QUIET, Progress

from .backends import trace
from .capture import AttentionCall, Probe, capture_residual

MERGEABLE = {"stats", "segments", "n_segments"}  # request keys whose union one call can compute


@dataclass
class Pass:
    """One analysis's part of one forward pass (one planned sample).

    inputs: the model inputs (input_ids (1, N), ...). probe: called with every captured layer's call. stats: the
    `call_stats` arguments the probe asks of every call (None: nothing asked ahead). residual: called with (layer,
    hidden (B, N, D)) for the residual stream leaving each block, or None. finish: () -> what the sample gives (its
    `score_sample` result), once the pass has run."""

    inputs: dict
    probe: Probe
    finish: Callable[[], Any]
    stats: dict | None = None
    residual: Callable[[int, Tensor], None] | None = None


def alone(model: Model, part: Pass, options, progress: Progress = QUIET) -> Any:
    """Run one part on its own (an analysis's `score_sample`); options: its `Options` (backend, layers, heads)."""
    return run_passes(model, [part], backend=options.backend, layers=options.layers, heads=options.heads,
                      progress=progress)[0]


def run_passes(model: Model, parts: list[Pass], *, backend: str = "hf", layers: Iterable[int] | None = None,
               heads: Iterable[int] | None = None, progress: Progress = QUIET) -> list:
    """One forward pass of `model` serving every part (they must have the same inputs): the union of their
    statistics requests computed once (`merged_request`: inside the model's SDPA call where it can ride there, else
    from the captured call right after it), every probe and residual probe fed. Returns each part's
    `finish()`, in order. ValueError when the parts' inputs differ."""
    first = parts[0].inputs
    if any(not same_inputs(first, p.inputs) for p in parts[1:]):
        raise ValueError("parts of one forward pass need the same inputs")
    requests = [p.stats for p in parts]
    merged = merged_request(requests)
    segmentations = _segmentations(requests)
    bar = progress.bar(total=len(layers) if layers else len(model.layers()), desc="layers", leave=False)

    def probe(call: AttentionCall) -> None:
        if call.stats is None and len(parts) > 1 and merged is not None and set(merged) <= MERGEABLE:
            call = replace(call, stats=call_stats(call, **merged), stats_request=merged)  # the union, once
        for part, asked in zip(parts, requests):
            part.probe(as_asked(call, asked, segmentations))
        bar.update()

    try:
        with ExitStack() as stack:
            for p in parts:
                if p.residual is not None:
                    stack.enter_context(capture_residual(model, p.residual))
            trace(model, first, probe, backend=backend, layers=layers, heads=heads, stats=merged)
    finally:
        bar.close()
    return [p.finish() for p in parts]


def same_inputs(a: dict, b: dict) -> bool:
    """Whether two model inputs are the same (tensors by shape, dtype and value)."""
    return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)


def merged_request(requests: list[dict | None]) -> dict | None:
    """The `call_stats` arguments that serve every request: the one request when all agree; else, where every
    request is `stats` / `segments` / `n_segments`, the union of their statistics, with the distinct segmentations
    (`_segmentations`) combined into one (segment id s_1 + n_1 · (s_2 + n_2 · …), `n_segments` their product), from
    which `as_asked` sums each one's masses back; else None (each probe computes its own after the call)."""
    asked = [r for r in requests if r is not None]
    if not asked or all(_same_request(asked[0], r) for r in asked[1:]):
        return asked[0] if asked else None
    if any(not set(r) <= MERGEABLE for r in asked):
        return None
    merged = {"stats": tuple(dict.fromkeys(s for r in asked for s in r["stats"]))}
    segmentations = _segmentations(requests)
    if segmentations:
        combined, radix = 0, 1
        for segments, n in segmentations:
            combined, radix = combined + radix * segments.long(), radix * n
        merged.update(segments=combined, n_segments=radix)
    return merged


def as_asked(call: AttentionCall, asked: dict | None, segmentations: list[tuple[Tensor, int]]) -> AttentionCall:
    """The call as a probe that asked `asked` sees it: where the call carries the statistics of a merged request that
    covers `asked`, those it asked for (segment masses summed back to its own segments: `segmentations` as
    `_segmentations` gave them) under its own request; else the call as it is."""
    merged = call.stats_request
    if call.stats is None or asked is None or _same_request(merged, asked) or not _covers(merged, asked):
        return call
    picked = {name: getattr(call.stats, name) for name in asked["stats"]}
    if "segment_mass" in picked:
        at = next(i for i, (s, n) in enumerate(segmentations)
                  if n == asked["n_segments"] and _same_value(s, asked["segments"]))
        mass = picked["segment_mass"]
        radices = [n for _, n in reversed(segmentations)]  # the combined id's digits, slowest first
        digits = mass.reshape(*mass.shape[:-1], *radices)
        keep = mass.dim() - 1 + len(radices) - 1 - at
        others = [d for d in range(mass.dim() - 1, digits.dim()) if d != keep]
        picked["segment_mass"] = digits.sum(others) if others else digits
    return replace(call, stats=AttentionStats(**picked), stats_request=asked)


def _covers(merged: dict | None, asked: dict) -> bool:
    """Whether a merged request (`merged_request`) computed everything `asked` asks for."""
    return (merged is not None and set(asked) <= MERGEABLE and set(asked["stats"]) <= set(merged["stats"])
            and ("segment_mass" not in asked["stats"] or "segments" in merged))


def _segmentations(requests: list[dict | None]) -> list[tuple[Tensor, int]]:
    """The distinct (segments (B, N), n_segments) of the requests that ask for segment masses, in order."""
    found: list[tuple[Tensor, int]] = []
    for r in requests:
        if r is None or "segment_mass" not in r.get("stats", ()) or not set(r) <= MERGEABLE:
            continue
        if not any(n == r["n_segments"] and _same_value(s, r["segments"]) for s, n in found):
            found.append((r["segments"], r["n_segments"]))
    return found


def _same_request(a: dict | None, b: dict | None) -> bool:
    """Whether two `call_stats` argument sets are the same (tensors by value)."""
    return a is b or (a is not None and b is not None and same_inputs(a, b))


def _same_value(x, y) -> bool:
    if isinstance(x, Tensor):
        return (isinstance(y, Tensor) and x.shape == y.shape and x.dtype == y.dtype
                and torch.equal(x, y.to(x.device)))
    return x == y
