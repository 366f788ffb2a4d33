"""Retrieval heads: the NIAH harness, the fast path against the reference code's literal procedure, a planted
model whose copying heads are known, the masking test, and head knock-outs against weight edits."""

import json
import random

import pytest
import torch

import interp
import planted
from interp.analyses import NotApplicableError, get_analysis
from interp.analyses.base import Options
from interp.analyses.niah import Needle, build_prompt, file_sentences, filler_sentences, find_span, locate_answer, rouge1_recall
from interp.analyses.retrieval import copy_scores, niah_inputs, paper_scores
from interp.cli import main
from interp.hooks import mask_heads
from interp.progress import QUIET

RETRIEVAL = get_analysis("retrieval")


def test_rouge1_recall_and_span_search():
    assert rouge1_recall("eat a sandwich", "You should eat a sandwich.") == 1.0
    assert rouge1_recall("eat a sandwich and sit", "Eat, sit!") == pytest.approx(2 / 5)
    assert rouge1_recall("a a b", "a b") == pytest.approx(2 / 3)  # counts are clipped
    ids = torch.tensor([5, 6, 7, 8, 9, 7, 8])
    assert find_span(ids, [7, 8]) == (2, 4)
    assert find_span(ids, [1, 2]) is None


def test_prompt_length_depth_and_sentence_break():
    tok = interp.load_model("smollm2-135m").tokenizer
    needle = Needle("The magic number is 4217.", "What is the magic number?", "4217")
    for depth in (0, 50, 100):
        prompt = build_prompt(tok, needle, 600, depth, filler_sentences(0), "{context}\nQ: {question}")
        n = len(tok(prompt)["input_ids"])
        assert 560 <= n <= 600, n
        before, after = prompt.split(needle.needle)
        assert before == "" if depth == 0 else before.endswith(". ")
        if depth == 100:
            assert after.startswith("\nQ:")
        else:
            assert after.startswith(" ") and after[1].isupper()
        frac = len(tok(before)["input_ids"]) / n
        assert abs(frac - depth / 100) < 0.1, (depth, frac)
    again = build_prompt(tok, needle, 600, 50, filler_sentences(0), "{context}\nQ: {question}")
    assert again == build_prompt(tok, needle, 600, 50, filler_sentences(0), "{context}\nQ: {question}")


def test_bad_haystack_needles_and_lengths(tmp_path):
    tok = interp.load_model("smollm2-135m").tokenizer
    short = tmp_path / "short.txt"
    short.write_text("Only one sentence here. And another.")
    with pytest.raises(ValueError, match="the haystack has only"):
        build_prompt(tok, Needle("N is 5.", "What is N?", "5"), 500, 50, file_sentences(short), None)
    with pytest.raises(ValueError, match="cannot hold the template"):
        build_prompt(tok, Needle("N is 5.", "What is N?", "5"), 20, 50, filler_sentences(0), None)
    bad = tmp_path / "needles.jsonl"
    bad.write_text(json.dumps({"needle": "The sky is green.", "question": "Colour?", "answer": "blue"}) + "\n")
    with pytest.raises(ValueError, match="is not part of the needle"):
        RETRIEVAL.plan(interp.load_model("stories260k"), Options(), RETRIEVAL.resolve({"needles": str(bad)}))
    with pytest.raises(ValueError, match="cannot be found in the prompt"):
        locate_answer(tok, torch.tensor(tok("a b c d e f")["input_ids"]), "Zanzibar quartz")
    stories = interp.load_model("stories260k")
    with pytest.raises(ValueError, match="longer than stories260k's context of 512"):
        RETRIEVAL.plan(stories, Options(), RETRIEVAL.resolve({"lengths": [500]}))
    with pytest.raises(NotApplicableError, match="llm/lvlm families"):
        interp.score(interp.load_model("minilm-l6"), "retrieval")
    with pytest.raises(ValueError, match="score_rule"):
        interp.score(stories, "retrieval", score_rule="best")


def test_copy_scores_rules():
    prompt = torch.tensor([1, 2, 3, 4, 3, 9])
    span = (1, 5)  # tokens 2, 3, 4, 3
    generated = torch.tensor([3, 4, 3])
    argmax = torch.tensor([[[2, 4, 0]], [[3, 3, 3]], [[2, 5, 4]]])  # (T=3, L=1, H=3)
    score, copies = copy_scores(argmax, generated, prompt, span, "code")
    # head 0 copies at positions 2, 3, 2; head 1 at 4, 3 (position 5 is outside); head 2 at 3, 4 (0 is outside)
    assert copies.tolist() == [[3, 2, 2]] and torch.allclose(score, torch.tensor([[0.75, 0.5, 0.5]], dtype=torch.float64))
    score, _ = copy_scores(argmax, generated, prompt, span, "paper")  # distinct positions: head 0 copied {2, 3}
    assert torch.allclose(score, torch.tensor([[0.5, 0.5, 0.5]], dtype=torch.float64))
    assert copy_scores(argmax, torch.tensor([9, 9, 9]), prompt, span)[1].sum() == 0  # no token match, no copy


