"""Agreement of the nanoseg package with the test oracle (tests/oracle.py).

Tolerances, and why:

* histograms, thresholds, ``n_iter_``: exact. The histograms are integer
  counts; the EM stopping rule is evaluated on float64 values that agree to
  ~1e-15, far from the 1e-10 threshold in practice.
* PMFs, background weight, NLL: 1e-9 absolute (float64 arithmetic done in a
  different order, accumulated over up to 10000 EM iterations).
* per-slice weights: 2e-5 absolute. The oracle solves the MAP problem with
  ``minimize_scalar(method="bounded")`` (xatol = 1e-5), which stops once the
  bracket around its best point is within 2 * (xatol / 3 + sqrt(eps) |x|)
  ~= 6.7e-6 of it; the objective is concave for Beta(a, b) with a, b >= 1, so
  the true optimum lies inside that bracket. A package solving the same
  problem more precisely (or with its own bounded Brent) lands within
  ~1.4e-5 of the oracle; 2e-5 leaves a small margin.
* posterior: 2e-3 absolute against the oracle posterior, where the oracle
  posterior of a slice is taken as the band of lookup-table values over the
  weights that Brent's stopping rule leaves possible, w +- d with
  d = 2 * (xatol / 3 + sqrt(eps) |w|) ~= 6.7e-6 (the table increases with the
  weight, so the band is [LUT(w - d), LUT(w + d)]). For a slice whose weight
  is well above d the band is narrow (width <~ d / (2 w)) and this is the
  plain 2e-3 check. On the pi = 0 bound it is not: where the MAP is exactly 0,
  bounded Brent stops at pi ~ 6e-6, and for intensities with p_np / p_bg ~ 1e3
  that moves the table by several 1e-3 (measured: 5.6e-3 on a 12 x 128 x 128
  phantom against a package that finds the exact 0, with the plain check).
  The oracle does not know the posterior better than that.
  Separately, to isolate the lookup table from the optimiser, the package
  posterior must equal the oracle's lookup table at the package's *own*
  weights and PMFs within 1e-6 (float32 output).
* labels: identical up to renumbering, given the same posterior; end to end,
  also identical unless the two posteriors put some voxel on different sides
  of the threshold; that is accepted only for voxels whose oracle posterior is
  within the posterior tolerance of the threshold, and then both labelers are
  compared on the package's posterior instead.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np
import pytest
from scipy import ndimage

# pytest puts this folder (no __init__.py) on sys.path, so the oracle imports.
from oracle import (
    assert_same_partition,
    oracle_fit,
    oracle_label,
    oracle_lut,
    oracle_posterior,
    oracle_slice_weights,
)

from nanoseg import NanoparticleLabeler, NanoparticleMixture
from nanoseg.datasets import make_phantom

PMF_ATOL = 1e-9
WEIGHT_ATOL = 2e-5
POSTERIOR_ATOL = 2e-3
LUT_CONSISTENCY_ATOL = 1e-6
DEFAULT_BETA = (1.0, 20.0)
FIT_KEYS = (
    "percentile_low",
    "percentile_high",
    "halo_pad",
    "min_seed_size",
    "sampling_step",
    "max_iter",
    "tol",
    "eps",
)


# ---------------------------------------------------------------------------
# test volumes
# ---------------------------------------------------------------------------
def texture_with_blobs(shape, n_blobs, seed):
    """Smooth random texture around 100 with a few bright ellipsoidal blobs."""
    rng = np.random.default_rng(seed)
    sigma = (0.8, 3.0, 3.0) if len(shape) == 3 else (3.0, 3.0)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma)
    img = 100.0 + 30.0 * field / field.std() + rng.normal(0.0, 5.0, size=shape)
    grid = np.indices(shape).astype(np.float64)
    # voxels twice as deep as wide in 3D
    scale = (2.0, 1.0, 1.0) if len(shape) == 3 else (1.0, 1.0)
    for _ in range(n_blobs):
        centre = rng.uniform(0, shape)
        radius = rng.uniform(2.0, 4.0)
        d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, scale))
        inside = d2 <= radius * radius
        img[inside] = rng.uniform(190, 235) + rng.normal(0.0, 6.0, size=int(inside.sum()))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def noise_with_spots(shape, n_spots, seed):
    """Uniform uint8 noise in [0, 220) with a few bright 5 x 5 (x 2) spots."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 220, size=shape, dtype=np.uint8)
    for _ in range(n_spots):
        if len(shape) == 3:
            z, y, x = (int(rng.integers(0, s - 5)) for s in shape)
            region = (slice(z, z + 2), slice(y, y + 5), slice(x, x + 5))
        else:
            y, x = (int(rng.integers(0, s - 5)) for s in shape)
            region = (slice(y, y + 5), slice(x, x + 5))
        img[region] = rng.integers(225, 256, size=img[region].shape, dtype=np.uint8)
    return img


