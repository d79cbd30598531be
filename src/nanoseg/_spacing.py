"""Voxel sizes: units, validation and plausibility.

nanoseg states every voxel size in nanometres: (z, y, x) for a volume, (y, x)
for a 2D image. Readers convert the units files store to nanometres with
:func:`unit_to_nm`; :func:`check_spacing` validates a size given by the user
and warns when it is probably in another unit.
"""

from __future__ import annotations

import math
import warnings

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


def check_spacing(spacing, name="spacing", *, ndim=3):
    """Return `spacing` as a tuple of positive finite floats, one per axis.

    Parameters
    ----------
    spacing : sequence of float
        Voxel size (z, y, x) in nanometres, or pixel size (y, x) of a 2D
        image.
    name : str, default="spacing"
        How messages call it.
    ndim : {3, 2, None}, default=3
        The number of values required; None accepts 3 or 2.

    Returns
    -------
    spacing : tuple of float

    Raises
    ------
    ValueError
        Unless `spacing` is `ndim` positive finite numbers.

    Warns
    -----
    UserWarning
        When a size is below 1 nm or above 10 um: probably another unit.
    """
    try:
        values = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        values = ()
    counts = (2, 3) if ndim is None else (ndim,)
    if len(values) not in counts or not all(math.isfinite(v) and v > 0 for v in values):
        three = "three positive numbers, the voxel size along z, y and x in nanometres (e.g. (50, 10, 10))"
        two = "two positive numbers, the pixel size along y and x in nanometres (e.g. (10, 10))"
        wanted = {(3,): three, (2,): two, (2, 3): f"{three}, or {two.replace(' positive numbers', '')} for a 2D image"}
        raise ValueError(f"{name} must be {wanted[counts]}; got {spacing!r}.")
    warn_unlikely_spacing(values, name)
    return values


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
