"""Device dispatch, checked without a GPU; and the `polarity` option.

The GPU code path is the backend-generic code in ``_ops`` and
``_engine.labeling`` (no numba, no sparse voxel sets). Here it runs on a stand-in
"GPU" backend: NumPy and SciPy underneath, but its arrays (``DeviceArray``)
refuse to mix with host arrays as CuPy's do, its ``label`` numbers components
in a scrambled order (cupyx need not follow scipy's), and its copies between
"host" and "device" are real copies. Outputs must equal the CPU's exactly.
"""

import functools
import logging
import pickle
import subprocess
import sys
import textwrap

import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as scipy_ndi
import zarr
from skimage.measure import label as skimage_label
from skimage.morphology import ball, closing
from skimage.segmentation import relabel_sequential
from sklearn.utils._param_validation import InvalidParameterError

import nanoseg._backend as backend_module
import nanoseg._engine.labeling as labeling_module
from nanoseg import NanoparticleLabeler, NanoparticleMixture
from nanoseg._ops import components as components_ops
from nanoseg._ops import histogram as histogram_ops
from nanoseg._ops import seeds as seeds_ops
from nanoseg._backend import CPU, Backend, GPUUnavailableError
from nanoseg._plan import GPU_SLABS_IN_FLIGHT, device_n_jobs, host_readers
from nanoseg.datasets import make_phantom


# -- a stand-in GPU -------------------------------------------------------------
def _is_host_array(value):
    return isinstance(value, np.ndarray) and not isinstance(value, DeviceArray) and value.ndim > 0


def _operands(values):
    for value in values:
        if isinstance(value, (list, tuple)):
            yield from _operands(value)
        else:
            yield value


def _refuse_host(values, what):
    if any(_is_host_array(v) for v in _operands(values)):
        raise TypeError(f"{what}: a host (NumPy) array was mixed with device arrays")


def _plain(value):
    if isinstance(value, DeviceArray):
        return value.view(np.ndarray)
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _wrap(value):
    if isinstance(value, np.ndarray) and not isinstance(value, DeviceArray):
        return value.view(DeviceArray)
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    return value


class DeviceArray(np.ndarray):
    """A NumPy array that behaves, for mixing rules, like a CuPy array."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if method not in ("__call__", "reduce"):
            raise TypeError(f"ufunc.{method} is not available for device arrays")
        _refuse_host(inputs + tuple(kwargs.get("out", ())), ufunc.__name__)
        if "out" in kwargs:
            kwargs["out"] = _plain(kwargs["out"])
        return _wrap(getattr(ufunc, method)(*_plain(inputs), **kwargs))

    def __array_function__(self, func, types, args, kwargs):
        _refuse_host(tuple(args) + tuple(kwargs.values()), func.__name__)
        return _wrap(func(*_plain(args), **{k: _plain(v) for k, v in kwargs.items()}))


_CONVERSIONS = {"asarray", "array", "ascontiguousarray"}


class FakeXP:
    """NumPy whose results are device arrays and whose functions refuse host arrays."""

    def __getattr__(self, name):
        attr = getattr(np, name)
        if isinstance(attr, type) or not callable(attr):
            return attr
        if name in _CONVERSIONS:
            return lambda value, *args, **kwargs: np.array(_plain(value), *args, **kwargs).view(DeviceArray)

        @functools.wraps(attr)
        def call(*args, **kwargs):
            _refuse_host(tuple(args) + tuple(kwargs.values()), name)
            return _wrap(attr(*args, **kwargs))

        return call


class FakeNDI:
    """scipy.ndimage on device arrays; `label` numbers components in a scrambled order."""

    def __getattr__(self, name):
        function = getattr(scipy_ndi, name)

        def call(*args, **kwargs):
            if not isinstance(args[0], DeviceArray):
                raise TypeError(f"ndimage.{name} needs a device array")
            _refuse_host(tuple(args) + tuple(kwargs.values()), name)
            result = function(*_plain(args), **{k: _plain(v) for k, v in kwargs.items()})
            if name == "label":
                labels, count = result
                table = np.concatenate([[0], np.random.default_rng(count).permutation(count) + 1])
                result = (table[labels].astype(labels.dtype), count)
            return _wrap(result)

        return call


def _fake_download(array, out=None):
    host = np.array(array.view(np.ndarray))
    if out is None:
        return host
    out[...] = host
    return out


class _Streams:
    opened = 0

    def __enter__(self):
        _Streams.opened += 1
        return self

    def __exit__(self, *exc):
        return False


FAKE_GPU = Backend(
    name="cuda",
    xp=FakeXP(),
    ndi=FakeNDI(),
    array_type=DeviceArray,
    download=_fake_download,
    new_stream=_Streams,
)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Make device="cuda" (and "auto") run on the stand-in GPU."""
    monkeypatch.setattr(backend_module, "_GPU", None)
    monkeypatch.setattr(backend_module, "_load_gpu", lambda: FAKE_GPU)
    monkeypatch.setattr(backend_module, "_device_array_types", lambda: (DeviceArray,))
    return FAKE_GPU


