"""Which decoder types of the installed transformers interp adapts, each checked against its own eager attention.

For every model type of transformers' causal-LM auto mapping: a tiny random model (tests/auto_tiny.py), captured
with its fast attention, probabilities rebuilt from the captured q/k compared with the eager ones in a forward and
two decode steps (tests/auto_check.py, the same check as tests/test_discovery.py). Prints one line per type and
the summary the README quotes. About 20 s on 2 CPU cores.

    python benchmarks/discovery_coverage.py [--only pass,refused,differs,error,unbuildable]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import transformers  # noqa: E402

from auto_check import outcome  # noqa: E402
from auto_tiny import decoder_types  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated statuses to list (default: all)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    shown = set(args.only.split(",")) if args.only else None
    results = {t: outcome(t) for t in decoder_types()}
    for model_type, (status, detail) in results.items():
        if shown is None or status in shown:
            print(f"{model_type:<28} {status:<12} {detail.splitlines()[0][:150]}")
    counts = Counter(status for status, _ in results.values())
    buildable = [t for t, (s, _) in results.items() if s != "unbuildable"]
    outside = [t for t in buildable if "attention interface" in results[t][1]]
    through = len(buildable) - len(outside)
    print(f"\ntransformers {transformers.__version__}: {len(results)} decoder types, {len(buildable)} buildable, "
          f"{len(outside)} of them without attention through the interface; {counts['pass']} pass "
          f"({counts['pass'] / through:.1%} of {through}), {counts['refused'] - len(outside)} refused with a reason, "
          f"{counts['differs']} differ, {counts['error']} errors")


if __name__ == "__main__":
    main()
