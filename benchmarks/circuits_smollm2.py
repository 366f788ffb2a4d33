"""The IOI and Colored Objects circuits of SmolLM2-135M (real weights): logit differences, circuits, faithfulness,
overlap, and how EAP / EAP-IG rank the heads against per-head activation patching.

    python benchmarks/circuits_smollm2.py [--prompts 16] [--methods patching,eap,eap-ig] [--out runs/]
"""

from __future__ import annotations

import argparse
import time

import pandas as pd

import interp
from interp.analyses import get_analysis


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per task")
    ap.add_argument("--methods", default="patching,eap,eap-ig")
    ap.add_argument("--tasks", default="ioi,colored-objects")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None, help="a store to keep the run in (default: memory only)")
    args = ap.parse_args()
    pd.set_option("display.width", 200)
    model = interp.load_model(args.model, device=args.device)
    start = time.perf_counter()
    result = interp.score(model, "circuits", tasks=args.tasks, methods=args.methods, samples=args.prompts,
                          store=args.out, progress=True)
    print(f"{args.model}: {args.prompts} prompts per task, methods {args.methods}: {time.perf_counter() - start:.0f} s "
          f"on {model.device}")
    for line in get_analysis("circuits").report(result):
        print(line)
    t = result.tables
    print("\nfaithfulness\n" + t["faithfulness"].round(3).to_string(index=False))
    print("\noverlap\n" + t["overlap"].round(3).to_string(index=False))
    print("\nagreement\n" + t["agreement"].round(3).to_string(index=False))
    for col in [c for c in result.heads.columns if c.endswith("_patching")]:
        print(f"\ntop heads by |{col}|\n" + result.top(col, k=8).round(3).to_string(index=False))
    if result.path is not None:
        print(f"\nrun {result.id}: {result.path}")


if __name__ == "__main__":
    main()
