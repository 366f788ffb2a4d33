"""Every supported family, on a tiny random config of its real HF class: capture keeps the model's outputs and
its attention implementation, and attention recomputed from the captured q/k equals the model's own eager
attention (`attn_implementation="eager"`), with GQA, padding, sliding windows and soft-capping."""

import dataclasses
import sys

import pytest
import torch

import interp
from helpers import captured
from interp.hooks import Recorder, capture
from interp.kernels import call_attention
from tiny_models import BUILDERS, make

TOL = 1e-5


def eager_weights(model: interp.Model, inputs: dict, tower: str) -> dict:
    """The probabilities the model's own eager attention function returns, per call: {layer: [(B, H, Nq, Nk)]}."""
    modules = model.attention_modules(tower)
    layer_of = {id(m): i for i, m in enumerate(modules) if m is not None}
    modeling = sys.modules[type(next(m for m in modules if m is not None)).__module__]
    original = modeling.eager_attention_forward
    found: dict[int, list] = {}

    def recording(module, *args, **kwargs):
        out, weights = original(module, *args, **kwargs)
        if id(module) in layer_of:
            found.setdefault(layer_of[id(module)], []).append(weights.detach().clone())
        return out, weights

    assert model.config._attn_implementation == "eager"
    modeling.eager_attention_forward = recording
    try:
        with torch.no_grad():
            model.hf(**inputs)
    finally:
        modeling.eager_attention_forward = original
    return found


def _query_mask(inputs: dict, tower: str, n_q: int):
    mask = inputs.get("attention_mask")
    if tower != "text" or mask is None or mask.shape[1] != n_q:
        return None
    return mask.bool()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_capture_matches_eager_attention(name):
    fast_hf, inputs = make(name, "sdpa")
    eager_hf, _ = make(name, "eager")
    fast, eager = interp.load_model(fast_hf), interp.load_model(eager_hf)
    impl = fast.config._attn_implementation
    with torch.no_grad():
        plain = fast.hf(**inputs)
    towers = fast.towers()
    assert towers
    for tower in towers:
        rec, out = captured(fast, inputs, tower=tower.name, keep=("q", "k", "v", "z"))
        key = "logits" if "logits" in out else "last_hidden_state"
        assert torch.equal(plain[key], out[key]), "capture changed the model's outputs"
        assert fast.config._attn_implementation == impl
        weights = eager_weights(eager, inputs, tower.name)
        n_layers = fast.n_layers(tower.name)
        assert {c.layer for c in rec.calls} == set(range(n_layers))
        for layer in range(n_layers):
            calls = [c for c in rec.calls if c.layer == layer]
            refs = weights[layer]  # Qwen-VL vision: one call per image (or window) per layer
            assert len(calls) == len(refs)
            for call, ref in zip(calls, refs):
                p = call_attention(call)
                assert p.shape == ref.shape
                qm = _query_mask(inputs, tower.name, p.shape[2])
                diff = (p - ref.float()).abs()
                if qm is not None:
                    diff = diff[qm[:, None, :, None].expand_as(diff)]
                assert float(diff.max()) < TOL, f"{name} {tower.name} layer {layer}"
                if call.z is not None:
                    n_h = call.q.shape[1]
                    assert call.z.shape == (call.q.shape[0], call.q.shape[2], n_h, call.q.shape[3])


CAUSAL_LMS = ["gpt2", "llama", "mistral", "qwen2", "gemma2", "gemma3", "gpt_neox"]


@pytest.mark.parametrize("name", CAUSAL_LMS)
def test_decode_steps_match_eager(name):
    """In generate with a KV cache each step sees its one query and all cached keys (cropped for sliding layers)."""
    fast_hf, inputs = make(name, "sdpa")
    eager_hf, _ = make(name, "eager")
    fast, eager = interp.load_model(fast_hf), interp.load_model(eager_hf)
    rec = Recorder()
    n_new = 3
    with torch.no_grad(), capture(fast, rec):
        gen = fast.hf.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0)
    n_prompt = inputs["input_ids"].shape[1]
    mask = torch.cat([inputs["attention_mask"], torch.ones(gen.shape[0], n_new - 1, dtype=torch.long)], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers left-padded rows
    weights = eager_weights(eager, {"input_ids": gen[:, :-1], "attention_mask": mask, "position_ids": positions}, "text")
    for step in range(1, n_new):
        for call in (c for c in rec.calls if c.step == step):
            assert call.q.shape[2] == 1
            pos = n_prompt + step - 1
            p = call_attention(call)
            ref = weights[call.layer][0][:, :, pos : pos + 1, : pos + 1].float()
            n_k = p.shape[-1]
            assert float(ref[..., : pos + 1 - n_k].abs().sum()) < TOL  # a cropped cache drops nothing seen
            assert float((p - ref[..., pos + 1 - n_k :]).abs().max()) < TOL, f"{name} layer {call.layer} step {step}"


def test_gemma2_soft_capping_matches_eager():
    model_hf, inputs = make("gemma2", "eager", softcap=5.0)
    model = interp.load_model(model_hf)
    rec, _ = captured(model, inputs)
    weights = eager_weights(model, inputs, "text")
    for call in rec.calls:
        assert call.softcap == 5.0
        diff = (call_attention(call) - weights[call.layer][0]).abs()
        diff = diff[inputs["attention_mask"].bool()[:, None, :, None].expand_as(diff)]
        assert float(diff.max()) < TOL
    # the test can fail: ignoring the cap gives different probabilities
    call = rec.calls[0]
    call.geometry = dataclasses.replace(call.geometry, softcap=None)
    assert float((call_attention(call) - weights[0][0]).abs().max()) > 1e-3


def test_sliding_windows_are_recorded_per_layer():
    model = interp.load_model(make("qwen2", "sdpa")[0])
    rec, _ = captured(model, make("qwen2", "sdpa")[1])
    assert [c.window for c in sorted(rec.calls, key=lambda c: c.layer)] == [None, 4]
