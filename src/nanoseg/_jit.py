"""Compiled CPU loops (numba) for the two kernels NumPy does slowly.

A 256-bin histogram and a 256-entry lookup are single passes over bytes;
``np.bincount`` and ``np.take`` run them at 0.5-1 Gvoxel/s and hold the GIL,
while a compiled loop runs at several Gvoxel/s and releases it, so dask's
threads can work on chunks in parallel. numba is imported on first use (it
takes a moment), and when it is missing or disabled the NumPy kernels in
:mod:`nanoseg._kernels` are used instead; both give identical results.
"""

from __future__ import annotations

import functools

import numpy as np

#: Set to False to force the NumPy kernels (tests compare both).
ENABLED = True


@functools.cache
def _compile():
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is a dependency
        return None

    @numba.njit(nogil=True, boundscheck=False, cache=False)
    def plane_histograms(planes, out):
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

    @numba.njit(nogil=True, boundscheck=False, cache=False)
    def plane_lookup(planes, tables, out):
        # planes: (n, m) uint8, tables: (n, 256), out: (n, m) of the tables' dtype.
        for i in range(planes.shape[0]):
            for k in range(planes.shape[1]):
                out[i, k] = tables[i, planes[i, k]]
        return out

    return plane_histograms, plane_lookup


def available():
    """True when the compiled kernels can be used."""
    return ENABLED and _compile() is not None


def slice_histograms(slab):
    """(n, 256) int64 histograms of a (n, ...) uint8 array's slices."""
    planes = np.ascontiguousarray(slab).reshape(slab.shape[0], -1)
    return _compile()[0](planes, np.empty((slab.shape[0], 256), dtype=np.int64))


def apply_luts(slab, luts, out):
    """``out[i] = luts[i][slab[i]]`` for a (n, ...) uint8 slab; `out` C-contiguous."""
    planes = np.ascontiguousarray(slab).reshape(slab.shape[0], -1)
    tables = np.ascontiguousarray(luts)
    target = out.reshape(slab.shape[0], -1)
    if tables.dtype == np.float16:
        # numba has no float16; a lookup only copies bit patterns, so the
        # same 16 bits as unsigned integers give the identical result.
        tables, target = tables.view(np.uint16), target.view(np.uint16)
    _compile()[1](planes, tables, target)
    return out
