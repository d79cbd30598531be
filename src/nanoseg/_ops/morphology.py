"""Binary closing of particle masks: dense and sparse, NumPy, numba and CuPy.

The labeler closes the thresholded posterior with a ball (3D) or disk (2D)
before labelling it. Outside the array counts as background for the
dilation and as foreground for the erosion (scikit-image's
``mode="ignore"``), so the closing only ever adds voxels, also at the
borders. Two representations, identical results:

* dense (:func:`close_mask`): ``ndimage`` binary dilation then erosion, on
  any backend (SciPy or cupyx);
* sparse (:func:`close_set`), for masks whose foreground is a few percent of
  the voxels: the dilation is the union of the voxel set shifted by every
  footprint offset and the erosion keeps the voxels whose every in-bounds
  neighbour is in it -- as a compiled loop that marks the dilated voxels in
  a byte copy of the mask, or with NumPy sorts and binary searches.
"""

from __future__ import annotations

import functools

import numpy as np
from skimage.morphology import ball, disk

from . import _numba
from ._numba import _k_coords, _k_deep_inside, _k_offset_inside, _k_steps  # noqa: F401 - called by the compiled loops
from .voxel_sets import Neighbourhood, members, merge_disjoint, shift, sorted_unique


def footprint(radius, ndim):
    """Ball (3D) or disk (2D) of `radius` voxels as a boolean array."""
    return (ball(radius) if ndim == 3 else disk(radius)).astype(bool)


def close_mask(backend, mask, radius):
    """Binary closing with a ball/disk of `radius`; radius 0 returns `mask`.

    Outside the array counts as background for the dilation and as
    foreground for the erosion (scikit-image's ``mode="ignore"``), so the
    closing only ever adds voxels, also at the borders.
    """
    if radius == 0:
        return mask
    ndi = backend.ndi
    structure = backend.xp.asarray(footprint(radius, mask.ndim))
    dilated = ndi.binary_dilation(mask, structure=structure)
    return ndi.binary_erosion(dilated, structure=structure, border_value=1)



def _k_dilate_set(state, fg, first, offsets, added, n_added):
    """The dilation step of the closing of the voxel set `fg` (sorted flat
    indices into `state`), from its voxel `first` on.

    state: (Z, Y, X) uint8, 1 on `fg` and 0 elsewhere; dilated voxels are set
    to 2 and appended to `added` (after its first `n_added`). Stops before a
    voxel whose neighbours might not fit in `added`. Returns the index of
    the next voxel to dilate (``fg.size`` when done) and the new count.
    """
    # The buffer is grown by the caller between calls: growing it here, in
    # the loop, would make numba count references on every iteration.
    shape = state.shape
    flat = state.reshape(-1)
    k = offsets.shape[0]
    steps, reach = _k_steps(offsets, shape)
    i = first
    while i < fg.size:
        if n_added + k > added.size:
            return i, n_added
        p = fg[i]
        z, y, x = _k_coords(p, shape)
        deep = _k_deep_inside(z, y, x, reach, shape)
        for o in range(k):
            if deep or _k_offset_inside(z, y, x, offsets, o, shape):
                q = p + steps[o]
                if flat[q] == 0:
                    flat[q] = 2
                    added[n_added] = q
                    n_added += 1
        i += 1
    return i, n_added


def _k_erode_added(state, added, n_added, offsets):
    """The erosion step: of the dilated voxels `added[:n_added]`, those whose
    every in-bounds neighbour is in the dilation (outside the array counts
    as foreground). Returns them in `added`'s order."""
    shape = state.shape
    flat = state.reshape(-1)
    k = offsets.shape[0]
    steps, reach = _k_steps(offsets, shape)
    kept = np.empty(n_added, dtype=np.int64)
    n_kept = 0
    for i in range(n_added):
        p = added[i]
        z, y, x = _k_coords(p, shape)
        deep = _k_deep_inside(z, y, x, reach, shape)
        keep = True
        for o in range(k):
            if (deep or _k_offset_inside(z, y, x, offsets, o, shape)) and flat[p + steps[o]] == 0:
                keep = False
                break
        if keep:
            kept[n_kept] = p
            n_kept += 1
    # Sorted and merged by the caller: a sort compiled by numba would cost
    # seconds of compilation on a package's first run.
    return kept[:n_kept]



@functools.cache
def _compiled():
    return _numba.compile_into(
        globals(),
        (
            "_k_coords", "_k_offset_inside", "_k_steps", "_k_deep_inside",
            "_k_dilate_set", "_k_erode_added", "_k_grow_box",
        ),
    )