def _reference_check(model, eager, entries, params):
    """The fast path's per-head scores equal the reference procedure's on the same samples."""
    nonzero = 0
    for entry in entries:
        rows = RETRIEVAL.score_sample(model, entry, Options(), params, QUIET)
        inputs, span = niah_inputs(model, entry, params, 0)
        ref, generated = paper_scores(eager, inputs, span, params["max_new_tokens"])
        fast = torch.tensor(rows.pivot(index="layer", columns="head", values="score").to_numpy())
        copies = torch.tensor(rows.pivot(index="layer", columns="head", values="copies").to_numpy())
        assert rows["response"].iloc[0] == model.tokenizer.decode(generated, skip_special_tokens=True)
        assert torch.equal(copies, torch.round(ref * (span[1] - span[0])).long())
        assert torch.allclose(fast, ref, rtol=0, atol=1e-12)
        nonzero += int((ref > 0).sum())
    assert nonzero > 0, "no head copied anything: the comparison would be vacuous"


def test_fast_path_equals_reference_code_stories260k():
    model = interp.load_model("stories260k")
    eager = interp.load_model("stories260k", attn_implementation="eager")
    params = RETRIEVAL.resolve({"lengths": [200], "depths": [50], "template": "{context} {question}"})
    [entry] = RETRIEVAL.plan(model, Options(samples=1), params)
    entry.update(needle="The king of the frogs was named Bob the Big.", question="The king of the frogs was named",
                 answer="Bob the Big")
    _reference_check(model, eager, [entry], params)


@pytest.mark.slow
def test_fast_path_equals_reference_code_smollm2():
    model = interp.load_model("smollm2-135m")
    eager = interp.load_model("smollm2-135m", attn_implementation="eager")
    params = RETRIEVAL.resolve({"lengths": [300], "depths": [0, 50], "n_needles": 1, "max_new_tokens": 30})
    _reference_check(model, eager, RETRIEVAL.plan(model, Options(), params), params)


@pytest.fixture(scope="module")
def organism(tmp_path_factory):
    """The planted model, a haystack of its filler words, and its needle."""
    root = tmp_path_factory.mktemp("planted")
    rng = random.Random(0)
    words = planted.FILLER
    (root / "hay.txt").write_text(" ".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 8))) + " ."
                                           for _ in range(300)))
    (root / "needles.jsonl").write_text(json.dumps({"needle": "the secret code is alpha bravo charlie delta .",
                                                    "question": "the secret code is",
                                                    "answer": "alpha bravo charlie delta"}) + "\n")
    params = {"haystack": str(root / "hay.txt"), "needles": str(root / "needles.jsonl"),
              "template": "{context} {question}", "max_new_tokens": 8}
    return planted.model(), root, params


def test_planted_copying_heads_rank_first_and_masking_them_breaks_retrieval(organism):
    model, _, params = organism
    result = interp.score(model, "retrieval", lengths=[120, 400], depths=[0, 50, 100], mask_k=[2], **params)
    top = result.top(k=3)
    assert sorted(zip(top["layer"][:2], top["head"][:2])) == planted.COPY_HEADS
    assert (top["retrieval_score"][:2] == 1.0).all()
    others = result.heads[~result.heads[["layer", "head"]].apply(tuple, axis=1).isin(planted.COPY_HEADS)]
    assert (others["retrieval_score"] == 0).all()  # the decoy looks into the needle but never copies
    per_sample = result.samples.drop_duplicates("sample")
    assert per_sample["accepted"].all() and len(per_sample) == 6
    masking = result.tables["masking"].set_index("condition")
    assert masking.loc["none", "niah_score"] == 100 and (masking.loc["random", "niah_score"] == 100).all()
    assert list(masking.loc["random", "draw"]) == [0, 1, 2] and masking.loc["random", "heads"].nunique() == 3
    assert any("random-2 100.0 ± 0.0 over 3 draws (100.0–100.0)" in line for line in result.meta["report"])
    assert masking.loc["top", "niah_score"] < 30 and masking.loc["top", "heads"] == "1-1,1-3"
    zero = interp.score(model, "retrieval", lengths=[200], depths=[50], mask_k=[2], mask_mode="zero", **params)
    assert zero.tables["masking"].set_index("condition").loc["top", "accuracy"] == 0
    paper = interp.score(model, "retrieval", lengths=[200], depths=[50], mask_k=[0], score_rule="paper", **params)
    assert sorted(zip(*[paper.top(k=2)[c] for c in ("layer", "head")])) == planted.COPY_HEADS
    assert paper.tables == {}


