"""The mixture's fit: histogram passes over the sampled slices, then EM on the histograms.

Pass 1 counts every sampled slice's 256-bin histogram (for 16-bit data: the
counts of every raw value, which fix the binning first). The stack histogram
gives the seed and exclusion levels. Pass 2 subtracts, slice by slice, the
pixels near seeds (:mod:`nanoseg._ops.seeds`) to get the background
histogram. EM (:mod:`nanoseg._model`) then fits the particle PMF. Both passes
read slabs of whole planes on threads (:mod:`nanoseg._plan`); memory is
bounded by the slab size.

For 8-bit data on the CPU (no binning, box halos, compiled kernels) the two
passes share one read: while a slab's histograms are counted, its seed boxes
are counted too, at the seed levels that the histograms read so far predict
(the seed level is a percentile of the whole stack histogram, so it is only
known at the end). Once the stack histogram is complete, every slab that
predicted the final level contributes its counts as they are; any other
slab is read again. The fitted model is the same either way, voxel for
voxel; only the number of reads differs.

Under a ``dask.distributed`` client, the passes over a zarr or dask volume
run as tasks on the workers instead (:mod:`nanoseg._engine.fit_workers`),
with the same per-slab functions and the same model.

The functions take the estimator itself as `model` and read only its
hyper-parameters.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from tqdm import tqdm

from .. import _model
from .._intensity import Binning, choose_binning
from .._model import mirror, mirror_level
from .._ops import _numba
from .._ops.histogram import slice_histograms
from .._ops.lookup import to_bins
from .._ops.seeds import drop_bright, excluded_box_histograms, slab_background_histograms
from .._plan import (
    HISTOGRAM_BYTES_PER_VOXEL, host_readers, mapping_bytes, ordered_map, release_free_memory, slab_depth,
)
from .._validation import check_intensity_range
from . import fit_workers

#: The binning of 8-bit data under binning="auto": every value is its own bin.
IDENTITY = Binning("range", 0, 255)
UINT16_MAX = 2**16 - 1
# Above this fraction of voxels at or beyond the seed percentile, the data is
# treated as saturated (see check_not_saturated).
SATURATED_FRACTION = 0.5
#: Fit 8-bit data in one read where possible (see the module's docstring);
#: False always reads twice. Both give the same model (the tests compare them).
ONE_READ = True


class DegenerateFitWarning(UserWarning):
    """The fitted particle component is empty or collapsed: the model will find no particles."""


def keeps_8bit_values(model):
    """True when 8-bit data keeps its values as bins (no binning asked for)."""
    return model.binning == "auto" and model.intensity_range is None


def fitted_binning(model):
    """The binning fixed by `fit`."""
    if not hasattr(model, "binning_mode_"):
        # Unpickled from a version that took 8-bit data only: values were bins.
        return IDENTITY
    return Binning(model.binning_mode_, int(model.binning_low_), int(model.binning_high_), int(model.binning_shift_))


def fit_mixture(model, volumes, is_list, backend, n_jobs):
    """Fit `model`'s mixture to `volumes`.

    Returns
    -------
    attributes : dict
        The fitted attributes, by name.
    slice_hists : (n_slices, 256) int64
        The sampled slices' histograms, by bin.
    """
    dark = model.polarity == "dark"
    sampled = [np.arange(0, v.shape[0], model.sampling_step) for v in volumes]
    n_slices = int(sum(s.size for s in sampled))
    # 16-bit data (and 8-bit data given a binning) is mapped to bins slab by slab.
    wide = any(volume.dtype == np.uint16 for volume in volumes)
    maps = wide or not keeps_8bit_values(model)
    # The one-read fit holds HELD_SLABS slabs' values to the end (see
    # _histogram_and_seed_pass): a quarter of a slab's working memory each.
    once = _reads_once(model, backend, maps)
    held_share = -(-HELD_SLABS // HISTOGRAM_BYTES_PER_VOXEL) if once else 0
    n_read = host_readers(model.n_jobs, backend, volumes, n_jobs)
    client = fit_workers.client_for(volumes, backend)
    work = [
        (volume, group)
        for volume, indices in zip(volumes, sampled)
        for group in volume.slabs(
            slab_depth(
                volume, HISTOGRAM_BYTES_PER_VOXEL + mapping_bytes(volume, maps),
                memory_budget=model.memory_budget, n_in_flight=n_jobs + held_share + (n_read or 0),
                verbose=model.verbose, what="histograms",
            ),
            indices,
        )
    ]
    progress = {"total": n_slices, "unit": "slice", "disable": not model.verbose}
    predicted = None
    # Under a distributed client, every pass runs its slabs on the workers.
    remote = None if client is None else fit_workers.WorkerSlabs(client, work)
    if remote is not None and model.verbose:
        print(f"[nanoseg] fit: {len(work)} slab(s) as tasks on the workers of {client.scheduler.address}")

    if wide:
        # Pass 1 for 16-bit data: the binning must be fixed before any slab
        # is mapped, so this pass counts every raw value over all sampled
        # slices (65,536 counters: 512 KiB per thread, whatever the
        # volume's size). The per-slice histograms of the mapped data are
        # counted in pass 2, which reads every slab anyway: no extra pass.
        value_counts = _value_counts(work, backend, n_jobs, progress, n_read, remote)
        binning = _choose_binning(model, value_counts)
        slice_hists = None
        raw_stack_hist = binning.fold(value_counts)
    elif once:
        # Passes 1 and 2 in one read: the histograms, and each slab's seed
        # boxes at its predicted seed levels (settled below).
        if remote is None:
            slice_hists, predicted = _histogram_and_seed_pass(model, work, backend, n_jobs, progress)
        else:
            slice_hists, predicted = _remote_histogram_and_seed_pass(model, remote, progress)
        value_counts = slice_hists.sum(axis=0)
        binning = IDENTITY
        raw_stack_hist = value_counts
    else:
        # Pass 1: every sampled slice's histogram (kept: 2 KiB a slice), by raw intensity.
        slice_hists = _slice_histogram_pass(work, backend, n_jobs, progress, n_read, remote)
        value_counts = slice_hists.sum(axis=0)
        if maps:
            binning = _choose_binning(model, value_counts)
            slice_hists = binning.fold(slice_hists)
        else:
            binning = IDENTITY
        raw_stack_hist = slice_hists.sum(axis=0)
    stack_hist = mirror(raw_stack_hist, dark)
    check_contrast(raw_stack_hist, value_counts, binning)
    stack_pmf = _model.normalize_pmf(stack_hist, model.eps)
    high = _model.percentile_intensity(stack_pmf, model.percentile_high)
    if model.percentile_low == "otsu":
        check_not_saturated(model, stack_hist, None, binning)
        low = seed_level(model, stack_hist)
        high = max(high, low)
    else:
        low = seed_level(model, stack_hist)
        check_not_saturated(model, stack_hist, low, binning)

    if predicted is None:
        raw_background_hist, counted = _background_pass(
            model, work, backend, n_jobs, progress, binning, slice_hists, low, high, n_read, remote
        )
    else:
        raw_background_hist, counted = _settle_background(
            model, work, backend, n_jobs, progress, slice_hists, predicted, low, high, remote
        )
    if slice_hists is None:
        slice_hists = counted
    if raw_background_hist.sum() == 0:
        side = "at or below" if dark else "at or above"
        raise ValueError(
            "No background voxels are left once particle seeds, their halos and voxels "
            f"{side} {'intensity' if binning.is_identity else 'bin'} {mirror_level(high, dark)} "
            "are excluded. Lower halo_pad or raise percentile_low / percentile_high."
        )
    background_hist = mirror(raw_background_hist, dark)
    background_pmf = _model.normalize_pmf(background_hist, model.eps)
    release_free_memory()  # the slabs are gone; only histograms remain

    result = _model.fit_particle_pmf(
        stack_pmf, background_pmf, background_hist.sum() / stack_hist.sum(), low,
        max_iter=model.max_iter, tol=model.tol, eps=model.eps,
    )
    if not result.converged:
        warnings.warn(
            f"EM did not converge within max_iter={model.max_iter} updates (last decrease of "
            f"the negative log-likelihood above tol={model.tol}). Increase max_iter or tol.",
            ConvergenceWarning,
            stacklevel=4,
        )
    warn_if_degenerate(model, result.particle_pmf, low, high, result.background_weight, is_list)
    particle_pmf = result.particle_pmf
    if model.monotone_posterior:
        particle_pmf = _model.monotone_particle_pmf(particle_pmf, background_pmf)

    attributes = {
        "stack_histogram_": raw_stack_hist,
        "background_histogram_": raw_background_hist,
        "stack_pmf_": mirror(stack_pmf, dark),
        "background_pmf_": mirror(background_pmf, dark),
        "particle_pmf_": mirror(particle_pmf, dark),
        "low_intensity_": mirror_level(low, dark),
        "high_intensity_": mirror_level(high, dark),
        "background_weight_": result.background_weight,
        "neg_log_likelihood_": result.neg_log_likelihood,
        "n_iter_": result.n_iter,
        "converged_": result.converged,
        "n_slices_fit_": n_slices,
        "binning_mode_": binning.mode,
        "binning_low_": int(binning.low),
        "binning_high_": int(binning.high),
        "binning_shift_": int(binning.shift),
    }
    return attributes, slice_hists


def seed_level(model, stack_hist):
    """The seed level, in model space, of a stack histogram `stack_hist` (model space).

    The `percentile_low` percentile of its PMF, or its Otsu threshold.
    """
    if model.percentile_low == "otsu":
        return _model.otsu_intensity(stack_hist)
    return _model.percentile_intensity(_model.normalize_pmf(stack_hist, model.eps), model.percentile_low)


def _reads_once(model, backend, maps):
    """Whether the fit of 8-bit data counts histograms and seed boxes in one read."""
    return ONE_READ and not maps and model.halo == "box" and backend.name == "cpu" and _numba.available()


def _predicted_level(model, raw_hist, dark):
    """The seed level that the raw histogram `raw_hist` of part of the stack predicts, or None."""
    if np.count_nonzero(raw_hist) < 2:
        return None  # a constant part predicts nothing (Otsu needs two values)
    return seed_level(model, mirror(raw_hist, dark))


#: Most seed levels a slab counts its seed boxes at in the one-read fit.
#: On 2048 x 2048 planes each level costs about 5 % of reading and counting
#: the slab again.
MAX_PREDICTED_LEVELS = 5


#: Slabs counted after which a prediction that the slab's own level agrees
#: with is trusted alone (no level on either side).
SETTLED_SLABS = 4

#: Slabs first in the spread order that the one-read fit holds (their uint8
#: values) and counts once the seed level is known: before them, too few
#: histograms are counted to predict from. Holding the first five instead of
#: one saved a third of the seed-box work on the 0.54 Gvoxel phantom and
#: avoided most second reads on stacks whose brightness drifts along z, but
#: made a fresh process's fit slower (0.54 -> 0.69 s): the four more slabs
#: held are 128 MiB of memory touched for the first time.
HELD_SLABS = 1


def _candidate_levels(so_far, own, settled=False, bounds=None):
    """Seed levels a slab counts its boxes at, from the level that the
    histograms read so far predict (`so_far`) and the slab's own (`own`).

    A percentile of the stack lies between the slabs' own percentiles, so
    the stack's level is looked for between the two and one level beyond
    (a prediction from part of the stack is often one level off). Once the
    prediction is `settled` (enough slabs counted) and the slab agrees with
    it, that level alone. Once settled, `bounds` (see :func:`_level_bounds`),
    when given, narrows the levels to those the stack can still reach. At
    most :data:`MAX_PREDICTED_LEVELS` levels are kept, nearest `so_far` first.
    """
    known = [level for level in (so_far, own) if level is not None]
    if not known:
        return []
    if settled and so_far is not None and so_far == own:
        return [so_far]
    centre = known[0]
    span = range(min(known) - 1, max(known) + 2)
    if settled and bounds is not None and so_far is not None:
        # The levels the stack can still reach, and the prediction itself.
        span = [level for level in span if bounds[0] <= level <= bounds[1] or level == so_far]
    return sorted(sorted(span, key=lambda level: abs(level - centre))[:MAX_PREDICTED_LEVELS])


class _SlabSpread:
    """The slabs' intensity distributions seen so far, for :func:`_level_bounds`.

    Keeps, bin by bin, the lowest and the highest cumulative distribution of
    the slabs added: two distributions between which every slab seen lies.
    """

    def __init__(self):
        self.lowest = self.highest = None

    def add(self, hist):
        total = hist.sum()
        if total == 0:
            return
        cdf = np.cumsum(hist) / total
        if self.lowest is None:
            self.lowest = self.highest = cdf
        else:
            # New arrays, never changed in place: readers hold the old ones.
            self.lowest, self.highest = np.minimum(self.lowest, cdf), np.maximum(self.highest, cdf)

    def extremes(self):
        """(lowest, highest) cumulative distributions, or None before any slab."""
        return None if self.lowest is None else (self.lowest, self.highest)


def _level_bounds(model, counted, extremes, remaining, dark):
    """The lowest and the highest seed level of the whole stack, or None.

    `counted` (raw histogram) is what the slabs read so far hold; `remaining`
    pixels are still to come. If they are distributed like the slabs seen
    (between the bin-by-bin `extremes` of :meth:`_SlabSpread.extremes`),
    a percentile of the stack lies between its values for the two extremes:
    the stack's cumulative distribution lies between theirs. Slabs beyond
    the extremes seen can take the level outside; such a slab is only read
    again, the model stays the same. None for Otsu's level (not monotone in
    the distribution) and before any slab is seen.
    """
    if model.percentile_low == "otsu" or extremes is None:
        return None
    levels = [_predicted_level(model, counted + remaining * np.diff(cdf, prepend=0.0), dark) for cdf in extremes]
    if None in levels:
        return None
    return min(levels), max(levels)


def _n_pixels(work):
    """Pixels in all the slices of `work` (``(volume, slice indices)`` pairs)."""
    return sum(len(group) * int(np.prod(volume.shape[1:])) for volume, group in work)


def _histogram_and_seed_pass(model, work, backend, n_jobs, progress):
    """Passes 1 and 2 of 8-bit data in one read.

    Returns every sampled slice's histogram, by raw intensity, and for each
    slab of `work` its predicted seed levels with the summed histograms of
    the pixels its seed boxes exclude at each of them (see
    :func:`_candidate_levels`). The :data:`HELD_SLABS` slabs read first have
    too few histograms before them to predict from: they are held, and
    their boxes are counted once the level is known (:func:`_settle_background`).
    """
    dark = model.polarity == "dark"
    lock = threading.Lock()
    counted = np.zeros(_model.N_BINS, dtype=np.int64)
    n_counted = 0
    spread = _SlabSpread()
    n_pixels = _n_pixels(work)
    # Slabs are read in an order that spreads over the stack from the start
    # (first, last, middle, quarters, ...), so that the levels predicted early
    # already see both ends of a stack whose intensities drift along z.
    order = spread_order(len(work))
    held = set(order[:HELD_SLABS])

    def read(position):
        nonlocal counted, n_counted
        volume, group = work[position]
        slab = volume.read_slices(group, backend)
        hists = slice_histograms(backend, slab)
        own = hists.sum(axis=0)
        with lock:
            counted = counted + own
            n_counted += 1
            spread.add(own)
            so_far, settled, extremes = counted, n_counted > SETTLED_SLABS, spread.extremes()
        if position in held:
            return hists, ([], None, slab)
        bounds = None
        if settled:
            bounds = _level_bounds(model, so_far, extremes, n_pixels - so_far.sum(), dark)
        levels = _candidate_levels(
            _predicted_level(model, so_far, dark), _predicted_level(model, own, dark), settled, bounds
        )
        return hists, (levels, _excluded_histograms(model, slab, hists, levels), None)

    parts, predicted = [None] * len(work), [None] * len(work)
    with tqdm(desc="Histograms and seeds", **progress) as bar:
        for position, (hists, prediction) in zip(order, ordered_map(read, order, n_jobs)):
            parts[position] = hists
            predicted[position] = prediction
            bar.update(len(hists))
    return np.concatenate(parts), predicted


def _remote_histogram_and_seed_pass(model, remote, progress):
    """:func:`_histogram_and_seed_pass` on the workers of `remote` (a
    :class:`~nanoseg._engine.fit_workers.WorkerSlabs`), in two rounds.

    The first :data:`SETTLED_SLABS` + 1 slabs in the spread order have no
    other slab's histograms to predict from: their tasks count the seed
    boxes at every level within :data:`~nanoseg._engine.fit_workers.BAND`
    of the slab's own. Their histograms then predict the stack's level, as
    in the local pass, and every other slab's task counts at the levels
    :func:`_candidate_levels` gives from that prediction, the bounds those
    slabs set (:func:`_level_bounds`) and its own (one, where they agree).
    No slab is held.
    """
    settings = fit_workers.settings_of(model)
    order = spread_order(len(remote.work))
    first, rest = order[: SETTLED_SLABS + 1], order[SETTLED_SLABS + 1 :]
    progress = dict(progress, desc="Histograms and seeds")
    results = dict(zip(first, remote.subset(first).map(
        fit_workers.slab_counts_and_boxes, lambda position: (settings, fit_workers.BAND, None), progress=progress,
    )))
    if rest:
        dark = model.polarity == "dark"
        spread = _SlabSpread()
        owns = [results[position][0].sum(axis=0) for position in first]
        for own in owns:
            spread.add(own)
        so_far = np.sum(owns, axis=0)
        predicted = _predicted_level(model, so_far, dark)
        bounds = _level_bounds(model, so_far, spread.extremes(), _n_pixels(remote.work) - so_far.sum(), dark)
        results.update(zip(rest, remote.subset(rest).map(
            fit_workers.slab_counts_and_boxes, lambda position: (settings, fit_workers.BAND, predicted, bounds),
            progress=progress,
        )))
    ordered = [results[position] for position in range(len(remote.work))]
    return np.concatenate([hists for hists, _, _ in ordered]), [(levels, excluded, None) for _, levels, excluded in ordered]


def _excluded_histograms(model, slab, hists, levels):
    """(len(levels), 256): the summed histograms of the pixels that the
    seed boxes of `slab`'s slices exclude at each model-space level."""
    excluded = np.zeros((len(levels), _model.N_BINS), dtype=np.int64)
    for index in range(len(slab) if levels else 0):
        excluded += _slice_excluded(model, slab[index], hists[index], levels)
    return excluded


