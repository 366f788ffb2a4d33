"""The statistics kernels on CPU against the model's own attention and against dense eager softmax.

H = 9, d = 64 (SmolLM2-135M's heads), causal, fp32, one sequence, N = 1k … 32k. Methods: `sdpa` (the plain
attention forward the statistics should cost about as much as: F.scaled_dot_product_attention with GQA),
`dense` (the (H, N, N) scores, softmax and the statistics from them), `twin` (the chunked torch twin) and
`fused` (the fused path through SDPA's CPU flash op). Statistics (--stats): `default` = lse + segment_mass
(4 segments) + argmax/max_prob + entropy; `all` adds mean_distance and key_mass; `lse+entropy` is the pair the
summary and taxonomy statistics start from. Each (method, N) runs in its own process under an address-space
limit (--mem-gb, default 20 GiB), so the size at which dense runs out of memory is found, not guessed.
Prints times, peak memory (peak RSS growth) and ratios to the SDPA forward.

    python benchmarks/kernels_cpu.py [--sizes 1024,2048,4096,8192,16384,32768] [--mem-gb 20] [--stats all]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

H, H_KV, D = 9, 3, 64


STATS = {"default": ("lse", "segment_mass", "argmax", "max_prob", "entropy"),
         "all": ("lse", "segment_mass", "argmax", "max_prob", "entropy", "mean_distance", "key_mass"),
         "lse+entropy": ("lse", "entropy")}
METHODS = ("sdpa", "dense", "twin", "fused")


def run(method: str, n: int, stats: str = "default") -> dict:
    import torch

    from interp.kernels import attention_stats

    torch.manual_seed(0)
    q, k = torch.randn(1, H, n, D), torch.randn(1, H_KV, n, D)
    segments = torch.randint(0, 4, (n,))
    v = torch.randn(1, H_KV, n, D) if method == "sdpa" else None
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if method in ("twin", "fused"):
        attention_stats(q, k, segments=segments, stats=STATS[stats], backend="torch" if method == "twin" else "fused")
    elif method == "sdpa":
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        kk = k.repeat_interleave(H // H_KV, dim=1)
        s = torch.einsum("bhqd,bhkd->bhqk", q, kk) * D**-0.5
        s.masked_fill_(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        lse = torch.logsumexp(s, -1)
        p = torch.softmax(s, -1)
        p.max(-1)
        torch.einsum("bhqk,bks->bhqs", p, torch.nn.functional.one_hot(segments, 4).float()[None])
        (lse - (p * s.nan_to_num(neginf=0.0)).sum(-1))
        if stats == "all":
            (p * (torch.arange(n)[:, None] - torch.arange(n)[None]).abs()).sum(-1)
            p.sum(-2)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"seconds": seconds, "peak_bytes": peak}


def child(method: str, n: int, mem_gb: float, stats: str) -> dict | None:
    code = (f"import resource, json, sys; sys.argv=['x']; "
            f"resource.setrlimit(resource.RLIMIT_AS, ({int(mem_gb * 2**30)}, {int(mem_gb * 2**30)})); "
            f"import importlib.util as u; s=u.spec_from_file_location('b', {__file__!r}); m=u.module_from_spec(s); "
            f"s.loader.exec_module(m); print(json.dumps(m.run({method!r}, {n}, {stats!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        return None  # out of memory under the limit
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--mem-gb", type=float, default=20.0)
    ap.add_argument("--stats", choices=sorted(STATS), default="default")
    ap.add_argument("--methods", default=",".join(METHODS), help="which of sdpa,dense,twin,fused to run")
    args = ap.parse_args()
    import torch

    methods = args.methods.split(",")
    print(f"CPU {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; H={H}, "
          f"H_kv={H_KV}, d={D}, causal fp32; stats {args.stats}: {', '.join(STATS[args.stats])}; address-space "
          f"limit {args.mem_gb} GiB per run; seconds (peak GiB), and × the SDPA forward")
    print(f"{'N':>6} " + " ".join(f"{m:>20}" for m in methods))
    for n in (int(x) for x in args.sizes.split(",")):
        results = {m: child(m, n, args.mem_gb, args.stats) for m in methods}
        base = results.get("sdpa")
        cells = []
        for m in methods:
            r = results[m]
            if r is None:
                cells.append(f"{'out of memory':>20}")
                continue
            ratio = f" {r['seconds'] / base['seconds']:5.1f}×" if base and m != "sdpa" else ""
            cells.append(f"{r['seconds']:7.2f} s ({r['peak_bytes'] / 2**30:5.2f}){ratio}".rjust(20))
        print(f"{n:>6} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