def ramp(n_slices):
    """Every intensity exactly 16 times per 64 x 64 slice, as a raster ramp
    (flipped / transposed in later slices). The stack PMF is exactly 1/256 per
    bin, so its cumulative sum hits 0.5 and 0.75 exactly: with percentiles 50
    and 75 the thresholds depend on searchsorted's side (left: 127 and 191)."""
    base = (np.arange(64 * 64).reshape(64, 64) // 16).astype(np.uint8)
    slices = [base, base[::-1], base.T, base[:, ::-1]]
    return np.stack(slices[:n_slices]) if n_slices > 1 else base


def _phantom(shape, n_particles, random_state):
    image, mask = make_phantom(shape, n_particles=n_particles, random_state=random_state)
    image = np.asarray(image)
    assert image.dtype == np.uint8 and image.shape == tuple(shape)
    return image, np.asarray(mask)


def _phantom_slice(shape, n_particles, random_state):
    """The 2D slice of a 3D phantom holding the most particle voxels."""
    image, mask = _phantom(shape, n_particles, random_state)
    z = int(np.argmax(mask.reshape(mask.shape[0], -1).sum(axis=1)))
    return np.ascontiguousarray(image[z])


_BUILDERS = {
    "phantom-0": lambda: _phantom((12, 128, 128), 20, 0)[0],
    "phantom-1": lambda: _phantom((12, 128, 128), 30, 1)[0],
    "phantom-wide": lambda: _phantom((8, 96, 160), 15, 2)[0],
    "phantom-2d-a": lambda: _phantom_slice((6, 128, 128), 20, 3),
    "phantom-2d-b": lambda: _phantom_slice((4, 160, 160), 25, 4),
    "texture-3d": lambda: texture_with_blobs((10, 96, 96), 12, 0),
    "texture-2d": lambda: texture_with_blobs((160, 160), 6, 1),
    "noise-3d": lambda: noise_with_spots((8, 64, 64), 12, 2),
    "noise-2d": lambda: noise_with_spots((128, 128), 4, 3),
    "ramp-2d": lambda: ramp(1),
    "ramp-3d": lambda: ramp(4),
    "crops": lambda: [
        _volume("phantom-0")[:5, :64, :64],
        _volume("phantom-1")[3:10, 32:96, 32:128],
        _volume("phantom-2d-a"),
    ],
}

VARIANTS = {
    "default": {},
    "step2": {"sampling_step": 2},
    "percentiles": {"percentile_low": 99.0, "percentile_high": 99.9},
    "halo5": {"halo_pad": 5, "min_seed_size": 10},
    "beta-2-50": {"beta_prior": (2.0, 50.0)},
    "max-iter-50": {"max_iter": 50},
    "tol-eps": {"tol": 1e-7, "eps": 1e-10},
    "median": {"percentile_low": 50.0, "percentile_high": 75.0},
}

CASES = [(name, "default") for name in _BUILDERS if not name.startswith("ramp")]
CASES += [
    (name, variant)
    for name in ("phantom-1", "texture-3d", "noise-2d")
    for variant in VARIANTS
    if variant not in ("default", "median")
]
CASES += [("ramp-2d", "median"), ("ramp-3d", "median"), ("ramp-3d", "step2")]
CASES += [("crops", "step2"), ("crops", "beta-2-50")]

PHANTOMS = ["phantom-0", "phantom-1", "phantom-wide", "phantom-2d-a", "phantom-2d-b"]


@lru_cache(maxsize=None)
def _volume(name):
    return _BUILDERS[name]()


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


# ---------------------------------------------------------------------------
# fitted results, computed once per case
# ---------------------------------------------------------------------------
def _fit_params(variant):
    params = VARIANTS[variant]
    return {k: v for k, v in params.items() if k in FIT_KEYS}


def _beta(variant):
    return tuple(VARIANTS[variant].get("beta_prior", DEFAULT_BETA))


def _eps(variant):
    return VARIANTS[variant].get("eps", 1e-12)


@lru_cache(maxsize=None)
def _oracle_model(name, fit_items):
    return oracle_fit(_volume(name), **dict(fit_items))


@lru_cache(maxsize=None)
def _oracle(name, variant):
    fit_items = tuple(sorted(_fit_params(variant).items()))
    model = _oracle_model(name, fit_items)
    vol = _volume(name)
    beta, eps = _beta(variant), _eps(variant)
    weights = oracle_slice_weights(vol, model, beta_prior=beta, eps=eps)
    posterior = oracle_posterior(vol, model, beta_prior=beta, eps=eps)
    return model, weights, posterior


def _fit_package(volume, **params):
    """Fit, tolerating only convergence warnings (the default EM often runs
    to max_iter on small volumes, as in the published code)."""
    model = NanoparticleMixture(**params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        returned = model.fit(volume)
    others = [
        w
        for w in caught
        if "converg" not in f"{w.category.__name__} {w.message}".lower()
    ]
    assert not others, [f"{w.category.__name__}: {w.message}" for w in others]
    assert returned is model
    return model


@lru_cache(maxsize=None)
def _package(name, variant):
    vol = _volume(name)
    model = _fit_package(vol, **VARIANTS[variant])
    weights = model.slice_weights(vol)
    posterior = model.predict_proba(vol)
    return model, weights, posterior


def _case_id(case):
    return f"{case[0]}-{case[1]}"


# ---------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_histograms_and_thresholds(case):
    orc, _, _ = _oracle(*case)
    pkg, _, _ = _package(*case)
    for attr, key in (
        ("stack_histogram_", "hist_stack"),
        ("background_histogram_", "hist_bg"),
    ):
        got = np.asarray(getattr(pkg, attr))
        assert got.shape == (256,), attr
        assert got.dtype == np.int64, attr
        np.testing.assert_array_equal(got, orc[key], err_msg=attr)
    assert int(pkg.low_intensity_) == orc["th_low"]
    assert int(pkg.high_intensity_) == orc["th_high"]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_pmfs_weight_and_nll(case):
    orc, _, _ = _oracle(*case)
    pkg, _, _ = _package(*case)
    for attr, key in (
        ("stack_pmf_", "p_stack"),
        ("background_pmf_", "p_bg"),
        ("particle_pmf_", "p_np"),
    ):
        got = np.asarray(getattr(pkg, attr))
        assert got.shape == (256,), attr
        assert got.dtype == np.float64, attr
        np.testing.assert_allclose(got, orc[key], rtol=0, atol=PMF_ATOL, err_msg=attr)
    assert abs(float(pkg.background_weight_) - orc["w_bg"]) <= PMF_ATOL
    assert abs(float(pkg.neg_log_likelihood_) - orc["nll"]) <= PMF_ATOL


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_em_iterations(case):
    orc, _, _ = _oracle(*case)
    pkg, _, _ = _package(*case)
    assert int(pkg.n_iter_) == orc["nit"] + 1
    assert bool(pkg.converged_) == orc["converged"]


# ---------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_slice_weights(case):
    _, orc_w, _ = _oracle(*case)
    _, pkg_w, _ = _package(*case)
    is_list = isinstance(_volume(case[0]), list)
    assert isinstance(pkg_w, list) == is_list
    orc_w, pkg_w = _as_list(orc_w), _as_list(pkg_w)
    assert len(pkg_w) == len(orc_w)
    for got, want in zip(pkg_w, orc_w):
        got = np.ravel(np.asarray(got, dtype=np.float64))
        assert got.shape == want.shape
        assert np.all((got >= 0) & (got <= 1))
        np.testing.assert_allclose(got, want, rtol=0, atol=WEIGHT_ATOL)


def _brent_bound(weight):
    """Distance from bounded Brent's answer within which the true minimiser of
    a unimodal function lies at termination (scipy's defaults, xatol = 1e-5)."""
    return 2.0 * (1e-5 / 3.0 + np.sqrt(2.2e-16) * abs(weight))


def _oracle_posterior_band(volume, weights, model, eps):
    """Lowest and highest oracle posterior over the weights that Brent's
    stopping rule leaves possible (the lookup table increases with the weight)."""
    stack = volume if volume.ndim == 3 else volume[np.newaxis]
    low = np.empty(stack.shape, dtype=np.float64)
    high = np.empty(stack.shape, dtype=np.float64)
    for z in range(stack.shape[0]):
        delta = _brent_bound(weights[z])
        w_low = max(weights[z] - delta, 0.0)
        w_high = min(weights[z] + delta, 1.0)
        low[z] = oracle_lut(w_low, model["p_np"], model["p_bg"], eps=eps)[stack[z]]
        high[z] = oracle_lut(w_high, model["p_np"], model["p_bg"], eps=eps)[stack[z]]
    return low.reshape(volume.shape), high.reshape(volume.shape)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_posterior(case):
    vol = _volume(case[0])
    orc, orc_w, orc_post = _oracle(*case)
    pkg, _, pkg_post = _package(*case)
    assert isinstance(pkg_post, list) == isinstance(vol, list)
    transformed = pkg.transform(vol)
    for v, got, want, weights, again in zip(
        _as_list(vol), _as_list(pkg_post), _as_list(orc_post), _as_list(orc_w), _as_list(transformed)
    ):
        got = np.asarray(got)
        assert got.shape == v.shape
        assert got.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(again), got)
        got = got.astype(np.float64)
        low, high = _oracle_posterior_band(v, weights, orc, _eps(case[1]))
        assert np.all(low <= want) and np.all(want <= high)
        excess = np.maximum(low - got, got - high)
        if excess.max() > POSTERIOR_ATOL:
            stack_excess = excess.reshape(len(weights), -1).max(axis=1)
            bad = np.flatnonzero(stack_excess > POSTERIOR_ATOL)
            pytest.fail(
                f"posterior outside the oracle band by up to {excess.max():.3g} "
                f"(> {POSTERIOR_ATOL:g}) in slices {bad.tolist()}; plain max "
                f"|difference| {np.abs(got - want).max():.3g}; oracle weights "
                f"{np.round(weights[bad], 7).tolist()}"
            )


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_posterior_flat_tolerance_against_tightly_solved_oracle(case):
    """The acceptance criterion as stated: |posterior - oracle| <= 2e-3 everywhere,
    with the oracle's bounded Brent run to xatol=1e-12 instead of its default
    (which stops ~6e-6 away from a weight of exactly 0; see the module notes)."""
    name, variant = case
    vol = _volume(name)
    model = _oracle_model(name, tuple(sorted(_fit_params(variant).items())))
    want = oracle_posterior(vol, model, beta_prior=_beta(variant), eps=_eps(variant), xatol=1e-12)
    _, _, got = _package(*case)
    for g, w in zip(_as_list(got), _as_list(want)):
        np.testing.assert_allclose(np.asarray(g, dtype=np.float64), w, rtol=0, atol=POSTERIOR_ATOL)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_posterior_is_lut_of_own_weights(case):
    """The package posterior is the oracle's lookup table at the package's own
    per-slice weights and PMFs (isolates the table from the optimiser)."""
    vol = _volume(case[0])
    pkg, pkg_w, pkg_post = _package(*case)
    eps = _eps(case[1])
    p_np = np.asarray(pkg.particle_pmf_, dtype=np.float64)
    p_bg = np.asarray(pkg.background_pmf_, dtype=np.float64)
    for v, weights, got in zip(_as_list(vol), _as_list(pkg_w), _as_list(pkg_post)):
        stack = v if v.ndim == 3 else v[np.newaxis]
        weights = np.ravel(np.asarray(weights, dtype=np.float64))
        got = np.asarray(got, dtype=np.float64).reshape(stack.shape)
        for z in range(stack.shape[0]):
            table = oracle_lut(weights[z], p_np, p_bg, eps=eps)
            np.testing.assert_allclose(
                got[z], table[stack[z]], rtol=0, atol=LUT_CONSISTENCY_ATOL,
                err_msg=f"slice {z}",
            )


def test_list_input_matches_separate_predictions():
    crops = _volume("crops")
    pkg, pkg_w, pkg_post = _package("crops", "default")
    for crop, w, post in zip(crops, pkg_w, pkg_post):
        np.testing.assert_array_equal(np.ravel(pkg.slice_weights(crop)), np.ravel(w))
        np.testing.assert_array_equal(np.asarray(pkg.predict_proba(crop)), np.asarray(post))


# ---------------------------------------------------------------------------
# labelling on the same posterior
# ---------------------------------------------------------------------------
def _smooth_posterior(shape, seed):
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random(shape), 1.5)
    field = (field - field.min()) / (field.max() - field.min())
    return field.astype(np.float32)


