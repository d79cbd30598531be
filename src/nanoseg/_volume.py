"""Volume adapters: one interface over NumPy, zarr and dask inputs.

A :class:`Volume` knows its shape and dtype from metadata alone, reads the
slices it is asked for (never the whole array unless it is already in
memory), and builds lazy outputs for out-of-core inputs. A 2D image is
handled as a volume of one slice and given back in 2D.

Conventions
-----------
* A single volume is (Z, Y, X) -- plane, row, column -- and its samples, in
  the scikit-learn sense, are its Z slices.
* A list (or tuple) of volumes is a set of crops; each crop is one sample.
* CuPy arrays (kind "cupy") are in memory on a GPU: slabs are read where they
  are for a GPU backend, and copied to the host otherwise.
"""

from __future__ import annotations

import functools
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import zarr

from . import _backend, _plan
from ._zarr_chunks import ChunkFiles, chunk_files


def _dask_array_type():
    # dask.array is only imported by users who pass dask arrays or by our
    # lazy outputs, so keep `import nanoseg` light.
    module = sys.modules.get("dask.array")
    return None if module is None else module.Array


def is_dask_array(array):
    """True for a ``dask.array.Array``."""
    dask_type = _dask_array_type()
    return dask_type is not None and isinstance(array, dask_type)


def is_lazy(array):
    """True for inputs processed out of core (zarr and dask arrays)."""
    return isinstance(array, zarr.Array) or is_dask_array(array)


def is_volume_list(X):
    """True when `X` is a list or tuple of volumes (annotated crops)."""
    return isinstance(X, (list, tuple))


