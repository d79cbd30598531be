"""Running uint8 slice functions over volumes, for the intensity steps.

:class:`~nanoseg.preprocessing.BackgroundSubtractor` and
:class:`~nanoseg.preprocessing.SliceEqualizer` both map uint8 slices to uint8
slices. This module validates their inputs and runs such a function over a
volume: whole in memory, or lazily one dask chunk of whole planes at a time,
reading neighbouring planes through :func:`nanoseg._engine.overlap.map_overlap`
when a 3D filter needs them. It also holds the uint8 arithmetic both steps
use: rounding back to uint8 and exact percentiles read off slice histograms.
"""

from __future__ import annotations

import numpy as np

from ._engine.overlap import map_overlap
from ._plan import rechunk
from ._validation import check_intensity_volume
from ._volume import as_volumes, is_lazy


def intensity_volumes(X):
    """`X` as volumes and whether it was a list; raise unless each holds intensities."""
    volumes, is_list = as_volumes(X)
    for volume in volumes:
        check_intensity_volume(volume)
    return volumes, is_list


def _whole_planes(volume):
    """The volume as a 3D dask array whose blocks hold whole (Y, X) planes.

    Per-slice steps need a slice's every pixel (its percentiles, its median),
    and the package reads whole planes anyway; the chunking along Z is kept.
    """
    return rechunk(volume.to_dask(), {1: -1, 2: -1})


def apply_per_slab(volume, function, depth=0):
    """Run ``function((n, Y, X) uint8) -> (n, Y, X) uint8`` over a volume.

    In memory the whole volume is one slab. Lazy volumes are cut into chunks
    of whole planes; with `depth`, each chunk reads `depth` planes of its
    neighbours along Z (for 3D filters) that are trimmed from its result.
    """
    if not is_lazy(volume.array):
        return volume.restore(function(volume.read(0, volume.shape[0])))
    return volume.restore(map_overlap(function, _whole_planes(volume), (depth, 0, 0), np.uint8))


def passthrough(volume):
    """The volume unchanged: the array itself in memory, a lazy dask array otherwise."""
    if is_lazy(volume.array):
        return volume.restore(volume.to_dask())
    return volume.array


def to_uint8(values):
    """Round and clip to 0-255."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def slice_percentiles(hists, percentiles):
    """Inverted-CDF percentiles of 256-bin histograms, shape (n, len(percentiles)).

    The value of a percentile ``q`` is the smallest intensity ``v`` with at
    least ``ceil(q / 100 * count)`` (and at least one) voxels at or below
    it -- :func:`numpy.percentile` with ``method="inverted_cdf"``, read off
    the histogram: exact for uint8 data.
    """
    hists = np.atleast_2d(hists)
    cumulative = np.cumsum(hists, axis=1)
    totals = cumulative[:, -1]
    out = np.empty((hists.shape[0], len(percentiles)), dtype=np.int64)
    for j, q in enumerate(percentiles):
        needed = np.maximum(np.ceil(totals * (q / 100.0)), 1)
        out[:, j] = np.argmax(cumulative >= needed[:, None], axis=1)
    return out
