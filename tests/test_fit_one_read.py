"""The mixture's one-read fit of 8-bit data: the model of the two-pass fit, from fewer reads."""

import numpy as np
import pytest

import nanoseg._engine.fit as fit_engine
from nanoseg import NanoparticleMixture
from nanoseg._ops import seeds
from nanoseg.datasets import make_phantom

from test_kernels import plain_background_histogram

FITTED = (
    "stack_histogram_", "background_histogram_", "stack_pmf_", "background_pmf_", "particle_pmf_",
    "low_intensity_", "high_intensity_", "background_weight_", "neg_log_likelihood_", "n_iter_",
)


@pytest.fixture(scope="module")
def drifting():
    """A stack whose brightness drifts strongly along z: slabs predict different levels."""
    return make_phantom((36, 80, 96), n_particles=50, drift=10.0, random_state=5)[0]


class SliceCounter:
    """Counts the slices each background pass (pass 2) is given."""

    def __init__(self, monkeypatch):
        self.slices = 0
        original = fit_engine._background_pass

        def counting(model, work, *args, **kwargs):
            self.slices += sum(len(group) for _, group in work)
            return original(model, work, *args, **kwargs)

        monkeypatch.setattr(fit_engine, "_background_pass", counting)


def fit_both(volume, monkeypatch, **params):
    """The same mixture fitted with the two-pass fit and the one-read fit."""
    monkeypatch.setattr(fit_engine, "ONE_READ", False)
    two = NanoparticleMixture(tol=1e-6, **params).fit(volume)
    monkeypatch.setattr(fit_engine, "ONE_READ", True)
    one = NanoparticleMixture(tol=1e-6, **params).fit(volume)
    return two, one


def assert_same_model(a, b):
    for name in FITTED:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"polarity": "dark"},
        {"percentile_low": "otsu"},
        {"percentile_low": 97.0, "min_seed_size": 3, "halo_pad": 2},
        {"sampling_step": 3},
        {"n_jobs": 1},
    ],
)
@pytest.mark.parametrize("budget", [None, 96 * 80 * 4 * 2 * 3])
def test_one_read_gives_the_two_pass_model(drifting, monkeypatch, params, budget):
    volume = 255 - drifting if params.get("polarity") == "dark" else drifting
    two, one = fit_both(volume, monkeypatch, memory_budget=budget, **params)
    assert_same_model(two, one)


