"""Checks of the test oracle (tests/oracle.py) on cases worked out by hand.

These tests validate the oracle itself, independently of the package: the
expected numbers below were derived on paper from the method description
(DESIGN.md §1), not by running the oracle.
"""

from __future__ import annotations


import numpy as np
import pytest
from scipy import ndimage
from skimage.morphology import ball, closing, disk

# pytest puts this folder (no __init__.py) on sys.path, so the oracle imports.
from oracle import (
    assert_same_partition,
    oracle_background_mask,
    oracle_closing,
    oracle_em,
    oracle_fit,
    oracle_label,
    oracle_lut,
    oracle_map_weight,
    oracle_normalize_pmf,
    oracle_posterior,
    oracle_slice_weights,
    oracle_thresholds,
)

EPS = 1e-12


def _counts(mapping):
    """Dict {intensity: count} -> int64 histogram of 256 bins."""
    hist = np.zeros(256, dtype=np.int64)
    for value, count in mapping.items():
        hist[value] = count
    return hist


# ---------------------------------------------------------------------------
# A 100 x 100 test image, built so that everything can be counted by hand.
#
#   * background value 10 everywhere else
#   * row 0, columns 0, 3, ..., 87: 30 isolated pixels of value 150
#   * row 99, columns 0, 2, ..., 18: 10 pixels of value 50
#   * a bright square of value 200 (its size and position vary per test)
# ---------------------------------------------------------------------------
def _base_image() -> np.ndarray:
    img = np.full((100, 100), 10, dtype=np.uint8)
    img[0, 0:90:3] = 150
    img[99, 0:20:2] = 50
    return img


def _image_with_square(row, col, side) -> np.ndarray:
    img = _base_image()
    img[row : row + side, col : col + side] = 200
    return img


