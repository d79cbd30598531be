"""Connected components of particle masks: dense and sparse, NumPy, numba and CuPy.

Every variant numbers components by the raster order of their first voxel,
as :func:`scipy.ndimage.label` does, so all of them give identical labels:

* dense (:func:`label_mask`, :func:`label_voxels`): ``ndimage.label`` on any
  backend; cupyx numbers differently, so its labels are renumbered
  (:func:`raster_order`);
* sparse (:func:`label_set`), for a sorted set of foreground voxels: a
  compiled union-find with one forward pointer per neighbour offset, or the
  components of the graph joining set members one offset apart
  (scipy.sparse.csgraph). Because the set is sorted, a component's first
  member is its first voxel in raster order.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy.ndimage import generate_binary_structure
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from . import _numba
from ._numba import (  # noqa: F401 - called by the compiled loop
    _k_coords, _k_deep_inside, _k_find, _k_offset_inside, _k_steps, _k_union,
)
from .voxel_sets import coords_of, members, shift


def connectivity_structure(ndim, connectivity):
    """Neighbourhood with `connectivity` as in :func:`skimage.measure.label`."""
    return generate_binary_structure(ndim, connectivity)


def label_mask(backend, mask, connectivity):
    """Connected components of `mask`, numbered in raster order.

    scipy numbers components by their first voxel in raster order; other
    backends' labels are renumbered so (see :func:`raster_order`).

    Returns
    -------
    labels : int32 array
    n : int
    """
    structure = backend.xp.asarray(connectivity_structure(mask.ndim, connectivity))
    labels, n = backend.ndi.label(mask, structure=structure)
    n = int(n)
    if backend.is_gpu and n > 1:
        flat = backend.xp.flatnonzero(labels)
        table = raster_order(backend, flat, labels.reshape(-1)[flat], n)
        labels = table[labels]
    return labels, n


def label_voxels(backend, mask, connectivity):
    """Connected components of `mask` as voxel lists, numbered in raster order.

    Returns
    -------
    flat : (m,) int64 array of the backend
        Sorted flat indices of the foreground voxels.
    ids : (m,) int32 array of the backend
        Their labels, 1..n.
    n : int
    """
    structure = backend.xp.asarray(connectivity_structure(mask.ndim, connectivity))
    labels, n = backend.ndi.label(mask, structure=structure)
    n = int(n)
    flat = backend.xp.flatnonzero(labels)
    ids = labels.reshape(-1)[flat]
    if backend.is_gpu and n > 1:
        ids = raster_order(backend, flat, ids, n)[ids]
    return flat.astype(np.int64, copy=False), ids.astype(np.int32, copy=False), n


def raster_order(backend, flat, ids, n):
    """Table renumbering labels 1..n by the raster order of each one's first voxel.

    Parameters
    ----------
    flat : (m,) integer array
        Sorted flat indices of the labelled voxels.
    ids : (m,) integer array
        Their labels; every label 1..n occurs.

    Returns
    -------
    table : (n + 1,) array of the ids' dtype
        ``table[old] = new``, with ``table[0] = 0``.
    """
    xp = backend.xp
    total = int(flat[-1]) + 1
    # Sorting (label, position) pairs puts each label's first voxel at the
    # start of its run; ranking those first voxels gives the raster order.
    pairs = xp.sort(ids.astype(np.int64) * total + flat)
    labels = pairs // total
    starts = xp.concatenate([xp.ones(1, dtype=bool), labels[1:] != labels[:-1]])
    firsts = pairs[starts] % total  # first voxel of labels 1..n, in label order
    table = xp.zeros(n + 1, dtype=ids.dtype)
    table[xp.argsort(firsts) + 1] = xp.arange(1, n + 1, dtype=ids.dtype)
    return table



def _k_label_set(flat, shape, offsets):
    """Connected components of the sorted voxel set `flat` in an array of `shape`.

    offsets: (k, 3) neighbour offsets that come before a voxel in raster
    order (half the neighbourhood). Returns (ids 1..count in raster order
    of each component's first voxel, count).
    """
    n = flat.size
    k = offsets.shape[0]
    parent = np.arange(n)
    # One forward-only pointer per offset: the neighbours of successive
    # voxels are at increasing positions.
    pointers = np.zeros(k, dtype=np.int64)
    steps, reach = _k_steps(offsets, shape)
    for i in range(n):
        p = flat[i]
        z, y, x = _k_coords(p, shape)
        deep = _k_deep_inside(z, y, x, reach, shape)
        for o in range(k):
            if not (deep or _k_offset_inside(z, y, x, offsets, o, shape)):
                continue
            target = p + steps[o]
            j = pointers[o]
            while j < i and flat[j] < target:
                j += 1
            pointers[o] = j
            if j < i and flat[j] == target:
                _k_union(parent, i, j)
    ids = np.empty(n, dtype=np.int32)
    count = 0
    for i in range(n):
        root = _k_find(parent, i)
        if root == i:
            count += 1
            ids[i] = count
        else:
            ids[i] = ids[root]
    return ids, count



def _k_face_touches(lower_flat, upper_flat, n_rows, n_cols, steps, lower_at, upper_at):
    """Indices (into `lower_flat`, into `upper_flat`) of the voxels of two
    adjacent planes that touch, one pair per touching (voxel, offset).

    Both sets are sorted flat indices into a (n_rows, n_cols) plane. For a
    fixed in-plane offset the lower voxels' targets increase with them, so
    each offset is one merge of two sorted lists. steps: (k, 2) (dy, dx).
    lower_at, upper_at: outputs of at least len(lower_flat) * k entries.
    Returns the number of pairs.
    """
    n = 0
    for o in range(steps.shape[0]):
        dy = steps[o, 0]
        dx = steps[o, 1]
        j = 0
        for i in range(lower_flat.size):
            p = lower_flat[i]
            y = p // n_cols
            x = p - y * n_cols
            if not (0 <= y + dy < n_rows and 0 <= x + dx < n_cols):
                continue
            target = p + dy * n_cols + dx
            while j < upper_flat.size and upper_flat[j] < target:
                j += 1
            if j == upper_flat.size:
                break
            if upper_flat[j] == target:
                lower_at[n] = i
                upper_at[n] = j
                n += 1
    return n


@functools.cache
def _compiled():
    return _numba.compile_into(
        globals(),
        ("_k_find", "_k_union", "_k_coords", "_k_offset_inside", "_k_steps", "_k_deep_inside", "_k_label_set", "_k_face_touches"),
    )


def face_touches(lower_flat, upper_flat, plane_shape, steps):
    """Which voxels of two adjacent planes touch across the face between them.

    Parameters
    ----------
    lower_flat, upper_flat : (n,), (m,) int64, sorted
        Foreground of each plane, as flat indices into a plane of `plane_shape`.
    steps : sequence of (dy, dx)
        In-plane offsets from a lower voxel to the upper voxels it touches.

    Returns
    -------
    lower_at, upper_at : (p,) int64
        For each touching pair, the index of its lower voxel in `lower_flat`
        and of its upper voxel in `upper_flat`, offset by offset (unsorted
        within; a pair appears once per offset that joins it).
    """
    steps = np.asarray(steps, dtype=np.int64).reshape(-1, 2)
    lower_flat = np.asarray(lower_flat, dtype=np.int64)
    upper_flat = np.asarray(upper_flat, dtype=np.int64)
    size = lower_flat.size * steps.shape[0]
    lower_at, upper_at = np.empty(size, dtype=np.int64), np.empty(size, dtype=np.int64)
    if _numba.available():
        n = _compiled()["_k_face_touches"](
            lower_flat, upper_flat, int(plane_shape[0]), int(plane_shape[1]), steps, lower_at, upper_at
        )
        return lower_at[:n], upper_at[:n]
    coords = coords_of(lower_flat, tuple(plane_shape))
    found_lower, found_upper = [], []
    for step in steps:
        targets, inside = shift(coords, step, np.asarray(plane_shape))
        hit = members(upper_flat, targets)
        found_lower.append(np.flatnonzero(inside)[hit])
        found_upper.append(np.searchsorted(upper_flat, targets[hit]))
    return np.concatenate(found_lower), np.concatenate(found_upper)


def compiled_label_set(flat, shape, offsets):
    """Components of the sorted set `flat` joined by the earlier-in-raster-order
    `offsets` (2D or 3D), by the compiled loop: (ids, count)."""
    shape, offsets = _numba.as_3d(shape, offsets)
    return _compiled()["_k_label_set"](flat, shape, offsets)


def label_set(flat, shape, connectivity):
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
    if _numba.available():
        # Each edge once, from a voxel to its neighbours before it in raster order.
        before = offsets[[tuple(o) < (0,) * ndim for o in offsets]]
        ids, count = compiled_label_set(np.asarray(flat, dtype=np.int64), tuple(shape), before)
        return ids, int(count)
    shape = np.asarray(shape)
    # Each undirected edge once: offsets after the centre in raster order.
    offsets = offsets[[tuple(o) > (0,) * ndim for o in offsets]]
    coords = coords_of(flat, tuple(shape))
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

