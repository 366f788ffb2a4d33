"""The GPU check (issue 27): on a CUDA machine, one command runs the kernel tests, scores every analysis on CUDA
and on CPU and compares the tables, runs the kernel and model-level benchmarks, and prints one summary.

    python benchmarks/gpu_check.py [--out DIR] [--budget-s 480]     # CUDA; within 8 minutes on an H200
    python benchmarks/gpu_check.py --smoke [--out DIR]               # CPU, no GPU: the same code paths, tiny sizes

On the project's GPU machine (shared/gpu/README.md), carrying .whl: `bash .whl/site.sh && export
PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 && python3 benchmarks/gpu_check.py`.

Steps, in this order; a step (and an analysis of the scores step) that would start after --budget-s seconds is
skipped, and a script still running at the budget's end is stopped with its processes ("timed out"):
- tests: `pytest -q` of the kernel tests (tests/test_kernels.py, tests/test_triton_stats.py) and the Triton
  analysis tests of tests/test_fused_analyses.py on stories260k (the row lse riding the model's SDPA call, tables
  equal to the twin's), run from outside the checkout so that `interp` is the installed package (the caller's
  PYTHONPATH is passed on): counts and failure lines.
  Smoke: the tests of those files whose names contain "bad_input" (input validation: seconds on CPU).
- scores: every analysis that applies to stories260k, organism-vit and organism-llava, with small sample counts,
  scored in fp32 (no TF32) on CUDA and on CPU, each on the kernels' default backend (Triton on CUDA, the fused path
  on CPU), stored, read back and compared table by table, column by column (`compare_tables`). An analysis that
  does not apply to a model is skipped with the reason. Smoke: summary and sinks on stories260k, both on CPU, the
  default backend against the chunked torch twin (`INTERP_KERNELS=torch`).
- kernels_gpu: `benchmarks/kernels_gpu.py` (smoke: `--device cpu`, tiny shapes through the Triton interpreter).
- stats_cost: `benchmarks/stats_cost.py --device cuda --shape llama-1b` (smoke: `--device cpu --layers 1 --tokens 64`,
  modes plain, stats and eager: capture, stats' trace with a probe doing nothing, would add 8 s of process start).

Writes summary.json, each script's output (<step>.txt) and rows (<step>.json) and the scored runs (runs/) under
--out (default $OUT, else ./gpu-check). The verdict is "fail" (exit code 1) when a test failed, a table differed, an
analysis raised or a script failed; else "incomplete" when the budget cut a step short; else "pass".
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
TESTS = ("tests/test_kernels.py", "tests/test_triton_stats.py",  # and the lse riding the model's call (stories260k)
         "tests/test_fused_analyses.py::test_the_row_lse_rides_the_models_own_sdpa_call_to_the_triton_kernels"
         "[stories260k]", "tests/test_fused_analyses.py::test_triton_tables_are_the_twins")
SMOKE_TESTS = ("-k", "bad_input")
MODELS = ("stories260k", "organism-vit", "organism-llava")
SMOKE_SCORES = {"stories260k": ("summary", "sinks")}
# (label, device, $INTERP_KERNELS) of the two scorings compared; None: the kernels' default backend
SIDES = (("cuda", "cuda", None), ("cpu", "cpu", None))
SMOKE_SIDES = (("default", "cpu", None), ("twin", "cpu", "torch"))
TOL = 1e-4
SCRIPTS = {  # each benchmark's arguments on CUDA, and in the smoke mode
    "kernels_gpu": ([], ["--device", "cpu", "--sizes", "64", "--stats-only", "128", "--heads", "2", "--dim", "16",
                         "--repeats", "1"]),
    "stats_cost": (["--device", "cuda", "--shape", "llama-1b"],
                   ["--device", "cpu", "--shape", "llama-1b", "--layers", "1", "--tokens", "64", "--repeats", "1",
                    "--modes", "plain,stats,eager"]),
}


def analysis_params(out: Path) -> dict[str, dict]:
    """Small inputs for each analysis (any other: one sample). circuits runs a copy task written for
    stories260k's tokenizer, which keeps none of the built-in tasks' names as one token."""
    task = out / "copy-task.jsonl"
    with open(task, "w") as f:
        for a, b in (("Lily", "mom"), ("mom", "Lily")):
            for rest in ("was happy", "was big", "said hi"):
                f.write(json.dumps({"clean": f"One day {a} {rest} and {a}", "corrupt": f"One day {b} {rest} and {b}",
                                    "correct": f" {a}", "foil": f" {b}"}) + "\n")
    return {
        "summary": dict(samples=2, max_tokens=64),
        "retrieval": dict(lengths=[150], depths=[0, 100], n_needles=1, mask_k=[2]),
        "sinks": dict(samples=1),
        "taxonomy": dict(samples=1, half=32),
        "vit": dict(samples=1, batch=8),
        "vhd": dict(samples=1, max_new_tokens=2),
        "circuits": dict(tasks=str(task), methods="patching,eap", faithfulness_percents="10,50"),
        "lookback": dict(samples=2, max_tokens=64),
    }


def compare_tables(a: pd.DataFrame, b: pd.DataFrame, tol: float = TOL) -> dict:
    """Two tables column by column: numbers within `tol` (relative to |a| where |a| > 1; NaN equals NaN), everything
    else equal. Returns ok, max_diff (None where a column differs in kind or is not a number), the column of the
    largest difference, and the columns that differ."""
    if list(a.columns) != list(b.columns) or len(a) != len(b):
        return {"ok": False, "max_diff": None, "column": None,
                "problems": [f"shapes differ: {len(a)} rows {list(a.columns)} against {len(b)} rows {list(b.columns)}"]}
    worst, column, problems = 0.0, None, []
    for name in a.columns:
        x, y = a[name], b[name]
        if all(pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s) for s in (x, y)):
            x, y = x.to_numpy(float, na_value=np.nan), y.to_numpy(float, na_value=np.nan)
            same = (x == y) | (np.isnan(x) & np.isnan(y))
            diff = np.where(same, 0.0, np.abs(x - y) / np.maximum(1.0, np.abs(x)))
            d = float(np.where(np.isnan(diff), math.inf, diff).max(initial=0.0))
        else:
            d = 0.0 if x.astype(str).tolist() == y.astype(str).tolist() else math.inf
        if d > tol:
            problems.append(f"{name}: {d:.3g}" if math.isfinite(d) else f"{name}: not equal")
        if column is None or d > worst:
            worst, column = d, name
    return {"ok": not problems, "max_diff": worst if math.isfinite(worst) else None, "column": column,
            "problems": problems}


def run(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    """`cmd` from outside the checkout (so `interp` is the installed package), in its own process group, stopped
    with all its processes after `timeout` seconds: return code, output (stdout and stderr), seconds, timed_out."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=tempfile.gettempdir(), env={**os.environ, "TQDM_DISABLE": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    timed_out = False
    try:
        output, _ = proc.communicate(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        timed_out = True
    except BaseException:  # interrupted or terminated: its processes end with this one
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return {"command": cmd, "rc": proc.returncode, "timed_out": timed_out, "seconds": time.monotonic() - t0,
            "output": output}


def tests_step(smoke: bool, out: Path, left: float) -> dict:
    """The kernel tests (smoke: SMOKE_TESTS of them); their output kept in <out>/tests.txt."""
    r = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(str(ROOT / t) for t in TESTS),
             *(SMOKE_TESTS if smoke else ())], left)
    (out / "tests.txt").write_text(r["output"])
    lines = r["output"].splitlines()
    count = r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)"
    final = next((x for x in reversed(lines) if re.search(count, x)), "")  # pytest's summary line
    counts = {kind: int(n) for n, kind in re.findall(count, final)}
    failures = [x for x in lines if x.startswith(("FAILED ", "ERROR "))]
    verdict = "timed out" if r["timed_out"] else "pass" if r["rc"] == 0 else "fail"
    print(f"tests: {verdict}: {final.strip('= ') or 'no summary line'}")
    for x in failures:
        print(f"  {x}")
    return {"verdict": verdict, "command": r["command"], "counts": counts, "failures": failures, "rc": r["rc"]}