class TestHistogramsAndBackground:
    def test_large_blob_bbox_and_halo_excluded(self):
        # 25 bright pixels (0.25 %): cumulative fractions 0.9935 (10),
        # 0.9945 (50), 0.9975 (150), 1.0 (200) -> th_low = 150, th_high = 200.
        # Seed = the 5x5 square (25 >= 20 pixels), bbox rows/cols 40:45,
        # grown by 20 -> rows/cols 20:65 = 45 x 45 = 2025 pixels, of which
        # 25 are the square and 2000 are background value 10.
        img = _image_with_square(40, 40, 5)
        fit = oracle_fit(img)
        np.testing.assert_array_equal(
            fit["hist_stack"], _counts({10: 9935, 50: 10, 150: 30, 200: 25})
        )
        assert fit["th_low"] == 150
        assert fit["th_high"] == 200
        np.testing.assert_array_equal(
            fit["hist_bg"], _counts({10: 9935 - 2000, 50: 10, 150: 30})
        )
        assert fit["hist_stack"].dtype == np.int64
        assert fit["hist_bg"].dtype == np.int64
        assert isinstance(fit["th_low"], int) and isinstance(fit["th_high"], int)

    def test_small_blob_not_a_seed_but_bright_pixels_excluded(self):
        # 4x4 square = 16 pixels: fractions 0.9944 (10), 0.9954 (50),
        # 0.9984 (150), 1.0 -> th_low = 50, th_high = 150.
        # Seeds (> 50): the 30 isolated 150s (size 1) and the square (16 < 20):
        # nothing is boxed out. Bright (>= 150): the 30 + 16 pixels.
        img = _image_with_square(40, 40, 4)
        fit = oracle_fit(img)
        np.testing.assert_array_equal(
            fit["hist_stack"], _counts({10: 9944, 50: 10, 150: 30, 200: 16})
        )
        assert (fit["th_low"], fit["th_high"]) == (50, 150)
        np.testing.assert_array_equal(fit["hist_bg"], _counts({10: 9944, 50: 10}))

    def test_min_seed_size_is_inclusive(self):
        # Same image; with min_seed_size=16 the 16-pixel square is a seed:
        # box rows/cols 40:44 grown by 20 -> 20:64 = 44 x 44 = 1936 pixels,
        # 16 of them bright, 1920 of value 10.
        img = _image_with_square(40, 40, 4)
        fit = oracle_fit(img, min_seed_size=16)
        np.testing.assert_array_equal(
            fit["hist_bg"], _counts({10: 9944 - 1920, 50: 10})
        )
        fit17 = oracle_fit(img, min_seed_size=17)
        np.testing.assert_array_equal(fit17["hist_bg"], _counts({10: 9944, 50: 10}))

    def test_halo_is_clipped_at_the_image_border(self):
        # Square in the bottom-right corner, rows/cols 95:100, halo 20 ->
        # rows/cols 75:100 = 25 x 25 = 625 pixels (25 bright, 600 of value 10).
        img = _image_with_square(95, 95, 5)
        fit = oracle_fit(img)
        assert (fit["th_low"], fit["th_high"]) == (150, 200)
        np.testing.assert_array_equal(
            fit["hist_bg"], _counts({10: 9935 - 600, 50: 10, 150: 30})
        )
        # halo_pad = 0: only the square itself is boxed out
        fit0 = oracle_fit(img, halo_pad=0)
        np.testing.assert_array_equal(
            fit0["hist_bg"], _counts({10: 9935, 50: 10, 150: 30})
        )

    def test_seeds_use_8_connectivity(self):
        # A diagonal chain of 21 bright pixels: one 8-connected component
        # (21 >= 20) but 21 separate 4-connected ones. Fractions 0.9939,
        # 0.9949, 0.9979, 1.0 -> th_low = 150, th_high = 200.
        # bbox rows/cols 30:51, halo 20 -> 10:71 = 61 x 61 = 3721 pixels,
        # of which 21 are bright and 3700 are of value 10.
        img = _base_image()
        for k in range(21):
            img[30 + k, 30 + k] = 200
        fit = oracle_fit(img)
        assert (fit["th_low"], fit["th_high"]) == (150, 200)
        np.testing.assert_array_equal(
            fit["hist_bg"], _counts({10: 9939 - 3700, 50: 10, 150: 30})
        )

    def test_seed_threshold_is_strict_bright_threshold_is_not(self):
        # Square of value 150 (25 px), 30 isolated 200s on row 0.
        # Fractions 0.9945 (10), 0.9970 (150), 1.0 (200) -> th_low = 150,
        # th_high = 200. The square equals th_low, so it is not a seed (strict
        # '>') and is counted; the 200s are seeds of size 1 (not boxed) but
        # are >= th_high and excluded.
        img = np.full((100, 100), 10, dtype=np.uint8)
        img[0, 0:90:3] = 200
        img[40:45, 40:45] = 150
        fit = oracle_fit(img)
        assert (fit["th_low"], fit["th_high"]) == (150, 200)
        np.testing.assert_array_equal(fit["hist_bg"], _counts({10: 9945, 150: 25}))

    def test_background_mask_directly(self):
        img = _image_with_square(40, 40, 5)
        keep = oracle_background_mask(img, 150, 200, halo_pad=20, min_seed_size=20)
        expected = np.ones((100, 100), dtype=bool)
        expected[20:65, 20:65] = False
        np.testing.assert_array_equal(keep, expected)

    def test_slice_without_background_adds_nothing(self):
        # A 2x2 crop of value 200 next to the large-blob image: pooled counts
        # {10: 9935, 50: 10, 150: 30, 200: 29} / 10004 -> fractions 0.99310,
        # 0.99410, 0.99710, 1.0 -> th_low 150, th_high 200. The tiny crop is
        # entirely >= th_high (the published code would crash on it).
        img = _image_with_square(40, 40, 5)
        tiny = np.full((2, 2), 200, dtype=np.uint8)
        fit = oracle_fit([img, tiny])
        assert (fit["th_low"], fit["th_high"]) == (150, 200)
        np.testing.assert_array_equal(
            fit["hist_stack"], _counts({10: 9935, 50: 10, 150: 30, 200: 29})
        )
        np.testing.assert_array_equal(
            fit["hist_bg"], _counts({10: 9935 - 2000, 50: 10, 150: 30})
        )

    def test_sampling_step_uses_slices_0_s_2s(self):
        rng = np.random.default_rng(0)
        vol = rng.integers(0, 100, size=(5, 30, 30), dtype=np.uint8)
        vol[1] = 177
        vol[3] = 233
        fit = oracle_fit(vol, sampling_step=2)
        expected = sum(np.bincount(vol[z].ravel(), minlength=256) for z in (0, 2, 4))
        np.testing.assert_array_equal(fit["hist_stack"], expected)
        assert fit["hist_stack"][177] == 0 and fit["hist_stack"][233] == 0
        fit3 = oracle_fit(vol, sampling_step=3)
        expected3 = sum(np.bincount(vol[z].ravel(), minlength=256) for z in (0, 3))
        np.testing.assert_array_equal(fit3["hist_stack"], expected3)

    def test_skipped_slices_add_no_background(self):
        # slices 0 and 2 are the large-blob image, slice 1 is all 5s: with a
        # step of 2 the thresholds and counts are twice those of the image,
        # and the 5s appear nowhere; with a step of 1 they are background.
        img = _image_with_square(40, 40, 5)
        vol = np.stack([img, np.full_like(img, 5), img])
        fit = oracle_fit(vol, sampling_step=2)
        assert (fit["th_low"], fit["th_high"]) == (150, 200)
        np.testing.assert_array_equal(
            fit["hist_bg"], 2 * _counts({10: 9935 - 2000, 50: 10, 150: 30})
        )
        assert oracle_fit(vol)["hist_bg"][5] == 10000

    def test_list_of_crops_pools_and_steps_within_each_crop(self):
        img = _image_with_square(40, 40, 5)
        single = oracle_fit(img)
        doubled = oracle_fit([img, img[np.newaxis]])
        np.testing.assert_array_equal(doubled["hist_stack"], 2 * single["hist_stack"])
        np.testing.assert_array_equal(doubled["hist_bg"], 2 * single["hist_bg"])
        for key in ("p_stack", "p_bg", "p_np"):
            np.testing.assert_array_equal(doubled[key], single[key])
        assert doubled["w_bg"] == single["w_bg"]
        # the step restarts at slice 0 of every crop
        a = np.stack([img, np.full_like(img, 7), img])
        b = np.stack([img, np.full_like(img, 7)])
        stepped = oracle_fit([a, b], sampling_step=2)
        np.testing.assert_array_equal(stepped["hist_stack"], 3 * single["hist_stack"])

    def test_2d_image_is_one_slice(self):
        img = _image_with_square(40, 40, 5)
        fit2d = oracle_fit(img)
        fit3d = oracle_fit(img[np.newaxis])
        for key in ("hist_stack", "hist_bg", "p_np", "p_bg"):
            np.testing.assert_array_equal(fit2d[key], fit3d[key])

    def test_rejects_non_uint8(self):
        with pytest.raises(TypeError):
            oracle_fit(np.zeros((4, 8, 8), dtype=np.uint16))


