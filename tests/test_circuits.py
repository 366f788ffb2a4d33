"""Circuits: patching primitives against independent hand-made hooks, a planted circuit, the tasks, and SmolLM2."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch

import interp
from interp.analyses.circuits import logit_diff
from interp.analyses.tasks import encode, ioi_prompts, colored_objects_prompts, jsonl_prompts, task_prompts
from interp.hooks import activation_patch, cache_run, capture_residual, edge_attribution, patch_heads, path_patch

import planted_circuit as planted
import tiny_models


@contextmanager
def o_proj_patched(model, replace: dict, at=slice(None)):
    """Hand-made patching, independent of the attention wrapper: pre-hooks on the layers' o_proj replacing the
    slices of chosen heads at positions `at`. replace: {(layer, head): (B, N, d)}."""
    handles = []
    d = model.config.head_dim
    for layer, module in enumerate(model.attention_modules()):
        mine = {h: v for (lay, h), v in replace.items() if lay == layer}
        if not mine:
            continue

        def hook(mod, args, mine=mine):
            x = args[0].clone()
            for h, v in mine.items():
                x[:, at, h * d:(h + 1) * d] = v[:, at]
            return (x,)
        handles.append(module.o_proj.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            yield
    finally:
        for h in handles:
            h.remove()


@pytest.fixture(scope="module")
def tiny():
    """A random tiny Llama with GQA (4 query / 2 KV heads) in float64, with two prompt batches of equal length."""
    hf = tiny_models.make("llama")[0].to(torch.float64)
    model = interp.load_model(hf)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(3, hf.config.vocab_size, (3, 9), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = torch.randint(3, hf.config.vocab_size, (3,), generator=g)
    corrupt[:, 5] = torch.randint(3, hf.config.vocab_size, (3,), generator=g)
    as_inputs = lambda ids: {"input_ids": ids, "attention_mask": torch.ones_like(ids)}  # noqa: E731
    return model, as_inputs(clean), as_inputs(corrupt)


def _heads(model):
    n_heads, _ = model.head_counts()
    return [(layer, h) for layer in range(model.n_layers()) for h in range(n_heads)]


def test_patch_heads_equals_a_hand_made_o_proj_hook(tiny):
    model, clean, corrupt = tiny
    cc = cache_run(model, corrupt)
    chosen = [(0, 1), (1, 3)]
    values = {h: cc.z[h[0]][:, :, h[1]] for h in chosen}
    with torch.no_grad(), patch_heads(model, values):
        ours = model.hf(**clean).logits
    with o_proj_patched(model, values):
        theirs = model.hf(**clean).logits
    torch.testing.assert_close(ours, theirs)
    with torch.no_grad():
        assert not torch.allclose(ours, model.hf(**clean).logits)
    # at one position only
    with torch.no_grad(), patch_heads(model, values, positions=[5]):
        ours = model.hf(**clean).logits
    with o_proj_patched(model, values, at=[5]):
        theirs = model.hf(**clean).logits
    torch.testing.assert_close(ours, theirs)


def test_activation_patch_batches_variants_like_one_forward_each(tiny):
    """Variants side by side in one forward (heads of different layers, whole or one position) give what one hand-made
    forward per variant gives: downstream heads are recomputed in every copy."""
    model, clean, corrupt = tiny
    cc = cache_run(model, corrupt)
    correct, foil = torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10])
    metric = lambda last: logit_diff(last, correct.repeat(last.shape[0] // 3), foil.repeat(last.shape[0] // 3))  # noqa: E731
    clean_z = cache_run(model, clean).z
    variants = [(0, 0, None), (1, 2, None), (0, 3, 5), (-1, 1, 2)]
    ours = activation_patch(model, clean, cc, variants, metric, max_tokens=2 * 27)  # two variants per forward
    for row, (layer, h, pos) in zip(ours, variants):
        layer %= model.n_layers()
        v = cc.z[layer][:, :, h].clone()
        if pos is not None:
            v = clean_z[layer][:, :, h].clone()
            v[:, pos] = cc.z[layer][:, pos, h]
        with o_proj_patched(model, {(layer, h): v}):
            torch.testing.assert_close(row, metric(model.hf(**clean).logits[:, -1]))


def test_path_patching_with_no_senders_is_the_clean_run(tiny):
    model, clean, corrupt = tiny
    cc, cr = cache_run(model, clean, qkv=True, mlps=True), cache_run(model, corrupt)
    torch.testing.assert_close(path_patch(model, clean, [], clean_cache=cc, corrupt_cache=cr), cc.logits)
    torch.testing.assert_close(path_patch(model, clean, [], [(1, 0, "qkv")], clean_cache=cc, corrupt_cache=cr),
                               cc.logits)
    torch.testing.assert_close(path_patch(model, clean, [], freeze_mlps=True, clean_cache=cc, corrupt_cache=cr),
                               cc.logits)


def test_path_patching_with_all_senders_is_the_corrupt_runs_direct_effect(tiny):
    """All heads as senders, MLPs frozen: the clean final residual stream plus every head's change through its
    output projection, then the final norm and the unembedding (computed by hand). MLPs recomputed: every head's
    output replaced by the corrupted one (a hand-made o_proj hook)."""
    model, clean, corrupt = tiny
    cc, cr = cache_run(model, clean, qkv=True, mlps=True), cache_run(model, corrupt)
    senders = _heads(model)
    last = {}
    with torch.no_grad(), capture_residual(model, lambda i, h: last.__setitem__(i, h), layers=[-1]):
        model.hf(**clean)
    resid = last[model.n_layers() - 1]
    for layer, module in enumerate(model.attention_modules()):
        b, n, h, d = cc.z[layer].shape
        delta = (cr.z[layer] - cc.z[layer]).reshape(b, n, h * d)
        resid = resid + module.o_proj(delta)
    by_hand = model.hf.lm_head(model.hf.model.norm(resid))
    ours = path_patch(model, clean, senders, freeze_mlps=True, clean_cache=cc, corrupt_cache=cr)
    torch.testing.assert_close(ours, by_hand)

    with o_proj_patched(model, {(layer, h): cr.z[layer][:, :, h] for layer, h in senders}):
        theirs = model.hf(**clean).logits
    torch.testing.assert_close(path_patch(model, clean, senders, clean_cache=cc, corrupt_cache=cr), theirs)


def test_edge_attribution_is_the_directional_derivative(tiny):
    """EAP of a head = d/dε metric(z_clean + ε Δz) at 0, checked by central finite differences (float64; Llama's
    RMSNorm computes in float32, so ε is not tiny and the O(ε²) error is what the tolerance allows)."""
    model, clean, corrupt = tiny
    cc, cr = cache_run(model, clean), cache_run(model, corrupt)
    correct, foil = torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10])
    metric = lambda last: logit_diff(last, correct, foil)  # noqa: E731
    eap = edge_attribution(model, clean, corrupt, metric, clean_cache=cc, corrupt_cache=cr).sum(2)  # (L, B, H)
    eps = 1e-2
    for layer, h in [(0, 0), (0, 3), (1, 1)]:
        delta = cr.z[layer][:, :, h] - cc.z[layer][:, :, h]
        out = []
        for sign in (1, -1):
            with torch.no_grad(), patch_heads(model, {(layer, h): cc.z[layer][:, :, h] + sign * eps * delta}):
                out.append(metric(model.hf(**clean).logits[:, -1]))
        torch.testing.assert_close(eap[layer, :, h], (out[0] - out[1]) / (2 * eps), rtol=1e-3, atol=1e-6)


def test_receivers_reads_only_the_named_inputs():
    """On the planted circuit: the sender's only path runs through the receiver's values, so patching the path into
    the receiver's values equals patching the sender itself; into its queries, or straight to the logits, it does
    nothing."""
    model = planted.model()
    prompts = [interp.analyses.tasks.TaskPrompt("alpha the sun rain sea", "bravo the sun rain sea", " alpha", " bravo")]
    enc = encode(model, prompts, "first")
    clean = {"input_ids": torch.tensor(enc.clean)}
    corrupt = {"input_ids": torch.tensor(enc.corrupt)}
    cc, cr = cache_run(model, clean, qkv=True), cache_run(model, corrupt)
    ld = lambda logits: logit_diff(logits[:, -1] if logits.ndim == 3 else logits, torch.tensor(enc.correct),  # noqa: E731
                                   torch.tensor(enc.foil))
    sender, (rl, rh) = planted.SENDER, planted.RECEIVER
    via_v = ld(path_patch(model, clean, [sender], [(rl, rh, "v")], clean_cache=cc, corrupt_cache=cr))
    whole = activation_patch(model, clean, cr, [(*sender, None)], ld)[0]
    torch.testing.assert_close(via_v, whole)
    assert float(via_v) < 0 < float(ld(cc.logits))
    for receivers in ([(rl, rh, "q")], [(rl, rh, "k")], "logits"):
        torch.testing.assert_close(ld(path_patch(model, clean, [sender], receivers, clean_cache=cc, corrupt_cache=cr)),
                                   ld(cc.logits))
    # GQA: the receiver's KV head is shared with query head 3, which stays as it was
    with pytest.raises(ValueError, match="both senders and receivers"):
        path_patch(model, clean, [sender], [(*sender, "v")], clean_cache=cc, corrupt_cache=cr)
    with pytest.raises(ValueError, match="some of 'q', 'k', 'v'"):
        path_patch(model, clean, [sender], [(rl, rh, "x")], clean_cache=cc, corrupt_cache=cr)


def test_planted_circuit_is_found_by_every_method(tmp_path):
    model = planted.model()
    path = tmp_path / "first.jsonl"
    planted.write_task(path)
    result = interp.score(model, "circuits", tasks=str(path), methods="patching,eap,eap-ig,path", circuit_percent=25)
    heads = result.heads.set_index(["layer", "head"])
    others = [h for h in heads.index if h not in planted.CIRCUIT]
    for method in ("patching", "eap", "eap_ig"):
        col = heads[f"first_{method}"]
        assert (col.loc[others].abs() < 1e-6).all(), method       # heads with a zero output projection do nothing
        assert (col.loc[planted.CIRCUIT] > 0.5).all(), method
    assert heads["first_patching"].loc[planted.CIRCUIT].tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    # direct effects: the receiver writes the logits' subspace, the sender does not
    assert heads["first_path"].loc[planted.RECEIVER] == pytest.approx(1.0, abs=1e-5)
    assert abs(heads["first_path"].loc[planted.SENDER]) < 1e-6
    circuit = result.tables["circuit"]
    assert sorted(zip(circuit["layer"], circuit["head"])) == planted.CIRCUIT
    faith = result.tables["faithfulness"].set_index("heads")
    assert bool(faith.loc[2, "circuit"]) and faith.loc[2, "recovered"] == pytest.approx(1.0, abs=1e-5)
    assert faith.loc[0, "ld"] < 0.2 * faith.loc[0, "clean_ld"]      # nothing left once both are ablated
    agree = result.tables["agreement"].set_index("method")
    assert agree.loc["first_eap", "shared"] == 2


def test_overlap_of_two_tasks(tmp_path):
    """Two user tasks run by the same planted circuit share it entirely."""
    model = planted.model()
    a, b = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    planted.write_task(a, seed=1)
    planted.write_task(b, seed=2)
    result = interp.score(model, "circuits", tasks=f"{a},{b}", methods="patching", circuit_percent=25,
                          faithfulness_percents="")
    row = result.tables["overlap"].iloc[0]
    assert (row.task_a, row.task_b, row.shared, row.jaccard, row.of_smaller) == ("one", "two", 2, 1.0, 1.0)
    assert sorted(row.shared_heads.split()) == ["0-1", "1-2"] and row.only_a == "" and row.only_b == ""


def test_threshold_circuit(tmp_path):
    model = planted.model()
    path = tmp_path / "first.jsonl"
    planted.write_task(path)
    result = interp.score(model, "circuits", tasks=str(path), methods="patching", threshold=0.5)
    assert sorted(zip(result.tables["circuit"]["layer"], result.tables["circuit"]["head"])) == planted.CIRCUIT


# --------------------------------------------------------------------------------------------------------------
# Tasks


@pytest.fixture(scope="module")
def smollm2():
    return interp.load_model("smollm2-135m")


def test_ioi_prompts(smollm2):
    for corruption in ("abc", "swap"):
        prompts = ioi_prompts(smollm2, 24, seed=3, corruption=corruption)
        enc = encode(smollm2, prompts, "ioi")  # equal lengths, one-token answers
        for p, correct, foil in zip(prompts, enc.correct, enc.foil):
            io, s = p.correct.strip(), p.foil.strip()
            assert p.clean.count(s) == 2 and p.clean.count(io) == 1       # S twice (S1, S2), IO once
            assert p.clean.rstrip().endswith("to") and correct != foil
            if corruption == "abc":
                assert io not in p.corrupt.split() and s not in p.corrupt.replace(",", "").replace(".", "").split()
            else:
                assert p.corrupt.count(io) == 2 and p.corrupt.count(s) == 1  # the IO name at S2
    assert len({p.group for p in ioi_prompts(smollm2, 16)}) == 8


def test_colored_objects_prompts(smollm2):
    prompts = colored_objects_prompts(smollm2, 20, seed=1)
    encode(smollm2, prompts, "colored-objects")
    for p in prompts:
        shot, question = p.clean.rsplit("Q: ", 1)
        assert shot.startswith("Q: On the ") and "\nA: " in shot and question.endswith("?\nA:")
        asked = question.split("What color is the ")[1].split("?")[0]
        other = p.corrupt.rsplit("What color is the ", 1)[1].split("?")[0]
        assert asked != other and p.clean.rsplit("Q: ", 1)[0] == p.corrupt.rsplit("Q: ", 1)[0]
        scene = question.split(" What color")[0]
        assert f"{p.correct.strip().lower()} {asked}" in scene and f"{p.foil.strip().lower()} {other}" in scene


def test_task_errors(tmp_path, smollm2):
    stories = interp.load_model("stories260k")
    with pytest.raises(ValueError, match="needs at least 5 names"):
        ioi_prompts(stories, 4)
    with pytest.raises(ValueError, match="cannot read the task file from greater-than"):  # not built in: a file
        task_prompts(smollm2, "greater-than", 4)
    with pytest.raises(ValueError, match="unknown IOI corruption"):
        ioi_prompts(smollm2, 4, corruption="bca")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"clean": "a b", "corrupt": "a c"}\n')
    with pytest.raises(ValueError, match="line 1"):
        jsonl_prompts(bad)
    uneven = tmp_path / "uneven.jsonl"
    uneven.write_text(json.dumps({"clean": "When Mary met John,", "corrupt": "When Maryanne Smith met John,",
                                  "correct": " Mary", "foil": " John"}) + "\n")
    with pytest.raises(ValueError, match="same length"):
        encode(smollm2, jsonl_prompts(uneven), "uneven")
    long_answer = tmp_path / "long.jsonl"
    long_answer.write_text(json.dumps({"clean": "When Mary met John,", "corrupt": "When Anna met John,",
                                       "correct": " Maryanne-Louise", "foil": " John"}) + "\n")
    with pytest.raises(ValueError, match="not one token"):
        encode(smollm2, jsonl_prompts(long_answer), "long")
    with pytest.raises(ValueError, match="'hf' backend"):
        interp.score(smollm2, "circuits", backend="nnsight", samples=2)
    with pytest.raises(ValueError, match="unknown circuit method"):
        interp.score(smollm2, "circuits", methods="patching,acdc", samples=2)
    for bad, message in ((dict(circuit_by="path"), "not among the computed methods"),
                         (dict(faithfulness_percents="1,x"), "comma-separated percents"),
                         (dict(circuit_percent=0), r"circuit_percent must be in \(0, 100\]")):
        with pytest.raises(ValueError, match=message):
            interp.score(smollm2, "circuits", samples=2, **bad)
    with pytest.raises(Exception, match="does not apply"):
        interp.score("minilm-l6", "circuits", samples=2)


def test_chosen_layers_and_heads_score_the_same(tmp_path):
    model = planted.model()
    path = tmp_path / "first.jsonl"
    planted.write_task(path)
    full = interp.score(model, "circuits", tasks=str(path), methods="patching,eap", faithfulness_percents="")
    part = interp.score(model, "circuits", tasks=str(path), methods="patching,eap", layers=[1], heads=[2, 3],
                        faithfulness_percents="")
    assert list(zip(part.heads["layer"], part.heads["head"])) == [(1, 2), (1, 3)]
    expect = full.heads.set_index(["layer", "head"]).loc[[(1, 2), (1, 3)]]
    got = part.heads.set_index(["layer", "head"])
    for col in ("first_patching", "first_eap"):
        assert got[col].tolist() == pytest.approx(expect[col].tolist(), abs=1e-6)
    # faithfulness still ablates every head of the model outside the (partial) circuit: head 0.1 goes too
    faith = part.tables["faithfulness"].set_index("heads")
    assert faith.loc[1, "recovered"] < 0.5


# --------------------------------------------------------------------------------------------------------------
# Real weights


@pytest.fixture(scope="module")
def ioi_batch(smollm2):
    from interp.analyses.circuits import TaskBatch
    from interp.analyses.tasks import ioi_prompts

    prompts = [p for p in ioi_prompts(smollm2, 16, seed=0) if p.group == "ioi-0"]
    return TaskBatch(smollm2, {"task": "ioi", "group": "ioi-0", "prompts": [p.to_json() for p in prompts]})


@pytest.mark.slow
def test_smollm2_does_ioi(smollm2):
    """SmolLM2-135M prefers the indirect object on IOI; the S2/IO swap flips its preference."""
    from interp.analyses.circuits import TaskBatch

    for corruption in ("abc", "swap"):
        prompts = ioi_prompts(smollm2, 16, seed=1, corruption=corruption)
        lds = []
        for group in sorted({p.group for p in prompts}):
            mine = [p.to_json() for p in prompts if p.group == group]
            batch = TaskBatch(smollm2, {"task": "ioi", "group": group, "prompts": mine})
            with torch.no_grad():
                lds.append(torch.stack([batch.metric(smollm2.hf(**x).logits[:, -1]) for x in (batch.clean, batch.corrupt)]))
        clean, corrupt = torch.cat(lds, 1)
        assert clean.mean() > 1.0 and (clean > 0).float().mean() >= 0.75
        if corruption == "swap":
            assert corrupt.mean() < 0


@pytest.mark.slow
def test_smollm2_patching_and_path_identities(smollm2, ioi_batch):
    """On real weights: activation patching equals a hand-made o_proj hook, and path patching with no senders /
    every sender (MLPs frozen) equals the clean run / the hand-computed direct effect."""
    model, batch = smollm2, ioi_batch
    cc, cr = cache_run(model, batch.clean, qkv=True, mlps=True), cache_run(model, batch.corrupt)
    variants = [(9, 6, None), (20, 1, None), (27, 4, len(batch.clean["input_ids"][0]) - 1)]
    ours = activation_patch(model, batch.clean, cr, variants, batch.metric)
    for row, (layer, h, pos) in zip(ours, variants):
        with o_proj_patched(model, {(layer, h): cr.z[layer][:, :, h]}, at=slice(None) if pos is None else [pos]):
            torch.testing.assert_close(row, batch.metric(model.hf(**batch.clean).logits[:, -1]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(path_patch(model, batch.clean, [], clean_cache=cc, corrupt_cache=cr), cc.logits)
    last = {}
    with torch.no_grad(), capture_residual(model, lambda i, h: last.__setitem__(i, h), layers=[-1]):
        model.hf(**batch.clean)
    resid = last[model.n_layers() - 1]
    with torch.no_grad():
        for layer, module in enumerate(model.attention_modules()):
            b, n, h, d = cc.z[layer].shape
            resid = resid + module.o_proj((cr.z[layer] - cc.z[layer]).reshape(b, n, h * d))
        by_hand = model.hf.lm_head(model.hf.model.norm(resid))
    ours = path_patch(model, batch.clean, _heads(model), freeze_mlps=True, clean_cache=cc, corrupt_cache=cr)
    torch.testing.assert_close(ours, by_hand, rtol=1e-4, atol=1e-3)


@pytest.mark.slow
def test_smollm2_ioi_circuit_is_faithful(smollm2):
    """The IOI circuit that activation patching finds (2 % of the heads: 5) keeps most of the logit difference when
    every other head is mean-ablated; with every head ablated nothing is left; EAP ranks the heads much as patching
    does."""
    result = interp.score(smollm2, "circuits", tasks="ioi", methods="patching,eap", samples=8,
                          faithfulness_percents="")
    faith = result.tables["faithfulness"].set_index("heads")
    circuit = faith[faith["circuit"]].iloc[0]
    assert circuit["recovered"] >= 0.6, faith
    assert faith.loc[0, "recovered"] < 0.2
    assert (23, 3) in set(zip(result.tables["circuit"]["layer"], result.tables["circuit"]["head"]))
    agree = result.tables["agreement"].set_index("method").loc["ioi_eap"]
    assert agree["rank_correlation"] > 0.6


def test_bfloat16_models_and_degenerate_tasks(tmp_path):
    """A bfloat16 model (most checkpoints' dtype) scores in float32 tables; a task whose answers are one token is
    refused."""
    path = tmp_path / "first.jsonl"
    planted.write_task(path)
    result = interp.score(planted.model(torch.bfloat16), "circuits", tasks=str(path), circuit_percent=25,
                          faithfulness_percents="")
    heads = result.heads.set_index(["layer", "head"])
    assert heads["first_eap"].dtype == "float64" or heads["first_eap"].dtype == "float32"
    assert (heads.loc[planted.CIRCUIT, "first_patching"] > 0.5).all()
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"clean": "alpha the sun", "corrupt": "bravo the sun", "correct": " alpha",
                                "foil": " alpha"}) + "\n")
    with pytest.raises(ValueError, match="the same token"):
        encode(planted.model(), jsonl_prompts(same), "same")


def test_patching_effects_is_one_call_for_normalised_effects_per_head():
    """The easy call: one normalised effect per head, (patched − clean) / (corrupt − clean) over the prompts; on
    the planted circuit 1 for its two heads, 0 for the inert ones, and equal to activation_patch done by hand."""
    from interp.hooks import patching_effects

    model = planted.model()
    prompts = [interp.analyses.tasks.TaskPrompt("alpha the sun rain sea", "bravo the sun rain sea", " alpha", " bravo"),
               interp.analyses.tasks.TaskPrompt("delta sea hill a the", "echo sea hill a the", " delta", " echo")]
    enc = encode(model, prompts, "first")
    clean, corrupt = {"input_ids": torch.tensor(enc.clean)}, {"input_ids": torch.tensor(enc.corrupt)}
    ld = lambda logits: logit_diff(logits, torch.tensor(enc.correct), torch.tensor(enc.foil))  # noqa: E731  (B, V)
    heads = [(0, 0), planted.SENDER, planted.RECEIVER, (1, 3)]
    effects = patching_effects(model, clean, corrupt, heads, ld)  # the metric sees the 2 prompts, nothing else
    assert effects.shape == (4,) and effects.tolist() == pytest.approx([0.0, 1.0, 1.0, 0.0], abs=1e-5)
    rows = lambda logits: logit_diff(logits, torch.tensor(enc.correct).repeat(len(logits) // 2),  # noqa: E731
                                     torch.tensor(enc.foil).repeat(len(logits) // 2))  # activation_patch: copies × B
    cr = cache_run(model, corrupt)
    base, moved = ld(cache_run(model, clean).logits[:, -1]).sum(), ld(cr.logits[:, -1]).sum()
    by_hand = (activation_patch(model, clean, cr, [(*h, None) for h in heads], rows).sum(1) - base) / (moved - base)
    torch.testing.assert_close(effects, by_hand)
    with pytest.raises(ValueError, match="the same on the clean and the corrupted prompts"):
        patching_effects(model, clean, clean, heads, ld)