@pytest.fixture
def no_gpu(monkeypatch):
    """Make every GPU request fail, as on a machine without one (even if CuPy is installed)."""

    def unavailable():
        raise GPUUnavailableError("no usable CUDA device in this test")

    monkeypatch.setattr(backend_module, "_GPU", None)
    monkeypatch.setattr(backend_module, "_load_gpu", unavailable)
    monkeypatch.setattr(backend_module, "_REPORTED", set())


def on_device(array):
    return np.array(array).view(DeviceArray)


def test_fake_gpu_refuses_host_arrays_like_cupy(fake_gpu):
    # The stand-in is only useful if mixing host and device arrays fails.
    device = fake_gpu.to_device(np.arange(4))
    with pytest.raises(TypeError, match="host"):
        device + np.arange(4)
    with pytest.raises(TypeError, match="host"):
        fake_gpu.xp.bincount(np.arange(4))
    with pytest.raises(TypeError):
        np.minimum.reduceat(device, [0, 2])
    assert isinstance(fake_gpu.xp.cumsum(device), DeviceArray)
    assert type(fake_gpu.to_host(device)) is np.ndarray


# -- kernels --------------------------------------------------------------------
def smooth_image(shape, seed):
    rng = np.random.default_rng(seed)
    field = scipy_ndi.gaussian_filter(rng.normal(size=shape), (0, 2, 2))
    return (field * 400 + 120).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("dark", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_slab_background_histograms_match_cpu(fake_gpu, dark, seed):
    slab = smooth_image((4, 70, 90), seed)
    model = 255 - slab if dark else slab
    for low, high in [tuple(np.percentile(model, [97, 99.5]).astype(int)), (0, 1), (255, 256), (256, 256)]:
        for min_seed_size, halo_pad in [(1, 0), (5, 3), (20, 20)]:
            expected = np.stack(
                [
                    seeds_ops.background_histogram(
                        CPU, image, low, high, min_seed_size=min_seed_size, halo_pad=halo_pad, dark=dark
                    )
                    for image in slab
                ]
            )
            got = seeds_ops.slab_background_histograms(
                fake_gpu, fake_gpu.to_device(slab), low, high,
                min_seed_size=min_seed_size, halo_pad=halo_pad, dark=dark,
            )
            assert isinstance(got, DeviceArray)
            np.testing.assert_array_equal(fake_gpu.to_host(got), expected)


def test_dark_background_histogram_mirrors_bright():
    # Independent of the code's own arithmetic: the dark model on 255 - image
    # excludes exactly the pixels the bright model excludes on image.
    image = smooth_image((1, 80, 80), 5)[0]
    low, high = np.percentile(image, [97, 99.5]).astype(int)
    bright = seeds_ops.background_histogram(CPU, image, low, high, min_seed_size=4, halo_pad=2)
    dark = seeds_ops.background_histogram(CPU, 255 - image, low, high, min_seed_size=4, halo_pad=2, dark=True)
    np.testing.assert_array_equal(dark, bright[::-1])


def test_component_boxes_match_find_objects(fake_gpu):
    rng = np.random.default_rng(1)
    seeds = rng.random((3, 40, 50)) < 0.08
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = True
    labels, _ = scipy_ndi.label(seeds, structure=in_plane)
    for min_size in (1, 3):
        expected = [
            [box[0].start, box[1].start, box[1].stop, box[2].start, box[2].stop]
            for index, box in enumerate(scipy_ndi.find_objects(labels), start=1)
            if np.count_nonzero(labels[box] == index) >= min_size
        ]
        boxes = fake_gpu.to_host(seeds_ops.component_boxes(fake_gpu, fake_gpu.to_device(labels), min_size))
        assert sorted(map(tuple, boxes.tolist())) == sorted(map(tuple, expected))


def test_paint_boxes_by_hand(fake_gpu):
    boxes = fake_gpu.to_device(np.array([[0, 1, 3, 1, 2], [1, 0, 1, 3, 4], [1, 2, 3, 2, 4]]))
    painted = fake_gpu.to_host(seeds_ops.paint_boxes(fake_gpu, boxes, (2, 4, 4), pad=1))
    expected = np.zeros((2, 4, 4), dtype=bool)
    expected[0, 0:4, 0:3] = True  # rows 1..2 +- 1, cols 1 +- 1
    expected[1, 0:2, 2:4] = True  # row 0 -> rows 0..1 (clipped), col 3 -> cols 2..3 (clipped)
    expected[1, 1:4, 1:4] = True
    np.testing.assert_array_equal(painted, expected)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("pad", [0, 2])
def test_paint_boxes_equals_painting_each_box(fake_gpu, seed, pad):
    # Many boxes sharing corners (and repeated boxes) on both backends.
    rng = np.random.default_rng(seed)
    shape = (3, 9, 11)
    n = 40
    z = rng.integers(0, shape[0], n)
    r0, c0 = rng.integers(0, shape[1], n), rng.integers(0, shape[2], n)
    r1 = np.minimum(r0 + rng.integers(1, 4, n), shape[1])
    c1 = np.minimum(c0 + rng.integers(1, 4, n), shape[2])
    boxes = np.stack([z, r0, r1, c0, c1], axis=1)
    boxes = np.concatenate([boxes, boxes[:5]])
    expected = np.zeros(shape, dtype=bool)
    for zz, a, b, c, d in boxes:
        expected[zz, max(0, a - pad) : b + pad, max(0, c - pad) : d + pad] = True
    np.testing.assert_array_equal(seeds_ops.paint_boxes(CPU, boxes, shape, pad), expected)
    painted = seeds_ops.paint_boxes(fake_gpu, fake_gpu.to_device(boxes), shape, pad)
    np.testing.assert_array_equal(fake_gpu.to_host(painted), expected)
    none = seeds_ops.paint_boxes(fake_gpu, fake_gpu.to_device(boxes[:0]), shape, pad)
    assert not fake_gpu.to_host(none).any() and none.shape == shape


def test_raster_order_renumbers_a_scrambled_labelling(fake_gpu):
    rng = np.random.default_rng(2)
    mask = rng.random((6, 20, 20)) < 0.3
    expected, count = scipy_ndi.label(mask)
    scrambled = np.concatenate([[0], rng.permutation(count) + 1])[expected]
    flat = np.flatnonzero(scrambled)
    table = components_ops.raster_order(CPU, flat, scrambled.ravel()[flat], count)
    np.testing.assert_array_equal(table[scrambled], expected)
    labels, n = components_ops.label_mask(fake_gpu, fake_gpu.to_device(mask), 1)
    assert n == count
    np.testing.assert_array_equal(fake_gpu.to_host(labels), expected)


def test_histograms_on_device(fake_gpu):
    slab = np.random.default_rng(3).integers(0, 256, (3, 31, 17), dtype=np.uint8)
    mask = np.random.default_rng(4).random(slab.shape) < 0.3
    device = fake_gpu.to_device(slab)
    np.testing.assert_array_equal(
        fake_gpu.to_host(histogram_ops.slice_histograms(fake_gpu, device)),
        [np.bincount(s.ravel(), minlength=256) for s in slab],
    )
    np.testing.assert_array_equal(
        fake_gpu.to_host(histogram_ops.masked_slice_histograms(fake_gpu, device, fake_gpu.to_device(mask))),
        [np.bincount(s[m], minlength=256) for s, m in zip(slab, mask)],
    )


# -- estimators on the stand-in GPU ---------------------------------------------


FITTED = (
    "stack_histogram_", "background_histogram_", "stack_pmf_", "background_pmf_", "particle_pmf_",
    "low_intensity_", "high_intensity_", "background_weight_", "neg_log_likelihood_", "n_iter_",
)


def assert_same_fit(a, b):
    for name in FITTED:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def to_zarr(array, chunks):
    z = zarr.create_array(store={}, shape=array.shape, chunks=chunks, dtype=array.dtype)
    z[...] = array
    return z


@pytest.mark.parametrize("polarity", ["bright", "dark"])
def test_mixture_on_gpu_equals_cpu(fake_gpu, volume_10x72x80, polarity, small_slabs):
    small_slabs(3 * 72 * 80 * 4)  # three slices a slab
    image = volume_10x72x80 if polarity == "bright" else 255 - volume_10x72x80
    cpu = NanoparticleMixture(polarity=polarity).fit(image)
    expected = cpu.transform(image)
    gpu = NanoparticleMixture(polarity=polarity, device="cuda", n_jobs=2).fit(image)
    assert_same_fit(gpu, cpu)
    for name in FITTED:
        assert not isinstance(getattr(gpu, name), DeviceArray)
    got = gpu.transform(image)
    assert type(got) is np.ndarray
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(
        NanoparticleMixture(polarity=polarity, device="cuda").fit_transform(image), expected
    )
    np.testing.assert_array_equal(gpu.slice_weights(image), cpu.slice_weights(image))


def test_mixture_gpu_inputs_keep_their_kind(fake_gpu, volume_10x72x80):
    cpu = NanoparticleMixture(sampling_step=2).fit(volume_10x72x80)
    expected = cpu.transform(volume_10x72x80)
    gpu = NanoparticleMixture(sampling_step=2, device="cuda")
    for X in (to_zarr(volume_10x72x80, (3, 72, 40)), da.from_array(volume_10x72x80, chunks=(4, 36, 80))):
        assert_same_fit(gpu.fit(X), cpu)
        lazy = gpu.transform(X)
        assert isinstance(lazy, da.Array)
        np.testing.assert_array_equal(lazy.compute(), expected)
    device_input = on_device(volume_10x72x80)
    assert_same_fit(gpu.fit(device_input), cpu)
    got = gpu.transform(device_input)
    assert isinstance(got, DeviceArray)
    np.testing.assert_array_equal(fake_gpu.to_host(got), expected)
    # CuPy input follows the data with "auto" too.
    got = NanoparticleMixture(sampling_step=2, device="auto").fit(device_input).transform(device_input)
    assert isinstance(got, DeviceArray)


def test_host_volumes_are_looked_up_on_the_host(fake_gpu, volume_10x72x80, monkeypatch):
    # Fitting runs on the GPU; the posterior of a host volume is a table
    # lookup at memory speed on the host (no copy over the bus and back); a
    # device volume is looked up on the device.
    import nanoseg._engine.posterior as posterior_module

    seen = []
    original = posterior_module.apply_luts

    def recording(backend, *args, **kwargs):
        seen.append(backend.name)
        return original(backend, *args, **kwargs)

    monkeypatch.setattr(posterior_module, "apply_luts", recording)
    cpu = NanoparticleMixture().fit(volume_10x72x80)
    gpu = NanoparticleMixture(device="cuda", n_jobs=2)
    for X in (volume_10x72x80, to_zarr(volume_10x72x80, (3, 72, 80)), da.from_array(volume_10x72x80, chunks=(4, 72, 80))):
        before = _Streams.opened
        gpu.fit(X)
        assert _Streams.opened > before  # the fit's passes went to the device
        for got in (gpu.transform(X), gpu.predict(X, threshold=0.9), gpu.fit_transform(X)):
            got = got.compute() if isinstance(got, da.Array) else got
            assert type(got) is np.ndarray
        np.testing.assert_array_equal(np.asarray(gpu.transform(X)), cpu.transform(volume_10x72x80))
    assert seen and set(seen) == {"cpu"}
    seen.clear()
    got = gpu.fit(on_device(volume_10x72x80)).transform(on_device(volume_10x72x80))
    assert isinstance(got, DeviceArray) and seen == ["cuda"]


@pytest.mark.parametrize("kind", ["zarr", "dask", "zarr16"])
def test_gpu_fit_reads_lazy_volumes_on_more_threads(fake_gpu, volume_10x72x80, small_slabs, monkeypatch, kind):
    # A GPU keeps few slabs in flight, but zarr and dask slabs are decoded on
    # the host: they are read by one thread per core (n_jobs) and copied to
    # the device by the GPU's threads; the fit is the same.
    import threading

    import nanoseg._volume as volume_module

    small_slabs(72 * 80 * 4)  # one slice a slab: many slabs
    image = volume_10x72x80 if kind != "zarr16" else volume_10x72x80.astype(np.uint16) * 200
    X = da.from_array(image, chunks=(3, 72, 80)) if kind == "dask" else to_zarr(image, (1, 72, 40))
    readers, computers = set(), set()
    read_slices = volume_module.Volume.read_slices

    def recording_read(self, indices, backend=None):
        if backend is None:
            readers.add(threading.current_thread().name)
        return read_slices(self, indices, backend)

    enter = _Streams.__enter__

    def recording_enter(self):
        computers.add(threading.current_thread().name)  # GPU work runs in a stream
        return enter(self)

    monkeypatch.setattr(volume_module.Volume, "read_slices", recording_read)
    monkeypatch.setattr(_Streams, "__enter__", recording_enter)
    gpu = NanoparticleMixture(device="cuda", n_jobs=2 * GPU_SLABS_IN_FLIGHT).fit(X)
    assert_same_fit(gpu, NanoparticleMixture().fit(image))
    assert len(readers) > GPU_SLABS_IN_FLIGHT  # more readers than slabs on the device
    assert computers and not computers & readers
    backend = backend_module.get_backend("cuda")
    model = NanoparticleMixture(n_jobs=8)
    volume = volume_module.as_volume(X)
    assert host_readers(model.n_jobs, backend, [volume], 4) == 8
    assert host_readers(model.n_jobs, backend, [volume], 8) is None  # no more readers than computers
    assert host_readers(model.n_jobs, CPU, [volume], 2) is None
    assert host_readers(model.n_jobs, backend, [volume_module.as_volume(image)], 4) is None


def test_map_slabs_keeps_the_order_and_reads_ahead_on_the_host(fake_gpu):
    from nanoseg._engine.fit import map_slabs
    from nanoseg._volume import as_volume

    volume = as_volume(np.arange(7 * 4 * 5, dtype=np.uint8).reshape(7, 4, 5))
    work = [(volume, [i]) for i in range(7)]

    def first_value(position, slab):
        assert isinstance(slab, DeviceArray)
        return position, int(FAKE_GPU.to_host(slab)[0, 0, 0])

    for n_read in (None, 3):
        assert list(map_slabs(first_value, work, FAKE_GPU, 2, n_read)) == [(i, 20 * i) for i in range(7)]


def test_mixture_gpu_2d_and_list(fake_gpu, volume_10x72x80):
    crops = [volume_10x72x80[0], volume_10x72x80[3:6], volume_10x72x80[7]]
    cpu = NanoparticleMixture().fit(crops)
    expected = cpu.transform(crops)
    gpu = NanoparticleMixture(device="cuda").fit(crops)
    assert_same_fit(gpu, cpu)
    for got, want in zip(gpu.transform(crops), expected):
        np.testing.assert_array_equal(got, want)
    # A list mixing host and device crops: each comes back as it went in.
    mixed = [crops[0], on_device(crops[1]), on_device(crops[2])]
    assert_same_fit(NanoparticleMixture(device="auto").fit(mixed), cpu)
    got = gpu.transform(mixed)
    assert [type(g) for g in got] == [np.ndarray, DeviceArray, DeviceArray]
    assert got[2].shape == crops[2].shape
    for g, want in zip(got, expected):
        np.testing.assert_array_equal(fake_gpu.to_host(g), want)


def test_threads_per_device():
    assert device_n_jobs(3, CPU) == 3
    assert device_n_jobs(16, FAKE_GPU) == GPU_SLABS_IN_FLIGHT
    assert device_n_jobs(2, FAKE_GPU) == 2
    assert device_n_jobs(8, FAKE_GPU, on_device=True) == 1


def test_n_jobs_none_follows_joblib_parallel_config():
    import os

    import joblib

    assert device_n_jobs(None, CPU) == (os.cpu_count() or 1)
    with joblib.parallel_config(n_jobs=1):
        assert device_n_jobs(None, CPU) == 1
    with joblib.parallel_config(n_jobs=3):
        assert device_n_jobs(None, CPU) == 3
        assert device_n_jobs(5, CPU) == 5  # an explicit value wins


def test_slab_budget_is_shared_by_the_slabs_in_flight():
    from nanoseg._plan import slab_budget

    assert slab_budget(None, 4) is None
    assert slab_budget("400MiB", GPU_SLABS_IN_FLIGHT) == 400 * 2**20 // GPU_SLABS_IN_FLIGHT
    assert slab_budget(1000, 3) == 333


def whole_volume_labels(mask, radius, connectivity, min_size):
    if radius:
        mask = closing(mask, ball(radius) if mask.ndim == 3 else np.ones((3, 3), bool), mode="ignore")
    labels = skimage_label(mask, connectivity=connectivity)
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    labels[small[labels]] = 0
    return relabel_sequential(labels)[0]


def random_mask(shape, density, seed):
    rng = np.random.default_rng(seed)
    field = scipy_ndi.gaussian_filter(rng.random(shape), 1.0)
    return field > np.quantile(field, 1 - density)


@pytest.mark.parametrize("connectivity", [1, 3])
@pytest.mark.parametrize("radius", [0, 1, 2])
@pytest.mark.parametrize("slab_bytes", [None, 1, 5 * 30 * 34 * 6])
def test_labels_on_gpu_equal_whole_volume(fake_gpu, connectivity, radius, slab_bytes, small_slabs):
    if slab_bytes is not None:
        small_slabs(slab_bytes)
    mask = random_mask((17, 30, 34), 0.12, seed=radius + 3 * connectivity)
    expected = whole_volume_labels(mask, radius, connectivity, min_size=3)
    labeler = NanoparticleLabeler(threshold=0.5, radius=radius, connectivity=connectivity, min_size=3, device="cuda")
    got = labeler.transform(mask.astype(np.float32))
    assert type(got) is np.ndarray and got.dtype == np.uint32
    np.testing.assert_array_equal(got, expected)


def test_labels_on_gpu_all_input_kinds(fake_gpu, small_slabs):
    small_slabs(4 * 30 * 34 * 6)
    posterior = random_mask((15, 30, 34), 0.1, seed=9).astype(np.float32) * 0.98
    expected = NanoparticleLabeler(min_size=2).transform(posterior)
    labeler = NanoparticleLabeler(min_size=2, device="cuda", n_jobs=2)
    for X in (to_zarr(posterior, (2, 30, 17)), da.from_array(posterior, chunks=(5, 15, 34))):
        lazy = labeler.transform(X)
        assert isinstance(lazy, da.Array)
        np.testing.assert_array_equal(lazy.compute(), expected)
    got = labeler.transform(on_device(posterior))
    assert isinstance(got, DeviceArray) and got.dtype == np.uint32
    np.testing.assert_array_equal(fake_gpu.to_host(got), expected)
    # 2D input, and a boolean mask
    np.testing.assert_array_equal(labeler.transform(posterior[4]), NanoparticleLabeler(min_size=2).transform(posterior[4]))
    np.testing.assert_array_equal(labeler.transform(posterior > 0.5), expected)


def test_lazy_labels_recomputed_on_gpu(fake_gpu, monkeypatch, small_slabs):
    # Slabs past the kept-labels budget are labelled again when computed.
    small_slabs(3 * 30 * 34 * 6)
    monkeypatch.setattr(labeling_module, "KEPT_LABEL_BYTES", 0)
    posterior = random_mask((12, 30, 34), 0.1, seed=4).astype(np.float32)
    expected = NanoparticleLabeler(threshold=0.5, min_size=2).transform(posterior)
    lazy = NanoparticleLabeler(threshold=0.5, min_size=2, device="cuda").transform(to_zarr(posterior, (3, 30, 34)))
    np.testing.assert_array_equal(lazy.compute(), expected)


def test_gpu_work_runs_on_per_thread_streams(fake_gpu, volume_10x72x80):
    before = _Streams.opened
    NanoparticleMixture(device="cuda", n_jobs=2).fit(volume_10x72x80)
    assert _Streams.opened > before


# -- device selection -------------------------------------------------------------
@pytest.mark.parametrize("estimator", [NanoparticleMixture, NanoparticleLabeler])
def test_device_must_be_known(estimator, volume_10x72x80):
    with pytest.raises(InvalidParameterError, match="'device' parameter"):
        estimator(device="gpu").fit(volume_10x72x80 if estimator is NanoparticleMixture else volume_10x72x80 > 128)


def test_cuda_without_cupy_says_what_to_install(monkeypatch, volume_10x72x80):
    # A None entry in sys.modules makes `import cupy` fail, as when it is not installed.
    monkeypatch.setattr(backend_module, "_GPU", None)
    monkeypatch.setitem(sys.modules, "cupy", None)
    for estimator, X in [(NanoparticleMixture, volume_10x72x80), (NanoparticleLabeler, volume_10x72x80 > 128)]:
        with pytest.raises(GPUUnavailableError, match=r'pip install "nanoseg\[gpu\]"') as info:
            estimator(device="cuda").fit(X)
        assert isinstance(info.value, RuntimeError)
        assert "cupy-cuda12x" in str(info.value) and "cupy-cuda13x" in str(info.value)


def test_auto_falls_back_to_cpu_and_logs_once(no_gpu, caplog, volume_10x72x80):
    expected = NanoparticleMixture().fit(volume_10x72x80).transform(volume_10x72x80)
    with caplog.at_level(logging.INFO, logger="nanoseg"):
        auto = NanoparticleMixture(device="auto").fit(volume_10x72x80)
        got = auto.transform(volume_10x72x80)
        NanoparticleLabeler(device="auto").transform(got)
    np.testing.assert_array_equal(got, expected)
    messages = [r.getMessage() for r in caplog.records if r.name == "nanoseg"]
    assert len(messages) == 1
    assert "running on the CPU" in messages[0] and "no usable GPU" in messages[0]
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "nanoseg")


