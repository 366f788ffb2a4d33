"""The layers hold: kernels <- hooks <- analyses <- scoring / store <- cli / app (pyproject's import-linter contract).

The top-level folders are sub-packages of `interp` only through package-dir, and import-linter reads the `interp`
folder alone, so the contract runs on a copy of the tree laid out as the installed package."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"hooks": "hooks", "kernels": "kernels", "analyses": "analyses", "app": "app"}


def _installed_layout(target: Path) -> Path:
    package = target / "interp"
    ignore = shutil.ignore_patterns("__pycache__", "data")
    shutil.copytree(ROOT / "interp", package, ignore=ignore)
    for folder, name in MAPPED.items():
        shutil.copytree(ROOT / folder, package / name, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", target / "pyproject.toml")
    return target


def test_no_module_imports_a_higher_layer(tmp_path):
    tree = _installed_layout(tmp_path)
    done = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.argv = ['lint-imports']; lint_imports_command()"],
                          cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout
