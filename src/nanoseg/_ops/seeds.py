"""Seeds and the background histogram: which pixels of a slice are surely background.

The mixture learns its background from the pixels far from any bright seed:
seed pixels (above the low level) form 8-connected components per slice; the
bounding box of each large enough one, grown by a halo, is excluded, and so
is every pixel at or above the high level. This module holds every variant
of that step side by side:

* the compiled CPU loop (:func:`excluded_box_histograms`), which finds the
  seeds, groups them with a union-find and counts the boxed pixels in one
  pass per slice, for several seed levels at once;
* the generic slab code, written against a backend (NumPy or CuPy): seeds
  labelled per slice, boxes from sorts of the seed voxels, boxes painted
  with a summed-area table (:func:`slab_background_histograms`);
* the "dilation" halo, which excludes the neighbourhood of the seed pixels
  rather than their boxes (:func:`dilated_seed_exclusion`).

Levels are given in model space: with ``dark=True`` the model sees ``255 - v``
and the tests are mirrored, so no voxel is ever inverted.
"""

from __future__ import annotations

import functools

import numpy as np

from .._model import N_BINS
from . import _numba
from ._numba import _k_find  # noqa: F401 - called by the compiled loop
from .components import label_set
from .histogram import histogram, masked_slice_histograms, slice_histograms


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
        ids, count = label_set(flat, seeds.shape, 2)
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



def _k_join(parent, a, b, size, row_min, row_max, col_min, col_max):
    # Union of the components of seeds `a` and `b` (the smaller root stays
    # root, as in _k_union), their sizes and bounding boxes merged at the root.
    a = _k_find(parent, a)
    b = _k_find(parent, b)
    if a == b:
        return
    if b < a:
        a, b = b, a
    parent[b] = a
    size[a] += size[b]
    row_min[a] = min(row_min[a], row_min[b])
    row_max[a] = max(row_max[a], row_max[b])
    col_min[a] = min(col_min[a], col_min[b])
    col_max[a] = max(col_max[a], col_max[b])


