"""What per-head statistics cost on top of the model's own forward: every layer, every head, against the plain
forward of the same tokens.

Shapes (`--shape`):
- `smollm2` (default): the real weights of `--model` (default SmolLM2-135M) in fp32.
- `llama-1b`: Llama-3.2-1B's shapes (16 layers, hidden 2048, 32 query / 8 KV heads, head dim 64, vocab 128256,
  tied embeddings) with random weights (speed does not depend on them), bf16, SDPA; `--layers N` keeps the first N
  layers (a smoke test). The model returns the last position's logits only, so that memory measures attention and
  the stream rather than an N × 128256 logits matrix.

Modes, each in its own process (best of --repeats after a warm-up; on CUDA synchronised, with the peak memory
allocated during the timed runs):
- `plain`: the forward alone.
- `capture`: the forward with capture of q and k, the probe doing nothing.
- `stats`: every statistic (lse, entropy, max_prob, argmax, mean_distance, segment_mass over 2 segments, key_mass,
  key_count) by `call_stats` on the default backend (Triton on CUDA), with `capture(stats=)` so that they ride in
  the model's own SDPA call where they can.
- `eager`: the plain forward with eager attention and `output_attentions=True` (what TransformerLens / nnsight
  need); out of memory is reported as such.
- `twin`: every statistic after each layer's call on the chunked torch twin (`INTERP_KERNELS=torch`).
- `fused`: the same on the fused path (SDPA's flash op with crafted value columns), after the model's call.
- `narrow`: every statistic but the entropy, on the fused path, after the model's call.
- `riding`: the same with `capture(stats=)`: the segment and position columns ride in the model's own SDPA call
  (its output unchanged, bit for bit); key mass and the max pass take passes of their own. (The entropy's key
  columns are as wide as the head, so they never ride: riding would cost what a call of their own costs.)

Defaults: `smollm2` on CPU runs plain, twin, fused, narrow, riding at 2048 and 4096 tokens; `llama-1b` runs plain,
capture, stats, eager at 4096 … 131072 tokens on CUDA (64 on CPU). A mode running past `--timeout` seconds is
killed and reported as timed out.

    python benchmarks/stats_cost.py [--tokens 2048,4096] [--modes plain,twin,fused,narrow,riding]
    python benchmarks/stats_cost.py --device cuda --shape llama-1b [--json rows.json]
    python benchmarks/stats_cost.py --device cpu --shape llama-1b --layers 1 --tokens 64   # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

MODES = ("plain", "capture", "stats", "eager", "twin", "fused", "narrow", "riding")
DEFAULT_MODES = {"smollm2": ("plain", "twin", "fused", "narrow", "riding"),
                 "llama-1b": ("plain", "capture", "stats", "eager")}
DEFAULT_TOKENS = {"smollm2": "2048,4096", "llama-1b": {"cuda": "4096,16384,32768,131072", "cpu": "64"}}
ALL = ("lse", "entropy", "max_prob", "argmax", "mean_distance", "segment_mass", "key_mass", "key_count")
NARROW = tuple(s for s in ALL if s != "entropy")
BACKEND = {"twin": "torch", "fused": "fused", "narrow": "fused", "riding": "fused"}  # the others: the default one
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                max_position_embeddings=131072, tie_word_embeddings=True)


def llama_1b(device: str, layers: int | None, attn: str):
    """Llama-3.2-1B's shapes with random weights, bf16 on `device`, wrapped by `interp.load_model`. The weights are
    drawn once as transformers' Llama initialisation draws them (normal(0, 0.02), norms at 1), without its slower
    initialisation passes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights

    import interp

    config = LlamaConfig(**{**LLAMA_1B, "num_hidden_layers": layers or LLAMA_1B["num_hidden_layers"]},
                         attn_implementation=attn)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device), no_init_weights():
        hf = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    hf.tie_weights()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else p.fill_(1.0)
    return interp.load_model(hf)


