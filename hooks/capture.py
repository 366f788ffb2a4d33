"""Per-head capture through transformers' AttentionInterface, keeping the model's own attention.

While a `capture` is active, each captured attention module carries a `Site` (an intervention of
`hooks.interventions`, which wraps every registered attention implementation — "sdpa", "eager",
"flash_attention_2", ...): the model's own attention runs unchanged, and then what the layer saw (post-RoPE
queries, keys after the KV-cache update, values, per-head outputs before the output projection) goes to a probe,
inside the layer's forward. Modules that are not being captured pass straight through, the model's config is
never touched, and logits are bit-identical with capture on and off. Head knock-outs (`mask_heads`) are
interventions of the same pipeline.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from interp.families import Tower
from interp.kernels import AttentionGeometry, AttentionStats
from interp.kernels.api import resolve_backend
from interp.kernels.fused_stats import attention_with_lse, in_call_applies, stats_in_call
from interp.models import Model

from .interventions import Intervention, Invocation, intervene

KEEP_CHOICES = ("q", "k", "v", "z")


@dataclass
class AttentionCall:
    """What one attention layer saw in one forward call of the model.

    q: (B, H, Nq, d) queries after position encoding, only the captured heads (`heads`).
    k, v: (B, H_kv, Nk, d) every key / value the queries attend over (cached ones included); v may be None.
    z: (B, Nq, H, d) per-head outputs before the output projection, captured heads only; may be None.
    heads: (H,) query-head index of each captured head; n_heads: query heads in the layer.
    geometry: the call's attention geometry (`interp.kernels.AttentionGeometry`: scale, causal, query_positions
    (Nq,), key_mask (B, Nk) (None: every key valid), window, softcap, and the captured heads' sinks (H,), which
    GPT-OSS and kin pass as `s_aux`), also read as the call's own attributes; decode: query_positions = Nk − 1.
    Where the layer's own mask is not the causal / window / padding rule (bidirectional image blocks, a prefix,
    block-diagonal images, chunks, packed documents), its bounds hold each query's run of keys read from that mask.
    step: index of the model forward within the capture (0 = prefill, then one per decode step).
    stats, stats_request: the statistics of the captured heads computed inside the model's own SDPA call, for the
    `call_stats` arguments `stats_request` (see `capture(stats=)`); None where the call could not carry them.
    lse: (B, H, Nq) fp32 each captured row's log-sum-exp as the model's own SDPA call computed it, where the
    statistics go to the Triton kernels (`capture(stats=)`): `call_stats` then takes one pass over the keys, not
    two; None elsewhere.
    """

    tower: str
    layer: int
    step: int
    q: Float[Tensor, "batch heads queries dim"]
    k: Float[Tensor, "batch kv_heads keys dim"] | None
    v: Float[Tensor, "batch kv_heads keys dim_v"] | None
    z: Float[Tensor, "batch queries heads dim_v"] | None
    heads: Int[Tensor, "heads"]
    n_heads: int
    geometry: AttentionGeometry
    stats: AttentionStats | None = None
    stats_request: dict | None = None
    lse: Float[Tensor, "batch heads queries"] | None = None

    scale = property(lambda self: self.geometry.scale)
    causal = property(lambda self: self.geometry.causal)
    query_positions = property(lambda self: self.geometry.query_positions)
    key_mask = property(lambda self: self.geometry.key_mask)
    window = property(lambda self: self.geometry.window)
    softcap = property(lambda self: self.geometry.softcap)
    sinks = property(lambda self: self.geometry.sinks)

    @property
    def n_kv_heads(self) -> int:
        if self.k is None:
            raise ValueError("this call kept no keys: capture with keep including 'k'")
        return self.k.shape[1]

    def head_keys(self) -> Float[Tensor, "batch heads_or_kv_heads keys dim"]:
        """Keys for the captured heads: k itself when every head is captured, else (B, H, Nk, d) per query head."""
        if self.q.shape[1] == self.n_heads:
            return self.k
        return self.k[:, self.kv_heads.to(self.k.device)]

    @property
    def kv_heads(self) -> Int[Tensor, "heads"]:
        """(H,) KV head of each captured query head."""
        return self.heads // (self.n_heads // self.n_kv_heads)


Probe = Callable[[AttentionCall], None]


class Recorder:
    """A probe that keeps a detached copy of every call (small inputs and tests; long inputs want a real probe)."""

    def __init__(self):
        self.calls: list[AttentionCall] = []

    def __call__(self, call: AttentionCall) -> None:
        for name in KEEP_CHOICES:
            t = getattr(call, name)
            if t is not None:
                setattr(call, name, t.detach().clone())
        self.calls.append(call)

    def get(self, layer: int, step: int = 0, tower: str | None = None) -> AttentionCall:
        found = [c for c in self.calls if c.layer == layer and c.step == step and (tower is None or c.tower == tower)]
        if len(found) != 1:
            raise KeyError(f"{len(found)} calls recorded for layer {layer}, step {step}, tower {tower}")
        return found[0]


# ---------------------------------------------------------------------------------------------------------
# The wrapped attention implementations


@dataclass(eq=False)
class Site(Intervention):
    """A captured attention module: where it sits and which session receives its calls. It observes each call
    (stage 4 of `interventions`), and where the session asked for statistics and nothing else intervenes on the
    call, it makes the model's SDPA call itself (stage 2) with the statistics riding along (the fused kernels) or
    keeping the row log-sum-exp that SDPA's kernel computes anyway (the Triton kernels)."""

    session: "_Session"
    tower: Tower
    layer: int
    kind = "a capture"
    order = 40

    def replace(self, call: Invocation):
        request = self.session.stats_request
        if (request is None or call.interventions != [self] or call.args
                or not _plain_sdpa(call.fn, call.module, call.mask, call.kwargs)):
            return None
        backend = resolve_backend("auto", call.query)
        if backend == "triton" and _lse_applies(call.query, call.key, call.value):
            out, weights, call.lse = _sdpa_with_lse(call.module, call.query, call.key, call.value, call.kwargs)
            return out, weights
        if backend != "fused" or not _can_ride(call.query, call.key, call.value, request):
            return None
        out, weights, call.riding = _sdpa_with_stats(call.module, call.query, call.key, call.value, call.kwargs,
                                                     request)
        return out, weights

    def observe(self, call: Invocation, out: Tensor) -> None:
        self.session.emit(self, call.module, call.query, call.key, call.value, out, call.kwargs, call.mask,
                          call.riding, call.lse)


