"""The `interp` command line."""

from __future__ import annotations

import argparse
import json
import sys

from .families import FAMILIES
from .models import ALIASES, DEFAULT_MODEL


def _models(args) -> int:
    if args.json:
        print(json.dumps({
            "aliases": [{"name": a.name, "description": a.description, "source": a.source} for a in ALIASES.values()],
            "default": DEFAULT_MODEL,
            "families": [{"name": f.name, "kind": f.kind, "model_types": list(f.model_types),
                          "towers": [t.name for t in f.towers]} for f in FAMILIES],
        }, indent=2))
        return 0
    print("Built-in aliases (offline):")
    for a in ALIASES.values():
        star = " (default)" if a.name == DEFAULT_MODEL else ""
        print(f"  {a.name:<14} {a.description}{star}\n  {'':<14} from: {a.source}")
    print("\nSupported families (any hub id or local folder whose config.model_type is listed):")
    for f in FAMILIES:
        towers = "+".join(t.name for t in f.towers)
        print(f"  {f.name:<10} {f.kind:<8} {towers:<12} {', '.join(f.model_types)}" + (f"  — {f.notes}" if f.notes else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="interp", description="Trace and score the attention heads of a model.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("models", help="list the built-in aliases and the supported model families")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:
        print(f"interp: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