def _slice_excluded(model, image, hist, levels):
    """:func:`~nanoseg._ops.seeds.excluded_box_histograms` of one slice
    `image` (its histogram `hist`) with `model`'s settings."""
    return excluded_box_histograms(
        image, levels, min_seed_size=model.min_seed_size, halo_pad=model.halo_pad,
        dark=model.polarity == "dark", hist=hist,
    )


def spread_order(n):
    """0..n-1 in the order first, last, middle, quarters, eighths, ...

    After the last, the floors of ``n`` times the van der Corput fractions
    1/2, 1/4, 3/4, 1/8, ...
    """
    if n <= 2:
        return list(range(n))
    bits = int(n - 1).bit_length()
    # With 2**bits >= n fractions, spaced 1 / 2**bits <= 1 / n, every
    # integer below n is the floor of at least one of them.
    fractions = [int(format(i, f"0{bits}b")[::-1], 2) / 2**bits for i in range(2**bits)]
    return list(dict.fromkeys([0, n - 1] + [int(f * n) for f in fractions]))


def _settle_background(model, work, backend, n_jobs, progress, slice_hists, predicted, low, high, remote=None):
    """The background histogram from the one-read pass, once the seed level `low` is known.

    Slabs that predicted `low` give their slices' histograms minus their
    excluded pixels at `low`; the held slabs have their boxes counted at `low`
    now; the others are read again (pass 2 on them alone; on the workers of
    `remote`, a :class:`~nanoseg._engine.fit_workers.WorkerSlabs`, when given).
    """
    dark = model.polarity == "dark"
    firsts = np.cumsum([0] + [len(group) for _, group in work])
    total = np.zeros(_model.N_BINS, dtype=np.int64)
    missed = []
    held_excluded = _held_excluded(model, predicted, slice_hists, firsts, low, n_jobs)
    for position, (levels, excluded, held) in enumerate(predicted):
        hists = slice_hists[firsts[position] : firsts[position + 1]]
        if held is not None:
            levels, excluded = [low], held_excluded[position]
        if low in levels:
            total += hists.sum(axis=0) - excluded[levels.index(low)]
        else:
            missed.append(position)
    total = drop_bright(total, high, dark)
    if missed:
        again = [work[position] for position in missed]
        hists = np.concatenate([slice_hists[firsts[position] : firsts[position + 1]] for position in missed])
        progress = dict(progress, total=len(hists))
        again_remote = None if remote is None else remote.subset(missed)
        total += _background_pass(
            model, again, backend, n_jobs, progress, IDENTITY, hists, low, high, remote=again_remote
        )[0]
    return total, None


