"""The three capture backends (AttentionInterface, nnsight, TransformerLens) feed probes the same calls."""

import pytest
import torch
from transformers import BertForMaskedLM

import interp
from interp.hooks import Recorder
from interp.hooks.backends import generate, trace
from interp.kernels import call_attention
from tiny_models import make

OTHER = ["nnsight", "transformer-lens"]


def _stories_batch():
    model = interp.load_model("stories260k")
    tok = model.tokenizer
    tok.pad_token, tok.padding_side = tok.unk_token, "left"
    return model, tok(["Once upon a time, there was a girl", "The dog ran"], return_tensors="pt", padding=True)


# nnsight sees the very call the model makes: bit-identical. The bridge recomputes attention with eager
# arithmetic, so its tensors differ from SDPA's in the last bits (relative 1e-4), its probabilities by < 1e-5.
TOL = {"nnsight": 0.0, "transformer-lens": 1e-4}


def _assert_same_calls(a: Recorder, b: Recorder, backend: str, query_mask=None):
    assert len(a.calls) == len(b.calls) > 0
    tol = TOL[backend]
    for x, y in zip(a.calls, b.calls):
        assert (x.layer, x.step, x.scale, x.causal) == (y.layer, y.step, y.scale, y.causal)
        rows = query_mask[:, -x.q.shape[2]:] if query_mask is not None else torch.ones(x.q.shape[0], x.q.shape[2], dtype=torch.bool)
        for name in ("q", "k", "v", "z"):
            tx, ty = getattr(x, name), getattr(y, name)
            assert tx.shape == ty.shape, name
            if name == "q":  # padded query rows are never looked at
                tx, ty = tx.transpose(1, 2)[rows], ty.transpose(1, 2)[rows]
            elif name == "z":
                tx, ty = tx[rows], ty[rows]
            else:  # keys and values of padding positions are never attended
                keys = torch.ones(tx.shape[0], tx.shape[2], dtype=torch.bool)
                if query_mask is not None:
                    keys[:, : query_mask.shape[1]] = query_mask
                tx, ty = tx.transpose(1, 2)[keys], ty.transpose(1, 2)[keys]
            assert torch.allclose(tx, ty, rtol=tol, atol=tol), (name, x.layer, x.step, float((tx - ty).abs().max()))
        px, py = call_attention(x), call_attention(y)
        assert float((px - py).transpose(1, 2)[rows].abs().max()) < 1e-5


@pytest.mark.parametrize("backend", OTHER)
def test_backends_agree_on_a_forward(backend):
    model, inputs = _stories_batch()
    ref, got = Recorder(), Recorder()
    keep = ("q", "k", "v", "z")
    out_ref = trace(model, inputs, ref, keep=keep)
    out = trace(model, inputs, got, backend=backend, keep=keep)
    _assert_same_calls(ref, got, backend, inputs["attention_mask"].bool())
    valid = inputs["attention_mask"].bool()
    assert float((out_ref.logits - out.logits)[valid].abs().max()) < 1e-4
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("backend", OTHER)
def test_backends_agree_during_generation(backend):
    model, inputs = _stories_batch()
    ref, got = Recorder(), Recorder()
    ids_ref = generate(model, inputs, ref, max_new_tokens=3, layers=[1, 3], keep=("q", "k", "v", "z"))
    ids = generate(model, inputs, got, max_new_tokens=3, layers=[1, 3], backend=backend, keep=("q", "k", "v", "z"))
    assert torch.equal(ids_ref, ids)
    assert {c.step for c in got.calls} == {0, 1, 2}
    _assert_same_calls(ref, got, backend, inputs["attention_mask"].bool())


@pytest.mark.parametrize("name", ["gpt2", "bert"])
@pytest.mark.parametrize("backend", OTHER)
def test_backends_agree_on_other_families(name, backend):
    hf, inputs = make(name, "sdpa")
    if name == "bert":  # the bridge knows BertForMaskedLM, not the bare BertModel
        torch.manual_seed(0)
        hf = BertForMaskedLM(hf.config).eval()
    model = interp.load_model(hf)
    ref, got = Recorder(), Recorder()
    trace(model, inputs, ref, keep=("q", "k", "v", "z"))
    trace(model, inputs, got, backend=backend, keep=("q", "k", "v", "z"))
    _assert_same_calls(ref, got, backend, inputs["attention_mask"].bool())


def test_bridge_refuses_what_transformer_lens_does_not_support():
    model = interp.load_model(make("bert", "sdpa")[0])
    with pytest.raises(ValueError, match="TransformerBridge does not support BertModel"):
        trace(model, make("bert", "sdpa")[1], Recorder(), backend="transformer-lens")


def test_unknown_backend_and_vision_tower_are_refused():
    model, inputs = _stories_batch()
    with pytest.raises(ValueError, match="unknown backend"):
        trace(model, inputs, Recorder(), backend="jax")
    llava = interp.load_model(make("llava", "sdpa")[0])
    with pytest.raises(ValueError, match="text tower only"):
        trace(llava, {}, Recorder(), backend="nnsight", tower="vision")


def test_bridge_refuses_sliding_windows_and_soft_capping():
    model = interp.load_model(make("mistral", "sdpa")[0])
    with pytest.raises(ValueError, match="sliding windows or soft-capping"):
        trace(model, make("mistral", "sdpa")[1], Recorder(), backend="transformer-lens")