class TestNormalisationAndThresholds:
    def test_floor_and_renormalise(self):
        hist = _counts({42: 1000})
        pmf = oracle_normalize_pmf(hist, EPS)
        assert pmf.dtype == np.float64 and pmf.shape == (256,)
        # after the floor: 1 at bin 42, eps at 255 bins; total 1 + 255 eps
        total = 1.0 + 255 * EPS
        assert pmf[42] == pytest.approx(1.0 / total, rel=1e-15, abs=0)
        others = np.delete(pmf, 42)
        np.testing.assert_allclose(others, EPS / total, rtol=1e-12)
        assert pmf.sum() == pytest.approx(1.0, abs=1e-14)

    def test_all_zero_is_uniform(self):
        pmf = oracle_normalize_pmf(np.zeros(256, dtype=np.int64), EPS)
        np.testing.assert_array_equal(pmf, np.full(256, 1.0 / 256))

    def test_scale_invariant(self):
        hist = _counts({3: 5, 100: 7, 200: 1})
        np.testing.assert_array_equal(
            oracle_normalize_pmf(hist, EPS), oracle_normalize_pmf(3 * hist, EPS)
        )

    def test_searchsorted_left_side(self):
        # cumsum = [0.5, 1.0, 1.0, ...] exactly
        pmf = np.zeros(256)
        pmf[0] = pmf[1] = 0.5
        # 0.5 reached at index 0 (the left side; the right side would give 1)
        assert oracle_thresholds(pmf, 50.0, 50.0001) == (0, 1)
        # 1.0 first reached at index 1 (the right side would give 256)
        assert oracle_thresholds(pmf, 100.0, 100.0) == (1, 1)
        # beyond the total: past the end
        assert oracle_thresholds(pmf, 101.0, 101.0) == (256, 256)


