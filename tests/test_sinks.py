"""The `sinks` analysis against independent truth: the models' eager attention and residual stream, Gu et al.'s
own Sink_ε arithmetic, and planted mechanisms (high-norm ViT tokens, a BOS sink dimension, visual sinks)."""

import numpy as np
import pandas as pd
import pytest
import torch

import interp
from helpers import eager_attentions
from interp.analyses.images import synthetic_image
from interp.analyses.sinks import _inputs, fit_norm_threshold
from interp.hooks import VAR, Recorder, capture, generate, redistribute_visual_attention
from interp.hooks.var import phi
from tiny_models import llava_with_processor, make, vit_processor


def gu_alpha(p: torch.Tensor) -> torch.Tensor:
    """Gu et al.'s reference arithmetic (sail-sg/Attention-Sink, compute_attention_sink) for one causal layer:
    p (H, T, T) -> α (H, T): the attention each key receives divided by the T − k queries that see it."""
    ratios = torch.arange(p.shape[-1], 0, -1, dtype=p.dtype)[None, None, :]
    return (p / ratios).sum(dim=-2)[0] if p.ndim == 4 else (p[None] / ratios).sum(dim=-2)[0]


def run_rows(result, sample: int, layer: int) -> pd.DataFrame:
    s = result.samples
    return s[(s["sample"] == sample) & (s["layer"] == layer)].sort_values("head")


@pytest.fixture(scope="module")
def stories():
    return interp.load_model("stories260k", attn_implementation="eager")


def test_stories_sink_rates_equal_gu_arithmetic_on_eager_attention(stories):
    result = interp.score(stories, "sinks", samples=4, epsilon=0.05)
    params, plan = result.meta["params"], result.meta["plan"]
    assert [p["input"] for p in plan] == ["natural"] * 4 + ["random"] * 4 + ["repeated"] * 4
    hits = {"natural": [], "random": [], "repeated": []}
    for i, sample in enumerate(plan):
        inputs, _ = _inputs(stories, sample, params)
        ids = inputs["input_ids"][0].tolist()
        assert len(ids) == 64
        if sample["input"] == "natural":
            assert ids[0] == 1  # the tokenizer's BOS, as in Gu et al.'s code
        elif sample["input"] == "repeated":
            assert len(set(ids)) == 1 and ids[0] not in stories.tokenizer.all_special_ids
        for layer, p in enumerate(eager_attentions(stories, inputs)):
            alpha = gu_alpha(p[0].double())  # (H, T)
            rows = run_rows(result, i, layer)
            np.testing.assert_allclose(rows["first_token_mass"], alpha[:, 0].numpy(), rtol=1e-4, atol=1e-6)
            eligible = alpha[:, : 64 - 16 + 1]  # keys seen by ≥ 16 queries
            np.testing.assert_allclose(rows["top_key_mass"], eligible.max(-1).values.numpy(), rtol=1e-4, atol=1e-6)
            hits[sample["input"]] += (alpha[:, 0] > 0.05).tolist()
    rates = result.tables["sink_rates"]
    for kind, h in hits.items():
        got = rates[(rates["input"] == kind) & (rates["layer"] == -1)]["first_token"].item()
        assert got == pytest.approx(100 * np.mean(h))
    heads = result.heads
    assert {"sink_rate", "sink_rate_random", "sink_rate_repeated", "delimiter_mass"} <= set(heads.columns)


def test_massive_activation_rows_equal_the_residual_stream(stories):
    result = interp.score(stories, "sinks", inputs="natural", samples=2, top_activations=4)
    massive = result.tables["massive"]
    inputs, _ = _inputs(stories, result.meta["plan"][1], result.meta["params"])
    with torch.no_grad():
        hidden = stories.hf(**inputs, output_hidden_states=True).hidden_states
    for layer in range(stories.n_layers() - 1):  # the last hidden state is after the final norm
        h = hidden[layer + 1][0].abs()
        rows = massive[(massive["sample"] == 1) & (massive["layer"] == layer)].sort_values("rank")
        np.testing.assert_allclose(rows["abs"], h.flatten().topk(4).values.numpy(), rtol=1e-5)
        assert rows["median"].iloc[0] == pytest.approx(float(h.flatten().median()), rel=1e-5)
        top = rows.iloc[0]
        assert h[int(top.position), int(top.dim)] == pytest.approx(top["abs"], rel=1e-6)
    assert not massive["massive"].any()  # a 260k-parameter model has none at 100 / 1000×


