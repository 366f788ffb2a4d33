"""One intervention pipeline: every change to, or look at, an attention call is an `Intervention` attached to an
attention module by `intervene`, and one wrapper of the model's attention functions (every implementation
registered in transformers' AttentionInterface: "sdpa", "eager", "flash_attention_2", ...) applies them.

Per call, the interventions active on it (`Intervention.active`) run stage by stage, and within a stage in their
`order` (knock-outs 10, redistributions 20, patches 30, capture 40):

1. `pre_softmax(call)`: a new query (B, H, Nq, d) before the scores — the "uniform" knock-out zeroes a head's query.
2. `replace(call)`: (output, weights) computed in place of the model's attention function, or None; the first
   that answers wins — VAR rewrites probabilities, capture runs the model's SDPA call with statistics riding along.
3. `post_output(call, out)`: the output (B, Nq, H, dv), before the output projection — zero / mean / scale
   knock-outs, activation and path patching.
4. `observe(call, out)`: sees the final output — capture hands the layer's call to its probe.

Modules with nothing attached pass straight through, and the model's config is never touched.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers.modeling_utils import AttentionInterface

SLOT = "_interp_interventions"  # the attribute of an attention module holding its interventions, in order


@dataclass
class Invocation:
    """One call of a model's attention function, as the wrapper received it (query as changed by stage 1).

    query: (B, H, Nq, d) after position encoding; key, value: (B, H_kv, Nk, d) after the KV-cache update;
    interventions: those active on this call, in order; riding: statistics a `replace` computed in the call; lse:
    (B, H, Nq) the row log-sum-exp that a `replace` kept from the call."""

    module: torch.nn.Module
    fn: Callable
    query: Tensor
    key: Tensor
    value: Tensor
    mask: Tensor | None
    args: tuple
    kwargs: dict
    interventions: list = field(default_factory=list)
    riding: dict | None = None
    lse: Tensor | None = None

    def run(self, query: Tensor | None = None, key: Tensor | None = None, value: Tensor | None = None,
            fn: Callable | None = None) -> tuple[Tensor, Tensor | None]:
        """The model's attention function (or `fn`, same signature) on this call, with q, k or v replaced."""
        return (fn or self.fn)(self.module, self.query if query is None else query, self.key if key is None else key,
                               self.value if value is None else value, self.mask, *self.args, **self.kwargs)


class Intervention:
    """A change to (or look at) the attention calls of one module; override the stages it takes part in."""

    kind = "an intervention"  # what the module "already has" when a second one of this class is attached
    order = 50

    def active(self, call: Invocation) -> bool:
        return True

    def pre_softmax(self, call: Invocation) -> Tensor | None:
        return None

    def replace(self, call: Invocation) -> tuple[Tensor, Tensor | None] | None:
        return None

    def post_output(self, call: Invocation, out: Tensor) -> Tensor:
        return out

    def observe(self, call: Invocation, out: Tensor) -> None:
        pass


def eager_of(module) -> Callable:
    """The eager attention function of the modeling file that defines `module`."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"{type(module).__name__}: its modeling file has no eager_attention_forward to call")
    return fn


def _wrap(original: Callable | None) -> Callable:
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        attached = module.__dict__.get(SLOT)
        fn = original if original is not None else eager_of(module)
        if not attached:
            return fn(module, query, key, value, attention_mask, *args, **kwargs)
        call = Invocation(module, fn, query, key, value, attention_mask, args, kwargs)
        call.interventions = [iv for iv in attached if iv.active(call)]
        for iv in call.interventions:
            new_query = iv.pre_softmax(call)
            if new_query is not None:
                call.query = new_query
        result = None
        for iv in call.interventions:
            result = iv.replace(call)
            if result is not None:
                break
        out, weights = result if result is not None else call.run()
        for iv in call.interventions:
            out = iv.post_output(call, out)
        for iv in call.interventions:
            iv.observe(call, out)
        return out, weights

    attention.__wrapped__ = original
    return attention


_lock = threading.RLock()  # guards the wrapping and every module's list of interventions
_installed: dict[str, Callable | None] = {}  # implementation name -> original (None: the modeling file's eager)
_depth = 0


def _install() -> None:
    """Wrap every registered attention implementation (nested: counted, undone by the matching `_uninstall`)."""
    global _depth
    with _lock:
        if _depth == 0:
            mapping = AttentionInterface._global_mapping
            originals = {name: fn for name, fn in mapping.items() if name != "paged|eager"}
            originals.setdefault("eager", None)
            for name, fn in originals.items():
                mapping[name] = _wrap(fn)
            _installed.update(originals)
        _depth += 1


def _uninstall() -> None:
    """Undo one `_install`; the originals come back when the last one is undone."""
    global _depth
    with _lock:
        _depth -= 1
        if _depth == 0:
            mapping = AttentionInterface._global_mapping
            for name, fn in _installed.items():
                if fn is None:
                    mapping.pop(name, None)
                else:
                    mapping[name] = fn
            _installed.clear()


@contextmanager
def intervene(modules, by_layer: Mapping[int, Intervention], *, where: str):
    """Attach `by_layer` (layer index in `modules` → intervention) while the block runs. A module refuses a second
    intervention of the same class ("<where> layer i already has …"); different kinds compose, in `order`."""
    with _lock:
        for i, iv in by_layer.items():
            if any(type(other) is type(iv) for other in modules[i].__dict__.get(SLOT, ())):
                raise RuntimeError(f"{where} layer {i} already has {iv.kind}")
        _install()
        for i, iv in by_layer.items():
            modules[i].__dict__[SLOT] = sorted([*modules[i].__dict__.get(SLOT, ()), iv], key=lambda x: x.order)
    try:
        yield
    finally:
        with _lock:
            for i, iv in by_layer.items():
                rest = [other for other in modules[i].__dict__.get(SLOT, ()) if other is not iv]
                if rest:
                    modules[i].__dict__[SLOT] = rest
                else:
                    modules[i].__dict__.pop(SLOT, None)
            _uninstall()
