"""Compiled CPU loops (numba) for the kernels NumPy does slowly.

A 256-bin histogram and a 256-entry lookup are single passes over bytes;
``np.bincount`` and ``np.take`` run them at 0.5-1 Gvoxel/s and hold the GIL,
while a compiled loop runs at several Gvoxel/s and releases it, so threads
can work on slabs in parallel. The same holds for the sparse work on the few
bright voxels of a slice or a slab -- grouping seed pixels into components,
closing and labelling particle voxels -- which NumPy can only express as
sorts and searches over whole voxel lists.

numba is imported on first use (it takes a moment), and when it is missing
or disabled the NumPy kernels in :mod:`nanoseg._kernels` and
:mod:`nanoseg._sparse` are used instead; both give identical results (the
tests run both).
"""

from __future__ import annotations

import functools
import threading

import numpy as np

#: Set to False to force the NumPy kernels (tests compare both).
ENABLED = True

_COMPILE_LOCK = threading.Lock()


# -- kernels ------------------------------------------------------------------
# Plain Python until _compile() replaces each module-level name with its
# compiled version (numba is imported on first use only). Being module-level
# functions that call each other by global name, they can be cached on disk:
# a later process loads them instead of compiling them again.



def _k_plane_histograms(planes, out):
    # planes: (n, m) uint8, out: (n, 256) int64. Four partial histograms
    # break the store-to-load dependency between equal neighbouring values.
    partial = np.zeros((4, 256), dtype=np.int64)
    for i in range(planes.shape[0]):
        partial[:] = 0
        m = planes.shape[1]
        stop = m - m % 4
        for k in range(0, stop, 4):
            partial[0, planes[i, k]] += 1
            partial[1, planes[i, k + 1]] += 1
            partial[2, planes[i, k + 2]] += 1
            partial[3, planes[i, k + 3]] += 1
        for k in range(stop, m):
            partial[0, planes[i, k]] += 1
        for b in range(256):
            out[i, b] = partial[0, b] + partial[1, b] + partial[2, b] + partial[3, b]
    return out


def _k_plane_lookup(planes, tables, out):
    # planes: (n, m) uint8, tables: (n, 256), out: (n, m) of the tables' dtype.
    for i in range(planes.shape[0]):
        for k in range(planes.shape[1]):
            out[i, k] = tables[i, planes[i, k]]
    return out


def _k_grow(buffer, used):
    bigger = np.empty(max(64, 2 * buffer.size), dtype=buffer.dtype)
    bigger[:used] = buffer[:used]
    return bigger


def _k_find(parent, x):
    # Path halving: every visited node skips to its grandparent.
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


def _k_union(parent, a, b):
    # The smaller index becomes the root, so a component's root is its
    # first member in raster order.
    a = _k_find(parent, a)
    b = _k_find(parent, b)
    if a < b:
        parent[b] = a
    elif b < a:
        parent[a] = b


