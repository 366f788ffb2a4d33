"""benchmarks/gpu_check.py: its CPU smoke mode runs every step and passes, and its table comparison catches a
planted difference."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


@pytest.mark.slow
def test_the_smoke_mode_runs_every_step_and_passes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "INTERP_KERNELS")}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = summary["steps"]
    assert summary["verdict"] == "pass" and list(steps) == ["tests", "scores", "kernels_gpu", "stats_cost"]
    assert steps["tests"]["verdict"] == "pass" and steps["tests"]["counts"]["passed"] > 0
    scores = steps["scores"]
    assert scores["verdict"] == "pass" and [s["kernels"] for s in scores["sides"]] == [None, "torch"]
    compared = {(r["model"], r["analysis"], r["table"]) for r in scores["tables"]}
    assert {("stories260k", "summary", "heads"), ("stories260k", "sinks", "sink_rates")} <= compared
    assert all(r["ok"] and r["max_diff"] <= gpu_check.TOL for r in scores["tables"])
    assert any(r["max_diff"] > 0 for r in scores["tables"])  # two implementations, not one run twice
    assert steps["kernels_gpu"]["verdict"] == "ran" and len(steps["kernels_gpu"]["result"]["rows"]) == 2
    rows = steps["stats_cost"]["result"]["rows"]
    assert steps["stats_cost"]["verdict"] == "ran" and all("seconds" in r for r in rows), rows
    assert [r["mode"] for r in rows] == ["plain", "stats", "eager"]
    for name in ("tests.txt", "kernels_gpu.txt", "stats_cost.txt"):
        assert (tmp_path / name).read_text()


def test_a_planted_difference_fails_the_comparison():
    table = pd.DataFrame({"layer": [0, 0, 1], "head": [0, 1, 0], "entropy": [0.5, 1.25, np.nan],
                          "loss": [12.0, 3.0, 4.0], "pattern": ["dense", "a-shape", "dense"]})

    def changed(column, row, value):
        other = table.copy()
        other.loc[row, column] = value
        return gpu_check.compare_tables(table, other)

    same = gpu_check.compare_tables(table, table.copy())
    assert same["ok"] and same["max_diff"] == 0
    close = changed("entropy", 1, 1.25 + 1e-6)
    assert close["ok"] and 0 < close["max_diff"] < 1e-5 and close["column"] == "entropy"
    far = changed("entropy", 1, 1.25 + 1e-3)
    assert not far["ok"] and far["max_diff"] == pytest.approx(1e-3 / 1.25) and far["problems"][0].startswith("entropy")
    assert changed("loss", 0, 12.0 + 6e-4)["ok"]  # within 1e-4 relative to a value above 1
    assert not changed("loss", 0, 12.0 + 6e-3)["ok"]
    assert not changed("entropy", 2, 0.5)["ok"]  # NaN against a number
    assert not changed("pattern", 0, "block-sparse")["ok"]
    assert not gpu_check.compare_tables(table, table.drop(columns="loss"))["ok"]
    assert not gpu_check.compare_tables(table, table.iloc[:2])["ok"]