def _held_excluded(model, predicted, slice_hists, firsts, low, n_jobs):
    """The excluded histograms at `low`, (1, 256) by position, of the slabs
    that :func:`_histogram_and_seed_pass` held.

    Counted while no other slab is: the held slabs' slices are shared
    among every thread at once.
    """
    held = [(position, index) for position, (_, _, slab) in enumerate(predicted) if slab is not None
            for index in range(len(slab))]

    def count(item):
        position, index = item
        return position, _slice_excluded(model, predicted[position][2][index], slice_hists[firsts[position] + index], [low])

    excluded = {}
    for position, counted in ordered_map(count, held, min(n_jobs, max(1, len(held)))):
        excluded[position] = excluded.get(position, 0) + counted
    return excluded


def map_slabs(function, work, backend, n_jobs, n_read=None):
    """Yield ``function(position, slab)`` for the slabs of `work` in order, `n_jobs` at a time.

    Each slab is read onto `backend` inside its thread's stream. With
    `n_read` (see :func:`~nanoseg._plan.host_readers`), slabs are read on the host by
    `n_read` threads of their own, at most `n_read` ahead, and copied to the
    device by the computing thread.
    """
    if n_read is None:
        def read_and_compute(numbered):
            position, (volume, group) = numbered
            with backend.stream():
                return function(position, volume.read_slices(group, backend))

        yield from ordered_map(read_and_compute, enumerate(work), n_jobs)
        return

    def read(numbered):
        position, (volume, group) = numbered
        return position, volume.read_slices(group)

    def compute(read_slab):
        position, slab = read_slab
        with backend.stream():
            return function(position, backend.to_device(slab))

    yield from ordered_map(compute, ordered_map(read, enumerate(work), n_read), n_jobs)


