"""Binary images as sorted voxel sets, for the sparse closing and labelling.

Nanoparticles fill well under 1 % of a volume, so scanning every voxel with
dense morphology and labelling wastes most of the time. Here a binary image
is a sorted array of the flat (raster-order) indices of its foreground
voxels; these helpers shift such sets by neighbourhood offsets and test
membership by binary search. :mod:`.morphology` and :mod:`.components` build
the closing and the connected components on them.
"""

from __future__ import annotations

import numpy as np


def shift(coords, offset, shape):
    """Flat indices of ``coords + offset`` that fall inside `shape`, and which rows they came from."""
    shifted = coords + offset
    inside = np.all((shifted >= 0) & (shifted < shape), axis=1)
    return np.ravel_multi_index(tuple(shifted[inside].T), shape), inside


def members(sorted_flat, queries):
    """Boolean: which `queries` are in the sorted array `sorted_flat`."""
    if sorted_flat.size == 0:
        return np.zeros(queries.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_flat, queries), sorted_flat.size - 1)
    return sorted_flat[pos] == queries


def coords_of(flat, shape):
    """(n, ndim) int64 coordinates of the flat indices `flat` in an array of `shape`."""
    return np.stack(np.unravel_index(flat, shape), axis=1).astype(np.int64, copy=False)


def sorted_unique(values):
    """Sorted distinct values (a sort and a diff: faster than hashing here)."""
    values = np.sort(values)
    if values.size:
        values = values[np.concatenate(([True], values[1:] != values[:-1]))]
    return values


def _interior(coords, shape, margin):
    """Rows of `coords` at least `margin` voxels from every border."""
    return np.all((coords >= margin) & (coords < np.asarray(shape) - margin), axis=1)


class Neighbourhood:
    """Footprint offsets as coordinate steps and as flat-index steps.

    A voxel at least `margin` voxels from every border reaches all its
    neighbours by adding flat steps, with no bounds checks; only the thin
    shell along the borders needs coordinates.
    """

    def __init__(self, offsets, shape):
        self.shape = tuple(int(n) for n in shape)
        self.offsets = offsets
        strides = np.cumprod((self.shape[1:] + (1,))[::-1])[::-1]
        self.steps = offsets @ strides
        self.margin = int(np.abs(offsets).max()) if offsets.size else 0

    def split(self, flat):
        coords = coords_of(flat, self.shape)
        interior = _interior(coords, self.shape, self.margin)
        return flat[interior], coords[~interior], interior

    def shifted(self, flat):
        """All in-bounds neighbours of every member of `flat` (with repeats)."""
        inner, border_coords, _ = self.split(flat)
        parts = [(inner[:, None] + self.steps[None, :]).ravel()]
        parts += [shift(border_coords, o, np.asarray(self.shape))[0] for o in self.offsets]
        return np.concatenate(parts)


def merge_disjoint(first, second):
    """The union of two sorted arrays with no value in common, sorted."""
    out = np.empty(first.size + second.size, dtype=np.result_type(first, second))
    # Each value of `second` lands after the values of `first` below it and
    # the values of `second` before it; `first` fills the other places.
    at = np.searchsorted(first, second) + np.arange(second.size)
    taken = np.zeros(out.size, dtype=bool)
    taken[at] = True
    out[at] = second
    out[~taken] = first
    return out
