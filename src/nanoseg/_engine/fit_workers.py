"""The mixture's fit on the workers of a ``dask.distributed`` client.

Without a client, the fit reads its slabs on threads of the calling process
(:mod:`nanoseg._engine.fit`). Under a client that would leave the cluster
idle while one process reads the whole input: at 10^12 voxels, about 48
minutes on two threads (``docs/user_guide/performance.rst``). Here every slab
of the sampled slices of a zarr or dask volume becomes one task on the
workers, which read it where they run and send back counts only: 2 KiB per
slice, a few KiB per slab.

The passes are those of the local fit, and so is the model, to the bit:

* 8-bit data with box halos, one read: each task counts its slices'
  histograms and the histograms of the pixels its seed boxes exclude at a
  few candidate seed levels. A first round of a few slabs, spread over the
  stack, counts every level within :data:`BAND` of the slab's own; their
  histograms then predict the stack's level, and the other slabs count at
  the levels between that prediction and their own (one where they agree),
  as the local fit does. Slabs whose levels miss the stack's are read once
  more, on the workers, once the level is known.
* Anything else (16-bit data, a binning, dilation halos, no numba on the
  workers): the local fit's two passes, each slab a task.

The per-slab functions run on the CPU of the worker, whatever the estimator's
`device` (a GPU fit stays in the calling process).
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from .._backend import CPU
from .._plan import distributed_client

#: Seed levels on either side of a slab's own that the first round's tasks
#: count boxes at, with no prediction yet (2 * BAND + 1 levels in all; the
#: local fit counts at most 5 as well).
BAND = 2


def client_for(volumes, backend):
    """The ``distributed.Client`` that the fit of `volumes` should run on, or None.

    A client is used when it is dask's current scheduler, the fit runs on the
    CPU, and every volume is stored (zarr) or lazy (dask): an in-memory array
    would have to be sent to the workers whole.
    """
    if backend.name != "cpu" or not all(volume.kind in ("zarr", "dask") for volume in volumes):
        return None
    return distributed_client([v.array for v in volumes if v.kind == "dask"] or None)


def settings_of(model):
    """The estimator's hyper-parameters as a small picklable object for the tasks."""
    from types import SimpleNamespace

    return SimpleNamespace(**model.get_params(deep=False))


class WorkerSlabs:
    """The slabs of a fit's `work` (``(volume, slice indices)`` pairs) as
    tasks on a client's workers.

    Parameters
    ----------
    client : distributed.Client
    work : list of (Volume, ndarray)
        Consecutive groups of each volume's sampled slices, as the local fit
        cuts them.
    blocks : list, optional
        One slab per entry of `work`: a :class:`StoredSlab` (a zarr volume's
        slab, read by its task) or a delayed block of a dask volume. Made
        from `work` by default.
    """

    def __init__(self, client, work, blocks=None):
        self.client = client
        self.work = list(work)
        self.blocks = _slab_blocks(self.work) if blocks is None else blocks

    def subset(self, positions):
        """The slabs at `positions` only."""
        return WorkerSlabs(self.client, [self.work[p] for p in positions], [self.blocks[p] for p in positions])

    def map(self, function, arguments, *, progress, desc=None):
        """``function(slab, *arguments(position))`` for every slab, computed on
        the workers; the results in the order of `work`.

        `arguments` gives each task its own small arguments (they travel
        inside the task); the slab is read on the worker that runs it.
        """
        import uuid

        import dask
        from distributed import as_completed

        # Tasks named after the pass's function (in the dashboard and task stream).
        name = f"{function.__name__.replace('_', '-')}-{uuid.uuid4().hex}"
        tasks = [
            dask.delayed(_on_slab)(function, block, *arguments(position), dask_key_name=(name, position))
            for position, block in enumerate(self.blocks)
        ]
        futures = self.client.compute(tasks)
        position_of = {future.key: position for position, future in enumerate(futures)}
        progress = dict(progress, total=sum(len(group) for _, group in self.work))
        if desc is not None:
            progress["desc"] = desc
        try:
            with tqdm(**progress) as bar:
                for future in as_completed(futures):
                    bar.update(len(self.work[position_of[future.key]][1]))
            return self.client.gather(futures)
        except OSError as error:
            # A worker could not open the input: say where it ran.
            error.add_note(
                "Raised on a dask.distributed worker: under a client, the fit reads each slab on "
                "the worker that runs its task, so the workers must be able to open the input at "
                "the same path or URL as this process (a shared file system or object storage)."
            )
            raise


