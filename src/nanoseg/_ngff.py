"""OME-Zarr (NGFF) image metadata: the full-resolution array, its axes and its scale.

:mod:`nanoseg.io` reads NGFF 0.1 to 0.5 multiscale images through
:func:`ome_image` and writes NGFF 0.5 metadata with :func:`ngff_metadata`.
An image has 3 space axes (z, y, x) or, for a 2D image, 2 (y, x), after
optional leading time and channel axes of size 1.
"""

from __future__ import annotations

import numpy as np
import zarr

from ._spacing import unit_to_nm

AXES = ("z", "y", "x")
NGFF_VERSION = "0.5"


def _ome_attributes(attrs):
    """The OME namespace: NGFF 0.5 nests it under "ome", 0.4 keeps it top level."""
    ome = attrs.get("ome")
    return dict(ome) if isinstance(ome, dict) else dict(attrs)


def _malformed(path, field, problem):
    return ValueError(
        f"Malformed OME-Zarr metadata in {path}: {field} {problem}. Fix the metadata, or pass "
        "the voxel size yourself, in nm (spacing=(z, y, x), or --spacing Z Y X on the command line; "
        "Y X for a 2D image)."
    )


def _multiscale(group, path):
    ome = _ome_attributes(group.attrs.asdict())
    multiscales = ome.get("multiscales")
    if multiscales is None:
        return None, ome
    if not isinstance(multiscales, list) or not multiscales or not isinstance(multiscales[0], dict):
        raise _malformed(path, "'multiscales'", "must be a non-empty list of objects")
    datasets = multiscales[0].get("datasets")
    if not isinstance(datasets, list) or not datasets or not isinstance(datasets[0], dict) \
            or not isinstance(datasets[0].get("path"), str):
        raise _malformed(path, "'multiscales[0].datasets'", "must list at least one dataset with a 'path'")
    return multiscales[0], ome


def _axis_names(multiscale, ndim, path):
    """Axis names and types; NGFF before 0.4 lists names only (or nothing)."""
    axes = multiscale.get("axes")
    if axes is None:
        names = ["t", "c", "z", "y", "x"][-ndim:] if ndim <= 5 else None
        return names, [("space" if n in AXES else None) for n in names or []], [None] * ndim
    if not isinstance(axes, list) or len(axes) != ndim:
        raise _malformed(path, "'multiscales[0].axes'", f"must list {ndim} axes, one per array dimension")
    names, types, units = [], [], []
    for axis in axes:
        if isinstance(axis, str):
            names.append(axis)
            types.append("space" if axis in AXES else None)
            units.append(None)
        elif isinstance(axis, dict) and isinstance(axis.get("name"), str):
            names.append(axis["name"])
            types.append(axis.get("type", "space" if axis["name"] in AXES else None))
            units.append(axis.get("unit"))
        else:
            raise _malformed(path, "'multiscales[0].axes'", "must hold objects with a 'name'")
    return names, types, units


def _scale(transforms, ndim, path, field):
    """Product of the 'scale' transformations in a list (None: no list)."""
    if transforms is None:
        return None
    if not isinstance(transforms, list):
        raise _malformed(path, field, "must be a list of transformations")
    scale = None
    for transform in transforms:
        if not isinstance(transform, dict) or transform.get("type") not in ("scale", "translation", "identity"):
            raise _malformed(path, field, "must hold 'scale', 'translation' or 'identity' transformations")
        if transform["type"] != "scale":
            continue
        values = transform.get("scale")
        if not isinstance(values, list) or len(values) != ndim:
            raise _malformed(path, f"{field} 'scale'", f"must be a list of {ndim} numbers")
        try:
            values = np.asarray(values, dtype=float)
        except (TypeError, ValueError):
            raise _malformed(path, f"{field} 'scale'", f"must be a list of {ndim} numbers") from None
        if not np.all(np.isfinite(values) & (values > 0)):
            raise _malformed(path, f"{field} 'scale'", f"must be positive, got {values.tolist()}")
        scale = values if scale is None else scale * values
    return scale


def ome_image(group, path, with_spacing=True):
    """Full-resolution array, the indices of its space axes, and their sizes in nm.

    The sizes are (z, y, x), or (y, x) for an image of 2 space axes. Without
    `with_spacing` they are not parsed (None), so that a caller-given voxel
    size works around malformed transformations or units.
    """
    attrs = group.attrs.asdict()
    ome = _ome_attributes(attrs)
    if "bioformats2raw.layout" in ome and "multiscales" not in ome and "0" in group:
        # bioformats2raw output: the first image is the group "0".
        return ome_image(group["0"], f"{path}/0", with_spacing)
    multiscale, ome = _multiscale(group, path)
    if multiscale is None:
        raise ValueError(
            f"{path} is a zarr group without OME-Zarr 'multiscales' metadata; pass the path of "
            "the array inside it (e.g. its '0' entry) or an OME-Zarr image."
        )
    dataset = multiscale["datasets"][0]
    try:
        array = group[dataset["path"]]
    except KeyError:
        raise _malformed(path, "'multiscales[0].datasets[0].path'", f"names {dataset['path']!r}, which does not exist") from None
    if not isinstance(array, zarr.Array):
        raise _malformed(path, "'multiscales[0].datasets[0].path'", "must name an array")
    names, types, units = _axis_names(multiscale, array.ndim, path)
    space = [i for i, t in enumerate(types) if t == "space"]
    if len(space) not in (2, 3) or space != list(range(array.ndim - len(space), array.ndim)):
        raise _malformed(path, "'multiscales[0].axes'", "must end with 2 or 3 'space' axes (z, y, x)")
    for i in range(array.ndim - len(space)):
        if array.shape[i] != 1:
            raise ValueError(
                f"{path} has a {names[i]!r} axis of size {array.shape[i]}; nanoseg reads one "
                "greyscale volume. Extract a single channel / time point first."
            )
    version = str(ome.get("version", multiscale.get("version", "")))
    if version in ("0.1", "0.2", "0.3") or not with_spacing:
        return array, space, None
    field = "'multiscales[0].datasets[0].coordinateTransformations'"
    scale = _scale(dataset.get("coordinateTransformations"), array.ndim, path, field)
    if scale is None:
        raise _malformed(path, field, "is missing (NGFF 0.4 and later require a 'scale')")
    outer = _scale(multiscale.get("coordinateTransformations"), array.ndim, path,
                   "'multiscales[0].coordinateTransformations'")
    scale = scale if outer is None else scale * outer
    spacing = []
    for i in space:
        factor = unit_to_nm(units[i])
        if units[i] is None:
            raise _malformed(path, f"axis {names[i]!r}", "has no 'unit', so its scale has no physical size")
        if factor is None:
            raise _malformed(
                path, f"axis {names[i]!r} 'unit'",
                f"is {units[i]!r}, not a length unit nanoseg knows (e.g. 'nanometer', 'micrometer')",
            )
        spacing.append(float(scale[i]) * factor)
    return array, space, tuple(spacing)


def ngff_metadata(spacing, kind, name):
    """The ``"ome"`` attributes of a single-scale image of `spacing` (z, y, x) or (y, x) in nm."""
    multiscale = {
        "name": name,
        "axes": [{"name": axis, "type": "space", "unit": "nanometer"} for axis in AXES[-len(spacing):]],
        "datasets": [
            {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": list(spacing)}]}
        ],
    }
    ome = {"version": NGFF_VERSION, "multiscales": [multiscale]}
    if kind == "labels":
        ome["image-label"] = {}
    return ome
