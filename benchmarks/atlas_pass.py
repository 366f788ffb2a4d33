"""The atlas's text analyses (summary, sinks, taxonomy, lookback) at its quick preset: separate runs against one
`score_together` call (one forward pass for the samples whose inputs coincide, issue 30), in one process, each run
into a fresh store. Also the quick preset with sinks' random and repeated token inputs added (Gu et al.'s three
kinds, as the full preset), and a case where every sample coincides (summary, lookback and sinks' natural sequences on all
sixteen texts), to show what a shared forward saves when inputs do coincide. Best of --repeats, separate and together interleaved; wall
and CPU time (all threads), and the model's forward passes counted with a hook.

    python benchmarks/atlas_pass.py                  # SmolLM2-135M on CPU, 2 torch threads
    python benchmarks/atlas_pass.py --threads 1      # on a shared machine: one thread, read the CPU time
    python benchmarks/atlas_pass.py --whole          # instead: the whole quick atlas's wall time and memory (README)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

import interp
from interp.atlases import OPTION_KEYS, PRESETS
from interp.together import score_together

TEXT_ANALYSES = ("summary", "sinks", "taxonomy", "lookback")
ALL_TEXTS = {"summary": {"samples": 16, "max_tokens": 64}, "lookback": {"samples": 16, "max_tokens": 64},
             "sinks": {"samples": 16, "max_tokens": 64, "inputs": ["natural"]}}


def timed(fn, forwards: list) -> tuple[float, float, int]:
    """(wall s, CPU s, forward passes) of fn()."""
    forwards.clear()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu, len(forwards)


def compare(model, settings: dict, repeats: int, forwards: list) -> dict:
    """Best-of-`repeats` (wall, CPU, forwards) of each analysis alone and of all of them together."""
    best: dict[str, tuple] = {}
    keep = lambda name, t: best.__setitem__(name, min(best.get(name, t), t))  # noqa: E731  (by wall time)
    for _ in range(repeats):
        for name, settled in settings.items():
            keep(name, timed(lambda: interp.score(model, name, store=tempfile.mkdtemp(), **settled), forwards))
        jobs = [(name, {k: v for k, v in settled.items() if k in OPTION_KEYS},
                 {k: v for k, v in settled.items() if k not in OPTION_KEYS}) for name, settled in settings.items()]
        keep("together", timed(lambda: score_together(model, jobs, tempfile.mkdtemp()), forwards))
    return best


def report(title: str, best: dict) -> None:
    singles = {k: v for k, v in best.items() if k != "together"}
    slowest = max(singles, key=lambda k: singles[k][0])
    total = [sum(v[i] for v in singles.values()) for i in range(3)]
    merged = best["together"]
    print(f"\n{title}")
    print(f"{'run':<12} {'wall s':>8} {'CPU s':>8} {'forwards':>9}")
    for name, (wall, cpu, n) in best.items():
        print(f"{name:<12} {wall:>8.2f} {cpu:>8.2f} {n:>9}")
    print(f"{'sum alone':<12} {total[0]:>8.2f} {total[1]:>8.2f} {total[2]:>9}")
    print(f"together / slowest alone ({slowest}): {merged[0] / singles[slowest][0]:.2f}x wall, "
          f"{merged[1] / singles[slowest][1]:.2f}x CPU")
    print(f"together / sum alone: {merged[0] / total[0]:.2f}x wall, {merged[1] / total[1]:.2f}x CPU; forwards "
          f"{merged[2]} / {total[2]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--whole", action="store_true",
                        help="instead, time the whole `interp atlas MODEL` (quick preset, every analysis)")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs, {torch.get_num_threads()} torch "
          "threads", flush=True)
    if args.whole:
        whole_atlas(args.model)
        return
    model = interp.load_model(args.model)
    forwards: list = []
    model.hf.register_forward_pre_hook(lambda *_: forwards.append(1))
    interp.score(model, "summary", samples=1, max_tokens=16)  # warm-up: first calls, kernels' checks
    quick = {name: PRESETS["quick"][name] for name in TEXT_ANALYSES}
    report(f"{args.model}, the atlas's quick preset: " + ", ".join(f"{n} {o}" for n, o in quick.items()),
           compare(model, quick, args.repeats, forwards))
    gu = {**quick, "sinks": {k: v for k, v in quick["sinks"].items() if k != "inputs"}}
    report(f"{args.model}, the quick preset with sinks' random and repeated tokens too (Gu et al.'s three kinds)",
           compare(model, gu, args.repeats, forwards))
    report(f"{args.model}, the parts that read the texts, on all sixteen: " + ", ".join(
               f"{n} {o}" for n, o in ALL_TEXTS.items()),
           compare(model, ALL_TEXTS, args.repeats, forwards))
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


def whole_atlas(model: str) -> None:
    """`interp atlas MODEL` (every analysis at the quick preset) in a child process with torch's default threads, into
    a fresh store: its wall time and peak RSS (the README's figure)."""
    with tempfile.TemporaryDirectory() as store:
        wall = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "interp.cli", "atlas", model, "--out", store, "--json"],
                              capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        wall = time.perf_counter() - wall
    if done.returncode:
        raise SystemExit(f"interp atlas failed:\n{done.stderr[-2000:]}")
    runs = json.loads(done.stdout)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # kB -> GB
    print(f"\n{model}, the whole quick atlas (`interp atlas {model}`, a fresh store, a child process, torch's default "
          f"threads): {wall:.0f} s wall, {rss:.1f} GB peak RSS; runs: {', '.join(runs['runs'])}; skipped: "
          f"{', '.join(runs['skipped']) or '-'}", flush=True)


if __name__ == "__main__":
    main()
