"""Attention statistics from q/k, against dense softmax (property-based), for every kernel backend."""

import dataclasses
import importlib.util
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interp.kernels import (AttentionGeometry, attention_stats, attention_tile, dense_attention, dense_scores,
                            diagonal_attention, grid_distance, pooled_attention)

ALL = ["lse", "segment_mass", "argmax", "max_prob", "entropy", "mean_distance", "key_mass", "key_count"]
CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("interp.kernels.triton_stats") is not None and (
    CUDA or os.environ.get("TRITON_INTERPRET") == "1")
# backend[:device]: Triton runs on CUDA tensors where there is a GPU (else under the interpreter, on CPU tensors);
# with a GPU, the fused path and the twin run on CUDA tensors too
BACKENDS = ["torch", "fused"] + (["triton"] if HAS_TRITON else []) + (["fused:cuda", "torch:cuda"] if CUDA else [])


def placed(backend: str) -> tuple[str, str]:
    """(backend name, device its tensors live on) of a BACKENDS entry."""
    name, _, device = backend.partition(":")
    return name, device or ("cuda" if name == "triton" and CUDA else "cpu")


def on(backend: str, fn, q, k, *args, **kwargs):
    """fn(q, k, *args, backend=..., **kwargs) with q and k on the backend's device; tensors of the result on CPU."""
    name, device = placed(backend)
    out = fn(q.to(device), k.to(device), *args, backend=name, **kwargs)
    if isinstance(out, torch.Tensor):
        return out.cpu()
    return type(out)(**{key: value.cpu() for key, value in out.to_dict().items()})


def close(name: str, got, want, atol: float, rtol: float = 1e-5) -> None:
    """got ≈ want, failing with the statistic's name and the size and place of the largest error."""
    torch.testing.assert_close(got.float().cpu(), want.float(), atol=atol, rtol=rtol, equal_nan=False,
                               msg=lambda m: f"{name}: {m}")


def run_ids(g: torch.Generator, b: int, n: int, blank: bool) -> torch.Tensor:
    """(B, N) ids in contiguous runs (a run starts with probability 0.2); `blank`: every other run −1 (no block)."""
    ids = (torch.rand(b, n, generator=g) < 0.2).long().cumsum(-1)
    return torch.where(ids % 2 == 1, ids, -1) if blank else ids


@st.composite
def problems(draw):
    b = draw(st.integers(1, 2))
    n_kv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 4, 8]))
    n_k = draw(st.integers(1, 40))
    decode = draw(st.booleans())
    n_q = 1 if decode else draw(st.integers(1, n_k))
    d = draw(st.sampled_from([8, 16]))
    causal = draw(st.booleans())
    window = draw(st.none() | st.integers(1, 12))
    softcap = draw(st.none() | st.floats(0.5, 5.0))
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    big = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, n_kv * group, n_q, d, generator=g) * (30.0 if big else 1.0)).to(dtype)
    k = torch.randn(b, n_kv, n_k, d, generator=g).to(dtype)
    offset = draw(st.integers(0, 3))
    positions = torch.arange(n_k - n_q, n_k) - (offset if n_k - n_q >= offset else 0)
    key_mask = torch.rand(b, n_k, generator=g) > draw(st.sampled_from([0.0, 0.3, 0.9]))
    n_seg = draw(st.integers(1, 4))
    segments = torch.randint(0, n_seg, (b, n_k), generator=g)
    form = draw(st.sampled_from(["rule", "blocks", "documents", "both"]))  # bidirectional blocks, block-diagonal
    blocks = run_ids(g, b, n_k, blank=True) if form in ("blocks", "both") else None
    documents = run_ids(g, b, n_k, blank=False) if form in ("documents", "both") else None
    return dict(q=q, k=k, geometry=AttentionGeometry(causal=causal, window=window, softcap=softcap,
                                                     query_positions=positions, key_mask=key_mask, blocks=blocks,
                                                     documents=documents)), segments, n_seg


