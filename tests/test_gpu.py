"""On a CUDA GPU (CuPy), every result equals the CPU's.

Skipped without CuPy or without a usable device. Histograms and labels must
be identical, fitted PMFs equal to 1e-12, and posteriors identical too (the
lookup tables are computed on the host from identical histograms; the GPU
only copies table entries). Kernels run both through the hand-written CUDA
kernels and through CuPy's generic functions. The classifier's features
match SciPy's up to float32 rounding, and its probabilities match but for
the rare voxel a rounding step sends down another branch of a tree.
"""

import pickle
import warnings

import numpy as np
import pytest
import scipy.ndimage as ndi

with warnings.catch_warnings():
    # CuPy may warn at import (e.g. about the CUDA path); pytest turns warnings into errors.
    warnings.simplefilter("ignore")
    cupy = pytest.importorskip("cupy")
    import cupyx.scipy.ndimage  # noqa: F401

import dask.array as da
import zarr
from sklearn.base import clone
from sklearn.pipeline import Pipeline

import nanoseg._backend as backend_module
from nanoseg import NanoparticleClassifier, NanoparticleLabeler, NanoparticleMixture
from nanoseg._backend import CPU, get_backend
from nanoseg._ops import components, histogram, morphology, seeds
from nanoseg._ops.filters import FEATURES, FeatureSpec, compute_features
from nanoseg.datasets import make_phantom

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cupy.is_available(), reason="no usable CUDA device"),
    # Slow-converging phantoms warn identically on both devices.
    pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning"),
]


@pytest.fixture
def gpu():
    return get_backend("cuda")


@pytest.fixture(params=["cuda-kernels", "cupy-generic"])
def kernels_path(request, monkeypatch):
    """Run a test with the hand-written CUDA kernels and with CuPy's generic functions."""
    monkeypatch.setattr(backend_module, "FAST_KERNELS", request.param == "cuda-kernels")
    return request.param


def test_backend_is_cupy(gpu):
    assert gpu.is_gpu and gpu.xp is cupy
    assert get_backend("auto") is gpu
    assert backend_module.is_device_array(cupy.zeros(3))


# -- kernels ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1), (3, 7, 5), (2, 255, 257), (5, 1024, 1031), (1, 4096, 4099), (65535 + 7, 2, 3)],
)
def test_histograms_identical(gpu, kernels_path, shape):
    if kernels_path == "cupy-generic" and shape[0] > 1000:
        pytest.skip("one bincount per slice: too slow for this many slices")
    rng = np.random.default_rng(sum(shape))
    slab = rng.integers(0, 256, shape, dtype=np.uint8)
    slab[0, 0, 0], slab[-1, -1, -1] = 0, 255
    mask = rng.random(shape) < 0.3
    expected = np.stack([np.bincount(s.ravel(), minlength=256) for s in slab])
    device = cupy.asarray(slab)
    got = histogram.slice_histograms(gpu, device)
    assert isinstance(got, cupy.ndarray) and got.dtype == np.int64
    np.testing.assert_array_equal(cupy.asnumpy(got), expected)
    np.testing.assert_array_equal(cupy.asnumpy(histogram.histogram(gpu, device[0])), expected[0])
    np.testing.assert_array_equal(
        cupy.asnumpy(histogram.masked_slice_histograms(gpu, device, cupy.asarray(mask))),
        np.stack([np.bincount(s[m], minlength=256) for s, m in zip(slab, mask)]),
    )
    # Views with strides.
    view = device[:, ::2, 1::3]
    np.testing.assert_array_equal(
        cupy.asnumpy(histogram.slice_histograms(gpu, view)),
        np.stack([np.bincount(s.ravel(), minlength=256) for s in slab[:, ::2, 1::3]]),
    )


def test_histogram_of_one_value(gpu, kernels_path):
    # Every voxel in one bin: the worst case for atomic counters.
    slab = cupy.full((2, 2048, 2048), 117, dtype=np.uint8)
    got = cupy.asnumpy(histogram.slice_histograms(gpu, slab))
    assert got[:, 117].tolist() == [2048 * 2048] * 2 and got.sum() == 2 * 2048 * 2048