def _plain_sdpa(fn, module, attention_mask, kwargs) -> bool:
    """Whether the call is transformers' SDPA function with no mask, no dropout, no bias, sinks, window or soft-cap
    (what an SDPA call of our own can stand in for)."""
    return (fn is sdpa_attention_forward and attention_mask is None
            and not (module.training and kwargs.get("dropout", 0.0))
            and all(kwargs.get(name) is None for name in ("position_bias", "s_aux", "sliding_window", "softcap"))
            and not kwargs.get("output_attentions"))


def _can_ride(query, key, value, request: dict) -> bool:
    """Whether the statistics can ride along this plain SDPA call on the fused kernels: a prompt (as many queries as
    keys), fp32 on CPU, narrow value columns (`in_call_applies`), segments (if any) covering the keys."""
    segments = request.get("segments")
    stats = request.get("stats")
    if (not set(request) <= {"stats", "segments", "n_segments"} or not stats  # a backend, top-k...: after the call
            or ("segment_mass" in stats and (segments is None or request.get("n_segments") is None
                                             or segments.dtype != torch.long
                                             or int(segments.max()) >= request["n_segments"]))):
        return False
    return (in_call_applies(query, key, value, frozenset(request["stats"]), request.get("n_segments") or 1)
            and (segments is None or tuple(segments.shape) == (query.shape[0], key.shape[2])))


