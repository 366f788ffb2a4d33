"""Adapters discovered from the model itself.

Every decoder type of the installed transformers (its causal-LM auto mapping: discovered, not listed here) is built
from a tiny random config, captured with its fast attention, and the probabilities rebuilt from the captured q/k
are checked against the model's own eager attention in a forward and in decode steps (see `auto_check`)."""

import json
import sys

import numpy as np
import pytest
import torch

import interp
from auto_check import check_against_eager, outcome
from auto_tiny import DEEP, TinyUnbuildable, decoder_types, tiny, word_tokenizer
from interp.families import table_for
from interp.hooks import Recorder, capture
from interp.kernels import AttentionGeometry, call_attention, call_stats, dense_scores
from tiny_models import BUILDERS, make

_OUTCOMES: dict[str, tuple[str, str]] = {}


def _outcome(model_type: str) -> tuple[str, str]:
    if model_type not in _OUTCOMES:
        _OUTCOMES[model_type] = outcome(model_type)
    return _OUTCOMES[model_type]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", decoder_types())
def test_decoder_type_matches_its_eager_attention(model_type):
    status, detail = _outcome(model_type)
    if status == "unbuildable":
        pytest.skip(f"{model_type}: {detail}")
    assert status in ("pass", "refused"), f"{model_type}: {status}: {detail}"
    if status == "refused":  # a clear error naming the model type and what is not supported
        assert model_type in detail or "ForCausalLM" in detail or "LMHead" in detail, detail


@pytest.mark.slow
def test_at_least_95_percent_of_buildable_attention_types_pass():
    types = decoder_types()
    results = {t: _outcome(t) for t in types}
    buildable = [t for t, (s, _) in results.items() if s != "unbuildable"]
    outside = [t for t in buildable if "attention interface" in results[t][1]]
    passed = [t for t in buildable if results[t][0] == "pass"]
    through_interface = len(buildable) - len(outside)
    print(f"\n{len(types)} decoder types: {len(buildable)} buildable, {len(outside)} of them without attention through "
          f"the interface; {len(passed)} pass ({len(passed) / through_interface:.1%} of {through_interface})")
    assert len(passed) >= 0.95 * through_interface, {t: results[t] for t in buildable if t not in passed}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_discovery_agrees_with_the_hand_tables(name):
    """Where a table exists it wins; discovery finds the same attention modules, causality and kind."""
    hf, _ = make(name, "sdpa")
    table, found = table_for(hf.config), interp.discover(hf)
    loaded = interp.load_model(hf).family
    if not table.towers:  # a table of what cannot be discovered (the image layout) on top of discovered towers
        assert (loaded.towers, loaded.kind, loaded.image_layout) == (found.towers, found.kind, table.image_layout)
        return
    assert loaded is table
    for tower in found.towers:
        assert tower.name in [t.name for t in table.towers]
        ours = interp.Model(hf, found, name).attention_modules(tower.name)
        theirs = interp.Model(hf, table, name).attention_modules(tower.name)
        assert [id(m) for m in ours] == [id(m) for m in theirs]
        assert tower.causal == table.tower(tower.name).causal
    assert found.kind == table.kind


def _captured(model_type: str, **capture_kwargs):
    """(interp.Model of a tiny `model_type`, its captured calls on a 6-token prompt)."""
    hf, _ = tiny(model_type)
    model = interp.load_model(hf)
    rec = Recorder()
    with torch.no_grad(), capture(model, rec, keep=("q", "k", "v", "z"), **capture_kwargs):
        model.hf(input_ids=torch.arange(3, 9)[None])
    return model, rec.calls


@pytest.mark.parametrize("model_type", ["qwen3", "olmo2"])
def test_qk_norm_is_captured_after_the_norm_and_rope(model_type):
    hf, _ = tiny(model_type)
    assert hasattr(hf.model.layers[0].self_attn, "q_norm")
    assert check_against_eager(hf)["max_diff"] < 1e-5


@pytest.mark.parametrize("model_type, depth, attention_layers",
                         [("qwen3_next", 2, [1]), ("nemotron_h", 2, [2]), ("zamba2", 2, [1]), ("jamba", DEEP, [4])])
def test_hybrid_stacks_keep_the_models_layer_indices(model_type, depth, attention_layers):
    """Layers without softmax attention (linear attention, Mamba) are absent; the others keep their own index."""
    hf, config = tiny(model_type, layers=depth)
    model = interp.load_model(hf)
    assert model.layers() == attention_layers and model.n_layers() == config.num_hidden_layers
    assert model.family.primary.hybrid
    with pytest.raises(ValueError, match="have no softmax attention .* attention layers are"):
        with capture(model, Recorder(), layers=[0]):
            pass
    result = check_against_eager(hf)
    assert result["layers"] == attention_layers and result["max_diff"] < 1e-5


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_mixture_of_experts_blocks(model_type):
    hf, _ = tiny(model_type)
    assert check_against_eager(hf)["max_diff"] < 1e-5