@pytest.mark.slow
def test_minilm_cls_and_sep_attention_equal_eager():
    bert = interp.load_model("minilm-l6", attn_implementation="eager")
    result = interp.score(bert, "sinks", inputs="natural", samples=3, max_tokens=48)
    tok = bert.tokenizer
    for i, sample in enumerate(result.meta["plan"]):
        inputs, _ = _inputs(bert, sample, result.meta["params"])
        ids = inputs["input_ids"][0]
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        for layer, p in enumerate(eager_attentions(bert, inputs)):
            p = p[0].double()
            rows = run_rows(result, i, layer)
            np.testing.assert_allclose(rows["cls_mass"], p[..., ids == tok.cls_token_id].sum(-1).mean(-1), rtol=1e-4)
            np.testing.assert_allclose(rows["sep_mass"], p[..., ids == tok.sep_token_id].sum(-1).mean(-1), rtol=1e-4)
            np.testing.assert_allclose(rows["first_token_mass"], p.mean(1)[:, 0], rtol=1e-4)


def test_fit_norm_threshold_finds_the_valley():
    rng = np.random.default_rng(0)
    low, high = np.exp(rng.normal(np.log(40), 0.2, 9760)), np.exp(rng.normal(np.log(400), 0.15, 240))
    fit = fit_norm_threshold(np.concatenate([low, high]))
    assert 80 < fit["threshold"] < 250
    assert (high > fit["threshold"]).mean() > 0.99 and (low > fit["threshold"]).mean() < 0.001
    assert fit_norm_threshold(np.exp(rng.normal(3, 0.3, 5000)))["threshold"] is None  # one mode: no threshold


def test_vit_planted_high_norm_tokens_are_found_and_their_attention_equals_eager():
    hf, _ = make("vit", attn="eager")
    planted = [4, 11]  # token positions (CLS is 0)
    with torch.no_grad():
        hf.embeddings.position_embeddings[0, planted] += 40.0
    vit = interp.load_model(hf, processor=vit_processor())
    result = interp.score(vit, "sinks", samples=3)
    fit = result.tables["high_norm_fit"].iloc[0]
    assert fit.threshold is not None and fit.high_tokens == 2 * 3
    high = result.tables["high_norm"]
    assert sorted(high["position"]) == sorted(planted * 3) and sorted(high["sample"]) == [0, 0, 1, 1, 2, 2]
    params = result.meta["params"]
    for i, sample in enumerate(result.meta["plan"]):
        inputs, _ = _inputs(vit, sample, params)
        for layer, p in enumerate(eager_attentions(vit, inputs)):
            got = run_rows(result, i, layer)["high_norm_mass"]
            np.testing.assert_allclose(got, p[0, :, :, planted].sum(-1).mean(-1).double(), rtol=1e-4)
    assert {"cls_mass", "high_norm_mass"} <= set(result.heads.columns)
    assert set(result.tables["norm_histogram"]["layer"]) == set(range(vit.n_layers()))


# ---------------------------------------------------------------------------------------------------------
# Vision-language models: sink dimensions, φ, visual sinks, image-centric heads, VAR

SINK_DIM = 7


@pytest.fixture(scope="module")
def llava():
    hf, proc = llava_with_processor(n_layers=4, attn="eager")
    with torch.no_grad():  # plant a massive activation on BOS: dimension 7 of its embedding
        hf.get_input_embeddings().weight[1, SINK_DIM] = 2000.0
    return interp.load_model(hf, processor=proc)


