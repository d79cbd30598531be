"""Per-slice kernels agree with plain NumPy/SciPy formulations."""

import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage as ndi

import nanoseg._ops._numba as jit
from nanoseg._ops import histogram, lookup, seeds
from nanoseg._backend import CPU


@pytest.fixture(params=["compiled", "numpy"])
def kernel_path(request, monkeypatch):
    """Run a test with the numba kernels and with the NumPy fallbacks."""
    monkeypatch.setattr(jit, "ENABLED", request.param == "compiled")
    if request.param == "compiled":
        assert jit.available()
    return request.param


@pytest.mark.parametrize("shape", [(7,), (255, 257), (3, 101, 99), (2**17 + 1,)])
def test_histogram_is_exact(shape, kernel_path):
    values = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    np.testing.assert_array_equal(histogram.histogram(CPU, values), np.bincount(values.ravel(), minlength=256))
    view = values[..., ::2] if values.ndim > 1 else values[::3]
    np.testing.assert_array_equal(histogram.histogram(CPU, view), np.bincount(view.ravel(), minlength=256))


def plain_background_histogram(image, low, high, min_seed_size, halo_pad):
    labels, _ = ndi.label(image > low, structure=np.ones((3, 3)))
    excluded = image >= high
    for index, box in enumerate(ndi.find_objects(labels), start=1):
        if np.count_nonzero(labels[box] == index) >= min_seed_size:
            rows, cols = box
            excluded[
                max(rows.start - halo_pad, 0) : rows.stop + halo_pad,
                max(cols.start - halo_pad, 0) : cols.stop + halo_pad,
            ] = True
    return np.bincount(image[~excluded], minlength=256)


@pytest.mark.parametrize("path", ["compiled", "sparse", "dense"])
@pytest.mark.parametrize("seed", range(3))
def test_background_histogram_all_paths(path, seed, monkeypatch):
    monkeypatch.setattr(jit, "ENABLED", path == "compiled")
    monkeypatch.setattr(seeds, "SPARSE_SEED_FRACTION", 1.0 if path == "sparse" else -1.0)
    rng = np.random.default_rng(seed)
    image = (ndi.gaussian_filter(rng.normal(size=(120, 90)), 2) * 400 + 120).clip(0, 255).astype(np.uint8)
    low, high = np.percentile(image, [97, 99.5]).astype(int)
    for min_seed_size, halo_pad in [(1, 0), (5, 3), (20, 20)]:
        expected = plain_background_histogram(image, low, high, min_seed_size, halo_pad)
        got = seeds.background_histogram(CPU, image.copy(), low, high, min_seed_size=min_seed_size, halo_pad=halo_pad)
        np.testing.assert_array_equal(got, expected)
    # A strided view, and levels at and beyond the ends of the range.
    view = image[::2, 1::2]
    for low, high in [(-1, 0), (0, 1), (254, 255), (255, 256), (300, 300)]:
        expected = plain_background_histogram(view, low, high, 3, 2)
        got = seeds.background_histogram(CPU, view, low, high, min_seed_size=3, halo_pad=2)
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("seed", range(3))
def test_background_histogram_dark_compiled_equals_numpy(seed, monkeypatch):
    """Dark particles: seeds below ``255 - low``, never background at or below ``255 - high``."""
    rng = np.random.default_rng(seed)
    image = (ndi.gaussian_filter(rng.normal(size=(80, 110)), 2) * 400 + 120).clip(0, 255).astype(np.uint8)
    low, high = 255 - np.percentile(image, [3, 0.5]).astype(int)
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(jit, "ENABLED", enabled)
        results.append(
            seeds.background_histogram(CPU, image, low, high, min_seed_size=4, halo_pad=5, dark=True)
        )
    np.testing.assert_array_equal(results[0], results[1])
    mirrored = plain_background_histogram(255 - image, low, high, 4, 5)
    np.testing.assert_array_equal(results[0], mirrored[::-1])


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, bool])
def test_slice_histograms_and_luts(dtype, kernel_path):
    rng = np.random.default_rng(2)
    slab = rng.integers(0, 256, (5, 33, 70), dtype=np.uint8)
    hists = histogram.slice_histograms(CPU, slab)
    np.testing.assert_array_equal(hists, [np.bincount(s.ravel(), minlength=256) for s in slab])
    luts = rng.random((5, 256)) > 0.5 if dtype is bool else rng.random((5, 256)).astype(dtype)
    expected = np.stack([lut[s] for lut, s in zip(luts, slab)])
    np.testing.assert_array_equal(lookup.apply_luts(CPU, slab, luts), expected)
    strided = slab[:, ::2, 1::3]
    np.testing.assert_array_equal(
        lookup.apply_luts(CPU, strided, luts), np.stack([lut[s] for lut, s in zip(luts, strided)])
    )