def test_learned_sinks_are_captured_and_counted():
    model, calls = _captured("gpt_oss")
    module = model.attention_modules()[0]
    call = calls[0]
    assert torch.equal(call.sinks, module.sinks.detach().float())
    p = call_attention(call)
    assert bool((p.sum(-1) < 1 - 1e-4).all()), "each row gives the sink a share"
    v = call.v.repeat_interleave(call.n_heads // call.v.shape[1], dim=1)
    assert torch.allclose(p @ v, call.z.transpose(1, 2), atol=1e-5)  # the model's own head outputs
    stats = call_stats(call, stats=("lse", "max_prob"))
    full = torch.cat([dense_scores(call.q, call.k, geometry=AttentionGeometry(scale=call.scale, window=call.window)), call.sinks[None, :, None, None].expand(
        *p.shape[:3], 1)], -1)
    assert torch.allclose(stats.lse, torch.logsumexp(full, -1), atol=1e-5)


def test_multi_head_latent_attention_has_other_value_dims():
    model, calls = _captured("deepseek_v3")
    assert calls[0].q.shape[-1] == calls[0].k.shape[-1] != calls[0].v.shape[-1]
    hf, _ = tiny("deepseek_v3")
    assert check_against_eager(hf)["max_diff"] < 1e-5


def test_chunked_attention_is_read_from_the_mask():
    """Llama 4's chunked layers (a query sees its own chunk of 5) over 9 keys: the chunks come from the model's mask,
    and the captured probabilities equal its eager ones on every layer and decode step."""
    hf, _ = tiny("llama4_text")
    assert hf.config.attention_chunk_size == 5 and "chunked_attention" in hf.config.layer_types
    assert check_against_eager(hf)["max_diff"] < 1e-5


def test_attention_outside_the_interface_is_a_clear_error():
    hf, _ = tiny("mamba")
    with pytest.raises(interp.UnsupportedFamilyError, match="'mamba'.*none of its modules calls transformers' "
                                                              "attention interface"):
        interp.load_model(hf)


def test_logit_biases_and_masks_it_cannot_reproduce_are_refused():
    with pytest.raises(ValueError, match="inkling_text.*adds 'position_bias'"):
        _captured("inkling_text")
    with pytest.raises(ValueError, match="deepseek_v4.*text layer 1: its mask shows query .* several separate runs"):
        _captured("deepseek_v4")


ANALYSES = {"summary": dict(samples=2, max_tokens=32), "sinks": dict(samples=2, max_tokens=32),
            "taxonomy": dict(samples=2, half=8), "retrieval": dict(lengths=[120], depths=[0, 100], n_needles=1),
            "circuits": dict(methods="patching,eap")}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["qwen3", "gpt_oss", "qwen3_next", "deepseek_v3"])
def test_analyses_run_end_to_end_on_discovered_families(model_type, tmp_path):
    """QK-norm, learned sinks, a hybrid stack and latent attention: every decoder analysis runs from text, and each
    table holds every head of every attention layer (the hybrid's own layer indices), with finite scores."""
    try:
        hf, _ = tiny(model_type, attn="sdpa")
    except TinyUnbuildable:  # GPT-OSS has no SDPA path in transformers
        hf, _ = tiny(model_type, attn="eager")
    hf.config.bos_token_id, hf.config.eos_token_id = 1, 2
    model = interp.load_model(hf, tokenizer=word_tokenizer())
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"clean": f"when {a} and {b} went to the store {b} gave a drink to",
                                        "corrupt": f"when {a} and {b} went to the store {a} gave a drink to",
                                        "correct": f" {a}", "foil": f" {b}"}) + "\n"
                            for a, b in [("Mary", "John"), ("John", "Mary")]))
    n_heads, _ = model.head_counts()
    for analysis, params in ANALYSES.items():
        if analysis == "circuits":
            params = dict(params, tasks=str(task))
        result = interp.score(model, analysis, **params)
        heads = result.heads
        assert sorted(set(zip(heads["layer"], heads["head"]))) == [(lay, h) for lay in model.layers()
                                                                   for h in range(n_heads)], analysis
        scores = heads.drop(columns=["layer", "head", "kv_head"]).select_dtypes("number")
        if analysis == "retrieval":  # a random model retrieves nothing: no sample is accepted, scores are NaN
            assert set(result.samples["sample"]) == {0, 1} and not result.samples["accepted"].any()
            continue
        assert len(scores.columns) and bool(np.isfinite(scores.to_numpy()).all()), analysis


def test_the_mask_check_works_in_blocks_of_query_rows(monkeypatch):
    """Checked a few query rows at a time: a padded eager batch of a model whose mask is causal still passes, and
    DeepSeek-V4's extra keys are still found."""
    monkeypatch.setattr(sys.modules["interp.hooks.capture"], "MASK_CHECK_ROWS", 3)
    hf, inputs = make("llama", "eager")
    model = interp.load_model(hf)
    with torch.no_grad(), capture(model, Recorder()):
        model.hf(**inputs)  # left padding in the second row: padding queries are not compared
    with pytest.raises(ValueError, match="deepseek_v4.*several separate runs of keys"):
        _captured("deepseek_v4")
