"""Spatial-context steps: posterior smoothing and downsampling, background
subtraction, slice equalisation, and their composition in pipelines."""

import pickle

import dask.array as da
import numpy as np
import pytest
import zarr
from scipy import ndimage as ndi
from scipy.special import expit, logit
from skimage.exposure import equalize_adapthist
from skimage.morphology import disk
from skimage.restoration import rolling_ball
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.pipeline import Pipeline

from nanoseg import NanoparticleLabeler, NanoparticleMixture
from nanoseg.datasets import make_crops, make_phantom
from nanoseg.metrics import match_objects, object_f1_scorer
from nanoseg.preprocessing import (
    BackgroundSubtractor,
    PosteriorSmoother,
    SliceEqualizer,
    full_resolution_scorer,
    upsample,
)


def random_posterior(shape, seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def as_zarr(array, chunks):
    store = zarr.create_array(store={}, shape=array.shape, chunks=chunks, dtype=array.dtype)
    store[:] = array
    return store


def plain_smoothing(posterior, sigma, clip=1e-5):
    """The published recipe, written out with SciPy on the whole array."""
    p = np.clip(posterior.astype(np.float64), clip, 1 - clip)
    return expit(ndi.gaussian_filter(logit(p), sigma))


@pytest.fixture(scope="module")
def drifting_volume():
    """A phantom without drift, then a strong known per-slice gain and offset."""
    image, _ = make_phantom((8, 64, 64), n_particles=10, drift=0.0, random_state=3)
    offsets = np.array([-25, -10, 0, 5, 15, 30, -5, 20], dtype=np.float64)[:, None, None]
    gains = np.array([0.8, 0.9, 1.0, 1.1, 1.0, 0.95, 1.2, 0.85])[:, None, None]
    drifted = np.clip(np.rint(image * gains + offsets), 0, 255).astype(np.uint8)
    return drifted


# ---------------------------------------------------------------------------
# PosteriorSmoother: values
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [(0.5, 1.5, 1.5), 1.0, (0.0, 2.0, 0.7)])
def test_smoothing_equals_gaussian_of_logit(sigma):
    posterior = random_posterior((6, 20, 24))
    posterior[2, 3, 4] = 0.0  # clipped, not infinite
    posterior[3, 5, 6] = 1.0
    result = PosteriorSmoother(sigma=sigma).transform(posterior)
    assert result.dtype == np.float32 and result.shape == posterior.shape
    np.testing.assert_allclose(result, plain_smoothing(posterior, sigma), rtol=1e-6, atol=1e-7)


def test_2d_input_uses_the_in_plane_sigma():
    image = random_posterior((30, 25))
    expected = plain_smoothing(image, (1.5, 1.5))
    np.testing.assert_allclose(PosteriorSmoother().transform(image), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        PosteriorSmoother(sigma=(0.5, 2.5)).transform(image), plain_smoothing(image, (0.5, 2.5)), rtol=1e-6
    )


def test_zero_sigma_on_an_axis_means_no_smoothing_along_it():
    # Constant within each slice: in-plane smoothing changes nothing, and
    # with sigma_z = 0 nothing mixes the slices.
    values = np.array([0.0, 0.2, 0.9, 1.0, 0.5], dtype=np.float32)
    posterior = np.broadcast_to(values[:, None, None], (5, 8, 8)).copy()
    result = PosteriorSmoother(sigma=(0, 1.5, 1.5)).transform(posterior)
    expected = np.clip(values, 1e-5, 1 - 1e-5)
    np.testing.assert_allclose(result, np.broadcast_to(expected[:, None, None], posterior.shape), rtol=1e-6)
    # sigma 0 everywhere: only the clipping remains.
    clipped = PosteriorSmoother(sigma=0, clip=0.01).transform(posterior)
    np.testing.assert_allclose(clipped[:, 0, 0], np.clip(values, 0.01, 0.99), rtol=1e-6)


def test_smoothing_confirms_a_particle_and_suppresses_an_isolated_voxel():
    posterior = np.full((5, 16, 16), 0.01, dtype=np.float32)
    posterior[1:4, 5:10, 5:10] = 0.99
    posterior[2, 14, 1] = 0.99
    result = PosteriorSmoother().transform(posterior)
    assert result[2, 7, 7] > 0.9
    assert result[2, 14, 1] < 0.1