def _slice_histogram_pass(work, backend, n_jobs, progress, n_read=None, remote=None):
    """Pass 1 (8-bit data): the histogram of every sampled slice, by raw intensity."""
    if remote is not None:
        return np.concatenate(
            remote.map(fit_workers.slab_slice_histograms, lambda position: (), desc="Stack histogram", progress=progress)
        )

    def histograms(position, slab):
        return backend.to_host(slice_histograms(backend, slab))

    parts = []
    with tqdm(desc="Stack histogram", **progress) as bar:
        for hists in map_slabs(histograms, work, backend, n_jobs, n_read):
            parts.append(hists)
            bar.update(len(hists))
    return np.concatenate(parts)


def slab_background(model, backend, slab, binning, low, high, hists):
    """Pass 2 on one slab: its background histogram (summed over its slices), by bin.

    Parameters
    ----------
    slab : (n, Y, X) array of `backend`
        Raw values, mapped to bins by `binning` here.
    hists : (n, 256) int64 or None
        The slab's slice histograms, by bin; None (16-bit data) counts them here.

    Returns
    -------
    background : (256,) int64 NumPy array
    hists : (n, 256) int64 NumPy array, or None when `hists` was given
    """
    slab = to_bins(backend, slab, binning)
    counted = hists is None
    if counted:
        hists = slice_histograms(backend, slab)
    kept = slab_background_histograms(
        backend, slab, low, high,
        min_seed_size=model.min_seed_size, halo_pad=model.halo_pad,
        hists=hists, dark=model.polarity == "dark", halo=model.halo,
    )
    return backend.to_host(kept).sum(axis=0), (backend.to_host(hists) if counted else None)


