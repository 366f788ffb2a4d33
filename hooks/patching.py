"""Activation and path patching of attention heads, through the same AttentionInterface wrapper as capture.

A head's output here is `z`: what the head computed before the output projection, (B, N, d) per query head. With
grouped-query attention every query head is patched on its own; a KV head is never patched as a whole. When a
path-patching receiver reads its keys or values from the patched run, its query head is recomputed with its KV
head's keys / values from that run, and every other query head sharing the KV head stays as it was.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from interp.families import resolve
from interp.models import Model

from .capture import capture, heads_by_layer
from .interventions import Intervention, Invocation, intervene

Head = tuple[int, int]
Receiver = tuple[int, int, str]  # (layer, query head, which of its inputs read the patched run: "q", "k", "v", "qkv"…)


@dataclass(eq=False)
class _LayerPatch(Intervention):
    """What one layer's attention output becomes.

    values: query head -> (its new output, broadcastable to (B, N, d); where: bool, broadcastable to (B, N), the
    rows and positions that take it, or None for all).
    recompute: inputs ("q", "kv", …) -> query heads recomputed with those inputs from the running forward and the
    others from `clean` (q (B, H, N, d), k and v (B, H_kv, N, d)): the receivers of path patching.
    """

    values: dict[int, tuple[Tensor, Tensor | None]] = field(default_factory=dict)
    recompute: dict[str, list[int]] = field(default_factory=dict)
    clean: tuple[Tensor, Tensor, Tensor] | None = None

    kind = "a patch"
    order = 30

    def post_output(self, call: Invocation, out: Tensor) -> Tensor:
        out = out.clone()
        for head, (v, where) in self.values.items():
            v = v.to(out)
            if where is None:
                out[:, :, head] = v
            else:
                out[:, :, head] = torch.where(where.to(out.device)[..., None], v, out[:, :, head])
        for inputs, heads in self.recompute.items():
            q, k, v = (mine if name in inputs else theirs.to(mine)
                       for name, mine, theirs in zip("qkv", (call.query, call.key, call.value), self.clean))
            mixed, _ = call.run(q, k, v)
            idx = torch.tensor(heads, device=out.device)
            out[:, :, idx] = mixed[:, :, idx]
        return out


@contextmanager
def _patched(model: Model, patches: dict[int, _LayerPatch], tower: str | None = None):
    with intervene(model.attention_modules(tower), patches, where=model.name):
        yield


@contextmanager
def patch_heads(model: Model, values: Mapping[Head, Tensor], *, positions: Iterable[int] | Tensor | None = None,
                tower: str | None = None):
    """Replace heads' outputs (before the output projection) while the model runs (composes with `capture`).

    values: {(layer, query head): tensor} broadcastable to (B, N, d): another run's output of that head
    (activation patching), a mean (mean-ablation), zeros. positions: replace only these query positions (values
    then (B, N, d), (N, d) or (d,); the other positions keep the running forward's output).
    """
    layers = heads_by_layer(model, values, tower)
    n = model.n_layers(tower)
    where = None
    if positions is not None:
        shaped = [v for v in values.values() if v.ndim >= 2]
        if not shaped:
            raise ValueError("patching at positions needs values with a position axis: (B, N, d) or (N, d)")
        where = torch.zeros(1, shaped[0].shape[-2], dtype=torch.bool)
        where[0, torch.as_tensor(list(positions), dtype=torch.long)] = True
    patches = {layer: _LayerPatch() for layer in layers}
    for (layer, head), v in values.items():
        patches[int(layer) % n].values[int(head)] = (v, where)
    with _patched(model, patches, tower):
        yield


def last_logits(model: Model, inputs: dict) -> Tensor:
    """The logits at the last position, (B, V), computing the unembedding there only where the model allows it."""
    if "logits_to_keep" in inspect.signature(model.hf.forward).parameters:
        return model.hf(**inputs, logits_to_keep=1).logits[:, -1]
    return model.hf(**inputs).logits[:, -1]


@dataclass
class RunCache:
    """One forward's head outputs and, when asked, its queries / keys / values and MLP outputs.

    logits: (B, N, V). z: layer -> (B, N, H, d). qkv: layer -> (q (B, H, N, d), k, v (B, H_kv, N, d)).
    mlp: layer -> (B, N, D), the output of the block's MLP.
    """

    logits: Tensor
    z: dict[int, Tensor]
    qkv: dict[int, tuple[Tensor, Tensor, Tensor]]
    mlp: dict[int, Tensor]


def _mlps(model: Model) -> list[torch.nn.Module]:
    mlps = [resolve(block, "mlp") for block in model.blocks()]
    if any(m is None for m in mlps):
        raise ValueError(f"{model.name}: its blocks have no `mlp` module to freeze")
    return mlps


@torch.no_grad()
def cache_run(model: Model, inputs: dict, *, qkv: bool = False, mlps: bool = False) -> RunCache:
    """Run `model` on `inputs` once, keeping every head's output (and q / k / v, MLP outputs when asked)."""
    z, kept, mlp_out = {}, {}, {}

    def probe(call) -> None:
        z[call.layer] = call.z.detach()
        if qkv:
            kept[call.layer] = (call.q.detach(), call.k.detach(), call.v.detach())

    with ExitStack() as stack:
        stack.enter_context(capture(model, probe, keep=("z", "k", "v") if qkv else ("z",)))
        if mlps:
            for i, m in enumerate(_mlps(model)):
                stack.callback(m.register_forward_hook(lambda mod, a, o, i=i: mlp_out.__setitem__(i, o.detach())).remove)
        logits = model.hf(**inputs).logits
    return RunCache(logits, z, kept, mlp_out)


@torch.no_grad()
def path_patch(model: Model, clean: dict, senders: Iterable[Head], receivers: str | Iterable[Receiver] = "logits", *,
               clean_cache: RunCache, corrupt_cache: RunCache, positions: Iterable[int] | None = None,
               freeze_mlps: bool = False) -> Tensor:
    """Path patching (Wang et al.; Merullo et al.): the logits (B, N, V) when only the senders' effect through the
    receivers differs from the clean run.

    Step 1: run `clean` with the senders' outputs taken from the corrupted run (at `positions`, default all) and
    every other head frozen to its clean output; MLPs are recomputed (part of the path, as in Wang et al.), or
    frozen to their clean outputs with `freeze_mlps`. receivers "logits": these are the logits (the senders'
    direct effect). Otherwise each receiver (layer, head, inputs) is recomputed in step 1 with `inputs` ("q",
    "k", "v" or several) read from the patched stream and the rest from the clean run, and step 2 runs `clean`
    again with only the receivers' outputs replaced by those.
    clean_cache: `cache_run(model, clean, qkv=True, mlps=freeze_mlps)`; corrupt_cache: `cache_run(model, corrupt)`.
    """
    n_layers = model.n_layers()
    sender_heads = {(layer, h) for layer, hs in heads_by_layer(model, senders, None).items() for h in hs}
    direct = isinstance(receivers, str)
    if direct and receivers != "logits":
        raise ValueError(f"receivers must be 'logits' or (layer, head, inputs) triples, not {receivers!r}")
    recv: dict[Head, str] = {}
    if not direct:
        for layer, head, inputs in receivers:
            if not inputs or set(inputs) - set("qkv"):
                raise ValueError(f"a receiver's inputs are some of 'q', 'k', 'v', not {inputs!r}")
            recv[(int(layer), int(head))] = "".join(c for c in "qkv" if c in inputs)
        heads_by_layer(model, recv, None)  # validates before negative layers are counted from the end
        recv = {(layer % n_layers, h): x for (layer, h), x in recv.items()}
        if sender_heads & set(recv):
            raise ValueError(f"heads {sorted(sender_heads & set(recv))} are both senders and receivers")
        if not clean_cache.qkv:
            raise ValueError("path patching to heads needs the clean run's q / k / v: cache_run(..., qkv=True)")
    if freeze_mlps and not clean_cache.mlp:
        raise ValueError("freeze_mlps needs the clean run's MLP outputs: cache_run(..., mlps=True)")
    pos = None if positions is None else torch.as_tensor(list(positions), dtype=torch.long)

    patches = {}
    for layer, z in clean_cache.z.items():
        patch = _LayerPatch(clean=clean_cache.qkv.get(layer))
        for head in range(z.shape[2]):
            if (layer, head) in recv:
                patch.recompute.setdefault(recv[(layer, head)], []).append(head)
            elif (layer, head) in sender_heads:
                value = z[:, :, head].clone()
                where = slice(None) if pos is None else pos.to(value.device)
                value[:, where] = corrupt_cache.z[layer][:, where, head]
                patch.values[head] = (value, None)
            else:
                patch.values[head] = (z[:, :, head], None)
        patches[layer] = patch

    received: dict[int, Tensor] = {}

    def probe(call) -> None:
        received[call.layer] = call.z.detach()

    with ExitStack() as stack:
        stack.enter_context(_patched(model, patches))
        if not direct:
            stack.enter_context(capture(model, probe, layers=sorted({layer for layer, _ in recv}), keep=("z",)))
        if freeze_mlps:
            for i, m in enumerate(_mlps(model)):
                stack.callback(m.register_forward_hook(lambda mod, a, o, i=i: clean_cache.mlp[i]).remove)
        logits = model.hf(**clean).logits
    if direct:
        return logits
    values = {(layer, head): received[layer][:, :, head] for layer, head in recv}
    with patch_heads(model, values):
        return model.hf(**clean).logits


@torch.no_grad()
def activation_patch(model: Model, clean: dict, corrupt_cache: RunCache, variants: list[tuple[int, int, int | None]],
                     metric, *, max_tokens: int = 8192) -> Tensor:
    """Activation patching: for each variant (layer, head, position or None for all), `metric` of the clean run
    with that head's output taken from the corrupted run there. Returns (variants, B).

    clean: inputs with input_ids (B, N); corrupt_cache: `cache_run` of the corrupted prompts (same shape).
    metric: the last position's logits (R, V) -> (R,). Variants run side by side as copies of the batch (at most `max_tokens`
    tokens per forward); each copy is its own forward, so heads downstream of the patched one are recomputed.
    """
    heads_by_layer(model, [(layer, head) for layer, head, _ in variants], None)  # validates
    n_layers = model.n_layers()
    variants = [(int(layer) % n_layers, int(head), pos) for layer, head, pos in variants]
    b, n = clean["input_ids"].shape
    per_forward = max(1, max_tokens // (b * n))
    out = []
    for start in range(0, len(variants), per_forward):
        chunk = variants[start:start + per_forward]
        r = len(chunk) * b
        inputs = {k: v.repeat(len(chunk), *[1] * (v.ndim - 1)) if torch.is_tensor(v) and v.shape[:1] == (b,) else v
                  for k, v in clean.items()}
        patches: dict[int, _LayerPatch] = {}
        for i, (layer, head, pos) in enumerate(chunk):
            patch = patches.setdefault(layer, _LayerPatch())
            if head not in patch.values:
                z = corrupt_cache.z[layer][:, :, head]
                patch.values[head] = (z.repeat(len(chunk), 1, 1), torch.zeros(r, n, dtype=torch.bool))
            where = patch.values[head][1]
            where[i * b:(i + 1) * b, slice(None) if pos is None else pos] = True
        with _patched(model, patches):
            out.append(metric(last_logits(model, inputs)).reshape(len(chunk), b))
    return torch.cat(out)


def patching_effects(model: Model, clean: dict, corrupt: dict, heads: list[tuple[int, int]], metric, *,
                     positions: int | None = None) -> Tensor:
    """The common case of activation patching: each head's normalised effect (V,), one number per head.

    effect = (metric patched − metric clean) / (metric corrupt − metric clean), each metric summed over the
    prompts (a ratio of sums): 1 when patching the head alone moves the clean run all the way to the corrupted
    one, 0 when it changes nothing. clean / corrupt: inputs with input_ids (B, N) of the same shape. heads:
    (layer, head) pairs; positions: patch only that position (default all). metric: the prompts' last-position
    logits (B, V) -> (B,), always called with the B prompts in order (e.g. each prompt's answer − foil logit),
    whatever the batching of variants inside.
    """
    b = clean["input_ids"].shape[0]
    per_prompt = lambda logits: torch.cat([metric(rows) for rows in logits.split(b)])  # noqa: E731  copies × B rows
    corrupt_cache = cache_run(model, corrupt)
    base = float(metric(last_logits(model, clean)).sum())
    moved = float(metric(corrupt_cache.logits[:, -1]).sum()) - base
    if moved == 0:
        raise ValueError("the metric is the same on the clean and the corrupted prompts: no effect can be normalised")
    variants = [(layer, head, positions) for layer, head in heads]
    return (activation_patch(model, clean, corrupt_cache, variants, per_prompt).sum(1) - base) / moved


def edge_attribution(model: Model, clean: dict, corrupt: dict, metric, *, clean_cache: RunCache,
                     corrupt_cache: RunCache, ig_steps: int | None = None) -> Tensor:
    """Edge attribution patching (Syed et al.): the linear estimate of each head's patching effect,
    (z_corrupt − z_clean) · ∂metric/∂z at the clean run, per prompt and position: (L, B, N, H), L every layer
    of the model (0 for a hybrid stack's layers without softmax attention).

    Summed over positions it is the sum of EAP's scores of the head's outgoing edges (the residual stream is a sum,
    so the gradient at a head's output is the sum of the gradients at every later reader's input). One forward and
    one backward; at least float32 whatever the model's dtype. ig_steps: EAP-IG (Hanna et al.): the gradient averaged over `ig_steps` inputs whose embeddings run
    from the clean to the corrupted prompt (midpoints), one forward / backward each.
    metric: the last position's logits (B, V) -> (B,).
    """
    embed = model.hf.get_input_embeddings()
    with torch.no_grad():
        e_clean, e_corrupt = embed(clean["input_ids"]), embed(corrupt["input_ids"])
    rest = {k: v for k, v in clean.items() if k != "input_ids"}
    if ig_steps is not None and ig_steps < 1:
        raise ValueError(f"ig_steps must be ≥ 1, got {ig_steps}")
    alphas = [0.0] if not ig_steps else [(i + 0.5) / ig_steps for i in range(ig_steps)]
    total: dict[int, Tensor] = {}
    wide = torch.promote_types(e_clean.dtype, torch.float32)  # half-precision models sum in float32
    for alpha in alphas:
        zs: dict[int, Tensor] = {}
        embeds = (e_clean + alpha * (e_corrupt - e_clean)).requires_grad_(True)
        with torch.enable_grad(), capture(model, lambda call: zs.__setitem__(call.layer, call.z), keep=("z",)):
            value = metric(last_logits(model, {"inputs_embeds": embeds, **rest})).sum()
            layers = sorted(zs)
            grads = torch.autograd.grad(value, [zs[i] for i in layers])
        for i, g in zip(layers, grads):
            total[i] = total.get(i, 0) + g.detach().to(wide) / len(alphas)
    scores = {i: ((corrupt_cache.z[i].to(wide) - clean_cache.z[i].to(wide)) * total[i]).sum(-1) for i in total}
    zero = torch.zeros_like(next(iter(scores.values())))  # a hybrid stack's layers without softmax attention
    return torch.stack([scores.get(i, zero) for i in range(model.n_layers())])
