"""The notebooks run as notebooks: each is executed cell by cell in a Jupyter kernel of this environment (nbclient),
so a notebook that no longer runs (an API it calls changed, a field it reads is gone) fails here.

01_walkthrough starts the app in a Ray cluster of its own (the kernel does not inherit this session's RAY_ADDRESS)
on a free port and stops it in its last cell; 02_benchmarks reads the committed results and draws into a temporary
folder, so nothing is written into the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import free_port

pytestmark = pytest.mark.slow
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _execute(name: str, **env: str) -> list[nbformat.NotebookNode]:
    """Run the notebook in a fresh kernel (any cell that raises fails the test); its code cells, with outputs."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    kernel_env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"} | env
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute(env=kernel_env)
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def _stdout(cell: nbformat.NotebookNode) -> str:
    return "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream" and out.name == "stdout")


def test_walkthrough_runs_the_app_and_both_apis():
    cells = _execute("01_walkthrough.ipynb", PDSERVE_PORT=str(free_port()))
    first, long_prompt, two_step = (_stdout(cell) for cell in cells[1:4])
    assert "'placement_reason'" in first and "'kv_source'" in first  # the pdserve report of an OpenAI reply
    assert "'kv_source': 'transfer'" in long_prompt  # a long prompt's KV came from a prefill replica
    kv_cache_id, text = two_step.split("\n", 1)
    assert kv_cache_id.strip() and text.strip()  # prefill_only parked the KV; decode_only continued from it


def test_benchmarks_notebook_draws_the_figures_from_the_results(tmp_path):
    cells = _execute("02_benchmarks.ipynb", PDSERVE_FIGURES=str(tmp_path))
    assert " vs " in _stdout(cells[2])  # the ratio table
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "cdf_bursty_long-gen.png", "cdf_bursty_long-prompt.png", "cdf_steady.png", "goodput_steady.png"]
    assert sum(1 for out in cells[3].outputs if "image/png" in out.get("data", {})) == 4  # shown in the notebook
