"""The mixture's posterior: per-slice lookup tables applied to every voxel.

Each slice's MAP particle fraction turns the fitted PMFs into a 256-entry
posterior table (:mod:`nanoseg._model`), and the posterior of a voxel is its
slice's table at its intensity (bin). Three ways to run it:

* in memory (NumPy): slabs of whole planes looked up on threads, into one
  output array;
* on a GPU: slabs copied there and back on several streams, or a CuPy
  volume looked up where it is;
* lazily (zarr, dask): a dask graph. On the CPU the slice weights are part
  of the graph (:func:`one_pass_posterior`): each chunk feeds its slice's
  histogram and the lookup, so computing any part of the posterior reads its
  chunks once.

With a `threshold`, boolean tables (each entry the comparison the float
posterior would make) give the mask ``posterior >= threshold`` directly: no
float voxel is ever written.

The functions take the fitted estimator itself as `model`.
"""

from __future__ import annotations

import threading

import numpy as np
from tqdm import tqdm

from .. import _handoff as handoff
from .. import _model
from .._backend import CPU, to_numpy
from .._model import mirror
from .._ops.histogram import slice_histograms as _slice_histograms
from .._ops.lookup import apply_luts, lookup_into, to_bins
from .._plan import HISTOGRAM_BYTES_PER_VOXEL, POSTERIOR_BYTES_PER_VOXEL, mapping_bytes, ordered_map, slab_depth
from .._validation import check_beta_prior
from .._volume import dask_chunks, is_lazy
from .._zarr_chunks import ChunkFiles, PerThreadState
from .fit import fitted_binning


def _dark(model):
    return model.polarity == "dark"


def slice_histograms(model, volume, desc, backend, n_jobs):
    """The histogram of every slice of `volume`, by the fitted bins: (Z, 256) int64."""
    binning = fitted_binning(model)
    maps = not binning.is_identity
    depth = slab_depth(
        volume, HISTOGRAM_BYTES_PER_VOXEL + mapping_bytes(volume, maps),
        memory_budget=model.memory_budget, n_in_flight=n_jobs, verbose=model.verbose, what="histograms",
    )

    def histograms(group):
        with backend.stream():
            slab = to_bins(backend, volume.read(int(group[0]), int(group[-1]) + 1, backend), binning)
            return backend.to_host(_slice_histograms(backend, slab))

    parts = []
    with tqdm(total=volume.shape[0], desc=desc, unit="slice", disable=not model.verbose) as bar:
        for hists in ordered_map(histograms, volume.slabs(depth), n_jobs):
            parts.append(hists)
            bar.update(len(hists))
    return np.concatenate(parts)


def slice_weights(model, hists):
    """MAP particle fraction of each slice with histograms `hists` (by bin)."""
    # The MAP objective sums over intensities: evaluate it in model space,
    # where its terms come in the same order for either polarity.
    dark = _dark(model)
    return _model.map_slice_weights(
        mirror(hists, dark), mirror(model.particle_pmf_, dark), mirror(model.background_pmf_, dark),
        check_beta_prior(model.beta_prior), model.eps,
    )


def posterior(model, volume, backend, n_jobs, hists=None, threshold=None):
    """The posterior of one volume, or with a `threshold` its mask ``posterior >= threshold``.

    `hists` are the volume's slice histograms when already known (from the
    fit); otherwise they are counted first, or, for a lazy volume, inside
    the graph. `backend` is a GPU only for CuPy volumes: host volumes are
    looked up on the host (see ``NanoparticleMixture._posterior_of``).
    """
    binning = fitted_binning(model)
    maps = volume.dtype != np.uint8 or not binning.is_identity
    if is_lazy(volume.array) and hists is None:
        # The slice weights are computed inside the graph from the chunks
        # the lookup reads anyway: one pass over the input, not two.
        tables = SliceTables(
            mirror(model.particle_pmf_, _dark(model)), mirror(model.background_pmf_, _dark(model)),
            check_beta_prior(model.beta_prior), model.eps, model.posterior_dtype, _dark(model), threshold,
        )
        mapped = binning if maps else None
        out = one_pass_graph(volume, tables, mapped)
        if threshold is None:
            handoff.attach(
                out,
                mask_at=MaskAt(one_pass_graph, volume, tables, mapped),
                posterior_at=PosteriorAt(volume, tables, mapped),
            )
        return volume.restore(out)
    if hists is None:
        hists = slice_histograms(model, volume, "Slice weights", backend, n_jobs)
    weights = slice_weights(model, hists)
    luts = model.posterior_luts(weights)
    if threshold is not None:
        luts = luts >= threshold
    if is_lazy(volume.array):
        mapped = binning if maps else None
        out = lookup_graph(volume, luts, mapped)
        if threshold is None:
            handoff.attach(
                out,
                mask_at=MaskAt(lookup_graph, volume, luts, mapped),
                posterior_at=PosteriorAt(volume, luts, mapped),
                slice_weights=weights,
            )
        return volume.restore(out)
    if volume.kind == "cupy":
        # Already on the GPU: one lookup over the whole volume, no copies
        # (but the mapped volume, for 16-bit data).
        tables = backend.to_device(luts)
        slab = to_bins(backend, volume.read(0, volume.shape[0], backend), binning)
        return volume.restore(apply_luts(backend, slab, tables))
    return volume.restore(_posterior_in_memory(model, volume, n_jobs, luts, binning, maps))


