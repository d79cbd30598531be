"""Overlapping block maps of dask arrays that give the whole-array result."""

from __future__ import annotations

import numpy as np

from .._plan import rechunk


def map_overlap(function, array, depth, dtype, trims_itself=False):
    """``dask.array.map_overlap`` with no padding beyond the array's edges.

    Each chunk reads `depth` voxels of its neighbours per axis, trimmed from
    its result; at the array's edges the filter itself handles the border,
    as it does in memory, so the results are identical. An axis shorter than
    its depth is kept in one chunk instead.

    With `trims_itself`, `function` returns only its chunk's own voxels:
    no result the size of the chunk with its halo is kept alive by a
    trimmed view of it until the output is assembled.
    """
    import dask.array as da

    depth = list(depth)
    whole = {}
    for axis, (d, n) in enumerate(zip(depth, array.shape)):
        if d >= n:
            whole[axis], depth[axis] = -1, 0
    if whole:
        array = rechunk(array, whole)
    if not any(depth):
        return array.map_blocks(function, dtype=dtype, meta=np.empty((0, 0, 0), dtype=dtype))
    extra = {"chunks": array.chunks} if trims_itself else {}
    return da.map_overlap(
        function,
        array,
        depth=dict(enumerate(depth)),
        boundary="none",
        trim=not trims_itself,
        dtype=dtype,
        meta=np.empty((0, 0, 0), dtype=dtype),
        **extra,
    )
