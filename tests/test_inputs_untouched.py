"""No command and no API call modifies its inputs: every file of every input is
hashed before and after, and the hashes must be equal."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from nanoseg import NanoparticleLabeler, NanoparticleMixture, persistence
from nanoseg.__main__ import main
from nanoseg.datasets import make_phantom
from nanoseg.io import convert, read_image, write_ome_zarr
from nanoseg.measure import particle_table
from nanoseg.preprocessing import BackgroundSubtractor, PosteriorSmoother, SliceEqualizer

SPACING = (50.0, 10.0, 10.0)


def tree_digest(root):
    """sha256 of every file under `root`, plus each file's mode and mtime."""
    digest = {}
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest[str(path.relative_to(root))] = (
                hashlib.sha256(path.read_bytes()).hexdigest(), stat.st_mode, stat.st_mtime_ns,
            )
    return digest


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    image = make_phantom((8, 96, 96), n_particles=12, random_state=5)[0]
    slices = root / "slices"
    slices.mkdir()
    for z in range(image.shape[0]):
        tifffile.imwrite(slices / f"slice{z:02d}.tif", image[z])
    tifffile.imwrite(root / "stack.tif", image, imagej=True, resolution=(100.0, 100.0),
                     metadata={"axes": "ZYX", "spacing": 0.05, "unit": "um"})
    write_ome_zarr(root / "image.zarr", image, spacing=SPACING, chunks=(2, 48, 48), progress=False)
    mixture = NanoparticleMixture(max_iter=100_000).fit(image)
    posterior = mixture.predict_proba(image)
    write_ome_zarr(root / "posterior.zarr", posterior, spacing=SPACING, chunks=(2, 48, 48), progress=False)
    labels = NanoparticleLabeler(min_size=2).transform(posterior)
    write_ome_zarr(root / "labels.zarr", labels, spacing=SPACING, kind="labels", progress=False)
    persistence.save(mixture, root / "model.npz")
    return root


CLI_COMMANDS = {
    "convert TIFF folder": ["convert", "{slices}", "{out}/a.zarr", "--spacing", "50", "10", "10"],
    "convert TIFF stack": ["convert", "{stack.tif}", "{out}/a.zarr"],
    "convert zarr": ["convert", "{image.zarr}", "{out}/a.zarr"],
    "fit": ["fit", "{image.zarr}", "{out}/model.npz", "--max-iter", "100000"],
    "predict": ["predict", "{image.zarr}", "{model.npz}", "{out}/posterior.zarr"],
    "label": ["label", "{posterior.zarr}", "{out}/labels.zarr", "--min-size", "2"],
    "measure": ["measure", "{labels.zarr}", "{out}/table.csv", "--image", "{image.zarr}",
                "--posterior", "{posterior.zarr}"],
    "segment": ["segment", "{image.zarr}", "{out}/labels.zarr", "--table", "{out}/table.parquet",
                "--max-iter", "100000"],
    "segment with model": ["segment", "{slices}", "{out}/labels.zarr", "--model", "{model.npz}",
                           "--spacing", "50", "10", "10"],
}


@pytest.mark.parametrize("name", list(CLI_COMMANDS))
def test_cli_commands_leave_inputs_untouched(name, inputs, tmp_path, capsys):
    before = tree_digest(inputs)
    arguments = [a.replace("{out}", str(tmp_path)) for a in CLI_COMMANDS[name]]
    arguments = [a.replace("{", str(inputs) + "/").replace("}", "") for a in arguments]
    assert main([*arguments, "-q"]) == 0, capsys.readouterr().err
    assert tree_digest(inputs) == before


def test_report_leaves_inputs_untouched(inputs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    before = tree_digest(inputs)
    assert main(["segment", str(inputs / "image.zarr"), str(tmp_path / "labels.zarr"), "--report",
                 str(tmp_path / "report"), "--max-iter", "100000", "-q"]) == 0, capsys.readouterr().err
    assert tree_digest(inputs) == before


def _open(inputs, name):
    return read_image(inputs / name)[0]


API_CALLS = {
    "read_image": lambda inputs, out: read_image(inputs / "image.zarr")[0][:],
    "convert": lambda inputs, out: convert(inputs / "slices", out / "c.zarr", spacing=SPACING, progress=False),
    "write_ome_zarr from zarr": lambda inputs, out: write_ome_zarr(
        out / "w.zarr", _open(inputs, "image.zarr"), spacing=SPACING, progress=False),
    "mixture fit and transform": lambda inputs, out: NanoparticleMixture(max_iter=100_000).fit(
        _open(inputs, "image.zarr")).transform(_open(inputs, "image.zarr")).compute(),
    "labeler": lambda inputs, out: NanoparticleLabeler().transform(_open(inputs, "posterior.zarr")).compute(),
    "particle_table": lambda inputs, out: particle_table(
        _open(inputs, "labels.zarr"), spacing=SPACING, posterior=_open(inputs, "posterior.zarr"),
        intensity=_open(inputs, "image.zarr")),
    "slice equalizer": lambda inputs, out: SliceEqualizer().fit_transform(_open(inputs, "image.zarr")).compute(),
    "background subtractor": lambda inputs, out: BackgroundSubtractor().fit_transform(
        _open(inputs, "image.zarr")).compute(),
    "posterior smoother": lambda inputs, out: PosteriorSmoother().fit_transform(
        _open(inputs, "posterior.zarr")).compute(),
    "load model": lambda inputs, out: persistence.load(inputs / "model.npz").transform(
        _open(inputs, "image.zarr")).compute(),
}


@pytest.mark.parametrize("name", list(API_CALLS))
def test_api_calls_leave_inputs_untouched(name, inputs, tmp_path):
    before = tree_digest(inputs)
    API_CALLS[name](inputs, tmp_path)
    assert tree_digest(inputs) == before


def test_numpy_inputs_are_not_modified():
    image = make_phantom((6, 64, 64), n_particles=8, random_state=2)[0]
    copy = image.copy()
    mixture = NanoparticleMixture(max_iter=100_000).fit(image)
    posterior = mixture.transform(image)
    posterior_copy = posterior.copy()
    labels = NanoparticleLabeler(min_size=2).transform(posterior)
    labels_copy = labels.copy()
    particle_table(labels, spacing=SPACING, posterior=posterior, intensity=image)
    SliceEqualizer().fit_transform(image)
    BackgroundSubtractor().fit_transform(image)
    PosteriorSmoother().fit_transform(posterior)
    np.testing.assert_array_equal(image, copy)
    np.testing.assert_array_equal(posterior, posterior_copy)
    np.testing.assert_array_equal(labels, labels_copy)


def test_opened_zarr_inputs_are_read_only(inputs):
    # The readers open stores read-only, so even a bug could not write to them.
    image = read_image(inputs / "image.zarr")[0]
    assert isinstance(image, zarr.Array)
    with pytest.raises(Exception):
        image[0, 0, 0] = 1
