"""How long each analysis takes at its defaults, the estimate the README's "How long" table quotes.

For each analysis that applies to the model, its default plan is made, the first `--k` samples of it are scored
(the same code path as `interp score`, store-less), and the time is scaled to the whole plan: seconds per sample ×
samples planned. Retrieval is timed twice: with its default masking test (per sample, the top-k heads masked and
the needle asked again) and with `mask_k=[0]` (`--mask-k 0`: no masking test). The model's loading is not timed.
A linear estimate: samples of one plan differ in length (retrieval's go up to the longest context), so read it as
the order of magnitude. Vision analyses are timed on the organisms (`--vision`).

    python benchmarks/analysis_times.py [--model smollm2-135m] [--k 2] [--vision]
"""

from __future__ import annotations

import argparse
import platform
import time

import interp
from interp.analyses import ANALYSES
from interp.analyses.base import Options


def _first(plan: list[dict], k: int) -> list[dict]:
    """The first k samples of a plan, of each task where its samples name tasks (circuits scores every task)."""
    seen: dict = {}
    return [s for s in plan if seen.setdefault(s.get("task"), []).append(s) or len(seen[s.get("task")]) <= k]


def timed(model: interp.Model, name: str, k: int, **params) -> tuple[int, float]:
    """(samples in the default plan, seconds per sample over its first k), scoring as `interp.score` does."""
    an = ANALYSES[name]
    plan = an.plan(model, Options(), an.resolve(params))
    full = type(an).plan
    type(an).plan = lambda self, *a, **kw: _first(full(self, *a, **kw), k)
    try:
        start = time.perf_counter()
        interp.score(model, name, **params)
        return len(plan), (time.perf_counter() - start) / len(_first(plan, k))
    finally:
        type(an).plan = full


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--k", type=int, default=2, help="samples scored per analysis (default 2)")
    ap.add_argument("--skip", default="", type=lambda t: t.split(","), help="analyses not to time (comma list)")
    ap.add_argument("--vision", action="store_true", help="also vit on organism-vit and vhd on organism-llava")
    args = ap.parse_args()
    print(f"{platform.processor() or platform.machine()}, torch threads {__import__('torch').get_num_threads()}, "
          f"first {args.k} samples of each default plan, scaled to the plan")
    jobs = [(args.model, name, {}) for name in ("summary", "sinks", "taxonomy", "lookback", "circuits", "retrieval")
            if name not in args.skip]
    jobs.append((args.model, "retrieval", {"mask_k": [0]}))
    if args.vision:
        jobs += [("organism-vit", "vit", {}), ("organism-llava", "vhd", {})]
    models: dict[str, interp.Model] = {}
    print(f"{'model':<15} {'analysis':<24} {'samples':>7} {'s/sample':>9} {'estimate':>10}")
    for name, analysis, params in jobs:
        model = models.get(name) or models.setdefault(name, interp.load_model(name))
        n, per = timed(model, analysis, args.k, **params)
        label = analysis + (" --mask-k 0" if params.get("mask_k") == [0] else "")
        print(f"{name:<15} {label:<24} {n:>7} {per:>9.1f} {_duration(per * n):>10}", flush=True)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else \
        f"{seconds / 3600:.1f} h"


if __name__ == "__main__":
    main()
