"""Read image files -- TIFF stacks and folders, PNG and JPEG -- with their pixel size.

:func:`nanoseg.io.read_image` dispatches here for files and folders that are
not zarr stores. Each reader returns the image in its own dimensionality --
(Y, X) for a single image, (Z, Y, X) for a stack -- together with the
(z, y, x) sizes in nanometres that the metadata gives, None where it gives
none; :mod:`nanoseg.io` decides which of them a caller gets.
"""

from __future__ import annotations

import json
import os
import re
import struct
from contextlib import contextmanager
from pathlib import Path
from xml.etree import ElementTree

import numpy as np

from ._spacing import unit_to_nm

TIFF_SUFFIXES = (".tif", ".tiff")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jpe")


# ---------------------------------------------------------------------------
# TIFF
# ---------------------------------------------------------------------------


def _natural_key(name):
    """Sort key that orders ``slice_2`` before ``slice_10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _tiff_files(folder):
    files = [
        path for path in Path(folder).iterdir()
        if path.is_file() and path.suffix.lower() in TIFF_SUFFIXES and not path.name.startswith(".")
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
    scale = unit_to_nm(meta.get("unit"))
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
        scale = unit_to_nm(pixels.get(f"PhysicalSize{axis}Unit", "\u00b5m"))
        values.append(float(size) * scale if size and scale else None)
    return tuple(values)


def _tiff_spacing(tif):
    """(z, y, x) in nm from OME-XML or else ImageJ metadata, None where unknown.

    A source giving all three sizes wins; otherwise one giving y and x, all
    a single image needs. None when neither gives y and x.
    """
    sources = [
        tuple(float(v) if v is not None and v > 0 else None for v in found)
        for found in (_ome_spacing(tif), _imagej_spacing(tif))
    ]
    for needed in (slice(0, 3), slice(1, 3)):
        for found in sources:
            if all(v is not None for v in found[needed]):
                return found
    return None


def _check_tiff_axes(series, path):
    """Shape (Y, X) or (Z, Y, X) of a TIFF series holding one greyscale image or stack."""
    axes, shape = series.axes, tuple(series.shape)
    kept = [(a, s) for a, s in zip(axes, shape) if s != 1 or a in "YX"]
    names = "".join(a for a, _ in kept)
    if names not in ("YX", "ZYX", "IYX", "QYX"):
        raise ValueError(
            f"{path} holds an image with axes {axes} and shape {shape}; nanoseg reads one "
            "greyscale stack (Z, Y, X) or image (Y, X). Save a single channel and time point "
            "(no RGB) as a separate TIFF first."
        )
    return tuple(s for _, s in kept)


def read_tiff_file(path):
    """A TIFF file as a lazy (Y, X) image or (Z, Y, X) stack, and its (z, y, x) sizes in nm."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        native = _check_tiff_axes(series, path)
        shape = native if len(native) == 3 else (1, *native)
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

            chunks = (1, *native[1:]) if len(native) == 3 else native
            return da.from_array(series.asarray().reshape(native), chunks=chunks), spacing
    stat = os.stat(path)
    image = _lazy_tiff(planes, (str(path), stat.st_mtime_ns, stat.st_size))
    return (image if len(native) == 3 else image[0]), spacing


