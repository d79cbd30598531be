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

from . import _handoff as handoff
from ._plan import compute, computed_here, ordered_map
from ._volume import compute_by_block, is_dask_array
from ._zarr_chunks import chunk_files

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


def write_slabs(target, array, bounds, n_jobs=2):
    """Read `array` slab by slab and write each into the newly created `target`.

    Slabs are read and written on `n_jobs` threads, so that one slab is
    computed (a lazy input) or decoded while another is encoded; two slabs
    never share a chunk unless `n_jobs` is 1. Chunks whose part of a slab is
    all zero are not written: a new array reads them as its fill value 0.
    Whole chunks of a local array go straight to its chunk files, and a
    local zarr input is read from its chunk files (:mod:`nanoseg._zarr_chunks`),
    and so is a mixture's lazy posterior of one, looked up as it is decoded
    (:func:`_posterior_planes`); anything else goes through zarr, with its
    own all-zero check (``write_empty_chunks=False``). Yields each slab's
    bounds, in order, once it is written (for a progress bar).
    """
    if any(start % target.chunks[0] for start, _ in bounds):
        n_jobs = 1  # two slabs writing parts of one chunk would race
    files = chunk_files(target)
    source = chunk_files(array)
    planes = None if source is not None else _posterior_planes(array)
    source = source or array
    depth = target.chunks[0]

    def pieces(start, stop):
        if planes is None:
            return _read_pieces(source, start, stop)
        # One output chunk deep at a time, each written before the next is
        # looked up: a slab of the posterior is never whole in memory.
        return ((z, planes[z : min(z + depth, stop)]) for z in range(start, stop, depth))

    def copy(bound):
        for start, data in pieces(*bound):
            if files is None:
                target[start : start + data.shape[0]] = data
            else:
                files.write(start, data)
        return bound

    yield from ordered_map(copy, bounds, n_jobs)


def write_sparse_slabs(target, sparse, n_jobs=2):
    """Write labels given slab by slab as voxel lists into the new array `target`.

    `sparse` is the voxel lists a lazy labelling hands on
    (:class:`nanoseg._engine.labeling.SparseLabels`). Each chunk holding
    labelled voxels is filled in a reused buffer and written to its file;
    no dense block is made. Returns None when `target` or the slabs do not
    allow it (then write the dense labels instead); otherwise yields each
    slab's bounds, in order, once it is written.
    """
    files = chunk_files(target)
    depth = target.chunks[0]
    if (
        files is None or not files.writable or files.fill_value != 0
        or tuple(sparse.shape) != tuple(target.shape) or np.dtype(sparse.dtype) != target.dtype
        or any(start % depth or (stop % depth and stop != target.shape[0]) for start, stop in sparse.bounds)
    ):
        return None

    def write(index):
        start, stop = sparse.bounds[index]
        files.write_sparse(start, stop, *sparse.slab(index))
        return start, stop

    return ordered_map(write, range(len(sparse.bounds)), n_jobs)


def _posterior_planes(array):
    """A mixture's lazy posterior `array` as planes read without dask, or None.

    Only where this process would compute the graph (dask's threads or
    synchronous scheduler) and the posterior is looked up straight from a
    local zarr input's chunk files (see ``PosteriorAt.planes``). Each
    output chunk's planes are then decoded and looked up on the writing
    thread: no dask graph, and no copy of each computed block (dask's
    ``compute`` returns a copy of a single block), which took an eighth of
    the time of writing a float16 posterior on 2048 x 2048 planes.
    """
    posterior_at = handoff.find(array, handoff.POSTERIOR_AT)
    if posterior_at is None or not computed_here([array]):
        return None
    planes = posterior_at.planes()
    if planes is None or tuple(planes.shape) != tuple(array.shape) or planes.dtype != array.dtype:
        return None
    return planes


def _read_pieces(array, start, stop):
    """Planes ``start:stop`` of `array` as ``(first plane, ndarray)`` pieces: one
    per block of a dask array (see :func:`~nanoseg._volume.compute_by_block`)."""
    if is_dask_array(array):
        return compute_by_block(array, start, stop)
    return [(start, _read_slab(array, start, stop))]


def _read_slab(array, start, stop):
    data = array[start:stop]
    if is_dask_array(data):
        (data,) = compute(data)
    return np.asarray(data)


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
