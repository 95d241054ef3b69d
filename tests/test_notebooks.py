"""The notebooks in notebooks/ run end to end on small inputs (KVSIM_NB_SMALL=1), and are committed without outputs.

Executing them needs nbclient, nbformat and ipykernel (plus pandas and matplotlib); the execution tests skip
cleanly when those are missing. The no-outputs check needs only the standard library.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
EXPECTED = {"capacity_planning.ipynb", "compression_tradeoff.ipynb", "calibration.ipynb", "disaggregation.ipynb"}


def test_notebooks_present():
    assert EXPECTED <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert not cell.get("outputs"), f"{path.name} cell {i} has outputs: clear them before committing"
            assert cell.get("execution_count") is None, f"{path.name} cell {i} has an execution count"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_small(path, monkeypatch, tmp_path):
    for mod in ("nbclient", "nbformat", "ipykernel", "pandas", "matplotlib"):
        pytest.importorskip(mod, reason=f"{mod} not installed (notebook tests need nbclient, nbformat, ipykernel, pandas)")
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("KVSIM_NB_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    t0 = time.perf_counter()
    client.execute()
    wall = time.perf_counter() - t0
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert wall < 90, f"{path.name} took {wall:.0f} s in small mode (budget ~30 s)"