def test_mispredicted_slabs_are_read_again(drifting, monkeypatch):
    """Slabs whose predicted levels miss the final one are read a second
    time, and only those; the slabs held to the end never are, and predict
    nothing."""
    depth = 3
    # Two threads' slabs plus the held slabs' values (a quarter of a slab's
    # working memory each, rounded up): slabs of 3 slices, 12 slabs.
    in_flight = 2 + -(-fit_engine.HELD_SLABS // 4)
    params = dict(tol=1e-6, memory_budget=96 * 80 * 4 * depth * in_flight, n_jobs=2)
    monkeypatch.setattr(fit_engine, "ONE_READ", False)
    two = NanoparticleMixture(**params).fit(drifting)
    monkeypatch.setattr(fit_engine, "ONE_READ", True)
    n_held = fit_engine.HELD_SLABS * depth

    counter = SliceCounter(monkeypatch)
    asked = []

    def never_right(so_far, own, settled, bounds=None):
        asked.append(so_far)
        return [300]

    monkeypatch.setattr(fit_engine, "_candidate_levels", never_right)
    assert_same_model(two, NanoparticleMixture(**params).fit(drifting))
    assert counter.slices == drifting.shape[0] - n_held  # all but the held slabs
    assert len(asked) == drifting.shape[0] // depth - fit_engine.HELD_SLABS

    counter = SliceCounter(monkeypatch)
    monkeypatch.setattr(fit_engine, "_candidate_levels", lambda so_far, own, settled, bounds=None: list(range(-1, 257)))
    assert_same_model(two, NanoparticleMixture(**params).fit(drifting))
    assert counter.slices == 0


def test_a_volume_in_one_slab_is_read_once(drifting, monkeypatch):
    counter = SliceCounter(monkeypatch)
    two, one = fit_both(drifting, monkeypatch)
    assert_same_model(two, one)
    assert counter.slices == drifting.shape[0]  # the two-pass fit's pass 2 only


@pytest.mark.parametrize("params", [{"binning": "range"}, {"halo": "dilation"}])
def test_binned_data_and_dilation_halos_keep_two_passes(drifting, monkeypatch, params):
    counter = SliceCounter(monkeypatch)
    NanoparticleMixture(tol=1e-6, **params).fit(drifting)
    assert counter.slices == drifting.shape[0]


def test_candidate_levels():
    assert fit_engine._candidate_levels(None, None) == []
    assert fit_engine._candidate_levels(150, None) == [149, 150, 151]
    assert fit_engine._candidate_levels(150, 150) == [149, 150, 151]
    assert fit_engine._candidate_levels(150, 152) == [149, 150, 151, 152, 153]
    # Capped, nearest the level of the histograms read so far.
    capped = fit_engine._candidate_levels(150, 170)
    assert len(capped) == fit_engine.MAX_PREDICTED_LEVELS and 150 in capped and 170 not in capped
    assert fit_engine._candidate_levels(150, 130) == [147, 148, 149, 150, 151]
    # Settled and agreeing: that level alone; settled but not agreeing: as before.
    assert fit_engine._candidate_levels(150, 150, settled=True) == [150]
    assert fit_engine._candidate_levels(150, 151, settled=True) == [149, 150, 151, 152]
    assert fit_engine._candidate_levels(150, None, settled=True) == [149, 150, 151]
    # Settled with bounds: only the levels the stack can still reach, and the prediction.
    assert fit_engine._candidate_levels(150, 153, settled=True, bounds=(150, 151)) == [150, 151]
    assert fit_engine._candidate_levels(150, 153, settled=True, bounds=(152, 152)) == [150, 152]
    # Not settled: bounds are not used.
    assert fit_engine._candidate_levels(150, 152, bounds=(150, 150)) == [149, 150, 151, 152, 153]


@pytest.mark.parametrize("dark", [False, True])
@pytest.mark.parametrize("percentile", [90.0, 99.5])
def test_level_bounds_hold_the_stack_level_while_slabs_stay_within_those_seen(dark, percentile):
    """Slabs mixed from the two most extreme ones lie between them, bin by
    bin: after those two, every bound holds the whole stack's final level."""
    rng = np.random.default_rng(0)
    model = NanoparticleMixture(percentile_low=percentile, polarity="dark" if dark else "bright")
    dim = np.bincount(np.clip(rng.normal(90, 20, 50_000), 0, 255).astype(int), minlength=256)
    bright = np.bincount(np.clip(rng.normal(130, 25, 50_000), 0, 255).astype(int), minlength=256)
    slabs = [dim, bright] + [
        np.round(w * dim + (1 - w) * bright).astype(np.int64) for w in rng.uniform(0, 1, 12)
    ]
    final = fit_engine._predicted_level(model, np.sum(slabs, axis=0), dark)
    spread = fit_engine._SlabSpread()
    counted = np.zeros(256, dtype=np.int64)
    total = sum(int(h.sum()) for h in slabs)
    widths = []
    for i, hist in enumerate(slabs):
        counted = counted + hist
        spread.add(hist)
        if i == 0:
            continue
        low, high = fit_engine._level_bounds(model, counted, spread.extremes(), total - counted.sum(), dark)
        assert low <= final <= high
        widths.append(high - low)
    # The bounds close in on the level as the slabs are counted.
    assert widths[-1] == 0 and widths[0] > 0 and widths == sorted(widths, reverse=True)
    assert fit_engine._level_bounds(NanoparticleMixture(percentile_low="otsu"), counted, spread.extremes(), 0, dark) is None
    assert fit_engine._level_bounds(model, counted, fit_engine._SlabSpread().extremes(), 0, dark) is None


class _LocalRemote:
    """A stand-in for fit_workers.WorkerSlabs that runs each task here and
    records its arguments."""

    def __init__(self, work, calls):
        self.work, self.calls = work, calls

    def subset(self, positions):
        return _LocalRemote([self.work[p] for p in positions], self.calls)

    def map(self, function, arguments, *, progress, desc=None):
        out = []
        for position, (volume, group) in enumerate(self.work):
            self.calls.append(arguments(position))
            out.append(function(volume.read_slices(group), *arguments(position)))
        return out


def test_the_workers_second_round_counts_within_the_bounds_the_first_sets(drifting):
    """The client passes the second round the bounds that the first round's
    slabs set; they hold the stack's level, and every slab of that round
    counts only levels within them (or its prediction). The models made on
    a real cluster are compared in test_distributed."""
    from nanoseg._volume import as_volume

    model = NanoparticleMixture(tol=1e-6)
    volume = as_volume(drifting)
    work = [(volume, group) for group in volume.slabs(3)]
    calls = []
    hists, predicted = fit_engine._remote_histogram_and_seed_pass(model, _LocalRemote(work, calls), {"disable": True})
    final = fit_engine.seed_level(model, hists.sum(axis=0))
    first, rest = calls[: fit_engine.SETTLED_SLABS + 1], calls[fit_engine.SETTLED_SLABS + 1 :]
    assert all(len(args) == 3 and args[2] is None for args in first)
    bounds = {args[3] for args in rest}
    assert len(rest) == len(work) - len(first) and len(bounds) == 1
    low, high = bounds.pop()
    assert low <= final <= high
    # Each slab of the second round counted within the bounds, or its prediction.
    for position in fit_engine.spread_order(len(work))[fit_engine.SETTLED_SLABS + 1 :]:
        levels = predicted[position][0]
        assert all(low <= level <= high or level == rest[0][2] for level in levels)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 8, 9, 33])