def test_output_dtype():
    posterior = random_posterior((3, 8, 8))
    for dtype in ("float16", "float32", "float64"):
        assert PosteriorSmoother(output_dtype=dtype).transform(posterior).dtype == np.dtype(dtype)
    exact = PosteriorSmoother(output_dtype="float64").transform(posterior)
    np.testing.assert_allclose(exact, plain_smoothing(posterior, (0.5, 1.5, 1.5)), rtol=1e-12)


# ---------------------------------------------------------------------------
# PosteriorSmoother: downsampling and upsampling
# ---------------------------------------------------------------------------


def test_block_mean_equals_reshape_mean():
    posterior = random_posterior((4, 10, 15), seed=1)
    result = PosteriorSmoother(sigma=0, clip=1e-7, downsample=(2, 5, 5), output_dtype="float64").transform(posterior)
    expected = np.clip(posterior.astype(np.float64), 1e-7, 1 - 1e-7).reshape(2, 2, 2, 5, 3, 5).mean(axis=(1, 3, 5))
    assert result.shape == (2, 2, 3)
    np.testing.assert_allclose(result, expected, rtol=1e-12)


def test_partial_edge_blocks_are_averaged_over_their_voxels():
    posterior = random_posterior((5, 12, 7), seed=2)
    factors = (2, 5, 5)
    result = PosteriorSmoother(sigma=0, clip=1e-7, downsample=factors, output_dtype="float64").transform(posterior)
    assert result.shape == (3, 3, 2)
    p = np.clip(posterior.astype(np.float64), 1e-7, 1 - 1e-7)
    for k in range(3):
        for j in range(3):
            for i in range(2):
                block = p[2 * k : 2 * k + 2, 5 * j : 5 * j + 5, 5 * i : 5 * i + 5]
                assert result[k, j, i] == pytest.approx(block.mean(), rel=1e-12)


def test_trim_excess_drops_partial_blocks():
    posterior = random_posterior((5, 12, 7), seed=2)
    result = PosteriorSmoother(
        sigma=0, clip=1e-7, downsample=(2, 5, 5), trim_excess=True, output_dtype="float64"
    ).transform(posterior)
    p = np.clip(posterior.astype(np.float64), 1e-7, 1 - 1e-7)[:4, :10, :5]
    np.testing.assert_allclose(result, p.reshape(2, 2, 2, 5, 1, 5).mean(axis=(1, 3, 5)), rtol=1e-12)


def test_smoothing_comes_before_the_block_mean():
    posterior = random_posterior((4, 20, 20), seed=3)
    result = PosteriorSmoother(downsample=(1, 5, 5), output_dtype="float64").transform(posterior)
    smoothed = plain_smoothing(posterior, (0.5, 1.5, 1.5))
    np.testing.assert_allclose(result, smoothed.reshape(4, 1, 4, 5, 4, 5).mean(axis=(1, 3, 5)), rtol=1e-12)


@pytest.mark.parametrize(
    "spacing, target, factors",
    [((50, 10, 10), 50, (1, 5, 5)), ((50, 10, 10), (100, 50, 30), (2, 5, 3)), (10, 20, (2, 2, 2))],
)
def test_block_factors_from_spacing(spacing, target, factors):
    smoother = PosteriorSmoother(spacing=spacing, target_spacing=target)
    assert smoother.block_factors() == factors
    assert smoother.block_factors(2) == factors[1:]
    assert PosteriorSmoother(downsample=factors).block_factors() == factors


def test_downsampled_2d_image():
    image = random_posterior((20, 30))
    smoother = PosteriorSmoother(spacing=(50, 10, 10), target_spacing=50)
    result = smoother.transform(image)
    assert result.shape == (4, 6)
    expected = plain_smoothing(image, (1.5, 1.5)).reshape(4, 5, 6, 5).mean(axis=(1, 3))
    np.testing.assert_allclose(result, expected, rtol=1e-6)


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(spacing=(50, 10, 10), target_spacing=(50, 25, 25)), "whole multiple"),
        (dict(spacing=(50, 10, 10), target_spacing=5), "whole multiple"),
        (dict(target_spacing=50), "needs spacing"),
        (dict(downsample=(1, 5, 5), spacing=(50, 10, 10), target_spacing=50), "not both"),
        (dict(downsample=(1, 2.5, 2)), "integer block sizes"),
        (dict(downsample=(1, 2, 2, 2)), "one number per axis"),
    ],
)
def test_bad_downsampling_parameters(params, message):
    with pytest.raises(ValueError, match=message):
        PosteriorSmoother(**params).transform(random_posterior((3, 10, 10)))


