"""Per-slice and per-slab image kernels, written against a :class:`Backend`.

These are the only functions that touch voxels. Each takes the backend
first so that the same code serves every array library; inputs are arrays
of that backend, outputs too unless stated.
"""

from __future__ import annotations

import numpy as np
from skimage.morphology import ball, disk

from ._model import N_BINS


def histogram(backend, values):
    """256-bin histogram (int64) of uint8 `values` of any shape."""
    return backend.xp.bincount(values.ravel(), minlength=N_BINS).astype(np.int64, copy=False)


def slice_histograms(backend, slab):
    """Histogram of every slice of a (n, Y, X) uint8 slab: (n, 256) int64."""
    xp = backend.xp
    out = xp.empty((slab.shape[0], N_BINS), dtype=np.int64)
    for i in range(slab.shape[0]):
        out[i] = histogram(backend, slab[i])
    return out


def background_histogram(backend, image, low, high, *, min_seed_size, halo_pad):
    """Histogram of the "surely background" pixels of one 2D slice.

    Pixels brighter than `low` seed candidate particles; seeds are grouped
    into 8-connected components, and every component of at least
    `min_seed_size` pixels has its bounding box, grown by `halo_pad` pixels on
    each side and clipped to the image, excluded. Pixels at or above `high`
    are excluded wherever they are. The remaining pixels are counted.

    Returns
    -------
    hist : (256,) int64
    """
    xp, ndi = backend.xp, backend.ndi
    excluded = image >= high
    seeds = image > low
    if seeds.any():
        labels, _ = ndi.label(seeds, structure=np.ones((3, 3), dtype=bool))
        sizes = xp.bincount(labels[seeds])
        boxes = ndi.find_objects(backend.to_host(labels))
        n_rows, n_cols = image.shape
        for index in np.flatnonzero(backend.to_host(sizes) >= min_seed_size):
            rows, cols = boxes[index - 1]
            excluded[
                max(rows.start - halo_pad, 0) : min(rows.stop + halo_pad, n_rows),
                max(cols.start - halo_pad, 0) : min(cols.stop + halo_pad, n_cols),
            ] = True
    return histogram(backend, image[~excluded])


def apply_luts(backend, slab, luts, out=None):
    """Look every voxel of a (n, Y, X) uint8 slab up in its slice's table.

    Parameters
    ----------
    slab : (n, Y, X) uint8 array
    luts : (n, 256) array
        One table per slice; the output has its dtype.
    out : array, optional
        Where to write the result.
    """
    xp = backend.xp
    if out is None:
        out = xp.empty(slab.shape, dtype=luts.dtype)
    for i in range(slab.shape[0]):
        xp.take(luts[i], slab[i], out=out[i])
    return out


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


def connectivity_structure(ndim, connectivity):
    """Neighbourhood with `connectivity` as in :func:`skimage.measure.label`."""
    from scipy.ndimage import generate_binary_structure

    return generate_binary_structure(ndim, connectivity)


def label_mask(backend, mask, connectivity):
    """Connected components of `mask`, numbered in raster order.

    Returns
    -------
    labels : int32 array
    n : int
    """
    structure = backend.xp.asarray(connectivity_structure(mask.ndim, connectivity))
    labels, n = backend.ndi.label(mask, structure=structure)
    return labels, int(n)