def _background_pass(model, work, backend, n_jobs, progress, binning, slice_hists, low, high, n_read=None, remote=None):
    """Pass 2: the background histogram, by raw intensity (bin); and, when
    `slice_hists` is None (16-bit data), the slices' histograms counted on the way."""
    firsts = np.cumsum([0] + [len(group) for _, group in work])

    def given_hists(position):
        return None if slice_hists is None else slice_hists[firsts[position] : firsts[position + 1]]

    if remote is not None:
        settings = fit_workers.settings_of(model)
        results = remote.map(
            fit_workers.slab_background,
            lambda position: (settings, binning, low, high, given_hists(position)),
            desc="Background histogram", progress=progress,
        )
    else:
        def background(position, slab):
            return slab_background(model, backend, slab, binning, low, high, given_hists(position))

        results = []
        with tqdm(desc="Background histogram", **progress) as bar:
            for result, (_, group) in zip(map_slabs(background, work, backend, n_jobs, n_read), work):
                results.append(result)
                bar.update(len(group))
    total = np.zeros(_model.N_BINS, dtype=np.int64)
    for hist, _ in results:
        total += hist
    return total, (np.concatenate([hists for _, hists in results]) if slice_hists is None else None)


def value_counts(backend, slab):
    """Counts of every 16-bit value in `slab`: (65536,) int64 NumPy array."""
    total = backend.xp.zeros(UINT16_MAX + 1, dtype=np.int64)
    # Plane by plane: bincount widens its input to 64-bit integers,
    # so this bounds that copy to one plane.
    for plane in slab:
        total += backend.xp.bincount(plane.reshape(-1), minlength=UINT16_MAX + 1)
    return backend.to_host(total)