def _uniform_posterior(shape, seed):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def _phantom_posterior():
    return np.asarray(_oracle("phantom-0", "default")[2], dtype=np.float32)


_POSTERIORS = {
    "smooth-3d": lambda: _smooth_posterior((10, 40, 40), 0),
    "smooth-2d": lambda: _smooth_posterior((96, 96), 1),
    "uniform-3d": lambda: _uniform_posterior((6, 24, 24), 2),
    "uniform-2d": lambda: _uniform_posterior((64, 64), 3),
    "smooth-3d-f64": lambda: _smooth_posterior((8, 32, 48), 4).astype(np.float64),
    "phantom": _phantom_posterior,
}


@lru_cache(maxsize=None)
def _posterior_input(name):
    return _POSTERIORS[name]()


def _label_cases():
    cases = []
    for radius in (0, 1, 2):
        for connectivity in (1, 2, 3):
            for threshold, min_size in ((0.7, 10), (0.55, 1)):
                cases.append(("smooth-3d", threshold, radius, connectivity, min_size))
        for connectivity in (1, 2):
            cases.append(("smooth-2d", 0.7, radius, connectivity, 5))
            cases.append(("uniform-2d", 0.8, radius, connectivity, 3))
        cases.append(("uniform-3d", 0.85, radius, 3, 2))
        cases.append(("smooth-3d-f64", 0.6, radius, 2, 20))
        cases.append(("phantom", 0.95, radius, 2, 10))
    cases.append(("phantom", 0.5, 1, 1, 1))
    cases.append(("smooth-3d", 0.7, 1, 2, 50))
    return cases


