"""One forward pass for several analyses (`interp.together.score_together`, `interp.hooks.run_passes`): each analysis
still writes its own ordinary run, equal to a separate run's; samples with the same inputs share a forward."""

import pandas as pd
import pytest
import torch
import transformers as T

import interp
import interp.together as together
from interp.atlases import OPTION_KEYS, PRESETS
from interp.hooks import Pass, run_passes
from interp.kernels import attention_stats, call_stats
from interp.results import open_run
from interp.store import Store
from interp.together import score_together

SMALL = {"summary": {"samples": 2, "max_tokens": 32}, "lookback": {"samples": 2, "max_tokens": 32},
         "sinks": {"samples": 2, "max_tokens": 32}, "taxonomy": {"samples": 2, "max_tokens": 32}}


@pytest.fixture(scope="module")
def stories():
    return interp.load_model("stories260k")


@pytest.fixture(scope="module")
def tiny(stories):
    """A tiny random Llama (GQA, head dim 16: statistics ride its SDPA calls on CPU) with stories260k's tokenizer."""
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return interp.load_model(T.LlamaForCausalLM(config), tokenizer=stories.tokenizer)


def jobs(settings: dict) -> list[tuple[str, dict, dict]]:
    """score_together's jobs from {analysis: {option or parameter: value}}."""
    return [(name, {k: v for k, v in given.items() if k in OPTION_KEYS},
             {k: v for k, v in given.items() if k not in OPTION_KEYS}) for name, given in settings.items()]


def assert_same_run(got, want, atol=1e-6):
    """Two results of one analysis: same plan, heads, per-sample rows and tables (to atol)."""
    assert got.meta["plan"] == want.meta["plan"] and got.meta["scores"] == want.meta["scores"]
    assert sorted(got.tables) == sorted(want.tables)
    for name, a, b in [("heads", got.heads, want.heads), ("samples", got.samples, want.samples),
                       *((t, got.tables[t], want.tables[t]) for t in got.tables)]:
        pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_exact=False, rtol=0,
                                      atol=atol, obj=f"{got.analysis} {name}")


def count_forwards(model):
    """A list that grows by one per forward pass of the model (a pre-hook on the HF module), and its hook handle."""
    calls = []
    return calls, model.hf.register_forward_pre_hook(lambda *_: calls.append(1))


def test_together_equals_separate_runs(stories, tmp_path):
    ids = score_together(stories, jobs(SMALL), tmp_path / "together")
    assert len(set(ids)) == 4
    for (name, options), run in zip(SMALL.items(), ids):
        got = open_run(run, tmp_path / "together")
        assert got.status == "complete" and got.analysis == name
        assert_same_run(got, interp.score(stories, name, store=tmp_path / "alone", **options))
    assert score_together(stories, jobs(SMALL), tmp_path / "together") == ids  # complete runs are reused


def test_merged_statistics_give_what_separate_runs_give(tiny, tmp_path):
    """lookback's and sinks' first samples read the same text: one SDPA call per layer carries the union of their
    statistics (argmax, and sinks' per-key and segment masses), and each run equals its separate run."""
    settings = {"lookback": {"samples": 2, "max_tokens": 32}, "sinks": {"samples": 2, "max_tokens": 32}}
    ids = score_together(tiny, [(n, o, {"inputs": ["natural"]} if n == "sinks" else {}) for n, o in settings.items()],
                         tmp_path)
    assert_same_run(open_run(ids[0], tmp_path), interp.score(tiny, "lookback", **settings["lookback"]))
    assert_same_run(open_run(ids[1], tmp_path), interp.score(tiny, "sinks", inputs=["natural"], **settings["sinks"]))


def test_shared_inputs_take_one_forward(stories, tmp_path):
    """summary and lookback on all sixteen texts read the same inputs: 16 forwards, not 32; sinks' two natural
    sequences are the two texts its seed picks, cut to 24 tokens as summary cuts them, so they join those forwards."""
    texts, natural = {"samples": 16, "max_tokens": 24}, {"samples": 2, "max_tokens": 24}
    calls, hook = count_forwards(stories)
    try:
        ids = score_together(stories, [("summary", texts, {}), ("lookback", texts, {}),
                                       ("sinks", natural, {"inputs": ["natural"]})], tmp_path)
        merged = len(calls)
        calls.clear()
        alone = [interp.score(stories, "summary", **texts), interp.score(stories, "lookback", **texts),
                 interp.score(stories, "sinks", inputs=["natural"], **natural)]
    finally:
        hook.remove()
    assert (merged, len(calls)) == (16, 34)
    for run, want in zip(ids, alone):
        assert_same_run(open_run(run, tmp_path), want)


