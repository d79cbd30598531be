"""NanoparticleMixture.predict: the posterior's mask through boolean tables."""

import dask.array as da
import numpy as np
import pytest
import zarr

from nanoseg import NanoparticleMixture
from nanoseg.datasets import make_phantom


@pytest.fixture(scope="module")
def fitted():
    image, _ = make_phantom(shape=(6, 80, 72), random_state=11)
    return image, NanoparticleMixture().fit(image)


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.95, 1.0])
def test_predict_is_the_thresholded_posterior(fitted, threshold):
    image, mixture = fitted
    mask = mixture.predict(image, threshold=threshold)
    assert type(mask) is np.ndarray and mask.dtype == bool
    np.testing.assert_array_equal(mask, mixture.predict_proba(image) >= threshold)


def test_predict_default_threshold_is_one_half(fitted):
    image, mixture = fitted
    np.testing.assert_array_equal(mixture.predict(image), mixture.predict_proba(image) >= 0.5)


@pytest.mark.parametrize("kind", ["zarr", "dask"])
def test_predict_is_lazy_and_equal_out_of_core(fitted, kind, tmp_path):
    image, mixture = fitted
    if kind == "zarr":
        X = zarr.open_array(tmp_path / "image.zarr", mode="w", shape=image.shape, chunks=(2, 40, 36), dtype=image.dtype)
        X[:] = image
    else:
        X = da.from_array(image, chunks=(4, 32, 72))
    mask = mixture.predict(X, threshold=0.8)
    assert isinstance(mask, da.Array) and mask.dtype == bool
    np.testing.assert_array_equal(mask.compute(), mixture.predict_proba(image) >= 0.8)


def test_predict_lists_dark_float16_and_16_bit(fitted):
    image, mixture = fitted
    masks = mixture.predict([image[0], image[1:3]], threshold=0.7)
    posts = mixture.predict_proba([image[0], image[1:3]])
    for mask, post in zip(masks, posts):
        np.testing.assert_array_equal(mask, post >= 0.7)
    dark = NanoparticleMixture(polarity="dark", posterior_dtype="float16").fit(255 - image)
    np.testing.assert_array_equal(dark.predict(255 - image, threshold=0.9), dark.predict_proba(255 - image) >= 0.9)
    wide = image.astype(np.uint16) * 200 + 1000
    mixture16 = NanoparticleMixture(binning="range").fit(wide)
    lazy = da.from_array(wide, chunks=(3, 40, 72))
    np.testing.assert_array_equal(mixture16.predict(lazy, threshold=0.6).compute(), mixture16.predict_proba(wide) >= 0.6)


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan"), "high"])
def test_predict_refuses_thresholds_outside_0_1(fitted, threshold):
    image, mixture = fitted
    with pytest.raises(ValueError, match="threshold"):
        mixture.predict(image, threshold=threshold)
