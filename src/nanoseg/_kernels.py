"""Per-slice and per-slab image kernels, written against a :class:`Backend`.

These are the only functions that touch voxels. Each takes the backend
first so that the same code serves every array library; inputs are arrays
of that backend, outputs too unless stated.

On the CPU, histograms and lookups take compiled loops (:mod:`nanoseg._jit`)
and sparse seeds are grouped as pixel lists; those shortcuts are tested
against the generic code below, which is also what runs on a GPU. The generic
code uses only operations that NumPy/SciPy and CuPy/cupyx spell alike, and
every result that depends on numbering (labels) is renumbered explicitly, so
both backends give identical outputs.
"""

from __future__ import annotations

import numpy as np
from skimage.morphology import ball, disk

from . import _backend, _jit, _sparse
from ._model import N_BINS


def _fast(backend):
    """The backend's hand-written device kernels, when enabled."""
    return backend.fast if _backend.FAST_KERNELS else None


def histogram(backend, values):
    """256-bin histogram (int64) of uint8 `values` of any shape.

    On the CPU, pairs of bytes are counted as 16-bit words (65536 bins) and
    folded back to 256 bins: half as many elements for ``bincount``, which
    roughly doubles its speed; the counts are exact.
    """
    xp = backend.xp
    if backend.name == "cpu" and _jit.available():
        return _jit.slice_histograms(values.reshape(1, -1))[0]
    if _fast(backend) is not None:
        return _fast(backend).plane_histograms(values.reshape(1, -1))[0]
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
    if _fast(backend) is not None:
        return _fast(backend).plane_histograms(slab)
    out = xp.empty((slab.shape[0], N_BINS), dtype=np.int64)
    for i in range(slab.shape[0]):
        out[i] = histogram(backend, slab[i])
    return out


def masked_slice_histograms(backend, slab, mask):
    """Histogram of the voxels of each slice of `slab` where `mask` is True: (n, 256) int64."""
    xp = backend.xp
    if _fast(backend) is not None:
        return _fast(backend).plane_histograms(slab, mask)
    out = xp.empty((slab.shape[0], N_BINS), dtype=np.int64)
    for i in range(slab.shape[0]):
        out[i] = xp.bincount(slab[i][mask[i]], minlength=N_BINS)
    return out


def above(backend, values, level):
    """``values > level`` for uint8 `values` and any integer `level`.

    Levels outside 0..255 are answered without comparing, so that no
    library has to convert an out-of-range number to uint8.
    """
    xp = backend.xp
    if level >= 255:
        return xp.zeros(values.shape, dtype=bool)
    if level < 0:
        return xp.ones(values.shape, dtype=bool)
    return values > level


def below(backend, values, level):
    """``values < level`` for uint8 `values` and any integer `level`."""
    xp = backend.xp
    if level <= 0:
        return xp.zeros(values.shape, dtype=bool)
    if level > 255:
        return xp.ones(values.shape, dtype=bool)
    return values < level


def seed_and_bright_masks(backend, values, low, high, dark=False):
    """Seed candidates and never-background voxels for the model-space levels `low`, `high`.

    In model space a voxel seeds when its intensity is above `low` and is
    never background at or above `high`. With `dark`, model intensities are
    ``255 - v`` for raw values ``v``, so the same tests become ``v < 255 - low``
    and ``v <= 255 - high`` -- no voxel is ever inverted.
    """
    if dark:
        return below(backend, values, 255 - low), below(backend, values, 256 - high)
    return above(backend, values, low), above(backend, values, high - 1)


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