def test_spread_order_is_a_permutation_starting_at_both_ends(n):
    order = fit_engine.spread_order(n)
    assert sorted(order) == list(range(n))
    if n > 2:
        assert order[:3] == [0, n - 1, n // 2]


@pytest.mark.parametrize("dark", [False, True])
@pytest.mark.parametrize("shape", [(37, 200), (64, 64), (5, 129)])
def test_several_seed_levels_at_once_match_one_at_a_time(shape, dark):
    """Every level of one call of the compiled kernel equals the plain
    seed-box histogram at that level (rows whose width is no multiple of 8
    end inside a word of the seed scan)."""
    rng = np.random.default_rng(sum(shape))
    from scipy import ndimage as ndi

    image = (ndi.gaussian_filter(rng.normal(size=shape), 1.5) * 300 + 128).clip(0, 255).astype(np.uint8)
    model_image = 255 - image if dark else image
    levels = [int(np.percentile(model_image, q)) for q in (90, 93, 96, 98, 99.5)] + [-1, 254, 255, 400]
    counted = seeds.excluded_box_histograms(image, levels, min_seed_size=3, halo_pad=2, dark=dark)
    hist = np.bincount(model_image.ravel(), minlength=256)
    for level, row in zip(levels, counted):
        expected = hist - plain_background_histogram(model_image, level, 256, 3, 2)
        np.testing.assert_array_equal(row[::-1] if dark else row, expected, err_msg=str(level))


@pytest.mark.parametrize("budget", [None, "200KB"])
@pytest.mark.parametrize("images", [False, True])
def test_lists_of_crops_give_the_two_pass_model(monkeypatch, budget, images):
    """Crops of different shapes (volumes, or 2D images) fitted together:
    their slabs mix in the spread order, and the model is the same."""
    crops = [make_phantom((n, 64, 80), n_particles=15, random_state=n)[0] for n in (6, 11, 3)]
    if images:
        crops = [crop[0] for crop in crops]
    two, one = fit_both(crops, monkeypatch, memory_budget=budget)
    assert_same_model(two, one)