def _lse_applies(query, key, value) -> bool:
    """Whether one of SDPA's own kernels that return the row lse can make this plain call: a prompt (as many queries
    as keys) or one decoding query, value heads as wide as the queries', and on CUDA, fp16 / bf16 with a head dim
    ≤ 256 and a multiple of 8 (the flash kernel) or fp32 (the memory-efficient kernel); on CPU (the Triton
    interpreter, for tests) the CPU flash kernel."""
    n_q, n_k, d = query.shape[2], key.shape[2], query.shape[-1]
    if (n_q != n_k and n_q != 1) or value.shape[-1] != d or query.shape[1] % key.shape[1]:
        return False
    if query.device.type == "cpu":
        return True
    return query.is_cuda and (query.dtype == torch.float32 or (d <= 256 and d % 8 == 0))


def _sdpa_call(module, query, kwargs) -> tuple[bool, float]:
    """(is_causal, scale) of transformers' `sdpa_attention_forward` for this call, by its own rules."""
    is_causal = kwargs.get("is_causal")
    is_causal = bool(query.shape[2] > 1 and (is_causal if is_causal is not None else getattr(module, "is_causal", True)))
    scaling = kwargs.get("scaling")
    return is_causal, scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])  # SDPA's own default


def _sdpa_with_lse(module, query, key, value, kwargs):
    """(output, None, row lse (B, H, Nq) fp32 or None) in place of `sdpa_attention_forward`: one of SDPA's own
    kernels that returns the lse with the output (CUDA: flash for fp16 / bf16, memory-efficient for fp32; CPU:
    flash: `fused_stats.attention_with_lse`), checked as `_stand_in` says."""
    is_causal, scale = _sdpa_call(module, query, kwargs)
    shape = ("lse", query.device.type, query.dtype, query.shape[-1], query.shape[1] // key.shape[1], is_causal,
             query.shape[2] == 1)
    return _stand_in(module, query, key, value, kwargs, shape,
                     lambda: attention_with_lse(query, key, value, scale=scale, causal=is_causal))


def _sdpa_with_stats(module, query, key, value, kwargs, request: dict):
    """(output, None, statistics of every head or None) in place of `sdpa_attention_forward` (`stats_in_call`),
    checked as `_stand_in` says (on AVX-512 the padded call's arithmetic differs at head dim 8)."""
    is_causal, scale = _sdpa_call(module, query, kwargs)
    shape = (query.shape[-1], value.shape[-1], query.shape[1] // key.shape[1], is_causal, tuple(request["stats"]),
             request.get("n_segments"))
    return _stand_in(module, query, key, value, kwargs, shape, lambda: stats_in_call(
        query, key, value, scale=scale, causal=is_causal, want=frozenset(request["stats"]),
        segments=request.get("segments"), n_segments=request.get("n_segments") or 1))


_rides_bit_identical: dict[tuple, bool] = {}  # per call shape: whether our SDPA call kept the output bit for bit


def _stand_in(module, query, key, value, kwargs, shape: tuple, call):
    """(output (B, N, H, dv), weights, what rides) of our own SDPA call, `call()` → (output (B, H, N, dv), what
    rides), in place of `sdpa_attention_forward`: its causality and scale rules, its output layout, and the output
    itself bit for bit. The first call of each `shape` in a process is checked against the model's own call; where
    it differs, the model's output is kept, then and after, and nothing rides (the statistics are left to
    `call_stats`)."""
    if _rides_bit_identical.get(shape) is False:
        return *sdpa_attention_forward(module, query, key, value, None, **kwargs), None
    try:
        out, riding = call()
    except RuntimeError:  # a kernel this device or shape lacks (an older GPU's flash, a head dim): the model's call
        _rides_bit_identical[shape] = False
        return *sdpa_attention_forward(module, query, key, value, None, **kwargs), None
    out = out.transpose(1, 2).contiguous()
    if shape not in _rides_bit_identical:
        own, weights = sdpa_attention_forward(module, query, key, value, None, **kwargs)
        _rides_bit_identical[shape] = torch.equal(own, out)
        if not _rides_bit_identical[shape]:
            return own, weights, None
    return out, None, riding


# ---------------------------------------------------------------------------------------------------------
# A capture session


