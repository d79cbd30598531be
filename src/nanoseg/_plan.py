"""Planning slab work: threads, slabs in flight per device, bytes per slab.

Slab work is dominated by compiled code that releases the GIL (numba
kernels, NumPy sorts and searches, zarr decoding), so threads scale without
copying data between processes. Results come back in submission order, with
a bounded number of slabs in flight, so that memory stays bounded and
order-dependent merging (such as labels across slab faces) can follow along.

``n_jobs`` has one meaning in every estimator: the number of slabs worked
on at once, on threads. None takes the ``n_jobs`` of an enclosing
:func:`joblib.parallel_config` when there is one, and otherwise every CPU;
negative values count back from the number of CPUs (``-1`` all, ``-2`` all
but one). Searches that run candidates in several processes
(:func:`nanoseg.tune`) set each candidate's ``n_jobs`` to 1, so nested
parallelism never oversubscribes the machine.

Lazy work goes to dask's current scheduler; :func:`scheduler_of`,
:func:`compute` and :func:`rechunk` find and name it without importing
``distributed`` when no client can exist.
"""

from __future__ import annotations

import functools
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor

#: Default target bytes of working memory per slab (the estimators'
#: ``memory_budget=None``). Slabs hold whole planes and are aligned to the
#: input's chunks along Z; a single chunk deeper than the budget is still read
#: whole, so memory is bounded by max(slab, chunk).
SLAB_BYTES = 128 * 2**20

# Working bytes per voxel of each pass, used to size its slabs.
#: Histogram passes: the uint8 slab plus the background kernel's boolean masks.
HISTOGRAM_BYTES_PER_VOXEL = 4
#: In-memory posterior: the uint8 slab and its float32 output.
POSTERIOR_BYTES_PER_VOXEL = 5
#: Labelling a slab: the float32 posterior and its mask (lazy inputs arrive
#: as the mask alone). The dense fallback for masks above the sparse fraction
#: needs about twice as much (two morphology temporaries and int32 labels).
LABEL_BYTES_PER_VOXEL = 6

#: Slabs in flight on a GPU. Two or three threads already overlap one slab's
#: copies with another's kernels; more would only take device memory.
GPU_SLABS_IN_FLIGHT = 4


def mapping_bytes(volume, maps):
    """Extra working bytes per voxel when `volume`'s slabs are mapped to bins: the raw slab."""
    return volume.dtype.itemsize if maps or volume.dtype != "uint8" else 0


def effective_n_jobs(n_jobs):
    """Threads for `n_jobs` (see the module's note on its meaning)."""
    n_cpus = os.cpu_count() or 1
    if n_jobs is None:
        from joblib.parallel import get_active_backend

        _, configured = get_active_backend()
        if configured is None:
            return n_cpus
        n_jobs = configured
    if n_jobs < 0:
        return max(1, n_cpus + 1 + n_jobs)
    return max(1, int(n_jobs))


def device_n_jobs(n_jobs, backend, on_device=False):
    """Slabs in flight on `backend`.

    On the CPU, :func:`effective_n_jobs`. On a GPU at most
    :data:`GPU_SLABS_IN_FLIGHT`, and one for data already there (no copies
    to overlap).
    """
    n = effective_n_jobs(n_jobs)
    if not backend.is_gpu:
        return n
    return 1 if on_device else min(n, GPU_SLABS_IN_FLIGHT)


def host_readers(n_jobs, backend, volumes, n_in_flight):
    """Threads that read (and decode) slabs on the host for a GPU pass, or None.

    A GPU keeps few slabs in flight (`n_in_flight`, see
    :func:`device_n_jobs`), but zarr and dask `volumes` are decoded on the
    host, where that would leave most cores idle. Such slabs are read on
    one thread per core (:func:`effective_n_jobs` of the estimator's
    `n_jobs`) and handed to the GPU's threads: on an H200 machine with 16
    cores the fit of a 0.54 Gvoxel zarr phantom took 0.73 s against 0.80 s
    (the cores' own fit, which reads once, took 0.51 s; ``benchmarks/gpu``).

    None where the reading threads are the computing ones: on the CPU, and
    for volumes in memory.
    """
    if not backend.is_gpu or not any(volume.kind in ("zarr", "dask") for volume in volumes):
        return None
    n_read = effective_n_jobs(n_jobs)
    return n_read if n_read > n_in_flight else None


