"""Capture on a tiny model of any decoder type, checked against the model's own eager attention probabilities."""

import copy
import sys

import torch

import interp
from interp.hooks import Recorder, capture
from interp.kernels import call_attention
from auto_tiny import DEEP, TinyUnbuildable, TooLarge, tiny

TOL = 1e-5
PROMPT = 7
DECODE_STEPS = 2


def _eager_recording(model: interp.Model):
    """Patch the eager attention function of every modeling file the model's attention modules come from, so
    that the probabilities each call returns are kept: {(module id): [(B, H, Nq, Nk), ...]} in call order."""
    found: dict[int, list] = {}
    patched = []
    for m in model.attention_modules():
        if m is None:
            continue
        modeling = sys.modules[type(m).__module__]
        if any(p[0] is modeling for p in patched):
            continue
        original = modeling.eager_attention_forward

        def recording(module, *args, _original=original, **kwargs):
            out, weights = _original(module, *args, **kwargs)
            found.setdefault(id(module), []).append(weights.detach().clone())
            return out, weights

        modeling.eager_attention_forward = recording
        patched.append((modeling, original))
    return found, patched


def check_against_eager(hf_eager: torch.nn.Module, fast_impl: str = "sdpa") -> dict:
    """Run a prompt and DECODE_STEPS decode steps through the eager model (reference probabilities) and through
    a copy with `fast_impl` attention under capture, and compare the probabilities rebuilt from the captured q/k
    with the eager ones; for layers with sink logits, whose eager functions report weights with the sink (GPT-OSS)
    or without it (Granite SWA rescales the output afterwards), with the layer's own output instead:
    probabilities @ v must equal the per-head output z. Returns {"layers", "max_diff", "impl", "steps"}."""
    fast_hf = copy.deepcopy(hf_eager)
    try:
        fast_hf.set_attn_implementation(fast_impl)
    except Exception:
        fast_impl = "eager"
    eager, fast = interp.load_model(hf_eager), interp.load_model(fast_hf)
    vocab = hf_eager.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(vocab, 90), (1, PROMPT), generator=g)
    steps = [ids] + [torch.randint(3, min(vocab, 90), (1, 1), generator=g) for _ in range(DECODE_STEPS)]

    found, patched = _eager_recording(eager)
    try:
        steps = _run(eager.hf, steps)
    except Exception as e:  # noqa: BLE001 — the model itself, without interp, cannot run this tiny config
        raise TinyUnbuildable(f"its own eager forward fails on the tiny config: {type(e).__name__}: "
                              f"{str(e)[:160]}") from e
    finally:
        for modeling, original in patched:
            modeling.eager_attention_forward = original

    rec = Recorder()
    with capture(fast, rec, keep=("q", "k", "v", "z")):
        _run(fast.hf, steps)
    layers = fast.layers()
    eager_modules = eager.attention_modules()
    worst = 0.0
    for layer in layers:
        refs = found.get(id(eager_modules[layer]), [])
        calls = [c for c in rec.calls if c.layer == layer]
        if len(calls) != len(refs) or len(calls) < len(steps):  # differential / looped attention: several calls
            raise AssertionError(f"layer {layer}: {len(calls)} captured calls, {len(refs)} eager calls, "
                                 f"{len(steps)} forwards")
        for call, ref in zip(calls, refs):
            p = call_attention(call)
            if call.sinks is not None:  # eager functions disagree on whether their weights include the sink
                v = call.v.repeat_interleave(call.n_heads // call.v.shape[1], dim=1).float()
                worst = max(worst, float((p @ v - call.z.transpose(1, 2).float()).abs().max()))
                continue
            if p.shape != ref.shape:
                raise AssertionError(f"layer {layer} step {call.step}: shape {tuple(p.shape)} vs eager {tuple(ref.shape)}")
            worst = max(worst, float((p - ref.float()).abs().max()))
    return {"layers": layers, "max_diff": worst, "impl": fast_impl, "steps": len(steps)}


def _run(hf, steps: list) -> list:
    """The prompt, then one token per decode step against the model's KV cache; the steps that ran (the prompt
    alone for a model that returns no cache)."""
    cache = None
    with torch.no_grad():
        for n, step in enumerate(steps):
            out = hf(input_ids=step, past_key_values=cache, use_cache=True)
            cache = getattr(out, "past_key_values", None)
            if cache is None:
                return steps[: n + 1]
    return steps


def outcome(model_type: str) -> tuple[str, str]:
    """("pass" | "differs" | "refused" | "unbuildable" | "error", detail) for one decoder type of the installed
    transformers: its tiny model (deeper if the first layers have no softmax attention) checked against eager.
    "refused": interp's clear error for what it does not support (attention outside the interface, logit biases,
    masks it cannot reproduce, chunked attention)."""
    try:
        hf, _ = tiny(model_type)
        if not _attention_layers(hf):
            hf, _ = tiny(model_type, layers=DEEP)
        result = check_against_eager(hf)
    except (TinyUnbuildable, TooLarge) as e:
        return "unbuildable", str(e)
    except (interp.UnsupportedFamilyError, ValueError) as e:
        if any(s in str(e) for s in REFUSALS):
            return "refused", str(e)
        return "error", f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 — reported per type
        return "error", f"{type(e).__name__}: {e}"
    status = "pass" if result["max_diff"] < TOL else "differs"
    return status, f"max |Δp| {result['max_diff']:.1e} on layers {result['layers']} ({result['impl']}, " \
                   f"{result['steps']} forwards)"


REFUSALS = ("attention interface", "not supported", "which interp does not model")


def _attention_layers(hf) -> list[int]:
    try:
        return interp.load_model(hf).layers()
    except interp.UnsupportedFamilyError:
        return []
