"""Exact connected-component labelling of a thresholded volume, slab by slab.

The volume is cut along Z into slabs of whole planes. Each slab is
thresholded and closed with a halo of ``2 * radius`` slices on each side (the
dilation needs ``radius`` slices beyond the slab, the erosion ``radius``
more), so the closed mask inside the slab equals the whole-volume closing.
Components are labelled per slab, then merged across slab faces with a
union-find over the face voxel pairs that the connectivity joins. Component
sizes are summed across slabs, small components dropped, and the survivors
numbered 1..K in the order of their first voxel in raster (Z, Y, X) order --
the order a whole-volume :func:`scipy.ndimage.label` or
:func:`skimage.measure.label` gives -- so the labels are identical to
whole-volume labelling followed by size filtering and sequential relabelling.

Only per-slab face planes and the components that may still become
particles are kept between slabs (those touching a neighbour across a face,
and the others of at least ``min_size`` voxels: see
:mod:`nanoseg._engine.merge`), so memory grows with the particles, not with
every speck found.

On a GPU each slab is closed and labelled densely with ``cupyx.scipy.ndimage``
(same border handling as SciPy), its labels are renumbered in raster order,
and only the slab's foreground voxels come back to the host, where the same
merging runs: the labels are identical to the CPU's.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from .. import _handoff as handoff
from .._backend import get_backend, to_numpy
from .._ops.components import face_touches, label_mask, label_set, label_voxels
from .._ops.morphology import close_mask, close_set, footprint
from .._ops.threshold import threshold_probabilities
from .._plan import (
    LABEL_BYTES_PER_VOXEL, computed_here, distributed_client, ordered_map, release_free_memory, scheduler_of,
)
from .._validation import check_probabilities
from .graph_windows import GraphWindows
from .merge import ComponentMerger

#: Bytes of sparse slab labels a lazy labelling keeps from its analysis pass
#: (12 bytes per foreground voxel: 256 MiB is 22 million particle voxels).
#: Under a distributed client every slab's labels are kept, on the workers.
KEPT_LABEL_BYTES = 256 * 2**20

#: Foreground fraction of a slab up to which closing and labelling run on
#: voxel sets instead of dense arrays. Measured (benchmarks/bench_components.py):
#: the voxel-set path is about 5x faster at 2 % and still 1.4-1.7x faster at
#: 10 %, and it needs less memory (12 bytes per foreground voxel plus one byte
#: per voxel, against about 6 bytes per voxel densely).
SPARSE_MAX_FRACTION = 0.10


def mask_from_posterior(data, threshold, name="X", check=True):
    """Threshold a posterior block (``>= threshold``); a boolean block is used as is.

    With `check`, the block's values are validated first (for inputs that
    were not validated whole, i.e. zarr and dask arrays).
    """
    if data.dtype == bool:
        return data
    if not check:
        return data >= threshold
    mask, valid = threshold_probabilities(data, threshold)
    if not valid:
        check_probabilities(data, name)  # raises, saying what is wrong
    return mask


#: Largest slab (in voxels) labelled on a GPU: cupyx labels with 32-bit indices.
GPU_MAX_SLAB_VOXELS = 2**31 - 1


def face_offsets(connectivity):
    """In-plane (dy, dx) offsets that join voxels of two adjacent planes.

    With scikit-image connectivity ``c`` (at most ``c`` coordinates may differ),
    the step across the face uses one, leaving ``c - 1`` for the plane.
    """
    return [
        (dy, dx)
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
        if (dy != 0) + (dx != 0) <= connectivity - 1
    ]


def face_pairs(lower, upper, plane_shape, lower_offset, upper_offset, connectivity):
    """Global id pairs of components touching across a slab face.

    Parameters
    ----------
    lower, upper : (flat, ids)
        Foreground of the last plane of the lower slab and of the first plane
        of the upper slab: sorted flat indices into a plane of `plane_shape`
        and their local labels.
    lower_offset, upper_offset : int
        Added to local labels to make them global.

    Returns
    -------
    pairs : (n, 2) int64 array, unique rows
    """
    (lower_flat, lower_ids), (upper_flat, upper_ids) = lower, upper
    if lower_flat.size == 0 or upper_flat.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    lower_at, upper_at = face_touches(lower_flat, upper_flat, plane_shape, face_offsets(connectivity))
    lower_pair = lower_ids[lower_at].astype(np.int64)
    upper_pair = upper_ids[upper_at].astype(np.int64)
    # Unique (lower, upper) rows, in the order np.unique(axis=0) gives them,
    # from one sort of int64 keys.
    span = int(upper_pair.max()) + 1 if upper_pair.size else 1
    keys = np.unique(lower_pair * span + upper_pair)
    return np.stack([keys // span + lower_offset, keys % span + upper_offset], axis=1)


def plane_of(flat, ids, index, plane_size):
    """The members of plane `index` of a sparse slab, as (flat-in-plane, ids)."""
    lo, hi = np.searchsorted(flat, [index * plane_size, (index + 1) * plane_size])
    return flat[lo:hi] - index * plane_size, ids[lo:hi]


class PlaneCache:
    """Planes of a lazily computed volume, each computed once for all the slabs that read it.

    A slab labelled with a halo reads ``2 * radius`` planes on each side that
    belong to its neighbours; recomputing them would read and look up those
    planes two or three times. Here a plane is computed by the first slab that
    asks for it (other threads asking meanwhile wait for it), handed to each
    reader, and dropped after its last expected read, so at most the planes of
    the slabs in flight are held.

    Parameters
    ----------
    compute : callable
        ``compute(lo, hi)`` gives planes ``lo:hi`` as a NumPy array, or as a
        list of ``(first plane, array)`` pieces (not joined: each plane is
        copied once, into the slab that reads it).
    uses : (Z,) int array
        How many reads each plane will get.
    """

    def __init__(self, compute, uses):
        self._compute = compute
        self._uses = np.array(uses, dtype=np.int64)
        self._planes = {}  # index -> array, or a threading.Event while being computed
        self._lock = threading.Lock()
        self._local = threading.local()

    def _buffer(self, n, plane):
        """This thread's slab buffer, grown to `n` planes like `plane`.

        Reused from slab to slab: a new slab array of fresh memory costs a
        page fault every 4 KiB, which on some virtual machines took as long
        as computing the planes.
        """
        buffer = getattr(self._local, "buffer", None)
        if buffer is None or buffer.shape[0] < n or buffer.shape[1:] != plane.shape or buffer.dtype != plane.dtype:
            buffer = self._local.buffer = np.empty((n, *plane.shape), dtype=plane.dtype)
        return buffer[:n]

    def read(self, lo, hi):
        """Planes ``lo:hi`` as one array, owned by the calling thread until its next read."""
        claimed, pending = [], {}
        with self._lock:
            for z in range(lo, hi):
                entry = self._planes.get(z)
                if entry is None:
                    self._planes[z] = pending[z] = threading.Event()
                    claimed.append(z)
                elif isinstance(entry, threading.Event):
                    pending[z] = entry
        # Compute this reader's own planes first, then wait for the others':
        # no reader waits while holding planes someone else waits for.
        for run in np.split(np.asarray(claimed, dtype=np.int64), np.flatnonzero(np.diff(claimed) != 1) + 1):
            if run.size:
                self._fill(int(run[0]), int(run[-1]) + 1)
        out = None
        with self._lock:
            available = {z: self._planes.get(z) for z in range(lo, hi) if z not in pending}
        for z in range(lo, hi):
            plane = available.get(z)
            if z in pending:
                pending[z].wait()
                with self._lock:
                    plane = self._planes.get(z)
            if plane is None or isinstance(plane, (threading.Event, BaseException)):
                raise RuntimeError(f"plane {z} could not be computed") from (
                    plane if isinstance(plane, BaseException) else None
                )
            if out is None:
                out = self._buffer(hi - lo, plane)
            out[z - lo] = plane
            with self._lock:
                self._uses[z] -= 1
                if self._uses[z] <= 0:
                    self._planes.pop(z, None)
        return out

    def _fill(self, lo, hi):
        try:
            computed = self._compute(lo, hi)
            # Either one array of the planes or (first plane, array) pieces.
            pieces = computed if isinstance(computed, list) else [(lo, computed)]
            planes = {start + k: plane for start, piece in pieces for k, plane in enumerate(np.asarray(piece))}
        except BaseException as exc:
            with self._lock:
                for z in range(lo, hi):
                    event = self._planes[z]
                    self._planes[z] = exc
                    event.set()
            raise
        with self._lock:
            for z in range(lo, hi):
                event = self._planes[z]
                self._planes[z] = planes[z]
                event.set()


@dataclass
class LabelPlan:
    """What the analysis pass learned: enough to label any slab finally.

    ``labelled[i]`` holds slab i's local ids that got a final label and those
    labels (see :class:`~nanoseg._engine.merge.ComponentMerger`); every other
    local id, below the minimum size, maps to 0.
    """

    bounds: list
    offsets: list = field(default_factory=list)
    counts: list = field(default_factory=list)
    labelled: list = field(default_factory=list)
    dtype: np.dtype = np.dtype(np.uint32)
    n_labels: int = 0
    n_voxels: int = 0
    slabs: list = field(default_factory=list)

    def slab_table(self, index):
        """Lookup from slab `index`'s local labels to final labels (0 stays 0)."""
        return dense_lookup(self.compact_table(index))

    def compact_table(self, index):
        """Slab `index`'s lookup as ``(count, local ids, labels)``: what a task
        needs, a few bytes per particle rather than per component."""
        return (self.counts[index], *self.labelled[index])