class _Session:
    def __init__(self, model: Model, probe: Probe, tower: Tower, layers: list[int], heads: Tensor | None,
                 keep: frozenset[str], stats_request: dict | None = None):
        self.model, self.probe, self.tower = model, probe, tower
        self.layers, self.heads, self.keep = layers, heads, keep
        self.stats_request = stats_request
        self.step = -1
        self.mask2d: Tensor | None = None

    def before_forward(self, module, args, kwargs):
        """Top-level pre-hook: count steps, note the 2-D padding mask, refuse inputs longer than the context."""
        self.step += 1
        given = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
        mask = given.get("attention_mask")
        self.mask2d = mask if isinstance(mask, Tensor) and mask.ndim == 2 else None
        ids, embeds = given.get("input_ids"), given.get("inputs_embeds")
        n_new = ids.shape[-1] if isinstance(ids, Tensor) else embeds.shape[1] if isinstance(embeds, Tensor) else 0
        cache = given.get("cache", given.get("past_key_values"))  # renamed `cache` in transformers 5.24
        if cache is not None and getattr(cache, "is_compileable", False):
            raise ValueError("capture needs the default dynamic KV cache: a static cache returns unfilled slots "
                             "among the keys; generate without cache_implementation='static'")
        n_past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        self.model.check_length(int(n_past) + n_new)

    def emit(self, site: Site, module, query, key, value, out, kwargs, attention_mask=None,
             stats: dict[str, Tensor] | None = None, lse: Tensor | None = None) -> None:
        _check_no_bias(self.model, site, kwargs)
        n_heads = query.shape[1]
        heads = self.heads if self.heads is not None else torch.arange(n_heads)
        if self.heads is not None and int(heads.max()) >= n_heads:
            raise ValueError(f"head {int(heads.max())} out of range: layer {site.layer} has {n_heads} heads")
        select = self.heads is not None
        n_q, n_k = query.shape[2], key.shape[2]
        key_mask = None
        if self.mask2d is not None and site.tower.name == "text" and self.mask2d.shape[1] >= n_k:
            key_mask = self.mask2d[:, -n_k:].to(device=key.device, dtype=torch.bool)
            if bool(key_mask.all()):
                key_mask = None
        dev = query.device
        call = AttentionCall(
            tower=site.tower.name,
            layer=site.layer,
            step=self.step,
            q=query[:, heads.to(dev)] if select else query,
            k=key if "k" in self.keep else None,
            v=value if "v" in self.keep else None,
            z=(out[:, :, heads.to(dev)] if select else out) if "z" in self.keep else None,
            heads=heads,
            n_heads=n_heads,
            geometry=AttentionGeometry(
                scale=_scale(module, query, kwargs),
                causal=_causal(module, site.tower, kwargs),
                query_positions=torch.arange(n_k - n_q, n_k, device=dev),
                key_mask=key_mask,
                window=kwargs.get("sliding_window"),
                softcap=kwargs.get("softcap"),
                sinks=_sinks(kwargs.get("s_aux"), heads if select else None),
            ),
        )
        if stats is not None:  # computed in the model's call for every head: keep the captured ones
            pick = heads.to(dev)
            call.stats = AttentionStats(**{name: t if name == "key_count" or not select else t[:, pick]
                                           for name, t in stats.items()})
            call.stats_request = self.stats_request
        if lse is not None:
            call.lse = lse[:, heads.to(dev)] if select else lse
        _check_chunk_mask(self.model, site, n_k, attention_mask)
        call.geometry = _mask_geometry(self.model, site, call.geometry, n_q, n_k, attention_mask, self.mask2d)
        self.probe(call)


def _check_no_bias(model: Model, site: Site, kwargs) -> None:
    """Refuse a bias passed beside the logits (a `*bias*` tensor argument: learned relative positions): the
    statistics are recomputed from q·k alone and could not reproduce it (a bias inside the mask: `_mask_geometry`)."""
    passed = [name for name, value in kwargs.items() if "bias" in name and isinstance(value, Tensor)]
    if passed:
        raise ValueError(f"{model.name} ({model.config.model_type}): {site.tower.name} layer {site.layer} adds "
                         f"{passed[0]!r} to its attention logits, which the captured queries and keys cannot "
                         "reproduce; this family is not supported")


