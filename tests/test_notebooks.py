"""The notebooks run top to bottom (each ends with assertions on its own results) and are stored
without outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_four_notebooks():
    assert [p.name for p in NOTEBOOKS] == [
        "01_gradient_methods.ipynb",
        "02_memory_vs_depth.ipynb",
        "03_numerics.ipynb",
        "04_transformer_nnx.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    # 300 s per cell: each notebook takes well under 2 minutes on a 2-core CPU; the margin is
    # for a loaded CI machine. A failing assertion inside the notebook fails this test.
    client = NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
