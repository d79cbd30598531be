"""The ``nanoseg`` command line: from a TIFF stack to a particle table.

Each step reads and writes files, so a long run can be checked and resumed
step by step::

    nanoseg convert slices/ image.zarr --spacing 50 10 10
    nanoseg fit image.zarr model.npz
    nanoseg predict image.zarr model.npz posterior.zarr
    nanoseg label posterior.zarr labels.zarr
    nanoseg measure labels.zarr particles.csv --image image.zarr

or all at once with ``nanoseg segment image.zarr labels.zarr --table
particles.csv``. Results go to stdout; progress bars, warnings and errors go
to stderr. Exit status: 0 on success, 2 for a usage error or bad input
(nothing was computed), 1 when a computation failed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import math
import os
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from . import __version__

__all__ = ["build_parser", "main"]

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


class InputError(Exception):
    """A problem with the command's arguments or inputs (exit status 2)."""


class RunError(Exception):
    """A failure while computing (exit status 1)."""


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


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
    return " x ".join(f"{v:g}" for v in spacing) + " nm (z, y, x)"


def _read(path, *, spacing=None, what="image"):
    """Read an input with its voxel size; a missing voxel size is an input error."""
    from .io import read_image

    image, found = read_image(path, spacing=spacing)
    if found is None:
        raise InputError(
            f"the {what} {path} has no voxel size in its metadata; pass --spacing Z Y X "
            "(nanometres, e.g. --spacing 50 10 10)."
        )
    return image, found


def _require(module, purpose, extra):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RunError(f"{purpose} needs {module} ({exc}); install it with pip install {extra}.") from None


def _check_parent(path, what):
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise InputError(f"the folder of the {what} {path} does not exist; create it first.")


def _check_table_path(path, inputs, overwrite):
    from .io import check_output_path

    _check_parent(path, "table")
    if Path(path).suffix.lower() not in _TABLE_SUFFIXES:
        raise InputError(f"the table {path} must end in .csv or .parquet.")
    if Path(path).suffix.lower() == ".parquet":
        _require("pyarrow", "writing Parquet", "pyarrow")
    check_output_path(path, inputs=inputs, overwrite=overwrite)


def _check_report_dir(directory, inputs, overwrite):
    from .io import check_output_path

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


def _make_mixture(args):
    from .mixture import NanoparticleMixture

    options = _options(args, _MIXTURE_OPTIONS)
    if "intensity_range" in options:
        options["intensity_range"] = tuple(options["intensity_range"])
    mixture = NanoparticleMixture(**options, verbose=_progress(args))
    _set_performance([mixture], args)
    mixture._check_params()
    return mixture


def _load_model(path, args):
    """Load a saved mixture; only prediction-time options may change it."""
    from .mixture import NanoparticleMixture

    persistence = importlib.import_module("nanoseg.persistence")
    fit_only = [name for name, when in _MIXTURE_OPTIONS.items() if when == "fit" and getattr(args, name, None) is not None]
    if fit_only:
        flags = ", ".join("--" + name.replace("_", "-") for name in fit_only)
        verb = "acts" if len(fit_only) == 1 else "act"
        raise InputError(f"{flags} {verb} only while fitting, so cannot be combined with --model.")
    if not Path(path).exists():
        raise InputError(f"the model {path} does not exist.")
    model = persistence.load(path)
    if not isinstance(model, NanoparticleMixture):
        raise InputError(f"{path} holds a {type(model).__name__}, not a fitted NanoparticleMixture.")
    model.set_params(verbose=_progress(args), **_options(args, ["beta_prior"]))
    _set_performance([model], args)
    model._check_params()
    return model


def _make_labeler(args):
    from .labeler import NanoparticleLabeler

    labeler = NanoparticleLabeler(**_options(args, _LABELER_OPTIONS), verbose=_progress(args))
    _set_performance([labeler], args)
    labeler._validate_params()
    return labeler