_mask_geometries: dict[tuple, tuple[Tensor, Tensor] | None] = {}  # per mask tensor: (bounds, key mask) or None


def _mask_geometry(model: Model, site: Site, geometry: AttentionGeometry, n_q: int, n_k: int, mask,
                   mask2d: Tensor | None) -> AttentionGeometry:
    """The call's geometry as the layer's own 4-D mask (B | 1, H | 1, Nq, Nk) says. Where the mask lets its real
    queries (not padding) see what the causal / window / padding rule says, the rule stands. Where it differs but
    shows each real query one run of keys, less keys no query sees (padding) — bidirectional image blocks
    (Gemma 3), a prefix-LM's prefix (PaliGemma), block-diagonal images (Pixtral), chunks (Llama 4), packed
    documents, symmetric windows (ModernBERT) — each query's first and last key are read from the mask into the
    geometry's bounds. Refused: a mask that adds a bias to the logits (ALiBi, relative positions: float values
    other than 0 and the dtype's lowest), differs between heads, or shows a query several runs of keys (extra or
    compressed keys, global tokens beside a window). Read once per mask tensor, in blocks of query rows so that it
    adds little memory to the model's own mask."""
    if not isinstance(mask, Tensor) or mask.ndim != 4:
        return geometry
    key = (id(mask), mask.data_ptr(), tuple(mask.shape), mask.dtype, geometry.window, geometry.causal,
           None if geometry.key_mask is None else geometry.key_mask.data_ptr())
    if key not in _mask_geometries:
        if len(_mask_geometries) > 64:
            _mask_geometries.clear()
        _mask_geometries[key] = _read_mask(model, site, geometry, n_q, n_k, mask, mask2d)
    read = _mask_geometries[key]
    if read is None:
        return geometry
    bounds, key_mask = read
    return replace(geometry, bounds=bounds, key_mask=key_mask)


def _read_mask(model: Model, site: Site, geometry: AttentionGeometry, n_q: int, n_k: int, mask: Tensor,
               mask2d: Tensor | None) -> tuple[Tensor, Tensor | None] | None:
    """`_mask_geometry`'s reading of one mask: None where the rule stands, else (bounds (2, B | 1, Nq), the keys
    some real query sees (B | 1, Nk) or None: all)."""
    where = f"{model.name} ({model.config.model_type}): {site.tower.name} layer {site.layer}"
    compare = mask.shape[-2:] == (n_q, n_k)
    real = mask2d[:, -n_q:].bool().to(mask.device) if mask2d is not None and mask2d.shape[1] >= n_q else None
    biased = differs = False
    first, last, count, seen = [], [], [], []  # per row block; seen: the keys some real query sees
    for q0 in range(0, mask.shape[-2], MASK_CHECK_ROWS):
        rows = mask[:, :, q0:q0 + MASK_CHECK_ROWS]
        allowed = rows if rows.dtype == torch.bool else rows > torch.finfo(rows.dtype).min / 2
        if rows.is_floating_point():
            biased = biased or bool((allowed & (rows != 0)).any())
        if not compare:
            continue
        # (B | 1, rows, 1) the real queries (models unmask padding queries freely)
        is_real = real[:, q0:q0 + MASK_CHECK_ROWS, None] if real is not None else torch.ones(1, 1, 1, dtype=torch.bool,
                                                                                            device=mask.device)
        ours = geometry.rows(q0, q0 + MASK_CHECK_ROWS).visible(0, n_k).to(mask.device)
        differs = differs or bool(((allowed != ours[:, None]) & is_real[:, None]).any())
        if allowed.shape[1] > 1 and not bool((allowed == allowed[:, :1]).all()):
            raise ValueError(f"{where}: its mask differs between heads, which interp does not model; this family "
                             "is not supported")
        allowed = allowed[:, 0].to(torch.uint8)                                    # (B | 1, rows, Nk)
        first.append(allowed.argmax(-1))
        last.append(n_k - 1 - allowed.flip(-1).argmax(-1))
        count.append(allowed.sum(-1))
        seen.append((allowed.bool() & is_real).any(1))
    if biased:
        raise ValueError(f"{where} adds a bias to its attention logits through the mask (ALiBi or relative "
                         "positions), which the captured queries and keys cannot reproduce; this family is not supported")
    if not differs:
        return None
    first, last, count = torch.cat(first, -1), torch.cat(last, -1), torch.cat(count, -1)   # (B | 1, Nq)
    seen = torch.stack(seen).any(0)                                                         # (B | 1, Nk)
    b = max(count.shape[0], seen.shape[0])
    some = count > 0
    lo = torch.where(some, first, n_k).expand(b, -1)
    hi = torch.where(some, last, -1).expand(b, -1)
    cum = torch.nn.functional.pad(seen.long().cumsum(-1), (1, 0)).expand(b, -1)
    in_run = torch.where(some, cum.gather(1, hi + 1) - cum.gather(1, lo), 0)  # keys in each query's run
    several = (in_run != count) & (real if real is not None else True)
    if bool(several.any()):
        sample, i = (int(x) for x in several.nonzero()[0])
        raise ValueError(f"{where}: its mask shows query {i} (sample {sample}) several separate runs of keys (extra or "
                         "compressed keys, global tokens beside a window), which interp does not model; the forms it "
                         "reads are one run of keys per query (causal, windows, bidirectional or prefix blocks, "
                         "block-diagonal images, chunks, packed documents) less padded keys; this family is not "
                         "supported")
    if real is not None:  # padding queries keep the rule's run
        rule_lo, rule_hi = geometry.span(n_k)
        lo = torch.where(real, lo, rule_lo.to(lo.device))
        hi = torch.where(real, hi, rule_hi.to(hi.device))
    device = geometry.query_positions.device
    return torch.stack([lo, hi]).to(device), None if bool(seen.all()) else seen.to(device)