def _k_excluded_box_histograms(image, firsts, spans, min_size, pad, n_seeds, out):
    """Histogram of the pixels inside the grown seed boxes, for several seed levels.

    image: (Y, X) uint8, C-contiguous. Level l seeds the pixels with
    values in firsts[l]..firsts[l] + spans[l] (the caller orders the
    levels so that each one's seeds are a subset of the first one's).
    n_seeds: number of seeds of the first level when known (from the
    slice's histogram), else -1. out: (levels, 256) int64, overwritten.
    """
    n_rows, n_cols = image.shape
    flat = image.reshape(-1)
    out[:] = 0
    if firsts.size == 0:
        return out
    # Seeds of the widest level, row by row. Blocks of 64 pixels with no
    # seed are skipped after one vectorised test.
    first = np.uint8(firsts[0])
    span = np.uint8(spans[0])
    n_all = n_seeds
    if n_all < 0:
        n_all = 0
        for p in range(flat.size):
            n_all += np.uint8(flat[p] - first) <= span
    all_cols = np.empty(n_all, dtype=np.int32)
    all_starts = np.empty(n_rows + 1, dtype=np.int64)
    k = 0
    for row in range(n_rows):
        all_starts[row] = k
        base = row * n_cols
        c = 0
        while c < n_cols:
            stop = min(c + 64, n_cols)
            hit = 0
            for q in range(base + c, base + stop):
                hit += np.uint8(flat[q] - first) <= span
            if hit:
                for q in range(c, stop):
                    if np.uint8(flat[base + q] - first) <= span:
                        if k == all_cols.size:  # more seeds than announced: never write past the end
                            all_cols = _k_grow(all_cols, k)
                        all_cols[k] = q
                        k += 1
            c = stop
    all_starts[n_rows] = k
    n_all = k
    cols = np.empty(n_all, dtype=np.int32)
    starts = np.empty(n_rows + 1, dtype=np.int64)
    parent = np.empty(n_all, dtype=np.int64)
    size = np.empty(n_all, dtype=np.int64)
    row_min = np.empty(n_all, dtype=np.int64)
    row_max = np.empty(n_all, dtype=np.int64)
    col_min = np.empty(n_all, dtype=np.int64)
    col_max = np.empty(n_all, dtype=np.int64)
    for level in range(firsts.size):
        first = np.uint8(firsts[level])
        span = np.uint8(spans[level])
        n = 0
        for row in range(n_rows):
            starts[row] = n
            base = row * n_cols
            for i in range(all_starts[row], all_starts[row + 1]):
                if np.uint8(flat[base + all_cols[i]] - first) <= span:
                    cols[n] = all_cols[i]
                    n += 1
        starts[n_rows] = n
        if n == 0:
            continue
        # 8-connected components: each seed joins its left neighbour and
        # the up to three seeds above it, found with a pointer that only
        # moves forward through the row above.
        for i in range(n):
            parent[i] = i
        for row in range(n_rows):
            above = starts[row - 1] if row > 0 else 0
            for i in range(starts[row], starts[row + 1]):
                c = cols[i]
                if i > starts[row] and cols[i - 1] == c - 1:
                    _k_union(parent, i, i - 1)
                if row > 0:
                    while above < starts[row] and cols[above] < c - 1:
                        above += 1
                    t = above
                    while t < starts[row] and cols[t] <= c + 1:
                        _k_union(parent, i, t)
                        t += 1
        # Size and bounding box of each component, kept at its root.
        for i in range(n):
            size[i] = 0
        for row in range(n_rows):
            for i in range(starts[row], starts[row + 1]):
                root = _k_find(parent, i)
                c = cols[i]
                if size[root] == 0:
                    row_min[root] = row
                    col_min[root] = c
                    col_max[root] = c
                else:
                    col_min[root] = min(col_min[root], c)
                    col_max[root] = max(col_max[root], c)
                row_max[root] = row
                size[root] += 1
        # Count every pixel of the union of the grown boxes once.
        painted = np.zeros(flat.size, dtype=np.uint8)
        for i in range(n):
            if parent[i] != i or size[i] < min_size:
                continue
            r0 = max(row_min[i] - pad, 0)
            r1 = min(row_max[i] + 1 + pad, n_rows)
            c0 = max(col_min[i] - pad, 0)
            c1 = min(col_max[i] + 1 + pad, n_cols)
            for row in range(r0, r1):
                base = row * n_cols
                for q in range(base + c0, base + c1):
                    if painted[q] == 0:
                        painted[q] = 1
                        out[level, flat[q]] += 1
    return out