def smooth_slab(shape, seed):
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.normal(size=shape), (0, 2, 2))
    return (field * 400 + 120).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("dark", [False, True])
@pytest.mark.parametrize("shape", [(1, 64, 96), (6, 200, 180)])
def test_background_histograms_identical(gpu, kernels_path, dark, shape):
    slab = smooth_slab(shape, shape[0])
    model = 255 - slab if dark else slab
    levels = [tuple(np.percentile(model, [97, 99.5]).astype(int)), (0, 1), (255, 256), (256, 256)]
    for low, high in levels:
        for min_seed_size, halo_pad in [(1, 0), (5, 3), (20, 20)]:
            expected = np.stack(
                [
                    seeds.background_histogram(
                        CPU, image, low, high, min_seed_size=min_seed_size, halo_pad=halo_pad, dark=dark
                    )
                    for image in slab
                ]
            )
            got = seeds.slab_background_histograms(
                gpu, cupy.asarray(slab), low, high, min_seed_size=min_seed_size, halo_pad=halo_pad, dark=dark
            )
            np.testing.assert_array_equal(cupy.asnumpy(got), expected)


@pytest.mark.parametrize("shape", [(9, 17, 13), (40, 64, 48), (21, 19)])
@pytest.mark.parametrize("radius", [1, 2, 3])
def test_closing_identical(gpu, shape, radius):
    rng = np.random.default_rng(radius)
    mask = rng.random(shape) < 0.08
    mask[0, ...] |= rng.random(shape[1:]) < 0.3  # foreground on the border
    expected = morphology.close_mask(CPU, mask, radius)
    np.testing.assert_array_equal(cupy.asnumpy(morphology.close_mask(gpu, cupy.asarray(mask), radius)), expected)


@pytest.mark.parametrize("shape", [(7, 15, 16), (30, 64, 70), (300, 310)])
@pytest.mark.parametrize("connectivity", [1, 2, 3])
@pytest.mark.parametrize("density", [0.05, 0.3, 0.6])
def test_labels_in_raster_order(gpu, shape, connectivity, density):
    if connectivity > len(shape):
        pytest.skip("connectivity beyond the image's dimension")
    rng = np.random.default_rng(connectivity)
    mask = rng.random(shape) < density
    expected, count = ndi.label(mask, ndi.generate_binary_structure(len(shape), connectivity))
    labels, n = components.label_mask(gpu, cupy.asarray(mask), connectivity)
    assert n == count
    np.testing.assert_array_equal(cupy.asnumpy(labels), expected)
    flat, ids, n = components.label_voxels(gpu, cupy.asarray(mask), connectivity)
    np.testing.assert_array_equal(cupy.asnumpy(flat), np.flatnonzero(expected))
    np.testing.assert_array_equal(cupy.asnumpy(ids), expected.ravel()[np.flatnonzero(expected)])


# -- estimators --------------------------------------------------------------------
def to_zarr(array, chunks):
    z = zarr.create_array(store={}, shape=array.shape, chunks=chunks, dtype=array.dtype)
    z[...] = array
    return z


PHANTOMS = {
    "small": ((8, 96, 112), 20, (3, 96, 56)),
    "medium": ((32, 256, 256), 120, (4, 128, 256)),
}


@pytest.fixture(scope="module", params=sorted(PHANTOMS))
def case(request):
    shape, n_particles, chunks = PHANTOMS[request.param]
    image = make_phantom(shape, n_particles=n_particles, random_state=len(shape) + n_particles)[0]
    cpu = NanoparticleMixture().fit(image)
    posterior = cpu.transform(image)
    labels = NanoparticleLabeler(min_size=3).transform(posterior)
    return image, chunks, cpu, posterior, labels


HISTOGRAMS = ("stack_histogram_", "background_histogram_")
PMFS = ("stack_pmf_", "background_pmf_", "particle_pmf_")


