"""`import nanoseg` and `nanoseg --help` stay light: heavy libraries load on first use."""

import subprocess
import sys

import pytest

import nanoseg
from nanoseg.cli._defaults import estimator_defaults


def _modules_after(code):
    script = f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_does_not_load_scikit_learn_scipy_or_dask():
    loaded = _modules_after("import nanoseg")
    assert not {"sklearn", "scipy", "dask", "zarr"} & loaded


def test_fitting_stored_data_without_a_client_does_not_load_distributed(tmp_path):
    # Whether a dask.distributed client should run the fit is asked only of
    # an imported distributed (importing it costs about a second).
    loaded = _modules_after(
        "import zarr\n"
        "from nanoseg import NanoparticleMixture\n"
        "from nanoseg.datasets import make_phantom\n"
        "image, _ = make_phantom((6, 64, 64), n_particles=10, random_state=1)\n"
        f"z = zarr.create_array(store={str(tmp_path / 'a.zarr')!r}, shape=image.shape, chunks=(2, 64, 64), dtype='uint8')\n"
        "z[...] = image\n"
        "NanoparticleMixture().fit(z)"
    )
    assert "nanoseg._engine.fit_workers" in loaded
    assert "distributed" not in loaded


def test_segmenting_and_writing_a_posterior_without_a_client_does_not_load_distributed(tmp_path):
    # dask's get_scheduler imports distributed to look for a client; nanoseg
    # asks it only once distributed is imported, and computes what it
    # computes through dask (the report's sample) with a scheduler given as a
    # function, which dask takes without looking for a client.
    loaded = _modules_after(
        "import zarr\n"
        "from nanoseg.cli import main\n"
        "from nanoseg import NanoparticleMixture\n"
        "from nanoseg.io import write_ome_zarr\n"
        "from nanoseg.datasets import make_phantom\n"
        "image, _ = make_phantom((6, 64, 64), n_particles=10, random_state=1)\n"
        f"z = zarr.create_array(store={str(tmp_path / 'a.zarr')!r}, shape=image.shape, chunks=(2, 64, 64), dtype='uint8')\n"
        "z[...] = image\n"
        f"main(['segment', {str(tmp_path / 'a.zarr')!r}, {str(tmp_path / 'labels.zarr')!r}, '--spacing', '50', '10', '10', '-q',\n"
        f"      '--table', {str(tmp_path / 'particles.csv')!r}, '--report', {str(tmp_path / 'report')!r}])\n"
        f"write_ome_zarr({str(tmp_path / 'posterior.zarr')!r}, NanoparticleMixture().fit_transform(z), spacing=(50, 10, 10), progress=False)"
    )
    assert "nanoseg._engine.labeling" in loaded and "dask.array" in loaded
    assert (tmp_path / "labels.zarr").is_dir() and (tmp_path / "posterior.zarr").is_dir()
    assert (tmp_path / "particles.csv").is_file() and (tmp_path / "report" / "index.html").is_file()
    assert "distributed" not in loaded


def test_training_and_applying_a_classifier_without_a_client_does_not_load_distributed(tmp_path):
    # dask's rechunk also imports distributed to choose its method; nanoseg
    # names the method ("tasks", as dask chooses without a client).
    folder = str(tmp_path)
    loaded = _modules_after(
        "import os, tifffile, zarr\n"
        "from nanoseg.cli import main\n"
        "from nanoseg.datasets import make_phantom\n"
        f"os.chdir({folder!r})\n"
        "image, mask = make_phantom((8, 64, 64), n_particles=10, random_state=0)\n"
        "tifffile.imwrite('crop.tif', image[:, :32])\n"
        "tifffile.imwrite('mask.tif', mask[:, :32])\n"
        "z = zarr.create_array(store='image.zarr', shape=image.shape, chunks=(2, 64, 64), dtype='uint8')\n"
        "z[...] = image\n"
        "quiet = ['--spacing', '50', '10', '10']\n"
        "main(['train', 'crop.tif', '--annotations', 'mask.tif', '-o', 'model.npz', '--max-samples', '2000',\n"
        "      '--n-jobs', '1', '--random-state', '0', *quiet])\n"
        "main(['segment', 'image.zarr', 'labels.zarr', '--model', 'model.npz', '--table', 'particles.csv', '-q', *quiet])\n"
        "main(['predict', 'image.zarr', 'model.npz', 'probability.zarr', '-q', *quiet])"
    )
    assert "nanoseg.classifier" in loaded and "dask.array" in loaded
    assert all((tmp_path / name).exists() for name in ("model.npz", "labels.zarr", "particles.csv", "probability.zarr"))
    assert "distributed" not in loaded


@pytest.mark.parametrize("configured", [None, "threads", "sync", "processes"])
def test_the_scheduler_is_found_without_loading_distributed(configured):
    script = (
        "import sys, dask, dask.array as da\n"
        "from nanoseg._plan import scheduler_of\n"
        "x = da.zeros(4, chunks=2)\n"
        f"dask.config.set(scheduler={configured!r})\n"
        "ours = scheduler_of([x])\n"
        "loaded = 'distributed' in sys.modules\n"
        "from dask.base import get_scheduler\n"
        "print(loaded, ours is get_scheduler(collections=[x]))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_help_does_not_load_scikit_learn_scipy_zarr_or_dask():
    loaded = _modules_after(
        "from nanoseg.cli import build_parser\n"
        "try:\n    build_parser().parse_args(['segment', '--help'])\nexcept SystemExit:\n    pass"
    )
    assert not {"sklearn", "scipy", "zarr", "dask"} & loaded


def test_public_names_resolve_on_first_use():
    for name in nanoseg.__all__:
        assert getattr(nanoseg, name) is not None
    assert set(nanoseg.__all__) <= set(dir(nanoseg))
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        nanoseg.NoSuchThing  # noqa: B018


@pytest.mark.parametrize("name", ["NanoparticleMixture", "NanoparticleLabeler", "NanoparticleClassifier"])
def test_help_defaults_are_the_estimators_defaults(name):
    estimator = getattr(nanoseg, name)()
    module = type(estimator).__module__
    defaults = estimator_defaults(module, name)
    params = estimator.get_params(deep=False)
    assert defaults and set(defaults) <= set(params)
    for key, value in defaults.items():
        assert params[key] == value, key

