"""Binary closing and connected components on sparse voxel sets.

Nanoparticles fill well under 1 % of a volume, so scanning every voxel with
dense morphology and labelling wastes most of the time. Here a binary image
is a sorted array of flat (raster-order) indices of its foreground voxels,
and

* dilation is the union of the set shifted by every footprint offset,
* erosion keeps the voxels whose every shifted neighbour is in the set or
  outside the array (scikit-image's ``mode="ignore"``: outside counts as
  foreground), tested by binary search,
* connected components are those of the graph joining set members one
  neighbourhood offset apart.

All three are exact: they compute the same sets as the dense
``scipy.ndimage`` operations, in time proportional to the foreground size.
Because the indices are sorted, the first member of a component is its first
voxel in raster order, which gives the same numbering as a dense labelling.

With numba (:mod:`nanoseg._jit`) the closing and the labelling run as
compiled loops over the voxel list instead: a union-find with one forward
pointer per neighbour offset, and a closing that marks the dilated voxels in
a byte copy of the mask. They give the same sets and numbering (the tests run
both) in a fraction of the time, and release the GIL.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import generate_binary_structure
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from . import _jit


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


def _coords(flat, shape):
    return np.stack(np.unravel_index(flat, shape), axis=1).astype(np.int64, copy=False)


def _sorted_unique(values):
    """Sorted distinct values (a sort and a diff: faster than hashing here)."""
    values = np.sort(values)
    if values.size:
        values = values[np.concatenate(([True], values[1:] != values[:-1]))]
    return values


def _interior(coords, shape, margin):
    """Rows of `coords` at least `margin` voxels from every border."""
    return np.all((coords >= margin) & (coords < np.asarray(shape) - margin), axis=1)


class _Neighbourhood:
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
        coords = _coords(flat, self.shape)
        interior = _interior(coords, self.shape, self.margin)
        return flat[interior], coords[~interior], interior

    def shifted(self, flat):
        """All in-bounds neighbours of every member of `flat` (with repeats)."""
        inner, border_coords, _ = self.split(flat)
        parts = [(inner[:, None] + self.steps[None, :]).ravel()]
        parts += [shift(border_coords, o, np.asarray(self.shape))[0] for o in self.offsets]
        return np.concatenate(parts)


def close(flat, shape, footprint, mask=None, overwrite=False):
    """Closing of the set `flat` with a symmetric boolean `footprint`.

    Parameters
    ----------
    flat : (n,) int64, sorted
        Foreground voxels as flat indices into an array of `shape`.
    footprint : ndarray of bool
        Symmetric structuring element with odd sides (a ball or a disk).
    mask : ndarray of bool, optional
        The dense array whose foreground `flat` is. When given (and numba is
        available), the closing runs as a compiled loop on a byte copy of it.
    overwrite : bool
        Use `mask` itself as the compiled loop's scratch instead of a copy
        (when it is a C-contiguous boolean array); its contents are lost.

    Returns
    -------
    closed : (m,) int64, sorted
    """
    offsets = np.argwhere(footprint) - np.array(footprint.shape) // 2
    if mask is not None and _jit.available():
        # The kernel marks dilated voxels in place: work on a copy unless allowed not to.
        if overwrite and mask.dtype == bool and mask.flags.c_contiguous:
            state = mask.view(np.uint8)
        else:
            state = np.array(mask, dtype=np.uint8, order="C")
        return _jit.close_set(state.reshape(tuple(int(n) for n in shape)), np.asarray(flat, dtype=np.int64), offsets)
    hood = _Neighbourhood(offsets, shape)
    dilated = _sorted_unique(hood.shifted(np.asarray(flat, dtype=np.int64)))
    inner, border_coords, interior = hood.split(dilated)
    keep_inner = np.ones(inner.size, dtype=bool)
    for step in hood.steps:
        keep_inner &= members(dilated, inner + step)
    keep_border = np.ones(len(border_coords), dtype=bool)
    for offset in offsets:
        # Outside the array counts as foreground: only in-bounds neighbours are tested.
        neighbours, inside = shift(border_coords, offset, np.asarray(hood.shape))
        keep_border[inside] &= members(dilated, neighbours)
    keep = np.empty(dilated.size, dtype=bool)
    keep[interior] = keep_inner
    keep[~interior] = keep_border
    return dilated[keep]


def label(flat, shape, connectivity):
    """Connected components of the set `flat`, numbered in raster order.

    Returns
    -------
    ids : (n,) int32
        Component of each member, 1..count.
    count : int
    """
    n = flat.size
    if n == 0:
        return np.zeros(0, dtype=np.int32), 0
    ndim = len(shape)
    structure = generate_binary_structure(ndim, connectivity)
    offsets = np.argwhere(structure) - 1
    if _jit.available():
        # Each edge once, from a voxel to its neighbours before it in raster order.
        before = offsets[[tuple(o) < (0,) * ndim for o in offsets]]
        ids, count = _jit.label_set(np.asarray(flat, dtype=np.int64), tuple(shape), before)
        return ids, int(count)
    shape = np.asarray(shape)
    # Each undirected edge once: offsets after the centre in raster order.
    offsets = offsets[[tuple(o) > (0,) * ndim for o in offsets]]
    coords = _coords(flat, tuple(shape))
    rows, cols = [], []
    for offset in offsets:
        neighbours, inside = shift(coords, offset, shape)
        member = members(flat, neighbours)
        rows.append(np.flatnonzero(inside)[member])
        cols.append(np.searchsorted(flat, neighbours[member]))
    rows = np.concatenate(rows)
    cols = np.concatenate(cols)
    graph = coo_matrix((np.ones(rows.size, dtype=np.int8), (rows, cols)), shape=(n, n))
    count, component = connected_components(graph, directed=False)
    # Number components by their first member, i.e. their first voxel in raster order.
    ids, first = np.unique(component, return_index=True)
    rank = np.empty(count, dtype=np.int32)
    rank[ids[np.argsort(first, kind="stable")]] = np.arange(1, count + 1, dtype=np.int32)
    return rank[component], int(count)
