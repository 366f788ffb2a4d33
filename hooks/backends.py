"""Three ways to see inside a running model, feeding the same probes with the same `AttentionCall`s.

- "hf" (default): transformers' AttentionInterface; the model's own SDPA / flash call is wrapped, never replaced.
- "nnsight": nnsight's `.source` tracing of the `attention_interface(...)` call inside each attention module;
  the model also keeps its own attention implementation.
- "transformer-lens": TransformerLens's `TransformerBridge` hooks (`hook_rot_q` / `hook_q`, the KV cache update,
  `hook_z`). The bridge rewrites the modules of the model it wraps and computes attention itself (eager
  arithmetic), so it wraps a deep copy of the model, made once and kept: the user's model is never modified,
  and the numbers equal the eager model's.

The nnsight and TransformerLens backends capture the primary (text / encoder) tower with one attention call
per layer per forward; the vision towers of LVLMs go through "hf". Each is a `Backend` object in BACKENDS (name →
backend, with `forward` and `generate`); `trace` and `generate` look the name up there.
"""

from __future__ import annotations

import copy
import re
import weakref
from collections.abc import Iterable, Sequence
from contextlib import ExitStack

import torch

from interp.models import Model

from .capture import Probe, Site, capture, session
from .var import VAR, redistribute_visual_attention

class Backend:
    """A way to run a model while streaming its attention calls to a probe. opts: tower, layers, heads, keep."""

    name = ""
    primary_tower_only = True  # captures the family's primary tower alone

    def forward(self, model: Model, inputs: dict, probe: Probe, opts: dict, stats: dict | None):
        """One forward pass; returns the model's output. stats: requested in-call statistics (where supported)."""
        raise NotImplementedError

    def generate(self, model: Model, inputs: dict, probe: Probe, opts: dict, kwargs: dict, var: VAR | None):
        """`model.hf.generate(**inputs, **kwargs)` with one call per layer per step; returns the token ids."""
        raise NotImplementedError

    def check(self, model: Model, tower: str | None, var: VAR | None) -> None:
        if var is not None:
            raise ValueError(f"VAR runs through backend 'hf', not {self.name!r}")
        if self.primary_tower_only and model.family.tower(tower) is not model.family.primary:
            raise ValueError(f"the {self.name} backend captures the {model.family.primary.name} tower only; use "
                             "backend 'hf'")


class _AttentionInterface(Backend):
    """transformers' AttentionInterface: the model's own attention function, wrapped (`capture`)."""

    name = "hf"
    primary_tower_only = False

    def check(self, model: Model, tower: str | None, var: VAR | None) -> None:
        pass

    def forward(self, model, inputs, probe, opts, stats):
        with capture(model, probe, **opts, stats=stats):
            return model.hf(**inputs)

    def generate(self, model, inputs, probe, opts, kwargs, var):
        with ExitStack() as stack:
            if var is not None:
                stack.enter_context(redistribute_visual_attention(model, inputs, var))
            stack.enter_context(capture(model, probe, **opts))
            return model.hf.generate(**inputs, **kwargs)


class _NNsight(Backend):
    """nnsight's `.source` tracing of each attention module's `attention_interface(...)` call."""

    name = "nnsight"

    def forward(self, model, inputs, probe, opts, stats):
        return _nnsight_forward(model, inputs, probe, opts)

    def generate(self, model, inputs, probe, opts, kwargs, var):
        return _nnsight_forward(model, inputs, probe, opts, generate=kwargs)


class _TransformerLens(Backend):
    """TransformerLens's TransformerBridge hooks, on a deep copy of the model."""

    name = "transformer-lens"

    def forward(self, model, inputs, probe, opts, stats):
        return _bridge_forward(model, inputs, probe, opts, generate=None)

    def generate(self, model, inputs, probe, opts, kwargs, var):
        return _bridge_forward(model, inputs, probe, opts, generate=kwargs)


BACKENDS: dict[str, Backend] = {b.name: b for b in (_AttentionInterface(), _TransformerLens(), _NNsight())}