def _posterior_in_memory(model, volume, n_jobs, luts, binning, maps):
    """Look a NumPy volume up slab by slab, on threads."""
    out = np.empty(volume.shape, dtype=luts.dtype)
    depth = slab_depth(
        volume, POSTERIOR_BYTES_PER_VOXEL + mapping_bytes(volume, maps),
        memory_budget=model.memory_budget, n_in_flight=n_jobs, verbose=model.verbose, what="posterior",
    )

    def lookup(group):
        start, stop = int(group[0]), int(group[-1]) + 1
        slab = to_bins(CPU, volume.read(start, stop), binning)
        apply_luts(CPU, slab, luts[start:stop], out=out[start:stop])

    for _ in ordered_map(lookup, volume.slabs(depth), n_jobs):
        pass
    return out


class MaskAt:
    """``mask_at(threshold)``: a lazy posterior's mask ``posterior >= threshold``, looked up directly.

    A lazy posterior hands one on (:mod:`nanoseg._handoff`), so that a labeler
    thresholding it asks for boolean tables instead (see
    :meth:`NanoparticleMixture.predict`): the same voxels, without making
    the float posterior. It holds the tables the posterior was made with,
    so changing or refitting the mixture afterwards does not change it.
    """

    def __init__(self, build, source, tables, binning):
        self._build = build
        self._source = source
        self._tables = tables
        self._binning = binning

    def _tables_at(self, threshold):
        tables = self._tables
        if isinstance(tables, SliceTables):
            return tables.at(threshold)
        return tables >= threshold  # as SliceTables thresholds, in the tables' dtype

    def __call__(self, threshold):
        return self._build(self._source, self._tables_at(threshold), binning=self._binning)

    def planes(self, threshold):
        """The same mask read without dask: ``planes(threshold)[lo:hi]`` gives
        planes ``lo:hi`` as a NumPy array, decoded and looked up straight from
        the chunk files (:class:`LookedUpChunks`); None where the graph is
        not made that way.

        A dask computation of a few planes costs some milliseconds of graph
        work in the calling process (a quarter of the labelling's thread
        time at 0.54 Gvoxel): the labeller reads the planes this way
        instead when dask's scheduler runs in its own process (threads or
        sync), and leaves them to the workers of a distributed client.
        """
        whole_slices = self._build is one_pass_graph
        return _chunk_file_reader(self._source, self._tables_at(threshold), self._binning, whole_slices)


class PosteriorAt:
    """``posterior_at(start, stop, flat)``: a lazy posterior's values at a few voxels of planes ``start:stop``.

    A lazy posterior hands one on (:mod:`nanoseg._handoff`), so that
    measuring particles (:func:`nanoseg.measure.particle_table`) looks up
    only the particle voxels' values instead of computing the posterior of
    every voxel. The values are those of the posterior itself: the same
    tables, looked up in the same dtype.
    """

    def __init__(self, source, tables, binning):
        self.source = source
        self._tables = tables
        self._binning = binning

    def __call__(self, start, stop, flat, raw=None):
        """Values at the flat indices `flat` into planes ``start:stop``.

        Parameters
        ----------
        raw : ndarray, optional
            Planes ``start:stop`` of the posterior's input, when already read.
        """
        if raw is None:
            raw = self.source.read(start, stop)
        raw = raw.reshape(stop - start, -1)
        tables = self._tables
        if isinstance(tables, SliceTables):
            # Whole planes: their histograms give their tables, as in the graph.
            tables = tables(block_histograms(raw, self._binning)[:, 0, 0])
        else:
            tables = tables[start:stop]
        planes, within = np.divmod(flat, raw.shape[1])
        values = raw[planes, within]
        if self._binning is not None:
            values = to_bins(CPU, values, self._binning)
        return tables[planes, values]

    def planes(self):
        """The whole posterior read without dask: ``planes()[lo:hi]`` gives
        planes ``lo:hi`` as a NumPy array, decoded and looked up straight from
        the chunk files (:class:`LookedUpChunks`); None where the graph is
        not made that way. Writing a posterior to zarr reads it this way when
        this process would compute it (see :func:`nanoseg._zarr_store.write_slabs`).
        """
        whole_slices = isinstance(self._tables, SliceTables)
        return _chunk_file_reader(self.source, self._tables, self._binning, whole_slices)