def background_histogram(backend, image, low, high, *, min_seed_size, halo_pad, hist=None, dark=False):
    """Histogram of the "surely background" pixels of one 2D slice.

    Pixels brighter than `low` seed candidate particles; seeds are grouped
    into 8-connected components, and every component of at least
    `min_seed_size` pixels has its bounding box, grown by `halo_pad` pixels on
    each side and clipped to the image, excluded. Pixels at or above `high`
    are excluded wherever they are. The remaining pixels are counted, as the
    slice's histogram minus that of the (few) excluded pixels.

    Parameters
    ----------
    low, high : int
        Levels in model space (see :func:`seed_and_bright_masks`).
    hist : (256,) int64, optional
        The slice's histogram, when already known.
    dark : bool
        Particles are darker than the background.

    Returns
    -------
    hist : (256,) int64
        Counts by raw intensity.
    """
    if backend.is_gpu:
        hists = None if hist is None else hist[None]
        return slab_background_histograms(
            backend, image[None], low, high, min_seed_size=min_seed_size, halo_pad=halo_pad, hists=hists, dark=dark
        )[0]
    if hist is None:
        hist = histogram(backend, image)
    if _jit.available():
        boxes = _jit.excluded_box_histograms(
            image, [low], min_seed_size=min_seed_size, halo_pad=halo_pad, dark=dark, hist=hist
        )
        return drop_bright(hist - boxes[0], high, dark)
    seeds, excluded = seed_and_bright_masks(backend, image, low, high, dark)
    n_rows, n_cols = image.shape
    for r0, r1, c0, c1 in _seed_boxes(backend, seeds, min_seed_size).tolist():
        excluded[
            max(r0 - halo_pad, 0) : min(r1 + halo_pad, n_rows),
            max(c0 - halo_pad, 0) : min(c1 + halo_pad, n_cols),
        ] = True
    return hist - backend.xp.bincount(image[excluded], minlength=N_BINS).astype(np.int64, copy=False)


def bright_bins(high, dark=False):
    """Boolean (256,) mask of the raw intensities that are never background at level `high`.

    In model space a voxel at or above `high` is never background: raw
    ``v >= high``, or ``v <= 255 - high`` for dark particles.
    """
    values = np.arange(N_BINS)
    return values <= 255 - high if dark else values >= high


def drop_bright(hists, high, dark=False):
    """Histograms (..., 256) with the counts of never-background intensities set to zero."""
    out = np.array(hists, dtype=np.int64, copy=True)
    out[..., bright_bins(high, dark)] = 0
    return out


def slab_background_histograms(
    backend, slab, low, high, *, min_seed_size, halo_pad, hists=None, dark=False, halo="box"
):
    """:func:`background_histogram` of every slice of a (n, Y, X) slab: (n, 256) int64.

    On the CPU, slice by slice. Elsewhere the whole slab at once: seeds are
    labelled per slice in one call (a structure with no neighbours across
    slices), their bounding boxes come from two sorts of the seed voxels, and
    the grown boxes are painted with a summed-area table. Only the union of
    the boxes matters, so the seeds' numbering does not.

    With ``halo="dilation"`` the excluded pixels are those within `halo_pad`
    pixels (in rows and in columns: a square) of a pixel of a kept seed
    component, rather than within its grown bounding box; see
    :func:`dilated_seed_exclusion`.
    """
    if halo == "box" and not backend.is_gpu:
        hists = slice_histograms(backend, slab) if hists is None else hists
        return np.stack(
            [
                background_histogram(
                    backend, image, low, high,
                    min_seed_size=min_seed_size, halo_pad=halo_pad, hist=hist, dark=dark,
                )
                for image, hist in zip(slab, hists)
            ]
        ).reshape(-1, N_BINS)
    hists = slice_histograms(backend, slab) if hists is None else backend.to_device(hists)
    if halo == "dilation":
        excluded = dilated_seed_exclusion(backend, slab, low, high, min_seed_size, halo_pad, dark)
    else:
        seeds, excluded = seed_and_bright_masks(backend, slab, low, high, dark)
        labels, count = _label_in_plane(backend, seeds)
        if count:
            boxes = component_boxes(backend, labels, min_seed_size)
            excluded |= paint_boxes(backend, boxes, slab.shape, halo_pad)
    return hists - masked_slice_histograms(backend, slab, excluded)


def _label_in_plane(backend, seeds):
    """Seed components of a (n, Y, X) slab, 8-connected within a slice and
    never across slices: the labels and their number."""
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = True
    labels, count = backend.ndi.label(seeds, structure=backend.xp.asarray(in_plane))
    return labels, int(count)