class StoredSlab:
    """Slices `indices` of a stored (zarr) `volume`, read by the task that uses them.

    A task given one reads its slab itself, where it runs, through the
    volume's reader (its chunk files where it qualifies); no other task
    and no transfer between workers is involved.
    """

    def __init__(self, volume, indices):
        self.volume = volume
        self.indices = np.asarray(indices)

    def read(self):
        return self.volume.read_slices(self.indices)


def _on_slab(function, block, *arguments):
    # The task: the slab (read here when stored), then the pass's function.
    slab = block.read() if isinstance(block, StoredSlab) else np.asarray(block)
    return function(slab, *arguments)


def _slab_blocks(work):
    """One slab per entry of `work`: a :class:`StoredSlab` for a zarr
    volume, a delayed block of a dask volume.

    A dask volume's sampled slices are cut into blocks of whole planes with
    the depths of its groups (so that a block is exactly one entry of
    `work`), in one graph per volume.
    """
    blocks = []
    position = 0
    while position < len(work):
        volume = work[position][0]
        groups = []
        while position < len(work) and work[position][0] is volume:
            groups.append(work[position][1])
            position += 1
        if volume.kind == "zarr":
            blocks.extend(StoredSlab(volume, group) for group in groups)
            continue
        indices = np.concatenate(groups)
        source = volume.to_dask()
        if indices.size != source.shape[0] or np.any(indices != np.arange(indices.size)):
            source = source[indices]
        depths = tuple(len(group) for group in groups)
        blocks.extend(source.rechunk((depths, -1, -1)).to_delayed().ravel())
    return blocks


# ---------------------------------------------------------------------------
# what each task runs on its worker
# ---------------------------------------------------------------------------
def slab_counts_and_boxes(slab, settings, band, predicted, bounds=None):
    """Task of the one-read fit: the slab's slice histograms, and its seed
    boxes' excluded histograms at the levels that the slabs counted before
    predict (`predicted`, and the `bounds` they set on the stack's level, as
    the local pass chooses them), or, with no prediction, at every level
    within `band` of the slab's own.

    Returns ``(hists, levels, excluded)`` as the local one-read pass keeps them.
    """
    from .._ops import _numba
    from . import fit

    hists = fit.slice_histograms(CPU, slab)
    own = fit._predicted_level(settings, hists.sum(axis=0), settings.polarity == "dark")
    if own is None or not _numba.available():
        levels = []
    elif predicted is None:
        levels = list(range(own - band, own + band + 1))
    else:
        levels = fit._candidate_levels(predicted, own, settled=True, bounds=bounds)
    return hists, levels, fit._excluded_histograms(settings, slab, hists, levels)


def slab_slice_histograms(slab):
    """Task of pass 1 (8-bit data): the slab's slice histograms."""
    from . import fit

    return fit.slice_histograms(CPU, slab)


def slab_value_counts(slab):
    """Task of pass 1 (16-bit data): the counts of every value in the slab."""
    from . import fit

    return fit.value_counts(CPU, slab)


def slab_background(slab, settings, binning, low, high, hists):
    """Task of pass 2: see :func:`nanoseg._engine.fit.slab_background`."""
    from . import fit

    return fit.slab_background(settings, CPU, slab, binning, low, high, hists)
