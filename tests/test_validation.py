"""Bad input is answered by a clear exception, and nothing is written."""

import dask.array as da
import numpy as np
import pytest
import zarr

from nanoseg import NanoparticleLabeler, NanoparticleMixture


@pytest.fixture(scope="module")
def fitted(volume_6x64x64):
    return NanoparticleMixture().fit(volume_6x64x64)


def float_with(value, shape=(4, 16, 16)):
    data = np.full(shape, 0.5)
    data[1, 2, 3] = value
    return data


def saturated(dtype, top):
    """Most voxels at the largest value: an all-bright acquisition."""
    volume = np.full((4, 16, 16), top, dtype=dtype)
    volume[:, :5, :] = top // 2
    return volume


MIXTURE_BAD_X = [
    (np.zeros((4, 16, 16), dtype=np.float64), TypeError, "uint8 or uint16"),
    (np.zeros((4, 16, 16), dtype=np.int16), TypeError, "uint8"),
    (np.zeros((4, 16, 16), dtype=np.uint16), ValueError, "constant.*0"),
    (np.zeros((4, 16, 16), dtype=bool), TypeError, "uint8"),
    (np.zeros((4, 16, 16), dtype=np.complex64), TypeError, "uint8"),
    (float_with(np.nan), ValueError, "NaN"),
    (float_with(np.inf), ValueError, "NaN or infinite"),
    (np.zeros((0, 16, 16), dtype=np.uint8), ValueError, "empty"),
    (np.zeros((4, 0, 16), dtype=np.uint8), ValueError, "empty"),
    (np.zeros(16, dtype=np.uint8), ValueError, "2D image .* or a 3D volume"),
    (np.zeros((2, 4, 16, 16), dtype=np.uint8), ValueError, "select one channel"),
    (np.full((4, 16, 16), 17, dtype=np.uint8), ValueError, "constant.*17"),
    (saturated(np.uint8, 255), ValueError, "saturated.*at or above intensity 255"),
    (saturated(np.uint16, 65535), ValueError, "saturated.*at or above bin 255"),
    ([], ValueError, "empty list"),
    ([np.zeros((8, 8), np.uint8), "not an image"], TypeError, r"X\[1\] must be a NumPy, zarr or dask array"),
    ("volume.zarr", TypeError, "must be a NumPy, zarr or dask array"),
]


@pytest.mark.parametrize("X, error, message", MIXTURE_BAD_X)
def test_mixture_rejects_bad_volumes(X, error, message, fitted):
    with pytest.raises(error, match=message):
        NanoparticleMixture().fit(X)
    if not (isinstance(X, np.ndarray) and X.dtype in (np.uint8, np.uint16) and X.ndim == 3 and X.size):
        with pytest.raises(error, match=message):
            fitted.transform(X)


def test_constant_list_of_crops_is_rejected():
    crops = [np.full((10, 10), 40, np.uint8), np.full((3, 10, 10), 40, np.uint8)]
    with pytest.raises(ValueError, match="constant"):
        NanoparticleMixture().fit(crops)


def test_lazy_input_of_wrong_dtype_is_rejected_before_reading():
    z = zarr.create_array(store={}, shape=(4, 16, 16), chunks=(1, 16, 16), dtype="float32")
    with pytest.raises(TypeError, match="got float32"):
        NanoparticleMixture().fit(z)
    with pytest.raises(TypeError, match="got int32"):
        NanoparticleMixture().fit(da.zeros((4, 16, 16), dtype=np.int32))


def test_no_background_left_is_explained(volume_6x64x64):
    with pytest.raises(ValueError, match="No background voxels"):
        NanoparticleMixture(percentile_low=1, min_seed_size=1, halo_pad=200).fit(volume_6x64x64)


@pytest.mark.parametrize(
    "y, message",
    [
        (np.zeros((6, 64, 63), dtype=bool), r"y has shape \(6, 64, 63\)"),
        ([np.zeros((6, 64, 64), dtype=bool)], "masks must have exactly the shape|shape"),
    ],
)
def test_mask_shape_must_match_volume(volume_6x64x64, y, message):
    with pytest.raises(ValueError, match=message):
        NanoparticleMixture().fit(volume_6x64x64, y)


def test_labeler_accepts_full_resolution_masks_of_a_coarser_posterior(volume_6x64x64):
    # After a downsampling smoother the posterior is coarser than the annotations.
    posterior = volume_6x64x64[:, ::4, ::4].astype(np.float32) / 255
    labeler = NanoparticleLabeler()
    assert labeler.fit(posterior, np.zeros(volume_6x64x64.shape, bool)) is labeler
    with pytest.raises(ValueError, match="y has 1 masks but X has 2 crops"):
        labeler.fit([posterior[0], posterior[1]], [np.zeros((64, 64), bool)])
    with pytest.raises(ValueError, match="shape"):
        labeler.fit(posterior, np.zeros((64, 64), bool))


