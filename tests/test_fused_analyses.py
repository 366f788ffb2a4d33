"""The fused kernels path gives every analysis the tables the chunked twin gives: the same runs with
INTERP_KERNELS=torch and INTERP_KERNELS=fused, on real weights (stories260k, all-MiniLM-L6-v2, SmolLM2-135M) and
the organisms (a ViT, an LLaVA)."""

import numpy as np
import pandas as pd
import pytest
import torch

import interp

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter

CASES = [
    ("stories260k", "summary", dict(samples=2)),
    ("stories260k", "sinks", dict(samples=2)),
    ("stories260k", "taxonomy", dict(samples=2, half=48)),
    ("stories260k", "retrieval", dict(lengths=[150], depths=[0, 100], n_needles=1, mask_k=[2])),
    ("minilm-l6", "summary", dict(samples=2)),
    ("minilm-l6", "sinks", dict(samples=2)),
    ("minilm-l6", "taxonomy", dict(samples=2, half=32)),
    ("organism-vit", "vit", dict(samples=1)),
    ("organism-vit", "sinks", dict(samples=1)),
    ("organism-llava", "sinks", dict(samples=1)),
    pytest.param("smollm2-135m", "summary", dict(samples=1, max_tokens=256), marks=pytest.mark.slow),
    pytest.param("smollm2-135m", "sinks", dict(samples=1, max_tokens=256), marks=pytest.mark.slow),
    pytest.param("smollm2-135m", "taxonomy", dict(samples=1, half=64), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name, analysis, params", CASES)
def test_every_table_is_the_twins(name, analysis, params, monkeypatch):
    _same_tables_as_the_twin(name, analysis, params, "fused", monkeypatch)


@pytest.mark.parametrize("name, analysis, params", [("stories260k", "summary", dict(samples=2, max_tokens=96)),
                                                    ("stories260k", "sinks", dict(samples=1, max_tokens=64))])
def test_triton_tables_are_the_twins(name, analysis, params, monkeypatch):
    """The same on the Triton kernels (on CUDA where there is a GPU, else under the interpreter), the rows' lse
    riding the model's SDPA call."""
    _same_tables_as_the_twin(name, analysis, params, "triton", monkeypatch, device=TRITON_DEVICE)


def _same_tables_as_the_twin(name, analysis, params, backend, monkeypatch, device=None):
    model = interp.load_model(name, device=device)
    results = {}
    for kernels in ("torch", backend):
        monkeypatch.setenv("INTERP_KERNELS", kernels)
        results[kernels] = interp.score(model, analysis, **params)
    twin, fused = results["torch"], results[backend]
    for table in ("heads", "samples", *sorted(twin.tables)):
        a, b = (r.heads if table == "heads" else r.samples if table == "samples" else r.tables[table]
                for r in (twin, fused))
        assert list(a.columns) == list(b.columns) and len(a) == len(b), table
        for column in a.columns:
            x, y = a[column], b[column]
            if pd.api.types.is_numeric_dtype(x) and not pd.api.types.is_bool_dtype(x):
                np.testing.assert_allclose(y.to_numpy(float), x.to_numpy(float), rtol=1e-5, atol=1e-5,
                                           err_msg=f"{name} {analysis}: {table}.{column}")
            else:
                assert x.astype(str).tolist() == y.astype(str).tolist(), f"{name} {analysis}: {table}.{column}"


@pytest.mark.parametrize("name, rides", [("smollm2-135m", True), ("minilm-l6", True), ("stories260k", False)])
def test_statistics_ride_the_models_own_sdpa_call(name, rides, monkeypatch):
    """capture(stats=...): the statistics come out of the model's own SDPA call, the model's output stays bit for
    bit what it is without capture, and they equal the twin's; where padding the call would change the output's
    arithmetic (stories260k's head dim 8 on AVX-512), where the columns are too wide to gain (the entropy's) or
    where the twin is asked for, the model's own call runs as is and `call_stats` computes them."""
    import torch

    from interp.hooks import trace
    from interp.kernels import attention_stats

    model = interp.load_model(name)
    inputs = model.prepare("Once upon a time there was a little girl who liked to play in the park with her dog.")
    n = inputs["input_ids"].shape[-1]
    request = dict(segments=(torch.arange(n) % 3)[None], n_segments=3,
                   stats=("lse", "max_prob", "argmax", "mean_distance", "segment_mass", "key_mass", "key_count"))
    seen = []

    def probe(call):
        st = interp.kernels.call_stats(call, **request)
        twin = attention_stats(call.q, call.head_keys(), geometry=call.geometry, backend="torch", **request)
        seen.append(call.stats is not None)
        for stat, value in twin.to_dict().items():
            tol = 1e-3 if stat == "mean_distance" else 2e-5
            assert torch.allclose(getattr(st, stat).float(), value.float(), atol=tol, rtol=1e-5), (call.layer, stat)

    with torch.no_grad():
        plain = model.hf(**inputs)
    out = trace(model, inputs, probe, stats=request)
    field = "logits" if getattr(plain, "logits", None) is not None else "last_hidden_state"
    assert torch.equal(getattr(out, field), getattr(plain, field))
    assert all(seen) if rides else not any(seen)
    request["stats"] += ("entropy",)  # its key columns are as wide as the head: a call of their own, not a ride
    seen.clear()
    trace(model, inputs, probe, stats=request)
    assert seen and not any(seen)
    request["stats"] = request["stats"][:-1]
    monkeypatch.setenv("INTERP_KERNELS", "torch")  # the twin asked for: nothing rides
    seen.clear()
    trace(model, inputs, probe, stats=request)
    assert seen and not any(seen)


def test_an_incomplete_request_does_not_ride_nor_break_the_forward():
    """capture(stats=) with arguments call_stats fills in itself (no n_segments, a backend, top-k): the model's
    call runs as is, and call_stats computes them after it."""
    import torch

    from interp.hooks import trace

    model = interp.load_model("minilm-l6")
    inputs = model.prepare("The dog ran to the park.")
    n = inputs["input_ids"].shape[-1]
    for request in (dict(segments=(torch.arange(n) % 3)[None], stats=("segment_mass",)),
                    dict(stats=("lse",), backend="torch"), dict(stats=("topk",), topk=2)):
        rode = []
        trace(model, inputs, lambda call: rode.append(call.stats is not None)
              or interp.kernels.call_stats(call, **request), stats=request)
        assert rode and not any(rode), request


@pytest.mark.parametrize("name", ["stories260k", "minilm-l6"])
def test_the_row_lse_rides_the_models_own_sdpa_call_to_the_triton_kernels(name, monkeypatch):
    """With the Triton kernels (on CUDA where there is a GPU — SDPA's memory-efficient kernel in fp32 —, else under
    the interpreter with the CPU flash kernel), capture(stats=) makes the model's SDPA call through SDPA's own
    lse-returning kernel: the output stays bit for bit the model's, each call keeps the rows' lse (the dense
    oracle's), and `call_stats` starts Triton from it (one pass over the keys) with the twin's results."""
    import torch

    from interp.hooks import trace
    from interp.kernels import attention_stats, dense_scores, triton_stats

    monkeypatch.setenv("INTERP_KERNELS", "triton")
    given = []
    run = triton_stats.stats_triton
    monkeypatch.setattr(triton_stats, "stats_triton", lambda *a, **kw: given.append(kw.get("lse") is not None)
                        or run(*a, **kw))
    model = interp.load_model(name, device=TRITON_DEVICE)
    inputs = model.prepare("Once upon a time there was a little girl who liked to play in the park.")
    n = inputs["input_ids"].shape[-1]
    request = dict(segments=(torch.arange(n) % 3)[None], n_segments=3, stats=("lse", "entropy", "max_prob", "argmax",
                                                                            "mean_distance", "segment_mass", "key_mass"))
    kept = []

    def probe(call):
        kept.append(call.lse is not None)
        lse = torch.logsumexp(dense_scores(call.q, call.head_keys(), geometry=call.geometry), -1)
        torch.testing.assert_close(call.lse, lse, atol=2e-5, rtol=1e-5)
        st = interp.kernels.call_stats(call, **request)
        twin = attention_stats(call.q, call.head_keys(), geometry=call.geometry, backend="torch", **request)
        for stat, value in twin.to_dict().items():
            tol = 1e-3 if stat == "mean_distance" else 2e-5
            torch.testing.assert_close(getattr(st, stat).float(), value.float(), atol=tol, rtol=1e-5,
                                       msg=lambda m: f"layer {call.layer} {stat}: {m}")

    with torch.no_grad():
        plain = model.hf(**inputs)
    out = trace(model, inputs, probe, stats=request)
    field = "logits" if getattr(plain, "logits", None) is not None else "last_hidden_state"
    assert torch.equal(getattr(out, field), getattr(plain, field))
    assert kept and all(kept) and given and all(given)
    monkeypatch.setenv("INTERP_KERNELS", "fused")  # the fused path rides its own way, or not at all: no lse kept
    kept.clear()
    trace(model, inputs, lambda call: kept.append(call.lse is not None), stats=request)
    assert kept and not any(kept)