def read_tiff_folder(folder):
    """A folder of single-slice TIFF files as a lazy (Z, Y, X) stack, and its (z, y, x) sizes in nm."""
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
        if len(shape) == 3:
            raise ValueError(
                f"{files[0]} holds {shape[0]} slices, but a folder must hold one 2D slice per "
                "file. Pass the multi-page file itself instead of its folder."
            )
        # Per-file metadata rarely records z; ImageJ writes it when it saves a
        # sequence, so take what the first slice has.
        spacing = _tiff_spacing(tif)
        dtype = series.dtype
    planes = _TiffPlanes((len(files), *shape), dtype, files=files)
    identity = [(str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files]
    return _lazy_tiff(planes, identity), spacing


def looks_like_tiff(path):
    """Whether a file starts with a TIFF or BigTIFF signature."""
    with open(path, "rb") as handle:
        return handle.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


# ---------------------------------------------------------------------------
# PNG and JPEG
# ---------------------------------------------------------------------------

# Pillow modes holding one grey channel. "I" (32-bit integers) is how some
# Pillow versions open 16-bit greyscale PNG files.
_GREY_MODES = ("1", "L", "I;16", "I;16L", "I;16B", "I;16N", "I")

_COLOUR_NAMES = {
    "RGB": "RGB colour", "RGBA": "RGBA colour", "RGBa": "RGBA colour", "LA": "grey + alpha",
    "La": "grey + alpha", "P": "palette colour", "PA": "palette colour", "CMYK": "CMYK colour",
    "YCbCr": "YCbCr colour", "LAB": "Lab colour", "HSV": "HSV colour",
}


def looks_like_picture(path):
    """Whether a file starts with a PNG or JPEG signature."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    return head == b"\x89PNG\r\n\x1a\n" or head[:3] == b"\xff\xd8\xff"


@contextmanager
def _whole_image_allowed(image_module):
    """Lift Pillow's decompression-bomb limit while reading a file the user named.

    2D electron micrographs and montages often exceed the limit (about 89
    million pixels, a warning; twice that, an error), and the image is
    loaded whole either way.
    """
    limit = image_module.MAX_IMAGE_PIXELS
    image_module.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        image_module.MAX_IMAGE_PIXELS = limit


def _grey_palette(picture):
    """Whether a palette image only uses shades of grey (r = g = b)."""
    palette = np.asarray(picture.getpalette() or [0, 0, 0])
    colours = palette[: palette.size // 3 * 3].reshape(-1, 3)
    return bool(np.all(colours == colours[:, :1]))


def _refuse_colour(path, mode):
    path = Path(path)
    kind = _COLOUR_NAMES.get(mode, f"{mode!r}")
    return ValueError(
        f"{path} holds {kind} pixels (Pillow mode {mode!r}), not one greyscale channel; nanoseg "
        "reads one greyscale image (Y, X). Convert it first, e.g. in Python: "
        f"PIL.Image.open({path.name!r}).convert('L').save({path.stem + '-grey.png'!r}) "
        "(8-bit luminance), and pass the greyscale file."
    )


def read_picture(path):
    """A PNG or JPEG file as a (Y, X) NumPy array of grey levels.

    8-bit grey gives uint8, 16-bit grey (PNG) uint16 and 1-bit bool; a
    palette of greys is resolved to its uint8 grey levels. These formats
    cannot be read in parts, so the image is loaded whole; their resolution
    metadata is not read, so the pixel size must be given by the caller.

    Raises
    ------
    ValueError
        For colour (RGB, RGBA, CMYK...) or grey + alpha images, with the
        recipe to convert them, and for files of several frames.
    """
    from PIL import Image

    with _whole_image_allowed(Image), Image.open(path) as picture:
        frames = getattr(picture, "n_frames", 1)
        if frames > 1:
            raise ValueError(
                f"{path} holds {frames} frames; nanoseg reads a single image from a PNG or JPEG "
                "file. Save the frames as a multi-page TIFF stack instead."
            )
        if picture.mode == "P" and "transparency" not in picture.info and _grey_palette(picture):
            picture = picture.convert("L")
        if picture.mode not in _GREY_MODES:
            raise _refuse_colour(path, picture.mode)
        mode = picture.mode
        data = np.asarray(picture)
    if mode == "I":
        if data.size and (data.min() < 0 or data.max() > np.iinfo(np.uint16).max):
            raise ValueError(
                f"{path} holds 32-bit grey levels from {data.min()} to {data.max()}; nanoseg reads "
                "8- or 16-bit images. Rescale it to 16 bits first."
            )
        data = data.astype(np.uint16)
    # Big-endian 16-bit data is made native, as the estimators expect.
    return np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("="))


# ---------------------------------------------------------------------------
# damaged files
# ---------------------------------------------------------------------------


@contextmanager
def unreadable(path, kind):
    """Turn a reader's low-level failure on a damaged file into one clear error."""
    if kind == "PNG or JPEG file":
        try:
            yield
        except PermissionError:
            raise
        except (OSError, SyntaxError, EOFError) as exc:
            # Pillow's errors for a file it cannot decode (UnidentifiedImageError
            # is an OSError; a damaged PNG raises SyntaxError).
            raise ValueError(
                f"{path} is neither a TIFF file nor a readable PNG or JPEG image ({type(exc).__name__}: "
                f"{exc}); the file may be damaged, incompletely copied or not what its name says."
            ) from exc
        return
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
