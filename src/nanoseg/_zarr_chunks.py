"""Chunk files of local zarr arrays, read and written without zarr's I/O machinery.

zarr reads and writes every chunk through its asyncio event loop and worker
threads. On the 2-core machine of ``benchmarks/`` that costs about 1 ms a
chunk whatever its size, more than decoding a 1 MiB zstd chunk, and writing
copies each chunk of a multi-chunk selection into a freshly allocated buffer
(see "Reading and writing chunk files" in benchmarks/RESULTS.md). For the
common case -- an array in a local directory store, regular chunks, no
sharding, and a plain bytes serialiser followed by at most one compressor --
a chunk is simply a file holding the compressed C-order bytes of the whole
(edge-padded) chunk, so it is read with one file read and one ``numcodecs``
call, straight into a reused per-thread buffer.

:func:`chunk_files` says whether an array qualifies; anything else (other
stores, sharding, transposition, checksums, filters, big-endian data,
F order) keeps going through zarr, with the same values.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import uuid
from pathlib import Path

import numpy as np

#: Compressors decoded here, by zarr 3 codec class name, as numcodecs codecs.
_V3_COMPRESSORS = {"ZstdCodec": "zstd", "BloscCodec": "blosc", "GzipCodec": "gzip"}


def _numcodecs_decoder(codec):
    """A numcodecs codec that decodes what zarr 3 `codec` encoded, or None."""
    import numcodecs

    kind = _V3_COMPRESSORS.get(type(codec).__name__)
    if kind == "zstd":
        return numcodecs.Zstd(level=int(codec.level), checksum=bool(codec.checksum))
    if kind == "blosc":
        return numcodecs.Blosc()  # blosc frames carry their own settings
    if kind == "gzip":
        return numcodecs.GZip(level=int(codec.level))
    return None


def _codecs_of(array):
    """``(compressor,)`` for a qualifying array, or None.

    The compressor is a numcodecs codec (None for uncompressed chunks).
    """
    metadata = array.metadata
    dtype = np.dtype(array.dtype)
    if dtype.kind not in "biuf" or dtype.hasobject:
        return None
    little = dtype.itemsize == 1 or dtype.byteorder == "<" or (dtype.byteorder == "=" and sys.byteorder == "little")
    if metadata.zarr_format == 2:
        if metadata.filters or metadata.order != "C" or not little:
            return None
        return (metadata.compressor,)
    codecs = tuple(metadata.codecs)
    if not codecs or type(codecs[0]).__name__ != "BytesCodec":
        return None
    endian = getattr(codecs[0], "endian", None)
    endian = getattr(endian, "value", endian)
    if endian not in (None, sys.byteorder) or not little:
        return None
    if len(codecs) == 1:
        return (None,)
    if len(codecs) > 2:
        return None
    decoder = _numcodecs_decoder(codecs[1])
    return None if decoder is None else (decoder,)


class PerThreadState:
    """Mixin: per-thread buffers in ``self._local`` (a ``threading.local``), left out when pickled.

    Objects that travel to ``dask.distributed`` workers inside a graph
    rebuild their buffers there, on first use.
    """

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_local", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()


class ChunkFiles(PerThreadState):
    """Direct reads (and writes of whole chunks) of a local zarr array's chunk files.

    Build one with :func:`chunk_files`. Indexing with a tuple of slices
    (step 1) reads like the zarr array does; anything else is passed to the
    zarr array. It has ``shape``, ``dtype``, ``ndim`` and ``chunks``, so
    :func:`dask.array.from_array` takes it, and it pickles (for
    ``dask.distributed`` workers) without its per-thread buffers.
    """

    def __init__(self, array, root, compressor):
        self.array = array
        self.root = Path(root)
        self.compressor = compressor
        self.shape = tuple(int(n) for n in array.shape)
        self.chunks = tuple(int(c) for c in array.chunks)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)
        self.fill_value = 0 if array.fill_value is None else array.fill_value
        # Whole chunks are encoded here only with the array's own settings.
        self.writable = compressor is None or type(compressor).__name__ == "Zstd" or array.metadata.zarr_format == 2
        self._local = threading.local()

    def __repr__(self):
        return f"ChunkFiles({str(self.root)!r}, shape={self.shape}, chunks={self.chunks}, dtype={self.dtype})"

    # -- reading ------------------------------------------------------------
    def __getitem__(self, key):
        region = self.region_of(key)
        if region is None:
            return self.array[key]
        return self.read(region)

    def region_of(self, key):
        """`key` as ``(start, stop)`` per axis, or None if it is not plain slicing."""
        if not isinstance(key, tuple):
            key = (key,)
        if len(key) > self.ndim or any(not isinstance(k, slice) for k in key):
            return None
        key = key + (slice(None),) * (self.ndim - len(key))
        region = []
        for k, n in zip(key, self.shape):
            start, stop, step = k.indices(n)
            if step != 1:
                return None
            region.append((start, max(start, stop)))
        return region

    def _parts(self, region):
        """The chunks a block ``(start, stop)`` per axis overlaps, and where.

        Yields ``(coords, source, target, whole)``: the chunk's grid
        coordinates, the slices of the chunk and of the block that
        overlap, and whether the block holds the whole chunk. Nothing for
        an empty block.
        """
        if not all(b > a for a, b in region):
            return
        ranges = [range(a // c, (b - 1) // c + 1) for (a, b), c in zip(region, self.chunks)]
        for coords in itertools.product(*ranges):
            source, target, whole = [], [], True
            for index, (a, b), c in zip(coords, region, self.chunks):
                lo, hi = max(a, index * c), min(b, (index + 1) * c)
                source.append(slice(lo - index * c, hi - index * c))
                target.append(slice(lo - a, hi - a))
                whole &= lo == index * c and hi - lo == c
            yield coords, tuple(source), tuple(target), whole

    def _stored_parts(self, region):
        """``(target, values)`` for each stored chunk the block overlaps, `values`
        a view of its decoded part; missing chunks (fill value 0) are skipped."""
        self._check_zero_fill()
        for part in self._parts(region):
            found = self._stored_part(part)
            if found is not None:
                yield found

    def _check_zero_fill(self):
        # Skipping missing chunks reads them as 0: only right for fill value 0.
        if self.fill_value != 0:
            raise ValueError("searching stored chunks needs an array whose fill value is 0.")

    def _stored_part(self, part):
        """``(target, values)`` of one part from :meth:`_parts`, decoded into
        this thread's buffer, or None when its chunk is not stored."""
        coords, source, target, _ = part
        try:
            raw = self._path(coords).read_bytes()
        except FileNotFoundError:
            self._check_present()
            return None
        return target, self._decode(raw, self._scratch())[source]

    def _path(self, coords):
        return self.root / self.array.metadata.encode_chunk_key(tuple(coords))

    def _check_present(self):
        """Refuse to read a missing chunk as the fill value when the array's
        whole directory is missing: the array was moved or deleted, or this is
        a ``dask.distributed`` worker that cannot see the client's files."""
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"The zarr array at {str(self.root)!r} is not there on this machine (moved, deleted, or "
                "on a file system this process cannot see): its chunks cannot be read."
            )

    def _scratch(self):
        buffer = getattr(self._local, "chunk", None)
        if buffer is None:
            buffer = self._local.chunk = np.empty(self.chunks, dtype=self.dtype)
        return buffer

    def _decode(self, raw, out):
        """Decode chunk bytes `raw` into the C-contiguous chunk-shaped `out`."""
        if self.compressor is None:
            out.reshape(-1).view(np.uint8)[:] = np.frombuffer(raw, dtype=np.uint8)
        else:
            self.compressor.decode(raw, out=out)
        return out

    def read(self, region, convert=None, dtype=None, out=None):
        """The block ``[start:stop, ...]`` given as ``(start, stop)`` per axis, as a new array.

        With `convert`, each chunk's part is not copied but handed, as a view
        of the buffer it was decoded into, to ``convert(values, out, where)``,
        which writes what it makes of it into ``out[where]`` (an array of
        `dtype`); a missing chunk comes as an array of the fill value. With
        `out` (an array of the block's shape), the block is read into it.
        """
        shape = tuple(b - a for a, b in region)
        if out is None:
            out = np.empty(shape, dtype=self.dtype if dtype is None else dtype)
        elif out.shape != shape:
            raise ValueError(f"out has shape {out.shape}; the block's is {shape}.")
        if out.size == 0:
            return out
        for coords, source, target, whole in self._parts(region):
            try:
                raw = self._path(coords).read_bytes()
            except FileNotFoundError:
                self._check_present()
                if convert is None:
                    out[target] = self.fill_value
                else:
                    shape = tuple(t.stop - t.start for t in target)
                    convert(np.full(shape, self.fill_value, dtype=self.dtype), out, target)
                continue
            if convert is not None:
                convert(self._decode(raw, self._scratch())[source], out, target)
                continue
            destination = out[target]
            if whole and destination.flags.c_contiguous:
                self._decode(raw, destination)
            else:
                out[target] = self._decode(raw, self._scratch())[source]
        return out

    def nonzero(self, region):
        """The non-zero elements of the block ``[start:stop, ...]`` (``(start, stop)`` per axis).

        Only the chunk files that exist are read (a missing chunk holds the
        fill value, which must be 0), each decoded into a reused buffer and
        searched there: no dense block is made.

        Returns
        -------
        flat : (n,) int64
            Sorted flat indices into the block.
        values : (n,) array
            The elements there.
        """
        shape = tuple(b - a for a, b in region)
        found_flat, found_values = [], []
        for target, part in self._stored_parts(region):
            # One scan for the flat positions (much faster than np.nonzero's
            # one array per axis), then their coordinates in the block.
            local = np.flatnonzero(part)
            if local.size:
                coordinates = np.unravel_index(local, part.shape)
                found_values.append(part[coordinates])
                found_flat.append(np.ravel_multi_index(tuple(c + t.start for c, t in zip(coordinates, target)), shape))
        if not found_flat:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=self.dtype)
        flat, values = np.concatenate(found_flat), np.concatenate(found_values)
        order = np.argsort(flat, kind="stable")
        return flat[order], values[order]

    def count_nonzero_planes(self, n_jobs=1):
        """(shape[0],) int64: the non-zero elements of each plane (index along the first axis).

        Only the chunk files that exist are read (a missing chunk holds the
        fill value, which must be 0), on `n_jobs` threads; each chunk is
        counted where it was decoded.
        """
        from ._plan import ordered_map

        def count(part):
            found = self._stored_part(part)
            if found is None:
                return None
            target, values = found
            # Plane by plane: NumPy's count along an axis goes through a
            # boolean sum, about 5x slower than its whole-array count.
            return target[0], [np.count_nonzero(plane) for plane in values]

        self._check_zero_fill()
        counts = np.zeros(self.shape[0], dtype=np.int64)
        for found in ordered_map(count, self._parts([(0, n) for n in self.shape]), n_jobs):
            if found is not None:
                counts[found[0]] += found[1]
        return counts

    # -- writing ------------------------------------------------------------
    def write(self, start, data):
        """Write `data` as the planes ``start:start + len(data)`` of a new array.

        Chunks `data` covers wholly (or up to the array's edge) are encoded
        here; all-zero ones are not written, since a new array reads them as
        its fill value 0. A chunk `data` covers only in part is left to zarr,
        which merges it with what is stored.
        """
        stop = start + data.shape[0]
        partial = []
        first, last = start // self.chunks[0], (stop - 1) // self.chunks[0]
        ranges = [range(first, last + 1)] + [range(-(-n // c)) for n, c in zip(self.shape[1:], self.chunks[1:])]
        for coords in itertools.product(*ranges):
            lo = [index * c for index, c in zip(coords, self.chunks)]
            hi = [min(a + c, n) for a, c, n in zip(lo, self.chunks, self.shape)]
            region = (slice(lo[0] - start, hi[0] - start), *(slice(a, b) for a, b in zip(lo[1:], hi[1:])))
            if lo[0] < start or hi[0] > stop:
                partial.append((coords, region))
                continue
            block = data[region]
            if self._is_fill(block):
                continue
            if self.writable:
                self._write_chunk(coords, block)
            else:
                partial.append((coords, region))
        for coords, region in partial:
            lo0 = max(region[0].start, 0)
            hi0 = min(region[0].stop, data.shape[0])
            block = data[(slice(lo0, hi0), *region[1:])]
            if not self._is_fill(block):
                self.array[(slice(lo0 + start, hi0 + start), *region[1:])] = block

    def _is_fill(self, block):
        if self.fill_value == 0:
            if block.dtype.kind == "f" and block.dtype.itemsize in (2, 4, 8):
                # Tested on the bits: NumPy's any() converts float16 values
                # one by one (1.7 ms a 1024 x 1024 chunk, 20x the bit test,
                # most of the time of writing a posterior after encoding).
                # A chunk of -0.0 (bits not zero) is written, not dropped.
                return not block.view(f"u{block.dtype.itemsize}").any()
            return not block.any()
        return bool((block == self.fill_value).all())

    def write_sparse(self, start, stop, flat, values):
        """Write planes ``start:stop`` of a new array given only their non-zero voxels.

        Parameters
        ----------
        start, stop : int
            The planes, starting on a chunk boundary and ending on one or at
            the array's end.
        flat : (n,) int array
            Flat indices of the voxels into an array of shape
            ``(stop - start, *shape[1:])``.
        values : (n,) array
            Their non-zero values.

        Each chunk holding some of the voxels is filled in a reused zeroed
        buffer, encoded and written; the others are not written. No dense
        slab is ever made, so writing touches no fresh memory.
        """
        if not self.writable or self.fill_value != 0:
            raise ValueError("write_sparse needs a zstd or uncompressed array whose fill value is 0.")
        if start % self.chunks[0] or (stop % self.chunks[0] and stop != self.shape[0]):
            raise ValueError(f"planes {start}:{stop} do not start and end on chunk boundaries {self.chunks[0]}.")
        flat = np.asarray(flat, dtype=np.int64)
        if flat.size == 0:
            return
        coords = np.unravel_index(flat, (stop - start, *self.shape[1:]))
        coords = (coords[0] + start, *coords[1:])
        grid = [-(-n // c) for n, c in zip(self.shape, self.chunks)]
        chunk_ids = np.ravel_multi_index(tuple(c // size for c, size in zip(coords, self.chunks)), grid)
        order = np.argsort(chunk_ids, kind="stable")
        chunk_ids = chunk_ids[order]
        local = [(c % size)[order] for c, size in zip(coords, self.chunks)]
        values = np.asarray(values)[order]
        cuts = np.flatnonzero(np.diff(chunk_ids)) + 1
        chunk = self._zeroed()
        for lo, hi in zip([0, *cuts], [*cuts, chunk_ids.size]):
            where = tuple(axis[lo:hi] for axis in local)
            chunk[where] = values[lo:hi]
            try:
                self._store(np.unravel_index(int(chunk_ids[lo]), grid), chunk)
            finally:
                chunk[where] = 0  # the buffer is all zero again for the next chunk

    def _zeroed(self):
        buffer = getattr(self._local, "zeroed", None)
        if buffer is None:
            buffer = self._local.zeroed = np.zeros(self.chunks, dtype=self.dtype)
        return buffer

    def _write_chunk(self, coords, block):
        chunk = self._scratch()
        if block.shape != chunk.shape:  # an edge chunk is stored padded
            chunk[...] = self.fill_value
        chunk[tuple(slice(0, s) for s in block.shape)] = block
        self._store(coords, chunk)

    def _store(self, coords, chunk):
        """Encode the chunk-shaped C-contiguous `chunk` and write it as chunk `coords`."""
        encoded = chunk.tobytes() if self.compressor is None else self.compressor.encode(chunk)
        path = self._path(coords)
        # Each thread makes a chunk's folder once (a mkdir call per chunk
        # took 3 % of writing a posterior).
        made = getattr(self._local, "folders", None)
        if made is None:
            made = self._local.folders = set()
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        # Written aside and renamed, so that a reader never sees half a chunk.
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
        with open(temporary, "wb") as handle:
            handle.write(encoded)
        os.replace(temporary, path)


def chunk_files(array):
    """:class:`ChunkFiles` over a zarr array, or None when it does not qualify.

    Qualifying arrays live in a local directory store, have regular chunks,
    no sharding, transposition, checksum or filter codec, C order and
    little-endian (or single-byte) numbers, and are uncompressed or
    compressed with zstd, blosc or gzip.
    """
    import zarr

    if not isinstance(array, zarr.Array):
        return None
    root = getattr(array.store, "root", None)
    if root is None or type(array.metadata.chunk_grid).__name__ != "RegularChunkGrid":
        return None
    codecs = _codecs_of(array)
    if codecs is None:
        return None
    return ChunkFiles(array, Path(root) / array.path if array.path else Path(root), codecs[0])
