"""Moving maps between a voxel grid and its coarser grid of blocks.

Downsampling averages a map over non-overlapping blocks of voxels, in memory
or one dask chunk per whole number of blocks, with bit-identical results
either way; :func:`repeat_blocks` repeats every block's value over its voxels
to bring a result on the block grid back to the input's grid.
"""

from __future__ import annotations

import itertools

import numpy as np

from ._axes import per_axis
from ._plan import rechunk
from ._volume import is_lazy


def block_mean(array, factors, dtype):
    """Mean over non-overlapping blocks of `factors` voxels; partial edge blocks
    are averaged over the voxels they hold.

    The block's voxels are added in a fixed order, so that any chunking whose
    chunk edges fall on block edges gives bit-identical means.
    """
    out_shape = tuple(-(-n // f) for n, f in zip(array.shape, factors))
    total = np.zeros(out_shape, dtype=np.float64)
    for offsets in itertools.product(*(range(f) for f in factors)):
        part = array[tuple(slice(o, None, f) for o, f in zip(offsets, factors))]
        total[tuple(slice(0, s) for s in part.shape)] += part
    count = np.ones(out_shape, dtype=np.float64)
    for axis, (n, f) in enumerate(zip(array.shape, factors)):
        per_block = np.minimum(f, n - f * np.arange(out_shape[axis])).astype(np.float64)
        count = count * per_block.reshape([-1 if a == axis else 1 for a in range(array.ndim)])
    return (total / count).astype(dtype)


def trimmed(array, factors):
    """`array` cut to whole blocks along every axis."""
    return array[tuple(slice(0, (n // f) * f) for n, f in zip(array.shape, factors))]


def lazy_block_mean(array, factors, dtype):
    """:func:`block_mean` of a dask array, one task per aligned chunk."""
    chunks = []
    for axis, f in enumerate(factors):
        size = max(array.chunks[axis])
        chunks.append(max(f, (size // f) * f))
    array = rechunk(array, tuple(chunks))
    out_chunks = tuple(
        tuple(-(-c // f) for c in array.chunks[axis]) for axis, f in enumerate(factors)
    )
    meta = np.empty((0, 0, 0), dtype=dtype)
    return array.map_blocks(block_mean, factors, dtype, dtype=dtype, chunks=out_chunks, meta=meta)


def repeat_blocks(labels, factors, shape):
    """Every voxel of `labels` repeated over its block, cut or zero-padded to `shape`.

    The grid arithmetic of :func:`nanoseg.preprocessing.upsample`, which
    documents the parameters and errors; lazy for a dask or zarr input.
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(labels.shape)
    if len(shape) != ndim:
        raise ValueError(
            f"shape {shape} has {len(shape)} axes but labels of shape {tuple(labels.shape)} have {ndim}."
        )
    factors = per_axis(factors, ndim, "factors")
    if not all(f >= 1 and f == int(f) for f in factors):
        raise ValueError(f"factors must be integers >= 1; got {factors!r}.")
    factors = tuple(int(f) for f in factors)
    for n, f, m in zip(labels.shape, factors, shape):
        if not (n - 1) * f < m < (n + 1) * f:
            raise ValueError(
                f"labels of shape {tuple(labels.shape)} with block sizes {factors} cannot come from a "
                f"grid of shape {shape}: each axis of n blocks covers between (n - 1) * factor + 1 "
                "and (n + 1) * factor - 1 voxels. Check the shape and the smoother's block sizes."
            )
    if is_lazy(labels):
        import dask.array as da

        if not hasattr(labels, "dask"):
            labels = da.from_zarr(labels)
        xp = da
    else:
        labels = np.asarray(labels)
        xp = np
    out = labels
    for axis, f in enumerate(factors):
        if f > 1:
            out = xp.repeat(out, f, axis=axis)
    out = out[tuple(slice(0, m) for m in shape)]
    missing = [(0, m - s) for m, s in zip(shape, out.shape)]
    if any(after for _, after in missing):
        out = xp.pad(out, missing, mode="constant", constant_values=0)
    return out