def measure(args, n_tokens: int, mode: str) -> dict:
    """One mode at one size, in this process: its best time, peak memory (CUDA) and the share of layer calls whose
    statistics rode the model's own call."""
    if mode in BACKEND:
        os.environ["INTERP_KERNELS"] = BACKEND[mode]
    import torch

    import interp
    from interp.hooks import trace
    from interp.kernels import call_stats

    torch.manual_seed(0)
    attn = "eager" if mode == "eager" else "sdpa"
    if args.shape == "llama-1b":
        model = llama_1b(args.device, args.layers, attn)
        extra = {"logits_to_keep": 1}
    else:
        model = interp.load_model(args.model, dtype="float32", device=args.device,
                                  **({"attn_implementation": attn} if mode == "eager" else {}))
        extra = {}
    ids = torch.randint(100, model.config.vocab_size, (1, n_tokens), device=args.device)
    request = dict(segments=(torch.arange(n_tokens, device=args.device) > 0).long()[None], n_segments=2,
                   stats=NARROW if mode in ("narrow", "riding") else ALL)
    rode = []

    def probe(call):
        call_stats(call, **request)
        rode.append(call.stats is not None or call.lse is not None)  # statistics or the lse rode

    def run():
        with torch.no_grad():
            if mode in ("plain", "eager"):
                model.hf(input_ids=ids, output_attentions=mode == "eager", **extra)
            elif mode == "capture":
                trace(model, {"input_ids": ids, **extra}, lambda call: None)
            else:
                trace(model, {"input_ids": ids, **extra}, probe, stats=request if mode in ("stats", "riding") else None)

    cuda = args.device == "cuda"
    row = {"tokens": n_tokens, "mode": mode}
    try:
        run()  # warm-up (and Triton compilation)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        rode.clear()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            run()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        return {**row, "error": "out of memory"}
    return {**row, "seconds": min(times), "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "rode": sum(rode) / max(len(rode), 1)}


def run_mode(args, n: int, mode: str) -> dict:
    """One mode in its own process; a failure, out of memory or a timeout becomes the row's `error`."""
    cmd = [sys.executable, __file__, "--model", args.model, "--shape", args.shape, "--device", args.device,
           "--tokens", str(n), "--repeats", str(args.repeats), "--_child", mode]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                              env={**os.environ, "TQDM_DISABLE": "1"})
    except subprocess.TimeoutExpired:
        return {"tokens": n, "mode": mode, "error": "timed out"}
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return {"tokens": n, "mode": mode, "error": f"failed: {last}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def header(args) -> str:
    import torch
    import transformers
    import triton

    where = (torch.cuda.get_device_name() if args.device == "cuda"
             else f"CPU {platform.machine()} ({torch.get_num_threads()} threads)")
    what = (f"{args.model}, fp32" if args.shape == "smollm2"
            else f"llama-1b shapes{f' ({args.layers} of 16 layers)' if args.layers else ''}, random weights, bf16")
    return (f"# {what}, {where}; torch {torch.__version__}, triton {triton.__version__}, transformers "
            f"{transformers.__version__}; {datetime.date.today()}; best of {args.repeats}; every layer, every head")


def line(r: dict) -> str:
    """One row of the printed table."""
    if "error" in r:
        return f"{r['tokens']:>7} {r['mode']:>8} {r['error']}"
    peak = f"{r['peak_bytes'] / 2**30:9.2f}" if r["peak_bytes"] else f"{'-':>9}"
    ratio, peak_ratio = (f"{x:.2f}x" if x else "-" for x in (r["ratio"], r["peak_ratio"]))
    return f"{r['tokens']:>7} {r['mode']:>8} {r['seconds']:8.2f} {ratio:>8} {peak} {peak_ratio:>8} {r['rode']:>13.0%}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="the real model of --shape smollm2")
    ap.add_argument("--shape", choices=tuple(DEFAULT_MODES), default="smollm2")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--layers", type=int, help="llama-1b: keep the first N layers (smoke tests)")
    ap.add_argument("--tokens", help="sizes, comma-separated (default: by shape and device)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--modes", help=f"comma-separated, of {', '.join(MODES)} (default: by shape)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per mode before it is killed")
    ap.add_argument("--json", help="also write every row to this file")
    ap.add_argument("--_child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(measure(args, int(args.tokens), args._child)))
        return
    tokens = args.tokens or DEFAULT_TOKENS[args.shape]
    tokens = tokens[args.device] if isinstance(tokens, dict) else tokens
    modes = args.modes.split(",") if args.modes else DEFAULT_MODES[args.shape]
    unknown = set(modes) - set(MODES)
    if unknown:
        ap.error(f"unknown modes {', '.join(sorted(unknown))}; choose from {', '.join(MODES)}")

    title = header(args)
    print(title)
    print(f"{'tokens':>7} {'mode':>8} {'seconds':>8} {'÷ plain':>8} {'peak GiB':>9} {'÷ plain':>8} "
          f"{'calls ridden':>13}", flush=True)
    rows = []
    for n in (int(x) for x in tokens.split(",")):
        plain = None
        for mode in modes:
            r = run_mode(args, n, mode)
            if "error" not in r:
                plain = r if mode == "plain" else plain
                r["ratio"] = r["seconds"] / plain["seconds"] if plain else None
                r["peak_ratio"] = r["peak_bytes"] / plain["peak_bytes"] if plain and r["peak_bytes"] else None
            rows.append(r)
            if args.json:  # after every row: a run stopped part-way keeps what it measured
                with open(args.json, "w") as f:
                    json.dump({"header": title, "shape": args.shape, "device": args.device, "rows": rows}, f,
                              indent=2)
            print(line(r), flush=True)


if __name__ == "__main__":
    main()
