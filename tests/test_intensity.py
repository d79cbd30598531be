"""The fixed map from uint8/uint16 intensities to 256 bins."""

import math

import dask.array as da
import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseg._intensity import Binning, choose_binning, to_8bit, value_histogram


def float_reference(values, low, high):
    """floor((v - low) * 256 / (high - low + 1)) clipped, through float64 arithmetic."""
    values = np.asarray(values, dtype=np.float64)
    return np.clip(np.floor((values - low) * 256.0 / (high - low + 1)), 0, 255).astype(np.uint8)


# -- identity for data that fits in 8 bits -------------------------------------


def test_uint16_data_within_8_bits_keeps_its_values():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(3, 20, 30), dtype=np.uint16)
    data[0, 0, 0] = 255
    out = to_8bit(data)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, data.astype(np.uint8))


def test_uint16_data_within_8_bits_not_stretched_even_if_narrow():
    # "auto" keeps values as they are rather than stretching 10..20 over 256 bins.
    data = np.array([10, 15, 20], dtype=np.uint16)
    np.testing.assert_array_equal(to_8bit(data), [10, 15, 20])


@pytest.mark.parametrize("mode", ["auto", "shift"])
def test_uint8_input_comes_back_unchanged(mode):
    data = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert to_8bit(data, mode=mode) is data


def test_identity_is_the_range_0_to_255():
    binning = choose_binning(np.array([0, 255], dtype=np.uint16), np.uint16)
    assert binning == Binning("range", 0, 255)
    assert binning.is_identity
    np.testing.assert_array_equal(binning.table(np.uint16)[:256], np.arange(256))
    assert (binning.table(np.uint16)[256:] == 255).all()


# -- exact bins by hand ------------------------------------------------------------


@pytest.mark.parametrize(
    "low, high, values, expected",
    [
        # 1024 values: bins of exactly 4 values, bin = (v - 100) // 4.
        (100, 1123, [100, 103, 104, 107, 108, 1119, 1120, 1123], [0, 0, 1, 1, 2, 254, 255, 255]),
        # Below low and above high: clipped to the first and last bin.
        (100, 1123, [0, 99, 1124, 65535], [0, 0, 255, 255]),
        # 256 values: a pure offset.
        (1000, 1255, [1000, 1001, 1100, 1255], [0, 1, 100, 255]),
        # 100 values over 256 bins: 1 * 256 / 100 = 2.56 -> 2, 2 -> 5.12 -> 5, 99 -> 253.44 -> 253.
        (0, 99, [0, 1, 2, 50, 99], [0, 2, 5, 128, 253]),
        # 1000 values: 999 * 256 / 1000 = 255.744 -> 255; 4 * 256 / 1000 = 1.024 -> 1; 3 -> 0.768 -> 0.
        (0, 999, [3, 4, 7, 8, 999], [0, 1, 1, 2, 255]),
        # A single value: it is bin 0, anything above is 255.
        (500, 500, [499, 500, 501], [0, 0, 255]),
    ],
)
def test_range_bins_by_hand(low, high, values, expected):
    out = to_8bit(np.array(values, dtype=np.uint16), mode="range", low=low, high=high)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(
    "maximum, shift",
    [(255, 0), (256, 1), (511, 1), (512, 2), (1023, 2), (1024, 3), (4095, 4), (65535, 8)],
)
def test_shift_is_the_smallest_that_fits_the_maximum(maximum, shift):
    data = np.array([0, maximum], dtype=np.uint16)
    binning = choose_binning(data, np.uint16, mode="shift")
    assert binning.shift == shift
    # Smallest: the maximum fits in 8 bits after `shift` bits but not after one fewer.
    assert maximum >> shift <= 255
    assert shift == 0 or maximum >> (shift - 1) > 255
    np.testing.assert_array_equal(to_8bit(data, mode="shift"), [0, maximum >> shift])


def test_shift_with_given_maximum_clips_values_above_it():
    data = np.array([0, 7, 8, 1023, 5000], dtype=np.uint16)
    np.testing.assert_array_equal(to_8bit(data, mode="shift", high=1023), [0, 1, 2, 255, 255])


