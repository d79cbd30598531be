"""What the ``nanoseg`` commands share: errors, input checks, models and labellers."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import uuid
from pathlib import Path

import numpy as np

from .. import _handoff as handoff
from .._version import __version__

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

_TABLE_SUFFIXES = (".csv", ".parquet")

# Command-line flag -> NanoparticleMixture parameter. Those marked "fit" only
# act while fitting, so they make no sense with a saved model.
_MIXTURE_OPTIONS = {
    "beta_prior": "predict",
    "percentile_low": "fit",
    "percentile_high": "fit",
    "halo_pad": "fit",
    "halo": "fit",
    "min_seed_size": "fit",
    "monotone_posterior": "fit",
    "sampling_step": "fit",
    "max_iter": "fit",
    "tol": "fit",
    "binning": "fit",
    "intensity_range": "fit",
}
_LABELER_OPTIONS = ("threshold", "radius", "min_size", "connectivity")

#: Labeller defaults after a NanoparticleClassifier: its probabilities are
#: calibrated around 0.5, and a closing would bridge the borders it learned
#: between touching particles.
_CLASSIFIER_LABELER_DEFAULTS = {"threshold": 0.5, "radius": 0}


class InputError(Exception):
    """A problem with the command's arguments or inputs (exit status 2)."""


class RunError(Exception):
    """A failure while computing (exit status 1)."""


def _progress(args):
    return not getattr(args, "quiet", False)