def brute_visibility(geo: AttentionGeometry, b: int, n_k: int) -> torch.Tensor:
    """(B, Nq, Nk) which keys each query sees, by the definition, one pair at a time: the causal / window rule,
    widened to the query's bidirectional block, cut to its document, and the key mask."""
    pos = geo.query_positions.tolist()
    blocks = None if geo.blocks is None else geo.blocks.expand(b, -1)
    docs = None if geo.documents is None else torch.as_tensor(geo.documents).expand(b, -1)
    out = torch.zeros(b, len(pos), n_k, dtype=torch.bool)
    for r in range(b):
        for a, i in enumerate(pos):
            for j in range(n_k):
                ok = (not geo.causal or j <= i) and (geo.window is None or (i - j < geo.window and (
                    geo.causal or j - i < geo.window)))
                if blocks is not None and blocks[r, i] >= 0 and blocks[r, i] == blocks[r, j]:
                    ok = True
                if docs is not None and docs[r, i] != docs[r, j]:
                    ok = False
                out[r, a, j] = ok and (geo.key_mask is None or bool(geo.key_mask[r, j]))
    return out


@settings(max_examples=150, deadline=None)
@given(case=problems())
def test_the_oracles_visibility_is_the_definition(case):
    """The dense oracle (and every backend through it) masks exactly the keys the definition hides."""
    kw, _, _ = case
    q, k = kw["q"], kw["k"]
    geo = kw["geometry"].resolve(q, k)
    want = brute_visibility(geo, q.shape[0], k.shape[2])
    assert torch.equal(torch.isfinite(dense_scores(q, k, geometry=geo)[:, 0]), want)
    assert torch.equal(geo.row_counts(q.shape[0], k.shape[2]), want.sum(-1).float())
    assert torch.equal(geo.key_counts(q.shape[0], k.shape[2]), want.sum(-2).float())


def _check(out, s, segments, n_seg, positions, tol, exact_argmax):
    seen = torch.isfinite(s).any(-1)  # rows that see at least one key
    p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
    lse = torch.logsumexp(s, -1)
    assert torch.equal(torch.isfinite(out.lse), seen)
    close("lse", out.lse[seen], lse[seen], atol=tol * 10, rtol=1e-5)
    onehot = torch.nn.functional.one_hot(segments, n_seg).float()
    close("segment_mass", out.segment_mass, torch.einsum("bhqk,bks->bhqs", p, onehot), atol=tol)
    close("max_prob", out.max_prob, p.max(-1).values, atol=tol)
    # argmax: a key of maximal probability (exactly the first maximum for the twin, which shares the dense
    # arithmetic; Triton's tensor-core dot may order near-ties differently), −1 where nothing is visible
    assert bool((out.argmax[~seen] == -1).all())
    chosen = p.gather(-1, out.argmax.clamp_min(0)[..., None])[..., 0]
    close("probability at argmax", chosen[seen], p.max(-1).values[seen], atol=tol)
    if exact_argmax:
        best = s.max(-1, keepdim=True).values
        first = torch.where(s == best, torch.arange(s.shape[-1]), s.shape[-1]).min(-1).values
        assert torch.equal(out.argmax[seen], first[seen])
    ent = -(p * torch.log(p.clamp_min(1e-38))).sum(-1)
    close("entropy", out.entropy, ent, atol=tol * 10)
    gap = (positions.float()[:, None] - torch.arange(s.shape[-1]).float()).abs()
    dist = torch.where(seen, (p * gap).sum(-1), 0.0)
    close("mean_distance", out.mean_distance, dist, atol=tol * 40)
    close("key_mass", out.key_mass, p.sum(-2), atol=tol * 10)
    assert torch.equal(out.key_count, torch.isfinite(s[:, 0]).sum(-2).float())
    for name, value in out.to_dict().items():
        assert not torch.isnan(value.float()).any(), name


# The Triton interpreter runs about 1000× slower than the twin: fewer examples there (tests/test_triton_stats.py
# covers the kernel's edge cases one by one).
EXAMPLES = {"torch": 60, "fused": 100, "triton": 60 if CUDA else 12, "fused:cuda": 60, "torch:cuda": 30}


@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_equal_dense_softmax(backend):
    settings(max_examples=EXAMPLES[backend], deadline=None, suppress_health_check=[HealthCheck.too_slow])(
        given(case=problems())(lambda case: _statistics_equal_dense_softmax(backend, case)))()


