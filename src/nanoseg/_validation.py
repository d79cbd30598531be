"""Checks of user input shared by the estimators: volumes, targets, probabilities, budgets.

Each ``check_*`` raises a ``ValueError`` or ``TypeError`` whose message says
what was wrong and how to fix it. Checks that belong to a single concept live
with it (annotations in :mod:`nanoseg._annotations`, voxel spacing in
:mod:`nanoseg._spacing`, intensity dtypes and binning in
:mod:`nanoseg._intensity`).
"""

from __future__ import annotations

from numbers import Integral

import numpy as np

from ._intensity import check_intensity_dtype
from ._volume import is_volume_list

_UINT16_MAX = 2**16 - 1


def check_memory_budget(value):
    """Bytes from an int or a string such as ``"512MiB"`` or ``"2 GB"``; None stays None.

    Strings are read by :func:`dask.utils.parse_bytes` (decimal and binary
    units, e.g. ``"1.5GiB"``, ``"800 MB"``).

    Raises
    ------
    ValueError
        Unless `value` is None, a positive integer or such a string.
    """
    if value is None:
        return None
    if isinstance(value, (Integral, np.integer)) and not isinstance(value, (bool, np.bool_)):
        n_bytes = int(value)
    else:
        from dask.utils import parse_bytes

        try:
            n_bytes = int(parse_bytes(str(value)))
        except (TypeError, ValueError):
            n_bytes = None
    if n_bytes is None or n_bytes <= 0:
        raise ValueError(
            f"memory_budget must be a number of bytes (above 0) or a string like '512MiB' or '2GB'; got {value!r}."
        )
    return n_bytes


def check_finite(data, name):
    """Raise ValueError if a float array (NumPy or CuPy) holds NaN or infinite values."""
    if data.dtype.kind == "f" and not bool(np.isfinite(data).all()):
        n_bad = int((~np.isfinite(data)).sum())
        raise ValueError(
            f"{name} contains {n_bad} NaN or infinite value(s); replace them (e.g. with "
            "numpy.nan_to_num) before calling nanoseg."
        )


def check_targets(y, volumes, is_list, *, name="y", same_shape=True):
    """Check that annotation masks `y` match the volumes they annotate.

    With ``same_shape=False`` only their number and dimensionality are
    checked: a step that follows a downsampling one sees coarser arrays than
    the full-resolution annotations.
    """
    if y is None:
        return
    if is_list:
        if not is_volume_list(y):
            raise ValueError(
                f"X is a list of {len(volumes)} crops, so {name} must be a list of as many "
                f"masks; got {type(y).__name__}."
            )
        if len(y) != len(volumes):
            raise ValueError(
                f"{name} has {len(y)} masks but X has {len(volumes)} crops; pass one mask per crop."
            )
        pairs = zip(y, volumes)
    else:
        pairs = [(y, volumes[0])]
    for i, (mask, volume) in enumerate(pairs):
        shape = tuple(int(s) for s in getattr(mask, "shape", np.shape(mask)))
        expected = tuple(int(s) for s in volume.array.shape)
        if not same_shape and len(shape) == len(expected):
            continue
        if shape != expected:
            where = f"{name}[{i}]" if is_list else name
            raise ValueError(
                f"{where} has shape {shape} but the volume it annotates has shape {expected}; "
                "masks must have exactly the shape of their images."
            )



def check_probabilities(data, name="X"):
    """Raise ValueError unless float `data` is finite and within [0, 1]."""
    # Two passes, not three: NaN propagates through min and max, and an
    # infinity lies outside [0, 1], so finite bounds in range prove every
    # value finite. Only a failing block pays for finding out why.
    low, high = float(data.min()), float(data.max())
    if 0.0 <= low and high <= 1.0:
        return
    check_finite(data, name)
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"{name} must hold probabilities in [0, 1]; found values in [{low:g}, {high:g}]. "
            "Pass the output of NanoparticleMixture.transform, or a boolean mask."
        )


