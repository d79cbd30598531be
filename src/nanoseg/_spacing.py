"""Voxel sizes: units, validation and plausibility.

nanoseg states every voxel size in nanometres: (z, y, x) for a volume, (y, x)
for a 2D image. Readers convert the units files store to nanometres with
:func:`unit_to_nm`; :func:`check_spacing` validates a size given by the user
-- the one rule every function and estimator taking a `spacing` applies -- and
warns when it is probably in another unit.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Set

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


def unit_to_nm(unit):
    """Nanometres per `unit`, or None for an unknown or uncalibrated unit."""
    if unit is None:
        return None
    key = str(unit).strip().lower()
    for mu in ("\\u00b5", "\u00b5", "\u03bc"):
        key = key.replace(mu, "u")
    return _NANOMETRES_PER_UNIT.get(key)


def check_spacing(
    spacing, name="spacing", *, ndim=3, drop_z=False, allow_none=False, allow_scalar=False, warn=True
):
    """Return `spacing` as a tuple of positive finite floats, one per axis.

    This is nanoseg's one rule for a voxel size given by the user: the
    readers, writers, estimators and functions that take a `spacing` all
    check it here, differing only in the options below.

    Parameters
    ----------
    spacing : sequence of float, float or None
        Voxel size (z, y, x) of a volume, or pixel size (y, x) of a 2D image.
        Each value must be a real number (not a bool), finite and above 0.
    name : str, default="spacing"
        How messages call it.
    ndim : {3, 2, None}, default=3
        The number of axes, hence of values returned; None accepts 3 or 2
        values (the image's dimensionality is not known yet) and cannot be
        combined with `drop_z`, `allow_none` or `allow_scalar`.
    drop_z : bool, default=False
        With ``ndim=2``, also accept three values (z, y, x) and drop z, so
        that a 2D image may keep a volume's spacing. z is checked all the
        same.
    allow_none : bool, default=False
        Accept None, meaning 1 along every axis (sizes in voxels).
    allow_scalar : bool, default=False
        Accept a single number, the same size along every axis.
    warn : bool, default=True
        The values are in nanometres: say so in messages and warn when one
        is implausible (see :func:`warn_unlikely_spacing`). With False the
        unit is the caller's (only ratios or products matter) and nothing
        is warned.

    Returns
    -------
    spacing : tuple of float
        `ndim` values, or as many as given when `ndim` is None.

    Raises
    ------
    ValueError
        If `spacing` is not of that form. The message names `name`, the
        number of values and axes expected, and gives an example.
    TypeError
        If `ndim` is None together with `drop_z`, `allow_none` or
        `allow_scalar`.

    Warns
    -----
    UserWarning
        With `warn`, when a size is below 1 nm or above 10 um: probably
        another unit.

    Examples
    --------
    >>> from nanoseg._spacing import check_spacing
    >>> check_spacing((50, 10, 10))
    (50.0, 10.0, 10.0)
    >>> check_spacing((50, 10, 10), ndim=2, drop_z=True)
    (10.0, 10.0)
    >>> check_spacing(None, ndim=2, allow_none=True)
    (1.0, 1.0)
    >>> check_spacing(5, allow_scalar=True, warn=False)
    (5.0, 5.0, 5.0)
    >>> check_spacing((0, 10), ndim=2, warn=False)
    Traceback (most recent call last):
        ...
    ValueError: spacing must give the pixel size along each of the 2 axes (y, x) as positive finite numbers (e.g. (10, 10)); got (0, 10).
    """
    if ndim not in (2, 3, None):
        raise ValueError(f"ndim must be 2, 3 or None; got {ndim!r}.")
    if ndim is None and (drop_z or allow_none or allow_scalar):
        raise TypeError("check_spacing needs ndim (2 or 3) with drop_z, allow_none or allow_scalar.")
    if spacing is None and allow_none:
        return (1.0,) * ndim
    if allow_scalar and _is_number(spacing):
        values = _positive_floats((spacing,))
        values = None if values is None else values * ndim
    elif isinstance(spacing, str | bytes | Set | Mapping):
        values = None
    else:
        try:
            values = _positive_floats(tuple(spacing))
        except TypeError:
            values = None
    counts = (2, 3) if ndim is None else (ndim, 3) if drop_z and ndim == 2 else (ndim,)
    if values is None or len(values) not in counts:
        raise ValueError(_message(spacing, name, ndim, drop_z, allow_none, allow_scalar, warn))
    if ndim is not None and len(values) > ndim:
        values = values[-ndim:]
    if warn:
        warn_unlikely_spacing(values, name)
    return values


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _positive_floats(values):
    """`values` as floats if all are real, finite and positive, else None."""
    if not all(_is_number(v) for v in values):
        return None
    try:
        floats = tuple(float(v) for v in values)
    except (OverflowError, TypeError, ValueError):
        return None
    return floats if all(math.isfinite(v) and v > 0 for v in floats) else None


_AXES = {3: ("three", "voxel size", "z, y and x", "(z, y, x)", "(50, 10, 10)"),
         2: ("two", "pixel size", "y and x", "(y, x)", "(10, 10)")}


def _wanted(count, nm):
    """What `count` values must be: in nanometres, or in any unit."""
    word, size, along, axes, example = _AXES[count]
    if nm:
        return f"be {word} positive numbers, the {size} along {along} in nanometres (e.g. {example})"
    return f"give the {size} along each of the {count} axes {axes} as positive finite numbers (e.g. {example})"


def _message(spacing, name, ndim, drop_z, allow_none, allow_scalar, nm):
    if ndim is None:
        wanted = f"{_wanted(3, nm)}, or {_wanted(2, nm)} for a 2D image"
    else:
        wanted = _wanted(ndim, nm)
    if drop_z and ndim == 2:
        wanted += ", or three such values (z, y, x), of which z is then ignored"
    if allow_scalar:
        wanted += ", or one number for every axis"
    if allow_none:
        wanted += ", or None for 1 along every axis"
    return f"{name} must {wanted}; got {spacing!r}."


#: Voxel sizes outside this range (nm) are almost surely in another unit.
PLAUSIBLE_SPACING_NM = (1.0, 10_000.0)


def warn_unlikely_spacing(values, name="spacing"):
    """Warn when a voxel size in nanometres is below 1 nm or above 10 um (a unit slip)."""
    low, high = PLAUSIBLE_SPACING_NM
    size = "voxel size" if len(values) == 3 else "pixel size"
    if any(v < low for v in values):
        warnings.warn(
            f"{name} {tuple(values)} has a {size} below 1 nm: nanoseg reads {size}s in "
            "nanometres, so this is probably micrometres (multiply by 1000).",
            UserWarning,
            stacklevel=3,
        )
    elif any(v > high for v in values):
        warnings.warn(
            f"{name} {tuple(values)} has a {size} above 10 um: nanoseg reads {size}s in "
            "nanometres; check the unit (picometres or angstroms need converting).",
            UserWarning,
            stacklevel=3,
        )


def check_spacing_fits(path, spacing, image, is_2d):
    """Refuse a given `spacing` without one value per axis of the `image` returned."""
    if len(spacing) == image.ndim:
        return
    if image.ndim == 2:
        raise ValueError(
            f"{path} is a 2D image (Y, X), so its pixel size takes two values, along y and x in "
            f"nanometres (spacing=(y, x), or --spacing Y X on the command line); got {spacing}. "
            "Three values (z, y, x) are for volumes."
        )
    if is_2d:
        raise ValueError(
            f"{path} is a 2D image, read here as a volume of one slice, so spacing takes three "
            f"values (z, y, x); got {spacing}. Pass keep_2d=True to read it as a 2D image with a "
            "pixel size (y, x)."
        )
    raise ValueError(
        f"{path} is a volume (Z, Y, X) of {image.shape[0]} slices, so its voxel size takes three "
        f"values, along z, y and x in nanometres (spacing=(z, y, x), or --spacing Z Y X on the "
        f"command line); got {spacing}. Two values (y, x) are for 2D images."
    )