def assert_same_fit(gpu_model, cpu_model):
    for name in HISTOGRAMS:
        np.testing.assert_array_equal(getattr(gpu_model, name), getattr(cpu_model, name), err_msg=name)
    for name in PMFS:
        value = getattr(gpu_model, name)
        assert type(value) is np.ndarray
        np.testing.assert_allclose(value, getattr(cpu_model, name), rtol=0, atol=1e-12, err_msg=name)
    assert (gpu_model.low_intensity_, gpu_model.high_intensity_) == (cpu_model.low_intensity_, cpu_model.high_intensity_)


def inputs(image, chunks):
    return {
        "numpy": image,
        "cupy": cupy.asarray(image),
        "zarr": to_zarr(image, chunks),
        "dask": da.from_array(image, chunks=chunks),
    }


def on_host(result, kind):
    """A result as a NumPy array, checking that it came back as `kind` asks: CuPy, lazy dask or NumPy."""
    if kind == "cupy":
        assert isinstance(result, cupy.ndarray)
        return cupy.asnumpy(result)
    if kind in ("zarr", "dask"):
        assert isinstance(result, da.Array)
        return result.compute()
    assert type(result) is np.ndarray
    return result


@pytest.mark.parametrize("kind", ["numpy", "cupy", "zarr", "dask"])
def test_mixture_identical(case, kind, kernels_path):
    image, chunks, cpu, posterior, _ = case
    X = inputs(image, chunks)[kind]
    gpu = NanoparticleMixture(device="cuda").fit(X)
    assert_same_fit(gpu, cpu)
    got = on_host(gpu.transform(X), kind)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, posterior)
    np.testing.assert_array_equal(gpu.slice_weights(X), cpu.slice_weights(image))


def test_mixture_options_identical(case):
    image, *_ = case
    device = cupy.asarray(image)
    for params in [
        {"sampling_step": 3},
        {"posterior_dtype": "float16"},
        {"polarity": "dark"},
        {"halo_pad": 0, "min_seed_size": 1},
        {"n_jobs": 1},
        {"memory_budget": image[0].size * 8},  # many small slabs
        {"percentile_low": "otsu", "monotone_posterior": True},
        {"halo": "dilation", "halo_pad": 5},
        {"halo": "dilation", "min_seed_size": 1},
    ]:
        X = 255 - image if params.get("polarity") == "dark" else image
        cpu = NanoparticleMixture(**params).fit(X)
        expected = cpu.transform(X)
        gpu = NanoparticleMixture(device="cuda", **params).fit(X)
        assert_same_fit(gpu, cpu)
        np.testing.assert_array_equal(gpu.transform(X), expected, err_msg=str(params))
        np.testing.assert_array_equal(NanoparticleMixture(device="cuda", **params).fit_transform(X), expected)
        if "polarity" not in params:
            np.testing.assert_array_equal(cupy.asnumpy(gpu.transform(device)), expected, err_msg=str(params))


@pytest.mark.parametrize("kind", ["numpy", "cupy", "zarr", "dask"])
def test_mask_identical(case, kind):
    image, chunks, _, posterior, _ = case
    X = inputs(image, chunks)[kind]
    gpu = NanoparticleMixture(device="cuda").fit(X)
    got = on_host(gpu.predict(X, threshold=0.9), kind)
    assert got.dtype == bool
    np.testing.assert_array_equal(got, posterior >= 0.9)


@pytest.mark.parametrize("kind", ["numpy", "cupy", "zarr", "dask"])
def test_labels_identical(case, kind, small_slabs):
    image, chunks, _, posterior, labels = case
    small_slabs(chunks[0] * image[0].size * 6)  # slabs of one chunk: many faces to merge
    X = inputs(posterior, chunks)[kind]
    got = on_host(NanoparticleLabeler(min_size=3, device="cuda").transform(X), kind)
    assert got.dtype == np.uint32
    np.testing.assert_array_equal(got, labels)