def test_lvlm_sink_dims_phi_and_image_centric_heads_equal_eager(llava):
    first = interp.score(llava, "sinks", samples=2, tau=1e9)
    image_phi = first.tables["phi"].query("segment == 'image'")["phi"]
    tau = float(np.quantile(image_phi, 0.7))  # a τ that makes about 30 % of image tokens sinks in this model
    result = interp.score(llava, "sinks", samples=2, tau=tau, min_image_attention=0.0, rho=0.5)
    phis = result.tables["phi"]
    assert set(phis["dims"]) == {str(SINK_DIM)}
    assert set(phis["layer"]) == {2, 3}  # the stream entering layers 2 … L − 1
    assert result.tables["visual_sinks"]["visual_sinks"].sum() > 0
    params = result.meta["params"]
    for i, sample in enumerate(result.meta["plan"]):
        inputs, _ = _inputs(llava, sample, params)
        with torch.no_grad():
            out = llava.hf(**inputs, output_attentions=True, output_hidden_states=True)
        image = (inputs["input_ids"][0] == llava.config.image_token_id)
        after = int(image.nonzero().max()) + 1
        for layer in (2, 3):
            f = phi(out.hidden_states[layer], torch.tensor([SINK_DIM]))[0]
            got_phi = phis[(phis["sample"] == i) & (phis["layer"] == layer)].sort_values("position")["phi"]
            np.testing.assert_allclose(got_phi, f.numpy(), rtol=1e-4)
            visual = image & (f > tau)
            p = out.attentions[layer][0, :, after:].double()  # (H, text queries, N)
            on_image = p[..., image].sum(-1)
            portion = p[..., visual].sum(-1) / (on_image + 1e-6 * int(image.sum()))
            rows = run_rows(result, i, layer)
            np.testing.assert_allclose(rows["image_mass"], on_image.mean(-1), rtol=1e-4)
            np.testing.assert_allclose(rows["visual_sink_mass"], p[..., visual].sum(-1).mean(-1), rtol=1e-4, atol=1e-9)
            np.testing.assert_allclose(rows["visual_sink_portion"], portion.mean(-1), rtol=1e-4, atol=1e-9)
            centric = 100 * (portion <= 0.5).double().mean(-1) if bool(visual.any()) else torch.zeros(len(rows))
            np.testing.assert_allclose(rows["image_centric_rate"], centric, atol=1e-6)


def _var_setup(llava):
    inputs = llava.prepare("<image>\nw5 w9 w11 w4", images=[synthetic_image(3)])
    with torch.no_grad():
        hidden = llava.hf(**inputs, output_hidden_states=True).hidden_states
    image = inputs["input_ids"][0] == llava.config.image_token_id
    tau = float(phi(hidden[2], torch.tensor([SINK_DIM]))[0, image].quantile(0.6))
    return inputs, tau


def test_var_with_p_one_changes_nothing(llava):
    inputs, tau = _var_setup(llava)
    with torch.no_grad():
        plain = llava.hf(**inputs).logits
        with redistribute_visual_attention(llava, inputs, VAR(p=1.0, tau=tau, rho=1.0, min_image_attention=0.0)) as st:
            same = llava.hf(**inputs).logits
    assert st.rewritten.get(2, 0) > 0 and st.dims.tolist() == [SINK_DIM]
    torch.testing.assert_close(same, plain, rtol=1e-5, atol=1e-5)


