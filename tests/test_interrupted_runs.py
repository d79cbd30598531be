"""A run killed at any point leaves nothing that looks complete, and rerunning it
gives byte-identical outputs to a run that was never interrupted."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanoseg.datasets import make_phantom
from nanoseg.io import is_complete, write_ome_zarr

# Every test here runs the command end to end on a 24 x 256 x 256 phantom.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")]


def digest(path):
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f.relative_to(path.parent)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


# Relative paths, run from the output folder: the outputs record the command's
# paths as provenance, so every run must name them the same way.
# Small chunks make many chunk files, so that a kill can land mid-write.
SEGMENT = [
    sys.executable, "-m", "nanoseg", "segment", "image.zarr", "labels.zarr",
    "--table", "particles.csv", "--chunks", "1", "64", "64", "-q",
]


def run(folder, *extra, **kwargs):
    return subprocess.run([*SEGMENT, *extra], cwd=folder, capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("interrupted")
    image = make_phantom((24, 256, 256), n_particles=60, random_state=3)[0]
    write_ome_zarr(folder / "image.zarr", image, spacing=(50, 10, 10), chunks=(1, 128, 128), progress=False)
    return folder


@pytest.fixture(scope="module")
def reference(image_folder, tmp_path_factory):
    """Outputs of an uninterrupted run (written elsewhere, then compared by content)."""
    folder = tmp_path_factory.mktemp("reference")
    os.symlink(image_folder / "image.zarr", folder / "image.zarr")
    run(folder, check=True)
    return {"labels": digest(folder / "labels.zarr"), "table": digest(folder / "particles.csv")}


def wait_for(condition, process, timeout=60.0):
    """Poll until `condition()` holds; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.001)
    raise AssertionError("the kill point was never reached")


def chunk_files(folder):
    data = folder / "labels.zarr" / "0" / "c"
    return sum(1 for p in data.rglob("*") if p.is_file()) if data.exists() else 0


KILL_POINTS = {
    "while starting": lambda folder: True,
    "store created": lambda folder: (folder / "labels.zarr" / "zarr.json").exists(),
    "first chunks written": lambda folder: chunk_files(folder) >= 1,
    "half the chunks written": lambda folder: chunk_files(folder) >= 8,
    "labels complete": lambda folder: (folder / "labels.zarr" / "zarr.json").exists()
    and is_complete(folder / "labels.zarr"),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_run_is_recoverable(point, image_folder, reference, tmp_path):
    folder = tmp_path
    os.symlink(image_folder / "image.zarr", folder / "image.zarr")
    before = digest(image_folder / "image.zarr")
    process = subprocess.Popen(SEGMENT, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        reached = wait_for(lambda: KILL_POINTS[point](folder), process)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    if not reached:
        pytest.skip("the run finished before the kill point")

    labels, table = folder / "labels.zarr", folder / "particles.csv"
    # Nothing looks complete unless it is: a store marked complete holds the
    # final labels, and the table is written in one atomic step.
    if labels.exists() and is_complete(labels):
        assert digest(labels) == reference["labels"]
    if table.exists():
        assert digest(table) == reference["table"]
    assert not list(folder.glob(".particles.csv.*")), "a partial table was left behind"
    assert digest(image_folder / "image.zarr") == before

    # Rerunning the same command resumes: what the killed run left unfinished
    # is replaced without --overwrite; finished outputs need it, as always.
    extra = ["--overwrite"] if labels.exists() and is_complete(labels) else []
    result = run(folder, *extra)
    assert result.returncode == 0, result.stderr
    assert is_complete(labels)
    assert digest(labels) == reference["labels"]
    assert digest(table) == reference["table"]
    assert digest(image_folder / "image.zarr") == before


def test_finished_output_is_not_replaced_without_overwrite(image_folder, reference, tmp_path):
    os.symlink(image_folder / "image.zarr", tmp_path / "image.zarr")
    run(tmp_path, check=True)
    result = run(tmp_path)
    assert result.returncode == 2
    assert "already exists" in result.stderr and "--overwrite" in result.stderr
    assert digest(tmp_path / "labels.zarr") == reference["labels"]