def _gaussian_pmf(center, width, support=None):
    v = np.arange(256.0)
    pmf = np.exp(-0.5 * ((v - center) / width) ** 2)
    if support is not None:
        pmf = np.where(support, pmf, 0.0)
    return pmf / pmf.sum()


class TestEM:
    @pytest.mark.parametrize("w_true", [0.9, 0.97, 0.995])
    @pytest.mark.parametrize("w_start", [0.5, 0.99])
    def test_exact_mixture_recovers_weight(self, w_true, w_start):
        # With p_np supported on the tail (>= 180) and p_bg fixed, the
        # likelihood maximiser over p_np supported on the initial tail has
        # w = S_nontail / B_nontail = w_true exactly.
        v = np.arange(256)
        p_bg = oracle_normalize_pmf(_gaussian_pmf(70, 18), EPS)
        p_np = _gaussian_pmf(215, 10, support=v >= 180)
        p_stack = w_true * p_bg + (1 - w_true) * p_np
        start = oracle_normalize_pmf(np.where(v >= 170, p_stack, 0.0), EPS)
        result = oracle_em(p_stack, p_bg, w_start, start)
        assert result["converged"]
        assert result["w_bg"] == pytest.approx(w_true, abs=1e-6)
        np.testing.assert_allclose(result["p_np"], p_np, atol=1e-5)
        entropy = -np.sum(p_stack * np.log(p_stack))
        assert result["nll"] == pytest.approx(entropy, abs=1e-8)

    def test_collapse_raises(self):
        # p_stack = p_bg = one-hot, w_bg = 1: the particle responsibility is
        # 1 - 1 / (1 + eps) = eps / (1 + eps) < eps at the first iteration.
        # (A large eps keeps this clear of floating-point rounding.)
        one_hot = np.zeros(256)
        one_hot[30] = 1.0
        with pytest.raises(RuntimeError, match="collapsed at iteration 0"):
            oracle_em(one_hot, one_hot, 1.0, np.full(256, 1 / 256), eps=0.25)
        # and not when the same mass is left to the particle component
        result = oracle_em(one_hot, one_hot, 0.5, one_hot, eps=0.25, max_iter=1)
        assert result["nit"] == 0

    def test_single_iteration_has_nit_zero_and_is_not_converged(self):
        v = np.arange(256)
        p_bg = oracle_normalize_pmf(_gaussian_pmf(70, 18), EPS)
        p_stack = 0.95 * p_bg + 0.05 * _gaussian_pmf(215, 10, support=v >= 180)
        start = oracle_normalize_pmf(np.where(v >= 170, p_stack, 0.0), EPS)
        result = oracle_em(p_stack, p_bg, 0.8, start, max_iter=1)
        assert result["nit"] == 0
        assert not result["converged"]

    def test_em_starting_point(self):
        # Large-blob image: w_bg starts at 7975 / 10000 background pixels and
        # p_np at the stack PMF from th_low = 150 up: 30 and 25 of 55.
        img = _image_with_square(40, 40, 5)
        fit = oracle_fit(img, max_iter=1)
        start = np.zeros(256)
        start[150], start[200] = 30 / 55, 25 / 55
        by_hand = oracle_em(
            fit["p_stack"], fit["p_bg"], 7975 / 10000, oracle_normalize_pmf(start, EPS),
            max_iter=1,
        )
        # (the oracle's tail also carries the eps-floored empty bins of
        # p_stack between 150 and 255, a ~1e-10 effect)
        assert fit["w_bg"] == pytest.approx(by_hand["w_bg"], abs=1e-9)
        np.testing.assert_allclose(fit["p_np"], by_hand["p_np"], rtol=1e-8, atol=1e-9)

    def test_stopping_rule_and_nit(self):
        # nit is the 0-based index of the first iteration whose NLL decrease
        # falls below tol; all earlier decreases are >= tol.
        v = np.arange(256)
        p_bg = oracle_normalize_pmf(_gaussian_pmf(70, 25), EPS)
        p_stack = 0.9 * p_bg + 0.1 * _gaussian_pmf(200, 15, support=v >= 150)
        start = oracle_normalize_pmf(np.where(v >= 120, p_stack, 0.0), EPS)
        tol = 1e-7
        final = oracle_em(p_stack, p_bg, 0.6, start, tol=tol)
        n = final["nit"]
        assert final["converged"] and n >= 3
        nll = [
            oracle_em(p_stack, p_bg, 0.6, start, max_iter=k + 1, tol=tol)["nll"]
            for k in range(n + 1)
        ]
        decreases = -np.diff(nll)
        assert np.all(decreases[:-1] >= tol)
        assert decreases[-1] < tol
        assert nll[-1] == final["nll"]

    def test_first_step_by_hand(self):
        # Two-bin toy problem; the other bins are exact zeros (the default
        # eps = 1e-12 only matters far below the 1e-9 tolerance).
        p_stack = np.zeros(256)
        p_stack[[0, 1]] = [0.75, 0.25]
        p_bg = np.zeros(256)
        p_bg[[0, 1]] = [0.9, 0.1]
        p_np = np.zeros(256)
        p_np[1] = 1.0
        w = 0.5
        # gamma_bg(0) = 0.45 / 0.45 = 1, gamma_bg(1) = 0.05 / (0.05 + 0.5) = 1/11
        # w_new = 0.75 * 1 + 0.25 / 11; p_np_new concentrated on bin 1.
        result = oracle_em(p_stack, p_bg, w, p_np, max_iter=1)
        assert result["w_bg"] == pytest.approx(0.75 + 0.25 / 11, abs=1e-9)
        assert result["p_np"][1] == pytest.approx(1.0, abs=1e-9)

    def test_more_iterations_never_increase_nll(self):
        img = _image_with_square(40, 40, 5)
        rng = np.random.default_rng(3)
        noisy = np.clip(img.astype(int) + rng.integers(-3, 4, size=img.shape), 0, 255)
        noisy = noisy.astype(np.uint8)
        nlls = [oracle_fit(noisy, max_iter=k)["nll"] for k in (1, 5, 50)]
        assert nlls[1] <= nlls[0] + 1e-12
        assert nlls[2] <= nlls[1] + 1e-12

    def test_fit_outputs_are_pmfs(self):
        fit = oracle_fit(_image_with_square(40, 40, 5))
        for key in ("p_stack", "p_bg", "p_np"):
            assert fit[key].dtype == np.float64 and fit[key].shape == (256,)
            assert fit[key].sum() == pytest.approx(1.0, abs=1e-12)
            assert fit[key].min() > 0
        assert EPS <= fit["w_bg"] <= 1 - EPS
        assert fit["nit"] + 1 <= 10000