def test_upsample_repeats_blocks_and_crops_to_shape():
    coarse = np.arange(1, 3 * 4 * 2 + 1, dtype=np.uint32).reshape(3, 4, 2)
    shape = (5, 18, 7)
    result = upsample(coarse, (2, 5, 5), shape)
    assert result.shape == shape and result.dtype == np.uint32
    z, y, x = np.indices(shape)
    np.testing.assert_array_equal(result, coarse[z // 2, y // 5, x // 5])


def test_upsample_pads_what_trim_excess_dropped():
    coarse = np.ones((2, 2, 1), dtype=np.uint32)
    result = upsample(coarse, (2, 5, 5), (5, 12, 7))
    assert result.shape == (5, 12, 7)
    assert result[:4, :10, :5].all() and not result[4:].any() and not result[:, 10:].any()
    assert not result[:, :, 5:].any()


def test_upsample_of_dask_is_lazy_and_equal():
    coarse = np.random.default_rng(0).integers(0, 5, size=(3, 4, 2)).astype(np.uint32)
    lazy = upsample(da.from_array(coarse, chunks=(2, 2, 1)), (2, 5, 5), (5, 18, 7))
    assert isinstance(lazy, da.Array)
    np.testing.assert_array_equal(lazy.compute(), upsample(coarse, (2, 5, 5), (5, 18, 7)))


def test_upsample_rejects_shapes_the_blocks_cannot_cover():
    with pytest.raises(ValueError, match="cannot come from"):
        upsample(np.zeros((3, 4, 2)), (2, 5, 5), (9, 18, 7))
    with pytest.raises(ValueError, match="axes"):
        upsample(np.zeros((3, 4, 2)), (2, 5, 5), (18, 7))


@pytest.mark.parametrize("trim_excess", [False, True])
def test_round_trip_to_the_input_grid(trim_excess):
    posterior = random_posterior((5, 23, 31), seed=4)
    smoother = PosteriorSmoother(downsample=(2, 5, 5), trim_excess=trim_excess)
    coarse = smoother.transform(posterior)
    back = smoother.upsample(coarse > 0.5, posterior.shape)
    assert back.shape == posterior.shape
    corners = back[::2, ::5, ::5][tuple(slice(0, n) for n in coarse.shape)]
    np.testing.assert_array_equal(corners, coarse > 0.5)
    # Lists: one shape per crop.
    parts = smoother.upsample([coarse, coarse[:, :, :2]], [posterior.shape, (5, 23, 10)])
    assert [p.shape for p in parts] == [posterior.shape, (5, 23, 10)]


# ---------------------------------------------------------------------------
# PosteriorSmoother: lazy inputs and lists
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [(1, 7, 5), (3, 10, 10), (2, 23, 31), (7, 4, 31)])
@pytest.mark.parametrize(
    "params",
    [dict(), dict(downsample=(2, 5, 5)), dict(downsample=(1, 3, 4), trim_excess=True), dict(sigma=3.0)],
)
def test_lazy_equals_eager(chunks, params):
    posterior = random_posterior((7, 23, 31), seed=5)
    smoother = PosteriorSmoother(**params)
    eager = smoother.transform(posterior)
    lazy = smoother.transform(da.from_array(posterior, chunks=chunks))
    assert isinstance(lazy, da.Array) and lazy.shape == eager.shape and lazy.dtype == eager.dtype
    np.testing.assert_array_equal(lazy.compute(), eager)


def test_zarr_input_is_lazy_and_equal():
    posterior = random_posterior((6, 20, 20), seed=6)
    smoother = PosteriorSmoother(downsample=(1, 5, 5))
    lazy = smoother.transform(as_zarr(posterior, (2, 10, 10)))
    assert isinstance(lazy, da.Array)
    np.testing.assert_array_equal(lazy.compute(), smoother.transform(posterior))
    # A 2D zarr image gives a 2D result.
    image = as_zarr(posterior[0], (7, 7))
    np.testing.assert_array_equal(smoother.transform(image).compute(), smoother.transform(posterior[0]))


def test_lists_give_lists():
    crops = [random_posterior((3, 10, 10), seed=s) for s in range(3)] + [random_posterior((12, 9), seed=9)]
    smoother = PosteriorSmoother(downsample=(1, 2, 2))
    results = smoother.transform(crops)
    assert isinstance(results, list) and len(results) == 4
    for crop, result in zip(crops, results):
        np.testing.assert_array_equal(result, smoother.transform(crop))


# ---------------------------------------------------------------------------
# PosteriorSmoother: errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "X, error, message",
    [
        (np.zeros((3, 8, 8), dtype=np.uint8), TypeError, "posterior probability map"),
        (np.zeros((3, 8, 8), dtype=bool), TypeError, "astype"),
        (np.full((3, 8, 8), 1.5, dtype=np.float32), ValueError, r"\[0, 1\]"),
        (np.full((3, 8, 8), np.nan, dtype=np.float32), ValueError, "NaN"),
        (np.zeros((0, 8, 8), dtype=np.float32), ValueError, "empty"),
        (np.zeros((2, 3, 8, 8), dtype=np.float32), ValueError, "2D image"),
        ([], ValueError, "empty list"),
    ],
)
def test_smoother_rejects_bad_posteriors(X, error, message):
    with pytest.raises(error, match=message):
        PosteriorSmoother().fit(X)
    with pytest.raises(error, match=message):
        PosteriorSmoother().transform(X)


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(sigma=-1.0), "sigma"),
        (dict(sigma=(0.5, -1, 1)), "sigma"),
        (dict(sigma=(1.0, np.inf, 1.0)), "sigma"),
        (dict(sigma=(1, 1, 1, 1)), "sigma"),
        (dict(clip=0.0), "clip"),
        (dict(clip=0.5), "clip"),
        (dict(output_dtype="int8"), "output_dtype"),
    ],
)
def test_smoother_rejects_bad_parameters(params, message):
    with pytest.raises(ValueError, match=message):
        PosteriorSmoother(**params).transform(random_posterior((3, 8, 8)))


