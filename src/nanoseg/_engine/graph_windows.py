"""Slabs of a lazy volume computed from small graphs, not from the whole volume's.

Computing ``array[lo:hi]`` of a dask array makes dask cull the array's whole
graph for the few tasks the slab needs: it lists the output keys of every
layer, in the calling process, holding the GIL. That costs about half a
microsecond per task of the whole graph, for every slab -- 1 s per slab of a
10^12-voxel volume of 2048 x 2048 planes (1.7 million tasks), 12 hours for
its 48,000 slabs (``benchmarks/RESULTS.md``, "Distributed"). The work of a
slab pass thus grows with the square of the volume.

:class:`GraphWindows` cuts the volume along Z into windows of ``W`` planes,
culls the graph once per window, and computes each slab from the culled
graph of the window that holds it. The cost becomes ``P**2 / W`` task
visits for the windows plus ``S * W`` for the ``S`` slabs of a volume of
``P`` planes; ``W = sqrt(P * depth)`` (``depth``: planes per slab) makes it
grow as ``P**1.5``: about 5 minutes instead of 12 hours at 10^12 voxels.
The values are those of ``array[lo:hi]``.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict


def narrowed(array, lo, hi):
    """``array[lo:hi]`` (along the first axis) with its graph culled to what it needs.

    Later computations of the result, or of slices of it, cull that small
    graph only.
    """
    import dask.array as da

    part = array[lo:hi]
    graph = part.__dask_optimize__(part.__dask_graph__(), part.__dask_keys__())
    return da.Array(graph, part.name, part.chunks, meta=part._meta)


class GraphWindows:
    """Compute slices ``lo:hi`` of a dask array from culled windows of it.

    Parameters
    ----------
    array : dask.array.Array
        The lazy volume (Z first).
    longest : int
        The most planes one request spans (a slab with its halos).
    depth : int
        Planes per slab (sets the window size, see the module docstring).
    n_cached : int
        Windows kept at once (one per thread is enough for requests that
        move forward through the volume).
    compute_options : dict, optional
        Keyword arguments of ``compute`` (e.g. a scheduler).
    """

    def __init__(self, array, *, longest, depth, n_cached=2, compute_options=None):
        self.array = array
        self.longest = max(1, int(longest))
        n_planes = array.shape[0]
        self.stride = max(1, math.isqrt(max(1, n_planes * max(1, int(depth)))))
        self.n_cached = max(1, int(n_cached))
        self.compute_options = dict(compute_options or {})
        self._windows = OrderedDict()
        self._lock = threading.Lock()

    @property
    def whole(self):
        """True when one window holds the whole volume (nothing to gain)."""
        return self.stride + self.longest >= self.array.shape[0]

    def window(self, lo, hi):
        """``(first plane, culled array)`` of the window that holds planes ``lo:hi``."""
        if hi - lo > self.longest:
            raise ValueError(f"planes {lo}:{hi} span more than {self.longest}")
        index = lo // self.stride
        with self._lock:
            if index in self._windows:
                self._windows.move_to_end(index)
                return self._windows[index]
        first = index * self.stride
        last = min(self.array.shape[0], first + self.stride + self.longest)
        # Culled outside the lock: threads needing other windows do not wait.
        found = (first, narrowed(self.array, first, last))
        with self._lock:
            found = self._windows.setdefault(index, found)
            self._windows.move_to_end(index)
            while len(self._windows) > self.n_cached:
                self._windows.popitem(last=False)
        return found

    def compute(self, lo, hi):
        """Planes ``lo:hi`` as a computed array."""
        if self.whole:
            return self.array[lo:hi].compute(**self.compute_options)
        first, window = self.window(lo, hi)
        return window[lo - first : hi - first].compute(**self.compute_options)

    def compute_blocks(self, lo, hi):
        """Planes ``lo:hi`` as ``(first plane, array)`` pieces, one per block along Z.

        The same values as :meth:`compute` without joining the blocks into
        one new array (see :func:`nanoseg._volume.compute_by_block`).
        """
        from .._volume import compute_by_block

        if self.whole:
            return compute_by_block(self.array, lo, hi, **self.compute_options)
        first, window = self.window(lo, hi)
        pieces = compute_by_block(window, lo - first, hi - first, **self.compute_options)
        return [(first + start, piece) for start, piece in pieces]
