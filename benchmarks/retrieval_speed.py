"""Retrieval-head scoring speed: the fast path (the model's own SDPA, argmax of each step's query row from the
kernels) against the reference code's procedure (eager attention, `output_attentions` at every decode step, a
Python loop over heads), and against plain greedy generation (the scoring overhead), on the same NIAH samples.

Each measurement runs in its own process, so peak memory (RSS on CPU, CUDA peak on GPU) is its own. Prints one
row per context length with times and the ratios; a path that runs out of memory is reported as such.

    python benchmarks/retrieval_speed.py                        # SmolLM2-135M on CPU, 2048 and 8192 tokens
    python benchmarks/retrieval_speed.py --lengths 32768 --device cuda --shape llama-7b --paths plain,fast
"""

from __future__ import annotations

import argparse
import json
import resource
import time

from _measure import measure

PATHS = ("plain", "fast", "paper")


def _model(args, eager: bool):
    import torch
    import transformers

    import interp

    if args.shape == "llama-7b":  # the shape of Llama-2-7B with random weights: timing only
        cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                       max_position_embeddings=max(args.lengths) + 64)
        if eager:
            cfg._attn_implementation = "eager"
        with torch.device(args.device):
            hf = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
        tok = interp.load_model("stories260k").tokenizer  # any Llama tokenizer for the prompt text
        return interp.load_model(hf, tokenizer=tok)
    kwargs = {"attn_implementation": "eager"} if eager else {}
    return interp.load_model(args.model, device=args.device, dtype=args.dtype, **kwargs)


def one(args) -> dict:
    """Time one path on one sample (after a warm-up on a short one)."""
    import torch

    from interp.analyses import get_analysis
    from interp.analyses.base import Options
    from interp.analyses.inputs import greedy
    from interp.analyses.retrieval import niah_inputs, paper_scores
    from interp.progress import QUIET

    path, length = args.one, args.length
    model = _model(args, eager=path == "paper")
    an = get_analysis("retrieval")
    params = an.resolve({"lengths": [length], "depths": [50], "n_needles": 1, "max_new_tokens": args.new_tokens})
    [entry] = an.plan(model, Options(), params)
    inputs, span = niah_inputs(model, entry, params, 0)
    cuda = model.device.type == "cuda"

    def run():
        if path == "plain":
            return greedy(model, inputs, args.new_tokens)
        if path == "fast":
            return an.score_sample(model, entry, Options(), params, QUIET)
        return paper_scores(model, inputs, span, args.new_tokens)

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = run()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    n_new = len(out) if path == "plain" else len(out[1]) if path == "paper" else None
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"path": path, "length": int(inputs["input_ids"].shape[-1]), "seconds": seconds, "peak_gib": peak,
            "new_tokens": n_new}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--shape", choices=("llama-7b",), help="random weights of a real model's shape instead")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--lengths", default="2048,8192")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--new-tokens", type=int, default=30)
    parser.add_argument("--one", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.lengths = [int(x) for x in str(args.lengths).split(",")]
    if args.one:
        print(json.dumps(one(args)))
        return
    import torch

    print(f"# {args.shape or args.model} on {args.device} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"{args.new_tokens} new tokens at most")
    print(f"{'length':>7} {'path':>6} {'seconds':>9} {'peak GiB':>9} {'vs fast':>8}")
    for length in args.lengths:
        rows = {}
        for path in args.paths.split(","):
            cmd = ["--one", path, "--length", str(length), "--model", args.model, "--device", args.device,
                   "--new-tokens", str(args.new_tokens), "--lengths", str(length)]
            cmd += ["--dtype", args.dtype] if args.dtype else []
            cmd += ["--shape", args.shape] if args.shape else []
            result = measure(__file__, cmd, f"{length:>7} {path:>6}")
            if result is not None:
                rows[path] = result
        fast = rows.get("fast", {}).get("seconds")
        for path, r in rows.items():
            ratio = f"{r['seconds'] / fast:.2f}x" if fast else "-"
            print(f"{r['length']:>7} {path:>6} {r['seconds']:>9.2f} {r['peak_gib']:>9.2f} {ratio:>8}")
        if fast and "plain" in rows:
            print(f"{'':>7} scoring overhead over plain generation: {100 * (fast / rows['plain']['seconds'] - 1):.0f} %")


if __name__ == "__main__":
    main()