MASK_CHECK_ROWS = 1024


def _sinks(s_aux: Tensor | None, heads: Tensor | None) -> Tensor | None:
    """(H,) float32 sink logits of the captured heads, from what the model passed as `s_aux`."""
    if s_aux is None:
        return None
    sinks = s_aux.detach().float()
    return sinks if heads is None else sinks[heads.to(sinks.device)]


def _scale(module, query: Tensor, kwargs) -> float:
    """The factor the model multiplies q·k by (every supported family passes it as `scaling`)."""
    for value in (kwargs.get("scaling"), getattr(module, "scaling", None)):
        if value is not None:
            return float(value)
    return query.shape[-1] ** -0.5


def _causal(module, tower: Tower, kwargs) -> bool:
    if kwargs.get("is_causal") is not None:
        return bool(kwargs["is_causal"])
    return bool(getattr(module, "is_causal", tower.causal))


def check_layers(model: Model, tower: Tower, layers: Iterable[int] | None) -> list[int]:
    """Validated layer indices (negative ones from the end); default: every layer with softmax attention."""
    n = model.n_layers(tower.name)
    present = model.layers(tower.name)
    if layers is None:
        return present
    chosen = sorted({int(i) for i in layers})
    bad = [i for i in chosen if not -n <= i < n]
    if bad or not chosen:
        raise ValueError(f"layers {bad or '[]'} out of range: {model.name} has {n} {tower.name} layers (0..{n - 1})")
    chosen = sorted({i % n for i in chosen})
    absent = [i for i in chosen if i not in present]
    if absent:
        raise ValueError(f"{tower.name} layers {absent} of {model.name} have no softmax attention (a hybrid stack); "
                         f"its attention layers are {present}")
    return chosen


def _check_chunk_mask(model: Model, site: Site, n_k: int, mask) -> None:
    """Refuse a call of a chunked-attention layer (Llama 4: a query sees only the keys of its own chunk) over more
    keys than a chunk without a 4-D mask to read the chunks from (an attention implementation that applies them
    itself)."""
    cfg = model._tower_config(site.tower.name)
    chunk = getattr(cfg, "attention_chunk_size", None)
    types = getattr(cfg, "layer_types", None) or ()
    if (chunk and site.layer < len(types) and types[site.layer] == "chunked_attention" and n_k > chunk
            and not (isinstance(mask, Tensor) and mask.ndim == 4)):
        raise ValueError(f"{model.name}: {site.tower.name} layer {site.layer} uses chunked attention "
                         f"(attention_chunk_size={chunk}) without a mask to read its chunks from; load the model with "
                         "attn_implementation='sdpa' or 'eager'")


