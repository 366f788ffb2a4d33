"""Attention-sink scoring at long context: per-key attention received (α_k) for every head, from the kernels
during the model's own SDPA forward ("sinks": the whole `sinks` sample, massive activations included, with the
kernels' default backend; "twin": the same with the chunked torch twin, `INTERP_KERNELS=torch`), against the
eager path (`output_attentions=True`, α from the stored N × N matrices of all layers) and a plain forward.

Each measurement runs in its own process with an address-space cap (--cap-gib), so a path that does not fit
fails cleanly instead of taking the machine down, and its peak memory (RSS on CPU, CUDA peak on GPU) is its own.

    python benchmarks/sinks_speed.py                          # SmolLM2-135M on CPU, 1024 … 8192 tokens
    python benchmarks/sinks_speed.py --device cuda --lengths 8192,32768
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

from _measure import measure

PATHS = ("plain", "sinks", "twin", "eager")


def one(args) -> dict:
    import torch

    import interp
    from interp.analyses import get_analysis
    from interp.analyses.base import Options
    from interp.analyses.sinks import _inputs
    from interp.progress import QUIET

    if args.one == "twin":
        os.environ["INTERP_KERNELS"] = "torch"
    if args.device == "cpu":
        cap = int(args.cap_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    kwargs = {"attn_implementation": "eager"} if args.one == "eager" else {}
    model = interp.load_model(args.model, device=args.device, **kwargs)
    an = get_analysis("sinks")
    params = an.resolve({"preset": "long", "inputs": "natural"})
    options = Options(max_tokens=args.length, samples=1)
    [sample] = an.plan(model, options, params)
    inputs, _ = _inputs(model, sample, params)
    cuda = model.device.type == "cuda"

    def run():
        with torch.no_grad():
            if args.one == "plain":
                return model.hf(**inputs)
            if args.one in ("sinks", "twin"):
                return an.score_sample(model, sample, options, params, QUIET)
            out = model.hf(**inputs, output_attentions=True)
            n = inputs["input_ids"].shape[-1]
            count = torch.arange(n, 0, -1, device=model.device)
            return [(a[0].float().sum(-2) / count).cpu() for a in out.attentions]  # α (H, N) per layer

    with torch.no_grad():  # warm-up on a short prefix
        model.hf(**{k: v[:, :64] for k, v in inputs.items()})
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"path": args.one, "length": int(inputs["input_ids"].shape[-1]), "seconds": seconds, "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lengths", default="1024,2048,4096,8192")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--cap-gib", type=float, default=16.0, help="address-space cap per CPU measurement")
    parser.add_argument("--one", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    import torch

    print(f"# {args.model} on {args.device} ({torch.get_num_threads()} threads), torch {torch.__version__}; "
          f"CPU runs capped at {args.cap_gib:g} GiB")
    print(f"{'length':>7} {'path':>6} {'seconds':>9} {'peak GiB':>9} {'÷ plain':>9}")
    for length in [int(x) for x in args.lengths.split(",")]:
        rows = {}
        for path in args.paths.split(","):
            cmd = ["--one", path, "--length", str(length), "--model", args.model, "--device", args.device,
                   "--cap-gib", str(args.cap_gib)]
            result = measure(__file__, cmd, f"{length:>7} {path:>6}")
            if result is not None:
                rows[path] = result
        plain = rows.get("plain", {}).get("seconds")
        for path, r in rows.items():
            ratio = f"{r['seconds'] / plain:.2f}x" if plain else "-"
            print(f"{r['length']:>7} {path:>6} {r['seconds']:>9.2f} {r['peak_gib']:>9.2f} {ratio:>9}")


if __name__ == "__main__":
    main()