def test_var_rewrites_attention_as_the_reference_formula(llava):
    inputs, tau = _var_setup(llava)
    keep = Recorder()
    with torch.no_grad():
        out = llava.hf(**inputs, output_attentions=True, output_hidden_states=True)
        with capture(llava, keep, layers=[2], keep=("q", "k", "v", "z")):
            llava.hf(**inputs)
        var = VAR(p=0.5, tau=tau, rho=1.0, min_image_attention=0.0)
        changed = Recorder()
        with redistribute_visual_attention(llava, inputs, var), capture(llava, changed, layers=[2, 3], keep=("z",)):
            llava.hf(**inputs)
    ids = inputs["input_ids"][0]
    image = ids == llava.config.image_token_id
    sinks = phi(out.hidden_states[2], torch.tensor([SINK_DIM]))[0] > tau
    assert bool(sinks[0]) and bool((sinks & image).any())  # BOS and some image tokens are sinks
    after = int(image.nonzero().max()) + 1
    w = out.attentions[2][0].double().clone()  # (H, N, N)
    rows = w[:, after:]
    budget = rows[..., sinks].sum(-1, keepdim=True) * 0.5
    base = rows * (image & ~sinks)
    new = torch.where(sinks, rows * 0.5, rows) + budget * base / base.sum(-1, keepdim=True)
    w[:, after:] = new
    assert torch.allclose(w.sum(-1), torch.ones(()).double())
    v = keep.get(2).v[0].double().repeat_interleave(2, dim=0)  # GQA: 4 query heads on 2 KV heads
    expected = (w @ v).transpose(0, 1)  # (N, H, d)
    torch.testing.assert_close(changed.get(2).z[0].double(), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(changed.get(2).z[0, :after], changed.get(2).z[0, :after] * 0)  # rows before: untouched
    torch.testing.assert_close(changed.get(2).z[0, :after], keep.get(2).z[0, :after], rtol=1e-5, atol=1e-6)


def test_generate_with_var_rewrites_each_new_token_and_skips_the_last_layer(llava):
    inputs, tau = _var_setup(llava)
    var = VAR(p=0.6, tau=tau, rho=1.0, min_image_attention=0.0)
    steps = []
    ids = generate(llava, inputs, lambda c: steps.append((c.layer, c.step)), max_new_tokens=3, var=var)
    assert ids.shape[1] == inputs["input_ids"].shape[1] + 3
    with torch.no_grad(), redistribute_visual_attention(llava, inputs, var) as st:
        llava.hf.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert 3 not in st.rewritten  # the last layer is left alone
    n_text = inputs["input_ids"].shape[1] - (int((inputs["input_ids"][0] == llava.config.image_token_id).nonzero().max()) + 1)
    assert st.rewritten[2] == 4 * (n_text + 2)  # every head, every text query at prefill and each of 2 decode steps
    with pytest.raises(ValueError, match="not a vision-language model"):
        with redistribute_visual_attention(interp.load_model("stories260k"), inputs, var):
            pass


def test_sinks_bad_input(stories, tmp_path):
    with pytest.raises(ValueError, match="unknown sinks preset"):
        interp.score(stories, "sinks", preset="huge")
    with pytest.raises(ValueError, match="unknown sinks inputs"):
        interp.score(stories, "sinks", inputs="natural,noise")
    vit = interp.load_model(make("vit")[0], processor=vit_processor())
    with pytest.raises(ValueError, match="random and repeated"):
        interp.score(vit, "sinks", inputs="random")
    with pytest.raises(ValueError, match="holds no images"):
        interp.score(vit, "sinks", images=str(tmp_path))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read the image"):
        interp.score(vit, "sinks", images=str(tmp_path / "broken.png"), norm_threshold=10.0)


def test_cli_sinks_json_tables_report_and_resume(capsys, tmp_path):
    import json

    from interp.cli import main

    argv = ["score", "stories260k", "--analysis", "sinks", "--samples", "2", "--inputs", "natural,repeated",
            "--epsilon", "0.05", "--out", str(tmp_path), "--json"]
    assert main(argv) == 0
    [out] = json.loads(capsys.readouterr().out)["runs"]
    assert list(out["scores"]) == ["first_token_mass", "sink_rate", "any_sink_rate", "sink_rate_repeated",
                                   "delimiter_mass"]
    assert {"sink_rates", "massive", "massive_layers"} <= set(out["tables"])
    assert any(line.startswith("Sink_0.05 (first token") for line in out["report"])
    run = interp.open_run(out["id"], store=tmp_path)
    assert set(run.tables["massive"]["sample"]) == {0, 1, 2, 3}  # per-sample tables keep their sample
    assert main(["score", "stories260k", "--analysis", "sinks", "--inputs", "noise", "--out", str(tmp_path)]) == 1
    assert "unknown sinks inputs" in capsys.readouterr().err


def test_sinks_per_sample_tables_survive_an_interrupted_run(stories, tmp_path, monkeypatch):
    from interp.analyses.sinks import Sinks

    calls = {"n": 0}
    original = Sinks.score_sample

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Sinks, "score_sample", flaky)
    with pytest.raises(KeyboardInterrupt):
        interp.score(stories, "sinks", samples=2, inputs="natural,random", store=tmp_path)
    resumed = interp.score(stories, "sinks", samples=2, inputs="natural,random", store=tmp_path, resume=True)
    assert calls["n"] == 5  # the resumed run scored samples 2 and 3 only
    fresh = interp.score(stories, "sinks", samples=2, inputs="natural,random")
    pd.testing.assert_frame_equal(resumed.heads, fresh.heads)
    pd.testing.assert_frame_equal(resumed.tables["massive"], fresh.tables["massive"])


def test_the_transformer_lens_backend_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="transformer-lens backend runs as a bridged copy: use --backend hf"):
        interp.score("stories260k", "sinks", backend="transformer-lens", store=tmp_path)
    assert interp.list_runs(tmp_path) == []