def test_an_interrupted_run_resumes(stories, tmp_path, monkeypatch):
    """An error after some forwards keeps the runs with finished samples incomplete; the next call resumes the
    same runs, scores only what is left and gives what an uninterrupted call gives."""
    real, passes = together.run_passes, []

    def failing(*args, **kwargs):
        if len(passes) == 3:
            raise RuntimeError("stopped")
        passes.append(1)
        return real(*args, **kwargs)

    calls, hook = count_forwards(stories)
    try:
        whole_ids = score_together(stories, jobs(SMALL), tmp_path / "whole")  # an uninterrupted call
        whole = len(calls)
        calls.clear()
        monkeypatch.setattr(together, "run_passes", failing)
        with pytest.raises(RuntimeError, match="stopped"):
            score_together(stories, jobs(SMALL), tmp_path / "stopped")
        stopped = Store(tmp_path / "stopped").runs()
        # the first three forwards finished samples of three runs, kept; taxonomy's run, with none, was removed
        assert sorted((r.meta["analysis"], r.status) for r in stopped) == [
            ("lookback", "incomplete"), ("sinks", "incomplete"), ("summary", "incomplete")]
        monkeypatch.setattr(together, "run_passes", real)
        calls.clear()
        ids = score_together(stories, jobs(SMALL), tmp_path / "stopped")
    finally:
        hook.remove()
    assert {r.id for r in stopped} < set(ids)  # resumed, not started again
    assert len(calls) == whole - 3  # the three forwards done before the error are not redone
    for run, whole in zip(ids, whole_ids):
        assert_same_run(open_run(run, tmp_path / "stopped"), open_run(whole, tmp_path / "whole"))


def test_merged_requests_serve_each_probe_its_own(tiny):
    """Two parts asking different statistics and segmentations: one call computes their union (it rides the model's
    SDPA call), and each probe reads what it asked for, as the kernels give it on their own."""
    inputs = tiny.prepare("Once upon a time, there was a little girl. She liked to play.")
    n = inputs["input_ids"].shape[-1]
    first = dict(stats=("segment_mass", "mean_distance"), segments=(torch.arange(n) > 0).long()[None], n_segments=2)
    thirds = dict(stats=("segment_mass", "key_mass", "key_count"), segments=(torch.arange(n) * 3 // n)[None],
                  n_segments=3)
    seen = {"first": 0, "thirds": 0}

    def probe_for(name, request):
        def probe(call):
            got = call_stats(call, **request)
            assert call.stats is not None and call.stats_request is request  # served from the merged call
            want = attention_stats(call.q, call.head_keys(), geometry=call.geometry, **request)
            for stat in request["stats"]:
                torch.testing.assert_close(getattr(got, stat), getattr(want, stat), rtol=0, atol=1e-5)
            seen[name] += 1
        return probe

    parts = [Pass(inputs, probe_for("first", first), lambda: "a", stats=first),
             Pass(inputs, probe_for("thirds", thirds), lambda: "b", stats=thirds)]
    assert run_passes(tiny, parts) == ["a", "b"]
    assert seen == {"first": tiny.n_layers(), "thirds": tiny.n_layers()}


def test_parts_of_one_pass_need_the_same_inputs(stories):
    one, two = stories.prepare("Once upon a time"), stories.prepare("The end")
    with pytest.raises(ValueError, match="same inputs"):
        run_passes(stories, [Pass(one, lambda c: None, lambda: 0), Pass(two, lambda c: None, lambda: 0)])


def test_what_cannot_be_scored_together_is_refused(stories, tmp_path):
    with pytest.raises(ValueError, match="retrieval.*sample_pass"):
        score_together(stories, [("retrieval", {}, {})], tmp_path)
    with pytest.raises(ValueError, match="given twice"):
        score_together(stories, [("lookback", {"samples": 1}, {}), ("lookback", {"samples": 1}, {"offset": 1})],
                       tmp_path)


def test_a_job_that_cannot_start_leaves_no_run(stories, tmp_path):
    """lookback refuses its plan after summary's run was created: that run, with no sample, is removed."""
    with pytest.raises(ValueError, match="offset 40"):
        score_together(stories, [("summary", {"samples": 1, "max_tokens": 16}, {}),
                                 ("lookback", {"samples": 1, "max_tokens": 16}, {"offset": 40})], tmp_path)
    assert Store(tmp_path).runs() == []


@pytest.mark.slow
def test_quick_atlas_analyses_on_smollm2(tmp_path):
    """The atlas's quick preset of the four text analyses on SmolLM2: the runs scored together equal separate ones."""
    model = interp.load_model("smollm2-135m")
    quick = {name: PRESETS["quick"][name] for name in ("summary", "sinks", "taxonomy", "lookback")}
    ids = score_together(model, jobs(quick), tmp_path)
    for (name, options), run in zip(quick.items(), ids):
        assert_same_run(open_run(run, tmp_path), interp.score(model, name, **options))
