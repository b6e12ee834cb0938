"""Both notebooks execute top to bottom on the smoke profile (explore: a tiny model; results: smoke results)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from experiments import sweep

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"


def execute(name: str, env: dict[str, str], monkeypatch) -> nbformat.NotebookNode:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    ).execute()
    return nb


def _stdout(nb: nbformat.NotebookNode) -> str:
    return "".join(
        o.get("text", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.get("name") == "stdout"
    )


def test_explore_notebook_runs_on_the_smoke_profile(monkeypatch):
    out = _stdout(execute("explore.ipynb", {"DORAN_PROFILE": "smoke"}, monkeypatch))
    assert "max |adapted - base| = 0.00e+00" in out
    assert "plain copy has adapters: False" in out


def test_results_notebook_runs_on_smoke_results(tmp_path, monkeypatch):
    args = [
        "ablation_hypernet",
        "--profile",
        "smoke",
        "--seeds",
        "0",
        "1",
        "--no-tuned",
        "--no-progress",
        "--results",
        str(tmp_path),
        "--variants",
        "static",
        "qv_first",
    ]
    assert sweep.main(args) == 0
    nb = execute("results.ipynb", {"DORAN_PROFILE": "smoke", "DORAN_RESULTS": str(tmp_path)}, monkeypatch)
    out = _stdout(nb)
    assert "ablation_hypernet {'completed': 4}" in out and "ablation_hypernet" in out
    images = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})
    ]
    assert len(images) >= 2  # the redrawn figure and the paired view


def test_the_exploration_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOKS / "explore.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


def test_the_results_notebook_is_committed_executed_on_the_saved_results():
    """A reader browsing the repository sees its tables and figures (``make figures`` regenerates it)."""
    nb = nbformat.read(NOTEBOOKS / "results.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code)
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4 and "profile default" in _stdout(nb)
    make = subprocess.run(["make", "-n", "figures"], cwd=REPO, capture_output=True, text=True).stdout
    assert "notebooks/results.ipynb" in make