def _statistics_equal_dense_softmax(backend, case):
    kw, segments, n_seg = case
    out = on(backend, attention_stats, kw["q"], kw["k"], geometry=kw["geometry"], segments=segments,
             n_segments=n_seg, stats=ALL, topk=3)
    s = dense_scores(kw["q"], kw["k"], geometry=kw["geometry"])
    # the fused op forms and sums the scores in its own order: with logits near 200 (q × 30), one fp32 ulp of the
    # lse is 1.5e-5, so its probabilities differ from the dense arithmetic by a few 1e-5 there (1e-6 otherwise)
    name, device = placed(backend)
    tol = 3e-5 if name == "fused" else 1e-5
    _check(out, s, segments, n_seg, kw["geometry"].query_positions, tol=tol,
           exact_argmax=name in ("torch", "fused") and device == "cpu")
    p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
    k_top = min(3, s.shape[-1])
    close("topk_prob", out.topk_prob[..., :k_top], p.topk(k_top, -1).values, atol=tol)
    hit = out.topk_index >= 0
    picked = p.gather(-1, out.topk_index.clamp_min(0))
    close("probability at topk_index", torch.where(hit, picked, 0.0), out.topk_prob, atol=tol)


CHUNKED = ["causal", "bidirectional", "offset", "padded", "window", "sinks", "blocks", "documents", "symmetric-window"]