def _k_excluded_box_histograms(image, firsts, spans, min_size, pad, n_seeds, out):
    """Histogram of the pixels inside the grown seed boxes, for several seed levels.

    image: (Y, X) uint8, C-contiguous. Level l seeds the pixels with
    values in firsts[l]..firsts[l] + spans[l] (the caller orders the
    levels so that each one's seeds are a subset of the previous one's:
    higher levels look only at the seeds of the previous level's large
    components).
    n_seeds: number of seeds of the first level when known (from the
    slice's histogram), else -1. out: (levels, 256) int64, overwritten.
    Returns 0, or -1 when there are more seeds than `n_seeds` announced
    (`out` is then incomplete).
    """
    n_rows, n_cols = image.shape
    flat = image.reshape(-1)
    out[:] = 0
    if firsts.size == 0:
        return 0
    # Seeds of the widest level, row by row: the row's seed tests are
    # written as bytes (a loop the compiler vectorises), then read eight at
    # a time as one 64-bit word; only the few words with a seed are looked
    # at pixel by pixel.
    first = np.uint8(firsts[0])
    span = np.uint8(spans[0])
    n_all = n_seeds
    if n_all < 0:
        n_all = 0
        for p in range(flat.size):
            n_all += np.uint8(flat[p] - first) <= span
    # Room for one more word of seeds than announced, so that a word's
    # pixels can be stored without a test each (see below).
    all_cols = np.empty(n_all + 8, dtype=np.int32)
    all_starts = np.empty(n_rows + 1, dtype=np.int64)
    n_words = (n_cols + 7) // 8
    marks = np.zeros(8 * n_words, dtype=np.uint8)  # zeros past the row's end stay zeros
    words = marks.view(np.uint64)
    k = 0
    for row in range(n_rows):
        all_starts[row] = k
        base = row * n_cols
        for q in range(n_cols):
            marks[q] = np.uint8(flat[base + q] - first) <= span
        for j in range(n_words):
            if words[j] != 0:
                if k + 8 > all_cols.size:
                    # More seeds than announced: stop before writing past
                    # the end (growing the buffer here, in the loop, would
                    # cost reference counting on every pixel).
                    return -1
                # Every pixel's column is written and kept only when it
                # seeds: no branch to mispredict.
                c = 8 * j
                for b in range(8):
                    all_cols[k] = np.int32(c + b)
                    k += marks[c + b]
    all_starts[n_rows] = k
    # One list of candidate seeds, compacted in place from level to level:
    # at first every seed of the widest level; after each level, only those
    # of its higher level that lie in its components of min_size pixels or
    # more. A higher level's seeds are a subset of a lower one's, so each of
    # its components lies inside one component of the level below: inside a
    # small one, it is small too. Entries only ever move to a lower index.
    cols = all_cols
    starts = all_starts
    n = k
    parent = np.empty(n, dtype=np.int64)
    size = np.empty(n, dtype=np.int64)
    row_min = np.empty(n, dtype=np.int64)
    row_max = np.empty(n, dtype=np.int64)
    col_min = np.empty(n, dtype=np.int64)
    col_max = np.empty(n, dtype=np.int64)
    boxes = np.empty((n, 4), dtype=np.int64)
    # Seed marks and indices of the row being joined and of the row above,
    # by column + 1; the marks are all zeros between levels.
    mark_here = np.zeros(n_cols + 2, dtype=np.uint8)
    mark_above = np.zeros(n_cols + 2, dtype=np.uint8)
    seed_here = np.empty(n_cols + 2, dtype=np.int64)
    seed_above = np.empty(n_cols + 2, dtype=np.int64)
    for level in range(firsts.size):
        if level > 0:
            first = np.uint8(firsts[level])
            span = np.uint8(spans[level])
            n = 0
            lo = starts[0]
            for row in range(n_rows):
                hi = starts[row + 1]
                starts[row] = n
                base = row * n_cols
                for i in range(lo, hi):
                    c = cols[i]
                    cols[n] = c
                    n += np.uint8(flat[base + c] - first) <= span
                lo = hi
            starts[n_rows] = n
        if n == 0:
            break  # no candidate seeds here, so none at the higher levels
        # 8-connected components, row by row: each seed joins its left
        # neighbour and the seeds above it, looked up in a mark and an index
        # per column of the row above (padded by one column on each side),
        # not searched for in its seed list. Seeds side by side in a row are
        # always joined, so fewer joins do: with a left neighbour (already
        # joined to the seeds above it, at c - 2 .. c), only the seed above
        # at c + 1 is new; without one, a seed right above stands for both
        # of its neighbours. Each root keeps its component's size and
        # bounding box, merged as components join.
        for row in range(n_rows):
            row_start = starts[row]
            for i in range(row_start, starts[row + 1]):
                c = cols[i] + 1
                parent[i] = i
                size[i] = 1
                row_min[i] = row
                row_max[i] = row
                col_min[i] = c - 1
                col_max[i] = c - 1
                mark_here[c] = 1
                seed_here[c] = i
                if mark_here[c - 1]:
                    _k_join(parent, i, seed_here[c - 1], size, row_min, row_max, col_min, col_max)
                    if mark_above[c + 1]:
                        _k_join(parent, i, seed_above[c + 1], size, row_min, row_max, col_min, col_max)
                elif mark_above[c]:
                    _k_join(parent, i, seed_above[c], size, row_min, row_max, col_min, col_max)
                else:
                    if mark_above[c - 1]:
                        _k_join(parent, i, seed_above[c - 1], size, row_min, row_max, col_min, col_max)
                    if mark_above[c + 1]:
                        _k_join(parent, i, seed_above[c + 1], size, row_min, row_max, col_min, col_max)
            # The row above's marks are cleared through its seeds (a few),
            # and this row's become the row above.
            for i in range(starts[row - 1] if row > 0 else row_start, row_start):
                mark_above[cols[i] + 1] = 0
            mark_above, mark_here = mark_here, mark_above
            seed_above, seed_here = seed_here, seed_above
        for i in range(starts[n_rows - 1], starts[n_rows]):
            mark_above[cols[i] + 1] = 0
        # The grown, clipped boxes of the components kept.
        n_boxes = 0
        for i in range(n):
            if parent[i] != i or size[i] < min_size:
                continue
            boxes[n_boxes, 0] = max(row_min[i] - pad, 0)
            boxes[n_boxes, 1] = min(row_max[i] + 1 + pad, n_rows)
            boxes[n_boxes, 2] = max(col_min[i] - pad, 0)
            boxes[n_boxes, 3] = min(col_max[i] + 1 + pad, n_cols)
            n_boxes += 1
        if n_boxes == 0:
            break  # every component is small: so are all at the higher levels
        _k_count_box_union(flat, n_cols, boxes[:n_boxes], out[level])
        if level == firsts.size - 1:
            break
        # The next level's candidates: the seeds of the components kept.
        m = 0
        lo = starts[0]
        for row in range(n_rows):
            hi = starts[row + 1]
            starts[row] = m
            for i in range(lo, hi):
                c = cols[i]
                cols[m] = c
                m += size[_k_find(parent, i)] >= min_size
            lo = hi
        starts[n_rows] = m
        n = m
    return 0


