"""The whole chain: ``nanoseg segment``, and ``nanoseg demo`` on a synthetic phantom."""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .. import _handoff as handoff
from .._ops import _numba
from ._common import (
    EXIT_OK,
    InputError,
    RunError,
    _check_chunks,
    _check_connectivity,
    _check_report_dir,
    _check_table_path,
    _count_labels,
    _fit_summary,
    _has_module,
    _is_classifier,
    _jsonable,
    _lazy,
    _load_model,
    _make_labeler,
    _make_mixture,
    _model_key,
    _posterior,
    _progress,
    _provenance,
    _read,
    _require,
    _spacing_text,
    _to_stderr,
)


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

    Every output path is checked before anything is computed. `model` may
    hold a fitted NanoparticleMixture or NanoparticleClassifier; without it
    a mixture is fitted to the image.
    """
    from ..io import check_output_path, write_ome_zarr

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
    estimator = _load_model(model, args) if model is not None else _make_mixture(args)
    if report is not None and _is_classifier(estimator):
        raise InputError(
            "--report shows the fitted intensity mixture, which a NanoparticleClassifier model does not "
            "have; drop --report (the --table still describes every particle)."
        )
    labeler = _make_labeler(args, estimator)
    image, spacing = _read(image_path, spacing=spacing)
    _check_chunks(chunks, image)
    _check_connectivity(labeler, image)
    image = _lazy(image)

    start = time.perf_counter()
    # First runs compile the kernels (once per installation): say how long.
    with _numba.compile_clock() as compiling:
        with _to_stderr():
            if model is None:
                # fit_transform reuses the fit's slice histograms for the posterior's tables.
                posterior = estimator.fit_transform(image)
            else:
                posterior = _posterior(estimator, image)
            labels = labeler.transform(posterior)
        written = write_ome_zarr(
            output, labels, spacing=spacing, kind="labels", chunks=chunks, overwrite=overwrite,
            progress=progress,
            attributes=_provenance(
                "segment", source=os.fspath(image_path),
                **{_model_key(estimator): _jsonable(estimator.get_params())},
                labeler=_jsonable(labeler.get_params()),
            ),
        )
        particles = None
        if table is not None or report is not None:
            with _to_stderr():
                # The lazy labels carry their voxel lists (and the posterior its
                # tables): measured without reading the written labels back.
                particles = measure.particle_table(
                    labels, spacing=spacing, posterior=posterior, intensity=image, progress=progress
                )
            if table is not None:
                measure.write_table(particles, table, overwrite=overwrite)
        if report is not None:
            from sklearn.base import clone

            plotting = importlib.import_module("nanoseg.plotting")
            with _to_stderr():
                plotting.write_report(
                    report, mixture=estimator, image=image, labels=written, table=particles,
                    posterior=posterior[sensitivity_sample(image.shape)],
                    labeler=clone(labeler).set_params(verbose=False), overwrite=overwrite,
                    # Known when the posterior came from the fit: no read of the image for them.
                    slice_weights=handoff.find(posterior, handoff.SLICE_WEIGHTS),
                )
    return SimpleNamespace(
        mixture=estimator, labeler=labeler, labels=written, spacing=spacing, table=particles,
        n_particles=_count_labels(written, labels), seconds=time.perf_counter() - start,
        compile_seconds=compiling.seconds,
    )


#: Voxels of the sample the report's threshold-sensitivity plot labels once
#: per threshold (up to eight times).
SENSITIVITY_VOXELS = 32 * 2**20
#: Most slices of that sample.
SENSITIVITY_SLICES = 32
#: Most voxels of the whole planes the sample is cut from: a lazy posterior
#: is computed plane by plane (its per-slice tables need whole planes).
SENSITIVITY_PLANE_VOXELS = 256 * 2**20


def sensitivity_sample(shape):
    """The central block of a 2D or 3D image of `shape` that the report's
    threshold-sensitivity plot labels: at most :data:`SENSITIVITY_SLICES`
    slices (fewer where their planes would hold more than
    :data:`SENSITIVITY_PLANE_VOXELS`), and rows and columns cut to a
    central window so that it holds about :data:`SENSITIVITY_VOXELS`
    voxels. A tuple of slices.

    The report's cost is then about the same whatever the size of the
    image's planes (the plot labels the sample up to eight times).
    """
    depth = 1
    if len(shape) == 3:
        depth = min(shape[0], SENSITIVITY_SLICES, max(1, SENSITIVITY_PLANE_VOXELS // (shape[1] * shape[2])))
    side = max(1, math.isqrt(SENSITIVITY_VOXELS // depth))
    sample = [slice((n - min(n, side)) // 2, (n - min(n, side)) // 2 + min(n, side)) for n in shape[-2:]]
    if len(shape) == 3:
        start = (shape[0] - depth) // 2
        sample.insert(0, slice(start, start + depth))
    return tuple(sample)


def segment(args):
    """``nanoseg segment``: fit or load a model, predict, label and measure."""
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
        f"Found {result.n_particles} particles in {_timing_text(result)}; wrote {args.output} "
        f"(spacing {_spacing_text(result.spacing)})."
    )
    if args.table is not None:
        print(f"Wrote the particle table to {args.table}.")
    if args.report is not None:
        print(f"Wrote the report to {Path(args.report) / 'index.html'}.")
    if result.n_particles == 0:
        print(_nothing_found_hint(result), file=sys.stderr)
    return EXIT_OK


def _detections_merging(labels, truth):
    """Number of detections in `labels` that overlap two or more particles of `truth`."""
    both = (labels > 0) & (truth > 0)
    pairs = np.unique(np.stack([labels[both], truth[both]]), axis=1)
    _, n_truths = np.unique(pairs[0], return_counts=True)
    return int(np.count_nonzero(n_truths > 1))


#: Compilation shorter than this goes unmentioned.
COMPILE_NOTE_SECONDS = 0.5


def _timing_text(result):
    """"2.31 s", with the share spent compiling kernels when there was one."""
    text = f"{result.seconds:.2f} s"
    if result.compile_seconds >= COMPILE_NOTE_SECONDS:
        text += (
            f" ({result.compile_seconds:.1f} s of it compiling nanoseg's kernels: once per installation, "
            "later runs load them from numba's cache)"
        )
    return text


def _nothing_found_hint(result):
    # Zero particles is a result, but rarely the one wanted: say what to try.
    labeler = result.labeler
    text = f"No particle was found (threshold {labeler.threshold:g}, minimum size {labeler.min_size} voxels)."
    if _is_classifier(result.mixture):
        return (
            f"{text} A trained model carries over poorly to images unlike its training crops: annotate a "
            "few crops of this image and train on them (nanoseg train), or try a lower --threshold or --min-size."
        )
    return f"{text} Try a lower --threshold or --min-size, or look at the fitted model with --report DIR."


def _connect(address):
    distributed = _require("distributed", "--scheduler", "distributed")
    try:
        # The connection timeout is dask's "distributed.comm.timeouts.connect".
        return distributed.Client(address)
    except (OSError, TimeoutError) as exc:
        raise RunError(f"could not connect to the dask scheduler at {address}: {exc}") from None


def demo(args):
    """``nanoseg demo``: segment a synthetic phantom and compare with its truth."""
    from ..datasets import make_phantom
    from ..io import write_ome_zarr
    from ..metrics import match_objects, voxel_scores

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
        print(f"Found {result.n_particles} particles in {_timing_text(result)}.")
        hit = np.unique(truth[(labels > 0) & mask])
        print(f"Ground-truth particles overlapped by a detection: {hit.size} of {int(truth.max())}.")
        print(f"Voxel Dice against the ground truth: {voxel_scores(labels, mask)['dice']:.3f}.")
        print(f"Object F1 against the ground truth (IoU > 0.5): {match_objects(labels, truth)['f1']:.3f}.")
        merged = _detections_merging(labels, truth)
        if merged:
            print(
                f"Detections covering more than one ground-truth particle: {merged} (touching particles form "
                "one connected component, and count as missed at IoU > 0.5)."
            )
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