def _disjoint_model():
    """p_bg uniform on 0..127, p_np uniform on 128..255 (floored at eps)."""
    low = np.zeros(256)
    low[:128] = 1
    high = np.zeros(256)
    high[128:] = 1
    return {"p_bg": oracle_normalize_pmf(low, EPS), "p_np": oracle_normalize_pmf(high, EPS)}


class TestMapWeight:
    @pytest.mark.parametrize("prior", [(1.0, 1.0), (1.0, 20.0), (2.0, 50.0), (3.0, 3.0)])
    @pytest.mark.parametrize("n_high", [0, 10, 500])
    def test_disjoint_supports_closed_form(self, prior, n_high):
        # With disjoint supports the log-likelihood is
        # n_high log(pi) + n_low log(1 - pi) + const, so the MAP weight is the
        # Beta posterior mode (n_high + a - 1) / (N + a + b - 2), clipped at 0.
        a, b = prior
        n_low = 2000
        rng = np.random.default_rng(1)
        pixels = np.concatenate(
            [rng.integers(0, 128, n_low), rng.integers(128, 256, n_high)]
        ).astype(np.uint8)
        image = pixels.reshape(1, -1)
        expected = max(n_high + a - 1, 0) / (n_low + n_high + a + b - 2)
        weights = oracle_slice_weights(image, _disjoint_model(), beta_prior=prior)
        assert weights.shape == (1,)
        assert weights[0] == pytest.approx(expected, abs=1e-5)

    def test_identical_components_follow_the_prior_mode(self):
        # p_np == p_bg: the likelihood does not depend on pi; the MAP weight is
        # the prior mode (a - 1) / (a + b - 2) = 1 / 50, and the posterior is
        # pi p / (p + eps) ~= pi for every voxel.
        pmf = oracle_normalize_pmf(np.arange(1, 257), EPS)
        model = {"p_np": pmf, "p_bg": pmf}
        rng = np.random.default_rng(2)
        vol = rng.integers(0, 256, size=(3, 20, 20), dtype=np.uint8)
        weights = oracle_slice_weights(vol, model, beta_prior=(2.0, 50.0))
        np.testing.assert_allclose(weights, 1 / 50, atol=1e-5)
        post = oracle_posterior(vol, model, beta_prior=(2.0, 50.0))
        np.testing.assert_allclose(post, 1 / 50, atol=1e-5)

    def test_dark_slice_near_zero_bright_slice_larger(self):
        model = _disjoint_model()
        rng = np.random.default_rng(4)
        vol = rng.integers(0, 128, size=(2, 40, 40), dtype=np.uint8)
        vol[1, :10, :] = rng.integers(128, 256, size=(10, 40), dtype=np.uint8)
        weights = oracle_slice_weights(vol, model)
        assert weights[0] < 2e-5  # Brent's answer for a MAP on the 0 bound
        # 400 of 1600 voxels bright, Beta(1, 20): 400 / 1619
        assert weights[1] == pytest.approx(400 / 1619, abs=1e-5)

    def test_brent_agrees_with_a_dense_grid(self):
        img = _image_with_square(40, 40, 5)
        rng = np.random.default_rng(5)
        vol = np.stack(
            [
                np.clip(img.astype(int) + rng.integers(-4, 5, size=img.shape), 0, 255)
                for _ in range(3)
            ]
        ).astype(np.uint8)
        vol[2, 70:80, 70:80] = 205
        model = oracle_fit(vol)
        for z in range(vol.shape[0]):
            hist = np.bincount(vol[z].ravel(), minlength=256).astype(np.float64)

            def objective(pi):
                pi = np.asarray(pi, dtype=np.float64)[:, None]
                mix = pi * model["p_np"] + (1 - pi) * model["p_bg"]
                ll = (hist * np.log(mix + EPS)).sum(axis=1)
                prior = 19.0 * np.log(1 - pi[:, 0] + EPS)
                return -(ll + prior)

            coarse = np.linspace(0, 1, 10001)
            best = coarse[np.argmin(objective(coarse))]
            fine = np.linspace(max(best - 2e-4, 0), min(best + 2e-4, 1), 40001)
            best = fine[np.argmin(objective(fine))]
            brent = oracle_map_weight(hist, model["p_np"], model["p_bg"])
            assert brent == pytest.approx(best, abs=1e-5)