def apply_luts_block(block, luts, binning=None):
    """Look one chunk up (mapped to bins first when a `binning` is given)."""
    block = to_numpy(block)
    if binning is not None:
        block = to_bins(CPU, block, binning)
    return apply_luts(CPU, block, luts)


class LookedUpChunks(PerThreadState):
    """A local zarr volume's chunk files seen through per-slice tables, for :func:`dask.array.from_array`.

    With the tables known (an array of them, one per slice), reading a block
    decodes each chunk into a reused buffer and looks it up from there into
    the block (:func:`~nanoseg._ops.lookup.lookup_into`): one task per
    block, and no decoded copy of the input is made. With a
    :class:`SliceTables` instead, blocks must hold whole slices: each is
    decoded into a reused per-thread buffer, its slices' histograms give
    their tables, and the lookup follows, all in one task.
    """

    def __init__(self, files, luts):
        self.files = files
        self.luts = luts
        self.shape = files.shape
        self.ndim = files.ndim
        self.dtype = luts.dtype
        self._local = threading.local()

    def __getitem__(self, key):
        region = self.files.region_of(key)
        if region is None:
            raise IndexError(f"only plain slices of whole blocks are read; got {key!r}")
        if isinstance(self.luts, SliceTables):
            return self._read_whole_slices(region)
        tables = self.luts[region[0][0] : region[0][1]]

        def look_up(values, out, where):
            lookup_into(values, tables[where[0]], out[where])

        return self.files.read(region, convert=look_up, dtype=self.dtype)

    def _read_whole_slices(self, region):
        if any((a, b) != (0, n) for (a, b), n in zip(region[1:], self.shape[1:])):
            raise IndexError("blocks looked up with tables from their own histograms must hold whole slices")
        shape = tuple(b - a for a, b in region)
        size = int(np.prod(shape))
        buffer = getattr(self._local, "block", None)
        if buffer is None or buffer.size < size:
            buffer = self._local.block = np.empty(size, dtype=self.files.dtype)
        block = self.files.read(region, out=buffer[:size].reshape(shape))
        luts = self.luts(_slice_histograms(CPU, block))
        return apply_luts(CPU, block, luts)


def _chunk_file_reader(volume, tables, binning, whole_slices):
    """:class:`LookedUpChunks` of a lazy uint8 `volume` read from chunk files, or
    None where that does not apply: other readers, mapped (binned) data, 2D
    images, or, with `whole_slices`, dask blocks that would not hold whole
    slices."""
    reader = volume.reader
    if binning is not None or not isinstance(reader, ChunkFiles) or volume.is_2d:
        return None
    chunks = dask_chunks(reader.shape, reader.chunks, reader.dtype.itemsize)
    if whole_slices and tuple(chunks[1:]) != tuple(reader.shape[1:]):
        return None
    return LookedUpChunks(reader, tables)


def _chunk_file_graph(volume, tables, binning, whole_slices):
    """The lookup of a lazy uint8 `volume` read from chunk files, one task per block
    (:class:`LookedUpChunks`), or None where that does not apply (see
    :func:`_chunk_file_reader`)."""
    import dask.array as da
    from dask.base import tokenize

    looked_up = _chunk_file_reader(volume, tables, binning, whole_slices)
    if looked_up is None:
        return None
    reader = volume.reader
    chunks = dask_chunks(reader.shape, reader.chunks, reader.dtype.itemsize)
    prefix = "nanoseg-one-pass-" if whole_slices else "nanoseg-lookup-"
    name = prefix + tokenize(str(reader.root), reader.shape, chunks, tables)
    return da.from_array(looked_up, chunks=chunks, name=name, lock=False, fancy=False)


def lookup_graph(volume, luts, binning=None):
    """Lazy per-slice lookup of a lazy `volume` (3D view; restore it after).

    uint8 volumes read from chunk files are decoded and looked up in one
    task per block (:class:`LookedUpChunks`); anything else by
    :func:`lazy_posterior`.
    """
    graph = _chunk_file_graph(volume, luts, binning, whole_slices=False)
    return lazy_posterior(volume.to_dask(), luts, binning) if graph is None else graph