def _lazy(image):
    """A dask view of `image`, so that estimators return lazy results."""
    from ._volume import is_lazy

    if is_lazy(image):
        return image
    import dask.array as da

    return da.from_array(image, chunks=(1, *image.shape[1:]))


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
    return (
        f"Fitted on {mixture.n_slices_fit_} slices: EM {mixture.n_iter_} iterations, {state}; "
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


# ---------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------


def _convert(args):
    from .io import check_output_path, write_ome_zarr

    check_output_path(args.output, inputs=[args.input], overwrite=args.overwrite)
    image, spacing = _read(args.input, spacing=args.spacing)
    write_ome_zarr(
        args.output, image, spacing=spacing, chunks=args.chunks, overwrite=args.overwrite,
        progress=_progress(args), attributes=_provenance("convert", source=os.fspath(args.input)),
    )
    print(
        f"Wrote {args.output}: {' x '.join(map(str, image.shape))} voxels (z, y, x) of "
        f"{np.dtype(image.dtype)}, spacing {_spacing_text(spacing)}."
    )
    return EXIT_OK


def _fit(args):
    from .io import check_output_path

    persistence = importlib.import_module("nanoseg.persistence")
    check_output_path(args.model, inputs=[args.image], overwrite=args.overwrite)
    _check_parent(args.model, "model")
    mixture = _make_mixture(args)
    image, _ = _read(args.image, spacing=args.spacing)
    with _to_stderr():
        mixture.fit(image)
    persistence.save(mixture, args.model, overwrite=args.overwrite)
    print(_fit_summary(mixture))
    print(f"Saved the model to {args.model}.")
    return EXIT_OK


def _predict(args):
    from .io import check_output_path, write_ome_zarr

    check_output_path(args.output, inputs=[args.image, args.model], overwrite=args.overwrite)
    image, spacing = _read(args.image, spacing=args.spacing)
    mixture = _load_model(args.model, args)
    if args.dtype is not None:
        mixture.set_params(posterior_dtype=args.dtype)
    with _to_stderr():
        posterior = mixture.predict_proba(_lazy(image))
    write_ome_zarr(
        args.output, posterior, spacing=spacing, chunks=args.chunks, overwrite=args.overwrite,
        progress=_progress(args),
        attributes=_provenance("predict", source=os.fspath(args.image), model=os.fspath(args.model)),
    )
    print(f"Wrote the {posterior.dtype} posterior to {args.output}, spacing {_spacing_text(spacing)}.")
    return EXIT_OK


def _label(args):
    from .io import check_output_path, write_ome_zarr

    check_output_path(args.output, inputs=[args.posterior], overwrite=args.overwrite)
    labeler = _make_labeler(args)
    posterior, spacing = _read(args.posterior, spacing=args.spacing, what="posterior")
    with _to_stderr():
        labels = labeler.transform(_lazy(posterior))
    written = write_ome_zarr(
        args.output, labels, spacing=spacing, kind="labels", chunks=args.chunks,
        overwrite=args.overwrite, progress=_progress(args),
        attributes=_provenance("label", source=os.fspath(args.posterior), parameters=_jsonable(labeler.get_params())),
    )
    print(f"Wrote {_count_labels(written)} particles to {args.output}, spacing {_spacing_text(spacing)}.")
    return EXIT_OK


def _count_labels(labels):
    """Number of particles in sequential labels: their maximum, read slab by slab."""
    import dask.array as da

    return int(da.from_zarr(labels).max().compute()) if labels.size else 0


def _measure(args):
    measure = importlib.import_module("nanoseg.measure")
    inputs = [args.labels, args.posterior, args.image]
    _check_table_path(args.table, inputs, args.overwrite)
    labels, spacing = _read(args.labels, spacing=args.spacing, what="label image")
    companions = {}
    for name, path in (("posterior", args.posterior), ("intensity", args.image)):
        if path is not None:
            companions[name], _ = _read_any(path)
    table = measure.particle_table(labels, spacing=spacing, progress=_progress(args), **companions)
    measure.write_table(table, args.table, overwrite=args.overwrite)
    print(f"Measured {len(table)} particles; wrote {args.table} (lengths in nm, volumes in nm^3).")
    return EXIT_OK


def _read_any(path):
    from .io import read_image

    return read_image(path)


def _run_segment(
    image_path,
    output,
    *,
    spacing=None,
    model=None,
    mixture_options=None,
    labeler_options=None,
    table=None,
    report=None,
    chunks=None,
    overwrite=False,
    progress=True,
    args=None,
):
    """Fit (or load), predict, label and measure; return what was done.

    Every output path is checked before anything is computed.
    """
    from .io import check_output_path, write_ome_zarr

    args = args if args is not None else SimpleNamespace(
        quiet=not progress, **(mixture_options or {}), **(labeler_options or {})
    )
    inputs = [image_path, model]
    check_output_path(output, inputs=inputs, overwrite=overwrite)
    if table is not None:
        _check_table_path(table, inputs, overwrite)
    if report is not None:
        _check_report_dir(report, inputs, overwrite)
    if table is not None or report is not None:
        measure = importlib.import_module("nanoseg.measure")
    if table is not None and Path(table).resolve() == Path(output).resolve():
        raise InputError("the table and the label image must be written to different paths.")
    mixture = _load_model(model, args) if model is not None else _make_mixture(args)
    labeler = _make_labeler(args)
    image, spacing = _read(image_path, spacing=spacing)
    image = _lazy(image)

    start = time.perf_counter()
    with _to_stderr():
        if model is None:
            mixture.fit(image)
        posterior = mixture.predict_proba(image)
        labels = labeler.transform(posterior)
    written = write_ome_zarr(
        output, labels, spacing=spacing, kind="labels", chunks=chunks, overwrite=overwrite,
        progress=progress,
        attributes=_provenance(
            "segment", source=os.fspath(image_path),
            mixture=_jsonable(mixture.get_params()), labeler=_jsonable(labeler.get_params()),
        ),
    )
    particles = None
    if table is not None or report is not None:
        with _to_stderr():
            particles = measure.particle_table(
                written, spacing=spacing, posterior=posterior, intensity=image, progress=progress
            )
        if table is not None:
            measure.write_table(particles, table, overwrite=overwrite)
    if report is not None:
        from sklearn.base import clone

        plotting = importlib.import_module("nanoseg.plotting")
        # The sensitivity plot labels the posterior once per threshold: a
        # central block of slices keeps it cheap on large volumes.
        middle, half = image.shape[0] // 2, 16
        block = slice(max(0, middle - half), middle + half)
        with _to_stderr():
            plotting.write_report(
                report, mixture=mixture, image=image, labels=written, table=particles,
                posterior=posterior[block], labeler=clone(labeler).set_params(verbose=False),
                overwrite=overwrite,
            )
    return SimpleNamespace(
        mixture=mixture, labeler=labeler, labels=written, spacing=spacing, table=particles,
        n_particles=_count_labels(written), seconds=time.perf_counter() - start,
    )


def _segment(args):
    client = _connect(args.scheduler) if args.scheduler else contextlib.nullcontext()
    with client:
        result = _run_segment(
            args.image, args.output, spacing=args.spacing, model=args.model, table=args.table,
            report=args.report, chunks=args.chunks, overwrite=args.overwrite,
            progress=_progress(args), args=args,
        )
    if args.model is None:
        print(_fit_summary(result.mixture))
    print(
        f"Found {result.n_particles} particles in {result.seconds:.2f} s; wrote {args.output} "
        f"(spacing {_spacing_text(result.spacing)})."
    )
    if args.table is not None:
        print(f"Wrote the particle table to {args.table}.")
    if args.report is not None:
        print(f"Wrote the report to {Path(args.report) / 'index.html'}.")
    return EXIT_OK


def _connect(address):
    distributed = _require("distributed", "--scheduler", "distributed")
    try:
        # The connection timeout is dask's "distributed.comm.timeouts.connect".
        return distributed.Client(address)
    except (OSError, TimeoutError) as exc:
        raise RunError(f"could not connect to the dask scheduler at {address}: {exc}") from None


def _demo(args):
    from .datasets import make_phantom
    from .io import write_ome_zarr
    from .metrics import match_objects, voxel_scores

    shape = tuple(args.shape)
    # Keep the default phantom's particle density (about 40 per 0.9 Mvoxel):
    # the method assumes particles fill a fixed small fraction of the voxels.
    n_particles = max(1, round(40 * np.prod(shape) / (24 * 192 * 192)))
    spacing = (50.0, 10.0, 10.0)
    image, mask, truth = make_phantom(
        shape, n_particles=n_particles, spacing=spacing, random_state=args.seed, return_labels=True
    )
    print(
        f"Phantom: {image.shape[0]} x {image.shape[1]} x {image.shape[2]} voxels (Z, Y, X), "
        f"{int(truth.max())} particles, {100 * mask.mean():.2f} % particle voxels."
    )
    with contextlib.ExitStack() as stack:
        if args.directory is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nanoseg-demo-")))
        else:
            folder = Path(args.directory)
            folder.mkdir(parents=True, exist_ok=True)
        progress = args.verbose
        # The demo's own files are replaced on every run.
        write_ome_zarr(folder / "phantom.zarr", image, spacing=spacing, overwrite=True, progress=progress)
        write_ome_zarr(folder / "truth.zarr", truth, spacing=spacing, kind="labels", overwrite=True, progress=progress)
        table = folder / "particles.csv" if _has_module("nanoseg.measure") else None
        result = _run_segment(
            folder / "phantom.zarr", folder / "labels.zarr", table=table, overwrite=True, progress=progress
        )
        labels = np.asarray(result.labels[...])
        mixture = result.mixture
        print(
            f"EM: {mixture.n_iter_} iterations, converged={mixture.converged_}, "
            f"background weight {mixture.background_weight_:.5f}, "
            f"seed intensities >{mixture.low_intensity_}, hard exclusion >={mixture.high_intensity_}."
        )
        print(f"Found {result.n_particles} particles in {result.seconds:.2f} s.")
        hit = np.unique(truth[(labels > 0) & mask])
        print(f"Ground-truth particles overlapped by a detection: {hit.size} of {int(truth.max())}.")
        print(f"Voxel Dice against the ground truth: {voxel_scores(labels, mask)['dice']:.3f}.")
        print(f"Object F1 against the ground truth (IoU > 0.5): {match_objects(labels, truth)['f1']:.3f}.")
        if result.table is not None and len(result.table):
            true_sizes = np.bincount(truth.ravel())[1:]
            true_diameter = np.median(np.cbrt(6 * true_sizes * np.prod(spacing) / math.pi))
            print(
                f"Median equivalent diameter: {result.table['equivalent_diameter'].median():.1f} nm "
                f"(ground truth {true_diameter:.1f} nm)."
            )
        if args.directory is not None:
            print(f"Files in {folder}: phantom.zarr, truth.zarr, labels.zarr" + (", particles.csv." if table else "."))
    return EXIT_OK


def _has_module(name):
    return importlib.util.find_spec(name) is not None


# ---------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------


def _description(text, example):
    """A command's description, wrapped, followed by its example (kept as is)."""
    return textwrap.fill(text, 79) + "\n\nexample:\n  " + example


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text):
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _seed_percentile(text):
    if text.lower() == "otsu":
        return "otsu"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a percentile (0-100] or 'otsu', got {text}") from None


