"""Read TIFF and OME-Zarr volumes with their voxel size; write OME-Zarr.

Volume electron microscopy stacks arrive as multi-page TIFF files, folders
of single-slice TIFF files, plain zarr arrays or OME-Zarr images. This module
reads all of them as (Z, Y, X) arrays -- plane, row, column -- together with
the voxel size, and writes images and label images as OME-Zarr (NGFF 0.5,
zarr format 3) that viewers such as napari open with their physical scale.

Conventions
-----------
* Voxel sizes (``spacing``) are (z, y, x) tuples of floats in **nanometres**,
  whatever unit the file stores them in.
* Large inputs are never loaded whole: zarr inputs come back as the zarr
  array itself, TIFF inputs as lazy dask arrays that read one slice per task.
* An output written by :func:`write_ome_zarr` carries a ``"nanoseg"``
  attribute whose ``"complete"`` flag is only set once every voxel is
  written, so an interrupted run never looks finished (:func:`is_complete`).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import math
import os
import re
import shutil
import struct
import warnings
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import zarr
from tqdm import tqdm

from ._volume import is_dask_array

logger = logging.getLogger("nanoseg")

__all__ = [
    "check_output_path",
    "convert",
    "is_complete",
    "read_image",
    "read_spacing",
    "write_ome_zarr",
]

#: Bytes of output data computed and written per step by :func:`write_ome_zarr`.
WRITE_BYTES = 256 * 2**20

#: Default chunk shape (z, y, x) of written arrays, capped by the array's shape.
DEFAULT_CHUNKS = (1, 1024, 1024)

_TIFF_SUFFIXES = (".tif", ".tiff")
_AXES = ("z", "y", "x")
_NGFF_VERSION = "0.5"

# Length units to nanometres. Keys are lower case with the micro sign and
# the Greek mu spelled "u"; they cover ImageJ ("micron"), OME-XML ("µm") and
# the UDUNITS names that OME-Zarr uses ("micrometer").
_NANOMETRES_PER_UNIT = {
    "pm": 1e-3, "picometer": 1e-3, "picometre": 1e-3,
    "a": 0.1, "\u00e5": 0.1, "angstrom": 0.1,
    "nm": 1.0, "nanometer": 1.0, "nanometre": 1.0, "nanometers": 1.0, "nanometres": 1.0,
    "um": 1e3, "micron": 1e3, "microns": 1e3, "micrometer": 1e3, "micrometre": 1e3,
    "micrometers": 1e3, "micrometres": 1e3,
    "mm": 1e6, "millimeter": 1e6, "millimetre": 1e6,
    "cm": 1e7, "centimeter": 1e7, "centimetre": 1e7,
    "m": 1e9, "meter": 1e9, "metre": 1e9,
}


# ---------------------------------------------------------------------------
# units and spacing
# ---------------------------------------------------------------------------


def _unit_to_nm(unit):
    """Nanometres per `unit`, or None for an unknown or uncalibrated unit."""
    if unit is None:
        return None
    key = str(unit).strip().lower()
    for mu in ("\\u00b5", "\u00b5", "\u03bc"):
        key = key.replace(mu, "u")
    return _NANOMETRES_PER_UNIT.get(key)


def check_spacing(spacing, name="spacing"):
    """Return `spacing` as a (z, y, x) tuple of positive finite floats.

    Raises
    ------
    ValueError
        Unless `spacing` is three positive finite numbers.
    """
    try:
        values = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(
            f"{name} must be three positive numbers, the voxel size along z, y and x in "
            f"nanometres (e.g. (50, 10, 10)); got {spacing!r}."
        )
    warn_unlikely_spacing(values, name)
    return values


#: Voxel sizes outside this range (nm) are almost surely in another unit.
PLAUSIBLE_SPACING_NM = (1.0, 10_000.0)


def warn_unlikely_spacing(values, name="spacing"):
    """Warn when a voxel size in nanometres is below 1 nm or above 10 um (a unit slip)."""
    low, high = PLAUSIBLE_SPACING_NM
    if any(v < low for v in values):
        warnings.warn(
            f"{name} {tuple(values)} has a voxel size below 1 nm: nanoseg reads voxel sizes in "
            "nanometres, so this is probably micrometres (multiply by 1000).",
            UserWarning,
            stacklevel=3,
        )
    elif any(v > high for v in values):
        warnings.warn(
            f"{name} {tuple(values)} has a voxel size above 10 um: nanoseg reads voxel sizes in "
            "nanometres; check the unit (picometres or angstroms need converting).",
            UserWarning,
            stacklevel=3,
        )


def _format_spacing(spacing):
    return " x ".join(f"{v:g}" for v in spacing) + " nm"


# ---------------------------------------------------------------------------
# TIFF
# ---------------------------------------------------------------------------


def _natural_key(name):
    """Sort key that orders ``slice_2`` before ``slice_10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _tiff_files(folder):
    files = [
        path for path in Path(folder).iterdir()
        if path.is_file() and path.suffix.lower() in _TIFF_SUFFIXES and not path.name.startswith(".")
    ]
    return sorted(files, key=lambda path: _natural_key(path.name))