def _k_close_set(state, fg, offsets):
    """Closing of the voxel set `fg` (sorted flat indices into `state`).

    state: (Z, Y, X) uint8, 1 on `fg` and 0 elsewhere; used as scratch
    (dilated voxels are set to 2). offsets: (k, 3) footprint offsets.
    Outside the array counts as foreground for the erosion. Returns the
    closed set, sorted.
    """
    n_planes, n_rows, n_cols = state.shape
    plane = n_rows * n_cols
    flat = state.reshape(-1)
    k = offsets.shape[0]
    steps = np.empty(k, dtype=np.int64)
    for o in range(k):
        steps[o] = offsets[o, 0] * plane + offsets[o, 1] * n_cols + offsets[o, 2]
    added = np.empty(1024, dtype=np.int64)
    n_added = 0
    for i in range(fg.size):
        p = fg[i]
        z = p // plane
        y = (p - z * plane) // n_cols
        x = p - z * plane - y * n_cols
        for o in range(k):
            zz = z + offsets[o, 0]
            yy = y + offsets[o, 1]
            xx = x + offsets[o, 2]
            if 0 <= zz < n_planes and 0 <= yy < n_rows and 0 <= xx < n_cols:
                q = p + steps[o]
                if flat[q] == 0:
                    flat[q] = 2
                    if n_added == added.size:
                        added = _k_grow(added, n_added)
                    added[n_added] = q
                    n_added += 1
    kept = np.empty(n_added, dtype=np.int64)
    n_kept = 0
    for i in range(n_added):
        p = added[i]
        z = p // plane
        y = (p - z * plane) // n_cols
        x = p - z * plane - y * n_cols
        keep = True
        for o in range(k):
            zz = z + offsets[o, 0]
            yy = y + offsets[o, 1]
            xx = x + offsets[o, 2]
            inside = 0 <= zz < n_planes and 0 <= yy < n_rows and 0 <= xx < n_cols
            if inside and flat[p + steps[o]] == 0:
                keep = False
                break
        if keep:
            kept[n_kept] = p
            n_kept += 1
    kept = np.sort(kept[:n_kept])
    # Merge the two sorted, disjoint sets.
    closed = np.empty(fg.size + n_kept, dtype=np.int64)
    a = 0
    b = 0
    for i in range(closed.size):
        if b == n_kept or (a < fg.size and fg[a] < kept[b]):
            closed[i] = fg[a]
            a += 1
        else:
            closed[i] = kept[b]
            b += 1
    return closed


def _k_label_set(flat, shape, offsets):
    """Connected components of the sorted voxel set `flat` in an array of `shape`.

    offsets: (k, 3) neighbour offsets that come before a voxel in raster
    order (half the neighbourhood). Returns (ids 1..count in raster order
    of each component's first voxel, count).
    """
    n_planes, n_rows, n_cols = shape
    plane = n_rows * n_cols
    n = flat.size
    k = offsets.shape[0]
    parent = np.arange(n)
    # One forward-only pointer per offset: the neighbours of successive
    # voxels are at increasing positions.
    pointers = np.zeros(k, dtype=np.int64)
    steps = np.empty(k, dtype=np.int64)
    for o in range(k):
        steps[o] = offsets[o, 0] * plane + offsets[o, 1] * n_cols + offsets[o, 2]
    for i in range(n):
        p = flat[i]
        z = p // plane
        y = (p - z * plane) // n_cols
        x = p - z * plane - y * n_cols
        for o in range(k):
            zz = z + offsets[o, 0]
            yy = y + offsets[o, 1]
            xx = x + offsets[o, 2]
            if not (0 <= zz < n_planes and 0 <= yy < n_rows and 0 <= xx < n_cols):
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


#: Kernels, in the order they must be compiled (callees before callers).
_KERNELS = ("_k_plane_histograms", "_k_plane_lookup", "_k_grow", "_k_find", "_k_union", "_k_excluded_box_histograms", "_k_close_set", "_k_label_set")


