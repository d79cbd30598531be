"""The mixture's fit: histogram passes over the sampled slices, then EM on the histograms.

Pass 1 counts every sampled slice's 256-bin histogram (for 16-bit data: the
counts of every raw value, which fix the binning first). The stack histogram
gives the seed and exclusion levels. Pass 2 subtracts, slice by slice, the
pixels near seeds (:mod:`nanoseg._ops.seeds`) to get the background
histogram. EM (:mod:`nanoseg._model`) then fits the particle PMF. Both passes
read slabs of whole planes on threads (:mod:`nanoseg._plan`); memory is
bounded by the slab size.

The functions take the estimator itself as `model` and read only its
hyper-parameters.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from tqdm import tqdm

from .. import _model
from .._intensity import Binning, choose_binning
from .._model import mirror, mirror_level
from .._ops.histogram import slice_histograms
from .._ops.lookup import to_bins
from .._ops.seeds import slab_background_histograms
from .._plan import HISTOGRAM_BYTES_PER_VOXEL, mapping_bytes, ordered_map, slab_depth
from .._validation import check_intensity_range

#: The binning of 8-bit data under binning="auto": every value is its own bin.
IDENTITY = Binning("range", 0, 255)
UINT16_MAX = 2**16 - 1
# Above this fraction of voxels at or beyond the seed percentile, the data is
# treated as saturated (see check_not_saturated).
SATURATED_FRACTION = 0.5


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
    work = [
        (volume, group)
        for volume, indices in zip(volumes, sampled)
        for group in volume.slabs(
            slab_depth(
                volume, HISTOGRAM_BYTES_PER_VOXEL + mapping_bytes(volume, maps),
                memory_budget=model.memory_budget, n_in_flight=n_jobs, verbose=model.verbose, what="histograms",
            ),
            indices,
        )
    ]
    progress = {"total": n_slices, "unit": "slice", "disable": not model.verbose}

    if wide:
        # Pass 1 for 16-bit data: the binning must be fixed before any slab
        # is mapped, so this pass counts every raw value over all sampled
        # slices (65,536 counters: 512 KiB per thread, whatever the
        # volume's size). The per-slice histograms of the mapped data are
        # counted in pass 2, which reads every slab anyway: no extra pass.
        value_counts = _value_counts(work, backend, n_jobs, progress)
        binning = _choose_binning(model, value_counts)
        slice_hists = None
        raw_stack_hist = binning.fold(value_counts)
    else:
        # Pass 1: every sampled slice's histogram (kept: 2 KiB a slice), by raw intensity.
        slice_hists = _slice_histogram_pass(work, backend, n_jobs, progress)
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
        low = _model.otsu_intensity(stack_hist)
        high = max(high, low)
    else:
        low = _model.percentile_intensity(stack_pmf, model.percentile_low)
        check_not_saturated(model, stack_hist, low, binning)

    raw_background_hist, counted = _background_pass(
        model, work, backend, n_jobs, progress, binning, slice_hists, low, high
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


def _slice_histogram_pass(work, backend, n_jobs, progress):
    """Pass 1 (8-bit data): the histogram of every sampled slice, by raw intensity."""

    def histograms(item):
        volume, group = item
        with backend.stream():
            return backend.to_host(slice_histograms(backend, volume.read_slices(group, backend)))

    parts = []
    with tqdm(desc="Stack histogram", **progress) as bar:
        for hists in ordered_map(histograms, work, n_jobs):
            parts.append(hists)
            bar.update(len(hists))
    return np.concatenate(parts)


def _background_pass(model, work, backend, n_jobs, progress, binning, slice_hists, low, high):
    """Pass 2: the background histogram, by raw intensity (bin); and, when
    `slice_hists` is None (16-bit data), the slices' histograms counted on the way."""
    dark = model.polarity == "dark"
    firsts = np.cumsum([0] + [len(group) for _, group in work])

    def background(numbered):
        position, (volume, group) = numbered
        first = firsts[position]
        with backend.stream():
            slab = to_bins(backend, volume.read_slices(group, backend), binning)
            if slice_hists is None:
                hists = slice_histograms(backend, slab)
            else:
                hists = slice_hists[first : first + len(group)]
            kept = slab_background_histograms(
                backend, slab, low, high,
                min_seed_size=model.min_seed_size, halo_pad=model.halo_pad,
                hists=hists, dark=dark, halo=model.halo,
            )
            counted = backend.to_host(hists) if slice_hists is None else None
            return backend.to_host(kept).sum(axis=0), len(group), counted

    total = np.zeros(_model.N_BINS, dtype=np.int64)
    counted_hists = []
    with tqdm(desc="Background histogram", **progress) as bar:
        for hist, n, counted in ordered_map(background, enumerate(work), n_jobs):
            total += hist
            counted_hists.append(counted)
            bar.update(n)
    return total, (np.concatenate(counted_hists) if slice_hists is None else None)


def _value_counts(work, backend, n_jobs, progress):
    """Counts of every 16-bit value over the slabs of `work`: (65536,) int64."""

    def count(item):
        volume, group = item
        with backend.stream():
            slab = volume.read_slices(group, backend)
            total = backend.xp.zeros(UINT16_MAX + 1, dtype=np.int64)
            # Plane by plane: bincount widens its input to 64-bit integers,
            # so this bounds that copy to one plane.
            for plane in slab:
                total += backend.xp.bincount(plane.reshape(-1), minlength=UINT16_MAX + 1)
            return backend.to_host(total), len(group)

    counts = np.zeros(UINT16_MAX + 1, dtype=np.int64)
    with tqdm(desc="Intensity range", **progress) as bar:
        for total, n in ordered_map(count, work, n_jobs):
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