@dataclass
class Volume:
    """Slab access to one 2D or 3D array.

    Attributes
    ----------
    array : ndarray, cupy.ndarray, zarr.Array or dask.array.Array
        The wrapped array, never copied.
    kind : {"numpy", "cupy", "zarr", "dask"}
    is_2d : bool
        True when `array` is a single image; it is then seen as one slice.
    name : str
        How error messages refer to it (``X``, or ``X[i]`` in a list).
    """

    array: object
    kind: str
    is_2d: bool
    name: str = "X"

    @functools.cached_property
    def reader(self):
        """What slabs are read from: the array, or its chunk files for a qualifying zarr array.

        See :mod:`nanoseg._zarr_chunks`: chunk files are read with the same
        values as through zarr, without its per-chunk overhead.
        """
        files = chunk_files(self.array) if self.kind == "zarr" else None
        return self.array if files is None else files

    @property
    def stored_chunks(self):
        """The chunk files of a 3D local zarr volume whose missing chunks read as 0, or None.

        Such a volume (stored labels, for instance) can be searched chunk
        file by chunk file, skipping the chunks that were never written.
        """
        reader = None if self.is_2d else self.reader
        return reader if isinstance(reader, ChunkFiles) and reader.fill_value == 0 else None

    @property
    def shape(self):
        """Shape as (Z, Y, X); a 2D image has Z = 1."""
        shape = tuple(int(s) for s in self.array.shape)
        return (1, *shape) if self.is_2d else shape

    @property
    def dtype(self):
        return np.dtype(self.array.dtype)

    @property
    def chunk_depth(self):
        """Slices per input chunk along Z (1 for in-memory arrays)."""
        if self.is_2d or self.kind in ("numpy", "cupy"):
            return 1
        if self.kind == "zarr":
            return int(self.array.chunks[0])
        return int(max(self.array.chunks[0]))

    def slab_depth(self, bytes_per_voxel, budget=None, warn=True):
        """Slices per slab so that a slab's working set fits `budget` bytes.

        The depth is a multiple of the input's chunk depth where the budget
        allows, and never less than one chunk, so that each chunk is decoded
        once per pass. When a `budget` is given (the user's memory budget,
        shared among slabs) and even that smallest slab exceeds it, a
        warning says so, unless `warn` is False.
        """
        promised = budget is not None and warn
        budget = _plan.SLAB_BYTES if budget is None else budget
        n_slices, n_rows, n_cols = self.shape
        depth = max(1, int(budget // max(1, n_rows * n_cols * bytes_per_voxel)))
        chunk = self.chunk_depth
        depth = min(max(chunk, (depth // chunk) * chunk), n_slices)
        need = depth * n_rows * n_cols * bytes_per_voxel
        if promised and need > budget:
            # A slab is never less than one chunk deep (nor one slice): say
            # so rather than exceed a budget the user set without a word.
            smallest, remedy = (
                (f"{depth} slices of {n_rows} x {n_cols} voxels, its chunks' depth",
                 "Raise memory_budget, lower n_jobs, or store the volume in chunks one slice deep.")
                if depth > 1 else
                (f"one slice of {n_rows} x {n_cols} voxels",
                 "Raise memory_budget or lower n_jobs: nanoseg works on at least one whole slice at a time.")
            )
            from dask.utils import format_bytes

            warnings.warn(
                f"The memory budget leaves {format_bytes(budget)} for each slab of {self.name}, but its "
                f"smallest slab ({smallest}) needs about {format_bytes(need)}: memory use will exceed "
                f"memory_budget. {remedy}",
                UserWarning,
                stacklevel=3,
            )
        return depth

    def describe_plan(self, depth, bytes_per_voxel, what):
        """One line saying how a pass will cut this volume (for verbose mode)."""
        n_slices, n_rows, n_cols = self.shape
        working = depth * n_rows * n_cols * bytes_per_voxel / 2**20
        return (
            f"[nanoseg] {what}: {self.name} {n_slices} x {n_rows} x {n_cols} ({self.kind}), "
            f"slabs of {depth} slice(s), about {working:.0f} MiB of working memory each"
        )

    def slabs(self, depth, indices=None):
        """Yield groups of slice indices, `depth` at a time, in Z order."""
        indices = np.arange(self.shape[0]) if indices is None else np.asarray(indices)
        for start in range(0, indices.size, depth):
            yield indices[start : start + depth]

    @property
    def in_memory(self):
        """True for NumPy and CuPy arrays (validated whole, read without decoding)."""
        return self.kind in ("numpy", "cupy")

    def read(self, start, stop, backend=None):
        """Slices ``start:stop`` as a (n, Y, X) array.

        Parameters
        ----------
        backend : Backend, optional
            Give the slab as an array of this backend: a GPU backend gets a
            view of a CuPy volume, and a copy of anything else. By default
            (and for the CPU) a NumPy array.
        """
        if self.is_2d:
            data = self.array if self.in_memory else self.reader[:, :]
            data = _plan.compute(data)[0] if self.kind == "dask" else data
            return _deliver(data[None, ...][start:stop], backend)
        data = self.reader[start:stop]
        if self.kind == "dask":
            (data,) = _plan.compute(data)
        return _deliver(data, backend)

    def read_region(self, plane, rows, cols):
        """Rows and columns (two slices) of slice `plane` as a 2D NumPy array.

        Only that part is read: the chunks it overlaps of a zarr array, the
        blocks of a dask array.
        """
        key = (rows, cols) if self.is_2d else (slice(plane, plane + 1), rows, cols)
        data = self.reader[key]
        if self.kind == "dask":
            (data,) = _plan.compute(data)
        data = _deliver(data, None)
        return data if self.is_2d else data[0]

    def read_slices(self, indices, backend=None):
        """The slices listed in `indices` (sorted) as a (n, Y, X) array (see :meth:`read`)."""
        indices = np.asarray(indices)
        if indices.size and indices[-1] - indices[0] + 1 == indices.size:
            return self.read(int(indices[0]), int(indices[-1]) + 1, backend)
        if self.is_2d:
            return self.read(0, 1, backend)[indices]
        if self.kind == "zarr":
            # Runs of consecutive slices, each read as one slab.
            runs = np.split(indices, np.flatnonzero(np.diff(indices) != 1) + 1)
            return _deliver(np.concatenate([self.reader[int(r[0]) : int(r[-1]) + 1] for r in runs]), backend)
        if self.kind == "cupy":
            return _deliver(self.array[_backend.gpu_backend().to_device(indices)], backend)
        data = self.array[indices]
        return _deliver(_plan.compute(data)[0] if self.kind == "dask" else data, backend)

    def to_dask(self):
        """The volume as a 3D dask array (a 2D image gains a leading axis)."""
        import dask.array as da

        if self.kind == "dask":
            array = self.array
        elif self.kind == "zarr":
            chunks = dask_chunks(self.array.shape, self.array.chunks, self.dtype.itemsize)
            if self.reader is self.array:
                array = da.from_zarr(self.array, chunks=chunks)
            else:
                from dask.base import tokenize

                name = "nanoseg-zarr-" + tokenize(str(self.reader.root), self.array.shape, chunks, str(self.dtype))
                array = da.from_array(self.reader, chunks=chunks, name=name, lock=False, fancy=False)
        else:
            array = da.from_array(self.array)
        return array[None, ...] if self.is_2d else array

    def restore(self, array):
        """Give a (Z, Y, X) result back in this volume's dimensionality."""
        return array[0] if self.is_2d else array


def compute_by_block(array, start, stop, **compute_options):
    """Planes ``start:stop`` of a dask array as ``(first plane, ndarray)`` pieces, one per block along Z.

    The blocks are computed together (one graph) but not joined: joining
    them would copy the planes once more into fresh memory, which the
    callers, writing or copying each plane on, do not need.
    """
    edges = np.cumsum((0, *array.chunks[0]))
    cuts = [start, *(int(e) for e in edges if start < e < stop), stop]
    pieces = _plan.compute(*(array[a:b] for a, b in zip(cuts[:-1], cuts[1:])), **compute_options)
    return [(a, np.asarray(piece)) for a, piece in zip(cuts[:-1], pieces)]


#: Largest dask block (bytes of input) that :meth:`Volume.to_dask` makes of a
#: zarr array by grouping its chunks.
DASK_BLOCK_BYTES = 16 * 2**20


def dask_chunks(shape, chunks, itemsize, limit=None):
    """Dask block shape for a zarr array: whole groups of its chunks, up to `limit` bytes.

    zarr reads each call's chunks concurrently, but every call costs a round
    trip through its I/O thread; one task per 1 MiB chunk spends more on those
    trips than on decoding. Blocks grow from the last axis (whole rows of
    chunks first, then whole planes), by whole chunks, while they fit `limit`
    (:data:`DASK_BLOCK_BYTES`); the first axis keeps the chunk depth, so that
    slabs still start on chunk boundaries.
    """
    limit = DASK_BLOCK_BYTES if limit is None else limit
    block = [min(int(c), int(n)) for c, n in zip(chunks, shape)]
    for axis in range(len(shape) - 1, 0, -1):
        others = int(np.prod(block)) // block[axis] * itemsize
        fit = max(1, limit // max(1, others)) // block[axis]
        if fit <= 1:
            break
        block[axis] = min(int(shape[axis]), block[axis] * fit)
        if block[axis] < shape[axis]:
            break
    return tuple(block)


def _deliver(data, backend):
    """`data` (a NumPy or CuPy array) as an array of `backend`; NumPy by default."""
    if backend is None or not backend.is_gpu:
        return _backend.to_numpy(data)
    return backend.to_device(data)


def _describe(X):
    shape = getattr(X, "shape", None)
    dtype = getattr(X, "dtype", None)
    return f"{type(X).__name__} of shape {shape} and dtype {dtype}"


def as_volume(X, *, name="X"):
    """Wrap one array as a :class:`Volume`, checking dimensionality and size.

    Raises
    ------
    TypeError
        If `X` is not array-like.
    ValueError
        If `X` is not 2D or 3D, or has an empty axis.
    """
    if isinstance(X, zarr.Array):
        kind = "zarr"
    elif is_dask_array(X):
        kind = "dask"
    elif _backend.is_device_array(X):
        kind = "cupy"
    elif isinstance(X, np.ndarray):
        kind = "numpy"
    elif hasattr(X, "__array__") and hasattr(X, "shape"):
        X = np.asarray(X)
        kind = "numpy"
    else:
        raise TypeError(
            f"{name} must be a NumPy, zarr or dask array (or a CuPy array on a GPU), or a list "
            f"of them, one per crop; got {type(X).__name__}."
        )
    ndim = len(X.shape)
    if ndim not in (2, 3):
        hint = (
            " For a multi-channel or time-lapse stack, select one channel/time point first."
            if ndim > 3
            else ""
        )
        raise ValueError(
            f"{name} must be a 2D image (Y, X) or a 3D volume (Z, Y, X); got a {ndim}D "
            f"{_describe(X)}.{hint}"
        )
    if any(int(s) == 0 for s in X.shape):
        raise ValueError(f"{name} is empty: {_describe(X)} has a zero-sized axis.")
    return Volume(array=X, kind=kind, is_2d=ndim == 2, name=name)


def as_volumes(X, *, name="X"):
    """Wrap `X` (one array or a list of crops) as a list of volumes.

    Returns
    -------
    volumes : list of Volume
    is_list : bool
        Whether `X` was a list; outputs follow the same form.
    """
    if is_volume_list(X):
        if len(X) == 0:
            raise ValueError(f"{name} is an empty list: pass at least one image or volume.")
        volumes = [as_volume(x, name=f"{name}[{i}]") for i, x in enumerate(X)]
        return volumes, True
    return [as_volume(X, name=name)], False