def test_device_input_with_cpu_device_is_refused(fake_gpu, volume_10x72x80):
    with pytest.raises(ValueError, match="device='cpu'"):
        NanoparticleMixture().fit(on_device(volume_10x72x80))
    with pytest.raises(ValueError, match="cupy.asnumpy"):
        NanoparticleLabeler().transform(on_device(volume_10x72x80 > 128))


def test_pickles_carry_no_device_state(fake_gpu, monkeypatch, volume_10x72x80):
    gpu = NanoparticleMixture(device="cuda").fit(volume_10x72x80)
    gpu._device_tables = fake_gpu.to_device(np.zeros((2, 256)))  # a private device-side cache
    gpu._backend_used = fake_gpu
    state = gpu.__getstate__()
    assert "_device_tables" not in state and "_backend_used" not in state
    assert not [k for k, v in state.items() if isinstance(v, DeviceArray)]
    payload = pickle.dumps(gpu)
    # Load where there is no GPU: switch the device, get the CPU's results.
    monkeypatch.setattr(backend_module, "_GPU", None)
    monkeypatch.setattr(backend_module, "_device_array_types", lambda: ())

    def unavailable():
        raise GPUUnavailableError("no GPU here")

    monkeypatch.setattr(backend_module, "_load_gpu", unavailable)
    loaded = pickle.loads(payload)
    with pytest.raises(GPUUnavailableError):
        loaded.transform(volume_10x72x80)
    expected = NanoparticleMixture().fit(volume_10x72x80).transform(volume_10x72x80)
    np.testing.assert_array_equal(loaded.set_params(device="cpu").transform(volume_10x72x80), expected)