def _intensity_bound(text):
    if text.lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be an integer intensity from 0 to 65535 or 'auto', got {text}")
    return value


def _add_common(parser, *, spacing=True, chunks=False, overwrite=True):
    if spacing:
        parser.add_argument(
            "--spacing", type=_positive_float, nargs=3, metavar=("Z", "Y", "X"), default=None,
            help="voxel size in nanometres, used instead of the input's metadata (required when "
            "the metadata has none)",
        )
    if chunks:
        parser.add_argument(
            "--chunks", type=_positive_int, nargs=3, metavar=("Z", "Y", "X"), default=None,
            help="chunk shape of the output (default: 1 x 1024 x 1024, capped by the shape)",
        )
    if overwrite:
        parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _add_performance(parser):
    group = parser.add_argument_group("performance")
    group.add_argument("--memory-budget", default=None, metavar="BYTES",
                       help="working memory per pass, e.g. 2GiB (default: 128 MiB per thread)")
    group.add_argument("--n-jobs", type=int, default=None, metavar="N",
                       help="threads (default: one per CPU)")
    group.add_argument("--device", choices=("cpu", "cuda"), default=None,
                       help="where the per-slice work runs (default: the estimators' own)")


def _add_mixture_options(parser):
    from .mixture import NanoparticleMixture

    defaults = NanoparticleMixture().get_params()
    group = parser.add_argument_group("intensity mixture (see NanoparticleMixture)")
    group.add_argument("--beta-prior", type=_positive_float, nargs=2, metavar=("A", "B"), default=None,
                       help=f"Beta prior on each slice's particle fraction (default: {defaults['beta_prior']})")
    group.add_argument("--sampling-step", type=_positive_int, default=None, metavar="N",
                       help=f"fit on every N-th slice (default: {defaults['sampling_step']})")
    group.add_argument("--percentile-low", type=_seed_percentile, default=None, metavar="P",
                       help="seed percentile, or 'otsu' for the stack histogram's Otsu threshold "
                       f"(default: {defaults['percentile_low']})")
    group.add_argument("--percentile-high", type=float, default=None, metavar="P",
                       help=f"hard background exclusion percentile (default: {defaults['percentile_high']})")
    group.add_argument("--halo-pad", type=int, default=None, metavar="PX",
                       help=f"pixels excluded around seeds (default: {defaults['halo_pad']})")
    group.add_argument("--halo", choices=("box", "dilation"), default=None,
                       help="exclude each seed's grown bounding box, or the pixels near the seed "
                       f"itself (default: {defaults['halo']})")
    group.add_argument("--min-seed-size", type=int, default=None, metavar="PX",
                       help=f"smallest seed component (default: {defaults['min_seed_size']})")
    group.add_argument("--monotone-posterior", action="store_true", default=None,
                       help="constrain the posterior to never decrease towards the particles' side of "
                       "the intensity scale (default: the seed method's unconstrained posterior)")
    group.add_argument("--max-iter", type=_positive_int, default=None, metavar="N",
                       help=f"EM updates at most (default: {defaults['max_iter']})")
    group.add_argument("--tol", type=float, default=None,
                       help=f"EM stopping tolerance (default: {defaults['tol']})")
    group.add_argument("--binning", choices=("auto", "range", "shift"), default=None,
                       help="how 16-bit intensities are mapped to the model's 256 bins: 'range' splits "
                       "LOW..HIGH linearly, 'shift' drops low bits; 'auto' keeps 8-bit data as it is "
                       f"and uses 'range' otherwise (default: {defaults['binning']})")
    group.add_argument("--intensity-range", type=_intensity_bound, nargs=2, metavar=("LOW", "HIGH"),
                       default=None,
                       help="bounds of the binning, in the image's units; 'auto' for the observed "
                       "minimum or maximum (default: both observed)")