def test_two_sigmas_for_a_volume_is_an_error():
    with pytest.raises(ValueError, match="2 entries"):
        PosteriorSmoother(sigma=(1.0, 1.0)).transform(random_posterior((3, 8, 8)))


def test_trim_excess_with_an_axis_shorter_than_a_block():
    with pytest.raises(ValueError, match="shorter than its block"):
        PosteriorSmoother(downsample=(1, 5, 5), trim_excess=True).transform(random_posterior((3, 4, 8)))


def test_lazy_posterior_out_of_range_is_caught_when_computed():
    posterior = random_posterior((4, 8, 8))
    posterior[3, 2, 2] = np.nan
    lazy = PosteriorSmoother().transform(da.from_array(posterior, chunks=(2, 8, 8)))
    with pytest.raises(ValueError, match="NaN"):
        lazy.compute()


# ---------------------------------------------------------------------------
# full_resolution_scorer
# ---------------------------------------------------------------------------


def test_full_resolution_scorer_upsamples_before_scoring():
    _, masks = make_crops(2, (4, 40, 40), n_particles=6, radius=(3, 5), random_state=1)
    rng = np.random.default_rng(1)
    posteriors = [np.clip(m * 0.9 + rng.normal(0.05, 0.1, m.shape), 0, 1).astype(np.float32) for m in masks]
    pipe = Pipeline(
        [
            ("smooth", PosteriorSmoother(sigma=(0, 1, 1), downsample=(1, 2, 2))),
            ("labeler", NanoparticleLabeler(threshold=0.5, min_size=2)),
        ]
    )
    coarse = pipe.transform(posteriors)
    assert coarse[0].shape == (4, 20, 20)
    with pytest.raises(ValueError):
        object_f1_scorer(pipe, posteriors, masks)  # shapes differ
    scorer = full_resolution_scorer(object_f1_scorer)
    expected = match_objects([upsample(c, (1, 2, 2), m.shape) for c, m in zip(coarse, masks)], masks)["f1"]
    assert expected > 0.5  # the particles are found, so the comparison means something
    assert scorer(pipe, posteriors, masks) == pytest.approx(expected)
    # Picklable, as GridSearchCV with n_jobs > 1 needs.
    assert pickle.loads(pickle.dumps(scorer))(pipe, posteriors, masks) == pytest.approx(expected)
    # Nested pipelines and a single volume work too.
    nested = Pipeline([("inner", pipe)])
    single = match_objects(upsample(coarse[0], (1, 2, 2), masks[0].shape), masks[0])["f1"]
    assert scorer(nested, posteriors[0], masks[0]) == pytest.approx(single)


