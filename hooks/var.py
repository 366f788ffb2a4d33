"""Visual attention sinks (Kang et al., ICLR 2025): sink dimensions, φ(x), and Visual Attention Redistribution.

Sink dimensions are the massive-activation dimensions (Sun et al.) of the first (BOS) token's residual stream,
found from the model's own activations, never hard-coded. φ(x) = max over sink dimensions d of |x_d / RMS(x)|
(RMS without a learned gain, ε = 1e-6) on the residual stream entering layers 2 … L − 1 during prefill; tokens
with φ > τ are sink tokens, and those inside an image are visual sink tokens.

VAR rewrites, after the softmax and in every text layer but the last, the attention rows of image-centric heads:
a (head, query) whose attention to image tokens is at least `min_image_attention` and whose share of that on
visual sink tokens (`portion`) is at most ρ (the reference code; the paper states it as the non-sink share
1 − portion ≥ ρ, `rule="paper"`). Attention to every sink token of the row is multiplied by p, and the freed
budget goes to the non-sink image tokens in proportion to their attention. Rows are the text queries after the
last image at prefill, and each generated token. The rewrite needs the probabilities, so the layers it touches
run the modeling file's eager attention (N × N per layer, as in the reference code).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from interp.layout import token_layout
from interp.models import Model

from .capture import capture_residual
from .interventions import Intervention, Invocation, eager_of, intervene

RMS_EPS = 1e-6
RULES = ("code", "paper")
FIRST_SINK_LAYER = 2  # φ is read on the residual stream entering layers 2 … L − 1


def massive_entries(hidden: Tensor, massive_min: float, massive_ratio: float) -> Tensor:
    """(M, 3) (batch, position, dimension) of the massive activations in one layer's residual stream
    (B, N, D): |x| > massive_min and |x| ≥ massive_ratio × the layer's median |x| (Sun et al.)."""
    a = hidden.detach().float().abs()
    median = a.flatten().median()
    return torch.nonzero((a > massive_min) & (a >= massive_ratio * median))


def phi(hidden: Tensor, dims: Tensor) -> Tensor:
    """(B, N) φ(x) = max_{d ∈ dims} |x_d / RMS(x)| of a residual stream (B, N, D); 0 when dims is empty."""
    x = hidden.detach().float()
    if dims.numel() == 0:
        return torch.zeros(x.shape[:2], device=x.device)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS)
    return normed[..., dims.to(x.device)].abs().amax(-1)


def sink_dimensions(model: Model, inputs: dict, *, massive_min: float = 100.0, massive_ratio: float = 1000.0,
                    position: int = 0) -> list[int]:
    """The dimensions where the token at `position` (the first, BOS) carries a massive activation in any text
    layer's output, from one forward pass on `inputs`. Empty when the model has none at these thresholds."""
    found: set[int] = set()

    def probe(layer: int, hidden: Tensor) -> None:
        entries = massive_entries(hidden, massive_min, massive_ratio)
        found.update(int(d) for d in entries[entries[:, 1] == position, 2])

    with torch.no_grad(), capture_residual(model, probe, tower="text" if model.family.kind == "lvlm" else None):
        model.hf(**inputs)
    return sorted(found)


@dataclass(frozen=True)
class VAR:
    """Visual Attention Redistribution settings (defaults: the reference code's LLaVA-1.5 config).

    p: fraction of the attention to sink tokens kept. rho, min_image_attention, rule: the image-centric head
    selection. tau: the φ threshold for sink tokens. skip_last: leave the last layer alone. sink_dims: the sink
    dimensions (None: found from the first token's massive activations with massive_min / massive_ratio).
    """

    p: float = 0.6
    rho: float = 0.5
    min_image_attention: float = 0.2
    tau: float = 20.0
    skip_last: bool = True
    rule: str = "code"
    sink_dims: tuple[int, ...] | None = None
    massive_min: float = 100.0
    massive_ratio: float = 1000.0

    def __post_init__(self):
        if not 0 <= self.p <= 1:
            raise ValueError(f"VAR p must lie in [0, 1], got {self.p}")
        if self.rule not in RULES:
            raise ValueError(f"unknown image-centric rule {self.rule!r}; choose from {', '.join(RULES)}")


def image_centric(portion: Tensor, image_mass: Tensor, rho: float, min_image_attention: float, rule: str) -> Tensor:
    """Which (…, query) rows are image-centric: enough image attention, and little of it on visual sinks."""
    small = portion <= rho if rule == "code" else (1 - portion) >= rho
    return small & (image_mass >= min_image_attention)


