"""The notebooks in notebooks/ are tutorials and tests: each one runs end to end in a fresh kernel, and the committed
files carry no outputs.

Every `notebooks/*.ipynb` is picked up automatically. A notebook runs with nbclient in a new `python3` kernel started
with this interpreter (jupyter_client replaces the kernel spec's `python` by `sys.executable`), in an empty temporary
working directory, so a notebook that writes files relative to its folder fails here instead of writing into the
repository; the environment set by conftest.py (offline hubs, Triton interpreter on CPU) is inherited by the kernel.
"""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT = 900  # seconds for one cell: generous for a shared 2-core CPU


def _read(path: Path):
    return nbformat.read(path, as_version=4)


def test_notebooks_are_there():
    names = {p.stem for p in NOTEBOOKS}
    assert {"quickstart", "retrieval", "sinks", "vision_heads", "circuits", "long_context"} <= names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path):
    """Outputs and execution counts are stripped, the file is valid, and it opens and closes with prose: what it
    shows, and what a reader should take away."""
    nb = _read(path)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; clear them before committing"
    assert "widgets" not in nb.metadata, f"{path.name}: widget state in the metadata"
    assert nb.cells and nb.cells[0].cell_type == "markdown", f"{path.name} must open with what it shows (markdown)"
    assert nb.cells[-1].cell_type == "markdown" and "takeaway" in nb.cells[-1].source.lower(), \
        f"{path.name} must close with a markdown cell of takeaways"
    assert any(c.cell_type == "code" for c in nb.cells), f"{path.name} has no code"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    """Every cell runs without error in a fresh kernel."""
    nb = _read(path)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name}: a cell failed\n{e}", pytrace=False)
    assert not any(tmp_path.iterdir()), f"{path.name} wrote into its working directory: {list(tmp_path.iterdir())}"