def test_full_resolution_scorer_without_downsampling_is_the_plain_scorer():
    _, masks = make_crops(2, (4, 40, 40), n_particles=6, radius=(3, 5), random_state=2)
    posteriors = [np.where(m, 0.9, 0.1).astype(np.float32) for m in masks]
    pipe = Pipeline([("smooth", PosteriorSmoother()), ("labeler", NanoparticleLabeler(threshold=0.5, min_size=2))])
    pipe.fit(posteriors, masks)
    plain = object_f1_scorer(pipe, posteriors, masks)
    assert full_resolution_scorer(object_f1_scorer)(pipe, posteriors, masks) == plain
    with pytest.raises(TypeError, match="callable"):
        full_resolution_scorer("f1")


# ---------------------------------------------------------------------------
# BackgroundSubtractor
# ---------------------------------------------------------------------------


def ramp_with_disc():
    """A background ramp from 60 to 155 along X (and a little along Y), with
    a bright disc of radius 3 sitting 80 grey levels above it."""
    rows, cols = np.mgrid[:64, :64]
    background = 60 + 1.5 * cols + 0.3 * rows
    disc = (rows - 32) ** 2 + (cols - 30) ** 2 <= 9
    image = np.rint(background + 80 * disc).astype(np.uint8)
    return image, disc


@pytest.mark.parametrize(
    "method, radius", [("tophat", 6), ("rolling_ball", 12), ("gaussian", 10)]
)
def test_background_subtraction_flattens_a_ramp_and_keeps_a_disc(method, radius):
    image, disc = ramp_with_disc()
    flat = BackgroundSubtractor(method=method, radius=radius).transform(image)
    assert flat.dtype == np.uint8 and flat.shape == image.shape
    # Compare away from the borders, where the filters see a full neighbourhood.
    interior = np.zeros_like(disc)
    interior[16:-16, 16:-16] = True
    background = interior & ~ndi.binary_dilation(disc, iterations=4)
    before = np.ptp(image[background].astype(int))
    after = np.ptp(flat[background].astype(int))
    assert before > 50 and after <= 6
    contrast = flat[disc].astype(float).mean() - np.median(flat[background])
    assert contrast > 60


def test_tophat_equals_image_minus_scipy_opening():
    image, _ = make_phantom((3, 48, 48), n_particles=6, random_state=4)
    flat = BackgroundSubtractor(method="tophat", radius=4).transform(image)
    for plane, result in zip(image, flat):
        expected = plane - ndi.grey_opening(plane, footprint=disk(4))
        np.testing.assert_array_equal(result, expected)


def test_rolling_ball_and_gaussian_equal_their_definitions():
    image, _ = make_phantom((2, 40, 40), n_particles=4, random_state=5)
    rb = BackgroundSubtractor(method="rolling_ball", radius=6).transform(image)
    gauss = BackgroundSubtractor(method="gaussian", radius=5).transform(image)
    shifted = BackgroundSubtractor(method="gaussian", radius=5, offset=20).transform(image)
    for plane, r, g, s in zip(image, rb, gauss, shifted):
        np.testing.assert_array_equal(r, plane - rolling_ball(plane, radius=6))
        difference = plane - ndi.gaussian_filter(plane.astype(np.float64), 5)
        median = np.percentile(plane, 50, method="inverted_cdf")
        np.testing.assert_array_equal(g, np.clip(np.rint(difference + median), 0, 255).astype(np.uint8))
        np.testing.assert_array_equal(s, np.clip(np.rint(difference + 20), 0, 255).astype(np.uint8))


def test_3d_filter_uses_an_ellipsoid_per_axis():
    image, _ = make_phantom((6, 32, 32), n_particles=5, random_state=6)
    flat = BackgroundSubtractor(method="tophat", radius=(1, 3, 3), per_slice=False).transform(image)
    z, y, x = np.mgrid[-1:2, -3:4, -3:4]
    footprint = z**2 + (y / 3) ** 2 + (x / 3) ** 2 <= 1
    np.testing.assert_array_equal(flat, image - ndi.grey_opening(image, footprint=footprint))