@pytest.mark.parametrize("connectivity", [1, 2, 3])
@pytest.mark.parametrize("radius", [0, 1, 2])
@pytest.mark.parametrize("slab_bytes", [None, 1, 4 * 60 * 70 * 6])
def test_labels_of_dense_masks_identical(connectivity, radius, slab_bytes, small_slabs):
    if slab_bytes is not None:
        small_slabs(slab_bytes)
    rng = np.random.default_rng(connectivity + 3 * radius)
    field = ndi.gaussian_filter(rng.random((25, 60, 70)), 1.0)
    mask = field > np.quantile(field, 0.85)
    params = {"threshold": 0.5, "radius": radius, "connectivity": connectivity, "min_size": 4}
    expected = NanoparticleLabeler(**params).transform(mask)
    np.testing.assert_array_equal(NanoparticleLabeler(device="cuda", **params).transform(mask), expected)
    np.testing.assert_array_equal(
        cupy.asnumpy(NanoparticleLabeler(device="cuda", **params).transform(cupy.asarray(mask.astype(np.float32)))),
        expected,
    )


def test_2d_and_lists_identical():
    crops = [make_phantom((1, 128, 128), n_particles=6, random_state=s)[0][0] for s in range(3)]
    cpu = NanoparticleMixture().fit(crops)
    gpu = NanoparticleMixture(device="cuda").fit([cupy.asarray(c) for c in crops])
    assert_same_fit(gpu, cpu)
    for got, expected in zip(gpu.transform([cupy.asarray(c) for c in crops]), cpu.transform(crops)):
        np.testing.assert_array_equal(cupy.asnumpy(got), expected)
    posterior = cpu.transform(crops[0])
    np.testing.assert_array_equal(
        NanoparticleLabeler(min_size=2, device="cuda").transform(posterior),
        NanoparticleLabeler(min_size=2).transform(posterior),
    )


def test_pipeline_on_device_data(case):
    image, *_ = case
    expected = Pipeline([("m", NanoparticleMixture()), ("l", NanoparticleLabeler())]).fit_transform(image)
    pipeline = Pipeline([("m", NanoparticleMixture(device="cuda")), ("l", NanoparticleLabeler(device="cuda"))])
    got = pipeline.fit_transform(cupy.asarray(image))
    assert isinstance(got, cupy.ndarray)
    np.testing.assert_array_equal(cupy.asnumpy(got), expected)


def test_model_fitted_on_gpu_runs_on_cpu(case):
    image, _, _, posterior, _ = case
    gpu = NanoparticleMixture(device="cuda").fit(cupy.asarray(image))
    gpu.transform(cupy.asarray(image))
    loaded = pickle.loads(pickle.dumps(gpu))
    for name, value in vars(loaded).items():
        assert not isinstance(value, cupy.ndarray), name
    np.testing.assert_array_equal(loaded.set_params(device="cpu").transform(image), posterior)


# -- 16-bit volumes ----------------------------------------------------------------
def test_uint16_mixture_identical(case):
    image, chunks, *_ = case
    wide = image.astype(np.uint16) * 37 + 500  # a 16-bit range the mixture bins into 256 bins
    cpu = NanoparticleMixture().fit(wide)
    expected = cpu.transform(wide)
    for kind, X in inputs(wide, chunks).items():
        gpu = NanoparticleMixture(device="cuda").fit(X)
        assert_same_fit(gpu, cpu)
        assert (gpu.binning_mode_, gpu.binning_low_, gpu.binning_high_, gpu.binning_shift_) == (
            cpu.binning_mode_, cpu.binning_low_, cpu.binning_high_, cpu.binning_shift_
        )
        np.testing.assert_array_equal(on_host(gpu.transform(X), kind), expected, err_msg=kind)


# -- the classifier's features and probabilities -----------------------------------
FEATURE_SPECS = {
    "3d": FeatureSpec(FEATURES, ((0.4, 1.0, 1.0), (0.8, 2.0, 2.0), (1.6, 4.0, 4.0))),
    "2d": FeatureSpec(FEATURES, ((0.0, 1.0, 1.0), (0.0, 2.5, 2.5))),
}