class _TiffPlanes:
    """Array-like view of TIFF planes that reads only the slices asked for.

    It holds file names and offsets, never pixels, so dask can send it to
    workers cheaply. Three sources: an uncompressed contiguous series
    (memory-mapped), the pages of one file, or one single-page file per slice.
    """

    def __init__(self, shape, dtype, *, files=None, pages=None, offset=None, byteorder="<"):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.ndim = 3
        self.files = [str(f) for f in files]
        self.pages = pages
        self.offset = offset
        self.byteorder = byteorder

    def _plane(self, z):
        import tifffile

        if self.offset is not None:
            stored = self.dtype.newbyteorder(self.byteorder)
            plane = np.memmap(
                self.files[0], dtype=stored, mode="r", shape=self.shape[1:],
                offset=self.offset + z * int(np.prod(self.shape[1:])) * stored.itemsize,
            )
            return np.asarray(plane, dtype=self.dtype)
        if self.pages is not None:
            with tifffile.TiffFile(self.files[0]) as tif:
                data = tif.pages[self.pages[z]].asarray()
            where = f"page {self.pages[z]} of {self.files[0]}"
        else:
            data = tifffile.imread(self.files[z])
            where = self.files[z]
        if data.shape != self.shape[1:] or data.dtype != self.dtype:
            raise ValueError(
                f"{where} holds a {data.dtype} image of shape {data.shape}, but the stack's first "
                f"slice is {self.dtype} of shape {self.shape[1:]}; every slice must match."
            )
        return data

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        planes = range(*key[0].indices(self.shape[0])) if isinstance(key[0], slice) else [key[0]]
        out = np.stack([self._plane(z) for z in planes]) if planes else np.empty((0, *self.shape[1:]), self.dtype)
        out = out[(slice(None), *key[1:])]
        return out if isinstance(key[0], slice) else out[0]


def _lazy_tiff(planes, identity):
    import dask.array as da
    from dask.base import tokenize

    return da.from_array(
        planes,
        chunks=(1, *planes.shape[1:]),
        name="tiff-" + tokenize(*identity),
        lock=False,
        meta=np.empty((0, 0, 0), dtype=planes.dtype),
    )


def _resolution(page, tag):
    value = page.tags.get(tag)
    if value is None:
        return None
    value = value.value
    number = value[0] / value[1] if isinstance(value, tuple) else float(value)
    return number if number > 0 else None


def _imagej_spacing(tif):
    """(z, y, x) in nm from ImageJ metadata; entries are None where unknown."""
    meta = tif.imagej_metadata or {}
    scale = _unit_to_nm(meta.get("unit"))
    if scale is None:
        return (None, None, None)
    page = tif.pages[0]
    x_res, y_res = _resolution(page, "XResolution"), _resolution(page, "YResolution")
    z = meta.get("spacing")
    return (
        float(z) * scale if z else None,
        scale / y_res if y_res else None,
        scale / x_res if x_res else None,
    )


def _ome_spacing(tif):
    """(z, y, x) in nm from OME-XML ``PhysicalSize*``; None where unknown."""
    xml = tif.ome_metadata
    if not xml:
        return (None, None, None)
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return (None, None, None)
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return (None, None, None)
    values = []
    for axis in "ZYX":
        size = pixels.get(f"PhysicalSize{axis}")
        # OME's default unit for physical sizes is the micrometre.
        scale = _unit_to_nm(pixels.get(f"PhysicalSize{axis}Unit", "\u00b5m"))
        values.append(float(size) * scale if size and scale else None)
    return tuple(values)


def _tiff_spacing(tif):
    for found in (_ome_spacing(tif), _imagej_spacing(tif)):
        if all(v is not None and v > 0 for v in found):
            return tuple(float(v) for v in found)
    return None


