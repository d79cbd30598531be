"""Per-slice table lookups: every voxel replaced by its slice's table entry.

The posterior is a lookup of each voxel's intensity (or bin) in its slice's
table, and mapping 16-bit values to bins is a lookup in one table. On the
CPU a compiled loop does it without the GIL; elsewhere ``take`` (NumPy) or
fancy indexing (CuPy).
"""

from __future__ import annotations

import functools

import numpy as np

from . import _numba


def _k_plane_lookup(planes, tables, out):
    # planes: (n, m) uint8, tables: (n, 256), out: (n, m) of the tables' dtype.
    for i in range(planes.shape[0]):
        for k in range(planes.shape[1]):
            out[i, k] = tables[i, planes[i, k]]
    return out



def _k_block_lookup(block, tables, out):
    # block: (n, y, x) uint8, any strides; tables: (n, 256); out: (n, y, x), any strides.
    for i in range(block.shape[0]):
        for j in range(block.shape[1]):
            for k in range(block.shape[2]):
                out[i, j, k] = tables[i, block[i, j, k]]
    return out


@functools.cache
def _compiled():
    return _numba.compile_into(globals(), ("_k_plane_lookup", "_k_block_lookup"))


def lookup_into(block, tables, out):
    """``out[i] = tables[i][block[i]]`` for (n, y, x) uint8 `block` and `out` views of any strides.

    Used to look a chunk up straight from the buffer it was decoded into.
    """
    if not _numba.available():
        for i in range(block.shape[0]):
            out[i] = np.take(tables[i], block[i])
        return out
    if tables.dtype == np.float16:
        tables, target = tables.view(np.uint16), out.view(np.uint16)
    else:
        target = out
    _compiled()["_k_block_lookup"](block, np.ascontiguousarray(tables), target)
    return out


def compiled_apply_luts(slab, luts, out):
    """``out[i] = luts[i][slab[i]]`` for a (n, ...) uint8 NumPy slab, by the compiled loop; `out` C-contiguous."""
    planes = np.ascontiguousarray(slab).reshape(slab.shape[0], -1)
    tables = np.ascontiguousarray(luts)
    target = out.reshape(slab.shape[0], -1)
    if tables.dtype == np.float16:
        # numba has no float16; a lookup only copies bit patterns, so the
        # same 16 bits as unsigned integers give the identical result.
        tables, target = tables.view(np.uint16), target.view(np.uint16)
    _compiled()["_k_plane_lookup"](planes, tables, target)
    return out


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
    if backend.name == "cpu" and _numba.available() and out.flags.c_contiguous:
        return compiled_apply_luts(slab, luts, out)
    for i in range(slab.shape[0]):
        xp.take(luts[i], slab[i], out=out[i])
    return out


def to_bins(backend, slab, binning):
    """The 256 bins of a slab of the backend under a :class:`~nanoseg._intensity.Binning`.

    A uint8 slab under an identity binning is returned as is (no copy); any
    other slab takes one lookup per voxel in the binning's table (64 KiB for
    uint16), on the device that holds the slab.
    """
    if slab.dtype == np.uint8 and binning.is_identity:
        return slab
    return backend.to_device(binning.table(slab.dtype))[slab]