@pytest.mark.parametrize("known_lse", [False, True], ids=["", "known-lse"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("geometry", CHUNKED)
def test_every_chunked_path_runs_several_chunks(backend, geometry, known_lse, monkeypatch):
    """Every chunked loop shrunk so that it runs several times — the twin's key and row blocks, the max pass's row
    blocks (argmax / max_prob / top-k on the fused path), the fused path's masked row blocks and key-mass column
    blocks, Triton's segment chunks (and, under the interpreter, its 32-wide blocks) — gives the dense oracle's
    statistics, on each geometry; also where the rows' lse is known beforehand (as the model's own attention call
    returns it: one pass over the keys)."""
    from interp.kernels import fused_stats, torch_stats

    monkeypatch.setattr(torch_stats, "CHUNK_K", 16)
    monkeypatch.setattr(torch_stats, "CHUNK_ELEMENTS", 6400)  # twin: 50 rows × 16 keys; max pass: 8 rows × all keys
    monkeypatch.setattr(fused_stats, "CHUNK_ELEMENTS", 3200)  # masked calls: 16 rows (key mass: 16 keys) each
    blocks = []
    for module, name in [(torch_stats, "_track_max"), (torch_stats, "_block_scores"), (fused_stats, "_fused")]:
        spy = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _spy=spy, _name=name, **kw: blocks.append(_name) or _spy(*a, **kw))
    if placed(backend)[0] == "triton":  # 40 segments: three launches, the last two alone computing segments 16-39
        from interp.kernels import triton_stats

        monkeypatch.setattr(triton_stats, "SEGMENT_CHUNK", 16)
    g = torch.Generator().manual_seed(CHUNKED.index(geometry))
    b, n, n_seg = 2, 100, 40
    n_q = 30 if geometry == "offset" else n
    q, k = torch.randn(b, 4, n_q, 16, generator=g) * 2, torch.randn(b, 2, n, 16, generator=g)
    key_mask = torch.arange(n)[None] >= torch.tensor([[0], [37]]) if geometry == "padded" else None
    images = torch.full((b, n), -1)  # causal text with bidirectional images: [5, 45) in one row, [60, 98) in the other
    images[0, 5:45], images[1, 60:98] = 0, 3
    geo = AttentionGeometry(causal=geometry not in ("bidirectional", "documents", "symmetric-window"),
                            window={"window": 24, "symmetric-window": 20}.get(geometry),
                            key_mask=key_mask, sinks=torch.tensor([-1.0, 0.5, 2.0, 0.0]) if geometry == "sinks" else None,
                            query_positions=torch.arange(n - 32, n - 2) if geometry == "offset" else None,
                            blocks=images if geometry == "blocks" else None,
                            documents=AttentionGeometry.chunks(n, 36) if geometry == "documents" else None)  # 3 images
    segments = torch.randint(0, n_seg, (b, n), generator=g)
    s = dense_scores(q, k, geometry=dataclasses.replace(geo, sinks=None))
    full = s if geometry != "sinks" else torch.cat([s, geo.sinks[None, :, None, None].expand(b, 4, n_q, 1)], -1)
    lse = torch.logsumexp(full, -1) if known_lse else None
    out = on(backend, attention_stats, q, k, geometry=geo, segments=segments, n_segments=n_seg, stats=ALL, topk=3,
             lse=None if lse is None else lse.to(placed(backend)[1]))
    name, device = placed(backend)
    if geometry == "sinks":  # the oracle's rows with the sink logit as one more column
        close("lse", out.lse, torch.logsumexp(full, -1), atol=1e-5)
        p = torch.softmax(full, -1)[..., :-1]
        close("key_mass", out.key_mass, p.sum(-2), atol=1e-4)
        close("max_prob", out.max_prob, p.max(-1).values, atol=1e-5)
        close("segment_mass", out.segment_mass,
              torch.einsum("bhqk,bks->bhqs", p, torch.nn.functional.one_hot(segments, n_seg).float()), atol=1e-5)
    else:
        _check(out, s, segments, n_seg, geo.resolve(q, k).query_positions, tol=1e-5,
               exact_argmax=name in ("torch", "fused") and device == "cpu")
    several = {"torch": ["_block_scores"], "fused": ["_track_max"] + (["_fused"] * (geometry in ("offset", "padded",
               "window", "blocks", "documents", "symmetric-window"))), "triton": []}[name]
    for what in several:
        assert blocks.count(what) >= 3, (what, blocks.count(what))


@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("geometry", ["causal", "bidirectional", "decode", "padded", "window", "bf16"])
def test_fused_path_equals_the_twin_at_length(geometry, group, monkeypatch):
    """The fused path against the twin at a few hundred tokens, on each geometry (the unmasked SDPA calls, and the
    masked row blocks, split small here so that several run), every GQA ratio, sinks included."""
    from interp.kernels import fused_stats

    g = torch.Generator().manual_seed(group)
    n, n_kv = 300, 2
    n_q = 3 if geometry == "decode" else n
    dtype = torch.bfloat16 if geometry == "bf16" else torch.float32
    q = torch.randn(2, n_kv * group, n_q, 32, generator=g).to(dtype)
    k = torch.randn(2, n_kv, n, 32, generator=g).to(dtype)
    geo = AttentionGeometry(
        causal=geometry != "bidirectional", window=40 if geometry == "window" else None,
        key_mask=torch.arange(n)[None] >= torch.tensor([[0], [57]]) if geometry == "padded" else None,
        query_positions=torch.arange(n - n_q - 2, n - 2) if geometry == "decode" else None,
        sinks=torch.linspace(-1, 2, n_kv * group) if group == 4 else None)
    kw = dict(geometry=geo, segments=torch.arange(n) % 5, stats=ALL, topk=4)
    twin = attention_stats(q, k, **kw, backend="torch")
    monkeypatch.setattr(fused_stats, "CHUNK_ELEMENTS", 2 * 64 * n)  # 64 rows per masked call
    fused = attention_stats(q, k, **kw, backend="fused")
    for name, value in twin.to_dict().items():
        if name in ("argmax", "topk_index"):
            assert torch.equal(value, getattr(fused, name)), name
        else:
            tol = 1e-3 if name == "mean_distance" else 2e-5
            assert torch.allclose(value.float(), getattr(fused, name).float(), atol=tol, rtol=1e-5), name


def test_pooled_map_and_tile_equal_dense():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 45, 16, generator=g), torch.randn(2, 2, 45, 16, generator=g)
    geo = AttentionGeometry(causal=True, window=20)
    p = torch.nan_to_num(torch.softmax(dense_scores(q, k, geometry=geo), -1), nan=0.0)
    pooled = pooled_attention(q, k, block_q=8, block_k=10, geometry=geo)
    assert pooled.shape == (2, 4, 6, 5)
    for i in range(6):
        for j in range(5):
            block = p[:, :, i * 8 : (i + 1) * 8, j * 10 : (j + 1) * 10]
            assert torch.allclose(pooled[:, :, i, j], block.mean((-1, -2)), atol=1e-6)
    top = pooled_attention(q, k, block_q=8, block_k=10, reduce="max", geometry=geo)
    assert torch.allclose(top[:, :, 2, 1], p[:, :, 16:24, 10:20].amax((-1, -2)), atol=1e-6)
    tile = attention_tile(q, k, (30, 41), (5, 33), geometry=geo)
    assert torch.allclose(tile, p[:, :, 30:41, 5:33], atol=1e-6)