@contextmanager
def kernels_backend(name: str | None):
    """$INTERP_KERNELS set to `name` (None: unset, the default backend) inside the block."""
    old = os.environ.pop("INTERP_KERNELS", None)
    if name:
        os.environ["INTERP_KERNELS"] = name
    try:
        yield
    finally:
        os.environ.pop("INTERP_KERNELS", None)
        if old is not None:
            os.environ["INTERP_KERNELS"] = old


def scores_step(smoke: bool, out: Path, deadline: float) -> dict:
    """Every (model, analysis) of the plan scored on both sides into <out>/runs/<side>, and each stored table of the
    one compared with the other's."""
    import torch

    import interp
    from interp.analyses import ANALYSES, NotApplicableError

    if not smoke:  # fp32 means fp32 on CUDA too: no TF32 in matmuls and convolutions (the ViT's patch embedding)
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
    sides = SMOKE_SIDES if smoke else SIDES
    plan = SMOKE_SCORES if smoke else {name: tuple(ANALYSES) for name in MODELS}
    params = analysis_params(out)
    tables, skipped, errors = [], [], []
    for name, analyses in plan.items():
        models = {device: interp.load_model(name, dtype="float32", device=device) for device in {s[1] for s in sides}}
        for analysis in analyses:
            if time.monotonic() > deadline:
                skipped.append({"model": name, "analysis": analysis, "reason": "budget spent"})
                continue
            try:
                ANALYSES[analysis].check(models[sides[0][1]])
            except NotApplicableError as e:
                skipped.append({"model": name, "analysis": analysis, "reason": str(e)})
                continue
            results = []
            try:
                for label, device, backend in sides:
                    store = out / "runs" / label
                    with kernels_backend(backend):
                        scored = interp.score(models[device], analysis, store=store,
                                              **params.get(analysis, {"samples": 1}))
                    results.append(interp.open_run(scored.id, store=store))
            except Exception as e:  # noqa: BLE001 - reported, and the check fails
                errors.append({"model": name, "analysis": analysis, "side": label, "error": f"{type(e).__name__}: {e}"})
                print(f"scores: {name} {analysis} on {label}: {type(e).__name__}: {e}")
                continue
            (a, b), none = results, pd.DataFrame()
            rows = [{"model": name, "analysis": analysis, "table": table, **compare_tables(x, y)}
                    for table, x, y in [("heads", a.heads, b.heads), ("samples", a.samples, b.samples),
                                        *((t, a.tables.get(t, none), b.tables.get(t, none))
                                          for t in sorted(set(a.tables) | set(b.tables)))]]
            tables += rows
            diffs = [r["max_diff"] for r in rows]
            worst = "not comparable" if None in diffs else f"{max(diffs):.2g}"
            print(f"scores: {name} {analysis}: {len(rows)} tables, max diff {worst}: "
                  f"{'pass' if all(r['ok'] for r in rows) else 'FAIL'}")
            for r in rows:
                if not r["ok"]:
                    print(f"  {r['table']}: {'; '.join(r['problems'])}")
        del models
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    for s in skipped:
        print(f"scores: skipped {s['model']} {s['analysis']}: {s['reason']}")
    cut = any(s["reason"] == "budget spent" for s in skipped)
    verdict = ("fail" if errors or not all(r["ok"] for r in tables) or not (tables or cut)
               else "incomplete" if cut else "pass")
    return {"verdict": verdict, "sides": [dict(zip(("label", "device", "kernels"), s)) for s in sides],
            "tolerance": TOL, "tables": tables, "skipped": skipped, "errors": errors}