def compiled_close_set(state, flat, offsets):
    """Closing of the voxel set `flat` by the compiled loop; `state` (uint8, 1 on `flat`,
    0 elsewhere) is overwritten.

    2D or 3D. Returns the closed set as sorted flat indices (see :func:`close_set`).
    """
    shape, offsets = _numba.as_3d(state.shape, offsets)
    kernels = _compiled()
    state = state.reshape(shape)
    flat = np.ascontiguousarray(flat, dtype=np.int64)
    # Room for half the voxels' neighbours: the dilation of compact
    # particles by a ball of radius 1 adds about three voxels per voxel
    # (3.1 on the benchmark phantom), so the buffer is rarely grown.
    added = np.empty(max(1024, len(offsets) * flat.size // 2), dtype=np.int64)
    done, n_added = kernels["_k_dilate_set"](state, flat, 0, offsets, added, 0)
    while done < flat.size:
        bigger = np.empty(2 * added.size + len(offsets), dtype=np.int64)
        bigger[:n_added] = added[:n_added]
        added = bigger
        done, n_added = kernels["_k_dilate_set"](state, flat, done, offsets, added, n_added)
    closed = kernels["_k_erode_added"](state, added, n_added, offsets)
    closed.sort()
    return merge_disjoint(flat, closed)


def close_set(flat, shape, footprint, mask=None, overwrite=False):
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
    if mask is not None and _numba.available():
        # The kernel marks dilated voxels in place: work on a copy unless allowed not to.
        if overwrite and mask.dtype == bool and mask.flags.c_contiguous:
            state = mask.view(np.uint8)
        else:
            state = np.array(mask, dtype=np.uint8, order="C")
        return compiled_close_set(state.reshape(tuple(int(n) for n in shape)), np.asarray(flat, dtype=np.int64), offsets)
    hood = Neighbourhood(offsets, shape)
    dilated = sorted_unique(hood.shifted(np.asarray(flat, dtype=np.int64)))
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


def grow_box(mask, margin):
    """`mask` grown by `margin` voxels per axis (a box), on the host.

    The same as ``scipy.ndimage.maximum_filter(mask, size=2 * margin + 1,
    mode="constant")``: nothing grows past the array's edge. A sparse mask
    (a classifier's gate: well under 1 % of a block) is grown from its
    voxels' coordinates, each shifted by every offset of the box, which is
    several times faster than the dense filter; a dense one by the filter.
    """
    from scipy import ndimage as ndi

    mask = np.asarray(mask, dtype=bool)
    margin = tuple(int(m) for m in margin)
    size = tuple(2 * m + 1 for m in margin)
    flat = np.flatnonzero(mask)
    if flat.size * int(np.prod(size)) > mask.size // 4:
        return ndi.maximum_filter(mask.view(np.uint8), size=size, mode="constant").view(bool)
    if mask.ndim == 3 and _numba.available():
        out = np.zeros(mask.shape, dtype=np.uint8)
        _compiled()["_k_grow_box"](flat, mask.shape, np.asarray(margin, dtype=np.int64), out)
        return out.view(bool)
    coords = np.stack(np.unravel_index(flat, mask.shape), axis=1)
    offsets = np.stack(np.meshgrid(*[np.arange(-m, m + 1) for m in margin], indexing="ij"), axis=-1).reshape(-1, mask.ndim)
    grown = (coords[:, None, :] + offsets[None, :, :]).reshape(-1, mask.ndim)
    inside = np.all((grown >= 0) & (grown < np.asarray(mask.shape)), axis=1)
    out = np.zeros(mask.shape, dtype=bool)
    out[tuple(grown[inside].T)] = True
    return out


def _k_grow_box(flat, shape, margin, out):
    # Marks the box of half-sides `margin` around each voxel of `flat`
    # (flat indices into the C-ordered `shape`), clipped to the array.
    n_y, n_x = shape[1], shape[2]
    plane = n_y * n_x
    for p in flat:
        z, y, x = _k_coords(p, shape)
        for zz in range(max(z - margin[0], 0), min(z + margin[0] + 1, shape[0])):
            for yy in range(max(y - margin[1], 0), min(y + margin[1] + 1, n_y)):
                base = zz * plane + yy * n_x
                for xx in range(max(x - margin[2], 0), min(x + margin[2] + 1, n_x)):
                    out.flat[base + xx] = 1
    return out