def _k_count_box_union(flat, n_cols, boxes, out):
    """Add to `out` (256,) the values of the pixels of a (Y, X) image (raveled
    as `flat`) covered by at least one of `boxes` (row0, row1, col0, col1;
    ends exclusive), each pixel once.

    Row by row, the column ranges of the boxes that cover the row are sorted
    and merged (again only where a box starts or ends), and each merged run
    is counted as a contiguous stretch: no per-pixel mark, and no pixel
    visited twice.
    """
    n_boxes = boxes.shape[0]
    # Boxes by first row: a counting sort over the rows (a library sort
    # would take numba seconds to compile).
    n_rows = flat.size // n_cols
    first_of_row = np.zeros(n_rows + 1, dtype=np.int64)
    for b in range(n_boxes):
        first_of_row[boxes[b, 0] + 1] += 1
    for r in range(n_rows):
        first_of_row[r + 1] += first_of_row[r]
    order = np.empty(n_boxes, dtype=np.int64)
    for b in range(n_boxes):
        order[first_of_row[boxes[b, 0]]] = b
        first_of_row[boxes[b, 0]] += 1
    active = np.empty(n_boxes, dtype=np.int64)
    lows = np.empty(n_boxes, dtype=np.int64)
    highs = np.empty(n_boxes, dtype=np.int64)
    # Four partial histograms break the store-to-load dependency between
    # equal neighbouring values (as in the histogram kernel).
    partial = np.zeros((4, 256), dtype=np.int64)
    n_active = 0
    upcoming = 0
    n_runs = 0
    changed = True
    row = boxes[order[0], 0]
    while n_active > 0 or upcoming < n_boxes:
        if n_active == 0:
            row = max(row, boxes[order[upcoming], 0])
        while upcoming < n_boxes and boxes[order[upcoming], 0] <= row:
            active[n_active] = order[upcoming]
            n_active += 1
            upcoming += 1
            changed = True
        if changed:
            # The active boxes' column ranges, sorted by start (few:
            # insertion sort) and merged into disjoint runs, in place. They
            # hold for every row until a box arrives or leaves.
            n_ranges = 0
            for j in range(n_active):
                box = active[j]
                lo = boxes[box, 2]
                hi = boxes[box, 3]
                t = n_ranges
                while t > 0 and lows[t - 1] > lo:
                    lows[t] = lows[t - 1]
                    highs[t] = highs[t - 1]
                    t -= 1
                lows[t] = lo
                highs[t] = hi
                n_ranges += 1
            n_runs = 0
            j = 0
            while j < n_ranges:
                lo = lows[j]
                hi = highs[j]
                j += 1
                while j < n_ranges and lows[j] <= hi:
                    hi = max(hi, highs[j])
                    j += 1
                lows[n_runs] = lo
                highs[n_runs] = hi
                n_runs += 1
            changed = False
        base = row * n_cols
        for j in range(n_runs):
            q = base + lows[j]
            stop = base + highs[j]
            quad_stop = stop - (stop - q) % 4
            while q < quad_stop:
                partial[0, flat[q]] += 1
                partial[1, flat[q + 1]] += 1
                partial[2, flat[q + 2]] += 1
                partial[3, flat[q + 3]] += 1
                q += 4
            while q < stop:
                partial[0, flat[q]] += 1
                q += 1
        row += 1
        # Boxes that end at this row leave.
        kept = 0
        for j in range(n_active):
            if boxes[active[j], 1] > row:
                active[kept] = active[j]
                kept += 1
        changed = changed or kept < n_active
        n_active = kept
    for b in range(256):
        out[b] += partial[0, b] + partial[1, b] + partial[2, b] + partial[3, b]