def script_step(name: str, args: list[str], out: Path, left: float, env: dict | None = None) -> dict:
    """benchmarks/<name>.py with `args` and --json <out>/<name>.json; its output kept in <out>/<name>.txt."""
    rows_path = out / f"{name}.json"
    rows_path.unlink(missing_ok=True)
    r = run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *args, "--json", str(rows_path)], left, env)
    (out / f"{name}.txt").write_text(r["output"])
    verdict = "timed out" if r["timed_out"] else "ran" if r["rc"] == 0 else "fail"
    print(f"{name}: {verdict} in {r['seconds']:.0f} s")
    print(r["output"] if verdict != "fail" else "\n".join(r["output"].splitlines()[-20:]))
    return {"verdict": verdict, "command": r["command"], "rc": r["rc"],
            "result": json.loads(rows_path.read_text()) if rows_path.exists() else None}


def details(name: str, step: dict) -> str:
    """What the summary line of a step says beside its verdict."""
    if step["verdict"] == "skipped" or "error" in step:
        return step.get("reason") or step["error"]
    if name == "tests":
        return ", ".join(f"{n} {kind}" for kind, n in step["counts"].items())
    if name == "scores":
        return (f"{sum(r['ok'] for r in step['tables'])} of {len(step['tables'])} tables within {TOL:g}, "
                f"{len(step['errors'])} analyses raised, {len(step['skipped'])} skipped")
    return f"{step['seconds']:.0f} s"