def _add_labeler_options(parser):
    from .labeler import NanoparticleLabeler

    defaults = NanoparticleLabeler().get_params()
    group = parser.add_argument_group("labelling (see NanoparticleLabeler)")
    group.add_argument("--threshold", type=float, default=None, metavar="T",
                       help=f"posterior at or above which a voxel is a particle (default: {defaults['threshold']})")
    group.add_argument("--radius", type=int, default=None, metavar="R",
                       help=f"closing ball radius in voxels, 0 for none (default: {defaults['radius']})")
    group.add_argument("--min-size", type=int, default=None, metavar="N",
                       help=f"smallest particle kept, in voxels (default: {defaults['min_size']})")
    group.add_argument("--connectivity", type=int, choices=(1, 2, 3), default=None,
                       help=f"1: 6-, 2: 18-, 3: 26-neighbourhood (default: {defaults['connectivity']})")


def build_parser():
    """The ``nanoseg`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="nanoseg",
        description="Find nanoparticles in volume electron microscopy.",
        epilog="Voxel sizes are in nanometres, in (z, y, x) order. Run 'nanoseg COMMAND --help' "
        "for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"nanoseg {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help, description):
        text, example = description.split("\n\nexample:\n  ")
        return commands.add_parser(
            name, help=help, description=_description(text, example),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    convert = command(
        "convert", "convert a TIFF stack, TIFF folder or zarr array to OME-Zarr",
        "Convert a multi-page TIFF, a folder of TIFF slices (natural name order) or a zarr array "
        "to an OME-Zarr image with its voxel size.\n\nexample:\n"
        "  nanoseg convert slices/ image.zarr --spacing 50 10 10",
    )
    convert.add_argument("input", help="TIFF file, folder of TIFF slices, zarr array or OME-Zarr")
    convert.add_argument("output", help="OME-Zarr image to create")
    _add_common(convert, chunks=True)
    convert.set_defaults(run=_convert)

    fit = command(
        "fit", "fit the intensity mixture and save it",
        "Fit the background/particle intensity mixture on an image and save the model.\n\n"
        "example:\n  nanoseg fit image.zarr model.npz --beta-prior 1 20 --sampling-step 4",
    )
    fit.add_argument("image", help="uint8 or uint16 image (OME-Zarr, zarr or TIFF)")
    fit.add_argument("model", help="model file to write")
    _add_mixture_options(fit)
    _add_performance(fit)
    _add_common(fit)
    fit.set_defaults(run=_fit)

    predict = command(
        "predict", "write the particle posterior of an image",
        "Compute each voxel's posterior particle probability with a saved model and write it as "
        "an OME-Zarr image with the input's voxel size.\n\n"
        "example:\n  nanoseg predict image.zarr model.npz posterior.zarr --dtype float16",
    )
    predict.add_argument("image", help="uint8 or uint16 image (OME-Zarr, zarr or TIFF)")
    predict.add_argument("model", help="model written by 'nanoseg fit'")
    predict.add_argument("output", help="OME-Zarr posterior to create")
    predict.add_argument("--dtype", choices=("float32", "float16"), default=None,
                         help="posterior dtype (default: the model's, float32 unless changed)")
    predict.add_argument("--beta-prior", type=_positive_float, nargs=2, metavar=("A", "B"), default=None,
                         help="replace the model's Beta prior on each slice's particle fraction")
    _add_performance(predict)
    _add_common(predict, chunks=True)
    predict.set_defaults(run=_predict)

    label = command(
        "label", "label particles in a posterior",
        "Threshold a posterior, close, label connected particles and drop small ones; write an "
        "OME-Zarr label image.\n\nexample:\n  nanoseg label posterior.zarr labels.zarr --threshold 0.9",
    )
    label.add_argument("posterior", help="posterior written by 'nanoseg predict'")
    label.add_argument("output", help="OME-Zarr label image to create")
    _add_labeler_options(label)
    _add_performance(label)
    _add_common(label, chunks=True)
    label.set_defaults(run=_label)

    measure = command(
        "measure", "write a table of particle sizes and positions",
        "Measure every labelled particle (voxel count, volume, equivalent diameter, centroid, "
        "bounding box; mean/max posterior and intensity when given) in nanometres.\n\n"
        "example:\n  nanoseg measure labels.zarr particles.csv --image image.zarr",
    )
    measure.add_argument("labels", help="label image written by 'nanoseg label' or 'segment'")
    measure.add_argument("table", help="table to write (.csv or .parquet)")
    measure.add_argument("--posterior", default=None, help="posterior of the same shape")
    measure.add_argument("--image", default=None, help="image of the same shape")
    _add_common(measure)
    measure.set_defaults(run=_measure)

    segment = command(
        "segment", "fit, predict, label and measure in one go",
        "Run the whole chain out of core: fit the mixture (or load --model), compute the posterior "
        "lazily, label the particles and write them as an OME-Zarr label image; optionally a "
        "particle table and a quality-control report. The input is only read.\n\n"
        "example:\n  nanoseg segment image.zarr labels.zarr --table particles.csv --report report/",
    )
    segment.add_argument("image", help="uint8 or uint16 image (OME-Zarr, zarr, TIFF file or TIFF folder)")
    segment.add_argument("output", help="OME-Zarr label image to create")
    segment.add_argument("--table", default=None, help="also write a particle table (.csv or .parquet)")
    segment.add_argument("--model", default=None, help="use a model saved by 'nanoseg fit' instead of fitting")
    segment.add_argument("--report", default=None, metavar="DIR",
                         help="write quality-control figures and index.html to DIR")
    segment.add_argument("--scheduler", default=None, metavar="ADDRESS",
                         help="run the lazy computations on a dask.distributed scheduler")
    _add_mixture_options(segment)
    _add_labeler_options(segment)
    _add_performance(segment)
    _add_common(segment, chunks=True)
    segment.set_defaults(run=_segment)

    demo = command(
        "demo", "segment a built-in synthetic phantom and report what was found",
        "Build a synthetic SBF-SEM phantom with known particles, write it as OME-Zarr, segment it "
        "and compare with the ground truth.\n\nexample:\n  nanoseg demo demo-output/",
    )
    demo.add_argument("directory", nargs="?", default=None,
                      help="keep the phantom, labels and table here (default: a temporary folder); "
                      "the demo's files in it are replaced")
    demo.add_argument("--shape", type=_positive_int, nargs=3, default=(24, 192, 192), metavar=("Z", "Y", "X"),
                      help="phantom shape (default: 24 192 192)")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the phantom (default: 0)")
    demo.add_argument("--verbose", action="store_true", help="show progress bars")
    demo.set_defaults(run=_demo)
    return parser


# ---------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"nanoseg: warning: {message}", file=sys.stderr)


def _exit_code(exc):
    """Exit status for an expected error, or None to let it propagate."""
    from sklearn.utils._param_validation import InvalidParameterError

    if isinstance(exc, (InputError, InvalidParameterError)):
        return EXIT_USAGE
    if isinstance(exc, RunError):
        return EXIT_FAILURE
    if isinstance(exc, (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)):
        return EXIT_USAGE
    if isinstance(exc, (ValueError, TypeError)):
        return EXIT_USAGE
    if isinstance(exc, (RuntimeError, OSError, MemoryError, ImportError)):
        return EXIT_FAILURE
    return None


def main(argv=None):
    """Run the command line interface and return its exit code.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    status : int
        0 on success, 2 for a usage error or bad input, 1 when a
        computation failed. Argument errors found by the parser exit with 2
        through ``SystemExit``, as argparse does.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _show_warning
        try:
            return args.run(args)
        except KeyboardInterrupt:
            print(f"nanoseg {args.command}: interrupted; outputs being written are left incomplete.", file=sys.stderr)
            return 130
        except Exception as exc:
            code = _exit_code(exc)
            if code is None:
                raise
            message = str(exc).strip() or type(exc).__name__
            print(f"nanoseg {args.command}: error: {message}", file=sys.stderr)
            return code