def _value_counts(work, backend, n_jobs, progress, n_read=None, remote=None):
    """Counts of every 16-bit value over the slabs of `work`: (65536,) int64."""
    if remote is not None:
        parts = remote.map(fit_workers.slab_value_counts, lambda position: (), desc="Intensity range", progress=progress)
        return np.sum(parts, axis=0, dtype=np.int64)

    def count(position, slab):
        return value_counts(backend, slab), len(slab)

    counts = np.zeros(UINT16_MAX + 1, dtype=np.int64)
    with tqdm(desc="Intensity range", **progress) as bar:
        for total, n in map_slabs(count, work, backend, n_jobs, n_read):
            counts += total
            bar.update(n)
    return counts


def _choose_binning(model, value_counts):
    """The binning for the counts of every value (256 or 65536 of them) and the parameters."""
    low, high = check_intensity_range(model.intensity_range, model.binning)
    counts = np.zeros(UINT16_MAX + 1, dtype=np.int64)
    counts[: value_counts.size] = value_counts
    return choose_binning(counts, np.uint16, mode=model.binning, low=low, high=high)


def check_contrast(stack_hist, value_counts, binning):
    """Refuse data whose sampled voxels all fall in one bin."""
    present = np.flatnonzero(stack_hist)
    if present.size >= 2:
        return
    values = np.flatnonzero(value_counts)
    if values.size < 2:
        raise ValueError(
            f"X is constant: every sampled voxel has intensity {int(values[0])}, so there "
            "is no contrast to separate particles from background. Check that the right "
            "array (and channel) was passed."
        )
    raise ValueError(
        f"Every sampled voxel falls in bin {int(present[0])}: its intensities, from "
        f"{int(values[0])} to {int(values[-1])}, lie outside or at one end of the binning's "
        f"range ({binning.mode!r} from {binning.low} to {binning.high}), so there is no contrast "
        "left. Widen intensity_range, or leave it as None to use the observed range."
    )


