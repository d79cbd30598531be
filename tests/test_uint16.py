"""16-bit input: the binning rule, wired through fit, prediction, persistence and the CLI.

Expected results come from the uint8 model on the same phantom (16-bit
versions of it are built so that their bins are known by construction), or
from the binning formula written out here.
"""

import os
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr
from test_device import DeviceArray
from test_device import fake_gpu as stand_in_gpu  # noqa: F401  (a fixture: the stand-in GPU)

import nanoseg._intensity as intensity_module
import nanoseg._engine.fit as fit_engine
import nanoseg._engine.posterior as posterior_engine
from nanoseg import NanoparticleLabeler, NanoparticleMixture
from nanoseg.__main__ import main
from nanoseg._intensity import Binning
from nanoseg.baselines import GlobalThreshold
from nanoseg.datasets import make_phantom
from nanoseg.io import read_image, write_ome_zarr
from nanoseg.persistence import load, save
from nanoseg.preprocessing import BackgroundSubtractor

SHARED_DATA = Path(os.environ.get("NANOSEG_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
NUCLEI = SHARED_DATA / "nuclei3d"

FITTED = (
    "stack_histogram_", "background_histogram_", "stack_pmf_", "background_pmf_", "particle_pmf_",
    "low_intensity_", "high_intensity_", "background_weight_", "neg_log_likelihood_", "n_iter_",
    "converged_", "n_slices_fit_",
)
BINNING = ("binning_mode_", "binning_low_", "binning_high_", "binning_shift_")
# The phantom's values v become 200 v + 1000; the 256 * 200 values from 1000
# on split into bins of exactly 200 values, bin b holding 1000 + 200 b.
SCALE, OFFSET = 200, 1000
SCALED_RANGE = (OFFSET, OFFSET + 256 * SCALE - 1)


def assert_same_fit(got, expected):
    for name in FITTED:
        np.testing.assert_array_equal(getattr(got, name), getattr(expected, name), err_msg=name)


def binning_of(mixture):
    return tuple(getattr(mixture, name) for name in BINNING)


def to_zarr(array, chunks):
    z = zarr.create_array(store={}, shape=array.shape, chunks=chunks, dtype=array.dtype)
    z[...] = array
    return z


def as_kind(array, kind, chunks=(4, 48, 56)):
    if kind == "zarr":
        return to_zarr(array, chunks)
    if kind == "dask":
        return da.from_array(array, chunks=chunks)
    return array


def computed(result):
    return result.compute() if isinstance(result, da.Array) else result


@pytest.fixture(scope="module")
def reference(volume_12x96x112):
    """The uint8 model, posterior and labels, for both polarities."""
    out = {}
    for polarity in ("bright", "dark"):
        image = volume_12x96x112 if polarity == "bright" else 255 - volume_12x96x112
        mixture = NanoparticleMixture(polarity=polarity).fit(image)
        posterior = mixture.predict_proba(image)
        out[polarity] = (image, mixture, posterior, NanoparticleLabeler(min_size=3).transform(posterior))
    return out


# -- 8-bit values stored as uint16 ------------------------------------------------
@pytest.mark.parametrize("kind", ["numpy", "zarr", "dask"])
@pytest.mark.parametrize("polarity", ["bright", "dark"])
def test_uint16_holding_8bit_values_gives_the_uint8_results(reference, kind, polarity, small_slabs):
    small_slabs(3 * 96 * 112 * 6)  # a few slices a slab
    image, expected, posterior, labels = reference[polarity]
    wide = as_kind(image.astype(np.uint16), kind)
    mixture = NanoparticleMixture(polarity=polarity).fit(wide)
    assert_same_fit(mixture, expected)
    assert binning_of(mixture) == ("range", 0, 255, 0)
    got = mixture.predict_proba(wide)
    assert isinstance(got, np.ndarray if kind == "numpy" else da.Array)
    np.testing.assert_array_equal(computed(got), posterior)
    np.testing.assert_array_equal(computed(NanoparticleLabeler(min_size=3).transform(got)), labels)
    np.testing.assert_array_equal(computed(NanoparticleMixture(polarity=polarity).fit_transform(wide)), posterior)
    np.testing.assert_array_equal(mixture.slice_weights(wide), expected.slice_weights(image))


def test_uint8_input_never_goes_through_a_lookup_table(reference, monkeypatch):
    image, expected, posterior, _ = reference["bright"]

    def refuse(*args, **kwargs):
        raise AssertionError("8-bit data under binning='auto' must not be mapped")

    monkeypatch.setattr(intensity_module, "_table", refuse)
    # Every slab reaches the 8-bit kernels as the very array that was read: no copy.
    same = []
    to_bins = fit_engine.to_bins

    def spy(backend, slab, binning):
        result = to_bins(backend, slab, binning)
        same.append(result is slab)
        return result

    monkeypatch.setattr(fit_engine, "to_bins", spy)
    monkeypatch.setattr(posterior_engine, "to_bins", spy)
    mixture = NanoparticleMixture().fit(image)
    assert_same_fit(mixture, expected)
    np.testing.assert_array_equal(mixture.predict_proba(image), posterior)
    np.testing.assert_array_equal(mixture.predict_proba(to_zarr(image, (3, 96, 112))).compute(), posterior)
    np.testing.assert_array_equal(NanoparticleMixture().fit_transform(image), posterior)
    assert same and all(same)


def test_a_list_mixing_uint8_and_uint16_crops_pools_them(volume_12x96x112):
    crops = [volume_12x96x112[:6], volume_12x96x112[6:]]
    expected = NanoparticleMixture().fit(crops)
    mixed = [crops[0], crops[1].astype(np.uint16)]
    got = NanoparticleMixture().fit(mixed)
    assert_same_fit(got, expected)
    for a, b in zip(got.transform(mixed), expected.transform(crops)):
        np.testing.assert_array_equal(a, b)


# -- 16-bit data with known bins -------------------------------------------------
@pytest.mark.parametrize("kind", ["numpy", "zarr"])
def test_range_binning_maps_the_scaled_phantom_back_to_its_values(reference, kind):
    image, expected, posterior, labels = reference["bright"]
    wide = image.astype(np.uint16) * SCALE + OFFSET
    mixture = NanoparticleMixture(binning="range", intensity_range=SCALED_RANGE).fit(as_kind(wide, kind))
    assert binning_of(mixture) == ("range", *SCALED_RANGE, 0)
    assert_same_fit(mixture, expected)
    got = computed(mixture.predict_proba(as_kind(wide, kind)))
    np.testing.assert_array_equal(got, posterior)
    np.testing.assert_array_equal(NanoparticleLabeler(min_size=3).transform(got), labels)


def test_shift_binning_maps_the_shifted_phantom_back_to_its_values(reference):
    image, expected, posterior, _ = reference["bright"]
    assert image.max() >= 128  # so that 16 v needs 12 bits and exactly 4 are dropped
    wide = image.astype(np.uint16) * 16
    mixture = NanoparticleMixture(binning="shift").fit(wide)
    assert binning_of(mixture) == ("shift", 0, int(wide.max()), 4)
    assert_same_fit(mixture, expected)
    np.testing.assert_array_equal(mixture.predict_proba(wide), posterior)


def hand_bins(values, low, high):
    """The 'range' rule written out: 256 equal parts of low..high, clipped."""
    values = np.asarray(values, dtype=np.int64)
    return np.clip((values - low) * 256 // (high - low + 1), 0, 255)


def test_auto_binning_spans_the_observed_range(volume_12x96x112):
    wide = volume_12x96x112.astype(np.uint16) * SCALE + OFFSET
    mixture = NanoparticleMixture().fit(wide)
    low, high = OFFSET + SCALE * int(volume_12x96x112.min()), OFFSET + SCALE * int(volume_12x96x112.max())
    assert binning_of(mixture) == ("range", low, high, 0)
    bins = hand_bins(wide, low, high)
    np.testing.assert_array_equal(mixture.stack_histogram_, np.bincount(bins.ravel(), minlength=256))
    # The posterior of a voxel is its slice's table at its bin.
    luts = mixture.posterior_luts(mixture.slice_weights(wide))
    expected = luts[np.arange(wide.shape[0])[:, None, None], bins]
    np.testing.assert_array_equal(mixture.predict_proba(wide), expected)


def test_intensity_range_clips_values_outside_it(volume_12x96x112):
    wide = volume_12x96x112.astype(np.uint16) * SCALE + OFFSET
    low, high = 15000, 40000
    mixture = NanoparticleMixture(intensity_range=(low, high)).fit(wide)
    assert binning_of(mixture) == ("range", low, high, 0)
    bins = hand_bins(wide, low, high)
    assert (bins == 0).any() and (bins == 255).any()  # both ends are clipped
    np.testing.assert_array_equal(mixture.stack_histogram_, np.bincount(bins.ravel(), minlength=256))
    # One bound given: the other is observed.
    half = NanoparticleMixture(intensity_range=(None, 40000)).fit(wide)
    assert binning_of(half) == ("range", int(wide.min()), 40000, 0)


def test_the_range_comes_from_the_sampled_slices_only(volume_12x96x112):
    wide = volume_12x96x112.astype(np.uint16) * SCALE + OFFSET
    wide[1, 0, 0] = 65535  # in a slice that sampling_step=2 skips
    mixture = NanoparticleMixture(sampling_step=2, max_iter=100_000).fit(wide)
    assert mixture.binning_high_ == int(wide[::2].max()) < 65535
    assert mixture.n_slices_fit_ == 6


def test_prediction_applies_the_fitted_binning_to_new_data(volume_12x96x112):
    wide = volume_12x96x112.astype(np.uint16) * SCALE + OFFSET
    mixture = NanoparticleMixture().fit(wide)
    low, high = mixture.binning_low_, mixture.binning_high_
    other = np.random.default_rng(0).integers(0, 65536, size=(3, 20, 24)).astype(np.uint16)
    luts = mixture.posterior_luts(mixture.slice_weights(other))
    expected = luts[np.arange(3)[:, None, None], hand_bins(other, low, high)]
    np.testing.assert_array_equal(mixture.predict_proba(other), expected)
    np.testing.assert_array_equal(mixture.predict_proba(to_zarr(other, (2, 7, 24))).compute(), expected)
    # uint8 input goes through the same rule: all its values lie below `low`.
    small = volume_12x96x112[:2]
    luts = mixture.posterior_luts(mixture.slice_weights(small))
    np.testing.assert_array_equal(mixture.predict_proba(small), np.broadcast_to(luts[:, :1, None], small.shape))


def test_uint16_results_do_not_depend_on_chunks_slabs_or_threads(volume_12x96x112, small_slabs):
    wide = volume_12x96x112.astype(np.uint16) * 37 + 500
    expected = NanoparticleMixture().fit(wide)
    posterior = expected.predict_proba(wide)
    small_slabs(2 * 96 * 112 * 6)
    for chunks, n_jobs in [((1, 96, 112), 1), ((5, 32, 40), 2), ((12, 96, 112), 2), ((3, 96, 7), 1)]:
        z = to_zarr(wide, chunks)
        mixture = NanoparticleMixture(n_jobs=n_jobs).fit(z)
        assert_same_fit(mixture, expected)
        assert binning_of(mixture) == binning_of(expected)
        np.testing.assert_array_equal(mixture.predict_proba(z).compute(), posterior)
        np.testing.assert_array_equal(NanoparticleMixture(n_jobs=n_jobs).fit_transform(z).compute(), posterior)


def test_fit_transform_reuses_the_fit_histograms_for_uint16(volume_12x96x112, monkeypatch):
    wide = volume_12x96x112.astype(np.uint16) * SCALE + OFFSET
    expected = NanoparticleMixture().fit(wide).transform(wide)
    calls = []
    original = posterior_engine.slice_histograms
    monkeypatch.setattr(posterior_engine, "slice_histograms", lambda *a, **k: calls.append(1) or original(*a, **k))
    np.testing.assert_array_equal(NanoparticleMixture().fit_transform(wide), expected)
    assert calls == []


@pytest.mark.usefixtures("stand_in_gpu")
def test_uint16_runs_on_the_stand_in_gpu(volume_12x96x112, small_slabs):
    small_slabs(3 * 96 * 112 * 6)
    wide = volume_12x96x112.astype(np.uint16) * 37 + 500
    cpu = NanoparticleMixture().fit(wide)
    expected = cpu.transform(wide)
    gpu = NanoparticleMixture(device="cuda", n_jobs=2).fit(wide)
    assert_same_fit(gpu, cpu)
    assert binning_of(gpu) == binning_of(cpu)
    np.testing.assert_array_equal(gpu.transform(wide), expected)
    np.testing.assert_array_equal(gpu.transform(to_zarr(wide, (4, 96, 112))).compute(), expected)
    on_device = gpu.transform(np.array(wide).view(DeviceArray))
    assert isinstance(on_device, DeviceArray)
    np.testing.assert_array_equal(on_device.view(np.ndarray), expected)
    np.testing.assert_array_equal(NanoparticleMixture(device="cuda").fit_transform(wide), expected)


# -- the Binning fold used by fit ------------------------------------------------
@pytest.mark.parametrize(
    "binning", [Binning("range", 0, 255), Binning("range", 1000, 52199), Binning("range", 37, 90),
                Binning("range", 3, 60000), Binning("shift", 0, 4095, 4)]
)
def test_fold_equals_the_histogram_of_the_mapped_values(binning):
    values = np.random.default_rng(1).integers(0, 65536, size=(3, 5000)).astype(np.uint16)
    values[0, :100] = np.arange(100)  # low values, below some ranges
    counts = np.stack([np.bincount(row, minlength=65536) for row in values])
    expected = np.stack([np.bincount(hand_map(binning, row), minlength=256) for row in values])
    np.testing.assert_array_equal(binning.fold(counts), expected)
    np.testing.assert_array_equal(binning.fold(counts.sum(axis=0)), expected.sum(axis=0))


def hand_map(binning, values):
    values = values.astype(np.int64)
    if binning.mode == "shift":
        return np.minimum(values >> binning.shift, 255)
    return hand_bins(values, binning.low, binning.high)


def test_fold_refuses_counts_of_the_wrong_length():
    with pytest.raises(ValueError, match="256 or 65536"):
        Binning("range", 0, 255).fold(np.zeros(300, dtype=np.int64))


# -- persistence -------------------------------------------------------------
def test_a_uint16_model_round_trips_through_the_safe_format(volume_12x96x112, tmp_path):
    wide = volume_12x96x112.astype(np.uint16) * SCALE + OFFSET
    mixture = NanoparticleMixture(binning="shift", intensity_range=(None, 60000)).fit(wide)
    assert binning_of(mixture) == ("shift", 0, 60000, 8)
    assert all(type(getattr(mixture, name)) is (str if name == "binning_mode_" else int) for name in BINNING)
    save(mixture, tmp_path / "model.npz")
    restored = load(tmp_path / "model.npz")
    assert restored.get_params() == mixture.get_params()
    assert binning_of(restored) == binning_of(mixture)
    assert_same_fit(restored, mixture)
    np.testing.assert_array_equal(restored.predict_proba(wide), mixture.predict_proba(wide))


# -- errors ------------------------------------------------------------------
@pytest.mark.parametrize(
    "params, message",
    [
        ({"intensity_range": (1000,)}, "pair"),
        ({"intensity_range": (1000, 2000, 3000)}, "pair"),
        ({"intensity_range": (10.5, 2000)}, "pair"),
        ({"intensity_range": (True, 2000)}, "pair"),
        ({"intensity_range": (-1, 2000)}, "from 0 to 65535"),
        ({"intensity_range": (0, 70000)}, "from 0 to 65535"),
        ({"intensity_range": (3000, 2000)}, r"low \(3000\) must not exceed high \(2000\)"),
        ({"binning": "shift", "intensity_range": (5, 2000)}, "starts its first bin at intensity 0"),
        ({"binning": "linear"}, "binning"),
        ({"intensity_range": "1000 2000"}, "intensity_range"),
    ],
)
def test_bad_binning_parameters_are_explained(volume_12x96x112, params, message):
    with pytest.raises(ValueError, match=message):
        NanoparticleMixture(**params).fit(volume_12x96x112)


@pytest.mark.parametrize(
    "dtype, hint",
    [(np.int16, "cast it to uint16"), (np.float32, "scale floating-point"), (np.uint32, "more than 16 bits"),
     (np.int8, "shift signed data")],
)
def test_other_dtypes_name_the_accepted_ones_and_a_fix(dtype, hint):
    data = np.zeros((2, 8, 8), dtype=dtype)
    for X in (data, to_zarr(data, (1, 8, 8))):
        with pytest.raises(TypeError, match=r"uint8 or uint16") as error:
            NanoparticleMixture().fit(X)
        assert hint in str(error.value)


def test_constant_uint16_and_a_range_that_leaves_one_bin_are_refused(volume_12x96x112):
    with pytest.raises(ValueError, match="constant.*1234"):
        NanoparticleMixture().fit(np.full((3, 16, 16), 1234, dtype=np.uint16))
    wide = volume_12x96x112.astype(np.uint16) * SCALE + OFFSET
    with pytest.raises(ValueError, match="falls in bin 255.*Widen intensity_range"):
        NanoparticleMixture(intensity_range=(0, 100)).fit(wide)


def test_8bit_only_steps_explain_what_to_do_with_uint16():
    data = np.zeros((2, 8, 8), dtype=np.uint16)
    for step in (GlobalThreshold(), BackgroundSubtractor()):
        with pytest.raises(TypeError, match="uint8") as error:
            step.fit_transform(data)
        assert "rescale_intensity" in str(error.value)
        assert "NanoparticleMixture takes 16-bit data" in str(error.value)


# -- command line --------------------------------------------------------------
@pytest.fixture(scope="module")
def wide_store(tmp_path_factory):
    image = make_phantom((8, 96, 112), n_particles=12, random_state=5)[0]
    folder = tmp_path_factory.mktemp("wide")
    wide = image.astype(np.uint16) * SCALE + OFFSET
    write_ome_zarr(folder / "wide.zarr", wide, spacing=(50, 10, 10), progress=False)
    write_ome_zarr(folder / "narrow.zarr", image, spacing=(50, 10, 10), progress=False)
    return folder


def test_cli_segments_uint16_like_the_same_data_in_8_bits(wide_store, tmp_path, capsys):
    folder = wide_store
    low, high = SCALED_RANGE
    assert main(["segment", str(folder / "wide.zarr"), str(tmp_path / "wide_labels.zarr"), "-q",
                 "--binning", "range", "--intensity-range", str(low), str(high),
                 "--table", str(tmp_path / "wide.csv")]) == 0
    out = capsys.readouterr().out
    assert f"Intensities {low} to {high} mapped linearly to 256 bins" in out
    assert main(["segment", str(folder / "narrow.zarr"), str(tmp_path / "narrow_labels.zarr"), "-q"]) == 0
    got, spacing = read_image(tmp_path / "wide_labels.zarr")
    expected, _ = read_image(tmp_path / "narrow_labels.zarr")
    assert spacing == (50.0, 10.0, 10.0)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    table = (tmp_path / "wide.csv").read_text().splitlines()
    assert len(table) - 1 == int(np.asarray(expected).max())


def test_cli_fit_and_predict_keep_the_binning(wide_store, tmp_path, capsys):
    folder = wide_store
    model = tmp_path / "model.npz"
    assert main(["fit", str(folder / "wide.zarr"), str(model), "-q", "--binning", "shift",
                 "--intensity-range", "auto", "60000"]) == 0
    assert "256 bins of 256 values each (shift by 8 bits)" in capsys.readouterr().out
    mixture = load(model)
    assert binning_of(mixture) == ("shift", 0, 60000, 8)
    assert main(["predict", str(folder / "wide.zarr"), str(model), str(tmp_path / "post.zarr"), "-q"]) == 0
    posterior, _ = read_image(tmp_path / "post.zarr")
    image, _ = read_image(folder / "wide.zarr")
    np.testing.assert_array_equal(np.asarray(posterior), mixture.predict_proba(np.asarray(image)))
    # The binning is fixed when fitting: a saved model cannot be given another.
    assert main(["segment", str(folder / "wide.zarr"), str(tmp_path / "labels.zarr"), "-q",
                 "--model", str(model), "--binning", "range"]) == 2
    assert "--binning acts only while fitting" in capsys.readouterr().err


@pytest.mark.parametrize("bounds", [["10", "x"], ["-1", "100"], ["0", "65536"]])
def test_cli_refuses_bad_intensity_ranges(wide_store, tmp_path, bounds, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", str(wide_store / "wide.zarr"), str(tmp_path / "m.npz"), "-q", "--intensity-range", *bounds])
    assert stop.value.code == 2
    assert "--intensity-range" in capsys.readouterr().err


def test_cli_refuses_a_range_that_leaves_one_bin(wide_store, tmp_path, capsys):
    assert main(["fit", str(wide_store / "wide.zarr"), str(tmp_path / "m.npz"), "-q",
                 "--intensity-range", "0", "100"]) == 2
    assert "Widen intensity_range" in capsys.readouterr().err
    assert not (tmp_path / "m.npz").exists()


# -- a real 16-bit, anisotropic volume ---------------------------------------------
@pytest.mark.skipif(not (NUCLEI / "nuclei.tif").exists(), reason="shared nuclei3d data not available")
def test_nuclei3d_plumbing():
    # Nuclei are not nanoparticles: this checks shapes, dtypes and units, not accuracy.
    from nanoseg.measure import particle_table

    image, spacing = read_image(NUCLEI / "nuclei.tif", spacing=(290, 260, 260))
    assert spacing == (290.0, 260.0, 260.0)
    assert image.shape == (60, 256, 256) and image.dtype == np.uint16
    mixture = NanoparticleMixture().fit(image)
    assert mixture.binning_mode_ == "range"
    data = np.asarray(image)
    assert (mixture.binning_low_, mixture.binning_high_) == (int(data.min()), int(data.max()))
    posterior = mixture.predict_proba(image)
    assert isinstance(posterior, da.Array) and posterior.dtype == np.float32 and posterior.shape == image.shape
    labels = NanoparticleLabeler(min_size=500).transform(posterior).compute()
    assert labels.dtype == np.uint32 and labels.shape == image.shape
    table = particle_table(labels, spacing=spacing)
    assert len(table) == labels.max()
    if len(table):
        row = table.iloc[0]
        mask = labels == row["label"]
        assert row["voxel_count"] == mask.sum()
        assert row["volume"] == pytest.approx(mask.sum() * 290 * 260 * 260)
        assert row["centroid_z"] == pytest.approx(np.nonzero(mask)[0].mean() * 290)
    truth, _ = read_image(NUCLEI / "nuclei_label.tif")
    assert truth.shape == image.shape


def test_a_model_fitted_before_16bit_support_keeps_working(reference):
    image, _, posterior, _ = reference["bright"]
    old = NanoparticleMixture().fit(image)
    for name in BINNING:  # what an unpickled model of an 8-bit-only version lacks
        delattr(old, name)
    np.testing.assert_array_equal(old.predict_proba(image), posterior)


# -- a real GPU, when there is one -------------------------------------------------
@pytest.mark.gpu
def test_uint16_on_a_cuda_gpu_equals_the_cpu(volume_12x96x112):
    cupy = pytest.importorskip("cupy")
    if not cupy.is_available():
        pytest.skip("no usable CUDA device")
    wide = volume_12x96x112.astype(np.uint16) * 37 + 500
    cpu = NanoparticleMixture().fit(wide)
    expected = cpu.transform(wide)
    gpu = NanoparticleMixture(device="cuda").fit(wide)
    assert_same_fit(gpu, cpu)
    assert binning_of(gpu) == binning_of(cpu)
    np.testing.assert_array_equal(gpu.transform(wide), expected)
    np.testing.assert_array_equal(gpu.transform(to_zarr(wide, (4, 96, 112))).compute(), expected)
    np.testing.assert_array_equal(cupy.asnumpy(gpu.transform(cupy.asarray(wide))), expected)
    np.testing.assert_array_equal(NanoparticleMixture(device="cuda").fit_transform(wide), expected)
