"""The torch twin of the statistics kernels against dense eager softmax, on CPU.

H = 9, d = 64 (SmolLM2-135M's heads), causal, fp32, one sequence, N = 1k … 32k. Statistics asked for:
lse + segment_mass (4 segments) + argmax/max_prob + entropy. The dense baseline builds the (H, N, N) scores,
softmax and the same statistics from them. Each (method, N) runs in its own process under an address-space
limit (--mem-gb, default 20 GiB), so the size at which dense runs out of memory is found, not guessed.
Prints times, peak memory (peak RSS growth) and ratios twin / dense.

    python benchmarks/kernels_cpu.py [--sizes 1024,2048,4096,8192,16384,32768] [--mem-gb 20]
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


def run(method: str, n: int) -> dict:
    import torch

    from interp.kernels import attention_stats

    torch.manual_seed(0)
    q, k = torch.randn(1, H, n, D), torch.randn(1, H_KV, n, D)
    segments = torch.randint(0, 4, (n,))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if method == "twin":
        attention_stats(q, k, segments=segments, stats=("lse", "segment_mass", "argmax", "max_prob", "entropy"),
                        backend="torch")
    else:
        kk = k.repeat_interleave(H // H_KV, dim=1)
        s = torch.einsum("bhqd,bhkd->bhqk", q, kk) * D**-0.5
        s.masked_fill_(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        lse = torch.logsumexp(s, -1)
        p = torch.softmax(s, -1)
        p.max(-1)
        torch.einsum("bhqk,bks->bhqs", p, torch.nn.functional.one_hot(segments, 4).float()[None])
        (lse - (p * s.nan_to_num(neginf=0.0)).sum(-1))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"seconds": seconds, "peak_bytes": peak}


def child(method: str, n: int, mem_gb: float) -> dict | None:
    code = (f"import resource, json, sys; sys.argv=['x']; "
            f"resource.setrlimit(resource.RLIMIT_AS, ({int(mem_gb * 2**30)}, {int(mem_gb * 2**30)})); "
            f"import importlib.util as u; s=u.spec_from_file_location('b', {__file__!r}); m=u.module_from_spec(s); "
            f"s.loader.exec_module(m); print(json.dumps(m.run({method!r}, {n})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        return None  # out of memory under the limit
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--mem-gb", type=float, default=20.0)
    args = ap.parse_args()
    import torch

    print(f"CPU {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; H={H}, "
          f"H_kv={H_KV}, d={D}, causal fp32; address-space limit {args.mem_gb} GiB per run")
    print(f"{'N':>6} {'dense s':>9} {'dense GiB':>10} {'twin s':>8} {'twin GiB':>9} {'time ×':>7} {'memory ×':>9}")
    for n in (int(x) for x in args.sizes.split(",")):
        dense, twin = child("dense", n, args.mem_gb), child("twin", n, args.mem_gb)
        gib = lambda r: f"{r['peak_bytes'] / 2**30:.3f}" if r else "OOM"  # noqa: E731
        sec = lambda r: f"{r['seconds']:.2f}" if r else "OOM"  # noqa: E731
        ratio_t = f"{twin['seconds'] / dense['seconds']:.2f}" if dense and twin else "-"
        ratio_m = f"{twin['peak_bytes'] / max(dense['peak_bytes'], 1):.3f}" if dense and twin else "-"
        print(f"{n:>6} {sec(dense):>9} {gib(dense):>10} {sec(twin):>8} {gib(twin):>9} {ratio_t:>7} {ratio_m:>9}",
              flush=True)


if __name__ == "__main__":
    main()
