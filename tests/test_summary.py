"""The `summary` analysis and `interp.score`: scores equal the same statistics of the model's eager attention."""

import numpy as np
import pandas as pd
import pytest
import torch

import interp
from helpers import eager_attentions
from interp.analyses.inputs import TEXTS, read_prompts

SCORES = ["entropy", "max_prob", "distance", "first_token_mass"]


def eager_summary(eager, texts, max_tokens):
    """The four statistics per head from `output_attentions`, averaged over query positions of all texts
    (the first query left out for causal models): (layer, head) -> dict."""
    causal = eager.family.kind == "llm"
    sums, count = {}, 0
    for text in texts:
        inputs = eager.prepare(text, truncation=True, max_length=max_tokens)
        for layer, p in enumerate(eager_attentions(eager, inputs)):
            p = p[0].double()  # (H, N, N)
            n = p.shape[-1]
            rows = slice(1 if causal else 0, n)
            pos = torch.arange(n, dtype=torch.float64)
            stats = {
                "entropy": -(p * torch.log(p.clamp_min(1e-300))).sum(-1),
                "max_prob": p.max(-1).values,
                "distance": (p * (pos[:, None] - pos).abs()).sum(-1),
                "first_token_mass": p[..., 0],
            }
            for name, value in stats.items():
                sums[(layer, name)] = sums.get((layer, name), 0) + value[:, rows].sum(-1)
        count += n - (1 if causal else 0)
    return {key: v / count for key, v in sums.items()}


@pytest.mark.parametrize("alias", ["stories260k", "minilm-l6", pytest.param("smollm2-135m", marks=pytest.mark.slow)])
def test_summary_equals_eager_attention_statistics(alias):
    model = interp.load_model(alias)
    eager = interp.load_model(alias, attn_implementation="eager")
    result = interp.score(model, "summary", samples=3, max_tokens=48, seed=1)
    texts = [s["text"] for s in result.meta["plan"]]
    assert len(texts) == 3 and all(t in TEXTS for t in texts)
    ref = eager_summary(eager, texts, 48)
    n_layers, (n_heads, n_kv) = model.n_layers(), model.head_counts()
    heads = result.to_dataframe()
    assert list(heads.columns) == ["layer", "head", "kv_head", *SCORES]
    assert len(heads) == n_layers * n_heads
    assert (heads["kv_head"] == heads["head"] // (n_heads // n_kv)).all()
    for name in SCORES:
        got = heads.pivot(index="layer", columns="head", values=name).to_numpy()
        want = torch.stack([ref[(layer, name)] for layer in range(n_layers)]).numpy()
        tol = 1e-3 * (1 + np.abs(want))
        assert np.all(np.abs(got - want) <= tol), (name, np.abs(got - want).max())


@pytest.fixture(scope="module")
def stories():
    return interp.load_model("stories260k")


def test_layers_and_heads_subset_matches_the_full_table(stories):
    full = interp.score(stories, "summary", samples=2, max_tokens=32).heads
    part = interp.score(stories, "summary", samples=2, max_tokens=32, layers=[1, 3], heads=[0, 5]).heads
    assert sorted(zip(part["layer"], part["head"])) == [(1, 0), (1, 5), (3, 0), (3, 5)]
    merged = part.merge(full, on=["layer", "head", "kv_head"], suffixes=("", "_full"))
    for name in SCORES:
        np.testing.assert_allclose(merged[name], merged[name + "_full"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["nnsight", "transformer-lens"])
def test_backends_give_the_same_scores(stories, backend):
    hf = interp.score(stories, "summary", samples=2, max_tokens=32).heads
    other = interp.score(stories, "summary", samples=2, max_tokens=32, backend=backend).heads
    pd.testing.assert_frame_equal(hf, other, rtol=1e-4, atol=1e-5)


def test_long_prompts_take_several_row_blocks_on_every_backend(stories, monkeypatch):
    """The regression of issue 27: past 2²³ / (heads · keys) queries (~965 tokens for SmolLM2) the max pass ran a
    second block of rows and crashed. Here the chunk sizes shrink so that 200 tokens take many row blocks on every
    kernel path, and the tables equal those of the unchunked run."""
    from interp.kernels import fused_stats, torch_stats

    whole = interp.score(stories, "summary", samples=2, max_tokens=200).heads
    monkeypatch.setattr(torch_stats, "CHUNK_ELEMENTS", 8 * 200 * 4)  # the max pass: 4 rows at a time
    monkeypatch.setattr(torch_stats, "CHUNK_K", 64)
    monkeypatch.setattr(fused_stats, "CHUNK_ELEMENTS", 200 * 16)
    for backend in ("fused", "torch"):
        monkeypatch.setenv("INTERP_KERNELS", backend)
        chunked = interp.score(stories, "summary", samples=2, max_tokens=200).heads
        pd.testing.assert_frame_equal(whole, chunked, rtol=1e-5, atol=1e-6)


def test_prompts_file_and_sample_choice(stories, tmp_path):
    lines = tmp_path / "prompts.txt"
    lines.write_text("The cat sat on the mat.\n\nOnce upon a time there was a dog.\nA third prompt here.\n")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"text": "The cat sat on the mat."}\n{"text": "Once upon a time there was a dog."}\n')
    assert read_prompts(lines) == ["The cat sat on the mat.", "Once upon a time there was a dog.", "A third prompt here."]
    assert read_prompts(jsonl) == read_prompts(lines)[:2]
    r = interp.score(stories, "summary", prompts=str(lines), samples=2, seed=3)
    assert [s["text"] for s in r.meta["plan"]] == [read_prompts(lines)[s["prompt"]] for s in r.meta["plan"]]
    assert r.samples["sample"].nunique() == 2
    assert [s["prompt"] for s in interp.score(stories, "summary", prompts=str(lines), samples=2, seed=3).meta["plan"]] \
        == [s["prompt"] for s in r.meta["plan"]]  # the seed fixes the choice
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "x"}\n')
    with pytest.raises(ValueError, match="line 1"):
        read_prompts(bad)
    with pytest.raises(ValueError, match="cannot read prompts"):
        read_prompts(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="there are 3 prompts"):
        interp.score(stories, "summary", prompts=str(lines), samples=4)