@pytest.mark.parametrize(
    "params",
    [
        dict(method="tophat"),
        dict(method="rolling_ball", radius=4),
        dict(method="gaussian", radius=6),
        dict(method="tophat", radius=(1, 4, 4), per_slice=False),
        dict(method="gaussian", radius=(1, 5, 5), per_slice=False),
        dict(method="rolling_ball", radius=(2, 4, 4), per_slice=False),
    ],
)
@pytest.mark.parametrize("chunks", [(1, 40, 48), (2, 16, 20), (9, 40, 48)])
def test_background_lazy_equals_eager(params, chunks):
    image, _ = make_phantom((9, 40, 48), n_particles=6, random_state=7)
    subtractor = BackgroundSubtractor(**params)
    eager = subtractor.transform(image)
    lazy = subtractor.transform(da.from_array(image, chunks=chunks))
    assert isinstance(lazy, da.Array) and lazy.dtype == np.uint8
    np.testing.assert_array_equal(lazy.compute(), eager)


def test_background_on_zarr_2d_and_lists():
    image, _ = make_phantom((4, 32, 32), n_particles=4, random_state=8)
    subtractor = BackgroundSubtractor()
    lazy = subtractor.transform(as_zarr(image, (1, 16, 16)))
    np.testing.assert_array_equal(lazy.compute(), subtractor.transform(image))
    np.testing.assert_array_equal(subtractor.transform(image[1]), subtractor.transform(image)[1])
    results = subtractor.transform([image, image[0]])
    assert isinstance(results, list)
    np.testing.assert_array_equal(results[1], subtractor.transform(image)[0])


@pytest.mark.parametrize("method", ["passthrough", None])
def test_background_can_be_switched_off(method):
    image, _ = make_phantom((2, 16, 16), n_particles=2, random_state=9)
    assert BackgroundSubtractor(method=method).transform(image) is image
    lazy = BackgroundSubtractor(method=method).transform(as_zarr(image, (1, 16, 16)))
    np.testing.assert_array_equal(lazy.compute(), image)


@pytest.mark.parametrize(
    "X, params, error, message",
    [
        (np.zeros((2, 8, 8), dtype=np.float32), dict(), TypeError, "uint8"),
        (np.zeros((2, 8, 8), dtype=np.uint16), dict(), TypeError, "uint8"),
        (np.zeros((2, 8, 8), dtype=np.uint8), dict(radius=0), ValueError, "radius"),
        (np.zeros((2, 8, 8), dtype=np.uint8), dict(radius=(0, 0, 0)), ValueError, "radius"),
        (np.zeros((2, 8, 8), dtype=np.uint8), dict(radius=(1, 2)), ValueError, "2 entries"),
        (np.zeros((2, 8, 8), dtype=np.uint8), dict(method="opening"), ValueError, "method"),
        (np.zeros((2, 8, 8), dtype=np.uint8), dict(offset=300), ValueError, "offset"),
    ],
)
def test_background_rejects_bad_input(X, params, error, message):
    with pytest.raises(error, match=message):
        BackgroundSubtractor(**params).transform(X)


# ---------------------------------------------------------------------------
# SliceEqualizer
# ---------------------------------------------------------------------------


def test_equalizer_removes_slice_drift(drifting_volume):
    percentiles = (1, 99.9)
    before = np.array([np.percentile(s, percentiles, method="inverted_cdf") for s in drifting_volume])
    assert np.ptp(before[:, 0]) > 20  # the drift is there
    equalized = SliceEqualizer(percentiles=percentiles).fit_transform(drifting_volume)
    assert equalized.dtype == np.uint8
    after = np.array([np.percentile(s, percentiles, method="inverted_cdf") for s in equalized])
    assert np.ptp(after[:, 0]) <= 1 and np.ptp(after[:, 1]) <= 1
    # Also with NumPy's default (interpolating) percentiles.
    after_linear = np.array([np.percentile(s, percentiles) for s in equalized])
    assert np.ptp(after_linear[:, 0]) <= 1 and np.ptp(after_linear[:, 1]) <= 1.5


def test_equalizer_learns_slice_percentiles_and_reference(drifting_volume):
    expected = np.array([np.percentile(s, (5, 95), method="inverted_cdf") for s in drifting_volume])
    median = SliceEqualizer(percentiles=(5, 95)).fit(drifting_volume)
    np.testing.assert_array_equal(median.slice_percentiles_, expected)
    np.testing.assert_array_equal(median.reference_, np.median(expected, axis=0))
    assert median.n_slices_fit_ == 8
    pooled = SliceEqualizer(percentiles=(5, 95), reference="volume").fit(drifting_volume)
    np.testing.assert_array_equal(pooled.reference_, np.percentile(drifting_volume, (5, 95), method="inverted_cdf"))
    fixed = SliceEqualizer(percentiles=(5, 95), reference=(40, 200)).fit(drifting_volume)
    result = fixed.transform(drifting_volume)
    for plane in result:
        np.testing.assert_array_equal(np.percentile(plane, (5, 95), method="inverted_cdf"), [40, 200])