def dilated_seed_exclusion(backend, slab, low, high, min_seed_size, halo_pad, dark=False):
    """Pixels excluded from the background with square halos around the seeds themselves.

    Seed pixels form 8-connected components within each slice; those of at
    least `min_seed_size` pixels are grown by `halo_pad` pixels in every
    direction of the plane (a maximum filter of side ``2 halo_pad + 1``), so
    that a pixel is excluded when it lies within `halo_pad` rows and columns
    of a seed pixel. A single seed pixel excludes the same square as its
    bounding box would; a long or branched component excludes only its
    neighbourhood, not the whole box around it, so particles packed across
    an image leave the background between them. Pixels at or above `high`
    (model space) are excluded too.

    Returns
    -------
    excluded : (n, Y, X) bool array of the backend
    """
    seeds, excluded = seed_and_bright_masks(backend, slab, low, high, dark)
    if min_seed_size > 1:
        labels, count = _label_in_plane(backend, seeds)
        if count == 0:
            return excluded
        sizes = backend.xp.bincount(labels.reshape(-1))
        big = sizes >= min_seed_size
        big[0] = False
        seeds = big[labels]
    if halo_pad > 0:
        side = 2 * halo_pad + 1
        # On uint8 0/1 values: a maximum filter is separable and fast for
        # square footprints, where a binary dilation is not.
        grown = backend.ndi.maximum_filter(seeds.view(np.uint8), size=(1, side, side), mode="constant", cval=0)
        seeds = grown.view(bool)
    return excluded | seeds


def component_boxes(backend, labels, min_size):
    """Slice and bounding box of each in-plane component of at least `min_size` voxels.

    Parameters
    ----------
    labels : (n, Y, X) integer array
        Components numbered from 1, each within one slice.

    Returns
    -------
    boxes : (k, 5) int64 array of the backend
        ``slice, row0, row1, col0, col1`` with exclusive ends.
    """
    xp = backend.xp
    _, n_rows, n_cols = labels.shape
    plane = n_rows * n_cols
    total = labels.size
    flat = xp.flatnonzero(labels)
    ids = labels.reshape(-1)[flat].astype(np.int64)
    slices, within = flat // plane, flat % plane
    rows, cols = within // n_cols, within % n_cols
    # Sorting (id, position) pairs groups each component and orders its
    # voxels: the first and last in raster order hold its rows' extremes,
    # and in column-major order its columns'.
    pairs = xp.sort(ids * total + flat)
    sorted_ids, by_row = pairs // total, pairs % total
    by_col = xp.sort(ids * total + slices * plane + cols * n_rows + rows) % total
    starts = xp.flatnonzero(xp.concatenate([xp.ones(1, dtype=bool), sorted_ids[1:] != sorted_ids[:-1]]))
    ends = xp.concatenate([starts[1:], xp.asarray([ids.size], dtype=starts.dtype)]) - 1
    keep = (ends - starts + 1) >= min_size
    starts, ends = starts[keep], ends[keep]
    first_row, last_row = by_row[starts], by_row[ends]
    first_col, last_col = by_col[starts], by_col[ends]
    return xp.stack(
        [
            first_row // plane,
            (first_row % plane) // n_cols,
            (last_row % plane) // n_cols + 1,
            (first_col % plane) // n_rows,
            (last_col % plane) // n_rows + 1,
        ],
        axis=1,
    )


def paint_boxes(backend, boxes, shape, pad):
    """Boolean (n, Y, X) mask of the union of `boxes` grown by `pad` and clipped.

    Each box adds +1/-1 at its four corners of a zero array one larger than a
    slice; the 2D cumulative sum then counts, at every pixel, the boxes that
    cover it.
    """
    xp = backend.xp
    n_slices, n_rows, n_cols = shape
    z = boxes[:, 0]
    r0 = xp.maximum(boxes[:, 1] - pad, 0)
    r1 = xp.minimum(boxes[:, 2] + pad, n_rows)
    c0 = xp.maximum(boxes[:, 3] - pad, 0)
    c1 = xp.minimum(boxes[:, 4] + pad, n_cols)
    corners = xp.zeros((n_slices, n_rows + 1, n_cols + 1), dtype=np.int32)
    flat = corners.reshape(-1)
    row_size, plane_size = n_cols + 1, (n_rows + 1) * (n_cols + 1)
    index = xp.concatenate(
        [
            z * plane_size + r0 * row_size + c0,
            z * plane_size + r0 * row_size + c1,
            z * plane_size + r1 * row_size + c0,
            z * plane_size + r1 * row_size + c1,
        ]
    )
    ones = xp.ones(boxes.shape[0], dtype=np.int32)
    backend.scatter_add(flat, index, xp.concatenate([ones, -ones, -ones, ones]))
    covered = xp.cumsum(xp.cumsum(corners, axis=1, dtype=np.int32), axis=2, dtype=np.int32)
    return covered[:, :n_rows, :n_cols] > 0


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