@functools.cache
def _compile():
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is a dependency
        return None

    cached = numba.njit(nogil=True, boundscheck=False, cache=True)
    uncached = numba.njit(nogil=True, boundscheck=False)
    module = globals()
    with _COMPILE_LOCK:  # functools.cache does not stop two threads arriving at once
        for name in _KERNELS:
            if not isinstance(module[name], numba.core.dispatcher.Dispatcher):
                try:
                    module[name] = cached(module[name])
                except RuntimeError:
                    # No writable cache folder (a read-only install without a
                    # user cache): compile in memory, as numba does by default.
                    module[name] = uncached(module[name])
    return {name[3:]: module[name] for name in _KERNELS}


def available():
    """True when the compiled kernels can be used."""
    return ENABLED and _compile() is not None


def slice_histograms(slab):
    """(n, 256) int64 histograms of a (n, ...) uint8 array's slices."""
    planes = np.ascontiguousarray(slab).reshape(slab.shape[0], -1)
    return _compile()["plane_histograms"](planes, np.empty((slab.shape[0], 256), dtype=np.int64))


def apply_luts(slab, luts, out):
    """``out[i] = luts[i][slab[i]]`` for a (n, ...) uint8 slab; `out` C-contiguous."""
    planes = np.ascontiguousarray(slab).reshape(slab.shape[0], -1)
    tables = np.ascontiguousarray(luts)
    target = out.reshape(slab.shape[0], -1)
    if tables.dtype == np.float16:
        # numba has no float16; a lookup only copies bit patterns, so the
        # same 16 bits as unsigned integers give the identical result.
        tables, target = tables.view(np.uint16), target.view(np.uint16)
    _compile()["plane_lookup"](planes, tables, target)
    return out


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

    See :func:`nanoseg._kernels.background_histogram` for the boxes; one row
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
        _compile()["excluded_box_histograms"](
            image, firsts[usable], spans[usable], int(min_seed_size), int(halo_pad), n_seeds, found
        )
        out[order[usable]] = found
    return out


def _as_3d(shape, offsets):
    """A 2D (Y, X) problem as a (1, Y, X) one: the kernels work on three axes."""
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, len(shape))
    if len(shape) == 2:
        shape = (1, *shape)
        offsets = np.column_stack([np.zeros(len(offsets), dtype=np.int64), offsets])
    return tuple(int(s) for s in shape), np.ascontiguousarray(offsets)


def close_set(state, flat, offsets):
    """Closing of the voxel set `flat`; `state` (uint8, 1 on `flat`, 0 elsewhere) is overwritten.

    2D or 3D. Returns the closed set as sorted flat indices (see
    :func:`nanoseg._sparse.close`).
    """
    shape, offsets = _as_3d(state.shape, offsets)
    return _compile()["close_set"](state.reshape(shape), flat, offsets)


def label_set(flat, shape, offsets):
    """Components of the sorted set `flat` joined by the earlier-in-raster-order `offsets` (2D or 3D)."""
    shape, offsets = _as_3d(shape, offsets)
    return _compile()["label_set"](flat, shape, offsets)


def warm_up():
    """Compile every kernel now, so that no later call waits for it.

    Compiling takes several seconds the first time; later processes load the
    kernels from numba's on-disk cache in well under a second.

    Returns False when the compiled kernels are unavailable.
    """
    if not available():
        return False
    image = np.zeros((4, 8), dtype=np.uint8)
    image[1, 1:3] = 200
    slice_histograms(image[None])
    for dtype in (np.float32, np.float64, np.uint16, np.bool_):
        apply_luts(image[None], np.zeros((1, 256), dtype), np.empty((1, *image.shape), dtype))
    excluded_box_histograms(image, [100, 150], min_seed_size=1, halo_pad=1)
    mask = image[None] > 0
    flat = np.flatnonzero(mask)
    closed = close_set(mask.view(np.uint8).copy(), flat, np.zeros((1, 3), dtype=np.int64))
    label_set(closed, mask.shape, -np.eye(3, dtype=np.int64))
    return True