def test_range_edges_by_hand():
    binning = Binning("range", 100, 1123)
    np.testing.assert_array_equal(binning.edges, 100 + 4 * np.arange(257))
    # 100 values over 256 bins: edges low + ceil(b * 100 / 256).
    edges = Binning("range", 0, 99).edges
    np.testing.assert_array_equal(edges[:6], [0, 1, 1, 2, 2, 2])
    assert edges[-1] == 100


def test_shift_edges_by_hand():
    np.testing.assert_array_equal(Binning("shift", 0, 1123, 3).edges, 8 * np.arange(257))


@pytest.mark.parametrize("binning", [Binning("range", 100, 1123), Binning("range", 0, 99),
                                     Binning("range", 37, 60000), Binning("shift", 0, 4095, 4)])
def test_edges_bound_each_bin(binning):
    table = binning.table(np.uint16)
    edges = binning.edges
    for b in range(256):
        inside = np.arange(edges[b], edges[b + 1])
        assert (table[inside] == b).all()
    assert (table[: edges[0]] == 0).all()
    assert (table[edges[256]:] == 255).all()


@pytest.mark.parametrize("low, high", [(0, 65535), (100, 1123), (0, 99), (37, 60000), (12345, 12345)])
def test_table_matches_float_formula(low, high):
    table = Binning("range", low, high).table(np.uint16)
    np.testing.assert_array_equal(table, float_reference(np.arange(65536), low, high))


@pytest.mark.parametrize("width", [256, 300, 1000, 4096, 65536])
def test_range_bins_are_near_equal(width):
    # In-range values split into 256 bins whose sizes differ by at most one.
    low = 65536 - width
    table = Binning("range", low, 65535).table(np.uint16)[low:]
    counts = np.bincount(table, minlength=256)
    assert counts.sum() == width
    assert counts.max() - counts.min() <= 1


# -- monotone -----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    bounds=st.tuples(st.integers(0, 65535), st.integers(0, 65535)).map(sorted),
    mode=st.sampled_from(["range", "shift"]),
)
def test_map_is_monotone(bounds, mode):
    low, high = bounds
    if mode == "shift":
        binning = choose_binning(np.array([high], dtype=np.uint16), np.uint16, mode="shift")
    else:
        binning = choose_binning(np.array([low, high], dtype=np.uint16), np.uint16, mode="range")
    table = binning.table(np.uint16)
    assert (np.diff(table.astype(np.int16)) >= 0).all()
    assert table[high] <= 255
    if mode == "range":
        assert table[low] == 0
        assert table[high] == (255 if high - low + 1 >= 256 else (high - low) * 256 // (high - low + 1))


# -- chunk independence -------------------------------------------------------------


@pytest.fixture(scope="module")
def volume16():
    rng = np.random.default_rng(1)
    data = rng.integers(300, 4000, size=(6, 24, 20), dtype=np.uint16)
    data[2, 5:8, 5:8] = 9000
    return data


@pytest.mark.parametrize("mode", ["auto", "range", "shift"])
@pytest.mark.parametrize("chunks", [(1, 24, 20), (4, 7, 5), (6, 24, 20)])
def test_dask_and_zarr_give_the_numpy_result(volume16, mode, chunks):
    expected = to_8bit(volume16, mode=mode)
    lazy = to_8bit(da.from_array(volume16, chunks=chunks), mode=mode)
    assert isinstance(lazy, da.Array)
    assert lazy.dtype == np.uint8
    np.testing.assert_array_equal(lazy.compute(), expected)
    stored = zarr.create_array(store={}, shape=volume16.shape, chunks=chunks, dtype=volume16.dtype)
    stored[...] = volume16
    from_zarr = to_8bit(stored, mode=mode)
    assert isinstance(from_zarr, da.Array)
    np.testing.assert_array_equal(from_zarr.compute(), expected)


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_slab_by_slab_with_a_binning_from_the_first_pass(volume16, depth):
    starts = range(0, volume16.shape[0], depth)
    histogram = sum(value_histogram(volume16[s : s + depth]) for s in starts)
    binning = choose_binning(histogram, np.uint16)
    assert binning == Binning("range", int(volume16.min()), int(volume16.max()))
    slabs = np.concatenate([binning.apply(volume16[s : s + depth]) for s in starts])
    np.testing.assert_array_equal(slabs, to_8bit(volume16))


def test_histogram_and_sample_give_the_same_binning(volume16):
    for mode in ("auto", "range", "shift"):
        assert choose_binning(value_histogram(volume16), np.uint16, mode=mode) == choose_binning(
            volume16, np.uint16, mode=mode
        )


def test_given_bounds_need_no_observation():
    # With both bounds given, the data does not decide anything.
    binning = choose_binning(np.zeros(0, dtype=np.uint16), np.uint16, low=10, high=265)
    assert binning == Binning("range", 10, 265)
    np.testing.assert_array_equal(
        to_8bit(np.array([10, 265], dtype=np.uint16), low=10, high=265), [0, 255]
    )


def test_auto_with_bounds_maps_the_range_even_for_small_values():
    np.testing.assert_array_equal(to_8bit(np.array([0, 50, 99], dtype=np.uint16), low=0, high=99), [0, 128, 253])


def test_value_histogram_counts_by_hand():
    counts = value_histogram(np.array([[0, 3], [3, 65535]], dtype=np.uint16))
    assert counts.shape == (65536,)
    assert counts[0] == 1 and counts[3] == 2 and counts[65535] == 1 and counts.sum() == 4
    assert value_histogram(np.array([7], dtype=np.uint8)).shape == (256,)


def test_tables_are_shared_and_read_only():
    binning = Binning("range", 5, 900)
    table = binning.table(np.uint16)
    assert table is Binning("range", 5, 900).table(np.uint16)
    with pytest.raises(ValueError):
        table[0] = 1


# -- errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, message",
    [
        (np.int16, "signed data"),
        (np.int32, "signed data"),
        (np.float32, "floating-point"),
        (np.float64, "floating-point"),
        (np.bool_, "mask"),
        (np.uint32, "more than 16 bits"),
    ],
)
def test_unsupported_dtypes_are_refused(dtype, message):
    data = np.ones((2, 3), dtype=dtype)
    with pytest.raises(TypeError, match=f"uint8 or uint16.*{message}"):
        to_8bit(data)
    with pytest.raises(TypeError, match=message):
        choose_binning(data, dtype)
    with pytest.raises(TypeError, match=message):
        to_8bit(da.from_array(data))


