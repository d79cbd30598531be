"""Process slabs on several threads, consuming results in order.

Slab work is dominated by compiled code that releases the GIL (numba
kernels, NumPy sorts and searches, zarr decoding), so threads scale without
copying data between processes. Results come back in submission order, with
at most `n_jobs` slabs in flight, so that memory stays bounded and order-
dependent merging (such as labels across slab faces) can follow along.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor


def effective_n_jobs(n_jobs):
    """Threads to use: `n_jobs`, or the number of CPUs for None and negative values
    (``-1`` all, ``-2`` all but one, ...)."""
    n_cpus = os.cpu_count() or 1
    if n_jobs is None:
        return n_cpus
    if n_jobs < 0:
        return max(1, n_cpus + 1 + n_jobs)
    return max(1, int(n_jobs))


#: Slabs in flight on a GPU. Two or three threads already overlap one slab's
#: copies with another's kernels; more would only take device memory.
GPU_SLABS_IN_FLIGHT = 4


def device_n_jobs(n_jobs, backend, on_device=False):
    """Threads for slab work on `backend`.

    On the CPU, :func:`effective_n_jobs`. On a GPU at most
    :data:`GPU_SLABS_IN_FLIGHT`, and one for data already there (no copies
    to overlap).
    """
    n = effective_n_jobs(n_jobs)
    if not backend.is_gpu:
        return n
    return 1 if on_device else min(n, GPU_SLABS_IN_FLIGHT)


def ordered_map(function, items, n_jobs):
    """Yield ``function(item)`` for each item, in order, on `n_jobs` threads."""
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


def slab_budget(memory_budget, n_jobs):
    """Bytes for one slab: the estimator's budget shared by the slabs in flight.

    None keeps each slab at the default :data:`nanoseg._volume.SLAB_BYTES`.
    """
    from ._volume import parse_bytes

    total = parse_bytes(memory_budget)
    return None if total is None else max(1, total // effective_n_jobs(n_jobs))