@pytest.mark.parametrize("shape", [(1, 40), (40, 1), (2, 2), (37, 64), (64, 37)])
def test_box_histograms_of_scattered_seeds_match_scipy_labels(shape):
    """Seeds scattered as noise (single pixels, diagonal pairs, clumps that
    touch the first and the last column and join late, as U shapes do), at
    several levels at once: every level's boxes are scipy's 8-connected
    components' boxes."""
    rng = np.random.default_rng(sum(shape))
    for trial in range(20):
        image = rng.integers(0, 256, shape).astype(np.uint8)
        if trial % 2:
            image = (image.astype(float) ** rng.uniform(0.3, 3) / 255 ** (rng.uniform(0.3, 3) - 1)).clip(0, 255)
            image = image.astype(np.uint8)
        levels = sorted(rng.choice(np.arange(120, 250), size=3, replace=False).tolist())
        min_seed_size, halo_pad = int(rng.integers(1, 5)), int(rng.integers(0, 3))
        counted = seeds.excluded_box_histograms(image, levels, min_seed_size=min_seed_size, halo_pad=halo_pad)
        hist = np.bincount(image.ravel(), minlength=256)
        for level, excluded in zip(levels, counted):
            expected = plain_background_histogram(image, level, 256, min_seed_size, halo_pad)
            np.testing.assert_array_equal(hist - excluded, expected)


def test_box_histograms_use_the_seed_count_from_the_histogram():
    rng = np.random.default_rng(5)
    image = (ndi.gaussian_filter(rng.normal(size=(70, 95)), 2) * 400 + 120).clip(0, 255).astype(np.uint8)
    low = int(np.percentile(image, 96))
    hist = np.bincount(image.ravel(), minlength=256)
    counted = seeds.excluded_box_histograms(image, [low], min_seed_size=3, halo_pad=4)
    given = seeds.excluded_box_histograms(image, [low], min_seed_size=3, halo_pad=4, hist=hist)
    np.testing.assert_array_equal(given, counted)
    # A histogram announcing too few seeds must not corrupt anything: same result.
    short = seeds.excluded_box_histograms(image, [low], min_seed_size=3, halo_pad=4, hist=np.zeros(256, np.int64))
    np.testing.assert_array_equal(short, counted)
    expected = plain_background_histogram(image, low, 256, 3, 4)
    np.testing.assert_array_equal(hist - counted[0], expected)


def textbook_em(p_stack, p_bg, w_bg, low, max_iter, tol, eps):
    """The EM of the seed method written plainly: the oracle for the package's loop."""
    from nanoseg import _model

    tail = np.zeros_like(p_stack)
    tail[low:] = p_stack[low:]
    p_np = _model.normalize_pmf(tail, eps)
    nll_prev, nll, n_iter = np.inf, np.nan, 0
    for iteration in range(max_iter):
        weighted_bg = w_bg * p_bg
        gamma_bg = weighted_bg / (weighted_bg + (1.0 - w_bg) * p_np + eps)
        p_np = _model.normalize_pmf((1.0 - gamma_bg) * p_stack, eps)
        w_bg = float(np.clip(np.sum(p_stack * gamma_bg), eps, 1.0 - eps))
        nll = _model.mixture_nll(p_stack, p_bg, p_np, w_bg, eps)
        n_iter = iteration + 1
        if nll_prev - nll < tol:
            break
        nll_prev = nll
    return p_np, w_bg, nll, n_iter