def _backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    return BACKENDS[name]


def trace(
    model: Model,
    inputs: dict,
    probe: Probe,
    *,
    backend: str = "hf",
    tower: str | None = None,
    layers: Iterable[int] | None = None,
    heads: Sequence[int] | None = None,
    keep: Iterable[str] = ("q", "k"),
    stats: dict | None = None,
):
    """One forward pass of `model` on `inputs` (what the tokenizer / processor returned), streaming an
    `AttentionCall` per captured layer to `probe`. Returns the model's output (with `.logits` for LMs).
    backend: a name in BACKENDS. stats: the `call_stats` arguments the probe uses, computed inside the model's own
    SDPA calls where they can be (backend "hf"; see `capture`)."""
    runner = _backend(backend)
    runner.check(model, tower, None)
    with torch.no_grad():
        return runner.forward(model, inputs, probe, dict(tower=tower, layers=layers, heads=heads, keep=keep), stats)


def generate(
    model: Model,
    inputs: dict,
    probe: Probe,
    *,
    max_new_tokens: int,
    backend: str = "hf",
    tower: str | None = None,
    layers: Iterable[int] | None = None,
    heads: Sequence[int] | None = None,
    keep: Iterable[str] = ("q", "k"),
    var: VAR | None = None,
    **generate_kwargs,
) -> torch.Tensor:
    """Greedy generation (unless `generate_kwargs` say otherwise) with a KV cache, streaming calls to `probe`:
    step 0 is the prompt, each later step one query against all cached keys. Returns (B, N + new) token ids.
    var: Visual Attention Redistribution settings (`interp.hooks.VAR`, vision-language models, backend "hf")."""
    n_prompt = inputs["input_ids"].shape[-1]
    model.check_length(n_prompt + max_new_tokens)
    runner = _backend(backend)
    runner.check(model, tower, var)
    kwargs = {"do_sample": False, **generate_kwargs, "max_new_tokens": max_new_tokens}
    with torch.no_grad():
        return runner.generate(model, inputs, probe, dict(tower=tower, layers=layers, heads=heads, keep=keep), kwargs,
                               var)


def _module_paths(root: torch.nn.Module, modules: list) -> list[str]:
    names = {id(m): name for name, m in root.named_modules()}
    return [names[id(m)] for m in modules]


# ---------------------------------------------------------------------------------------------------------
# nnsight

_nnsight_models: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CALL_LINE = re.compile(r"^\s*(attention_interface_\d+)\s+->\s+\d+\s+.*attention_interface\(", re.M)


def _nnsight_wrapper(model: Model):
    from nnsight import NNsight

    if model.hf not in _nnsight_models:
        _nnsight_models[model.hf] = NNsight(model.hf)
    return _nnsight_models[model.hf]


def _envoy(root, path: str):
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def _nnsight_forward(model: Model, inputs: dict, probe: Probe, opts: dict, generate: dict | None = None):
    wrapped = _nnsight_wrapper(model)
    with session(model, probe, **opts) as s:
        modules = model.attention_modules(s.tower.name)
        paths = _module_paths(model.hf, modules)
        labels = {}

        def emit_layers():
            for i in s.layers:
                source = _envoy(wrapped, paths[i]).source
                if i not in labels:
                    found = _CALL_LINE.findall(str(source))
                    if len(found) != 1:
                        raise RuntimeError(f"nnsight: cannot find the attention call in {type(modules[i]).__name__}")
                    labels[i] = found[0]
                op = getattr(source, labels[i])
                args, kwargs = op.inputs
                out = op.output[0]
                s.emit(Site(s, s.tower, i), modules[i], args[1], args[2], args[3], out, kwargs, args[4])

        if generate is None:
            with wrapped.trace(**inputs):
                emit_layers()
                result = wrapped.output.save()
            return result
        n_steps = generate["max_new_tokens"]
        with wrapped.trace(**inputs, fn=model.hf.generate, **generate) as tracer:
            for _ in tracer.iter[0:n_steps]:
                emit_layers()
            result = tracer.result.save()
        return result