def test_equalizer_maps_each_slice_linearly():
    plane = np.tile(np.arange(100, 200, dtype=np.uint8), (4, 1))  # percentiles 0/100 -> 100/199
    volume = np.stack([plane, plane - 50])
    equalizer = SliceEqualizer(percentiles=(0, 100), reference=(0, 198)).fit(volume)
    result = equalizer.transform(volume)
    expected = np.clip(np.rint((np.arange(100, 200) - 100) * 2.0), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(result[0, 0], expected)
    np.testing.assert_array_equal(result[1, 0], expected)


def test_flat_slice_is_shifted_only():
    volume = np.stack([np.full((8, 8), 30, dtype=np.uint8), np.arange(64, dtype=np.uint8).reshape(8, 8) + 100])
    result = SliceEqualizer(percentiles=(10, 90), reference=(50, 150)).fit(volume).transform(volume)
    np.testing.assert_array_equal(result[0], 50)


def test_equalizer_fit_on_lists_pools_the_slices(drifting_volume):
    crops = [drifting_volume[:3], drifting_volume[3:], drifting_volume[0]]
    pooled = SliceEqualizer().fit(crops)
    whole = SliceEqualizer().fit(np.concatenate([drifting_volume, drifting_volume[:1]]))
    np.testing.assert_array_equal(pooled.slice_percentiles_, whole.slice_percentiles_)
    np.testing.assert_array_equal(pooled.reference_, whole.reference_)
    results = pooled.transform(crops)
    assert isinstance(results, list) and results[2].shape == drifting_volume[0].shape


@pytest.mark.parametrize("chunks", [(1, 64, 64), (3, 20, 30)])
def test_equalizer_lazy_equals_eager(drifting_volume, chunks):
    eager = SliceEqualizer().fit(drifting_volume)
    lazy_input = da.from_array(drifting_volume, chunks=chunks)
    lazy = SliceEqualizer().fit(lazy_input)
    np.testing.assert_array_equal(lazy.reference_, eager.reference_)
    result = lazy.transform(as_zarr(drifting_volume, chunks))
    assert isinstance(result, da.Array)
    np.testing.assert_array_equal(result.compute(), eager.transform(drifting_volume))


def test_equalizer_fit_reads_each_chunk_once(drifting_volume, small_slabs):
    small_slabs(64 * 64)  # one slice per slab
    reads = []

    def record(block, block_info=None):
        reads.append(block_info[0]["chunk-location"][0])
        return block

    source = da.from_array(drifting_volume, chunks=(1, 64, 64)).map_blocks(record, dtype=np.uint8)
    SliceEqualizer().fit(source)
    assert sorted(reads) == list(range(8))


def test_clahe_per_slice():
    image, _ = make_phantom((3, 48, 48), n_particles=4, random_state=10)
    equalizer = SliceEqualizer(method="clahe", clip_limit=0.02).fit(image)
    assert equalizer.reference_ is None
    result = equalizer.transform(image)
    assert result.dtype == np.uint8
    for plane, out in zip(image, result):
        expected = np.clip(np.rint(equalize_adapthist(plane, clip_limit=0.02, nbins=256) * 255), 0, 255)
        np.testing.assert_array_equal(out, expected.astype(np.uint8))
    np.testing.assert_array_equal(equalizer.transform(da.from_array(image, chunks=(2, 24, 48))).compute(), result)


@pytest.mark.parametrize("method", ["passthrough", None])
def test_equalizer_can_be_switched_off(method, drifting_volume):
    assert SliceEqualizer(method=method).fit(drifting_volume).transform(drifting_volume) is drifting_volume


def test_equalizer_must_be_fitted(drifting_volume):
    with pytest.raises(NotFittedError):
        SliceEqualizer().transform(drifting_volume)


@pytest.mark.parametrize(
    "params, X, error, message",
    [
        (dict(percentiles=(99, 1)), None, ValueError, "low < high"),
        (dict(percentiles=(1, 101)), None, ValueError, "percentiles"),
        (dict(percentiles=5), None, ValueError, "percentiles"),
        (dict(reference=(200, 100)), None, ValueError, "reference"),
        (dict(reference="mean"), None, ValueError, "reference"),
        (dict(), np.zeros((2, 8, 8), dtype=np.float64), TypeError, "uint8"),
        (dict(), np.zeros((2, 0, 8), dtype=np.uint8), ValueError, "empty"),
    ],
)
def test_equalizer_rejects_bad_input(params, X, error, message, drifting_volume):
    with pytest.raises(error, match=message):
        SliceEqualizer(**params).fit(drifting_volume if X is None else X)


# ---------------------------------------------------------------------------
# scikit-learn conventions
# ---------------------------------------------------------------------------


ESTIMATORS = [
    PosteriorSmoother(),
    PosteriorSmoother(sigma=1.0, downsample=(1, 2, 2), trim_excess=True, output_dtype="float16"),
    BackgroundSubtractor(),
    BackgroundSubtractor(method="gaussian", radius=(1, 4, 4), per_slice=False, offset=10),
    SliceEqualizer(),
    SliceEqualizer(method="clahe", kernel_size=8),
]


def data_for(estimator):
    image, _ = make_phantom((3, 24, 24), n_particles=3, random_state=11)
    if isinstance(estimator, PosteriorSmoother):
        return image.astype(np.float32) / 255
    return image


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=repr)
def test_params_clone_and_pickle_round_trips(estimator):
    cls = type(estimator)
    assert set(cls().get_params()) == set(cls._parameter_constraints)
    params = estimator.get_params()
    assert cls(**params).get_params() == params
    assert cls().set_params(**params).get_params() == params
    X = data_for(estimator)
    fitted = clone(estimator).fit(X)
    assert fitted.fit(X) is fitted
    assert clone(fitted).get_params() == params
    restored = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(restored.transform(X), fitted.transform(X))


