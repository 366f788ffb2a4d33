"""The README's two set-up commands, timed as a new user meets them: each in a fresh clone of this repository's
HEAD, with an empty virtual environment, no pip cache (`PIP_NO_CACHE_DIR=1`), an empty model cache
(`INTERP_CACHE`) and an empty store (`INTERP_STORE`). The commands are read from the README itself (the first
`bash` block after "## Set-up on a fresh machine", and the block after `<!-- test-command -->`), so what is timed
is what the README says. Prints each command's wall time and exit status; the test command's time is split into
installation and suite by pytest's own report.

    python benchmarks/readme_commands.py [--only first|tests]

Downloads (the torch wheel, the locked packages) are included, as for a user; run it on an otherwise idle
machine for the figures the README quotes.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> dict[str, str]:
    """{"first": the install-and-score command, "tests": the test command}, as the README gives them."""
    text = (ROOT / "README.md").read_text()
    setup = text[text.index("## Set-up on a fresh machine"):]
    first = re.search(r"```bash\n(.+?)\n```", setup, re.S).group(1)
    tests = re.search(r"<!-- test-command -->\s*```bash\n(.+?)\n```", text, re.S).group(1)
    return {"first": first.strip(), "tests": tests.strip()}


def run_fresh(command: str) -> tuple[float, int, str]:
    """(seconds, exit status, output) of `command` run by bash in a fresh clone with empty caches."""
    with tempfile.TemporaryDirectory(prefix="interp-readme-") as tmp:
        clone = Path(tmp) / "interp"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
        env.update(PIP_NO_CACHE_DIR="1", INTERP_CACHE=f"{tmp}/cache", INTERP_STORE=f"{tmp}/store",
                   PATH=":".join(p for p in env["PATH"].split(":") if ".venv" not in p))
        start = time.perf_counter()
        done = subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True)
        return time.perf_counter() - start, done.returncode, done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("first", "tests"))
    args = parser.parse_args()
    for name, command in readme_commands().items():
        if args.only and name != args.only:
            continue
        seconds, status, output = run_fresh(command)
        line = f"{name:<6} {seconds / 60:5.1f} min ({seconds:.0f} s), exit {status}"
        suite = re.search(r"passed.* in ([\d.]+)s", output)
        if name == "tests" and suite:
            line += f"; suite {float(suite.group(1)):.0f} s, installation {seconds - float(suite.group(1)):.0f} s"
        print(line, flush=True)
        if status:
            print(output[-4000:])


if __name__ == "__main__":
    main()
