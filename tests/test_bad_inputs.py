"""Bad input, through the Python API and the command line.

Every case must be answered by a specific exception (API) or exit code 2 with
one error line (CLI) whose message names the problem, and no output may be
created. tests/test_validation.py covers more estimator-level cases.
"""

import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from sklearn.utils._param_validation import InvalidParameterError

from nanoseg import NanoparticleLabeler, NanoparticleMixture, persistence
from nanoseg.__main__ import main
from nanoseg.datasets import make_phantom
from nanoseg.io import read_image, write_ome_zarr
from nanoseg.measure import particle_table
from nanoseg.metrics import match_objects, voxel_scores
from nanoseg.preprocessing import BackgroundSubtractor, PosteriorSmoother

SPACING = (50.0, 10.0, 10.0)


@pytest.fixture(scope="module")
def files(tmp_path_factory, volume_6x64x64):
    """A folder of good and damaged inputs, shared by the CLI cases (read only)."""
    root = tmp_path_factory.mktemp("inputs")
    write_ome_zarr(root / "image.zarr", volume_6x64x64, spacing=SPACING, progress=False)
    posterior = NanoparticleMixture(max_iter=100_000).fit(volume_6x64x64).predict_proba(volume_6x64x64)
    write_ome_zarr(root / "posterior.zarr", posterior, spacing=SPACING, progress=False)
    labels = NanoparticleLabeler(min_size=2).transform(posterior)
    write_ome_zarr(root / "labels.zarr", labels, spacing=SPACING, kind="labels", progress=False)
    assert main(["fit", str(root / "image.zarr"), str(root / "model.npz"), "-q", "--max-iter", "100000"]) == 0
    persistence.save(NanoparticleLabeler(), root / "labeler.npz")

    for name, dtype in [("float", np.float32), ("int16", np.int16), ("bool", bool), ("complex", np.complex64)]:
        if dtype not in (bool, np.complex64):
            write_ome_zarr(root / f"{name}.zarr", volume_6x64x64.astype(dtype), spacing=SPACING, progress=False)
        else:
            _plain_zarr(root / f"{name}.zarr", volume_6x64x64.astype(dtype))
    _plain_zarr(root / "empty.zarr", np.zeros((0, 16, 16), np.uint8))
    _plain_zarr(root / "four_d.zarr", np.zeros((2, 3, 16, 16), np.uint8))
    _plain_zarr(root / "constant.zarr", np.full((4, 32, 32), 90, np.uint8))
    saturated = np.full((4, 32, 32), 255, np.uint8)
    saturated[:, :4, :4] = 120
    _plain_zarr(root / "saturated.zarr", saturated)
    _plain_zarr(root / "float_labels.zarr", labels.astype(np.float32))
    _plain_zarr(root / "short_posterior.zarr", posterior[:, :, :-1])
    write_ome_zarr(root / "unfinished.zarr", volume_6x64x64, spacing=SPACING, progress=False)
    group = zarr.open_group(root / "unfinished.zarr", mode="r+")
    group.attrs["nanoseg"] = {**group.attrs["nanoseg"], "complete": False}

    # OME-Zarr with malformed spacing: a scale of the wrong length, and no unit.
    for name, mutate in [("bad_scale", _drop_scale_entry), ("no_unit", _drop_unit)]:
        write_ome_zarr(root / f"{name}.zarr", volume_6x64x64, spacing=SPACING, progress=False)
        group = zarr.open_group(root / f"{name}.zarr", mode="r+")
        group.attrs["ome"] = mutate(dict(group.attrs["ome"]))

    (root / "corrupt.zarr").mkdir()
    (root / "corrupt.zarr" / "zarr.json").write_text("{ this is not json")
    (root / "corrupt.tif").write_bytes(b"II*\x00" + os.urandom(200))
    slices = root / "slices"
    slices.mkdir()
    for z in range(3):
        tifffile.imwrite(slices / f"s{z}.tif", volume_6x64x64[z])  # no calibration at all
    (root / "notes.txt").write_text("not an image")
    (root / "model.pkl").write_bytes(pickle.dumps(NanoparticleLabeler()))
    (root / "random.npz").write_bytes(os.urandom(300))
    _other_version(root / "model.npz", root / "old_model.npz")
    (root / "existing.csv").write_text("label\n")
    return root