# ---------------------------------------------------------------------------------------------------------
# TransformerLens


_bridges: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _bridge(model: Model):
    """(bridge, bridged copy of the HF model): built once per model, from a deep copy."""
    if model.hf not in _bridges:
        from transformer_lens.model_bridge.sources import build_bridge_from_module

        hf = copy.deepcopy(model.hf)
        arch = (getattr(hf.config, "architectures", None) or [type(hf).__name__])[0]
        try:
            bridge = build_bridge_from_module(hf, arch, hf_config=hf.config)
        except Exception as e:  # TransformerLens raises various types for unsupported architectures
            raise ValueError(f"TransformerLens's TransformerBridge does not support {arch}: {e}") from e
        for block in getattr(bridge, "blocks", ()):
            attn = getattr(block, "attn", None)
            if hasattr(attn, "_update_kv_cache"):
                attn._update_kv_cache = _cache_by_either_name(attn._update_kv_cache)
        _bridges[model.hf] = (bridge, hf)
    return _bridges[model.hf]


def _bridge_forward(model: Model, inputs: dict, probe: Probe, opts: dict, generate: dict | None):
    bridge, hf = _bridge(model)
    with session(model, probe, root=hf, **opts) as s:
        original = model.attention_modules(s.tower.name)
        if any(_window_or_softcap(m) for m in original):  # the bridge's own arithmetic knows neither
            raise ValueError("the transformer-lens backend does not model sliding windows or soft-capping; "
                             "use backend 'hf' or 'nnsight' for this model")
        pending: dict[int, dict] = {}
        hook_names = set(bridge.hook_dict)

        def keep(i, key, transpose):
            def fn(t, hook):
                pending.setdefault(i, {})[key] = t.transpose(1, 2) if transpose else t
            return fn

        def finish(i):
            def fn(z, hook):
                got = pending.pop(i)
                s.emit(Site(s, s.tower, i), original[i], got["q"], got["k"], got["v"], z, {})
            return fn

        hooks, patched = [], []
        for i in s.layers:
            name = f"blocks.{i}.attn."
            rot = "hook_rot_q" if name + "hook_rot_q" in hook_names else "hook_q"
            hooks += [(name + rot, keep(i, "q", True)),
                      (name + rot.replace("q", "k"), keep(i, "k", True)),
                      (name + "hook_v", keep(i, "v", True)),
                      (name + "hook_z", finish(i))]
            attn = bridge.blocks[i].attn
            if hasattr(attn, "_update_kv_cache"):
                patched.append((attn, attn._update_kv_cache))
                attn._update_kv_cache = _full_kv(attn._update_kv_cache, keep(i, "k", False), keep(i, "v", False))
        try:
            with bridge.hooks(fwd_hooks=hooks):
                if generate is None:
                    return hf(**inputs)
                return hf.generate(**inputs, **generate)
        finally:
            for attn, update in patched:
                attn._update_kv_cache = update


def _window_or_softcap(module) -> bool:
    """Whether an attention module uses a sliding window or logit soft-capping."""
    cfg = getattr(module, "config", None)
    if hasattr(module, "sliding_window"):
        window = module.sliding_window
    else:
        window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    return window is not None or bool(getattr(cfg, "attn_logit_softcapping", None))


def _cache_by_either_name(update):
    """Wrap a bridge's KV-cache update so that it finds the cache under either name: transformers 5.24 passes
    `cache=`, TransformerLens 4.3 looks for `past_key_values=` only (and, missing it, would decode every new
    token against itself alone)."""

    def wrapped(k, v, **kwargs):
        if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
            kwargs["past_key_values"] = kwargs["cache"]
        return update(k, v, **kwargs)

    return wrapped


def _full_kv(update, keep_k, keep_v):
    """Wrap a bridge's KV-cache update so the probe sees all cached keys and values (B, H_kv, Nk, d)."""

    def wrapped(k, v, **kwargs):
        k, v = update(k, v, **kwargs)
        keep_k(k, None)
        keep_v(v, None)
        return k, v

    return wrapped