@functools.cache
def _compiled():
    return _numba.compile_into(globals(), ("_k_find", "_k_join", "_k_count_box_union", "_k_excluded_box_histograms"))


def seed_ranges(lows, dark):
    """Seed tests ``first <= v <= first + span`` on raw values for model-space levels `lows`.

    A pixel seeds at level ``low`` when its model intensity is above ``low``:
    ``v > low``, or ``255 - v > low`` for dark particles. Levels at which
    nothing can seed give an empty range, marked by a negative span.
    """
    lows = np.asarray(lows, dtype=np.int64)
    clipped = np.clip(lows, -1, 255)
    spans = 254 - clipped
    firsts = np.zeros_like(clipped) if dark else clipped + 1
    firsts[spans < 0] = 0
    return firsts, spans


def excluded_box_histograms(image, lows, *, min_seed_size, halo_pad, dark=False, hist=None):
    """(len(lows), 256) histograms of the pixels in the grown seed boxes of a 2D slice.

    See :func:`background_histogram` for the boxes; one row
    per level of `lows` (model space). Levels are processed from the lowest,
    whose seeds include every other level's. The slice's histogram `hist`,
    when given, tells how many seeds there are, which saves a pass.
    """
    lows = np.asarray(lows, dtype=np.int64)
    order = np.argsort(lows, kind="stable")
    firsts, spans = seed_ranges(lows[order], dark)
    usable = spans >= 0  # levels with no possible seed exclude nothing
    out = np.zeros((lows.size, 256), dtype=np.int64)
    if usable.any():
        image = np.ascontiguousarray(image)
        found = np.zeros((int(usable.sum()), 256), dtype=np.int64)
        first, span = int(firsts[usable][0]), int(spans[usable][0])
        n_seeds = -1 if hist is None else int(np.asarray(hist)[first : first + span + 1].sum())
        arguments = (firsts[usable], spans[usable], int(min_seed_size), int(halo_pad))
        if _compiled()["_k_excluded_box_histograms"](image, *arguments, n_seeds, found) < 0:
            # `hist` was not this slice's: count the seeds afresh.
            _compiled()["_k_excluded_box_histograms"](image, *arguments, -1, found)
        out[order[usable]] = found
    return out



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
    if _numba.available():
        boxes = excluded_box_histograms(
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
    cover it. Corners shared by several boxes are summed over the distinct
    corners (sorted), so that no unbuffered scatter-add is needed:
    ``cupyx.scatter_add`` is deprecated in CuPy 14, and GPU test runs that
    used ``cupy.add.at`` instead failed with invalid kernel handles under
    threads (cause not established; ``benchmarks/gpu``).
    """
    xp = backend.xp
    n_slices, n_rows, n_cols = shape
    if boxes.shape[0] == 0:
        return xp.zeros(shape, dtype=bool)
    z = boxes[:, 0]
    r0 = xp.maximum(boxes[:, 1] - pad, 0)
    r1 = xp.minimum(boxes[:, 2] + pad, n_rows)
    c0 = xp.maximum(boxes[:, 3] - pad, 0)
    c1 = xp.minimum(boxes[:, 4] + pad, n_cols)
    corners = xp.zeros((n_slices, n_rows + 1, n_cols + 1), dtype=np.int32)
    row_size, plane_size = n_cols + 1, (n_rows + 1) * (n_cols + 1)
    index = xp.concatenate(
        [
            z * plane_size + r0 * row_size + c0,
            z * plane_size + r0 * row_size + c1,
            z * plane_size + r1 * row_size + c0,
            z * plane_size + r1 * row_size + c1,
        ]
    )
    ones = xp.ones(boxes.shape[0], dtype=np.float64)
    signs = xp.concatenate([ones, -ones, -ones, ones])
    distinct, which = xp.unique(index, return_inverse=True)
    # Sums of small integers in float64: exact.
    sums = xp.bincount(which.ravel(), weights=signs, minlength=distinct.size)
    corners.reshape(-1)[distinct] = sums.astype(np.int32)
    covered = xp.cumsum(xp.cumsum(corners, axis=1, dtype=np.int32), axis=2, dtype=np.int32)
    return covered[:, :n_rows, :n_cols] > 0