def one_pass_graph(volume, tables, binning=None):
    """Lazy posterior of a lazy `volume` (3D view) whose slice weights are part of the graph.

    A uint8 volume read from chunk files, in blocks of whole slices, is
    decoded, counted and looked up in one task per block
    (:class:`LookedUpChunks`); anything else by :func:`one_pass_posterior`.
    """
    graph = _chunk_file_graph(volume, tables, binning, whole_slices=True)
    return one_pass_posterior(volume.to_dask(), tables, binning) if graph is None else graph


def lazy_posterior(source, luts, binning=None):
    """Lazy per-slice lookup: one task per input chunk.

    With a `binning`, each chunk is mapped to bins in its own task, so the
    mapped volume never exists as a whole.
    """
    import dask.array as da

    tables = da.from_array(luts, chunks=(source.chunks[0], luts.shape[1]))
    options = {} if binning is None else {"binning": binning}
    return da.blockwise(
        apply_luts_block, "zyx", source, "zyx", tables, "zv",
        dtype=luts.dtype, concatenate=True, **options,
    )


class SliceTables:
    """Posterior lookup tables from slice histograms, as a small picklable callable.

    Gives exactly the fitted mixture's ``posterior_luts`` of the slices' MAP weights
    (or, with a `threshold`, those tables ``>= threshold``):
    each slice's MAP weight depends on its own histogram only, so tables
    computed for a few slices at a time equal those computed for all at once.
    The PMFs are stored in model space (mirrored for dark particles).
    """

    def __init__(self, particle_pmf, background_pmf, beta_prior, eps, dtype, dark, threshold=None):
        self.particle_pmf = particle_pmf
        self.background_pmf = background_pmf
        self.beta_prior = beta_prior
        self.eps = eps
        self.posterior_dtype = np.dtype(dtype)
        self.dark = dark
        self.threshold = threshold

    @property
    def dtype(self):
        """The tables' dtype: the posterior's, or bool once thresholded."""
        return self.posterior_dtype if self.threshold is None else np.dtype(bool)

    def __call__(self, hists):
        weights = _model.map_slice_weights(
            mirror(hists, self.dark), self.particle_pmf, self.background_pmf, self.beta_prior, self.eps
        )
        luts = _model.posterior_luts(
            weights, mirror(self.particle_pmf, self.dark), mirror(self.background_pmf, self.dark), self.eps,
            dtype=self.posterior_dtype,
        )
        return luts if self.threshold is None else luts >= self.threshold

    def at(self, threshold):
        """These tables thresholded at `threshold` (boolean tables)."""
        return SliceTables(
            self.particle_pmf, self.background_pmf, self.beta_prior, self.eps, self.posterior_dtype, self.dark,
            threshold,
        )

    def __dask_tokenize__(self):
        return (
            "nanoseg-slice-tables", self.particle_pmf.tobytes(), self.background_pmf.tobytes(),
            tuple(self.beta_prior), self.eps, str(self.posterior_dtype), self.dark, self.threshold,
        )


def block_histograms(block, binning=None):
    """(n, 1, 1, 256) histograms of the slices of one (n, y, x) chunk, in bins."""
    block = to_numpy(block)
    if binning is not None:
        block = to_bins(CPU, block, binning)
    return _slice_histograms(CPU, np.ascontiguousarray(block))[:, None, None, :]


def one_pass_posterior(source, tables, binning=None):
    """Lazy posterior whose slice weights are part of the graph.

    Each input chunk feeds two tasks: a histogram of its part of each slice,
    summed over the slice's chunks into the slice's histogram, then turned
    into the slices' lookup tables by `tables`; and the lookup itself. In
    one computation dask reads each chunk once and frees it when both are
    done, so any part of the posterior costs one read of the chunks it
    covers (whole slices for the histograms) and memory stays per chunk.
    """
    import dask.array as da

    options = {} if binning is None else {"binning": binning}
    partial = da.blockwise(
        block_histograms, "zyxv", source, "zyx", new_axes={"v": _model.N_BINS},
        adjust_chunks={"y": 1, "x": 1}, dtype=np.int64, **options,
    )
    hists = partial.sum(axis=(1, 2), dtype=np.int64)
    luts = hists.map_blocks(tables, dtype=tables.dtype)
    return da.blockwise(
        apply_luts_block, "zyx", source, "zyx", luts, "zv",
        dtype=tables.dtype, concatenate=True, **options,
    )