def test_cpu_runs_never_import_cupy(tmp_path):
    # In a fresh interpreter, every attempt to import CuPy is refused and
    # recorded with the file that asked (zarr asks for it on its own).
    # Then a CuPy that reports no device stands in for an installed one.
    (tmp_path / "cupy").mkdir()
    (tmp_path / "cupy" / "__init__.py").write_text(
        "class ndarray:\n    pass\n\ndef is_available():\n    return False\n"
    )
    for package in ("cupyx", "cupyx/scipy", "cupyx/scipy/ndimage"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    script = textwrap.dedent(
        """
        import importlib, logging, sys

        class RefuseCupy:
            askers = []

            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] not in ("cupy", "cupyx"):
                    return None
                frame = sys._getframe(1)
                while frame.f_code.co_filename.startswith("<frozen") or "importlib" in frame.f_code.co_filename:
                    frame = frame.f_back
                RefuseCupy.askers.append(frame.f_code.co_filename)
                raise ModuleNotFoundError(f"No module named {name!r}")

        blocker = RefuseCupy()
        sys.meta_path.insert(0, blocker)
        import nanoseg._ops._numba
        from nanoseg import NanoparticleLabeler, NanoparticleMixture
        from nanoseg._backend import GPUUnavailableError
        from nanoseg.datasets import make_phantom

        nanoseg._ops._numba.ENABLED = False  # spare this process numba's compilation
        image = make_phantom((4, 48, 48), n_particles=5, random_state=0)[0]
        labels = NanoparticleLabeler().transform(NanoparticleMixture(max_iter=10**6).fit_transform(image))
        assert "cupy" not in sys.modules
        assert not [f for f in RefuseCupy.askers if "nanoseg" in f], RefuseCupy.askers

        sys.meta_path.remove(blocker)
        sys.path.insert(0, sys.argv[1])
        importlib.invalidate_caches()
        logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
        mixture = NanoparticleMixture(max_iter=10**6, device="auto")
        auto = NanoparticleLabeler(device="auto").transform(mixture.fit_transform(image))
        assert sys.modules["cupy"].__file__.startswith(sys.argv[1])
        assert (auto == labels).all()
        try:
            NanoparticleMixture(device="cuda").fit(image)
        except GPUUnavailableError as exc:
            print("ERROR", exc)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], check=False, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "nanoseg device='auto': no usable GPU (CuPy is installed but finds no usable CUDA device" in result.stderr
    assert "ERROR CuPy is installed but finds no usable CUDA device" in result.stdout


# -- polarity -------------------------------------------------------------------
def test_dark_polarity_on_inverted_volume_equals_bright(volume_10x72x80):
    bright = NanoparticleMixture().fit(volume_10x72x80)
    dark = NanoparticleMixture(polarity="dark").fit(255 - volume_10x72x80)
    inverted = 255 - volume_10x72x80
    # Histograms and PMFs are indexed by raw intensity: reversed.
    for name in ("stack_histogram_", "background_histogram_", "stack_pmf_", "background_pmf_", "particle_pmf_"):
        np.testing.assert_array_equal(getattr(dark, name), getattr(bright, name)[::-1], err_msg=name)
    assert dark.low_intensity_ == 255 - bright.low_intensity_
    assert dark.high_intensity_ == 255 - bright.high_intensity_
    assert (dark.background_weight_, dark.n_iter_) == (bright.background_weight_, bright.n_iter_)
    np.testing.assert_array_equal(dark.slice_weights(inverted), bright.slice_weights(volume_10x72x80))
    expected = bright.transform(volume_10x72x80)
    np.testing.assert_array_equal(dark.transform(inverted), expected)
    np.testing.assert_array_equal(NanoparticleMixture(polarity="dark").fit_transform(inverted), expected)
    np.testing.assert_array_equal(
        NanoparticleMixture(polarity="dark", posterior_dtype="float16").fit(inverted).transform(inverted),
        NanoparticleMixture(posterior_dtype="float16").fit(volume_10x72x80).transform(volume_10x72x80),
    )


def test_dark_polarity_finds_dark_particles():
    image, truth = make_phantom((6, 64, 64), n_particles=10, random_state=4)
    posterior = NanoparticleMixture(polarity="dark").fit(255 - image).transform(255 - image)
    # Particle voxels are the likely ones; the bright model on the same data finds none of them.
    assert posterior[truth].mean() > 0.5 > posterior[~truth].mean()
    bright_model = NanoparticleMixture(percentile_low=99.0, percentile_high=99.5)
    assert bright_model.fit(255 - image).transform(255 - image)[truth].mean() < 0.5


def test_polarity_must_be_known(volume_10x72x80):
    with pytest.raises(InvalidParameterError, match="'polarity' parameter"):
        NanoparticleMixture(polarity="grey").fit(volume_10x72x80)