def test_planted_fast_path_equals_reference(organism):
    model, _, params = organism
    hf = planted.model().hf
    hf.set_attn_implementation("eager")
    eager = interp.load_model(hf, tokenizer=model.tokenizer)
    p = RETRIEVAL.resolve({**params, "lengths": [150, 300], "depths": [25, 75]})
    _reference_check(model, eager, RETRIEVAL.plan(model, Options(), p), p)


def test_retrieval_from_the_command_line(organism, tmp_path, capsys):
    model, root, params = organism
    model.hf.save_pretrained(root / "model")
    model.tokenizer.save_pretrained(root / "model")
    code = main(["score", str(root / "model"), "--analysis", "retrieval", "--lengths", "150", "--depths", "0,100",
                 "--haystack", params["haystack"], "--needles", params["needles"], "--template", params["template"],
                 "--max-new-tokens", "8", "--mask-k", "2", "--out", str(tmp_path), "--top", "2", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    [run] = json.loads(out)["runs"]
    assert [(r["layer"], r["head"]) for r in run["top"]["retrieval_score"]] == planted.COPY_HEADS
    assert any("retrieval heads (score > 0.1): 2 of 8" in line for line in run["report"])
    assert [r["condition"] for r in run["tables"]["masking"]] == ["none", "top", "random", "random", "random"]
    stored = interp.open_run(run["id"], store=tmp_path)
    assert set(stored.tables) == {"masking"} and stored.samples["response"].str.startswith("alpha bravo").all()


@pytest.mark.parametrize("mode", ["uniform", "zero"])
def test_knockouts_equal_weight_edits(mode):
    """Masking a head equals editing its weights: zeroed query rows (uniform) or zeroed o_proj columns (zero)."""
    model = interp.load_model("stories260k")
    edited = interp.load_model("stories260k")
    heads = [(1, 2), (3, 6), (4, 0)]
    d = model.config.head_dim
    with torch.no_grad():
        for layer, head in heads:
            attn = edited.hf.model.layers[layer].self_attn
            if mode == "uniform":
                attn.q_proj.weight[head * d:(head + 1) * d] = 0
            else:
                attn.o_proj.weight[:, head * d:(head + 1) * d] = 0
    inputs = model.prepare("Once upon a time, there was a little girl named Lily. She loved to play")
    with torch.no_grad():
        plain = model.hf(**inputs).logits
        with mask_heads(model, heads, mode=mode):
            masked = model.hf(**inputs).logits
            generated = model.hf.generate(**inputs, max_new_tokens=10, do_sample=False)
        want = edited.hf(**inputs).logits
        assert torch.equal(generated, edited.hf.generate(**inputs, max_new_tokens=10, do_sample=False))
    assert torch.allclose(masked, want, atol=1e-5) and not torch.allclose(plain, masked, atol=1e-3)
    with torch.no_grad():
        assert torch.equal(model.hf(**inputs).logits, plain)  # nothing left behind
    with pytest.raises(ValueError, match="out of range"):
        with mask_heads(model, [(9, 0)]):
            pass
    with pytest.raises(ValueError, match="unknown knockout mode"):
        with mask_heads(model, heads, mode="half"):
            pass
    with pytest.raises(ValueError, match="needs means="):
        with mask_heads(model, heads, mode="mean"):
            pass


@pytest.mark.parametrize("backend", ["nnsight", "transformer-lens"])
def test_backends_give_the_same_retrieval_scores(organism, backend):
    model, _, params = organism
    p = RETRIEVAL.resolve({**params, "lengths": [150], "depths": [50]})
    [entry] = RETRIEVAL.plan(model, Options(), p)
    want = RETRIEVAL.score_sample(model, entry, Options(), p, QUIET)
    got = RETRIEVAL.score_sample(model, entry, Options(backend=backend), p, QUIET)
    assert want["score"].sum() == 2.0  # the two copying heads, each 1.0
    # after the answer the planted model faces exact ties ("." occurs everywhere): the bridge's eager arithmetic
    # may break them differently from SDPA, so only the answer must agree
    assert got["response"].iloc[0].startswith("alpha bravo charlie delta") and (got["score"] == want["score"]).all()


def test_responses_keep_no_trailing_newline():
    """Decoding stops after a newline; the recorded response is the answer without it."""
    result = interp.score("stories260k", "retrieval", lengths=[200], depths=[0, 100], n_needles=1, mask_k=[0])
    responses = result.samples.drop_duplicates("sample")["response"]
    assert len(responses) == 2 and responses.str.len().gt(0).all()
    assert not responses.str.endswith(("\n", " ")).any(), responses.tolist()


def test_masking_in_decode_steps_only_leaves_the_prompt_forward_alone():
    """The reference code masks heads only while decoding: with decode_only the prompt's logits (and cache) are the
    unmasked model's and the first decode step differs; without it the prompt's logits change too."""
    model = interp.load_model("stories260k")
    heads = [(layer, h) for layer in range(5) for h in range(8)]
    ids = model.prepare("Once upon a time there was a little girl")
    with torch.no_grad():
        plain = model.hf(**ids, use_cache=True)
        step = {"input_ids": plain.logits[:, -1:].argmax(-1), "past_key_values": plain.past_key_values}
        plain_next = model.hf(**step).logits
        with mask_heads(model, heads, decode_only=True):
            prompt = model.hf(**ids, use_cache=True)
            masked_next = model.hf(input_ids=step["input_ids"], past_key_values=prompt.past_key_values).logits
        with mask_heads(model, heads):
            both = model.hf(**ids).logits
    assert torch.equal(prompt.logits, plain.logits)
    assert not torch.allclose(masked_next, plain_next, atol=1e-3)
    assert not torch.allclose(both, plain.logits, atol=1e-3)


def test_masking_follows_the_reference_codes_timing(monkeypatch):
    """The masking test's default is the reference code's timing (`needle_in_haystack_with_mask.py`): the prompt
    minus its last token runs unmasked, then every step from the prompt's last token on runs with the masked heads'
    queries zeroed after RoPE. Re-implemented here the reference's way — its modified attention zeroes the query
    inside the model's own forward (here: `apply_rotary_pos_emb` of the modeling file, wrapped) — the answers are the
    same token for token and the first answer token's logits agree; masking only the answer steps (the earlier
    default) leaves that first step unmasked and differs."""
    from transformers.models.llama import modeling_llama

    from interp.analyses.retrieval import masked_answer

    model = interp.load_model("stories260k")
    heads = [(0, 3), (1, 0), (2, 5), (3, 1), (4, 6), (4, 2)]
    masked_layers = {layer: [h for ly, h in heads if ly == layer] for layer, _ in heads}
    state = {"on": False, "layer": None}
    hooks = [attn.register_forward_pre_hook(lambda module, args, i=i: state.update(layer=i))
             for i, attn in enumerate(model.attention_modules())]
    rope = modeling_llama.apply_rotary_pos_emb

    def masked_rope(q, k, *args, **kwargs):
        q, k = rope(q, k, *args, **kwargs)
        if state["on"] and state["layer"] in masked_layers:
            q = q.clone()
            q[:, masked_layers[state["layer"]]] = 0.0
        return q, k

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", masked_rope)

    def reference(ids, n_new):
        """Greedy answer and first-step logits, the reference's way."""
        with torch.no_grad():
            state["on"] = False
            cache = model.hf(input_ids=ids[:, :-1], use_cache=True).past_key_values
            state["on"] = True
            token, out, first = ids[:, -1:], [], None
            for _ in range(n_new):
                step = model.hf(input_ids=token, cache=cache, use_cache=True)
                cache, first = step.past_key_values, step.logits[0, -1] if first is None else first
                token = step.logits[:, -1:].argmax(-1)
                out.append(int(token))
            state["on"] = False
        return out, first

    differs = 0
    for text in ["Once upon a time there was a little girl named Lily. She",
                 "The dog ran to the park and saw a big red ball. He", "Tom and Sue went to the sea. They"]:
        inputs = model.prepare(text)
        ours = masked_answer(model, inputs, heads, "uniform", 12).tolist()
        ref, ref_first = reference(inputs["input_ids"], 12)
        assert ours and ours == ref[:len(ours)], (text, ours, ref)
        ids = inputs["input_ids"]
        with torch.no_grad(), mask_heads(model, heads, decode_only=True):
            cache = model.hf(input_ids=ids[:, :-1], use_cache=True).past_key_values
            first = model.hf(input_ids=ids[:, -1:], cache=cache).logits[0, -1]
            late = model.hf(input_ids=ids).logits[0, -1]  # the whole prompt's forward unmasked: the earlier timing
        torch.testing.assert_close(first, ref_first, atol=1e-4, rtol=1e-4)
        differs += not torch.allclose(late, ref_first, atol=1e-3)
        late_answer = masked_answer(model, inputs, heads, "uniform", 12, start="answer").tolist()
        differs += late_answer != ref[:len(late_answer)]
    for hook in hooks:
        hook.remove()
    assert differs, "the earlier timing would pass this test too"
