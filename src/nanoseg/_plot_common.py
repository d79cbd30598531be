"""Helpers shared by the figures of :mod:`nanoseg.plotting`.

Finding matplotlib (an optional dependency) with a helpful error, getting
the Axes to draw on, and choosing and preparing the plane of a volume to
show. matplotlib is imported only inside these functions, so that importing
:mod:`nanoseg.plotting` never needs it.
"""

from __future__ import annotations

import numbers

import numpy as np


def require_matplotlib():
    """Raise an ImportError naming the ``plot`` extra when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise ImportError(
            'nanoseg.plotting needs matplotlib: install it with pip install "nanoseg[plot]" '
            "(or pip install matplotlib)."
        ) from error


def new_axes(ax):
    """`ax`, or the Axes of a new pyplot figure."""
    require_matplotlib()
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.subplots()[1]


def panels(axes, n_panels, ncols, title=None):
    """`n_panels` Axes: the first of `axes`, or a new figure's grid of them."""
    require_matplotlib()
    if axes is not None:
        flat = list(np.ravel(np.asarray(axes, dtype=object)))
        if len(flat) < n_panels:
            raise ValueError(f"axes holds {len(flat)} Axes but {n_panels} panels are drawn; pass at least {n_panels}.")
        out = np.empty(n_panels, dtype=object)
        out[:] = flat[:n_panels]
        return out
    import matplotlib.pyplot as plt

    ncols = max(1, min(int(ncols), n_panels))
    nrows = -(-n_panels // ncols)
    figure, grid = plt.subplots(
        nrows, ncols, figsize=(3.4 * ncols, 3.2 * nrows), squeeze=False, layout="constrained"
    )
    for unused in grid.ravel()[n_panels:]:
        unused.set_axis_off()
    if title:
        figure.suptitle(title)
    return grid.ravel()[:n_panels]


def check_plane(plane, volume, default):
    """The plane (z index) to show: 0 for an image, `default()` when None."""
    if volume.is_2d:
        return 0
    if plane is None:
        return int(default())
    n_planes = volume.shape[0]
    if isinstance(plane, bool) or not isinstance(plane, numbers.Integral) or not 0 <= plane < n_planes:
        raise ValueError(f"plane must be an integer from 0 to {n_planes - 1}; got {plane!r}.")
    return int(plane)


def busiest_plane(volume, threshold=None):
    """Index of the plane with the most labelled voxels (the middle one if none).

    With `threshold`, voxels count when they are at least `threshold` (for a
    probability map) instead of when they are nonzero.
    """

    def count(block):
        # Plane by plane: NumPy's count along an axis is a boolean sum,
        # several times slower than its whole-array count.
        return [np.count_nonzero(plane if threshold is None else plane >= threshold) for plane in block]

    if threshold is None and volume.stored_chunks is not None:
        # Stored labels: only the chunks that were written are read, on
        # every core (a 2048 x 2048 x 128 uint32 volume decodes 2 GiB).
        from ._plan import effective_n_jobs

        counts = volume.stored_chunks.count_nonzero_planes(n_jobs=effective_n_jobs(None))
    else:
        counts = np.concatenate([
            count(np.asarray(volume.read(int(g[0]), int(g[-1]) + 1)))
            for g in volume.slabs(volume.slab_depth(volume.dtype.itemsize))
        ])
    return int(np.argmax(counts)) if counts.any() else volume.shape[0] // 2


def grey(plane):
    """Image plane scaled to [0, 1] for display."""
    plane = np.asarray(plane, dtype=np.float64) / (255.0 if plane.dtype == np.uint8 else 1.0)
    if plane.dtype == np.float64 and (plane.min() < 0 or plane.max() > 1):
        low, high = float(plane.min()), float(plane.max())
        plane = (plane - low) / (high - low) if high > low else np.zeros_like(plane)
    return plane


def where(volume, plane):
    """How a figure names the plane shown: ``image`` for 2D input."""
    return "image" if volume.is_2d else f"plane z = {plane}"