def _label_id(case):
    name, threshold, radius, connectivity, min_size = case
    return f"{name}-t{threshold}-r{radius}-c{connectivity}-m{min_size}"


def _check_labels(labels, shape):
    labels = np.asarray(labels)
    assert labels.shape == shape
    assert labels.dtype == np.uint32
    ids = np.unique(labels[labels > 0])
    np.testing.assert_array_equal(ids, np.arange(1, ids.size + 1))  # 1..K
    return labels


@pytest.mark.parametrize("case", _label_cases(), ids=_label_id)
def test_labeler_on_same_posterior(case):
    name, threshold, radius, connectivity, min_size = case
    posterior = _posterior_input(name)
    params = dict(threshold=threshold, radius=radius, connectivity=connectivity, min_size=min_size)
    got = NanoparticleLabeler(**params).transform(posterior)
    got = _check_labels(got, posterior.shape)
    want = oracle_label(posterior, **params)
    assert_same_partition(got, want)


@pytest.mark.parametrize("shape", [(5, 16, 16), (20, 20)])
@pytest.mark.parametrize("fill", ["zeros", "ones", "single"])
def test_labeler_edge_cases(shape, fill):
    posterior = np.zeros(shape, dtype=np.float32)
    if fill == "ones":
        posterior[...] = 1.0
    elif fill == "single":
        posterior[(2,) * len(shape)] = 1.0
    for radius in (0, 1):
        params = dict(threshold=0.95, radius=radius, connectivity=1, min_size=1)
        got = _check_labels(NanoparticleLabeler(**params).transform(posterior), shape)
        assert_same_partition(got, oracle_label(posterior, **params))