@pytest.mark.parametrize("reduce", ["mean", "max"])
@pytest.mark.parametrize("elements", [4 * 12 * 8, 64])
def test_one_pass_pooling_equals_dense(reduce, elements, monkeypatch):
    """Without a given lse the whole map is pooled in one pass (online row sums, rescaled as the row maximum
    grows, over several row and key chunks), or in two passes when its per-row sums would not fit a chunk: the
    same cells as the dense probabilities, with a query that sees no key, windows and soft-capping."""
    from interp.kernels import torch_stats

    monkeypatch.setattr(torch_stats, "CHUNK_K", 12)
    monkeypatch.setattr(torch_stats, "CHUNK_ELEMENTS", elements)
    calls = []
    spy = torch_stats.pooled_one_pass
    monkeypatch.setattr(torch_stats, "pooled_one_pass", lambda *a, **k: calls.append(1) or spy(*a, **k))
    blocks = []
    block_scores = torch_stats._block_scores
    monkeypatch.setattr(torch_stats, "_block_scores", lambda *a, **k: blocks.append(a[3:5]) or block_scores(*a, **k))
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 4, 50, 16, generator=g) * 3, torch.randn(1, 2, 50, 16, generator=g)
    key_mask = torch.ones(1, 50, dtype=torch.bool)
    key_mask[0, 0] = False  # query 0 sees no key
    geo = AttentionGeometry(causal=True, window=30, key_mask=key_mask, softcap=5.0)
    p = torch.nan_to_num(torch.softmax(dense_scores(q, k, geometry=geo), -1), nan=0.0)
    pooled = pooled_attention(q, k, block_q=5, block_k=4, reduce=reduce, geometry=geo)
    padded = torch.nn.functional.pad(p, (0, 2)).unflatten(-1, (13, 4)).unflatten(2, (10, 5))
    expect = padded.amax((3, 5)) if reduce == "max" else padded.sum((3, 5)) / (5 * torch.tensor([4.0] * 12 + [2.0]))
    assert torch.allclose(pooled, expect, atol=1e-6)
    assert bool(calls) == (elements > 64) and len(set(blocks)) > 3  # one pass only where it fits; many chunks


@pytest.mark.parametrize("causal", [True, False])
def test_diagonals_equal_the_dense_matrix(causal):
    """diagonal_attention(offset o)[i] = P[i, pos_i − o], 0 off the matrix or where masked (window, padding,
    a query that sees nothing), with GQA, soft-capping and decode-style query positions."""
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 4, 20, 16, generator=g), torch.randn(2, 2, 30, 16, generator=g)
    key_mask = torch.ones(2, 30, dtype=torch.bool)
    key_mask[1, 3:9] = False
    geo = AttentionGeometry(causal=causal, window=12, key_mask=key_mask, softcap=4.0,
                            query_positions=torch.arange(10, 30))
    p = torch.nan_to_num(torch.softmax(dense_scores(q, k, geometry=geo), -1), nan=0.0)
    offsets = [0, 1, 5, 11, 12, 29, -3]
    got = diagonal_attention(q, k, offsets, geometry=geo)
    for c, off in enumerate(offsets):
        for i in range(20):
            j = 10 + i - off
            want = p[:, :, i, j] if 0 <= j < 30 else torch.zeros(2, 4)
            assert torch.allclose(got[:, :, i, c], want, atol=1e-6), (off, i)