@contextlib.contextmanager
def _to_stderr(enabled=True):
    """Send what the estimators print (slab plans) to stderr, with the progress bars."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _spacing_text(spacing):
    axes = "(z, y, x)" if len(spacing) == 3 else "(y, x)"
    return " x ".join(f"{v:g}" for v in spacing) + f" nm {axes}"


def _shape_text(image):
    """``"24 x 384 x 384 voxels (z, y, x)"``, or ``"... pixels (y, x)"`` for a 2D image."""
    kind = "voxels (z, y, x)" if image.ndim == 3 else "pixels (y, x)"
    return " x ".join(map(str, image.shape)) + f" {kind}"


def _check_axis_count(values, flag):
    """--spacing and --chunks take Z Y X for a volume or Y X for a 2D image."""
    if values is not None and len(values) not in (2, 3):
        raise InputError(f"{flag} takes Z Y X for volumes or Y X for 2D images; got {len(values)} values.")


def _read(path, *, spacing=None, what="image"):
    """Read an input, a 2D image as (Y, X), with its voxel size; a missing voxel size is an input error.

    A 2D image takes a pixel size (y, x): three values for it are refused
    (by :func:`nanoseg.io.read_image`) rather than silently cut.
    """
    from ..io import read_image

    _check_axis_count(spacing, "--spacing")
    image, found = read_image(path, spacing=spacing, keep_2d=True)
    if found is None and image.ndim == 2:
        raise InputError(
            f"the {what} {path} is a 2D image without a pixel size in its metadata; pass --spacing Y X "
            "(nanometres, e.g. --spacing 10 10)."
        )
    if found is None:
        raise InputError(
            f"the {what} {path} has no voxel size in its metadata; pass --spacing Z Y X "
            "(nanometres, e.g. --spacing 50 10 10)."
        )
    return image, found


def _read_any(path, like=None):
    """Read an input without needing its voxel size, shaped as `like` where they differ by one slice."""
    from ..io import read_image

    image, spacing = read_image(path, keep_2d=True)
    return (image if like is None else _match_slices(image, like)), spacing


def _match_slices(array, like):
    """`array` as a 2D image or a volume of one slice, to match `like`.

    A 2D image stored as a volume of one slice (as :func:`nanoseg.io.write_ome_zarr`
    stores one given a (z, y, x) voxel size) still pairs with the 2D image it
    came from.
    """
    shape, target = tuple(array.shape), tuple(like.shape)
    if len(shape) == 3 and len(target) == 2 and shape == (1, *target):
        return array[0]
    if len(shape) == 2 and len(target) == 3 and target == (1, *shape):
        return array[None]
    return array


def _check_connectivity(labeler, image):
    """Refuse a 3D neighbourhood for a 2D image before anything is computed."""
    if image.ndim == 2 and labeler.connectivity > 2:
        raise InputError(
            f"--connectivity {labeler.connectivity} is for volumes; a 2D image takes 1 (4-neighbourhood) "
            "or 2 (8-neighbourhood)."
        )


def _check_chunks(chunks, image):
    """--chunks must have one value per axis of the image, checked before any computation."""
    _check_axis_count(chunks, "--chunks")
    if chunks is not None and len(chunks) != image.ndim:
        wanted = "Y X for a 2D image" if image.ndim == 2 else "Z Y X for a volume"
        raise InputError(f"--chunks takes {wanted}; got {len(chunks)} values.")


def _require(module, purpose, extra):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RunError(f"{purpose} needs {module} ({exc}); install it with pip install {extra}.") from None


def _has_module(name):
    return importlib.util.find_spec(name) is not None


def _check_parent(path, what):
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise InputError(f"the folder of the {what} {path} does not exist; create it first.")


def _check_table_path(path, inputs, overwrite):
    from ..io import check_output_path

    _check_parent(path, "table")
    if Path(path).suffix.lower() not in _TABLE_SUFFIXES:
        raise InputError(f"the table {path} must end in .csv or .parquet.")
    if Path(path).suffix.lower() == ".parquet":
        _require("pyarrow", "writing Parquet", "pyarrow")
    check_output_path(path, inputs=inputs, overwrite=overwrite)


def _check_report_dir(directory, inputs, overwrite):
    from ..io import check_output_path

    _require("matplotlib", "--report", "matplotlib")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise InputError(f"--report {directory} exists and is not a folder.")
    # The report is written into the folder, never by replacing it: check
    # where its files go, and that no earlier report would be overwritten.
    check_output_path(directory / "index.html", inputs=inputs, overwrite=True)
    plotting = importlib.import_module("nanoseg.plotting")
    existing = [name for name in plotting.REPORT_FILES if (directory / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{directory} already holds a report ({', '.join(existing)}); pass --overwrite to replace it."
        )


def _options(args, names):
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _set_device(estimators, device):
    if device is None:
        return
    for estimator in estimators:
        if "device" in estimator.get_params():
            estimator.set_params(device=device)
        elif device != "cpu":
            raise InputError(
                f"--device {device} is not available: this version of nanoseg runs on the CPU only."
            )


def _set_performance(estimators, args):
    for estimator in estimators:
        estimator.set_params(**_options(args, ("memory_budget", "n_jobs")))
    _set_device(estimators, getattr(args, "device", None))


# ---------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------


def _is_joblib(path):
    return Path(path).suffix.lower() == ".joblib"


def _save_model(model, path, overwrite=False):
    """Save with joblib for a ``.joblib`` path, else in nanoseg's safe model format.

    Either way the file appears at `path` only once complete.
    """
    if not _is_joblib(path):
        persistence = importlib.import_module("nanoseg.persistence")
        persistence.save(model, path, overwrite=overwrite)
        return
    import joblib

    path = Path(path)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it.")
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        joblib.dump(model, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.lexists(temporary):
            os.unlink(temporary)


def _read_model(path):
    """The estimator in a model file: joblib for ``.joblib``, nanoseg's safe format otherwise."""
    if not Path(path).exists():
        raise InputError(f"the model {path} does not exist.")
    with open(path, "rb") as stream:
        is_zip = stream.read(4) == b"PK\x03\x04"
    if _is_joblib(path) and not is_zip:
        # A joblib file runs code when loaded: only one the user named as such.
        import joblib

        return joblib.load(path)
    persistence = importlib.import_module("nanoseg.persistence")
    return persistence.load(path)


def _is_classifier(model):
    from ..classifier import NanoparticleClassifier

    return isinstance(model, NanoparticleClassifier)


def _load_model(path, args):
    """Load a saved mixture or classifier; only prediction-time options may change it."""
    from ..mixture import NanoparticleMixture

    fit_only = [name for name, when in _MIXTURE_OPTIONS.items() if when == "fit" and getattr(args, name, None) is not None]
    if fit_only:
        flags = ", ".join("--" + name.replace("_", "-") for name in fit_only)
        verb = "acts" if len(fit_only) == 1 else "act"
        raise InputError(f"{flags} {verb} only while fitting, so cannot be combined with --model.")
    model = _read_model(path)
    if isinstance(model, NanoparticleMixture):
        model.set_params(verbose=_progress(args), **_options(args, ["beta_prior"]))
    elif _is_classifier(model):
        if getattr(args, "beta_prior", None) is not None:
            raise InputError(f"--beta-prior sets an intensity mixture, but {path} holds a NanoparticleClassifier.")
        model.set_params(verbose=_progress(args))
    else:
        raise InputError(
            f"{path} holds a {type(model).__name__}, not a fitted NanoparticleMixture or NanoparticleClassifier."
        )
    _set_performance([model], args)
    model._check_params()
    return model