class TestPosterior:
    def test_lut_by_hand(self):
        p_np = np.zeros(256)
        p_bg = np.zeros(256)
        p_np[[0, 1, 2]] = [0.2, 0.3, 0.5]
        p_bg[[0, 1, 2]] = [0.6, 0.3, 0.1]
        lut = oracle_lut(0.25, p_np, p_bg)
        # 0.05 / (0.05 + 0.45), 0.075 / (0.075 + 0.225), 0.125 / (0.125 + 0.075)
        np.testing.assert_allclose(lut[:3], [0.1, 0.25, 0.625], rtol=1e-10)
        # both components zero: 0 / eps = 0
        assert lut[3] == 0.0

    def test_posterior_is_a_per_slice_lookup(self):
        model = _disjoint_model()
        rng = np.random.default_rng(6)
        vol = rng.integers(0, 128, size=(3, 30, 30), dtype=np.uint8)
        vol[1, :5] = 200
        vol[2, :15] = 200
        post = oracle_posterior(vol, model)
        weights = oracle_slice_weights(vol, model)
        assert post.shape == vol.shape and post.dtype == np.float64
        for z in range(3):
            lut = oracle_lut(weights[z], model["p_np"], model["p_bg"])
            np.testing.assert_array_equal(post[z], lut[vol[z]])
        # bright voxels: pi/128 against (1 - pi) eps' -> ~1; dark voxels ~0
        assert post[1:][vol[1:] == 200].min() > 0.999
        assert post[vol < 128].max() < 1e-6

    def test_2d_and_list_inputs(self):
        model = _disjoint_model()
        rng = np.random.default_rng(7)
        img = rng.integers(0, 256, size=(25, 30), dtype=np.uint8)
        post = oracle_posterior(img, model)
        assert post.shape == (25, 30)
        np.testing.assert_array_equal(post, oracle_posterior(img[np.newaxis], model)[0])
        vol = rng.integers(0, 256, size=(2, 10, 10), dtype=np.uint8)
        posts = oracle_posterior([img, vol], model)
        assert isinstance(posts, list) and posts[1].shape == vol.shape
        weights = oracle_slice_weights([img, vol], model)
        assert [w.shape for w in weights] == [(1,), (2,)]