def em_problem(seed):
    from nanoseg import _model

    rng = np.random.default_rng(seed)
    background = rng.gamma(1.0, 1.0, 256) * np.exp(-np.arange(256) / rng.uniform(10, 60))
    stack = background.copy()
    start = int(rng.integers(120, 220))
    stack[start:] += rng.random(256 - start) * 10.0 ** rng.uniform(-4, -1)
    p_stack, p_bg = _model.normalize_pmf(stack, 1e-12), _model.normalize_pmf(background, 1e-12)
    return p_stack, p_bg, rng.random(), start - int(rng.integers(0, 30)), [0.0, 1e-12, 1e-8, 1e-6][seed % 4]


@pytest.mark.parametrize("seed", range(12))
def test_em_loop_is_bit_identical_to_the_textbook_form(seed, kernel_path):
    from nanoseg import _model

    p_stack, p_bg, w, low, tol = em_problem(seed)
    p_np, w_bg, nll, n_iter = textbook_em(p_stack, p_bg, w, low, 2000, tol, 1e-12)
    got = _model.fit_particle_pmf(p_stack, p_bg, w, low, max_iter=2000, tol=tol, eps=1e-12)
    np.testing.assert_array_equal(got.particle_pmf, p_np)
    assert (got.background_weight, got.neg_log_likelihood, got.n_iter) == (w_bg, nll, n_iter)


def test_compiled_em_leaves_close_calls_to_numpy(monkeypatch):
    """Stopping tests too close to call with numba's log are decided with NumPy's."""
    from nanoseg import _model
    from nanoseg._ops import em

    p_stack, p_bg, w, low, tol = em_problem(3)
    tail = _model.normalize_pmf(np.where(np.arange(256) >= low, p_stack, 0.0), 1e-12)
    expected = _model._numpy_em(p_stack, p_bg, tail, w, max_iter=2000, tol=tol, eps=1e-12)
    calls = []
    compiled_em = em.compiled_em
    monkeypatch.setattr(em, "compiled_em", lambda *a, **k: calls.append(1) or compiled_em(*a, **k))
    monkeypatch.setattr(em, "STOP_MARGIN", 1e300)  # every test is "too close"
    got = _model.fit_particle_pmf(p_stack, p_bg, w, low, max_iter=2000, tol=tol, eps=1e-12)
    assert len(calls) == expected.n_iter - 1  # handed back after every update but the first
    np.testing.assert_array_equal(got.particle_pmf, expected.particle_pmf)
    assert (got.background_weight, got.neg_log_likelihood, got.n_iter, got.converged) == (
        expected.background_weight, expected.neg_log_likelihood, expected.n_iter, expected.converged
    )


@pytest.mark.parametrize("max_iter", [0, 1, 3])
def test_compiled_em_stops_at_max_iter_like_numpy(max_iter, monkeypatch):
    from nanoseg import _model

    p_stack, p_bg, w, low, tol = em_problem(1)
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(jit, "ENABLED", enabled)
        results.append(_model.fit_particle_pmf(p_stack, p_bg, w, low, max_iter=max_iter, tol=tol, eps=1e-12))
    np.testing.assert_array_equal(results[0].particle_pmf, results[1].particle_pmf)
    assert results[0].n_iter == results[1].n_iter == max_iter
    assert not results[0].converged and not results[1].converged
    np.testing.assert_equal(results[0].neg_log_likelihood, results[1].neg_log_likelihood)


def test_compiled_em_sums_like_numpy():
    from nanoseg._ops import em

    kernel = em._compiled()["_k_sum"]
    rng = np.random.default_rng(0)
    for n in (1, 7, 8, 9, 127, 128, 129, 255, 256, 257, 1000):
        for _ in range(20):
            values = np.exp(rng.normal(size=n) * 15)
            assert kernel(values) == values.sum()