def check_heads(model: Model, tower: Tower, heads: Sequence[int] | None) -> Int[Tensor, "heads"] | None:
    if heads is None:
        return None
    n, _ = model.head_counts(tower.name)
    chosen = sorted({int(h) for h in heads})
    bad = [h for h in chosen if not 0 <= h < n]
    if bad or not chosen:
        raise ValueError(f"heads {bad or '[]'} out of range: {model.name} has {n} heads per layer (0..{n - 1})")
    return torch.tensor(chosen)


def heads_by_layer(model: Model, heads: Iterable[tuple[int, int]], tower: str | None = None) -> dict[int, list[int]]:
    """{layer: [query heads]} from (layer, head) pairs, validated, negative layers counted from the end."""
    t = model.family.tower(tower)
    n = model.n_layers(t.name)
    out: dict[int, list[int]] = {}
    for layer, head in heads:
        check_layers(model, t, [layer])
        out.setdefault(int(layer) % n, []).append(int(head))
    for hs in out.values():
        check_heads(model, t, hs)
    return out


@contextmanager
def session(model: Model, probe: Probe, *, tower: str | None = None, layers: Iterable[int] | None = None,
            heads: Sequence[int] | None = None, keep: Iterable[str] = ("q", "k"), root=None,
            stats: dict | None = None):
    """A validated capture session with its top-level pre-hook on `root` (default `model.hf`); for backends."""
    t = model.family.tower(tower)
    keep = frozenset(keep) | {"q"}
    unknown = keep - set(KEEP_CHOICES)
    if unknown:
        raise ValueError(f"unknown tensors to keep {sorted(unknown)}; choose from {KEEP_CHOICES}")
    s = _Session(model, probe, t, check_layers(model, t, layers), check_heads(model, t, heads), keep, stats)
    hook = (root if root is not None else model.hf).register_forward_pre_hook(s.before_forward, with_kwargs=True)
    try:
        yield s
    finally:
        hook.remove()


@contextmanager
def capture(
    model: Model,
    probe: Probe,
    *,
    tower: str | None = None,
    layers: Iterable[int] | None = None,
    heads: Sequence[int] | None = None,
    keep: Iterable[str] = ("q", "k"),
    stats: dict | None = None,
):
    """Stream what chosen attention layers see to `probe` while the model runs (forward or generate).

    Inside the block, call `model.hf(...)` or `model.hf.generate(...)` as usual. `probe(call)` receives one
    `AttentionCall` per layer per forward, in layer order, inside the layer's forward: it should keep only
    small results. keep: which of "q", "k", "v", "z" the calls carry (q always). tower: "text" / "vision"
    (default: the family's primary tower). layers / heads: which to capture (default all).
    stats: the `call_stats` arguments the probe will use (`stats`, `segments` (B, Nk), `n_segments`): where the
    model calls transformers' SDPA function on a prompt without a mask, in fp32 on CPU, they are computed inside
    that very call (`kernels.fused_stats.stats_in_call`: the model's output is unchanged, bit for bit) and
    `call_stats(call, **stats)` returns them; elsewhere `call_stats` computes them as usual.
    """
    with session(model, probe, tower=tower, layers=layers, heads=heads, keep=keep, stats=stats) as s:
        modules = model.attention_modules(s.tower.name)
        with intervene(modules, {i: Site(s, s.tower, i) for i in s.layers}, where=f"{model.name}: {s.tower.name}"):
            yield s


# ---------------------------------------------------------------------------------------------------------
# The residual stream


ResidualProbe = Callable[[int, Float[Tensor, "batch tokens hidden"]], None]