@dataclass
class _Redistribution:
    var: VAR
    dims: Tensor
    image: Tensor                    # (B, N) image tokens of the prompt
    first_query: Tensor              # (B,) first text position after the last image
    sinks: dict[int, Tensor] = field(default_factory=dict)  # layer -> (B, N) sink tokens, set during prefill
    rewritten: dict[int, int] = field(default_factory=dict)  # layer -> rows rewritten so far

    def note_stream(self, layer: int, hidden: Tensor) -> None:
        """Block `layer`'s output is the stream entering layer + 1: its sink tokens, at prefill only."""
        target = layer + 1
        if target >= FIRST_SINK_LAYER and target not in self.sinks and hidden.shape[1] == self.image.shape[1]:
            self.sinks[target] = phi(hidden, self.dims) > self.var.tau

    def rows(self, layer: int, eager: Callable, module, query, key, value, attention_mask, *args, **kwargs):
        out, weights = eager(module, query, key, value, attention_mask, *args, **kwargs)
        sinks = self.sinks.get(layer)
        if sinks is None or weights is None:
            return out, weights
        n_k, n_q = key.shape[2], query.shape[2]
        pad = lambda m: torch.nn.functional.pad(m, (0, n_k - m.shape[1]))[:, None, None, :n_k].to(weights.device)  # noqa: E731
        sink, image = pad(sinks), pad(self.image)
        visual = sink & image
        q_pos = torch.arange(n_k - n_q, n_k, device=weights.device)
        eligible = (q_pos[None, :] >= self.first_query.to(weights.device)[:, None])[:, None, :]  # (B, 1, Nq)
        w = weights.float()
        on_image = (w * image).sum(-1)
        portion = (w * visual).sum(-1) / (on_image + 1e-6 * image.sum(-1))  # the reference code's 1e-6 per token
        chosen = eligible & bool(visual.any()) & image_centric(portion, on_image, self.var.rho,
                                                               self.var.min_image_attention, self.var.rule)
        if not bool(chosen.any()):
            return out, weights
        kept = torch.where(sink, w * self.var.p, w)
        budget = (w * sink).sum(-1, keepdim=True) * (1 - self.var.p)
        base = w * (image & ~sink)
        new = kept + budget * base / base.sum(-1, keepdim=True).clamp_min(1e-12)
        w = torch.where(chosen[..., None], new, w).to(weights.dtype)
        v = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
        self.rewritten[layer] = self.rewritten.get(layer, 0) + int(chosen.sum())
        return torch.matmul(w, v).transpose(1, 2).contiguous(), w


@contextmanager
def redistribute_visual_attention(model: Model, inputs: dict, var: VAR = VAR()):
    """Apply VAR while the model runs on `inputs` (prefill, then generation with the KV cache); yields a record
    with `.dims` (sink dimensions), `.sinks` (layer -> (B, N) sink tokens) and `.rewritten` (layer -> rows)."""
    if model.family.kind != "lvlm":
        raise ValueError(f"VAR redistributes attention to images: {model.name} is a {model.family.kind}, not a "
                         "vision-language model")
    layout = token_layout(model, inputs)
    if "image" not in layout.names or not bool(layout.mask("image").any()):
        raise ValueError("VAR needs image tokens in the input: give an image")
    image = layout.mask("image")
    n = image.shape[1]
    last = torch.where(image, torch.arange(n, device=image.device), -1).amax(1)
    dims = var.sink_dims if var.sink_dims is not None else sink_dimensions(
        model, inputs, massive_min=var.massive_min, massive_ratio=var.massive_ratio)
    state = _Redistribution(var, torch.tensor(list(dims), dtype=torch.long), image, last + 1)
    modules = model.attention_modules("text")
    layers = range(len(modules) - 1 if var.skip_last else len(modules))
    with capture_residual(model, state.note_stream, tower="text"), \
            intervene(modules, {i: _Redistribute(state, i) for i in layers}, where=f"{model.name}: text"):
        yield state


@dataclass(eq=False)
class _Redistribute(Intervention):
    """VAR on one layer: its eager attention, with the rows rewritten (stage 2 of `interventions`)."""

    state: _Redistribution
    layer: int
    kind = "an attention redistribution"
    order = 20

    def replace(self, call: Invocation):
        return call.run(fn=lambda *a, **k: self.state.rows(self.layer, eager_of(call.module), *a, **k))
