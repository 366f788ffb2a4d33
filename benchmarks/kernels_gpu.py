"""The statistics kernels on a GPU — Triton and the fused path through CUDA SDPA — against SDPA's forward and
dense eager softmax.

Shapes of issue 3: bf16, d = 128, H = 32 (MHA), causal, one sequence, N = 4k, 8k, 16k, 32k, and the statistics
alone at 128k. Each backend computes every statistic (lse, segment_mass over 4 segments, argmax, max_prob, entropy,
mean_distance, key_mass, key_count) in one call: Triton from q and k alone (two passes over the keys), Triton with
the rows' lse given ("triton+lse": what a capture passes on from the model's own SDPA call, one pass), and the
fused path (widened to fp32, through SDPA's memory-efficient op). Times are medians of CUDA-event timings after
warm-up; memory is the peak allocated above the inputs. Prints ratios ours / SDPA and ours / dense, measured in the
same run. Targets (issue 27): time ≤ 1.5× SDPA's forward at 8k–32k, peak memory ≤ 1.1× SDPA's; 32 heads × 32k must
run where dense eager cannot.

    python benchmarks/kernels_gpu.py [--sizes 4096,8192,16384,32768] [--stats-only 131072] [--json out.json]

With `--device cpu` (and TRITON_INTERPRET=1) it runs tiny shapes through the interpreter: a smoke test of the
script itself, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

STATS = ("lse", "segment_mass", "argmax", "max_prob", "entropy", "mean_distance", "key_mass", "key_count")


def timed(fn, device: str, repeats: int) -> tuple[float, int]:
    """(median seconds, peak bytes allocated above the current allocation) of fn()."""
    cuda = device.startswith("cuda")
    fn()  # warm-up (and Triton compilation)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() - base if cuda else 0
    return statistics.median(times), peak


def dense_stats(q, k, segments):
    s = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    n = q.shape[2]
    s.masked_fill_(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1)
    p.max(-1)
    p @ F.one_hot(segments, 4).to(p.dtype)
    return lse - (p * s.nan_to_num(neginf=0.0)).sum(-1)


def measure(n: int, heads: int, d: int, dtype, device: str, repeats: int, dense: bool) -> dict:
    from interp.kernels import attention_stats

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, d, device=device, dtype=dtype) for _ in range(3))
    segments = torch.randint(0, 4, (n,), device=device)
    row = {"N": n}
    row["ours_s"], row["ours_bytes"] = timed(
        lambda: attention_stats(q, k, segments=segments, n_segments=4, stats=STATS, backend="triton"), device, repeats)
    lse = attention_stats(q, k, stats=("lse",), backend="triton").lse  # as the model's SDPA call would return it
    row["lse_s"], row["lse_bytes"] = timed(
        lambda: attention_stats(q, k, segments=segments, n_segments=4, stats=STATS, backend="triton", lse=lse),
        device, repeats)
    row["fused_s"], row["fused_bytes"] = timed(
        lambda: attention_stats(q, k, segments=segments, n_segments=4, stats=STATS, backend="fused"), device, repeats)
    row["sdpa_s"], row["sdpa_bytes"] = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                             device, repeats)
    row["dense"] = "skipped"
    if dense:
        try:
            row["dense_s"], row["dense_bytes"] = timed(lambda: dense_stats(q, k, segments), device, repeats)
            row["dense"] = "ran"
        except torch.OutOfMemoryError:
            row["dense"] = "out of memory"
            torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4096,8192,16384,32768")
    ap.add_argument("--stats-only", default="131072", help="sizes measured for ours (and SDPA) only")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.device == "cpu":  # interpreter smoke test
        dtype = torch.float32
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu (Triton interpreter)"
    import triton

    print(f"{name}; torch {torch.__version__}, triton {triton.__version__}; H={args.heads}, d={args.dim}, "
          f"{args.dtype}, causal, B=1; median of {args.repeats}")
    print(f"{'N':>7} {'triton ms':>9} {'+lse ms':>9} {'fused ms':>9} {'sdpa ms':>9} {'dense ms':>9} "
          f"{'triton/sdpa':>11} {'+lse/sdpa':>9} {'fused/sdpa':>10} {'mem/sdpa':>9} {'+lse mem':>9} {'fused mem':>9} "
          f"{'triton/dense':>12}")
    rows = []
    sizes = [(int(x), True) for x in args.sizes.split(",") if x]
    sizes += [(int(x), False) for x in args.stats_only.split(",") if x]
    for n, full in sizes:
        r = measure(n, args.heads, args.dim, dtype, args.device, args.repeats, dense=full)
        rows.append(r)
        ms = lambda x: f"{x * 1e3:9.2f}" if x is not None else ("      OOM" if r["dense"] != "skipped" else "        -")  # noqa: E731
        ratio = lambda a, b: f"{a / b:9.2f}" if a is not None and b else "        -"  # noqa: E731
        print(f"{n:>7} {ms(r['ours_s'])} {ms(r['lse_s'])} {ms(r['fused_s'])} {ms(r.get('sdpa_s'))} "
              f"{ms(r.get('dense_s'))} {ratio(r['ours_s'], r.get('sdpa_s')):>11} {ratio(r['lse_s'], r.get('sdpa_s'))} "
              f"{ratio(r['fused_s'], r.get('sdpa_s')):>10} {ratio(r['ours_bytes'], r.get('sdpa_bytes'))} "
              f"{ratio(r['lse_bytes'], r.get('sdpa_bytes'))} {ratio(r['fused_bytes'], r.get('sdpa_bytes'))} "
              f"{ratio(r['ours_s'], r.get('dense_s')):>12}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "heads": args.heads, "dim": args.dim, "dtype": args.dtype, "rows": rows}, f,
                      indent=2)


if __name__ == "__main__":
    main()