@contextmanager
def capture_residual(model: Model, probe: ResidualProbe, *, tower: str | None = None,
                     layers: Iterable[int] | None = None):
    """Stream the residual stream leaving chosen blocks while the model runs: `probe(layer, hidden)` with hidden
    (B, N, D), the output of block `layer` (= the stream entering layer + 1), inside the forward. Composes with
    `capture` (the same forward can feed both)."""
    t = model.family.tower(tower)
    chosen = check_layers(model, t, layers)
    blocks = model.blocks(t.name)

    def hook_for(i: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            probe(i, hidden if hidden.ndim == 3 else hidden[None])  # Qwen-VL's vision blocks drop the batch
        return hook

    handles = [blocks[i].register_forward_hook(hook_for(i)) for i in chosen]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------------------
# Knocking heads out

KNOCKOUT_MODES = ("uniform", "zero", "mean", "scale")


@dataclass(eq=False)
class _Knockout(Intervention):
    """Heads knocked out in one layer: "uniform" zeroes their queries (stage 1), "zero" / "mean" / "scale" rewrite
    their outputs (stage 3)."""

    heads: Tensor
    mode: str
    values: Tensor | None = None  # (H', d) per knocked-out head, for "mean"
    factor: float = 1.0           # for "scale"
    decode_only: bool = False     # only calls with fewer queries than keys (decode steps against the KV cache)
    kind = "heads knocked out"
    order = 10

    def active(self, call: Invocation) -> bool:
        return not (self.decode_only and call.query.shape[2] >= call.key.shape[2])  # a prompt's forward: left alone

    def pre_softmax(self, call: Invocation) -> Tensor | None:
        if self.mode != "uniform":
            return None
        query = call.query.clone()
        query[:, self.heads.to(query.device)] = 0
        return query

    def post_output(self, call: Invocation, out: Tensor) -> Tensor:
        if self.mode in ("zero", "mean"):
            out = out.clone()
            out[:, :, self.heads.to(out.device)] = 0 if self.values is None else self.values.to(out)
        elif self.mode == "scale":
            out = out.clone()
            out[:, :, self.heads.to(out.device)] *= self.factor
        return out


@contextmanager
def mask_heads(model: Model, heads: Iterable[tuple[int, int]], *, mode: str = "uniform", tower: str | None = None,
               means: dict[tuple[int, int], Float[Tensor, "dim"]] | None = None, factor: float = 1.0,
               decode_only: bool = False):
    """Knock out attention heads while the model runs (forward or generate; composes with `capture`).

    heads: (layer, query head) pairs. mode "uniform": the head's query is zeroed, so its attention is uniform
    over the keys it may see (Wu et al.'s masking of retrieval heads); "zero": the head's output before the
    output projection is zeroed (zero-ablation); "mean": that output is replaced at every position by
    means[(layer, head)], a (d,) vector (mean-ablation); "scale": that output is multiplied by `factor` (head
    reinforcement, e.g. VHR). Works through the AttentionInterface, with any attention implementation of the
    model, in a forward or every step of a generation (prefill and decode alike, so the KV cache stays consistent).
    decode_only: only in decode steps (calls whose queries are fewer than their keys); the prompt's forward, and so
    the KV cache it leaves, is the unmasked model's (Wu et al.'s reference code masks this way).
    """
    if mode not in KNOCKOUT_MODES:
        raise ValueError(f"unknown knockout mode {mode!r}; choose from {', '.join(KNOCKOUT_MODES)}")
    heads = [(int(layer), int(head)) for layer, head in heads]
    if mode == "mean" and (means is None or any(h not in means for h in heads)):
        raise ValueError("mode 'mean' needs means={(layer, head): (d,) tensor} for every knocked-out head")
    t = model.family.tower(tower)
    merged = heads_by_layer(model, heads, tower)
    if not merged:
        yield
        return
    layers = sorted(merged)
    n = model.n_layers(t.name)
    chosen = {i: check_heads(model, t, merged[i]) for i in layers}
    modules = model.attention_modules(t.name)
    by_head = {(layer % n, head): v for (layer, head), v in (means or {}).items()}
    knockouts = {i: _Knockout(chosen[i], mode, None if mode != "mean" else
                              torch.stack([by_head[(i, int(h))] for h in chosen[i]]), float(factor), bool(decode_only))
                 for i in layers}
    with intervene(modules, knockouts, where=f"{model.name}: {t.name}"):
        yield