def _plain_zarr(path, array):
    z = zarr.create_array(store=str(path), shape=array.shape, dtype=array.dtype,
                          chunks=tuple(max(1, s) for s in array.shape))
    if array.size:
        z[...] = array


def _drop_scale_entry(ome):
    ome["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] = [50.0, 10.0]
    return ome


def _drop_unit(ome):
    for axis in ome["multiscales"][0]["axes"]:
        axis.pop("unit", None)
    return ome


def _other_version(source, target):
    """A copy of a model file that says it was written by another nanoseg version."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith(".json"):
                data = re.sub(rb'"nanoseg_version": "[^"]*"', b'"nanoseg_version": "0.0.1"', data)
            zout.writestr(item, data)


# ---------------------------------------------------------------------------
# command line: exit code 2, one error line naming the problem, no output
# ---------------------------------------------------------------------------

CLI_CASES = {
    "float image": (["segment", "{float.zarr}", "{out.zarr}"], "float32"),
    "signed image": (["segment", "{int16.zarr}", "{out.zarr}", "--spacing", "50", "10", "10"], "int16"),
    "bool image": (["segment", "{bool.zarr}", "{out.zarr}", "--spacing", "50", "10", "10"], "bool"),
    "complex image": (["fit", "{complex.zarr}", "{out.npz}", "--spacing", "50", "10", "10"], "complex64"),
    "empty image": (["segment", "{empty.zarr}", "{out.zarr}", "--spacing", "50", "10", "10"], "empty"),
    "4D image": (["segment", "{four_d.zarr}", "{out.zarr}", "--spacing", "50", "10", "10"], r"4|channel|3D"),
    "constant image": (["segment", "{constant.zarr}", "{out.zarr}", "--spacing", "50", "10", "10"], "constant"),
    "saturated image": (["segment", "{saturated.zarr}", "{out.zarr}", "--spacing", "50", "10", "10"], "saturated"),
    "missing input": (["segment", "{nowhere.zarr}", "{out.zarr}"], "does not exist"),
    "not an image": (["segment", "{notes.txt}", "{out.zarr}"], "neither a TIFF file"),
    "corrupt zarr": (["segment", "{corrupt.zarr}", "{out.zarr}"], "cannot be read"),
    "corrupt TIFF": (["convert", "{corrupt.tif}", "{out.zarr}", "--spacing", "50", "10", "10"], "cannot be read"),
    "TIFF without spacing": (["convert", "{slices}", "{out.zarr}"], "--spacing"),
    "OME scale of wrong length": (["segment", "{bad_scale.zarr}", "{out.zarr}"], "scale"),
    "OME axes without unit": (["segment", "{no_unit.zarr}", "{out.zarr}"], "unit"),
    "negative spacing": (["convert", "{slices}", "{out.zarr}", "--spacing", "50", "-10", "10"], "spacing|positive"),
    "unfinished input": (["segment", "{unfinished.zarr}", "{out.zarr}"], "interrupted|incomplete|unfinished"),
    "output exists": (["segment", "{image.zarr}", "{posterior.zarr}"], "already exists.*--overwrite"),
    "output inside input": (["segment", "{image.zarr}", "{image.zarr}/labels.zarr"], "inside the input"),
    "output is input": (["convert", "{image.zarr}", "{image.zarr}", "--overwrite"], "is the input"),
    "table exists": (["segment", "{image.zarr}", "{out.zarr}", "--table", "{existing.csv}"], "already exists"),
    "table of unknown format": (["measure", "{labels.zarr}", "{out.xlsx}"], r"\.csv or \.parquet"),
    "threshold above 1": (["label", "{posterior.zarr}", "{out.zarr}", "--threshold", "1.5"], "threshold"),
    "negative radius": (["label", "{posterior.zarr}", "{out.zarr}", "--radius", "-1"], "radius"),
    "Beta parameter 0": (["fit", "{image.zarr}", "{out.npz}", "--beta-prior", "0", "20"], "beta|positive|> 0"),
    "float labels": (["measure", "{float_labels.zarr}", "{out.csv}", "--spacing", "50", "10", "10"], "integer"),
    "posterior of another shape": (
        ["measure", "{labels.zarr}", "{out.csv}", "--posterior", "{short_posterior.zarr}"], "shape"),
    "pickle as model": (["predict", "{image.zarr}", "{model.pkl}", "{out.zarr}"], "not a nanoseg model"),
    "random bytes as model": (["predict", "{image.zarr}", "{random.npz}", "{out.zarr}"], "not a nanoseg model"),
    "labeler file as model": (["predict", "{image.zarr}", "{labeler.npz}", "{out.zarr}"], "NanoparticleMixture"),
}


def _fill(arguments, files, tmp_path):
    def path(match):
        name = match.group(1)
        if name.startswith("out"):
            return str(tmp_path / name)
        if name.startswith("nowhere"):
            return str(tmp_path / name)
        return str(files / name)

    return [re.sub(r"\{([^}]+)\}", path, a) for a in arguments]


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_rejects(case, files, tmp_path, capsys):
    arguments, message = CLI_CASES[case]
    arguments = _fill(arguments, files, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    try:
        code = main([*arguments, "-q"])
    except SystemExit as exit:  # argparse's own usage errors
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    # One error line; argparse puts the usage text before its own errors.
    assert len(lines) == 1 or lines[0].startswith("usage:"), err
    assert re.match(r"nanoseg \w+: error: ", lines[-1]), err
    assert re.search(message, lines[-1], flags=re.IGNORECASE), lines[-1]
    # Nothing was created: not the output, not a partial file beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_cli_warns_about_a_model_from_another_version(files, tmp_path, capsys):
    out = tmp_path / "posterior.zarr"
    assert main(["predict", str(files / "image.zarr"), str(files / "old_model.npz"), str(out), "-q"]) == 0
    err = capsys.readouterr().err
    assert "0.0.1" in err and "version" in err.lower()


# ---------------------------------------------------------------------------
# Python API: a specific exception type and a message naming the problem
# ---------------------------------------------------------------------------

def _posterior(shape=(3, 8, 8), value=0.2):
    return np.full(shape, value, np.float32)


API_CASES = {
    "smoother: negative sigma": (lambda: PosteriorSmoother(sigma=-1).fit_transform(_posterior()),
                                 InvalidParameterError, "sigma"),
    "smoother: NaN posterior": (lambda: PosteriorSmoother().fit_transform(_posterior(value=np.nan)),
                                ValueError, "NaN"),
    "labeler: threshold above 1": (lambda: NanoparticleLabeler(threshold=1.5).fit_transform(_posterior()),
                                   InvalidParameterError, "threshold"),
    "labeler: raw image instead of posterior": (
        lambda: NanoparticleLabeler().fit_transform(np.zeros((3, 8, 8), np.uint8)), TypeError, "posterior"),
    "labeler: connectivity 4": (lambda: NanoparticleLabeler(connectivity=4).fit_transform(_posterior()),
                                InvalidParameterError, "connectivity"),
    "mixture: Beta parameter 0": (lambda: NanoparticleMixture(beta_prior=(0, 1)).fit(_IMAGE), ValueError, "beta_prior"),
    "mixture: negative Beta parameter": (lambda: NanoparticleMixture(beta_prior=(1, -2)).fit(_IMAGE),
                                         ValueError, "beta_prior"),
    "mixture: NaN Beta parameter": (lambda: NanoparticleMixture(beta_prior=(1, np.nan)).fit(_IMAGE),
                                    ValueError, "finite"),
    "background: float image": (lambda: BackgroundSubtractor().fit_transform(_posterior()), TypeError, "uint8"),
    "background: negative radius": (lambda: BackgroundSubtractor(radius=-1).fit_transform(_IMAGE),
                                    InvalidParameterError, "radius"),
    "table: float labels": (lambda: particle_table(_posterior()), TypeError, "integer"),
    "table: zero spacing": (lambda: particle_table(np.zeros((3, 8, 8), np.uint32), spacing=(0, 1, 1)),
                            ValueError, "spacing"),
    "table: posterior of another shape": (
        lambda: particle_table(np.zeros((3, 8, 8), np.uint32), posterior=_posterior((3, 8, 7))), ValueError, "shape"),
    "metrics: shapes differ": (lambda: voxel_scores(np.zeros((4, 4), bool), np.zeros((4, 5), bool)),
                               ValueError, "same shape"),
    "objects: shapes differ": (lambda: match_objects(np.zeros((4, 4), int), np.zeros((4, 5), int)),
                               ValueError, "same shape"),
    "write: spacing of wrong length": (
        lambda: write_ome_zarr(_SCRATCH / "w.zarr", _IMAGE, spacing=(1, 1), progress=False), ValueError, "spacing"),
    "write: negative spacing": (
        lambda: write_ome_zarr(_SCRATCH / "w.zarr", _IMAGE, spacing=(1, -1, 1), progress=False), ValueError,
        "spacing"),
    "read: missing path": (lambda: read_image(_SCRATCH / "missing.zarr"), FileNotFoundError, "does not exist"),
}

_IMAGE = make_phantom((4, 48, 48), n_particles=5, random_state=0)[0]
_SCRATCH = Path()  # set per test, see below


@pytest.mark.parametrize("case", list(API_CASES))
def test_api_rejects(case, tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}._SCRATCH", tmp_path)
    call, error, message = API_CASES[case]
    with pytest.raises(error, match=re.compile(message, re.IGNORECASE)):
        call()
    assert not any(tmp_path.iterdir()), "an output was created"


@pytest.mark.parametrize("name", ["corrupt.zarr", "corrupt.tif", "notes.txt", "bad_scale.zarr", "no_unit.zarr"])
def test_unreadable_files_are_a_value_error(name, files):
    with pytest.raises(ValueError, match=r"cannot be read|neither a TIFF|scale|unit"):
        read_image(files / name)


@pytest.mark.parametrize("name", ["model.pkl", "random.npz", "notes.txt"])
def test_other_files_are_not_models(name, files):
    with pytest.raises(ValueError, match="not a nanoseg model"):
        persistence.load(files / name)


def test_model_from_another_version_warns(files):
    with pytest.warns(persistence.ModelVersionWarning, match="0.0.1"):
        persistence.load(files / "old_model.npz")


@pytest.mark.parametrize("layout", ["read-only", "non-contiguous", "Fortran order"])
def test_unusual_memory_layouts_give_the_same_results(layout, volume_6x64x64):
    if layout == "read-only":
        variant = volume_6x64x64.copy()
        variant.flags.writeable = False
    elif layout == "non-contiguous":
        padded = np.zeros((volume_6x64x64.shape[0], volume_6x64x64.shape[1], 2 * volume_6x64x64.shape[2]), np.uint8)
        padded[:, :, ::2] = volume_6x64x64
        variant = padded[:, :, ::2]
        assert not variant.flags.c_contiguous
    else:
        variant = np.asfortranarray(volume_6x64x64)
    expected = NanoparticleMixture(max_iter=100_000).fit(volume_6x64x64)
    got = NanoparticleMixture(max_iter=100_000).fit(variant)
    np.testing.assert_array_equal(got.particle_pmf_, expected.particle_pmf_)
    posterior = got.predict_proba(variant)
    np.testing.assert_array_equal(posterior, expected.predict_proba(volume_6x64x64))
    labels = NanoparticleLabeler(min_size=2).transform(np.asfortranarray(posterior) if layout != "read-only"
                                                       else posterior)
    np.testing.assert_array_equal(labels, NanoparticleLabeler(min_size=2).transform(posterior))