def dense_lookup(compact):
    """The lookup array (local id -> final label) of a :meth:`LabelPlan.compact_table`."""
    count, local, labels = compact
    lookup = np.zeros(count + 1, dtype=labels.dtype)
    lookup[local] = labels
    return lookup


@dataclass(frozen=True)
class LabelSettings:
    """The labelling hyper-parameters a slab task needs (small, picklable)."""

    threshold: float
    radius: int
    connectivity: int
    is_2d: bool
    device: str = "cpu"
    name: str = "X"


def pack_mask_bits(mask):
    """A boolean dask array with each block's rows packed 8 pixels a byte, or None.

    A mask computed by other processes crosses to the labelling process one
    byte a pixel (dask.distributed does not compress by default); packed, it
    crosses in an eighth of that (:func:`numpy.packbits`, undone by
    :func:`unpack_mask_bits`). Blocks can be packed one by one and joined
    only when every block but the last along X is a whole number of bytes
    wide; otherwise, and for device (CuPy) blocks, None: the mask travels
    as it is.
    """
    if any(width % 8 for width in mask.chunks[-1][:-1]) or not isinstance(mask._meta, np.ndarray):
        return None
    packed_chunks = (*mask.chunks[:-1], tuple((width + 7) // 8 for width in mask.chunks[-1]))
    return mask.map_blocks(
        np.packbits, axis=-1, chunks=packed_chunks, dtype=np.uint8, meta=np.empty((0,) * mask.ndim, np.uint8)
    )


def unpack_mask_bits(packed, width):
    """The boolean mask, `width` pixels wide, of rows packed by :func:`pack_mask_bits`."""
    return np.unpackbits(packed, axis=-1, count=width).view(bool)


def local_labels(settings, mask, start, stop, lo, owned=False):
    """Label slab ``start:stop`` from the thresholded `mask` covering slices ``lo:...``.

    Sparse masks (at most :data:`SPARSE_MAX_FRACTION` foreground) are closed
    and labelled as voxel sets (:func:`~nanoseg._ops.morphology.close_set`, :func:`~nanoseg._ops.components.label_set`); denser ones with
    dense ``ndimage`` operations. Both give identical results.

    Returns
    -------
    flat : (n,) int64
        Sorted flat indices of the slab's labelled voxels, into an array of
        shape ``(stop - start, Y, X)``.
    ids : (n,) int32
        Their local labels, 1..count, numbered in raster order.
    count : int
    """
    backend = get_backend(settings.device)
    if backend.is_gpu:
        return _device_local_labels(backend, settings, mask, start, stop, lo)
    mask = to_numpy(mask)
    work = mask[0] if settings.is_2d else mask
    core = slice(0, 1) if settings.is_2d else slice(start - lo, stop - lo)
    plane_size = work.shape[-1] * work.shape[-2]
    foreground = np.flatnonzero(work)
    if foreground.size <= SPARSE_MAX_FRACTION * work.size:
        closed = foreground
        if settings.radius:
            closed = close_set(
                foreground, work.shape, footprint(settings.radius, work.ndim), mask=work, overwrite=owned
            )
        if not settings.is_2d:
            lo_i, hi_i = np.searchsorted(closed, [core.start * plane_size, core.stop * plane_size])
            closed = closed[lo_i:hi_i] - core.start * plane_size
        core_shape = work.shape if settings.is_2d else (core.stop - core.start, *work.shape[1:])
        ids, count = label_set(closed, core_shape, settings.connectivity)
        return closed, ids, count
    closed = close_mask(backend, work, settings.radius)
    if not settings.is_2d:
        closed = closed[core]
    labels, count = label_mask(backend, closed, settings.connectivity)
    flat = np.flatnonzero(labels)
    return flat, labels.ravel()[flat], count


def _device_local_labels(backend, settings, mask, start, stop, lo):
    """:func:`local_labels` on a GPU: dense closing and labelling of the slab.

    The mask is uploaded (one byte a voxel) unless it is already there; only
    the labelled voxels come back, as (flat, ids) NumPy arrays.
    """
    work = backend.to_device(mask[0] if settings.is_2d else mask)
    if work.size > GPU_MAX_SLAB_VOXELS:
        raise ValueError(
            f"A slab of {work.size} voxels is too large to label on the GPU (at most "
            f"{GPU_MAX_SLAB_VOXELS}); lower memory_budget or use device='cpu'."
        )
    closed = close_mask(backend, work, settings.radius)
    if not settings.is_2d:
        closed = closed[start - lo : stop - lo]
    flat, ids, count = label_voxels(backend, closed, settings.connectivity)
    return backend.to_host(flat), backend.to_host(ids), count


def slab_summary(labelled, depth, plane_size):
    """What the analysis pass needs of one labelled slab: ``(count, sizes,
    first face, last face)``.

    `labelled` is ``(flat, ids, count)`` of a slab `depth` planes deep
    (:func:`local_labels`); `sizes` are its components' voxel counts, and a
    face is the (flat-in-plane, ids) of the labelled voxels of its first or
    last plane.
    """
    flat, ids, count = labelled
    flat = np.asarray(flat, dtype=np.int64)
    sizes = np.bincount(ids, minlength=count + 1)[1:]
    return count, sizes, plane_of(flat, ids, 0, plane_size), plane_of(flat, ids, depth - 1, plane_size)


def _sent_summary(labelled, depth, plane_size):
    """A worker's task: :func:`slab_summary`, its integers narrowed to 32
    bits where they fit (less to send; widened again on arrival)."""
    count, sizes, first, last = slab_summary(labelled, depth, plane_size)
    limit = np.iinfo(np.int32).max
    if sizes.size and sizes.max() < limit:
        sizes = sizes.astype(np.int32)
    if plane_size < limit:
        first, last = ((flat.astype(np.int32), ids) for flat, ids in (first, last))
    return count, sizes, first, last


class KeptOnWorkers:
    """A slab's labelled voxels, ``(flat, ids, count)``, left on the
    distributed worker that found them: `future` (a ``distributed.Future``)."""

    def __init__(self, future):
        self.future = future


class SlabLabeler:
    """Threshold, close and label a :class:`~nanoseg._volume.Volume` by slabs.

    Parameters
    ----------
    volume : Volume
        Posterior probabilities (float) or a boolean mask.
    threshold, radius, connectivity, min_size
        As in :class:`nanoseg.NanoparticleLabeler`.
    budget : int, optional
        Working bytes per slab (default :data:`nanoseg._plan.SLAB_BYTES`).
    n_jobs : int
        Slabs labelled at once, on threads; merging follows in Z order.
    device : {"cpu", "cuda"}
        Where slabs are closed and labelled (a resolved device, not "auto").
    """

    def __init__(
        self, volume, *, threshold, radius, connectivity, min_size, budget=None, n_jobs=1, device="cpu"
    ):
        self.volume = volume
        self.settings = LabelSettings(threshold, radius, connectivity, volume.is_2d, device=device, name=volume.name)
        self.backend = get_backend(device)
        self.min_size = min_size
        self.n_jobs = n_jobs
        n_slices = volume.shape[0]
        self.depth = depth = volume.slab_depth(LABEL_BYTES_PER_VOXEL, budget)
        if self.backend.is_gpu:
            plane = volume.shape[1] * volume.shape[2]
            depth = max(1, min(depth, GPU_MAX_SLAB_VOXELS // plane - 4 * radius))
            self.depth = depth
        self.bounds = [(z0, min(z0 + depth, n_slices)) for z0 in range(0, n_slices, depth)]
        self._lazy_mask = None if volume.in_memory else self.lazy_mask()
        self._compute_options = {} if self._lazy_mask is None else self._slab_compute_options()
        self._windows = None
        # The mask as it travels to this process: packed 8 pixels a byte
        # when other processes compute it (see pack_mask_bits).
        self._packed_mask = None
        # The mask's planes read without dask, where this process computes them.
        self._direct = None
        # A distributed client whose workers close and label the slabs of the
        # analysis pass themselves (see _labelled_on_workers).
        self._client = None
        if self._lazy_mask is not None:
            if self._masks_travel():
                self._packed_mask = pack_mask_bits(self._lazy_mask)
                self._client = self._worker_client()
            else:
                self._direct = self._direct_planes()
            # Slabs come from culled windows of the graph, so that a slab's
            # cost does not grow with the volume's depth.
            self._windows = GraphWindows(
                self._lazy_mask if self._packed_mask is None else self._packed_mask,
                longest=depth + 4 * radius, depth=depth,
                n_cached=n_jobs + 1, compute_options=self._compute_options,
            )
        self._planes = None

    def _slab_compute_options(self):
        """How each thread computes its slab of a lazy input.

        With dask's local threaded scheduler, every slab computed on one of
        the `n_jobs` threads would start a pool of its own, so that n_jobs x
        n_cores tasks (each holding its blocks) run at once: the synchronous
        scheduler keeps one task per thread, and memory to n_jobs slabs.
        Any other scheduler (a distributed client) is left to do its work.
        Either is given as a function, which dask takes as it is: left to
        find it, or given its name, dask would import distributed to look for
        a client (see :func:`~nanoseg._plan.scheduler_of`).
        """
        import dask.local
        import dask.threaded

        scheduler = scheduler_of([self._lazy_mask])
        if self.n_jobs > 1 and scheduler is dask.threaded.get:
            return {"scheduler": dask.local.get_sync}
        return {} if scheduler is None else {"scheduler": scheduler}

    def _masks_travel(self):
        """Whether the lazy mask is computed in other processes (a distributed
        client, or dask's process pool) and sent here."""
        return not computed_here([self._lazy_mask])

    def _worker_client(self):
        """The ``distributed.Client`` that computes the lazy mask, when the
        slabs are labelled on the CPU; else None."""
        if self.backend.is_gpu:
            return None  # the workers may have no GPU
        return distributed_client([self._lazy_mask])

    def _labelled_on_workers(self):
        """Yield each slab's ``(count, sizes, first face, last face,
        KeptOnWorkers)``, in Z order, as the analysis pass needs them, the
        slab closed and labelled by a task on the client's workers.

        The slab's labelled voxels stay on the worker that found them (the
        :class:`KeptOnWorkers` future), so that the lazy labels and the
        writers take them from there; only a summary comes here: the
        components' sizes and the labelled voxels of the slab's two faces.
        Tasks take the mask's blocks that hold their slab and halo (see
        :meth:`submit_slabs`): the mask never travels, and the input is read
        once whatever the volume's size.
        """
        import uuid

        futures = self.submit_slabs("nanoseg-label-slab", range(len(self.bounds)))
        depths = [stop - start for start, stop in self.bounds]
        plane_size = self.volume.shape[1] * self.volume.shape[2]
        name = f"nanoseg-slab-summary-{uuid.uuid4().hex}"
        summaries = self._client.map(
            _sent_summary, futures, depths, [plane_size] * len(futures),
            key=[f"{name}-{index}" for index in range(len(futures))],
        )
        try:
            for future, summary in zip(futures, summaries):
                count, sizes, first, last = summary.result()
                summary.release()
                widened = tuple((flat.astype(np.int64), ids) for flat, ids in (first, last))
                yield (count, sizes.astype(np.int64), *widened, KeptOnWorkers(future))
        finally:
            for summary in summaries:
                summary.release()

    def submit_slabs(self, name, indices):
        """Futures of one task per slab of `indices` on the client's workers,
        in one submission (one pass over the mask's graph), each giving the
        slab's ``(flat, ids, count)`` (:func:`local_labels`).

        A task takes the mask's blocks that hold its slab and halo (each
        block is computed once, by one task of the mask's graph, and shared
        with the neighbouring slab's task: slicing the lazy mask per slab
        instead had dask fuse the slicing into the mask's tasks, computing
        halo planes twice).
        """
        import uuid

        import dask

        name = f"{name}-{uuid.uuid4().hex}"
        grid = self._lazy_mask.to_delayed()  # (blocks along Z, Y, X); the graph optimised once
        edges = np.cumsum((0, *self._lazy_mask.chunks[0]))
        tasks = []
        for index in indices:
            start, stop = self.bounds[index]
            lo, hi = self.halo_bounds(start, stop)
            first = int(np.searchsorted(edges, lo, side="right")) - 1
            last = int(np.searchsorted(edges, hi, side="left"))
            tasks.append(
                dask.delayed(_labelled_voxels)(
                    self.settings, grid[first:last].tolist(), int(edges[first]), start, stop, lo, hi,
                    dask_key_name=(name, index),
                )
            )
        return self._client.compute(tasks)

    def _direct_planes(self):
        """A mixture's mask of a local zarr array, read plane by plane from its
        chunk files (see ``MaskAt.planes``), or None."""
        source = self.volume.to_dask()
        mask_at = None if source.dtype == bool else handoff.find(source, handoff.MASK_AT)
        return None if mask_at is None else mask_at.planes(self.settings.threshold)

    def _arrived(self, mask):
        """A computed piece of the mask as a boolean array (unpacked if it travelled packed)."""
        if self._packed_mask is None:
            return mask
        return unpack_mask_bits(mask, self.volume.shape[-1])

    def fetch_mask(self, lo, hi):
        """Thresholded slices ``lo:hi`` of a lazy input, computed now, from the
        graph's windows (a slice of the whole graph would cull all of it for
        every slab) but not through the analysis pass's plane cache."""
        if self._direct is not None:
            return self._direct[lo:hi]
        return self._arrived(self._windows.compute(lo, hi))

    def _compute_mask_blocks(self, lo, hi):
        if self._direct is not None:
            return self._direct[lo:hi]
        return [(first, self._arrived(piece)) for first, piece in self._windows.compute_blocks(lo, hi)]

    def halo_bounds(self, start, stop):
        halo = 2 * self.settings.radius
        return max(0, start - halo), min(self.volume.shape[0], stop + halo)

    def lazy_mask(self):
        """The thresholded input as a dask array, validated chunk by chunk.

        Thresholding inside the graph lets dask fuse it with whatever
        produced the posterior (e.g. the mixture's lookup), so slabs arrive
        as booleans rather than float32.
        """
        source = self.volume.to_dask()
        if source.dtype == bool:
            return source
        mask_at = handoff.find(source, handoff.MASK_AT)
        if mask_at is not None:
            # A mixture's lazy posterior: boolean tables give the mask
            # directly, with no float posterior (its values are probabilities
            # by construction, so nothing needs checking).
            return mask_at(self.settings.threshold)
        return source.map_blocks(
            mask_from_posterior, self.settings.threshold, self.settings.name, dtype=bool
        )

    def read_mask(self, lo, hi):
        """Thresholded slices ``lo:hi`` as a boolean array.

        NumPy, except that a CuPy volume labelled on the GPU is thresholded
        there (and a CuPy-backed dask array gives CuPy blocks).
        """
        if self._lazy_mask is not None:
            if self._planes is not None:
                return self._planes.read(lo, hi)
            return self.fetch_mask(lo, hi)
        # In-memory inputs were validated whole by the estimator. A host
        # posterior is thresholded on the host: the mask is 4x smaller to upload.
        backend = self.backend if self.volume.kind == "cupy" else None
        return mask_from_posterior(self.volume.read(lo, hi, backend), self.settings.threshold, check=False)

    def read_and_label(self, index):
        start, stop = self.bounds[index]
        lo, hi = self.halo_bounds(start, stop)
        # On a GPU each thread queues its slab on its own stream, so one
        # slab's upload overlaps another's kernels.
        with self.backend.stream():
            # Masks assembled by the plane cache are this thread's own buffer
            # until its next slab, free to be overwritten.
            owned = self._planes is not None
            return local_labels(self.settings, self.read_mask(lo, hi), start, stop, lo, owned=owned)

    # -- whole volume ---------------------------------------------------------
    def analyse(self, keep=0, verbose=False):
        """Label every slab, merge across faces and number the particles.

        Parameters
        ----------
        keep : float
            Bytes of slab labels to keep in ``plan.slabs`` (12 bytes per
            foreground voxel), in Z order; slabs past the budget get None.
            ``numpy.inf`` keeps all.

        Returns
        -------
        LabelPlan
        """
        plan = LabelPlan(bounds=self.bounds)
        merger = ComponentMerger(self.min_size)
        plane_shape = self.volume.shape[1:]
        plane_size = plane_shape[0] * plane_shape[1]
        offset = kept_bytes = 0
        previous_face = None
        with tqdm(
            total=self.volume.shape[0], desc="Labelling", unit="slice", disable=not verbose
        ) as bar:
            if (
                self._lazy_mask is not None and self._client is None
                and self.settings.radius and not self.settings.is_2d
            ):
                # Neighbouring slabs share their halo planes: compute each once.
                uses = np.zeros(self.volume.shape[0], dtype=np.int64)
                for start, stop in self.bounds:
                    lo, hi = self.halo_bounds(start, stop)
                    uses[lo:hi] += 1
                self._planes = PlaneCache(self._compute_mask_blocks, uses)
            if self._client is not None:
                summaries = self._labelled_on_workers()
            else:
                results = ordered_map(self.read_and_label, range(len(self.bounds)), self.n_jobs)
                summaries = (
                    (*slab_summary((flat, ids, count), stop - start, plane_size), (flat, ids))
                    for (start, stop), (flat, ids, count) in zip(self.bounds, results)
                )
            for (start, stop), (count, sizes, first_face, last_face, slab) in zip(self.bounds, summaries):
                plan.offsets.append(offset)
                plan.counts.append(count)
                below = None
                if previous_face is not None:
                    below = face_pairs(
                        previous_face, first_face, plane_shape,
                        offset - plan.counts[-2], offset, self.settings.connectivity,
                    )
                merger.add_slab(offset, sizes, below)
                previous_face = last_face
                if isinstance(slab, KeptOnWorkers):
                    plan.slabs.append(slab)
                else:
                    kept_bytes += slab[0].nbytes + slab[1].nbytes
                    plan.slabs.append(slab if kept_bytes <= keep else None)
                offset += count
                bar.update(stop - start)
        merged = self._merge(merger)
        plan.labelled, plan.dtype = merged.labelled, merged.dtype
        plan.n_labels, plan.n_voxels = merged.n_labels, merged.n_voxels
        # The slabs' working memory is free now: give it back before the
        # labels are written (by other threads, in other malloc arenas).
        release_free_memory()
        return plan

    def _merge(self, merger):
        """Number the particles across the slabs (a method, so benchmarks can time it)."""
        return merger.merge()

    def label_in_memory(self, verbose=False):
        """Labels of an in-memory volume as a (Z, Y, X) array.

        NumPy, or CuPy for a CuPy volume (only the labelled voxels are uploaded).
        """
        plan = self.analyse(keep=np.inf, verbose=verbose)
        on_device = self.volume.kind == "cupy"
        xp = self.backend.xp if on_device else np
        put = self.backend.to_device if on_device else np.asarray
        out = xp.zeros(self.volume.shape, dtype=plan.dtype)
        flat_out = out.reshape(-1)
        plane_size = self.volume.shape[1] * self.volume.shape[2]
        for index, ((start, _), (flat, ids)) in enumerate(zip(plan.bounds, plan.slabs)):
            if flat.size:
                flat_out[put(start * plane_size + flat)] = put(plan.slab_table(index)[ids])
        return out

    def label_lazy(self, verbose=False):
        """Labels as a lazy (Z, Y, X) dask array.

        The analysis pass runs now, reading the input once. The sparse labels
        it finds are kept, up to :data:`KEPT_LABEL_BYTES`, so that computing
        those slabs only scatters them into zeros, one block per input chunk
        depth (small blocks keep the memory of writing them low); slabs past
        that budget are recomputed from the input and their halo, one block
        per slab. No label volume is ever held whole. Under a distributed
        client every slab's sparse labels stay on the worker that found them,
        and the blocks are made there.
        """
        import dask
        import dask.array as da

        plan = self.analyse(keep=KEPT_LABEL_BYTES, verbose=verbose)
        plane_shape = tuple(self.volume.shape[1:])
        plane_size = plane_shape[0] * plane_shape[1]
        step = max(1, self.volume.chunk_depth)
        blocks = []
        for index, (start, stop) in enumerate(plan.bounds):
            if isinstance(plan.slabs[index], KeptOnWorkers):
                # The slab's final labels looked up once, where its labelled
                # voxels are; each block is then cut from them there.
                kept = dask.delayed(_kept_voxels, pure=True)(plan.slabs[index].future, plan.compact_table(index))
                for a in range(start, stop, step):
                    b = min(a + step, stop)
                    task = dask.delayed(_kept_block, pure=True)(kept, a - start, b - start, plane_shape)
                    blocks.append(da.from_delayed(task, (b - a, *plane_shape), dtype=plan.dtype))
                continue
            if plan.slabs[index] is not None:
                flat, ids = plan.slabs[index]
                values = plan.slab_table(index)[ids]
                for a in range(start, stop, step):
                    b = min(a + step, stop)
                    offset = (a - start) * plane_size
                    lo_i, hi_i = np.searchsorted(flat, [offset, (b - start) * plane_size])
                    task = dask.delayed(_scatter, pure=True)(
                        flat[lo_i:hi_i] - offset, values[lo_i:hi_i], (b - a, *plane_shape)
                    )
                    blocks.append(da.from_delayed(task, (b - a, *plane_shape), dtype=plan.dtype))
                continue
            lo, hi = self.halo_bounds(start, stop)
            # The task carries the slab's compact table, not a lookup as long
            # as its components: most are specks that get no label.
            task = dask.delayed(_final_slab, pure=True)(
                self.settings, self._lazy_mask[lo:hi], start, stop, lo, plan.compact_table(index), plane_shape
            )
            blocks.append(da.from_delayed(task, (stop - start, *plane_shape), dtype=plan.dtype))
        labels = da.concatenate(blocks, axis=0)
        # Writers that can (nanoseg.io.write_ome_zarr) take the labels from
        # here, slab by slab as voxel lists, without making dense blocks.
        return handoff.attach(labels, sparse_labels=SparseLabels(self, plan))


class SparseLabels:
    """The final labels of a lazy labelling, slab by slab, as voxel lists.

    Attributes
    ----------
    shape : tuple of int
        (Z, Y, X) of the labels.
    dtype : numpy.dtype
    bounds : list of (start, stop)
        The slabs, in Z order.
    n_labels : int
        The number of particles: the labels are 1..n_labels.
    n_voxels : int
        The number of labelled voxels.
    """

    def __init__(self, labeler, plan):
        self._labeler = labeler
        self._plan = plan
        self.shape = tuple(labeler.volume.shape)
        self.dtype = np.dtype(plan.dtype)
        self.bounds = list(plan.bounds)
        self.n_labels = int(plan.n_labels)
        self.n_voxels = int(plan.n_voxels)

    def slab(self, index):
        """Flat indices (into the slab) and labels of slab `index`'s labelled voxels.

        Kept slabs are looked up (by a task on the worker that holds them,
        under a distributed client); the others are labelled again from
        their input and halo, as the lazy labels' own blocks are.
        """
        plan, labeler = self._plan, self._labeler
        if isinstance(plan.slabs[index], KeptOnWorkers):
            import uuid

            kept = labeler._client.submit(
                _kept_voxels, plan.slabs[index].future, plan.compact_table(index),
                key=f"nanoseg-kept-voxels-{uuid.uuid4().hex}",
            )
            flat, values = kept.result()
            kept.release()
            return flat, values
        lookup = plan.slab_table(index)
        if plan.slabs[index] is not None:
            flat, ids = plan.slabs[index]
            values = lookup[ids]
        else:
            start, stop = plan.bounds[index]
            lo, hi = labeler.halo_bounds(start, stop)
            mask = labeler.fetch_mask(lo, hi)
            flat, values = _final_voxels(labeler.settings, mask, start, stop, lo, lookup)
        kept = values != 0  # components under the minimum size
        return flat[kept], values[kept]


def _labelled_voxels(settings, blocks, first, start, stop, lo, hi):
    """A worker's task: :func:`local_labels` of one slab, from the mask's
    `blocks` (nested Z, Y, X lists; the first starts at plane `first`) that
    hold planes ``lo:hi``, with the flat indices as int32 where they fit
    (8 bytes a voxel instead of 12 while they are kept on the worker)."""
    mask = np.concatenate(
        [np.concatenate([np.concatenate(row, axis=2) for row in plane], axis=1) for plane in blocks], axis=0
    )[lo - first : hi - first]
    flat, ids, count = local_labels(settings, mask, start, stop, lo, owned=True)
    if flat.size and flat[-1] < np.iinfo(np.int32).max:
        flat = flat.astype(np.int32)
    return flat, ids, count


def _kept_voxels(labelled, compact):
    """A worker's task: flat indices and final labels of the particle voxels
    of a slab labelled earlier (``(flat, ids, count)``), by its compact table."""
    flat, ids, _ = labelled
    values = dense_lookup(compact)[ids]
    kept = values != 0  # components under the minimum size
    return np.asarray(flat[kept], dtype=np.int64), values[kept]


def _kept_block(kept, lo, hi, plane_shape):
    """A worker's task: planes ``lo:hi`` (within the slab) of a slab's final
    labels, given as its :func:`_kept_voxels`, as a dense block."""
    flat, values = kept
    plane_size = plane_shape[0] * plane_shape[1]
    first, last = np.searchsorted(flat, [lo * plane_size, hi * plane_size])
    return _scatter(flat[first:last] - lo * plane_size, values[first:last], (hi - lo, *plane_shape))


def _scatter(flat, values, shape):
    out = np.zeros(shape, dtype=values.dtype)
    out.reshape(-1)[flat] = values
    return out


def _final_voxels(settings, mask, start, stop, lo, lookup):
    """Slab ``start:stop`` labelled again from its `mask` (with halo, from plane
    `lo`): flat indices of its labelled voxels and their final labels.

    `lookup` maps local ids to final labels, as an array or as a compact
    table (:meth:`LabelPlan.compact_table`).
    """
    if isinstance(lookup, tuple):
        lookup = dense_lookup(lookup)
    with get_backend(settings.device).stream():
        flat, ids, _ = local_labels(settings, mask, start, stop, lo)
    return flat, lookup[ids]


def _final_slab(settings, mask, start, stop, lo, lookup, plane_shape):
    return _scatter(*_final_voxels(settings, mask, start, stop, lo, lookup), (stop - start, *plane_shape))
