"""Every notebook in notebooks/ executes from top to bottom without error."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def _execute(path):
    """Run a notebook; return its error outputs and its ``SKIPPED:`` lines."""
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    outputs = [
        output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
    ]
    errors = [output for output in outputs if output.get("output_type") == "error"]
    # A notebook whose real-data part cannot run says so on a line of its own.
    skipped = [
        line.strip()
        for output in outputs
        if output.get("output_type") == "stream"
        for line in output.get("text", "").splitlines()
        if line.startswith("SKIPPED:")
    ]
    return errors, skipped


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, monkeypatch):
    # Figures go to a non-interactive backend; the notebook runs in its own folder
    # so that relative paths in it mean what they say.
    monkeypatch.setenv("MPLBACKEND", "Agg")
    errors, skipped = _execute(path)
    assert not errors
    if skipped:
        # What ran passed; what could not run is reported, not counted as a pass.
        pytest.skip(" ".join(skipped))


@pytest.mark.slow
def test_missing_data_is_reported_not_passed(monkeypatch, tmp_path):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("NANOSEG_SHARED_DATA", str(tmp_path))
    errors, skipped = _execute(NOTEBOOKS[[p.name for p in NOTEBOOKS].index("nuclei3d.ipynb")])
    assert not errors
    assert skipped and "nuclei3d data is not in" in skipped[0]


def test_notebooks_are_stored_without_outputs():
    # Outputs would go stale (and can carry machine-specific paths).
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert not cell.get("outputs"), f"{path.name} has stored outputs"
                assert cell.get("execution_count") is None, f"{path.name} has execution counts"
