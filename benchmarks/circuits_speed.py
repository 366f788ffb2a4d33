"""Edge attribution patching against per-head activation patching: time to score every head of a model on N IOI
prompts, the ratio, and how the two rank the heads.

EAP: a clean and a corrupted forward (the caches) and one forward / backward pair per batch. Activation patching:
one forward per head per batch (heads side by side as copies of the batch). `--patch-heads K` patches K heads drawn
at random and extrapolates the time linearly to every head (each head costs the same forward); the printout says so.

    python benchmarks/circuits_speed.py [--model smollm2-135m] [--prompts 100] [--patch-heads K] [--device cuda]
"""

from __future__ import annotations

import argparse
import random
import time

import pandas as pd
import torch

import interp
from interp.analyses import Options, get_analysis
from interp.analyses.circuits import TaskBatch
from interp.hooks import activation_patch, cache_run, edge_attribution


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--patch-heads", type=int, default=None, help="patch K random heads and extrapolate (default all)")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    model = interp.load_model(args.model, device=args.device)
    dev = model.device
    an = get_analysis("circuits")
    params = an.resolve({"tasks": "ioi", "batch": args.batch})
    plan = an.plan(model, Options(samples=args.prompts), params)
    n_layers, (n_heads, _) = model.n_layers(), model.head_counts()
    every = [(layer, h) for layer in range(n_layers) for h in range(n_heads)]
    chosen = every if args.patch_heads is None else sorted(random.Random(0).sample(every, args.patch_heads))

    eap_s = patch_s = 0.0
    eap_sum = torch.zeros(n_layers, n_heads)
    patch_sum = torch.zeros(len(chosen))
    for sample in plan:
        batch = TaskBatch(model, sample)
        sync(dev)
        t0 = time.perf_counter()
        clean, corrupt = cache_run(model, batch.clean), cache_run(model, batch.corrupt)
        eap = edge_attribution(model, batch.clean, batch.corrupt, batch.metric, clean_cache=clean, corrupt_cache=corrupt)
        sync(dev)
        t1 = time.perf_counter()
        lds = activation_patch(model, batch.clean, corrupt, [(layer, h, None) for layer, h in chosen], batch.metric)
        sync(dev)
        t2 = time.perf_counter()
        eap_s, patch_s = eap_s + (t1 - t0), patch_s + (t2 - t1)
        ld_clean = batch.metric(clean.logits[:, -1])
        eap_sum += eap.sum(2).sum(1).cpu()
        patch_sum += (lds - ld_clean).sum(1).cpu()
    full = patch_s * len(every) / len(chosen)
    print(f"{args.model} on {dev}: {args.prompts} IOI prompts in {len(plan)} batches, {len(every)} heads")
    print(f"EAP (caches + one forward/backward per batch): {eap_s:.1f} s")
    what = "" if len(chosen) == len(every) else f" (measured on {len(chosen)} random heads: {patch_s:.1f} s, extrapolated)"
    print(f"activation patching, every head: {full:.1f} s{what}")
    print(f"ratio: EAP is {full / eap_s:.1f}x faster")
    eap_of = pd.Series([float(eap_sum[layer, h]) for layer, h in chosen])
    rho = eap_of.abs().rank().corr(pd.Series(patch_sum.numpy()).abs().rank())
    print(f"Spearman rho of |EAP| and |patching| over the {len(chosen)} patched heads: {rho:.3f}")


if __name__ == "__main__":
    main()
