"""How :func:`nanoseg.io.write_ome_zarr` lays out and fills a zarr 3 array.

The codec and chunk configuration of written arrays, and the helpers that cut
the input into slabs of whole output chunks, read a slab, and find or remove
a store on disk.
"""

from __future__ import annotations

import bisect
import shutil
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BytesCodec, ZstdCodec

from ._volume import is_dask_array

#: zstd level of written arrays. On sparse uint32 labels and uint8 images,
#: level 1 writes and reads as fast as zarr's default (zstd at level 3) and
#: as small or smaller; blosc with bit-shuffle is slower and larger on labels,
#: and no compression is no faster for labels (benchmarks/bench_codec.py).
ZSTD_LEVEL = 1


def array_options():
    """Codec and configuration keywords of ``create_array`` for written arrays.

    Returns
    -------
    options : dict
        ``serializer`` (little-endian bytes), ``compressors`` (zstd at
        :data:`ZSTD_LEVEL`, no shuffle) and ``config`` with
        ``write_empty_chunks=False``, so that all-zero chunks (background
        of a label image) are never stored, whatever zarr's default.
    """
    return {
        "serializer": BytesCodec(),
        "compressors": (ZstdCodec(level=ZSTD_LEVEL),),
        "config": {"write_empty_chunks": False},
    }


def _store_path(array):
    """Filesystem path of a zarr array's store, or None."""
    root = getattr(getattr(array, "store", None), "root", None)
    return None if root is None else Path(root) / getattr(array, "path", "")


def _source_edges(array, n_slices):
    """Indices along the first axis where reading the source can stop without waste."""
    if is_dask_array(array):
        return np.cumsum(array.chunks[0]).tolist()
    if isinstance(array, zarr.Array):
        depth = int(array.chunks[0])
        return [*range(depth, n_slices, depth), n_slices]
    return list(range(1, n_slices + 1))


def slab_bounds(edges, chunk_depth, max_depth):
    """Cut [0, n) at source `edges` into slabs of at most `max_depth` slices.

    Cuts prefer multiples of the output's `chunk_depth` (whole chunks are
    written once); a slab is as deep as needed to reach the next edge.
    """
    edges = sorted({int(e) for e in edges})
    n_slices = edges[-1]
    aligned = [e for e in edges if e % chunk_depth == 0 or e == n_slices]
    bounds, start = [], 0
    while start < n_slices:
        stop = None
        for candidates in (aligned, edges):
            below = bisect.bisect_right(candidates, start + max_depth) - 1
            if below >= 0 and candidates[below] > start:
                stop = candidates[below]
                break
        if stop is None:
            stop = edges[bisect.bisect_right(edges, start)]
        bounds.append((start, stop))
        start = stop
    return bounds


def _read_slab(array, start, stop):
    data = array[start:stop]
    if is_dask_array(data):
        data = data.compute()
    return np.asarray(data)


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