def test_keyword_only_parameters():
    for cls in (PosteriorSmoother, BackgroundSubtractor, SliceEqualizer):
        with pytest.raises(TypeError):
            cls(1.0)


def test_fit_checks_the_shape_of_y():
    X = data_for(PosteriorSmoother())
    with pytest.raises(ValueError, match="shape"):
        PosteriorSmoother().fit(X, np.zeros((2, 24, 24), dtype=bool))


# ---------------------------------------------------------------------------
# composition
# ---------------------------------------------------------------------------


def full_pipeline():
    return Pipeline(
        [
            ("equalize", SliceEqualizer()),
            ("background", BackgroundSubtractor()),
            ("mixture", NanoparticleMixture(max_iter=100_000)),
            ("smooth", PosteriorSmoother()),
            ("labeler", NanoparticleLabeler(threshold=0.5, min_size=3)),
        ]
    )


def test_pipeline_composes_the_steps():
    image, _ = make_phantom((8, 64, 64), n_particles=15, drift=4.0, random_state=12)
    labels = full_pipeline().fit_transform(image)
    assert labels.dtype == np.uint32 and labels.shape == image.shape
    equalized = SliceEqualizer().fit_transform(image)
    flattened = BackgroundSubtractor().transform(equalized)
    assert equalized.dtype == np.uint8 and flattened.dtype == np.uint8
    posterior = NanoparticleMixture(max_iter=100_000).fit_transform(flattened)
    expected = NanoparticleLabeler(threshold=0.5, min_size=3).transform(PosteriorSmoother().transform(posterior))
    np.testing.assert_array_equal(labels, expected)
    # The same pipeline on a zarr volume: lazy, and the same labels.
    lazy = full_pipeline().fit_transform(as_zarr(image, (2, 64, 64)))
    assert isinstance(lazy, da.Array)
    np.testing.assert_array_equal(lazy.compute(), labels)


def test_grid_search_over_background_and_smoothing():
    crops, masks = make_crops(4, (6, 64, 64), n_particles=12, random_state=13)
    grid = {
        "background__method": ["tophat", "passthrough"],
        "smooth__sigma": [0.0, (0.5, 1.5, 1.5)],
    }
    search = GridSearchCV(full_pipeline(), grid, scoring=object_f1_scorer, cv=KFold(2), n_jobs=1, error_score="raise")
    search.fit(crops, masks)
    scores = search.cv_results_["mean_test_score"]
    assert scores.shape == (4,) and np.all((scores >= 0) & (scores <= 1))
    assert np.ptp(scores) > 0.01  # the searched parameters change the result
    assert search.best_score_ == pytest.approx(scores.max())
    best = search.best_estimator_
    assert best.get_params()["background__method"] == search.best_params_["background__method"]
    assert object_f1_scorer(best, crops, masks) == pytest.approx(search.score(crops, masks))
