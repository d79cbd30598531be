"""Per-axis parameters of the spatial preprocessing steps.

A smoothing width, a structuring element's radius, a block size or a voxel
size is given as one number for every axis or one number per axis. This
module turns such a value into one float per axis of a 2D or 3D input, so
that a single setting serves volumes and images alike.
"""

from __future__ import annotations

import math

import numpy as np


def per_axis(value, ndim, name):
    """`value` (a scalar, or one entry per axis) as a tuple of `ndim` floats.

    A 2D input takes the last two entries of a 3-entry (z, y, x) value, so
    one setting serves volumes and single images alike.
    """
    values = np.atleast_1d(np.asarray(value, dtype=float))
    if values.ndim != 1 or values.size not in (1, 2, 3):
        raise ValueError(
            f"{name} must be a number or one number per axis, (z, y, x) or (y, x); got {value!r}."
        )
    if values.size == 1:
        return (float(values[0]),) * ndim
    if values.size == ndim:
        return tuple(float(v) for v in values)
    if values.size == 3 and ndim == 2:
        return tuple(float(v) for v in values[1:])
    raise ValueError(
        f"{name}={value!r} has 2 entries (y, x), but the input is 3D: give one number or "
        "three (z, y, x)."
    )


def to_3d(values, ndim, fill):
    """Per-axis values of a 2D input, with `fill` for the added leading axis."""
    return tuple(values) if ndim == 3 else (fill, *values)


def nonnegative(values, name, value):
    """`values` unchanged; raise unless every one is finite and >= 0 (`value` as given)."""
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"{name} must be finite and >= 0 on every axis; got {value!r}.")
    return values
