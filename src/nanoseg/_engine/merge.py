"""Numbering the components of a volume labelled slab by slab.

Each slab numbers its components 1..count (a global id adds the slab's
offset); components of neighbouring slabs that touch across a face are the
same particle. The final labels number the particles, merged across faces
and at least ``min_size`` voxels, 1..K in the order of their first voxel in
raster order, i.e. of their smallest global id.

Most components of a slab touch no face: their size is final as soon as the
slab is labelled, and the small ones (noise specks, often ten times as many
as the particles) will never get a label. :class:`ComponentMerger` therefore
keeps, per slab, only the components that touch a component across a face
("open": their size is not final) and the closed ones large enough to be
kept. The union-find runs over the open components alone, so the memory of
the merge grows with the particles and the face contacts, not with every
component found.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = ["ComponentMerger", "MergedLabels"]


@dataclass
class MergedLabels:
    """The outcome of :meth:`ComponentMerger.merge`.

    Attributes
    ----------
    labelled : list of (local, labels)
        Per slab, the local ids (1-based, sorted) of its components that got
        a final label, and those labels.
    dtype : numpy.dtype
        uint32, or uint64 beyond 2**32 - 1 particles.
    n_labels : int
        The particles: the labels are 1..n_labels.
    n_voxels : int
        Voxels of the particles.
    n_open : int
        Components that touched a component across a face (the union-find's nodes).
    n_pairs : int
        Face contacts (the union-find's edges).
    """

    labelled: list
    dtype: np.dtype
    n_labels: int
    n_voxels: int
    n_open: int
    n_pairs: int


def _empty():
    return np.empty(0, dtype=np.int64)


class ComponentMerger:
    """Collect the slabs' components in Z order, then number the particles.

    Parameters
    ----------
    min_size : int
        Particles smaller than this many voxels get no label.
    """

    def __init__(self, min_size):
        self.min_size = min_size
        self._offsets, self._counts = [], []
        self._pairs = []
        self._closed_ids, self._closed_sizes = [], []
        self._open_ids, self._open_sizes = [], []
        self._pending = None  # the last slab added: its face above is not known yet

    def add_slab(self, offset, sizes, below=None):
        """Add the next slab along Z.

        Parameters
        ----------
        offset : int
            Added to the slab's local ids (1..len(sizes)) to make them global.
        sizes : (count,) int array
            Voxels of each local component, by local id minus 1.
        below : (n, 2) int array, optional
            Global id pairs (previous slab's component, this slab's) that
            touch across the face between the two slabs.
        """
        below = np.empty((0, 2), dtype=np.int64) if below is None else np.asarray(below, dtype=np.int64)
        self._pairs.append(below)
        if self._pending is not None:
            self._settle(*self._pending, above=below[:, 0])
        self._pending = (int(offset), np.asarray(sizes, dtype=np.int64), below[:, 1])
        self._offsets.append(int(offset))
        self._counts.append(len(sizes))

    def _settle(self, offset, sizes, touched_below, above):
        """Sort a slab's components into open and closed once both its faces are known."""
        is_open = np.zeros(len(sizes), dtype=bool)
        is_open[touched_below - offset - 1] = True
        is_open[above - offset - 1] = True
        open_index = np.flatnonzero(is_open)
        closed_index = np.flatnonzero(~is_open & (sizes >= self.min_size))
        self._open_ids.append(offset + 1 + open_index)
        self._open_sizes.append(sizes[open_index])
        self._closed_ids.append(offset + 1 + closed_index)
        self._closed_sizes.append(sizes[closed_index])

    def merge(self):
        """Merge the open components across faces and number the particles.

        Returns
        -------
        MergedLabels
        """
        if self._pending is not None:
            self._settle(*self._pending, above=_empty())
            self._pending = None
        # Slabs come in Z order and ids within a slab are sorted: so are these.
        open_ids = np.concatenate(self._open_ids) if self._open_ids else _empty()
        open_sizes = np.concatenate(self._open_sizes) if self._open_sizes else _empty()
        closed_ids = np.concatenate(self._closed_ids) if self._closed_ids else _empty()
        closed_sizes = np.concatenate(self._closed_sizes) if self._closed_sizes else _empty()
        pairs = np.concatenate(self._pairs) if self._pairs else np.empty((0, 2), dtype=np.int64)
        n_open = open_ids.size
        if len(pairs):
            nodes = np.searchsorted(open_ids, pairs)
            graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (nodes[:, 0], nodes[:, 1])), shape=(n_open, n_open))
            n_groups, group = connected_components(graph, directed=False)
        else:
            n_groups, group = n_open, np.arange(n_open)
        group_sizes = np.bincount(group, weights=open_sizes, minlength=n_groups).astype(np.int64)
        # A group is numbered by its smallest global id: its first node, the ids being sorted.
        _, first_node = np.unique(group, return_index=True)
        kept_groups = np.flatnonzero(group_sizes >= self.min_size)
        firsts = np.concatenate([closed_ids, open_ids[first_node[kept_groups]]])
        n_labels = int(firsts.size)
        dtype = np.dtype(np.uint32 if n_labels < 2**32 else np.uint64)
        label_of = np.empty(n_labels, dtype=dtype)
        label_of[np.argsort(firsts, kind="stable")] = np.arange(1, n_labels + 1, dtype=dtype)
        group_label = np.zeros(n_groups, dtype=dtype)
        group_label[kept_groups] = label_of[closed_ids.size :]
        open_labels = group_label[group]
        closed_labels = label_of[: closed_ids.size]
        n_voxels = int(closed_sizes.sum() + group_sizes[kept_groups].sum())
        return MergedLabels(
            labelled=self._per_slab(open_ids, open_labels, closed_ids, closed_labels, dtype),
            dtype=dtype, n_labels=n_labels, n_voxels=n_voxels, n_open=int(n_open), n_pairs=int(len(pairs)),
        )

    def _per_slab(self, open_ids, open_labels, closed_ids, closed_labels, dtype):
        labelled_open = open_labels != 0
        open_ids, open_labels = open_ids[labelled_open], open_labels[labelled_open]
        bounds = np.asarray(self._offsets, dtype=np.int64)
        ends = bounds + np.asarray(self._counts, dtype=np.int64)
        out = []
        for start, end in zip(bounds.tolist(), ends.tolist()):
            a, b = np.searchsorted(open_ids, [start + 1, end + 1])
            c, d = np.searchsorted(closed_ids, [start + 1, end + 1])
            local = np.concatenate([open_ids[a:b], closed_ids[c:d]]) - start
            labels = np.concatenate([open_labels[a:b], closed_labels[c:d]]).astype(dtype, copy=False)
            order = np.argsort(local, kind="stable")
            out.append((local[order], labels[order]))
        return out
