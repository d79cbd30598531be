"""Per-slice and per-slab image kernels, written against a :class:`Backend`.

These are the only functions that touch voxels. Each takes the backend
first so that the same code serves every array library; inputs are arrays
of that backend, outputs too unless stated.
"""

from __future__ import annotations

import numpy as np
from skimage.morphology import ball, disk

from . import _jit, _sparse
from ._model import N_BINS


def histogram(backend, values):
    """256-bin histogram (int64) of uint8 `values` of any shape.

    On the CPU, pairs of bytes are counted as 16-bit words (65536 bins) and
    folded back to 256 bins: half as many elements for ``bincount``, which
    roughly doubles its speed; the counts are exact.
    """
    xp = backend.xp
    if backend.name == "cpu" and _jit.available():
        return _jit.slice_histograms(values.reshape(1, -1))[0]
    flat = values.reshape(-1)
    if backend.name != "cpu" or flat.size < 2**16:
        return xp.bincount(flat, minlength=N_BINS).astype(np.int64, copy=False)
    flat = np.ascontiguousarray(flat)
    even = flat.size - flat.size % 2
    pairs = np.bincount(flat[:even].view(np.uint16), minlength=N_BINS * N_BINS)
    pairs = pairs.reshape(N_BINS, N_BINS)
    hist = pairs.sum(axis=0) + pairs.sum(axis=1)
    if even < flat.size:
        hist[flat[-1]] += 1
    return hist.astype(np.int64, copy=False)


def slice_histograms(backend, slab):
    """Histogram of every slice of a (n, Y, X) uint8 slab: (n, 256) int64."""
    xp = backend.xp
    if backend.name == "cpu" and _jit.available():
        return _jit.slice_histograms(slab)
    out = xp.empty((slab.shape[0], N_BINS), dtype=np.int64)
    for i in range(slab.shape[0]):
        out[i] = histogram(backend, slab[i])
    return out


#: Seed fraction of a slice up to which seeds are grouped as a pixel set.
SPARSE_SEED_FRACTION = 0.05


def _seed_boxes(backend, seeds, min_seed_size):
    """Bounding boxes (row0, row1, col0, col1; ends exclusive) of the
    8-connected seed components with at least `min_seed_size` pixels."""
    n_cols = seeds.shape[1]
    flat = np.flatnonzero(seeds) if backend.name == "cpu" else None
    if flat is not None and flat.size <= SPARSE_SEED_FRACTION * seeds.size:
        ids, count = _sparse.label(flat, seeds.shape, 2)
        if count == 0:
            return np.empty((0, 4), dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        ids = ids[order]
        rows, cols = np.divmod(flat[order], n_cols)
        starts = np.flatnonzero(np.concatenate(([True], ids[1:] != ids[:-1])))
        sizes = np.diff(np.append(starts, ids.size))
        boxes = np.stack(
            [
                np.minimum.reduceat(rows, starts),
                np.maximum.reduceat(rows, starts) + 1,
                np.minimum.reduceat(cols, starts),
                np.maximum.reduceat(cols, starts) + 1,
            ],
            axis=1,
        )
        return boxes[sizes >= min_seed_size]
    ndi = backend.ndi
    labels, _ = ndi.label(seeds, structure=np.ones((3, 3), dtype=bool))
    sizes = backend.to_host(backend.xp.bincount(labels[seeds]))
    found = ndi.find_objects(backend.to_host(labels))
    keep = np.flatnonzero(sizes >= min_seed_size)
    return np.array(
        [[found[i - 1][0].start, found[i - 1][0].stop, found[i - 1][1].start, found[i - 1][1].stop] for i in keep],
        dtype=np.int64,
    ).reshape(-1, 4)


def background_histogram(backend, image, low, high, *, min_seed_size, halo_pad, hist=None):
    """Histogram of the "surely background" pixels of one 2D slice.

    Pixels brighter than `low` seed candidate particles; seeds are grouped
    into 8-connected components, and every component of at least
    `min_seed_size` pixels has its bounding box, grown by `halo_pad` pixels on
    each side and clipped to the image, excluded. Pixels at or above `high`
    are excluded wherever they are. The remaining pixels are counted, as the
    slice's histogram minus that of the (few) excluded pixels.

    Parameters
    ----------
    hist : (256,) int64, optional
        The slice's histogram, when already known.

    Returns
    -------
    hist : (256,) int64
    """
    if hist is None:
        hist = histogram(backend, image)
    excluded = image >= high
    n_rows, n_cols = image.shape
    for r0, r1, c0, c1 in _seed_boxes(backend, image > low, min_seed_size).tolist():
        excluded[
            max(r0 - halo_pad, 0) : min(r1 + halo_pad, n_rows),
            max(c0 - halo_pad, 0) : min(c1 + halo_pad, n_cols),
        ] = True
    return hist - backend.xp.bincount(image[excluded], minlength=N_BINS).astype(np.int64, copy=False)


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
    if backend.name == "cpu" and _jit.available() and out.flags.c_contiguous:
        return _jit.apply_luts(slab, luts, out)
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