def slab_budget(memory_budget, n_in_flight):
    """Bytes for one slab: `memory_budget` shared by the `n_in_flight` slabs.

    None keeps each slab at the default :data:`SLAB_BYTES`.
    """
    from ._validation import check_memory_budget

    total = check_memory_budget(memory_budget)
    return None if total is None else max(1, total // max(1, int(n_in_flight)))


def distributed_client(collections=None):
    """The ``distributed.Client`` that dask's current scheduler for
    `collections` (dask collections, or None for the default) belongs to,
    or None when that scheduler is not a client's.

    No client can exist unless ``distributed`` was imported, so it is only
    looked for then: importing it to find out would cost a second in every
    process without one.
    """
    distributed = sys.modules.get("distributed")
    if distributed is None:
        return None
    owner = getattr(scheduler_of(collections), "__self__", None)
    return owner if isinstance(owner, distributed.Client) else None


def scheduler_of(collections):
    """The function dask would compute `collections` (dask collections) with,
    as ``dask.base.get_scheduler`` finds it, or None.

    Without importing ``distributed`` where it is not imported yet: dask
    looks for a client by importing it whenever no scheduler is configured
    (a quarter of a second, and more on a cold start), but no client can
    exist before it is imported.
    """
    import dask
    import dask.base

    configured = dask.config.get("scheduler", None)
    if "distributed" not in sys.modules:
        if configured is None:
            collections = [c for c in collections or () if c is not None]
            return collections[0].__dask_scheduler__ if collections else None
        # A scheduler named in the configuration ("threads", "sync", ...) is
        # that one whether a client exists or not.
        named = getattr(dask.base, "named_schedulers", {})
        if isinstance(configured, str) and configured.lower() in named:
            return named[configured.lower()]
    return dask.base.get_scheduler(collections=collections)


def compute(*collections, **options):
    """``dask.compute(*collections, **options)``, with dask's scheduler named
    where ``distributed`` is not imported (see :func:`scheduler_of`): left to
    find it, dask would import distributed to look for a client."""
    import dask

    if "scheduler" not in options and "distributed" not in sys.modules:
        scheduler = scheduler_of(collections)
        if scheduler is not None:
            options["scheduler"] = scheduler
    return dask.compute(*collections, **options)


def rechunk(array, chunks):
    """``array.rechunk(chunks)`` for a dask `array`, with dask's rechunking
    method named where ``distributed`` is not imported: left to choose it,
    dask imports distributed to look for a client, and without one it takes
    the configured method or "tasks", as here."""
    import dask

    method = None
    if "distributed" not in sys.modules:
        method = dask.config.get("array.rechunk.method", None) or "tasks"
    return array.rechunk(chunks, method=method)


def computed_here(collections):
    """Whether dask computes `collections` in this process (its threaded or
    synchronous scheduler), rather than in others (a distributed client,
    dask's process pool) that send the results here."""
    import dask.local
    import dask.threaded

    return scheduler_of(collections) in (dask.threaded.get, dask.local.get_sync, None)


def ordered_map(function, items, n_jobs):
    """Yield ``function(item)`` for each item, in order, with `n_jobs` threads.

    At most `n_jobs` items are submitted ahead of the one being consumed.
    A plain thread pool rather than joblib's ``Parallel(return_as="generator")``:
    joblib's generator polls for results every 10 ms, which cost the labelling
    pass about 15 % on a 0.13 Gvoxel volume (benchmarks/RESULTS.md,
    "Restructure: before and after").
    """
    if n_jobs <= 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(max_workers=n_jobs) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= n_jobs:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def slab_depth(volume, bytes_per_voxel, *, memory_budget, n_in_flight, verbose=False, what="pass"):
    """Slices per slab of `volume` for a pass needing `bytes_per_voxel` working bytes.

    The budget is shared by the `n_in_flight` slabs; with `verbose`, the
    plan is printed.
    """
    depth = volume.slab_depth(bytes_per_voxel, slab_budget(memory_budget, n_in_flight))
    if verbose:
        print(volume.describe_plan(depth, bytes_per_voxel, what))
    return depth


@functools.cache
def _malloc_trim():
    # glibc's malloc_trim, or None elsewhere (macOS, Windows, musl).
    try:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory():
    """Return the C heap's free memory to the system after a pass over slabs.

    Slabs are allocated and freed on worker threads, each with its own glibc
    malloc arena; what a pass frees stays mapped in those arenas, and the
    next pass's threads allocate afresh, so the process's resident size grows
    by a pass's working memory at each pass. ``malloc_trim`` gives the free
    pages back (dask's distributed workers do the same): on the classifier
    pipeline on the 0.54 Gvoxel phantom it lowered the peak from 1042 to 837 MiB
    (benchmarks/RESULTS.md). A no-op where glibc is not the C library.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