@pytest.mark.parametrize("prior", [(1.0, 1.0), (1.0, 20.0), (3.0, 200.0), (1.5, 1.0)])
def test_compiled_map_weights_are_numpys_to_the_bit(prior, monkeypatch):
    from nanoseg import _model
    from nanoseg._ops import map_weights

    rng = np.random.default_rng(int(10 * sum(prior)))
    calls = []
    compiled = map_weights.compiled_map_concave
    monkeypatch.setattr(map_weights, "compiled_map_concave", lambda *a: calls.append(1) or compiled(*a))
    for trial in range(40):
        p_bg = rng.dirichlet(np.full(256, rng.uniform(0.1, 5)))
        p_np = rng.dirichlet(np.full(256, rng.uniform(0.1, 5)))
        # Weights of 0 and 1 at the ends, and every size of slice.
        fractions = [0.0, 1e-5, 1e-3, 0.05, 0.5, 1.0][trial % 6 :] or [0.3]
        hists = np.stack([rng.multinomial(int(10 ** rng.uniform(2, 7)), (1 - f) * p_bg + f * p_np) for f in fractions])
        weights = []
        for enabled in (True, False):
            monkeypatch.setattr(jit, "ENABLED", enabled)
            weights.append(_model.map_slice_weights(hists, p_np, p_bg, prior, 1e-12))
        np.testing.assert_array_equal(weights[0], weights[1])
        # One slice at a time (as a lazy posterior's tasks ask) gives the same weights.
        monkeypatch.setattr(jit, "ENABLED", True)
        calls.clear()
        one_by_one = [_model.map_slice_weights(h[None], p_np, p_bg, prior, 1e-12)[0] for h in hists]
        np.testing.assert_array_equal(one_by_one, weights[0])
        assert len(calls) == len(hists)  # the compiled loop, once a slice


def test_kernels_compile_without_a_writable_cache_folder():
    # A read-only install with no user cache folder leaves numba no place to
    # cache compiled kernels; they must then compile in memory, not fail.
    code = (
        "import numba.core.caching as caching\n"
        "caching.CacheImpl._locator_classes = []\n"
        "import numpy as np\n"
        "from nanoseg._ops import _numba, histogram\n"
        "assert _numba.available()\n"
        "print(int(histogram.compiled_slice_histograms(np.full((2, 4, 4), 7, np.uint8))[:, 7].sum()))\n"
    )
    result = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "32"


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("bad", [None, np.nan, np.inf, -np.inf, 1.5, -0.25])
def test_threshold_probabilities_equals_numpy(kernel_path, dtype, bad):
    from nanoseg._ops.threshold import threshold_probabilities

    rng = np.random.default_rng(5)
    values = rng.random((3, 17, 19)).astype(dtype)
    values[0, 0, :3] = (0.0, 1.0, 0.5)
    if bad is not None:
        values[2, 4, 6] = bad
    for threshold in (0.0, 0.5, 1.0):
        mask, valid = threshold_probabilities(values, threshold)
        np.testing.assert_array_equal(mask, values >= threshold)
        assert valid == (bad is None)
    strided = values[:, ::2, 1::3]
    np.testing.assert_array_equal(threshold_probabilities(strided, 0.5)[0], strided >= 0.5)


def test_merge_disjoint_sorted_sets():
    from nanoseg._ops.voxel_sets import merge_disjoint

    rng = np.random.default_rng(4)
    for n in (0, 1, 7, 300):
        values = rng.choice(10_000, n, replace=False)
        split = rng.random(n) < rng.random()
        first, second = np.sort(values[split]), np.sort(values[~split])
        np.testing.assert_array_equal(merge_disjoint(first, second), np.sort(values))


def test_compile_clock_counts_compilation_only(monkeypatch):
    numba = pytest.importorskip("numba")

    def twice(x):
        return 2 * x

    compiled = numba.njit(twice)  # not cached: the first call compiles
    with jit.compile_clock() as clock:
        assert compiled(3) == 6
    assert clock.seconds > 0
    with jit.compile_clock() as again:
        assert compiled(4) == 8  # already compiled: nothing to count
    assert again.seconds == 0
    monkeypatch.setattr(jit, "ENABLED", False)
    with jit.compile_clock() as off:
        assert numba.njit(twice)(5) == 10
    assert off.seconds == 0
