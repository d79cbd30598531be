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

Only per-slab face planes and per-component sizes are kept between slabs:
memory is bounded by the slab size, not the volume size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from . import _kernels
from ._backend import get_backend
from ._volume import check_finite

# Working bytes per voxel while labelling a slab: the float32 posterior, the
# mask and two morphology temporaries, and int32 labels.
LABEL_BYTES_PER_VOXEL = 12


def check_probabilities(data, name="X"):
    """Raise ValueError unless float `data` is finite and within [0, 1]."""
    check_finite(data, name)
    low, high = float(data.min()), float(data.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"{name} must hold probabilities in [0, 1]; found values in [{low:g}, {high:g}]. "
            "Pass the output of NanoparticleMixture.transform, or a boolean mask."
        )


def mask_from_posterior(data, threshold, name="X"):
    """Threshold a posterior slab (``>= threshold``); a boolean slab is used as is."""
    if data.dtype == bool:
        return data
    check_probabilities(data, name)
    return data >= threshold


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


def face_pairs(lower, upper, lower_offset, upper_offset, connectivity):
    """Global id pairs of components touching across a slab face.

    Parameters
    ----------
    lower : (Y, X) int array
        Local labels of the last plane of the lower slab.
    upper : (Y, X) int array
        Local labels of the first plane of the upper slab.
    lower_offset, upper_offset : int
        Added to local labels to make them global.

    Returns
    -------
    pairs : (n, 2) int64 array, unique rows
    """
    n_rows, n_cols = lower.shape
    found = []
    for dy, dx in face_offsets(connectivity):
        a = lower[max(0, -dy) : n_rows - max(0, dy), max(0, -dx) : n_cols - max(0, dx)]
        b = upper[max(0, dy) : n_rows - max(0, -dy), max(0, dx) : n_cols - max(0, -dx)]
        both = (a > 0) & (b > 0)
        if both.any():
            found.append(
                np.stack(
                    [a[both].astype(np.int64) + lower_offset, b[both].astype(np.int64) + upper_offset],
                    axis=1,
                )
            )
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(found), axis=0)


@dataclass
class LabelPlan:
    """What the analysis pass learned: enough to label any slab finally."""

    bounds: list
    offsets: list = field(default_factory=list)
    counts: list = field(default_factory=list)
    table: np.ndarray = None
    n_labels: int = 0

    def slab_table(self, index):
        """Lookup from slab `index`'s local labels to final labels (0 stays 0)."""
        offset, count = self.offsets[index], self.counts[index]
        lookup = self.table[offset : offset + count + 1].copy()
        lookup[0] = 0
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


def local_labels(settings, data, start, stop, lo):
    """Label slab ``start:stop`` from posterior `data` covering slices ``lo:...``.

    Returns
    -------
    labels : (stop - start, Y, X) int32 array
    count : int
    """
    backend = get_backend(settings.device)
    mask = mask_from_posterior(data, settings.threshold, settings.name)
    if settings.is_2d:
        closed = _kernels.close_mask(backend, mask[0], settings.radius)
        labels, count = _kernels.label_mask(backend, closed, settings.connectivity)
        return labels[None], count
    closed = _kernels.close_mask(backend, mask, settings.radius)[start - lo : stop - lo]
    return _kernels.label_mask(backend, closed, settings.connectivity)