def test_mask_list_must_match_crops(volume_6x64x64):
    crops = [volume_6x64x64[0], volume_6x64x64[1, :32]]
    with pytest.raises(ValueError, match="y has 1 masks but X has 2 crops"):
        NanoparticleMixture().fit(crops, [np.zeros((64, 64), bool)])
    with pytest.raises(ValueError, match=r"y\[1\] has shape \(64, 64\).*\(32, 64\)"):
        NanoparticleMixture().fit(crops, [np.zeros((64, 64), bool), np.zeros((64, 64), bool)])
    with pytest.raises(ValueError, match="must be a list of as many masks"):
        NanoparticleMixture().fit(crops, np.zeros((2, 64, 64), bool))


LABELER_BAD_X = [
    (np.zeros((4, 16, 16), dtype=np.uint8), TypeError, "not the raw image"),
    (np.zeros((4, 16, 16), dtype=np.int64), TypeError, "posterior probability map"),
    (float_with(np.nan), ValueError, "NaN"),
    (float_with(-np.inf), ValueError, "infinite"),
    (float_with(1.5), ValueError, r"probabilities in \[0, 1\]; found values in \[0.5, 1.5\]"),
    (float_with(-0.2), ValueError, "probabilities in"),
    (np.zeros((3, 0, 4)), ValueError, "empty"),
    (np.zeros((2, 2, 2, 2)), ValueError, "3D volume"),
    (np.zeros(5), ValueError, "2D image"),
]


@pytest.mark.parametrize("X, error, message", LABELER_BAD_X)
def test_labeler_rejects_bad_posteriors(X, error, message):
    with pytest.raises(error, match=message):
        NanoparticleLabeler().transform(X)
    with pytest.raises(error, match=message):
        NanoparticleLabeler().fit(X)


def test_labeler_connectivity_beyond_2d():
    with pytest.raises(ValueError, match="connectivity=3 is not defined for the 2D X"):
        NanoparticleLabeler(connectivity=3).transform(np.zeros((8, 8)))


def test_lazy_posterior_with_nan_is_caught_while_labelling():
    data = float_with(np.nan, shape=(6, 16, 16)).astype(np.float32)
    z = zarr.create_array(store={}, shape=data.shape, chunks=(1, 16, 16), dtype="float32")
    z[...] = data
    with pytest.raises(ValueError, match="NaN"):
        NanoparticleLabeler().transform(z)


def test_inputs_are_never_modified(volume_6x64x64):
    store = zarr.storage.MemoryStore()
    z = zarr.create_array(store=store, shape=volume_6x64x64.shape, chunks=(2, 32, 32), dtype="uint8")
    z[...] = volume_6x64x64
    before = {k: bytes(v.to_bytes()) for k, v in store._store_dict.items()}
    numpy_copy = volume_6x64x64.copy()
    mixture = NanoparticleMixture().fit(z)
    NanoparticleLabeler().transform(mixture.transform(z)).compute()
    posterior = mixture.fit(volume_6x64x64).transform(volume_6x64x64)
    posterior_copy = posterior.copy()
    NanoparticleLabeler().transform(posterior)
    after = {k: bytes(v.to_bytes()) for k, v in store._store_dict.items()}
    assert before == after
    np.testing.assert_array_equal(volume_6x64x64, numpy_copy)
    np.testing.assert_array_equal(posterior, posterior_copy)


def test_read_only_and_non_contiguous_arrays_work(volume_6x64x64):
    view = volume_6x64x64[:, ::2, ::-1]
    frozen = np.array(volume_6x64x64)
    frozen.flags.writeable = False
    expected = NanoparticleMixture().fit(np.ascontiguousarray(view)).transform(np.ascontiguousarray(view))
    np.testing.assert_array_equal(NanoparticleMixture().fit(view).transform(view), expected)
    NanoparticleMixture().fit(frozen).transform(frozen)


def test_saturated_dark_volume_is_refused_with_dark_polarity():
    volume = 255 - saturated(np.uint8, 255)
    with pytest.raises(ValueError, match="saturated.*at or below intensity 0"):
        NanoparticleMixture(polarity="dark").fit(volume)


def test_background_only_volume_gives_no_particles():
    # Noise without particles is valid input: the fit succeeds and the
    # labeler finds nothing, rather than calling the noise tail particles.
    rng = np.random.default_rng(3)
    noise = np.clip(rng.normal(100, 6, (16, 96, 96)), 0, 255).astype(np.uint8)
    mixture = NanoparticleMixture(max_iter=100_000).fit(noise)
    assert mixture.background_weight_ > 0.99
    labels = NanoparticleLabeler().transform(mixture.transform(noise))
    assert labels.max() == 0


def test_release_free_memory_is_safe_with_or_without_glibc(monkeypatch):
    import ctypes.util

    from nanoseg import _plan

    _plan._malloc_trim.cache_clear()
    _plan.release_free_memory()  # glibc here, or a no-op elsewhere: never an error
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    _plan._malloc_trim.cache_clear()
    assert _plan._malloc_trim() is None
    _plan.release_free_memory()
    _plan._malloc_trim.cache_clear()