def check_not_saturated(model, stack_hist, low, binning):
    """Refuse data where most voxels tie at or beyond the seed percentile.

    The seed threshold is the `percentile_low` percentile of the stack
    histogram, so normally only ``100 - percentile_low`` % of the voxels
    reach it. When most voxels share the brightest values (a saturated
    or all-bright acquisition) the percentile collapses onto them, and the
    model would call nearly the whole volume particles.
    """
    if low is None:
        # percentile_low="otsu": the level follows the data, so a large
        # share above it is no sign of saturation; most voxels piled up
        # in the extreme occupied bin are.
        low = int(np.flatnonzero(stack_hist)[-1])
        expected, level = 0.0, "its extreme value"
    else:
        # Twice the expected share, so that a deliberately low
        # percentile_low is not mistaken for saturation.
        expected, level = (100.0 - model.percentile_low) / 100.0, f"its {model.percentile_low:g} percentile"
    above = stack_hist[low:].sum() / stack_hist.sum()
    if above <= max(SATURATED_FRACTION, 2 * expected):
        return
    unit = "intensity" if binning.is_identity else "bin"
    side = "at or below" if model.polarity == "dark" else "at or above"
    raise ValueError(
        f"X looks saturated: {100 * above:.1f} % of the sampled voxels are {side} {unit} "
        f"{mirror_level(low, model.polarity == 'dark')}, {level}, so particles "
        "cannot be told from background. Check the acquisition's contrast and the polarity "
        "(polarity='dark' for particles darker than background); for 16-bit data, set "
        "intensity_range to the useful range."
    )