# ---------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------
_E2E_PARAMS = {
    "default": {"threshold": 0.95, "radius": 1, "connectivity": 2, "min_size": 10},
    "r2-c3": {"threshold": 0.95, "radius": 2, "connectivity": 3, "min_size": 5},
    "t0.8-r0-c1": {"threshold": 0.8, "radius": 0, "connectivity": 1, "min_size": 3},
}


@pytest.mark.parametrize("params_id", list(_E2E_PARAMS))
@pytest.mark.parametrize("name", PHANTOMS)
def test_end_to_end_labels(name, params_id):
    vol = _volume(name)
    params = dict(_E2E_PARAMS[params_id])
    params["connectivity"] = min(params["connectivity"], vol.ndim)
    threshold = params["threshold"]
    _, _, orc_post = _oracle(name, "default")
    _, _, pkg_post = _package(name, "default")
    pkg_post = np.asarray(pkg_post)

    got = _check_labels(NanoparticleLabeler(**params).transform(pkg_post), vol.shape)
    want = oracle_label(orc_post, **params)
    if params_id == "default" and vol.ndim == 3:
        assert want.max() > 0, "phantom yields no particle at the default settings"

    flipped = (pkg_post >= threshold) != (orc_post >= threshold)
    if not flipped.any():
        assert_same_partition(got, want)
        return
    # The thresholded masks differ: only acceptable for voxels whose oracle
    # posterior is within the posterior tolerance of the threshold. Then the
    # labels legitimately differ; compare both labelers on the same posterior.
    gap = np.abs(orc_post[flipped] - threshold)
    assert gap.max() <= POSTERIOR_ATOL, (
        f"{int(flipped.sum())} voxels change side of the threshold, up to "
        f"{gap.max():.3g} away from it"
    )
    assert_same_partition(got, oracle_label(pkg_post, **params))
