"""Compiling the CPU loops (numba) that the kernel modules keep beside their NumPy code.

A 256-bin histogram and a 256-entry lookup are single passes over bytes;
``np.bincount`` and ``np.take`` run them at 0.5-1 Gvoxel/s and hold the GIL,
while a compiled loop runs at several Gvoxel/s and releases it, so threads
can work on slabs in parallel. The same holds for the sparse work on the few
bright voxels of a slice or a slab -- grouping seed pixels into components,
closing and labelling particle voxels -- which NumPy can only express as
sorts and searches over whole voxel lists.

Each kernel module writes its loops as plain module-level functions named
``_k_*`` and calls :func:`compile_into` on first use: numba is imported then
(it takes a moment), each function is replaced by its compiled version, and
the compiled code is cached on disk, so a later process loads it instead of
compiling again. When numba is missing or :data:`ENABLED` is False, the
modules use their NumPy code instead; both give identical results (the tests
run both).

The union-find, coordinate and neighbourhood helpers below are shared by
the seed, closing and labelling loops. The loops grow no buffer inside
themselves: a buffer reassigned in a loop makes numba count its
references on every iteration; they size it from a count made first, or
stop and let the caller grow it.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import numpy as np

#: Set to False to force the NumPy kernels (tests compare both).
ENABLED = True

_LOCK = threading.Lock()
# Plain function -> its compiled dispatcher, so that a helper used by several
# modules is compiled once and every module calls the same dispatcher.
_COMPILED = {}


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



def _k_coords(p, shape):
    # (z, y, x) of the flat index `p` into a C-ordered array of `shape`.
    plane = shape[1] * shape[2]
    z = p // plane
    y = (p - z * plane) // shape[2]
    return z, y, p - z * plane - y * shape[2]


def _k_offset_inside(z, y, x, offsets, o, shape):
    # Whether (z, y, x) shifted by offset `o` of the (k, 3) `offsets` stays
    # inside `shape`. The offset is read as three scalars: passing the row
    # offsets[o] as an array would make a view, with its reference
    # counting, at every call (a sixth of the closing loop's time).
    z += offsets[o, 0]
    y += offsets[o, 1]
    x += offsets[o, 2]
    return 0 <= z < shape[0] and 0 <= y < shape[1] and 0 <= x < shape[2]


def _k_steps(offsets, shape):
    # Flat-index step of each (k, 3) offset in a C-ordered array of `shape`,
    # and the largest |offset| along each axis.
    k = offsets.shape[0]
    steps = np.empty(k, dtype=np.int64)
    reach = np.zeros(3, dtype=np.int64)
    for o in range(k):
        steps[o] = (offsets[o, 0] * shape[1] + offsets[o, 1]) * shape[2] + offsets[o, 2]
        for axis in range(3):
            reach[axis] = max(reach[axis], abs(offsets[o, axis]))
    return steps, reach


def _k_deep_inside(z, y, x, reach, shape):
    # Whether every offset of `reach` from (z, y, x) stays inside `shape`.
    return (
        reach[0] <= z < shape[0] - reach[0]
        and reach[1] <= y < shape[1] - reach[1]
        and reach[2] <= x < shape[2] - reach[2]
    )


#: The shared helpers, callees first.
SHARED_KERNELS = ("_k_find", "_k_union", "_k_coords", "_k_offset_inside", "_k_steps", "_k_deep_inside")


@functools.cache
def _numba():
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is a dependency
        return None
    return numba


def compile_into(namespace, names):
    """Replace ``namespace[name]`` by its compiled version for each of `names`, in order.

    Callees must come before their callers: numba resolves a global name to
    whatever it holds when the caller is compiled. Shared helpers named in
    :data:`SHARED_KERNELS` (imported into `namespace`) map to one dispatcher.

    Returns
    -------
    kernels : dict or None
        The compiled functions by name, or None without numba.
    """
    numba = _numba()
    if numba is None:  # pragma: no cover - numba is a dependency
        return None
    # The shared helpers are compiled in this module's namespace first, where
    # they call one another by global name.
    work = [(globals(), name) for name in SHARED_KERNELS] + [(namespace, name) for name in names]
    with _LOCK:  # functools.cache in the callers does not stop two threads arriving at once
        for namespace_, name in work:
            function = namespace_[name]
            if isinstance(function, numba.core.dispatcher.Dispatcher):
                continue
            if function not in _COMPILED:
                try:
                    _COMPILED[function] = numba.njit(nogil=True, boundscheck=False, cache=True)(function)
                except RuntimeError:
                    # No writable cache folder (a read-only install without a
                    # user cache): compile in memory, as numba does by default.
                    _COMPILED[function] = numba.njit(nogil=True, boundscheck=False)(function)
            namespace_[name] = _COMPILED[function]
    return {name: namespace[name] for name in names}


def available():
    """True when the compiled kernels can be used."""
    return ENABLED and _numba() is not None


class CompileClock:
    """Seconds numba spent compiling kernels in a :func:`compile_clock` block.

    Loading a kernel from numba's cache does not count: only the first run
    after an installation (or an upgrade) compiles.
    """

    def __init__(self):
        self.seconds = 0.0

    def _add(self, seconds):
        self.seconds += seconds


@contextlib.contextmanager
def compile_clock():
    """Measure the time numba spends compiling inside the ``with`` block.

    Yields a :class:`CompileClock`, whose ``seconds`` is set when the block
    ends (0 without numba, or where its event API is missing). numba
    compiles under a global lock, so the time is that of the compilations
    on any thread, one after the other (the figure is meant for a message,
    not for a benchmark).
    """
    clock = CompileClock()
    event = None
    if available():
        try:
            from numba.core import event
        except ImportError:  # pragma: no cover - numba without its event API
            event = None
    if event is None or not hasattr(event, "install_timer"):
        yield clock
        return
    with event.install_timer("numba:compile", clock._add):
        yield clock


def as_3d(shape, offsets):
    """A 2D (Y, X) problem as a (1, Y, X) one: the voxel-set loops work on three axes."""
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, len(shape))
    if len(shape) == 2:
        shape = (1, *shape)
        offsets = np.column_stack([np.zeros(len(offsets), dtype=np.int64), offsets])
    return tuple(int(s) for s in shape), np.ascontiguousarray(offsets)


def warm_up():
    """Compile (or load from the cache) every kernel now, so that no later call waits.

    Compiling takes several seconds the first time; later processes load the
    kernels from numba's on-disk cache in well under a second.

    Returns False when the compiled kernels are unavailable.
    """
    if not available():
        return False
    from . import (
        components, em, histogram, lookup, map_weights, morphology, point_derivatives, seeds, sparse_gaussian, threshold,
    )

    image = np.zeros((4, 8), dtype=np.uint8)
    image[1, 1:3] = 200
    histogram.compiled_slice_histograms(image[None])
    pmf = np.full(256, 1 / 256)
    em.compiled_em(pmf, pmf, pmf, 0.5, np.inf, 0, max_iter=1, tol=0.0, eps=1e-12)
    map_weights.compiled_map_concave(np.ones((1, 256)), pmf - pmf, pmf, 1.0, 20.0, 1e-12, 1)
    for dtype in (np.float32, np.float64, np.uint16, np.bool_):
        lookup.compiled_apply_luts(image[None], np.zeros((1, 256), dtype), np.empty((1, *image.shape), dtype))
    seeds.excluded_box_histograms(image, [100, 150], min_seed_size=1, halo_pad=1)
    mask = image[None] > 0
    flat = np.flatnonzero(mask)
    closed = morphology.compiled_close_set(mask.view(np.uint8).copy(), flat, np.zeros((1, 3), dtype=np.int64))
    components.compiled_label_set(closed, mask.shape, -np.eye(3, dtype=np.int64))
    for dtype in (np.float32, np.float64):
        threshold.threshold_probabilities(np.zeros((1, 2, 2), dtype), 0.5)
    grown = np.zeros((3, 8, 8), dtype=bool)
    grown[1, 4, 4] = True
    morphology.grow_box(grown, (1, 1, 1))
    points = sparse_gaussian.Points(grown.shape, np.flatnonzero(grown))
    sparse_gaussian.gaussian_at(grown.astype(np.float32), (1.0, 1.0, 1.0), points, 3.0)
    offsets = point_derivatives.stencil_offsets((0, 1, 2))
    neighbours = point_derivatives.neighbour_positions(points.flat, grown.shape, offsets)
    positions = point_derivatives.ranks(neighbours, np.unique(neighbours), grown.size)
    point_derivatives.derivatives(np.zeros(positions.max() + 1, np.float32), positions, 3, 1.0)
    return True