def test_bad_input_is_refused_clearly(stories):
    with pytest.raises(ValueError, match="known analyses: summary"):
        interp.score(stories, "nope")
    with pytest.raises(ValueError, match="has no parameter haystack"):
        interp.score(stories, "summary", haystack="x")
    with pytest.raises(ValueError, match="out of range"):
        interp.score(stories, "summary", layers=[7])
    with pytest.raises(ValueError, match="out of range"):
        interp.score(stories, "summary", heads=[8])
    with pytest.raises(ValueError, match="unknown backend"):
        interp.score(stories, "summary", backend="vllm")


def test_analysis_that_does_not_apply_names_the_families():
    from tiny_models import make

    vit, _ = make("vit", "sdpa")
    with pytest.raises(interp.analyses.NotApplicableError, match="supports the llm/encoder/lvlm families: gpt2, llama"):
        interp.score(interp.load_model(vit), "summary")


def test_plot_is_the_head_map(stories):
    r = interp.score(stories, "summary", samples=1, max_tokens=16)
    fig = r.plot("distance")
    z = np.array(fig.data[0].z)
    assert z.shape == (5, 8)
    np.testing.assert_allclose(z, r.heads.pivot(index="layer", columns="head", values="distance").to_numpy())
    assert np.array_equal(np.array(fig.data[0].customdata), r.heads.pivot(index="layer", columns="head", values="kv_head").to_numpy())
    assert "KV head" in fig.data[0].hovertemplate
    top = r.top("first_token_mass", 3)
    assert list(top.columns) == ["layer", "head", "kv_head", "first_token_mass"]
    assert top["first_token_mass"].is_monotonic_decreasing
    assert top["first_token_mass"].iloc[0] == r.heads["first_token_mass"].max()
