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


# Imports a function may make, each with its reason; any other import sits at the top of its module.
DEFERRED = {
    # the CLI loads a command's modules only when it runs: runs / show / export / models start in 0.1–0.6 s
    "interp/cli.py": {"interp.analyses", "interp.analyses.images", "interp.analyses.vhd", "interp.analyses.inputs",
                      "interp.scoring", "interp.models", "interp.hooks", "interp.app.attention",
                      "interp.app.dashboard", "results", "progress", "transformers.utils", "functools", "tqdm",
                      "interp.cluster", "interp.sweep", "interp.atlases"},
    # ray is the optional `cluster` extra: imported when a run asks for a cluster
    "interp/cluster.py": {"ray"},
    # PyYAML (installed with ray) only for YAML sweep files
    "interp/sweep.py": {"yaml"},
    # listing runs reads JSON only: Parquet, pandas and safetensors load when a table or array is read or written
    "interp/store.py": {"pyarrow.parquet", "pandas", "safetensors.torch"},
    # `show` / `export` read tables without torch: an incomplete run's analysis (to aggregate its samples) and the
    # figures load when asked for
    "interp/results.py": {"interp.analyses", "interp.app.figures"},
    # the nnsight and TransformerLens backends load only when chosen
    "hooks/backends.py": {"nnsight", "transformer_lens.model_bridge.sources"},
    # Triton is optional (CUDA)
    "kernels/api.py": {"triton_stats"},
}


def test_imports_sit_at_the_top_of_modules():
    """No import inside a function (where they hid import cycles), except the deferred ones listed above."""
    import ast

    found = []
    for folder in ("interp", "hooks", "kernels", "analyses", "app"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            name = str(path.relative_to(ROOT))
            for fn in ast.walk(ast.parse(path.read_text())):
                if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for node in ast.walk(fn):
                    modules = ([node.module] if isinstance(node, ast.ImportFrom) else
                               [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                    found += [(name, fn.name, m) for m in modules if m not in DEFERRED.get(name, set())]
    assert not found, found
