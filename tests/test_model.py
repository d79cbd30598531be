"""The histogram-level math: PMFs, EM, MAP slice weights, lookup tables."""

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from nanoseg import _model


def test_normalize_pmf_floor_and_uniform():
    pmf = _model.normalize_pmf(np.r_[3, 1, np.zeros(254)], eps=1e-3)
    # 0.75, 0.25 and 254 bins floored at 1e-3, renormalised by 1.254.
    np.testing.assert_allclose(pmf[:3], np.array([0.75, 0.25, 1e-3]) / 1.254)
    assert pmf.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(_model.normalize_pmf(np.zeros(256), 1e-12), 1 / 256)


def test_percentile_intensity_is_left_searchsorted():
    pmf = np.zeros(256)
    pmf[[10, 20, 30]] = [0.5, 0.3, 0.2]
    assert _model.percentile_intensity(pmf, 50) == 10
    assert _model.percentile_intensity(pmf, 50.0001) == 20
    assert _model.percentile_intensity(pmf, 80) == 20
    assert _model.percentile_intensity(pmf, 99) == 30


def _bumps():
    v = np.arange(256)
    p_bg = np.exp(-0.5 * ((v - 100) / 12.0) ** 2)
    p_np = np.exp(-0.5 * ((v - 210) / 10.0) ** 2)
    return p_bg / p_bg.sum(), p_np / p_np.sum()


def test_em_recovers_weight_of_exact_mixture():
    p_bg, p_np = _bumps()
    w = 0.97
    p_stack = w * p_bg + (1 - w) * p_np
    result = _model.fit_particle_pmf(p_stack, p_bg, 0.9, 150, max_iter=100000, tol=1e-15, eps=1e-12)
    assert result.converged
    assert result.background_weight == pytest.approx(w, abs=1e-3)
    np.testing.assert_allclose(result.particle_pmf[180:240], p_np[180:240], atol=2e-3)


def test_em_reports_non_convergence():
    p_bg, p_np = _bumps()
    p_stack = 0.97 * p_bg + 0.03 * p_np
    result = _model.fit_particle_pmf(p_stack, p_bg, 0.5, 150, max_iter=2, tol=0.0, eps=1e-12)
    assert result.n_iter == 2 and not result.converged


def test_em_collapse_raises():
    # With floored PMFs every bin keeps some particle mass, so the guard is
    # defensive; a stack PMF without mass is the one way to reach it.
    p_bg, _ = _bumps()
    with pytest.raises(_model.EMCollapseError, match="collapsed at iteration 0"):
        _model.fit_particle_pmf(np.zeros(256), p_bg, 0.5, 150, max_iter=10, tol=0.0, eps=1e-12)


def _objective(pi, hist, p_np, p_bg, a, b, eps=1e-12):
    mix = pi * p_np + (1 - pi) * p_bg
    return np.sum(hist * np.log(mix + eps)) + (a - 1) * np.log(pi + eps) + (b - 1) * np.log(1 - pi + eps)


@pytest.mark.parametrize("prior", [(1.0, 1.0), (1.0, 20.0), (2.0, 50.0), (5.0, 1.0)])
def test_map_weights_match_scalar_optimiser(prior):
    p_bg, p_np = _bumps()
    rng = np.random.default_rng(0)
    hists = np.stack([rng.multinomial(20000, (1 - f) * p_bg + f * p_np) for f in (0, 1e-4, 1e-3, 0.02, 0.3, 0.9)])
    got = _model.map_slice_weights(hists, p_np, p_bg, prior, 1e-12)
    for h, pi in zip(hists, got):
        ref = minimize_scalar(
            lambda x: -_objective(x, h, p_np, p_bg, *prior), bounds=(0, 1), method="bounded",
            options={"xatol": 1e-12},
        )
        # Ours is at least as good as the scalar optimiser, and close to it.
        assert _objective(pi, h, p_np, p_bg, *prior) >= -ref.fun - 1e-9
        assert pi == pytest.approx(ref.x, abs=1e-6)


def test_map_weights_boundary_cases():
    p_bg, p_np = _bumps()
    only_bg = np.round(1e5 * p_bg)[None]
    only_np = np.round(1e5 * p_np)[None]
    assert _model.map_slice_weights(only_bg, p_np, p_bg, (1.0, 20.0), 1e-12)[0] == 0.0
    assert _model.map_slice_weights(only_np, p_np, p_bg, (1.0, 1.0), 1e-12)[0] == 1.0


@pytest.mark.parametrize("prior", [(0.5, 20.0), (1.0, 0.5), (0.3, 0.3)])
def test_non_concave_prior_finds_global_maximum(prior):
    p_bg, p_np = _bumps()
    rng = np.random.default_rng(1)
    hists = np.stack([rng.multinomial(5000, (1 - f) * p_bg + f * p_np) for f in (0, 0.01, 0.5)])
    got = _model.map_slice_weights(hists, p_np, p_bg, prior, 1e-12)
    grid = np.concatenate([[0.0], np.geomspace(1e-14, 1, 20001), 1 - np.geomspace(1e-14, 0.5, 2001)])
    for h, pi in zip(hists, got):
        best = max(_objective(g, h, p_np, p_bg, *prior) for g in grid)
        assert _objective(pi, h, p_np, p_bg, *prior) >= best - 1e-6


def test_posterior_luts_formula():
    p_bg, p_np = _bumps()
    luts = _model.posterior_luts(np.array([0.0, 0.01, 1.0]), p_np, p_bg, 1e-12)
    assert luts.shape == (3, 256) and luts.dtype == np.float32
    assert np.all(luts[0] == 0)
    expected = 0.01 * p_np / (0.01 * p_np + 0.99 * p_bg + 1e-12)
    np.testing.assert_allclose(luts[1], expected, rtol=1e-6, atol=1e-7)
    # With pi = 1 every intensity the NP PMF can produce is a particle.
    assert luts[2][p_np > 1e-9].min() > 0.999