def key_ratios(name: str, result: dict | None) -> list[str]:
    """The ratios a summary shows of a benchmark's rows."""
    if not result:
        return []
    if name == "kernels_gpu":
        ratio = lambda a, b: f"{a / b:.2f}x" if a is not None and b else "-"  # noqa: E731
        return [f"N={r['N']}: triton/sdpa {ratio(r['ours_s'], r['sdpa_s'])} (lse given "
                f"{ratio(r.get('lse_s'), r['sdpa_s'])}, memory {ratio(r['ours_bytes'], r['sdpa_bytes'])}), "
                f"fused/sdpa {ratio(r['fused_s'], r['sdpa_s'])}, dense {r['dense']}" for r in result["rows"]]
    lines = {}
    for r in result["rows"]:
        if r["mode"] == "plain" and "error" not in r:
            continue
        if "error" in r:
            what = r["error"]
        else:
            what = (f"{r['ratio']:.2f}x" if r["ratio"] else "-") + (
                f" (memory {r['peak_ratio']:.2f}x)" if r["peak_ratio"] else "")
        lines.setdefault(r["tokens"], []).append(f"{r['mode']} {what}")
    return [f"{n} tokens ÷ plain: {', '.join(parts)}" for n, parts in lines.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="where summary.json and the raw outputs go (default $OUT, else ./gpu-check)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="no step starts after this many seconds")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: the same code paths without a GPU")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated check stops the script it runs
    import torch
    import triton

    from interp.scoring import versions

    if not args.smoke and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; --smoke runs the same code paths on CPU")
    out = Path(args.out or os.environ.get("OUT") or "gpu-check").resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    deadline = start + args.budget_s
    device = torch.cuda.get_device_name() if not args.smoke else f"CPU {platform.machine()} (smoke)"
    summary = {"device": device, "versions": {**versions(), "triton": triton.__version__},
               "date": datetime.datetime.now().isoformat(timespec="seconds"), "smoke": args.smoke,
               "budget_s": args.budget_s, "steps": {}}
    print(f"# gpu_check on {device}; {', '.join(f'{k} {v}' for k, v in summary['versions'].items())}; "
          f"{summary['date']}; budget {args.budget_s:.0f} s; out {out}", flush=True)
    for name in ("tests", "scores", *SCRIPTS):
        t0 = time.monotonic()
        if t0 > deadline:
            summary["steps"][name] = {"verdict": "skipped", "reason": f"budget of {args.budget_s:.0f} s spent"}
            print(f"{name}: skipped (budget spent)", flush=True)
            continue
        try:
            if name == "tests":
                step = tests_step(args.smoke, out, deadline - t0)
            elif name == "scores":
                step = scores_step(args.smoke, out, deadline)
            else:  # the Triton kernels run under the interpreter on CPU
                step = script_step(name, SCRIPTS[name][args.smoke], out, deadline - t0,
                                   {"TRITON_INTERPRET": "1"} if args.smoke else None)
        except Exception as e:  # noqa: BLE001 - a step that breaks fails the check; the others still run
            traceback.print_exc()
            step = {"verdict": "fail", "error": f"{type(e).__name__}: {e}"}
        summary["steps"][name] = {**step, "seconds": round(time.monotonic() - t0, 1)}
        sys.stdout.flush()
    summary["seconds"] = round(time.monotonic() - start, 1)
    verdicts = {s["verdict"] for s in summary["steps"].values()}
    summary["verdict"] = ("fail" if "fail" in verdicts else "incomplete" if verdicts & {"incomplete", "timed out",
                                                                                        "skipped"} else "pass")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")

    print(f"\n# summary: {summary['verdict'].upper()} in {summary['seconds']:.0f} s on {device} ({summary['date']})")
    for name, s in summary["steps"].items():
        print(f"{name:>12}: {s['verdict']:<9} {details(name, s)}")
        for x in key_ratios(name, s.get("result")):
            print(f"{'':>14}{x}")
    print(f"written: {out / 'summary.json'}")
    sys.exit(1 if summary["verdict"] == "fail" else 0)


if __name__ == "__main__":
    main()
