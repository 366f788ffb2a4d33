"""What per-head statistics cost on top of the model's own forward: every layer of SmolLM2-135M, every head,
against the plain forward of the same tokens.

Modes, each in its own process (best of --repeats):
- `plain`: the forward alone.
- `twin`: capture + `call_stats` of every statistic (lse, entropy, max_prob, argmax, mean_distance, segment_mass
  over 2 segments, key_mass, key_count) on the chunked torch twin (`INTERP_KERNELS=torch`).
- `fused`: the same on the fused path (SDPA's flash op with crafted value columns), after the model's call.
- `narrow`: every statistic but the entropy, on the fused path, after the model's call.
- `riding`: the same with `capture(stats=)`: the segment and position columns ride in the model's own SDPA call
  (its output unchanged, bit for bit); key mass and the max pass take passes of their own. (The entropy's key
  columns are as wide as the head, so they never ride: riding would cost what a call of their own costs.)

    python benchmarks/stats_cost.py [--tokens 2048,4096] [--modes plain,twin,fused,narrow,riding]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

MODES = ("plain", "twin", "fused", "narrow", "riding")
ALL = ("lse", "entropy", "max_prob", "argmax", "mean_distance", "segment_mass", "key_mass", "key_count")
NARROW = tuple(s for s in ALL if s != "entropy")


def measure(model_name: str, n_tokens: int, repeats: int, mode: str) -> dict:
    if mode == "twin":
        os.environ["INTERP_KERNELS"] = "torch"
    import torch

    import interp
    from interp.hooks import trace
    from interp.kernels import call_stats

    torch.manual_seed(0)
    model = interp.load_model(model_name, dtype="float32")
    ids = torch.randint(100, model.config.vocab_size, (1, n_tokens))
    request = dict(segments=(torch.arange(n_tokens) > 0).long()[None], n_segments=2,
                   stats=NARROW if mode in ("narrow", "riding") else ALL)
    rode = []

    def probe(call):
        call_stats(call, **request)
        rode.append(call.stats is not None)

    def run():
        with torch.no_grad():
            if mode == "plain":
                model.hf(input_ids=ids)
            else:
                trace(model, {"input_ids": ids}, probe, stats=request if mode == "riding" else None)

    run()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"mode": mode, "seconds": min(times), "rode": sum(rode) / max(len(rode), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", default="2048,4096")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--_child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(measure(args.model, int(args.tokens), args.repeats, args._child)))
        return
    import torch

    print(f"# {args.model}, fp32, CPU {platform.machine()} ({torch.get_num_threads()} threads), torch "
          f"{torch.__version__}; best of {args.repeats}; every layer, every head")
    print(f"{'tokens':>7} {'mode':>8} {'seconds':>8} {'÷ plain':>8} {'calls ridden':>13}")
    for n in (int(x) for x in args.tokens.split(",")):
        plain = None
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--model", args.model, "--tokens", str(n), "--repeats",
                   str(args.repeats), "--_child", mode]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
                           .splitlines()[-1])
            plain = r["seconds"] if mode == "plain" else plain
            ratio = f"{r['seconds'] / plain:.2f}x" if plain else "-"
            print(f"{n:>7} {mode:>8} {r['seconds']:8.2f} {ratio:>8} {r['rode']:>13.0%}", flush=True)


if __name__ == "__main__":
    main()
