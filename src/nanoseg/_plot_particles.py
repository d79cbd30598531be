"""Figures of the particles found, for :mod:`nanoseg.plotting`.

How the particle count and volume change with the labeler's threshold, and
the distribution of one column of a particle table.
"""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.base import clone

from . import _handoff as handoff
from ._plot_common import new_axes
from ._volume import is_dask_array, is_volume_list


def check_thresholds(thresholds, labeler, max_thresholds, defaults):
    """The sorted thresholds to try: `thresholds`, or `defaults` and the labeler's own."""
    if isinstance(max_thresholds, bool) or not isinstance(max_thresholds, numbers.Integral) or max_thresholds < 1:
        raise ValueError(f"max_thresholds must be a positive integer; got {max_thresholds!r}.")
    if thresholds is None:
        thresholds = (*defaults, float(labeler.threshold))
    values = np.unique(np.asarray(thresholds, dtype=np.float64).ravel())
    if values.size == 0 or not np.all((values >= 0) & (values <= 1)):
        raise ValueError(f"thresholds must be one or more numbers in [0, 1]; got {thresholds!r}.")
    if values.size > max_thresholds:
        # Keep the extremes and spread the rest evenly.
        keep = np.unique(np.round(np.linspace(0, values.size - 1, max_thresholds)).astype(int))
        values = values[keep]
    return values


def particles_and_voxels(labels):
    """(number of particles, number of particle voxels) of labels 1..K."""
    if is_volume_list(labels):
        counts = [particles_and_voxels(crop) for crop in labels]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)
    sparse = handoff.find(labels, handoff.SPARSE_LABELS)
    if sparse is not None:
        # A labeler's lazy labels know both: no label block is made.
        return sparse.n_labels, sparse.n_voxels
    if is_dask_array(labels):
        import dask.array as da

        from ._plan import compute

        highest, voxels = compute(labels.max(), da.count_nonzero(labels))
        return int(highest), int(voxels)
    return int(labels.max()), int(np.count_nonzero(labels))


#: Largest lazy posterior (bytes) that the threshold-sensitivity figure
#: computes once and labels from memory at every threshold; a larger one is
#: computed again for each.
SENSITIVITY_MEMORY_BYTES = 512 * 2**20


def held_for_thresholds(posterior):
    """A 3D `posterior` as a dask array of whole planes held in memory, to be
    labelled at several thresholds; anything else as it is.

    A lazy posterior would be computed again at every threshold (on the
    0.54 Gvoxel phantom, labelling the report's 32 x 1024 x 1024 sample at
    eight thresholds took 1.8-1.9 s that way, against 0.6 s to compute it
    once plus 0.5-0.6 s for the eight); it is computed once where this
    process computes it and it is at most :data:`SENSITIVITY_MEMORY_BYTES`.
    A NumPy volume labelled as one would get a dense label array at every
    threshold; as a dask array the labeller's lazy labels give their counts
    from voxel lists instead (1.1 s against 0.5 s for the same eight).
    """
    from ._plan import compute, computed_here

    if is_volume_list(posterior) or getattr(posterior, "ndim", None) != 3:
        return posterior
    if is_dask_array(posterior):
        if posterior.nbytes > SENSITIVITY_MEMORY_BYTES or not computed_here([posterior]):
            return posterior
        (posterior,) = compute(posterior)
    elif not isinstance(posterior, np.ndarray):
        return posterior
    import dask.array as da

    # name=False: no hash of the values for the graph's name.
    return da.from_array(posterior, chunks=(1, *posterior.shape[1:]), name=False)


def draw_threshold_sensitivity(posterior, thresholds, labeler, max_thresholds, ax, defaults):
    """Label `posterior` at each threshold and draw counts and volumes; see ``plot_threshold_sensitivity``."""
    from .labeler import NanoparticleLabeler

    labeler = NanoparticleLabeler() if labeler is None else labeler
    values = check_thresholds(thresholds, labeler, max_thresholds, defaults)
    posterior = held_for_thresholds(posterior)
    ax = new_axes(ax)
    counts, voxels = [], []
    for threshold in values:
        labels = clone(labeler).set_params(threshold=float(threshold)).transform(posterior)
        n_particles, n_voxels = particles_and_voxels(labels)
        counts.append(n_particles)
        voxels.append(n_voxels)
    ax.plot(values, counts, marker="o", color="C0", label="particles")
    ax.set_xlabel("posterior threshold")
    ax.set_ylabel("particles", color="C0")
    ax.axvline(float(labeler.threshold), color="0.5", linestyle=":")
    ax.set_title("Threshold sensitivity")
    twin = ax.twinx()
    twin.plot(values, voxels, marker="s", linestyle="--", color="C1", label="particle voxels")
    twin.set_ylabel("particle voxels", color="C1")
    return ax


def draw_size_distribution(table, ax, column, bins):
    """Histogram one column of a particle table; see ``plot_size_distribution``."""
    if column not in getattr(table, "columns", ()):
        available = ", ".join(map(str, getattr(table, "columns", [])))
        raise ValueError(f"table has no column {column!r}; its columns are: {available or 'none'}.")
    values = np.asarray(table[column], dtype=np.float64)
    values = values[np.isfinite(values)]
    ax = new_axes(ax)
    ax.set_xlabel(column.replace("_", " "))
    ax.set_ylabel("particles")
    ax.set_title(f"{values.size} particle{'s' if values.size != 1 else ''}")
    if values.size == 0:
        ax.text(0.5, 0.5, "no particles", ha="center", va="center", transform=ax.transAxes)
        return ax
    ax.hist(values, bins=bins, color="C0", edgecolor="white")
    median = float(np.median(values))
    ax.axvline(median, color="C3", linestyle="--", label=f"median {median:.3g}")
    ax.legend(fontsize="small")
    return ax