class SlabLabeler:
    """Threshold, close and label a :class:`~nanoseg._volume.Volume` by slabs.

    Parameters
    ----------
    volume : Volume
        Posterior probabilities (float) or a boolean mask.
    threshold, radius, connectivity, min_size
        As in :class:`nanoseg.NanoparticleLabeler`.
    depth : int, optional
        Slices per slab; by default from the volume's memory plan.
    """

    def __init__(self, volume, *, threshold, radius, connectivity, min_size, depth=None):
        self.volume = volume
        self.settings = LabelSettings(threshold, radius, connectivity, volume.is_2d, name=volume.name)
        self.min_size = min_size
        n_slices = volume.shape[0]
        depth = depth or volume.slab_depth(LABEL_BYTES_PER_VOXEL)
        self.bounds = [(z0, min(z0 + depth, n_slices)) for z0 in range(0, n_slices, depth)]

    def halo_bounds(self, start, stop):
        halo = 2 * self.settings.radius
        return max(0, start - halo), min(self.volume.shape[0], stop + halo)

    def read_and_label(self, index):
        start, stop = self.bounds[index]
        lo, hi = self.halo_bounds(start, stop)
        return local_labels(self.settings, self.volume.read(lo, hi), start, stop, lo)

    # -- whole volume ---------------------------------------------------------
    def analyse(self, out=None, verbose=False):
        """Label every slab, merge across faces and build the final table.

        Parameters
        ----------
        out : (Z, Y, X) uint32 ndarray, optional
            When given, each slab's local labels are stored there, ready for
            :meth:`finalize_inplace`.

        Returns
        -------
        LabelPlan
        """
        plan = LabelPlan(bounds=self.bounds)
        sizes, pairs = [np.zeros(1, dtype=np.int64)], []
        offset = 0
        previous_face = None
        with tqdm(
            total=self.volume.shape[0], desc="Labelling", unit="slice", disable=not verbose
        ) as bar:
            for index, (start, stop) in enumerate(self.bounds):
                labels, count = self.read_and_label(index)
                plan.offsets.append(offset)
                plan.counts.append(count)
                sizes.append(np.bincount(labels.ravel(), minlength=count + 1)[1:].astype(np.int64))
                if previous_face is not None:
                    pairs.append(
                        face_pairs(
                            previous_face, labels[0], offset - plan.counts[-2], offset,
                            self.settings.connectivity,
                        )
                    )
                previous_face = labels[-1].copy()
                if out is not None:
                    out[start:stop] = labels
                offset += count
                bar.update(stop - start)
        plan.table, plan.n_labels = self._merge(offset, np.concatenate(sizes), pairs)
        return plan

    def _merge(self, n_total, sizes, pairs):
        """Final label of every global id (index 0 is the background)."""
        pairs = np.concatenate(pairs) if pairs else np.empty((0, 2), dtype=np.int64)
        n_nodes = n_total + 1
        if len(pairs):
            graph = coo_matrix(
                (np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])),
                shape=(n_nodes, n_nodes),
            )
            n_components, component = connected_components(graph, directed=False)
        else:
            n_components, component = n_nodes, np.arange(n_nodes)
        component_sizes = np.bincount(component, weights=sizes, minlength=n_components)
        # A component is numbered by its smallest global id, i.e. its first
        # voxel in raster order; np.unique's return_index gives exactly that.
        ids, first = np.unique(component[1:], return_index=True)
        order = ids[np.argsort(first, kind="stable")]
        kept = order[component_sizes[order] >= self.min_size]
        n_labels = int(kept.size)
        dtype = np.uint32 if n_labels < 2**32 else np.uint64
        final = np.zeros(n_components, dtype=dtype)
        final[kept] = np.arange(1, n_labels + 1, dtype=dtype)
        table = final[component]
        table[0] = 0
        return table, n_labels

    def finalize_inplace(self, out, plan):
        """Map local labels stored by :meth:`analyse` to final labels."""
        result = out if plan.table.dtype == out.dtype else np.empty(out.shape, plan.table.dtype)
        for index, (start, stop) in enumerate(plan.bounds):
            result[start:stop] = plan.slab_table(index)[out[start:stop]]
        return result

    def label_in_memory(self, verbose=False):
        """Labels of an in-memory volume as a (Z, Y, X) NumPy array."""
        out = np.empty(self.volume.shape, dtype=np.uint32)
        plan = self.analyse(out=out, verbose=verbose)
        return self.finalize_inplace(out, plan)

    def label_lazy(self, verbose=False):
        """Labels as a lazy (Z, Y, X) dask array, one task per slab.

        The analysis pass runs now (reading the input once); each output
        slab recomputes its local labels from its halo when computed, so no
        label volume is ever held whole.
        """
        import dask
        import dask.array as da

        plan = self.analyse(verbose=verbose)
        source = self.volume.to_dask()
        n_rows, n_cols = self.volume.shape[1:]
        blocks = []
        for index, (start, stop) in enumerate(plan.bounds):
            lo, hi = self.halo_bounds(start, stop)
            task = dask.delayed(_final_slab, pure=True)(
                self.settings, source[lo:hi], start, stop, lo, plan.slab_table(index)
            )
            blocks.append(da.from_delayed(task, (stop - start, n_rows, n_cols), dtype=plan.table.dtype))
        return da.concatenate(blocks, axis=0)


def _final_slab(settings, data, start, stop, lo, lookup):
    labels, _ = local_labels(settings, np.asarray(data), start, stop, lo)
    return lookup[labels]
