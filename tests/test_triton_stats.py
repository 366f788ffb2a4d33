"""`stats_triton` against a dense reference built here with plain torch (in float64 from the same inputs).

Without CUDA the kernel runs under the Triton interpreter (set before Triton is imported), on small shapes.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")
from interp.kernels import AttentionGeometry  # noqa: E402
from interp.kernels.triton_stats import stats_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ALL = frozenset(
    {"lse", "segment_mass", "argmax", "max_prob", "topk", "entropy", "mean_distance", "key_mass", "key_count"}
)


def reference(q, k, *, scale, causal, query_positions, key_mask, window, softcap, segments, n_segments, topk):
    """Every statistic from the dense (B, H, Nq, Nk) probabilities, in float64."""
    b, h, n_q, _ = q.shape
    n_k = k.shape[2]
    kk = k.double().repeat_interleave(h // k.shape[1], dim=1)
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), kk) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    i = query_positions.cpu()[:, None]
    j = torch.arange(n_k)[None, :]
    vis = torch.ones(n_q, n_k, dtype=torch.bool)
    if causal:
        vis &= j <= i
    if window is not None:  # a non-causal window is symmetric
        vis &= ((i - j) < window) & (causal | ((j - i) < window))
    vis = vis[None, None].expand(b, 1, n_q, n_k)
    if key_mask is not None:
        vis = vis & key_mask.cpu()[:, None, None, :]
    s = s.masked_fill(~vis, float("-inf"))
    seen = vis.any(-1).expand(b, h, n_q)
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    logp = torch.log_softmax(s, -1)
    out = {
        "lse": lse,
        "argmax": torch.where(seen, s.argmax(-1), -1),
        "max_prob": p.amax(-1),
        "entropy": -torch.where(p > 0, p * logp, 0.0).sum(-1),
        "mean_distance": (p * (i - j).abs()).sum(-1),
        "key_mass": p.sum(2),
        "key_count": vis[:, 0].sum(1).double(),
    }
    order = torch.sort(s, dim=-1, descending=True, stable=True)
    kk_ = min(topk, n_k)
    top_s, top_i = order.values[..., :kk_], order.indices[..., :kk_]
    out["topk_index"] = torch.full((b, h, n_q, topk), -1, dtype=torch.int64)
    out["topk_index"][..., :kk_] = torch.where(top_s > float("-inf"), top_i, -1)
    out["topk_prob"] = torch.zeros(b, h, n_q, topk, dtype=torch.float64)
    out["topk_prob"][..., :kk_] = p.gather(-1, top_i)
    if segments is not None:
        onehot = torch.nn.functional.one_hot(segments.cpu(), n_segments).double()  # (B, Nk, S)
        out["segment_mass"] = torch.einsum("bhqk,bks->bhqs", p, onehot)
    out["_p"] = p
    return out


def run(q, k, *, scale=None, causal=True, query_positions=None, key_mask=None, window=None, softcap=None,
        segments=None, n_segments=0, topk=3, want=ALL, tol=1e-5, logit_scale=1.0):
    n_k = k.shape[2]
    if query_positions is None:
        query_positions = torch.arange(n_k - q.shape[2], n_k)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if segments is None and "segment_mass" in want:
        want = want - {"segment_mass"}
    kw = dict(scale=scale, causal=causal, query_positions=query_positions, key_mask=key_mask, window=window,
              softcap=softcap, segments=segments, n_segments=n_segments, topk=topk)
    dev = {kname: (v.to(DEVICE) if torch.is_tensor(v) else v) for kname, v in kw.items()}
    q_dev, k_dev = q.to(DEVICE), k.to(DEVICE)
    geo = AttentionGeometry(**{x: dev.pop(x) for x in ("scale", "causal", "query_positions", "key_mask", "window",
                                                      "softcap")}).resolve(q_dev, k_dev)
    got = stats_triton(q_dev, k_dev, geo, want=frozenset(want), **dev)
    ref = reference(q, k, **kw)
    expected = {w for w in want if w != "topk"} | ({"topk_index", "topk_prob"} if "topk" in want else set())
    assert set(got) == expected
    for name, val in got.items():
        val = val.cpu()
        assert not val.is_floating_point() or not torch.isnan(val).any(), name
        r = ref[name]
        assert val.shape == r.shape, (name, val.shape, r.shape)
        if name in ("argmax", "topk_index"):
            continue
        if name == "lse":
            fin = torch.isfinite(r)
            assert torch.equal(fin, torch.isfinite(val)) and (val[~fin] == float("-inf")).all()
            torch.testing.assert_close(val[fin].double(), r[fin], rtol=1e-6, atol=tol * logit_scale)
        elif name == "key_count":
            assert torch.equal(val.double(), r), name
        else:
            scale_ = {"mean_distance": n_k, "key_mass": q.shape[2], "entropy": logit_scale}.get(name, 1.0)
            torch.testing.assert_close(val.double(), r, rtol=0, atol=tol * scale_, msg=name)
    p = ref["_p"]
    if "argmax" in got:  # the chosen key carries the largest probability; -1 exactly when nothing is visible
        a = got["argmax"].cpu()
        assert torch.equal(a == -1, ref["argmax"] == -1)
        pa = p.gather(-1, a.clamp_min(0)[..., None])[..., 0]
        torch.testing.assert_close(pa, p.amax(-1), rtol=0, atol=tol)
    if "topk_index" in got:
        ti = got["topk_index"].cpu()
        assert torch.equal(ti == -1, ref["topk_index"] == -1)
        pt = torch.where(ti >= 0, p.gather(-1, ti.clamp_min(0)), 0.0)
        torch.testing.assert_close(pt, ref["topk_prob"], rtol=0, atol=tol)
        assert (got["topk_prob"].cpu().diff(dim=-1) <= 0).all()
        for row in ti.reshape(-1, ti.shape[-1]).tolist():
            kept = [x for x in row if x >= 0]
            assert len(set(kept)) == len(kept) and row[len(kept):] == [-1] * (len(row) - len(kept))
    return got, ref


def rand(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen).to(dtype)


@pytest.mark.parametrize(
    "b,h,h_kv,n,d,causal",
    [
        (1, 1, 1, 1, 16, True),  # a single token
        (1, 2, 1, 37, 8, False),  # odd N, d padded to 16, GQA 2
        (2, 4, 1, 70, 32, True),  # N not a multiple of the block, GQA 4
        (1, 4, 4, 45, 64, False),  # GQA 1
        (1, 2, 2, 20, 128, True),
        (1, 1, 1, 19, 256, False),
    ],
)
def test_shapes_fp32(b, h, h_kv, n, d, causal):
    g = torch.Generator().manual_seed(n * 7 + d)
    seg = torch.randint(0, 3, (b, n), generator=g)
    run(rand(b, h, n, d, gen=g), rand(b, h_kv, n, d, gen=g), causal=causal, segments=seg, n_segments=3, topk=4)


def test_fp16_inputs_gqa_causal():
    g = torch.Generator().manual_seed(1)
    q, k = rand(1, 4, 100, 32, dtype=torch.float16, gen=g), rand(1, 2, 100, 32, dtype=torch.float16, gen=g)
    run(q, k, segments=torch.randint(0, 4, (1, 100), generator=g), n_segments=4, tol=2e-3)


@pytest.mark.parametrize("d", [16, 64])
def test_bf16_inputs_over_several_blocks(d):
    """bf16, the dtype models run in, every statistic, segment masses included (on Hopper they came out as ±4.6e27
    when the split products shared one accumulator); long enough to take several query and key blocks on a GPU
    (128 × 64) and under the interpreter (32 × 32). The reference is built from the same bf16 values."""
    g = torch.Generator().manual_seed(2)
    n = 300 if torch.cuda.is_available() else 100
    q, k = rand(1, 4, n, d, dtype=torch.bfloat16, gen=g), rand(1, 2, n, d, dtype=torch.bfloat16, gen=g)
    run(q, k, segments=torch.randint(0, 5, (1, n), generator=g), n_segments=5, tol=1e-4)


def test_decode_query_at_last_position():
    g = torch.Generator().manual_seed(3)
    run(rand(2, 4, 1, 64, gen=g), rand(2, 2, 150, 64, gen=g), topk=5)  # default positions: the last key


def test_query_position_offsets_and_non_contiguous_inputs():
    g = torch.Generator().manual_seed(4)
    q = rand(1, 40, 2, 16, gen=g).transpose(1, 2)  # (B, H, Nq, d) with strides of (B, Nq, H, d)
    k = rand(1, 16, 120, 1, gen=g).permute(0, 3, 2, 1)  # d strided
    assert not q.is_contiguous() and not k.is_contiguous()
    run(q, k, query_positions=torch.arange(80, 120))
    perm = torch.randperm(40, generator=g) + 60  # unsorted positions, some far from the end
    run(q, k, query_positions=perm, window=25)


@pytest.mark.parametrize("causal", [True, False])
def test_sliding_window(causal):
    g = torch.Generator().manual_seed(5)
    n = 130
    run(rand(1, 2, n, 16, gen=g), rand(1, 1, n, 16, gen=g), causal=causal, window=17,
        segments=torch.arange(n)[None] // 40, n_segments=4)


def test_softcap():
    g = torch.Generator().manual_seed(6)
    run(rand(1, 2, 50, 16, gen=g), rand(1, 2, 50, 16, gen=g), scale=2.0, softcap=5.0, window=30)


def test_key_mask_padding_and_fully_masked_rows():
    g = torch.Generator().manual_seed(7)
    n = 60
    mask = torch.ones(3, n, dtype=torch.bool)
    mask[0, :9] = False  # left padding: the first 9 causal queries see nothing
    mask[1, 50:] = False  # right padding
    mask[2] = False  # every key masked
    got, _ = run(rand(3, 2, n, 16, gen=g), rand(3, 1, n, 16, gen=g), key_mask=mask, topk=3,
                 segments=torch.randint(0, 2, (3, n), generator=g), n_segments=2)
    assert (got["lse"][2] == float("-inf")).all() and (got["argmax"][2] == -1).all()
    assert (got["entropy"][2] == 0).all() and (got["mean_distance"][2] == 0).all()
    assert (got["lse"][0, :, :9] == float("-inf")).all() and (got["max_prob"][0, :, :9] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_huge_logits(dtype):
    g = torch.Generator().manual_seed(8)
    q = (rand(1, 2, 48, 16, gen=g) * 100).to(dtype)
    k = (rand(1, 1, 48, 16, gen=g) * 100).to(dtype)
    mask = torch.ones(1, 48, dtype=torch.bool)
    mask[0, :3] = False
    got, _ = run(q, k, scale=1.0, key_mask=mask, tol=1e-4, logit_scale=1e4)
    assert got["lse"][0, :, 3:].abs().max() > 1e3  # the logits really are huge


def test_ties_break_to_the_smallest_index():
    # integer q, k and a power-of-two scale: scores are exact, so equal keys tie exactly, across blocks too
    n = 80
    k = torch.zeros(1, 1, n, 16)
    k[0, 0, [5, 40, 41, 70], 0] = 1.0  # four equal maxima
    k[0, 0, [3, 50], 0] = 0.5  # then two equal runners-up
    q = torch.zeros(1, 1, n, 16)
    q[..., 0] = 4.0
    got, _ = run(q, k, scale=1.0, causal=False, topk=7, want=frozenset({"argmax", "topk", "max_prob"}))
    assert (got["argmax"].cpu() == 5).all()
    assert got["topk_index"][0, 0, 0].tolist() == [5, 40, 41, 70, 3, 50, 0]


def test_many_segments_and_large_topk():
    g = torch.Generator().manual_seed(9)
    n = 90
    seg = torch.randint(0, 70, (1, n), generator=g)  # more than one 64-wide segment chunk
    run(rand(1, 2, n, 16, gen=g), rand(1, 1, n, 16, gen=g), segments=seg, n_segments=70, topk=16)


@pytest.mark.parametrize(
    "want",
    [{"argmax"}, {"key_count"}, {"lse"}, {"key_mass"}, {"entropy", "max_prob"}, {"mean_distance", "topk"}],
)
def test_subsets_of_statistics(want):
    g = torch.Generator().manual_seed(10)
    run(rand(1, 2, 33, 16, gen=g), rand(1, 1, 33, 16, gen=g), want=frozenset(want), window=9)


def test_topk_zero_gives_empty_tensors():
    g = torch.Generator().manual_seed(11)
    q, k = rand(1, 1, 4, 16, gen=g).to(DEVICE), rand(1, 1, 4, 16, gen=g).to(DEVICE)
    geo = AttentionGeometry(scale=0.25, causal=True, query_positions=torch.arange(4).to(DEVICE)).resolve(q, k)
    got = stats_triton(q, k, geo, segments=None, n_segments=0, topk=0, want=frozenset({"topk", "lse"}))
    assert got["topk_index"].shape == (1, 1, 4, 0) and got["topk_prob"].shape == (1, 1, 4, 0)
    assert torch.isfinite(got["lse"]).all()


def test_softcap_saturation_ties():
    # different raw logits (20, 30, 50 · cap) all saturate to exactly the cap: they tie, smallest index first
    n = 70
    k = torch.zeros(1, 1, n, 16)
    k[0, 0, :, 1] = torch.linspace(-1, 1, n)  # the rest: small distinct logits
    k[0, 0, [60, 12, 45], 0] = torch.tensor([20.0, 30.0, 50.0])
    q = torch.zeros(1, 1, 1, 16)
    q[..., 0] = 2.0
    q[..., 1] = 0.5
    got, _ = run(q, k, scale=1.0, softcap=2.0, causal=False, topk=4, want=frozenset({"argmax", "topk", "lse"}))
    assert got["argmax"].item() == 12
    assert got["topk_index"][0, 0, 0, :3].tolist() == [12, 45, 60]


@pytest.mark.parametrize("dtype, d, n_q, topk", [(torch.bfloat16, 64, 4096, 0), (torch.float16, 256, 1, 5),
                                                 (torch.float32, 32, 300, 40), (torch.float32, 128, 9, 0)])
def test_gpu_autotuning_candidates_fit_the_kernel(dtype, d, n_q, topk):
    """On a GPU the kernel is autotuned (this machine may have none: the candidates and the tuner are checked as
    far as they can be without one): every candidate fits the problem (one query block for a decoding query, at
    most 64 rows with a long top-k list, 4 warps under 64 rows), and the tuning key and the zeroed key mass name
    the kernel's own arguments."""
    from interp.kernels import triton_stats

    elem = torch.empty(0, dtype=dtype).element_size()
    k_pad = max(2, triton_stats._pow2(topk)) if topk else 2
    for heads in (1, 4, 16):
        configs = triton_stats._configs(max(16, triton_stats._pow2(d)), elem, n_q, k_pad, heads)
        assert configs and len(set(configs)) == len(configs)
        for bm, bn, warps, stages in configs:
            assert heads <= bm <= max(16, triton_stats._pow2(n_q) * heads) and bm % heads == 0
            assert (bm <= 64 or k_pad < 32) and (warps == 4 or bm >= 64)
    tuner = triton_stats._tuned(configs)
    assert set(triton_stats._TUNING_KEY) | {"km_ptr"} <= set(tuner.arg_names)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in tuner.configs] == list(configs)