def check_beta_prior(beta_prior):
    """Validate a Beta prior ``(a, b)`` and return it as a tuple of floats."""
    try:
        values = tuple(float(v) for v in beta_prior)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 2 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(
            "beta_prior must be a pair (a, b) of finite numbers > 0, the shape parameters "
            f"of the Beta prior on each slice's particle fraction; got {beta_prior!r}."
        )
    return values


def refuse_colour(volume):
    """Raise for an (Y, X, 3) or (Y, X, 4) array: an RGB(A) image, not a 3-slice volume."""
    shape = volume.shape
    if not volume.is_2d and shape[-1] in (3, 4) and min(shape[0], shape[1]) > shape[-1]:
        raise ValueError(
            f"{volume.name} has shape {tuple(shape)}: it looks like an RGB{'A' if shape[-1] == 4 else ''} "
            "image (Y, X, channels), not a volume of planes. nanoseg needs one intensity channel: "
            f"convert it, e.g. skimage.util.img_as_ubyte(skimage.color.rgb2gray({volume.name}"
            f"{'[..., :3]' if shape[-1] == 4 else ''})), or take one channel, {volume.name}[..., 0]. "
            "A real volume of 3 or 4 columns is refused too: transpose it to (Z, Y, X)."
        )


def check_intensity_volume(volume, *, allow_uint16=False):
    """Raise a clear error unless `volume` holds 8-bit intensities (or 16-bit ones, if allowed).

    Steps that work on 8-bit intensities only keep the default; the mixture,
    which maps 16-bit data to its 256 bins itself, passes ``allow_uint16=True``.
    """
    refuse_colour(volume)
    if volume.dtype == np.uint8 or (allow_uint16 and volume.dtype == np.uint16):
        return
    if volume.in_memory:
        check_finite(volume.array, volume.name)
    if allow_uint16:
        check_intensity_dtype(volume.dtype, volume.name)
    if volume.dtype == np.uint16:
        raise TypeError(
            f"{volume.name} must hold 8-bit intensities (uint8) for this step; got uint16. "
            "NanoparticleMixture takes 16-bit data directly (see its binning parameter); for this "
            "step, map the data to 8 bits with one rule for the whole volume, e.g. "
            "skimage.exposure.rescale_intensity(X, in_range=(low, high), out_range=np.uint8) "
            "with the same low and high for every slab."
        )
    raise TypeError(
        f"{volume.name} must hold 8-bit intensities (uint8); got {volume.dtype}. Convert it first, "
        "e.g. with skimage.util.img_as_ubyte for images scaled to [0, 1], or by rescaling "
        "your intensity range to 0-255."
    )


def check_intensity_range(intensity_range, binning="auto"):
    """Validate `intensity_range` for `binning`; return ``(low, high)``, None for a missing bound."""
    if intensity_range is None:
        return None, None
    try:
        values = tuple(intensity_range)
    except TypeError:
        values = ()
    if len(values) != 2 or not all(
        v is None or isinstance(v, Integral) and not isinstance(v, (bool, np.bool_)) for v in values
    ):
        raise ValueError(
            "intensity_range must be None or a pair (low, high) of integer intensities, either of "
            f"which may be None for the observed minimum or maximum; got {intensity_range!r}."
        )
    low, high = (None if v is None else int(v) for v in values)
    for name, value in (("low", low), ("high", high)):
        if value is not None and not 0 <= value <= _UINT16_MAX:
            raise ValueError(
                f"intensity_range: {name} must be an intensity from 0 to {_UINT16_MAX}; got {value}."
            )
    if low is not None and high is not None and low > high:
        raise ValueError(f"intensity_range: low ({low}) must not exceed high ({high}).")
    if binning == "shift" and low not in (None, 0):
        raise ValueError(
            "binning='shift' always starts its first bin at intensity 0, so intensity_range cannot "
            f"set low={low}: pass (None, high) or (0, high), or use binning='range'."
        )
    return low, high

