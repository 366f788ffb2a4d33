"""Capture on real pretrained weights: recomputed attention equals the model's own eager attention."""

import pytest
import torch

import interp
from helpers import captured, eager_attentions, max_prob_error
from interp.hooks import Recorder, capture
from interp.kernels import call_attention


def _pair(alias: str):
    return interp.load_model(alias), interp.load_model(alias, attn_implementation="eager")


def _batch(model, texts):
    tok = model.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    tok.padding_side = "left"
    return tok(texts, return_tensors="pt", padding=True)


TEXTS = ["Once upon a time, there was a little girl named Lily. She loved to play", "The dog ran."]


def test_stories260k_generates_its_reference_story():
    model = interp.load_model("stories260k")
    ids = model.tokenizer("Once upon a time", return_tensors="pt")
    out = model.hf.generate(**ids, max_new_tokens=30, do_sample=False)
    text = model.tokenizer.decode(out[0], skip_special_tokens=True)
    assert text.startswith("Once upon a time, there was a little girl named Lily. She loved to play outside in the park.")


@pytest.mark.parametrize("alias", ["stories260k", pytest.param("smollm2-135m", marks=pytest.mark.slow), "minilm-l6"])
def test_captured_attention_equals_eager_on_real_weights(alias):
    fast, eager = _pair(alias)
    assert fast.config._attn_implementation == "sdpa"
    inputs = _batch(fast, TEXTS if alias != "minilm-l6" else ["A man is playing a guitar.", "Hi there"])
    with torch.no_grad():
        plain = fast.hf(**inputs)
    rec, out = captured(fast, inputs, keep=("q", "k", "v", "z"))
    key = "logits" if hasattr(plain, "logits") else "last_hidden_state"
    assert torch.equal(plain[key], out[key]), "capture changed the model's outputs"
    assert fast.config._attn_implementation == "sdpa"
    assert len(rec.calls) == fast.n_layers()
    reference = eager_attentions(eager, inputs)
    assert max_prob_error(rec, reference, inputs["attention_mask"].bool()) < 1e-5


def test_decode_steps_see_all_cached_keys_and_match_eager():
    fast, eager = _pair("stories260k")
    inputs = _batch(fast, TEXTS)
    rec = Recorder()
    with torch.no_grad(), capture(fast, rec, layers=[0, 2, 4]):
        generated = fast.hf.generate(**inputs, max_new_tokens=4, do_sample=False)
    n_prompt = inputs["input_ids"].shape[1]
    assert {c.step for c in rec.calls} == {0, 1, 2, 3}
    full_mask = torch.cat([inputs["attention_mask"], torch.ones(2, 4, dtype=torch.long)], 1)
    reference = eager_attentions(eager, {"input_ids": generated, "attention_mask": full_mask})
    for step in (1, 2, 3):
        for call in (c for c in rec.calls if c.step == step):
            assert call.q.shape[2] == 1 and call.k.shape[2] == n_prompt + step
            p = call_attention(call)
            ref = reference[call.layer][:, :, n_prompt + step - 1 : n_prompt + step, : n_prompt + step]
            assert (p - ref).abs().max() < 1e-5


def test_minilm_cls_and_sep_layout():
    model = interp.load_model("minilm-l6")
    inputs = model.tokenizer(["A man is playing a guitar."], return_tensors="pt")
    layout = interp.token_layout(model, inputs)
    assert layout.spans("cls") == [(0, 1)]
    n = inputs["input_ids"].shape[1]
    assert layout.spans("sep") == [(n - 1, n)]


@pytest.mark.parametrize("alias", ["stories260k", pytest.param("smollm2-135m", marks=pytest.mark.slow)])
def test_kernel_statistics_from_captured_qk_equal_eager(alias):
    """A probe computes the statistics inside each layer; they equal those of the eager attention matrix."""
    from interp.kernels import call_stats

    fast, eager = _pair(alias)
    inputs = _batch(fast, TEXTS)
    layout = interp.token_layout(fast, inputs)
    stats = {}

    def probe(call):
        stats[call.layer] = call_stats(call, segments=layout.segments, n_segments=len(layout.names), topk=2,
                                       stats=("lse", "segment_mass", "argmax", "max_prob", "entropy",
                                              "mean_distance", "key_mass", "key_count"))

    with torch.no_grad(), capture(fast, probe):
        fast.hf(**inputs)
    reference = eager_attentions(eager, inputs)
    rows = inputs["attention_mask"].bool()[:, None, :].expand(-1, fast.head_counts()[0], -1)
    onehot = torch.nn.functional.one_hot(layout.segments, len(layout.names)).float()
    positions = torch.arange(rows.shape[-1]).float()
    for layer, st in stats.items():
        p = reference[layer].float()
        p = p * inputs["attention_mask"].bool()[:, None, :, None]  # padded query rows are not looked at
        assert torch.allclose(st.segment_mass[rows], torch.einsum("bhqk,bks->bhqs", p, onehot)[rows], atol=1e-5)
        assert torch.allclose(st.max_prob[rows], p.max(-1).values[rows], atol=1e-5)
        assert torch.equal(st.argmax[rows], p.argmax(-1)[rows])
        ent = -(p * torch.log(p.clamp_min(1e-38))).sum(-1)
        assert torch.allclose(st.entropy[rows], ent[rows], atol=1e-4)
        dist = (p * (positions[:, None] - positions).abs()).sum(-1)
        assert torch.allclose(st.mean_distance[rows], dist[rows], atol=1e-3)
        assert torch.allclose(st.key_mass, p.sum(-2), atol=1e-4)
        assert torch.allclose(st.topk_prob[rows], p.topk(2, -1).values[rows], atol=1e-5)