def _check_tiff_axes(series, path):
    """Shape as (Z, Y, X) of a TIFF series holding one greyscale stack or image."""
    axes, shape = series.axes, tuple(series.shape)
    kept = [(a, s) for a, s in zip(axes, shape) if s != 1 or a in "YX"]
    names = "".join(a for a, _ in kept)
    if names not in ("YX", "ZYX", "IYX", "QYX"):
        raise ValueError(
            f"{path} holds an image with axes {axes} and shape {shape}; nanoseg reads one "
            "greyscale stack (Z, Y, X) or image (Y, X). Save a single channel and time point "
            "(no RGB) as a separate TIFF first."
        )
    sizes = [s for _, s in kept]
    return tuple(sizes) if len(sizes) == 3 else (1, *sizes)


def _read_tiff_file(path):
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        shape = _check_tiff_axes(series, path)
        spacing = _tiff_spacing(tif)
        first = tif.pages[0]
        if series.dataoffset is not None and getattr(first, "is_memmappable", False):
            planes = _TiffPlanes(
                shape, series.dtype, files=[path], offset=int(series.dataoffset), byteorder=tif.byteorder
            )
        elif len(series.pages) == shape[0] and all(
            page is not None and tuple(page.shape) == shape[1:] for page in series.pages
        ):
            planes = _TiffPlanes(shape, series.dtype, files=[path], pages=[page.index for page in series.pages])
        else:
            # Tiled or multi-plane pages: read once (the only copy held).
            import dask.array as da

            return da.from_array(series.asarray().reshape(shape), chunks=(1, *shape[1:])), spacing
    stat = os.stat(path)
    return _lazy_tiff(planes, (str(path), stat.st_mtime_ns, stat.st_size)), spacing


