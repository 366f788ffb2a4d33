"""One measurement per process, so that each path's peak memory is its own and running out of it is reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def measure(script: str, args: list[str], label: str) -> dict | None:
    """Run `python script args` (which prints its result as the last JSON line); print a row and return None
    when it fails (OOM when it ran out of memory)."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    err = proc.stderr.lower()
    oom = "out of memory" in err or "can't allocate memory" in err or proc.returncode in (-9, 137)
    print(f"{label} {'OOM' if oom else 'failed':>9}  {proc.stderr.strip().splitlines()[-1:]}")
    return None