def test_pooled_region_is_a_zoom_of_the_dense_map():
    """Pooling a region keeps each row normalised over every key (causal, window and padding masks shift)."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 4, 60, 16, generator=g), torch.randn(1, 2, 60, 16, generator=g)
    key_mask = torch.ones(1, 60, dtype=torch.bool)
    key_mask[0, [3, 25, 40]] = False
    geo = AttentionGeometry(causal=True, window=25, key_mask=key_mask)
    p = torch.nan_to_num(torch.softmax(dense_scores(q, k, geometry=geo), -1), nan=0.0)
    zoom = pooled_attention(q, k, block_q=4, block_k=3, q_range=(20, 44), k_range=(12, 39), geometry=geo)
    assert zoom.shape == (1, 4, 6, 9)
    for i in range(6):
        for j in range(9):
            block = p[:, :, 20 + 4 * i : 20 + 4 * (i + 1), 12 + 3 * j : 12 + 3 * (j + 1)]
            assert torch.allclose(zoom[:, :, i, j], block.mean((-1, -2)), atol=1e-6)
    exact = pooled_attention(q, k, block_q=1, block_k=1, q_range=(50, 60), k_range=(30, 60), geometry=geo)
    assert torch.allclose(exact, attention_tile(q, k, (50, 60), (30, 60), geometry=geo), atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        pooled_attention(q, k, block_q=2, block_k=2, q_range=(10, 70))


@pytest.mark.parametrize("renormalize", [True, False])
def test_grid_distance_equals_dense(renormalize):
    g = torch.Generator().manual_seed(2)
    rows, cols = 4, 5
    n = 1 + rows * cols  # CLS first
    q, k = torch.randn(1, 3, n, 8, generator=g), torch.randn(1, 3, n, 8, generator=g)
    coords = torch.cat([torch.zeros(1, 2), torch.cartesian_prod(torch.arange(rows), torch.arange(cols)).float()])
    special = torch.zeros(n, dtype=torch.bool)
    special[0] = True
    got = grid_distance(q, k, query_coords=coords, key_coords=coords, special_keys=special, renormalize=renormalize)
    p = torch.softmax(dense_scores(q, k, geometry=AttentionGeometry(causal=False)), -1)[..., 1:]
    dist = torch.cdist(coords, coords[1:])
    want = (p * dist).sum(-1)
    if renormalize:
        want = want / p.sum(-1)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("bad, match", [
    (dict(k=torch.randn(1, 3, 5, 8)), "not a multiple"),
    (dict(k=torch.randn(1, 2, 5, 4)), "differ in batch or head dim"),
    (dict(k=torch.randn(1, 2, 5, 8, dtype=torch.float64)), "must share one of"),
    (dict(q=torch.full((1, 4, 5, 8), float("nan"))), "NaN"),
    (dict(segments=torch.tensor([0, 1, 2, 5, 1]), n_segments=3, stats=["segment_mass"]), "segment ids must lie"),
    (dict(segments=torch.tensor([0, -1, 0, 0, 0]), stats=["segment_mass"]), "segment ids must lie"),
    (dict(stats=["segment_mass"]), "needs segments"),
    (dict(stats=["attention"]), "unknown statistics"),
    (dict(geometry=AttentionGeometry(query_positions=torch.arange(3))), "query_positions must be"),
    (dict(geometry=AttentionGeometry(blocks=torch.tensor([0, 0, 1, 0, -1]))), "one contiguous run"),
    (dict(geometry=AttentionGeometry(documents=torch.tensor([0, 0, -1, 1, 1]))), "document ids must be ≥ 0"),
    (dict(geometry=AttentionGeometry(documents=torch.zeros(6))), "documents must be \\(5,\\)"),
    (dict(geometry=AttentionGeometry(blocks=torch.zeros(5), query_positions=torch.arange(2, 7))), "among the keys"),
    (dict(backend="cuda"), "unknown backend"),
    (dict(lse=torch.zeros(1, 4, 4)), "lse must be a \\(1, 4, 5\\) tensor"),
    (dict(lse=torch.full((1, 4, 5), float("nan"))), "lse contains NaN"),
])
def test_bad_input_is_refused_before_any_kernel(bad, match):
    args = dict(q=torch.randn(1, 4, 5, 8), k=torch.randn(1, 2, 5, 8))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        attention_stats(args.pop("q"), args.pop("k"), **args)


def test_triton_backend_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        attention_stats(torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8), backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_mean_topk_width_and_more_bad_input(backend):
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False
    geo = AttentionGeometry(key_mask=mask)
    st = on(backend, attention_stats, q, k, geometry=geo, topk=8, stats=("key_mass", "key_count", "topk"))
    p = torch.nan_to_num(torch.softmax(dense_scores(q, k, geometry=geo), -1), nan=0.0)
    count = torch.isfinite(dense_scores(q, k, geometry=geo))[:, 0].sum(-2).float()[:, None, :]
    close("key_mean", st.key_mean, torch.where(count > 0, p.sum(-2) / count.clamp_min(1), 0.0), atol=1e-6)
    assert st.topk_index.shape == (2, 4, 6, 8) and bool((st.topk_index[..., 6:] == -1).all())
    for bad, match in [(dict(q=q * float("inf")), "NaN or inf"), (dict(geometry=AttentionGeometry(window=2.5)), "integer"),
                       (dict(topk=65), "topk must be"), (dict(geometry=AttentionGeometry(query_positions=torch.arange(-1, 5))), "≥ 0"),
                       (dict(k=k[:, :, :0]), "at least one")]:
        args = dict(q=q, k=k)
        args.update(bad)
        with pytest.raises(ValueError, match=match):
            on(backend, attention_stats, args.pop("q"), args.pop("k"), **args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal, window, padded", [(True, None, False), (True, 5, True), (False, None, True)])
def test_sink_logits_join_every_softmax_denominator(backend, causal, window, padded):
    """GPT-OSS's learned per-head sinks: one more logit in each row's denominator (a column dropped afterwards),
    against the dense softmax over [scores, sink]; fully masked rows keep only the sink."""
    g = torch.Generator().manual_seed(7)
    b, h, n_kv, n, d = 2, 4, 2, 23, 16
    q, k = torch.randn(b, h, n, d, generator=g) * 2, torch.randn(b, n_kv, n, d, generator=g)
    sinks = torch.tensor([-1.0, 0.5, 2.0, 4.0])
    key_mask = torch.ones(b, n, dtype=torch.bool)
    if padded:
        key_mask[1, :6] = False
    geo = AttentionGeometry(causal=causal, window=window, key_mask=key_mask)
    sunk = dataclasses.replace(geo, sinks=sinks)
    s = dense_scores(q, k, geometry=geo)
    full = torch.cat([s, sinks[None, :, None, None].expand(b, h, n, 1)], -1)
    big_p = torch.softmax(full, -1)
    p = big_p[..., :-1]
    segments = torch.arange(n) % 3
    out = on(backend, attention_stats, q, k, geometry=sunk, segments=segments, stats=ALL, topk=3)
    close("lse", out.lse, torch.logsumexp(full, -1), atol=1e-5)
    assert bool((p.sum(-1) < 1).all()), "the sink takes a share of every row"
    close("max_prob", out.max_prob, p.max(-1).values, atol=1e-5)
    close("topk_prob", out.topk_prob, p.topk(3, -1).values, atol=1e-5)
    close("entropy", out.entropy, -(big_p * torch.log(big_p.clamp_min(1e-38))).sum(-1), atol=1e-4)
    gap = (torch.arange(n).float()[:, None] - torch.arange(n).float()).abs()
    close("mean_distance", out.mean_distance, (p * gap).sum(-1), atol=1e-4)
    close("key_mass", out.key_mass, p.sum(-2), atol=1e-4)
    onehot = torch.nn.functional.one_hot(segments, 3).float()
    close("segment_mass", out.segment_mass, torch.einsum("bhqk,ks->bhqs", p, onehot), atol=1e-5)
    seen = torch.isfinite(s).any(-1)
    assert bool((out.argmax[~seen] == -1).all()) and torch.equal(out.argmax[seen], s.argmax(-1)[seen])
    close("dense_attention", dense_attention(q, k, geometry=sunk), p, atol=1e-6)
    tile = on(backend, attention_tile, q, k, (4, 20), (2, 17), geometry=sunk)
    close("attention_tile", tile, p[:, :, 4:20, 2:17], atol=1e-6)
    pooled = on(backend, pooled_attention, q, k, block_q=5, block_k=4, geometry=sunk)
    close("pooled_attention", pooled[:, :, 1, 2], p[:, :, 5:10, 8:12].mean((-1, -2)), atol=1e-6)
    diag = on(backend, diagonal_attention, q, k, [0, 1], geometry=sunk)
    close("diagonal 0", diag[..., 0], torch.diagonal(p, 0, 2, 3), atol=1e-6)
    close("diagonal 1", diag[:, :, 1:, 1], torch.diagonal(p, -1, 2, 3), atol=1e-6)


def test_sinks_must_be_one_finite_logit_per_query_head():
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="sinks must be \\(4,\\)"):
        attention_stats(q, k, geometry=AttentionGeometry(sinks=torch.zeros(2)))
    with pytest.raises(ValueError, match="finite"):
        attention_stats(q, k, geometry=AttentionGeometry(sinks=torch.tensor([0.0, float("nan"), 0.0, 0.0])))