def warn_if_degenerate(model, particle_pmf, low, high, background_weight, is_list):
    """Warn when the particle component is empty, or collapsed to a single intensity
    because the seed level met the background's exclusion level."""
    peak = int(np.argmax(particle_pmf))
    if low >= high and particle_pmf[peak] > 0.99:
        level = mirror_level(peak, model.polarity == 'dark')
        cause = (
            f"the seed level met the background's exclusion level and the particle intensity "
            f"distribution collapsed onto one {'intensity' if keeps_8bit_values(model) else 'bin'} "
            f"({level}): the brightest voxels are too few or all alike to describe particles"
        )
    elif 1.0 - background_weight < 1e-6:
        cause = f"the particle component's weight is {1.0 - background_weight:.1e}, i.e. empty"
    else:
        return
    remedy = (
        "Crops pooled in one fit must share one intensity scale; when their brightness "
        "differs, fit one model per crop (nanoseg.tuning.PerVolume, as nanoseg.tune does). "
        if is_list
        else ""
    )
    warnings.warn(
        f"Degenerate fit: {cause}, so the posterior will find (almost) no particles. {remedy}"
        "Try percentile_low='otsu' or a lower percentile_low, and check that the image holds "
        "particles.",
        DegenerateFitWarning,
        stacklevel=5,
    )