def _bar_volume():
    # a 3 x 3 x 15 bar along x with a one-voxel-thick gap at x = 9:
    # two 3 x 3 x 7 halves of 63 voxels each
    vol = np.zeros((7, 20, 20))
    vol[2:5, 9:12, 2:17] = 1.0
    vol[2:5, 9:12, 9] = 0.0
    return vol


class TestLabel:
    def test_closing_fills_a_one_voxel_gap(self):
        # ball(1) is the 6-neighbour cross. Dilation fills the 3 x 3 gap
        # section; erosion then keeps only the section's centre (its four
        # in-plane neighbours stay dilated); the box-shaped halves are already
        # closed. So the closing adds exactly one voxel and joins the halves.
        vol = _bar_volume()
        lab = oracle_label(vol, radius=1, min_size=1)
        assert lab.dtype == np.uint32
        assert lab.max() == 1
        assert np.count_nonzero(lab) == 127
        assert lab[3, 10, 9] == 1
        open_lab = oracle_label(vol, radius=0, min_size=1)
        assert open_lab.max() == 2
        assert np.count_nonzero(open_lab) == 126

    def test_small_components_dropped_and_relabelled_in_order(self):
        vol = np.zeros((10, 20, 20))
        vol[1:3, 1:3, 1:3] = 1  # 8 voxels, first in raster order
        vol[5:8, 5:8, 5:8] = 1  # 27 voxels
        vol[8:10, 15:19, 15:19] = 1  # 32 voxels
        lab = oracle_label(vol, radius=0, min_size=10)
        assert set(np.unique(lab)) == {0, 1, 2}
        assert np.count_nonzero(lab == 1) == 27 and np.all(lab[5:8, 5:8, 5:8] == 1)
        assert np.count_nonzero(lab == 2) == 32
        assert np.all(lab[1:3, 1:3, 1:3] == 0)
        # the boundary: a component of exactly min_size voxels is kept
        assert oracle_label(vol, radius=0, min_size=8).max() == 3
        assert oracle_label(vol, radius=0, min_size=9).max() == 2

    def test_threshold_is_inclusive(self):
        vol = np.zeros((3, 5, 5))
        vol[1, 1:4, 1:4] = 0.95
        assert np.count_nonzero(oracle_label(vol, threshold=0.95, radius=0, min_size=1)) == 9
        assert np.count_nonzero(oracle_label(vol, threshold=0.9500001, radius=0, min_size=1)) == 0

    def test_connectivity(self):
        vol = np.zeros((3, 3, 3))
        vol[0, 0, 0] = vol[1, 1, 1] = 1  # corner neighbours
        vol[2, 2, 1] = 1  # edge neighbour of (1, 1, 1)
        assert oracle_label(vol, radius=0, connectivity=1, min_size=1).max() == 3
        assert oracle_label(vol, radius=0, connectivity=2, min_size=1).max() == 2
        assert oracle_label(vol, radius=0, connectivity=3, min_size=1).max() == 1

    def test_border_foreground_survives_closing(self):
        vol = np.zeros((6, 12, 12))
        vol[0] = 1  # a full plane on the border
        vol[3, 0, :] = 1  # a line along the image edge
        lab = oracle_label(vol, radius=2, min_size=1)
        assert np.all(lab[0] > 0)
        assert np.all(lab[3, 0, :] > 0)

    def test_outside_counts_as_foreground_for_the_erosion(self):
        # A 3-row bar ending one pixel before the left/right borders: with the
        # outside treated as foreground during erosion, the closing adds the
        # middle-row pixel between each bar end and the border.
        img = np.zeros((15, 15))
        img[6:9, 1:14] = 1
        closed = oracle_closing(img > 0, 1)
        expected = img > 0
        expected[7, 0] = expected[7, 14] = True
        np.testing.assert_array_equal(closed, expected)

    def test_2d_uses_a_disk(self):
        # 3-pixel-thick bar with a one-column gap; disk(1) is the 4-neighbour
        # cross, so only the gap's middle pixel is filled (same reasoning as
        # in 3D): 36 + 1 pixels, one component.
        img = np.zeros((15, 17))
        img[6:9, 2:15] = 1
        img[6:9, 8] = 0
        lab = oracle_label(img, radius=1, connectivity=1, min_size=1)
        assert lab.shape == (15, 17) and lab.max() == 1
        assert np.count_nonzero(lab) == 37
        assert lab[7, 8] == 1 and lab[6, 8] == 0
        # a 3 x 3 footprint would also fill the gap's corners: disk(1) is not it
        assert oracle_label(img, radius=0, connectivity=1, min_size=1).max() == 2
        diag = np.zeros((4, 4))
        diag[0, 0] = diag[1, 1] = 1
        assert oracle_label(diag, radius=0, connectivity=1, min_size=1).max() == 2
        assert oracle_label(diag, radius=0, connectivity=2, min_size=1).max() == 1

    def test_empty_input(self):
        lab = oracle_label(np.zeros((4, 8, 8)))
        assert lab.dtype == np.uint32 and not lab.any()

    @pytest.mark.parametrize("radius", [1, 2, 3])
    @pytest.mark.parametrize("ndim", [2, 3])
    def test_closing_matches_skimage_ignore_mode(self, radius, ndim):
        rng = np.random.default_rng(radius + 10 * ndim)
        shape = (9, 24, 24) if ndim == 3 else (40, 40)
        mask = ndimage.uniform_filter(rng.random(shape), 3) > 0.55
        footprint = ball(radius) if ndim == 3 else disk(radius)
        expected = closing(mask, footprint, mode="ignore")
        np.testing.assert_array_equal(oracle_closing(mask, radius), expected)


class TestAssertSamePartition:
    def test_renumbering_passes(self):
        a = np.zeros((4, 6, 6), dtype=np.uint32)
        a[0, :2, :2] = 1
        a[2, 3:, 3:] = 2
        a[3, 0, :] = 3
        b = np.zeros_like(a, dtype=np.int64)
        b[a == 1] = 7
        b[a == 2] = 1
        b[a == 3] = 2
        assert_same_partition(a, b)
        assert_same_partition(a, a)

    def test_split_merge_and_support_differences_fail(self):
        a = np.zeros((8, 8), dtype=np.uint32)
        a[:2, :2] = 1
        a[5:, 5:] = 2
        merged = (a > 0).astype(np.uint32)
        with pytest.raises(AssertionError, match="partitions differ"):
            assert_same_partition(a, merged)
        with pytest.raises(AssertionError, match="partitions differ"):
            assert_same_partition(merged, a)
        grown = a.copy()
        grown[2, 0] = 1
        with pytest.raises(AssertionError, match="foreground differs"):
            assert_same_partition(a, grown)
        with pytest.raises(AssertionError, match="shapes differ"):
            assert_same_partition(a, a[:4])