def _make_mixture(args):
    from ..mixture import NanoparticleMixture

    options = _options(args, _MIXTURE_OPTIONS)
    if "intensity_range" in options:
        options["intensity_range"] = tuple(options["intensity_range"])
    mixture = NanoparticleMixture(**options, verbose=_progress(args))
    _set_performance([mixture], args)
    mixture._validate_params()
    mixture._check_params()
    return mixture


def _make_labeler(args, model=None):
    """The labeller of the options given; after a classifier, its own defaults."""
    from ..labeler import NanoparticleLabeler

    defaults = _CLASSIFIER_LABELER_DEFAULTS if model is not None and _is_classifier(model) else {}
    options = {**defaults, **_options(args, _LABELER_OPTIONS)}
    labeler = NanoparticleLabeler(**options, verbose=_progress(args))
    _set_performance([labeler], args)
    labeler._validate_params()
    return labeler


def _lazy(image):
    """A dask view of `image`, so that estimators return lazy results."""
    from .._volume import is_lazy

    if is_lazy(image):
        return image
    import dask.array as da

    # One task per slice, or one for a whole 2D image.
    return da.from_array(image, chunks=(1, *image.shape[1:]) if image.ndim == 3 else image.shape)


def _posterior(model, image):
    """Particle probability of a volume or 2D image from a mixture or a classifier.

    A classifier trained on 2D images is applied to a volume one slice at a
    time.
    """
    if getattr(model, "n_dims_", 3) != 2 or image.ndim == 2:
        return model.predict_proba(image)
    import copy

    import dask.array as da

    from .._plan import rechunk

    # Slices are classified when the result is written, after the estimators'
    # messages are sent to stderr: a quiet copy keeps stdout for results.
    model = copy.copy(model).set_params(verbose=False)
    slices = image if isinstance(image, da.Array) else da.from_array(image, chunks=(1, *image.shape[1:]))
    slices = rechunk(slices, (1, *image.shape[1:]))
    return slices.map_blocks(
        lambda block: np.asarray(model.predict_proba(np.asarray(block[0])))[None], dtype=np.float32
    )


def _model_key(model):
    return "classifier" if _is_classifier(model) else "mixture"


def _binning_text(mixture):
    """How the model maps intensities to its 256 bins; empty for 8-bit data kept as is."""
    mode, low, high, shift = (
        mixture.binning_mode_, mixture.binning_low_, mixture.binning_high_, mixture.binning_shift_
    )
    if mode == "range" and (low, high) == (0, 255):
        return ""
    if mode == "shift":
        return f" Intensities mapped to 256 bins of {2**shift} values each (shift by {shift} bits)."
    return f" Intensities {low} to {high} mapped linearly to 256 bins ('range' binning)."


def _fit_summary(mixture):
    state = "converged" if mixture.converged_ else "NOT converged (raise --max-iter or --tol)"
    levels = "intensities" if not _binning_text(mixture) else "bins"
    slices = f"{mixture.n_slices_fit_} slice" + ("s" if mixture.n_slices_fit_ != 1 else "")
    return (
        f"Fitted on {slices}: EM {mixture.n_iter_} iterations, {state}; "
        f"background weight {mixture.background_weight_:.5f}; seed {levels} >{mixture.low_intensity_}, "
        f"hard exclusion >={mixture.high_intensity_}." + _binning_text(mixture)
    )


def _provenance(command, **entries):
    return {"version": __version__, "command": command, **entries}


def _jsonable(params):
    out = {}
    for key, value in params.items():
        if isinstance(value, tuple):
            value = list(value)
        if value is None or isinstance(value, (bool, int, float, str, list)):
            out[key] = value
    return out


def _count_labels(labels, lazy=None):
    """Number of particles in sequential labels: their maximum, read slab by slab.

    The labeler's `lazy` labels they were written from know it already, so
    nothing is read again.
    """
    sparse = handoff.find(lazy, handoff.SPARSE_LABELS)
    if sparse is not None:
        return sparse.n_labels
    import dask.array as da

    from .._plan import compute

    return int(compute(da.from_zarr(labels).max())[0]) if labels.size else 0
