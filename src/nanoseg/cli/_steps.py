"""The step-by-step commands: ``convert``, ``fit``, ``predict``, ``label`` and ``measure``."""

from __future__ import annotations

import importlib
import os

import numpy as np

from ._common import (
    EXIT_OK,
    _check_chunks,
    _check_connectivity,
    _check_parent,
    _check_table_path,
    _count_labels,
    _fit_summary,
    _is_classifier,
    _jsonable,
    _lazy,
    _load_model,
    _make_labeler,
    _make_mixture,
    _posterior,
    _progress,
    _provenance,
    _read,
    _read_any,
    _save_model,
    _shape_text,
    _spacing_text,
    _to_stderr,
)


def convert(args):
    """``nanoseg convert``: TIFF, PNG, JPEG or zarr to OME-Zarr with its voxel size.

    A 2D image is written as a 2D OME-Zarr image (axes y, x).
    """
    from ..io import check_output_path, write_ome_zarr

    check_output_path(args.output, inputs=[args.input], overwrite=args.overwrite)
    image, spacing = _read(args.input, spacing=args.spacing)
    _check_chunks(args.chunks, image)
    write_ome_zarr(
        args.output, image, spacing=spacing, chunks=args.chunks, overwrite=args.overwrite,
        progress=_progress(args), attributes=_provenance("convert", source=os.fspath(args.input)),
    )
    print(
        f"Wrote {args.output}: {_shape_text(image)} of {np.dtype(image.dtype)}, spacing "
        f"{_spacing_text(spacing)}."
    )
    return EXIT_OK


def fit(args):
    """``nanoseg fit``: fit the intensity mixture and save it."""
    from ..io import check_output_path

    check_output_path(args.model, inputs=[args.image], overwrite=args.overwrite)
    _check_parent(args.model, "model")
    mixture = _make_mixture(args)
    image, _ = _read(args.image, spacing=args.spacing)
    with _to_stderr():
        mixture.fit(image)
    _save_model(mixture, args.model, overwrite=args.overwrite)
    print(_fit_summary(mixture))
    print(f"Saved the model to {args.model}.")
    return EXIT_OK


def predict(args):
    """``nanoseg predict``: the posterior of a saved mixture or classifier, as OME-Zarr."""
    from ..io import check_output_path, write_ome_zarr

    check_output_path(args.output, inputs=[args.image, args.model], overwrite=args.overwrite)
    image, spacing = _read(args.image, spacing=args.spacing)
    _check_chunks(args.chunks, image)
    model = _load_model(args.model, args)
    if args.dtype is not None and not _is_classifier(model):
        model.set_params(posterior_dtype=args.dtype)
    with _to_stderr():
        posterior = _posterior(model, _lazy(image))
    if args.dtype is not None and posterior.dtype != args.dtype:
        posterior = posterior.astype(args.dtype)
    write_ome_zarr(
        args.output, posterior, spacing=spacing, chunks=args.chunks, overwrite=args.overwrite,
        progress=_progress(args),
        attributes=_provenance("predict", source=os.fspath(args.image), model=os.fspath(args.model)),
    )
    print(f"Wrote the {posterior.dtype} posterior to {args.output}, spacing {_spacing_text(spacing)}.")
    return EXIT_OK


def label(args):
    """``nanoseg label``: label the particles of a posterior."""
    from ..io import check_output_path, write_ome_zarr

    check_output_path(args.output, inputs=[args.posterior], overwrite=args.overwrite)
    labeler = _make_labeler(args)
    posterior, spacing = _read(args.posterior, spacing=args.spacing, what="posterior")
    _check_chunks(args.chunks, posterior)
    _check_connectivity(labeler, posterior)
    with _to_stderr():
        labels = labeler.transform(_lazy(posterior))
    written = write_ome_zarr(
        args.output, labels, spacing=spacing, kind="labels", chunks=args.chunks,
        overwrite=args.overwrite, progress=_progress(args),
        attributes=_provenance("label", source=os.fspath(args.posterior), parameters=_jsonable(labeler.get_params())),
    )
    print(f"Wrote {_count_labels(written, labels)} particles to {args.output}, spacing {_spacing_text(spacing)}.")
    return EXIT_OK


def measure(args):
    """``nanoseg measure``: a table of particle sizes and positions."""
    measure = importlib.import_module("nanoseg.measure")
    inputs = [args.labels, args.posterior, args.image]
    _check_table_path(args.table, inputs, args.overwrite)
    labels, spacing = _read(args.labels, spacing=args.spacing, what="label image")
    companions = {}
    for name, path in (("posterior", args.posterior), ("intensity", args.image)):
        if path is not None:
            companions[name], _ = _read_any(path, like=labels)
    # A 2D image gives areas and circle diameters, a volume volumes and sphere diameters.
    table = measure.particle_table(labels, spacing=spacing, progress=_progress(args), **companions)
    measure.write_table(table, args.table, overwrite=args.overwrite)
    sizes = "volumes in nm^3" if labels.ndim == 3 else "areas in nm^2"
    print(f"Measured {len(table)} particles; wrote {args.table} (lengths in nm, {sizes}).")
    return EXIT_OK