def assert_features_close(got, expected, what):
    # Gaussians differ from SciPy's by float32 rounding; derivatives and
    # eigenvalues are finite differences of them, so compare each feature
    # against its own magnitude.
    assert got.shape == expected.shape and got.dtype == np.float32, what
    for i, (g, e) in enumerate(zip(got, expected)):
        scale = max(1.0, float(np.abs(e).max()))
        error = float(np.abs(g.astype(np.float64) - e).max()) / scale
        assert error <= 1e-4, f"{what}: feature {i} differs by {error:.2e} of its magnitude"


@pytest.mark.parametrize("name", sorted(FEATURE_SPECS))
@pytest.mark.parametrize("chosen", ["all", "mask", "indices"])
def test_features_match_cpu(gpu, name, chosen):
    spec = FEATURE_SPECS[name]
    rng = np.random.default_rng(len(name) + len(chosen))
    shape = (1, 150, 170) if spec.ndim == 2 else (18, 70, 90)
    image = ndi.gaussian_filter(rng.normal(size=shape), (0, 1.5, 1.5)).astype(np.float32) * 5
    extra = rng.normal(size=shape).astype(np.float32)
    where = None if chosen == "all" else rng.random(shape) < 0.05
    if chosen == "indices":
        where = np.flatnonzero(where)
    expected = compute_features(CPU, image, spec, extra, where)
    on_device = None if where is None else cupy.asarray(where)
    got = compute_features(gpu, cupy.asarray(image), spec, cupy.asarray(extra), on_device)
    assert isinstance(got, cupy.ndarray)
    assert_features_close(cupy.asnumpy(got), expected, f"{name}, {chosen}")


def copy_fitted(model, **params):
    copy = clone(model).set_params(**params)
    copy.__dict__.update({k: v for k, v in model.__dict__.items() if k.endswith("_")})
    return copy


@pytest.fixture(scope="module")
def trained():
    volume, truth = make_phantom((40, 96, 96), n_particles=100, spacing=(50.0, 10.0, 10.0), random_state=1)
    model = NanoparticleClassifier(spacing=(50.0, 10.0, 10.0), sigmas=(10, 20), random_state=0, n_jobs=1,
                                   max_samples=20_000).fit(volume[:12], truth[:12])
    return volume, truth, model


def assert_probabilities_agree(got, expected, what):
    # A feature one rounding step away can send a voxel down another branch
    # of a tree: a handful of voxels may move by one tree's vote, no more.
    difference = np.abs(got.astype(np.float64) - expected)
    moved = np.count_nonzero(difference > 1e-6)
    assert moved <= 1e-4 * difference.size, f"{what}: {moved} of {difference.size} voxels differ"
    assert difference.max() <= 0.05, f"{what}: largest difference {difference.max():.3g}"


@pytest.mark.parametrize("kind", ["numpy", "cupy", "zarr", "dask"])
def test_classifier_probabilities_match_cpu(trained, kind):
    volume, _, cpu = trained
    expected = cpu.predict_proba(volume)
    gpu = copy_fitted(cpu, device="cuda")
    got = on_host(gpu.predict_proba(inputs(volume, (8, 96, 96))[kind]), kind)
    assert got.dtype == np.float32
    assert_probabilities_agree(got, expected, kind)
    assert_features_close(gpu.features_of(volume[:6]), cpu.features_of(volume[:6]), "features_of")


def test_classifier_trained_on_gpu_matches_cpu(trained):
    volume, truth, cpu = trained
    gpu = clone(cpu).set_params(device="cuda").fit(volume[:12], truth[:12])
    assert gpu.feature_names_ == cpu.feature_names_
    assert gpu.gate_level_ == pytest.approx(cpu.gate_level_)
    # Trained on (nearly) identical features: the same voxels are particles.
    same = np.mean((gpu.predict_proba(volume) >= 0.5) == (cpu.predict_proba(volume) >= 0.5))
    assert same >= 0.999, same
    restored = pickle.loads(pickle.dumps(gpu))
    assert not any(isinstance(v, cupy.ndarray) for v in vars(restored).values())