def _read_tiff_folder(folder):
    import tifffile

    files = _tiff_files(folder)
    if not files:
        raise ValueError(
            f"{folder} is a folder without TIFF files (*.tif, *.tiff) or zarr metadata; pass a "
            "folder of TIFF slices, a TIFF file or a zarr store."
        )
    with tifffile.TiffFile(files[0]) as tif:
        series = tif.series[0]
        shape = _check_tiff_axes(series, files[0])
        if shape[0] != 1:
            raise ValueError(
                f"{files[0]} holds {shape[0]} slices, but a folder must hold one 2D slice per "
                "file. Pass the multi-page file itself instead of its folder."
            )
        # Per-file metadata rarely records z; ImageJ writes it when it saves a
        # sequence, so take what the first slice has.
        spacing = _tiff_spacing(tif)
        dtype = series.dtype
    planes = _TiffPlanes((len(files), *shape[1:]), dtype, files=files)
    identity = [(str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files]
    return _lazy_tiff(planes, identity), spacing


# ---------------------------------------------------------------------------
# zarr and OME-Zarr
# ---------------------------------------------------------------------------


def _is_zarr_store(path):
    path = Path(path)
    return path.is_dir() and any((path / name).exists() for name in ("zarr.json", ".zgroup", ".zarray"))


def _ome_attributes(attrs):
    """The OME namespace: NGFF 0.5 nests it under "ome", 0.4 keeps it top level."""
    ome = attrs.get("ome")
    return dict(ome) if isinstance(ome, dict) else dict(attrs)


def _malformed(path, field, problem):
    return ValueError(
        f"Malformed OME-Zarr metadata in {path}: {field} {problem}. Fix the metadata, or pass "
        "the voxel size yourself (spacing=(z, y, x) in nm, or --spacing Z Y X on the command line)."
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
        return names, [("space" if n in _AXES else None) for n in names or []], [None] * ndim
    if not isinstance(axes, list) or len(axes) != ndim:
        raise _malformed(path, "'multiscales[0].axes'", f"must list {ndim} axes, one per array dimension")
    names, types, units = [], [], []
    for axis in axes:
        if isinstance(axis, str):
            names.append(axis)
            types.append("space" if axis in _AXES else None)
            units.append(None)
        elif isinstance(axis, dict) and isinstance(axis.get("name"), str):
            names.append(axis["name"])
            types.append(axis.get("type", "space" if axis["name"] in _AXES else None))
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


def _ome_image(group, path, with_spacing=True):
    """Full-resolution array, its axis layout, and the spacing from the metadata.

    Without `with_spacing` the spacing is not parsed (None), so that a
    caller-given voxel size works around malformed transformations or units.
    """
    attrs = group.attrs.asdict()
    ome = _ome_attributes(attrs)
    if "bioformats2raw.layout" in ome and "multiscales" not in ome and "0" in group:
        # bioformats2raw output: the first image is the group "0".
        return _ome_image(group["0"], f"{path}/0", with_spacing)
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
        factor = _unit_to_nm(units[i])
        if units[i] is None:
            raise _malformed(path, f"axis {names[i]!r}", "has no 'unit', so its scale has no physical size")
        if factor is None:
            raise _malformed(
                path, f"axis {names[i]!r} 'unit'",
                f"is {units[i]!r}, not a length unit nanoseg knows (e.g. 'nanometer', 'micrometer')",
            )
        spacing.append(float(scale[i]) * factor)
    return array, space, spacing if len(spacing) == 3 else None


def _check_marker(group, path):
    marker = group.attrs.get("nanoseg")
    if isinstance(marker, dict) and marker.get("complete") is False:
        raise ValueError(
            f"{path} was not written completely (the run that wrote it was interrupted or "
            "failed); write it again, with --overwrite (overwrite=True)."
        )


def _read_zarr(path, with_spacing=True):
    node = zarr.open(store=str(path), mode="r")
    if isinstance(node, zarr.Array):
        if node.ndim not in (2, 3):
            raise ValueError(
                f"{path} is a {node.ndim}D zarr array; nanoseg reads a 2D image (Y, X) or a 3D "
                "volume (Z, Y, X)."
            )
        return _as_3d(node), None
    _check_marker(node, path)
    array, space, spacing = _ome_image(node, path, with_spacing)
    if array.ndim == 3 and len(space) == 3:
        return array, spacing
    import dask.array as da

    lazy = da.from_zarr(array)[(0,) * (array.ndim - len(space))]
    return (lazy if lazy.ndim == 3 else lazy[None]), spacing


def _as_3d(array):
    if array.ndim == 3:
        return array
    import dask.array as da

    return (da.from_zarr(array) if isinstance(array, zarr.Array) else da.asarray(array))[None]


# ---------------------------------------------------------------------------
# public readers
# ---------------------------------------------------------------------------


def read_image(path, *, spacing=None):
    """Read a volume and its voxel size from TIFF, zarr or OME-Zarr.

    Parameters
    ----------
    path : str or path-like
        One of: a multi-page TIFF file (or a single-page one, read as one
        slice); a folder of single-slice TIFF files, stacked in natural
        order of their names (``s2.tif`` before ``s10.tif``); a zarr array;
        or an OME-Zarr image group (NGFF 0.4 with zarr format 2, or NGFF 0.5
        with zarr format 3), of which the full-resolution dataset is read.
    spacing : (float, float, float), optional
        Voxel size (z, y, x) in nanometres. When given it is returned as is
        and the file's metadata is not consulted for it.

    Returns
    -------
    image : zarr.Array or dask.array.Array, shape (Z, Y, X)
        The data, never loaded whole: the zarr array itself for a 3D zarr
        input, otherwise a lazy dask array reading one slice per task. A 2D
        image is returned as a volume of one slice.
    spacing : tuple of 3 floats or None
        Voxel size (z, y, x) in nanometres, converted from the unit in the
        metadata: the OME-Zarr ``scale`` transformation and axis units; for
        TIFF, OME-XML ``PhysicalSize*`` or ImageJ's ``spacing``, resolution
        tags and ``unit``. None when the metadata does not give all three.

    Raises
    ------
    FileNotFoundError
        If `path` does not exist.
    ValueError
        If `path` is not a readable format, holds several channels or time
        points, was left incomplete by an interrupted nanoseg run, or carries
        malformed OME-Zarr metadata (the message names the field).

    See Also
    --------
    read_spacing : The voxel size of an OME-Zarr image alone.
    write_ome_zarr : Write a volume as OME-Zarr.

    Examples
    --------
    >>> import tempfile, os
    >>> import numpy as np
    >>> from nanoseg.io import read_image, write_ome_zarr
    >>> folder = tempfile.mkdtemp()
    >>> volume = np.zeros((4, 32, 32), dtype=np.uint8)
    >>> store = os.path.join(folder, "volume.zarr")
    >>> _ = write_ome_zarr(store, volume, spacing=(50, 10, 10), progress=False)
    >>> image, spacing = read_image(store)
    >>> image.shape, spacing
    ((4, 32, 32), (50.0, 10.0, 10.0))
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    if spacing is not None:
        spacing = check_spacing(spacing)
    if _is_zarr_store(path):
        with _unreadable(path, "zarr store"):
            image, found = _read_zarr(path, with_spacing=spacing is None)
    elif path.is_dir():
        with _unreadable(path, "folder of TIFF slices"):
            image, found = _read_tiff_folder(path)
    elif path.suffix.lower() in _TIFF_SUFFIXES or _looks_like_tiff(path):
        with _unreadable(path, "TIFF file"):
            image, found = _read_tiff_file(path)
    else:
        raise ValueError(
            f"{path} is neither a TIFF file, a folder of TIFF slices nor a zarr store; convert "
            "it to one of those first."
        )
    if spacing is None and found is not None:
        spacing = tuple(float(v) for v in found)
    return image, spacing


@contextlib.contextmanager
def _unreadable(path, kind):
    """Turn a reader's low-level failure on a damaged file into one clear error."""
    import tifffile

    try:
        yield
    except (json.JSONDecodeError, UnicodeDecodeError, tifffile.TiffFileError, EOFError, struct.error) as exc:
        raise ValueError(
            f"{path} looks like a {kind} but cannot be read ({type(exc).__name__}: {exc}); "
            "the file may be damaged or incompletely copied. Check it, or convert the original again."
        ) from exc
    except (KeyError, TypeError, IndexError) as exc:
        # zarr's metadata parser reports a document missing a required field
        # (e.g. 'data_type') this way, and tifffile a damaged page structure.
        if kind == "TIFF file":
            raise ValueError(
                f"{path} looks like a TIFF file but cannot be read ({type(exc).__name__}: {exc}); "
                "the file may be damaged or incompletely copied."
            ) from exc
        if kind != "zarr store":
            raise
        raise ValueError(
            f"{path} looks like a zarr store but its metadata is malformed ({type(exc).__name__}: {exc}); "
            "the store may be damaged or incompletely copied."
        ) from exc


def _looks_like_tiff(path):
    with open(path, "rb") as handle:
        return handle.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def read_spacing(path):
    """Voxel size (z, y, x) in nanometres of an OME-Zarr image.

    Parameters
    ----------
    path : str or path-like
        An OME-Zarr image or label image group.

    Returns
    -------
    spacing : tuple of 3 floats
        The full-resolution dataset's ``scale``, converted to nanometres.

    Raises
    ------
    ValueError
        If `path` is not an OME-Zarr image or its metadata gives no voxel size.

    Examples
    --------
    >>> import tempfile, os
    >>> import numpy as np
    >>> from nanoseg.io import read_spacing, write_ome_zarr
    >>> store = os.path.join(tempfile.mkdtemp(), "labels.zarr")
    >>> _ = write_ome_zarr(store, np.zeros((2, 8, 8), np.uint32), spacing=(50, 10, 10),
    ...                    kind="labels", progress=False)
    >>> read_spacing(store)
    (50.0, 10.0, 10.0)
    """
    path = Path(path)
    if not _is_zarr_store(path):
        raise ValueError(f"{path} is not a zarr store; read_spacing needs an OME-Zarr image.")
    node = zarr.open(store=str(path), mode="r")
    if isinstance(node, zarr.Array):
        # The file's content, not the argument's type, is at fault.
        raise ValueError(f"{path} is a plain zarr array without OME-Zarr metadata, so it has no voxel size.")  # noqa: TRY004
    _, _, spacing = _ome_image(node, path)
    if spacing is None:
        raise ValueError(
            f"The OME-Zarr metadata of {path} gives no voxel size along z, y and x; pass it "
            "yourself (spacing=, or --spacing Z Y X)."
        )
    return tuple(spacing)


def is_complete(path):
    """Whether a store written by :func:`write_ome_zarr` was finished.

    Parameters
    ----------
    path : str or path-like
        A zarr group written by nanoseg.

    Returns
    -------
    complete : bool
        True only when the group's ``"nanoseg"`` attribute says all data was
        written; False for an interrupted write or a store nanoseg did not
        write.

    Raises
    ------
    FileNotFoundError
        If `path` does not exist.

    Examples
    --------
    >>> import tempfile, os
    >>> import numpy as np
    >>> from nanoseg.io import is_complete, write_ome_zarr
    >>> store = os.path.join(tempfile.mkdtemp(), "image.zarr")
    >>> _ = write_ome_zarr(store, np.ones((2, 8, 8), np.uint8), spacing=(50, 10, 10), progress=False)
    >>> is_complete(store)
    True
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    if not _is_zarr_store(path):
        return False
    node = zarr.open(store=str(path), mode="r")
    marker = node.attrs.get("nanoseg")
    return isinstance(marker, dict) and marker.get("complete") is True


# ---------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------


def _store_path(array):
    """Filesystem path of a zarr array's store, or None."""
    root = getattr(getattr(array, "store", None), "root", None)
    return None if root is None else Path(root) / getattr(array, "path", "")


def _is_unfinished(path):
    """Whether `path` is a store that nanoseg started writing but never finished."""
    if not path.is_dir() or not _is_zarr_store(path):
        return False
    try:
        marker = zarr.open(store=str(path), mode="r").attrs.get("nanoseg")
    except Exception:  # unreadable metadata: not provably ours, so keep it
        return False
    return isinstance(marker, dict) and marker.get("complete") is False


def check_output_path(output, *, inputs=(), overwrite=False):
    """Refuse an output that exists or would overwrite or sit inside an input.

    Call it before any computation, so that a mistake costs nothing.

    Parameters
    ----------
    output : str or path-like
        Where a result will be written (a zarr store, a table or a model).
    inputs : iterable of str or path-like
        The paths the computation reads; None entries are skipped.
    overwrite : bool, default=False
        Allow replacing an existing `output`.

    Returns
    -------
    output : pathlib.Path

    Raises
    ------
    ValueError
        If `output` is an input, lies inside one (e.g. inside an input zarr
        store or TIFF folder), or contains one; or if `overwrite` would
        replace a non-empty folder that is not a zarr store.
    FileExistsError
        If `output` exists and `overwrite` is False -- unless it is a store
        that nanoseg began writing and never marked complete (see
        :func:`is_complete`): what an interrupted run left is replaced, so
        that rerunning the same command resumes the work.

    Examples
    --------
    >>> import tempfile, os
    >>> from nanoseg.io import check_output_path
    >>> folder = tempfile.mkdtemp()
    >>> check_output_path(os.path.join(folder, "out.zarr"), inputs=[folder])
    Traceback (most recent call last):
        ...
    ValueError: The output ... lies inside the input ...; write it somewhere else.
    """
    out = Path(output).expanduser().resolve()
    for source in inputs:
        if source is None:
            continue
        source = Path(source).expanduser().resolve()
        if out == source:
            raise ValueError(f"The output {output} is the input {source}; nanoseg never overwrites its inputs.")
        if source in out.parents:
            raise ValueError(
                f"The output {output} lies inside the input {source}; write it somewhere else."
            )
        if out in source.parents:
            raise ValueError(
                f"The output {output} contains the input {source}; replacing it would delete the input."
            )
    if out.exists() or out.is_symlink():
        if not overwrite and _is_unfinished(out):
            # An interrupted nanoseg run left it: it holds nothing worth
            # keeping, and rerunning the same command resumes the work.
            logger.info("%s was left unfinished by an interrupted run; it will be replaced.", output)
            return out
        if not overwrite:
            raise FileExistsError(
                f"{output} already exists; pass --overwrite (overwrite=True) to replace it."
            )
        if out.is_dir() and not _is_zarr_store(out) and any(out.iterdir()):
            raise ValueError(
                f"{output} is a non-empty folder that is not a zarr store; nanoseg will not delete "
                "it. Choose another output path."
            )
    return out


def _check_chunks(chunks, shape):
    try:
        values = tuple(int(c) for c in chunks)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or any(c < 1 for c in values) or any(
        float(c) != float(v) for c, v in zip(values, chunks)
    ):
        raise ValueError(f"chunks must be three positive integers (z, y, x); got {chunks!r}.")
    return tuple(min(c, s) for c, s in zip(values, shape))


def _default_chunks(array, shape):
    if isinstance(array, zarr.Array) and array.ndim == 3:
        return tuple(min(int(c), s) for c, s in zip(array.chunks, shape))
    return tuple(min(c, s) for c, s in zip(DEFAULT_CHUNKS, shape))


def _source_edges(array, n_slices):
    """Slice indices where reading the source can stop without waste."""
    if is_dask_array(array):
        return np.cumsum(array.chunks[0]).tolist()
    if isinstance(array, zarr.Array):
        depth = int(array.chunks[0])
        return [*range(depth, n_slices, depth), n_slices]
    return list(range(1, n_slices + 1))


def slab_bounds(edges, chunk_depth, max_depth):
    """Cut [0, n) at source `edges` into slabs of at most `max_depth` slices.

    Cuts prefer multiples of the output's `chunk_depth` (whole chunks are
    written once); a slab is as deep as needed to reach the next edge.
    """
    edges = sorted({int(e) for e in edges})
    n_slices = edges[-1]
    aligned = [e for e in edges if e % chunk_depth == 0 or e == n_slices]
    bounds, start = [], 0
    while start < n_slices:
        stop = None
        for candidates in (aligned, edges):
            below = bisect.bisect_right(candidates, start + max_depth) - 1
            if below >= 0 and candidates[below] > start:
                stop = candidates[below]
                break
        if stop is None:
            stop = edges[bisect.bisect_right(edges, start)]
        bounds.append((start, stop))
        start = stop
    return bounds


def _read_slab(array, start, stop):
    data = array[start:stop]
    if is_dask_array(data):
        data = data.compute()
    return np.asarray(data)


def _ngff_metadata(spacing, kind, name):
    multiscale = {
        "name": name,
        "axes": [{"name": axis, "type": "space", "unit": "nanometer"} for axis in _AXES],
        "datasets": [
            {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": list(spacing)}]}
        ],
    }
    ome = {"version": _NGFF_VERSION, "multiscales": [multiscale]}
    if kind == "labels":
        ome["image-label"] = {}
    return ome


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_ome_zarr(
    path,
    array,
    *,
    spacing,
    kind="image",
    chunks=None,
    overwrite=False,
    progress=True,
    name=None,
    attributes=None,
):
    """Write a volume as a single-scale OME-Zarr image or label image.

    The store is an NGFF 0.5 group (zarr format 3) with one dataset ``"0"``,
    axes z, y, x of type space in nanometres, and a ``scale`` transformation
    equal to `spacing`. Label images also carry the ``"image-label"``
    metadata of the NGFF labels specification.

    Parameters
    ----------
    path : str or path-like
        The store to create.
    array : ndarray, zarr.Array or dask.array.Array, shape (Z, Y, X) or (Y, X)
        The data. Lazy inputs are computed and written slab by slab (whole
        planes, about 256 MiB at a time), never whole.
    spacing : (float, float, float)
        Voxel size (z, y, x) in nanometres.
    kind : {"image", "labels"}, default="image"
        "labels" requires integer data (0 is background).
    chunks : (int, int, int), optional
        Chunk shape (z, y, x). Default: a zarr input's chunks, otherwise
        1 x 1024 x 1024, each capped by the array's shape.
    overwrite : bool, default=False
        Replace an existing store at `path`.
    progress : bool, default=True
        Show a progress bar (on stderr).
    name : str, optional
        Name recorded in the multiscales metadata (default: the file name).
    attributes : dict, optional
        Extra JSON-serialisable entries (e.g. provenance) stored in the
        group's ``"nanoseg"`` attribute next to its ``"complete"`` flag.

    Returns
    -------
    written : zarr.Array
        The full-resolution dataset, opened read-only.

    Raises
    ------
    FileExistsError
        If `path` exists and `overwrite` is False.
    ValueError
        If `spacing`, `kind` or `chunks` are invalid, the array is not 2D or
        3D, labels are not integers, or `path` would overwrite the zarr
        store `array` is read from.

    See Also
    --------
    read_image : Read it back with its spacing.
    is_complete : Whether a write finished.

    Notes
    -----
    The ``"nanoseg"`` attribute is written first with ``"complete": false``
    and set to true only after the last voxel is written; readers in this
    module refuse a store left incomplete.

    Examples
    --------
    >>> import tempfile, os
    >>> import numpy as np
    >>> from nanoseg.io import write_ome_zarr
    >>> store = os.path.join(tempfile.mkdtemp(), "labels.zarr")
    >>> labels = np.zeros((3, 16, 16), dtype=np.uint32)
    >>> labels[1, 4:8, 4:8] = 1
    >>> written = write_ome_zarr(store, labels, spacing=(50, 10, 10), kind="labels",
    ...                          progress=False)
    >>> written.shape, str(written.dtype), int(written[1, 5, 5])
    ((3, 16, 16), 'uint32', 1)
    """
    spacing = check_spacing(spacing)
    if kind not in ("image", "labels"):
        raise ValueError(f"kind must be 'image' or 'labels'; got {kind!r}.")
    if attributes is not None and not isinstance(attributes, dict):
        raise TypeError(f"attributes must be a dict or None; got {type(attributes).__name__}.")
    ndim = len(getattr(array, "shape", ()))
    if ndim not in (2, 3):
        raise ValueError(
            f"array must be a 2D image (Y, X) or a 3D volume (Z, Y, X); got shape {getattr(array, 'shape', None)}."
        )
    if not (isinstance(array, zarr.Array) or is_dask_array(array)):
        array = np.asarray(array)
    dtype = np.dtype(array.dtype)
    if kind == "labels" and dtype.kind not in "ui":
        raise ValueError(f"Label images must hold integers (0 = background); got {dtype}.")
    source = _store_path(array) if isinstance(array, zarr.Array) else None
    out = check_output_path(path, inputs=[source], overwrite=overwrite)
    if ndim == 2:
        array = _as_3d(array)
    shape = tuple(int(s) for s in array.shape)
    chunks = _default_chunks(array, shape) if chunks is None else _check_chunks(chunks, shape)
    name = out.name if name is None else str(name)

    if out.exists() or out.is_symlink():
        _remove(out)
    marker = {**(attributes or {}), "complete": False}
    # The group's first metadata already says "not complete": a run killed at
    # any later point leaves a store that is recognisably unfinished.
    root = zarr.open_group(
        store=str(out), mode="w-", zarr_format=3,
        attributes={"ome": _ngff_metadata(spacing, kind, name), "nanoseg": marker},
    )
    target = root.create_array(
        "0", shape=shape, dtype=dtype, chunks=chunks, fill_value=0, dimension_names=_AXES
    )
    plane_bytes = shape[1] * shape[2] * dtype.itemsize
    bounds = slab_bounds(_source_edges(array, shape[0]), chunks[0], max(1, WRITE_BYTES // max(1, plane_bytes)))
    with tqdm(total=shape[0], desc=f"Writing {out.name}", unit="slice", disable=not progress) as bar:
        for start, stop in bounds:
            target[start:stop] = _read_slab(array, start, stop)
            bar.update(stop - start)
    root.attrs.update({"nanoseg": {**marker, "complete": True}})
    return zarr.open_array(store=str(out / "0"), mode="r")


def convert(input, output, *, spacing=None, chunks=None, overwrite=False, progress=True):
    """Convert a TIFF stack, TIFF folder or zarr array to OME-Zarr.

    Parameters
    ----------
    input : str or path-like
        Anything :func:`read_image` reads.
    output : str or path-like
        The OME-Zarr image to create; it must not lie inside `input`.
    spacing : (float, float, float), optional
        Voxel size (z, y, x) in nanometres; required when the input's
        metadata does not give it, and used instead of it otherwise.
    chunks : (int, int, int), optional
        Chunk shape of the output, as in :func:`write_ome_zarr`.
    overwrite : bool, default=False
        Replace an existing `output`.
    progress : bool, default=True
        Show a progress bar.

    Returns
    -------
    spacing : tuple of 3 floats
        The voxel size written, in nanometres.

    Raises
    ------
    ValueError
        If no voxel size is known, or `output` lies inside `input`.
    FileExistsError
        If `output` exists and `overwrite` is False.

    Examples
    --------
    >>> import tempfile, os
    >>> import numpy as np
    >>> import tifffile
    >>> from nanoseg.io import convert, read_image
    >>> folder = tempfile.mkdtemp()
    >>> for z in range(3):
    ...     tifffile.imwrite(os.path.join(folder, f"slice_{z}.tif"), np.full((8, 8), z, np.uint8))
    >>> output = os.path.join(tempfile.mkdtemp(), "stack.zarr")
    >>> convert(folder, output, spacing=(50, 10, 10), progress=False)
    (50.0, 10.0, 10.0)
    >>> image, spacing = read_image(output)
    >>> image[:, 0, 0].tolist()
    [0, 1, 2]
    """
    check_output_path(output, inputs=[input], overwrite=overwrite)
    image, spacing = read_image(input, spacing=spacing)
    if spacing is None:
        raise ValueError(
            f"The metadata of {input} does not give the voxel size along z, y and x; pass it "
            "yourself (spacing=(z, y, x) in nm, or --spacing Z Y X)."
        )
    write_ome_zarr(output, image, spacing=spacing, chunks=chunks, overwrite=overwrite, progress=progress)
    return spacing