def test_float_with_nan_is_refused_as_float():
    with pytest.raises(TypeError, match="floating-point"):
        to_8bit(np.array([np.nan, 1.0]))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"mode": "log"}, ValueError, "mode must be one of"),
        ({"low": 500, "high": 400}, ValueError, r"low \(500\) must not exceed high \(400\)"),
        ({"mode": "shift", "low": 3}, ValueError, "low cannot be set"),
        ({"high": 70000}, ValueError, "from 0 to 65535"),
        ({"low": -1}, ValueError, "from 0 to 65535"),
        ({"low": 1.5}, TypeError, "integer intensity"),
        ({"high": True}, TypeError, "integer intensity"),
    ],
)
def test_invalid_options_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        to_8bit(np.array([1, 2000], dtype=np.uint16), **kwargs)


@pytest.mark.parametrize(
    "hist_or_sample, message",
    [
        (np.zeros(0, dtype=np.uint16), "sample is empty"),
        (np.zeros(65536, dtype=np.int64), "histogram is empty"),
        (np.ones(1000, dtype=np.int64), "65536 entries"),
        (np.ones((256, 256), dtype=np.int64), "65536 entries"),
        (np.full(65536, -1.0), "non-negative"),
        (np.full(65536, np.nan), "finite"),
    ],
)
def test_invalid_histograms_and_samples_are_refused(hist_or_sample, message):
    with pytest.raises(ValueError, match=message):
        choose_binning(hist_or_sample, np.uint16)


def test_empty_input_is_refused():
    with pytest.raises(ValueError, match="empty"):
        to_8bit(np.zeros((0, 4), dtype=np.uint16))


def test_invalid_binnings_are_refused():
    with pytest.raises(ValueError, match="low <= high"):
        Binning("range", 9, 3)
    with pytest.raises(ValueError, match="'range' or 'shift'"):
        Binning("auto", 0, 255)
    with pytest.raises(ValueError, match="starts at 0"):
        Binning("shift", 4, 255, 0)


def test_edges_formula_uses_ceiling():
    # Independent check of one edge: bin 1 of 0..999 starts at ceil(1000 / 256) = 4.
    assert Binning("range", 0, 999).edges[1] == math.ceil(1000 / 256) == 4
