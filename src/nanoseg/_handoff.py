"""What nanoseg's lazy results hand on to the steps that read them.

A lazy posterior from :meth:`NanoparticleMixture.transform` can give its mask
``posterior >= threshold`` from boolean tables, without the float posterior
(``MASK_AT``), its values at a few voxels (``POSTERIOR_AT``) and, when the
slices' histograms were known (from the fit of ``fit_transform``), the
per-slice weights it was made with (``SLICE_WEIGHTS``); a lazy
labelling from :meth:`NanoparticleLabeler.transform` holds its particles as
voxel lists (``SPARSE_LABELS``). The labeler, :func:`nanoseg.io.write_ome_zarr`
and :func:`nanoseg.measure.particle_table` use them when they are given such
an array.

They are kept here, under the dask array's name, rather than as attributes
of the array: the arrays users get are plain dask arrays. A dask array's
name identifies its computation, so the hand-off holds for any array of
that name (a copy, say) and for nothing computed from it. An entry lives as
long as one of the arrays it was attached to.
"""

from __future__ import annotations

import threading
import weakref

MASK_AT = "mask_at"
POSTERIOR_AT = "posterior_at"
SPARSE_LABELS = "sparse_labels"
SLICE_WEIGHTS = "slice_weights"

_LOCK = threading.Lock()
# name -> [number of live arrays it was attached to, {kind: object}]
_ENTRIES = {}


def attach(array, **handoffs):
    """Register `handoffs` for the dask `array`; returns `array`.

    Keywords are kinds (``mask_at``, ``posterior_at``, ``sparse_labels``,
    ``slice_weights``).
    """
    name = array.name
    with _LOCK:
        entry = _ENTRIES.setdefault(name, [0, {}])
        entry[0] += 1
        entry[1].update(handoffs)
    weakref.finalize(array, _release, name)
    return array


def _release(name):
    with _LOCK:
        entry = _ENTRIES.get(name)
        if entry is not None:
            entry[0] -= 1
            if entry[0] <= 0:
                del _ENTRIES[name]


def find(array, kind):
    """The hand-off of `kind` registered for `array`, or None (also for anything not a dask array)."""
    # Imported here: the command line imports this module before parsing its
    # arguments, and nanoseg._volume brings zarr and SciPy with it.
    from ._volume import is_dask_array

    if not is_dask_array(array):
        return None
    with _LOCK:
        entry = _ENTRIES.get(array.name)
        return None if entry is None else entry[1].get(kind)
