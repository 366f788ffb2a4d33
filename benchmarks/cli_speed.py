"""How long the everyday commands take, start to finish, as a user runs them: `interp --help`, `runs`, `show`,
`export` (csv), `models` and `score --help` (which imports every analysis, hence torch and transformers), each the
median of 5 runs in a fresh process, against a store holding one small complete run (scored first, not timed).
Compare with `python -c pass` (the interpreter's own start) printed alongside.

    python benchmarks/cli_speed.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time


def timed(argv: list[str], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    cli = [sys.executable, "-m", "interp.cli"]
    with tempfile.TemporaryDirectory() as store:
        subprocess.run([*cli, "score", "stories260k", "--samples", "2", "--max-tokens", "16", "--out", store, "--json"],
                       check=True, capture_output=True)
        run_id = subprocess.run([*cli, "runs", "--store", store], check=True, capture_output=True,
                                text=True).stdout.splitlines()[1].split()[0]
        rows = [("python -c pass", [sys.executable, "-c", "pass"]),
                ("interp --help", [*cli, "--help"]),
                ("interp runs", [*cli, "runs", "--store", store]),
                ("interp show RUN", [*cli, "show", run_id, "--store", store]),
                ("interp export RUN", [*cli, "export", run_id, "--store", store]),
                ("interp models", [*cli, "models"]),
                ("interp score --help", [*cli, "score", "--help"])]
        print(f"{'command':<20} {'median of 5 (s)':>16}")
        for name, argv in rows:
            print(f"{name:<20} {timed(argv):>16.2f}")


if __name__ == "__main__":
    main()
