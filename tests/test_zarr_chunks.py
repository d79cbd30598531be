"""Direct chunk-file reads and writes give what zarr reads and writes."""

import pickle

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from zarr.codecs import BloscCodec, BytesCodec, GzipCodec, ZstdCodec

from nanoseg._volume import as_volume
from nanoseg._zarr_chunks import ChunkFiles, chunk_files
from nanoseg._zarr_store import array_options, write_slabs

V3_COMPRESSORS = {
    "zstd": (ZstdCodec(level=1),),
    "zstd-checksum": (ZstdCodec(level=3, checksum=True),),
    "blosc": (BloscCodec(cname="lz4", shuffle="bitshuffle"),),
    "gzip": (GzipCodec(level=1),),
    "none": None,
}


def _filled(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 200, size=shape).astype(dtype)
    data[:, : shape[1] // 3] = 0  # some all-zero chunks, left unstored
    return data


def _v3(tmp_path, data, chunks, compressors, fill_value=0):
    array = zarr.create_array(
        store=str(tmp_path / "v3.zarr"), shape=data.shape, chunks=chunks, dtype=data.dtype,
        compressors=compressors, fill_value=fill_value,
    )
    array[...] = data
    return array


@pytest.mark.parametrize("compressor", sorted(V3_COMPRESSORS))
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32", "int32"])
def test_v3_reads_equal_zarr(tmp_path, compressor, dtype):
    data = _filled((7, 45, 38), dtype)
    array = _v3(tmp_path, data, (3, 16, 10), V3_COMPRESSORS[compressor])
    files = chunk_files(array)
    assert isinstance(files, ChunkFiles)
    for key in [np.s_[:], np.s_[2:5], np.s_[0:7, 3:40, 5:11], np.s_[6:7, 44:45, 0:1], np.s_[3:3]]:
        np.testing.assert_array_equal(files[key], array[key])
    assert files[4:6].dtype == array.dtype


def test_v2_reads_equal_zarr(tmp_path):
    data = _filled((5, 33, 20), "uint16")
    for separator in (".", "/"):
        array = zarr.create_array(
            store=str(tmp_path / f"v2{separator == '/'}.zarr"), shape=data.shape, chunks=(2, 8, 7),
            dtype=data.dtype, zarr_format=2, chunk_key_encoding={"name": "v2", "separator": separator},
        )
        array[...] = data
        files = chunk_files(array)
        assert files is not None
        np.testing.assert_array_equal(files[:], data)
        np.testing.assert_array_equal(files[1:4, 5:30, 2:19], data[1:4, 5:30, 2:19])


def test_missing_chunks_read_as_the_fill_value(tmp_path):
    array = zarr.create_array(store=str(tmp_path / "f.zarr"), shape=(4, 10, 10), chunks=(1, 5, 5),
                              dtype="uint8", fill_value=7)
    array[1, :5, :5] = 3
    files = chunk_files(array)
    np.testing.assert_array_equal(files[:], array[:])
    assert files[0].min() == 7 and files[1, 0, 0] == 3


def test_an_array_whose_directory_is_gone_is_not_read_as_fill(tmp_path):
    # Missing chunks read as the fill value, but not when the whole array is
    # missing (moved, deleted, or a cluster worker that cannot see the files).
    import shutil

    array = zarr.create_array(store=str(tmp_path / "g.zarr"), shape=(4, 10, 10), chunks=(1, 5, 5), dtype="uint8")
    array[...] = 5
    files = chunk_files(array)
    shutil.rmtree(tmp_path / "g.zarr")
    with pytest.raises(FileNotFoundError, match="not there on this machine"):
        files[0:2]
    with pytest.raises(FileNotFoundError, match="not there on this machine"):
        files.nonzero([(0, 2), (0, 10), (0, 10)])


@pytest.mark.parametrize(
    "make",
    [
        lambda p: zarr.create_array(store=str(p), shape=(8, 8), chunks=(2, 2), shards=(4, 4), dtype="u1"),
        lambda p: zarr.create_array(store=str(p), shape=(8, 8), chunks=(2, 2), dtype=">u2", zarr_format=2),
        lambda p: zarr.create_array(store=str(p), shape=(8, 8), chunks=(2, 2), dtype="u2", zarr_format=2, order="F"),
        lambda p: zarr.create_array(store=zarr.storage.MemoryStore(), shape=(8, 8), chunks=(2, 2), dtype="u1"),
        lambda p: zarr.create_array(store=str(p), shape=(8, 8), chunks=(2, 2), dtype="u2",
                                    serializer=BytesCodec(endian="big")),
    ],
    ids=["sharded", "big-endian", "F-order", "memory-store", "big-endian-v3"],
)
def test_arrays_that_do_not_qualify_stay_with_zarr(tmp_path, make):
    array = make(tmp_path / "x.zarr")
    array[...] = np.arange(64).reshape(8, 8)
    assert chunk_files(array) is None
    volume = as_volume(array)
    assert volume.reader is array
    np.testing.assert_array_equal(volume.read(0, 8), array[:][None] if volume.is_2d else array[:])


def test_other_keys_are_passed_to_zarr(tmp_path):
    data = _filled((4, 12, 12), "uint8")
    files = chunk_files(_v3(tmp_path, data, (2, 5, 5), V3_COMPRESSORS["zstd"]))
    np.testing.assert_array_equal(files[::2], data[::2])
    np.testing.assert_array_equal(files[1], data[1])
    assert files[1, 2, 3] == data[1, 2, 3]


def test_pickles_and_reads_in_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    data = _filled((16, 40, 40), "uint8")
    files = pickle.loads(pickle.dumps(chunk_files(_v3(tmp_path, data, (1, 16, 16), V3_COMPRESSORS["zstd"]))))
    with ThreadPoolExecutor(4) as pool:
        slabs = list(pool.map(lambda z: files[z : z + 3], range(0, 16, 3)))
    np.testing.assert_array_equal(np.concatenate(slabs), data)


def test_volume_reads_and_dask_graph_use_the_chunk_files(tmp_path):
    data = _filled((9, 30, 26), "uint8")
    array = _v3(tmp_path, data, (2, 8, 8), V3_COMPRESSORS["zstd"])
    volume = as_volume(array)
    assert isinstance(volume.reader, ChunkFiles)
    np.testing.assert_array_equal(volume.read(3, 8), data[3:8])
    np.testing.assert_array_equal(volume.read_slices([0, 1, 4, 7, 8]), data[[0, 1, 4, 7, 8]])
    np.testing.assert_array_equal(volume.to_dask().compute(), data)


def _new_target(tmp_path, shape, chunks, dtype="uint32", name="out.zarr"):
    return zarr.create_array(store=str(tmp_path / name), shape=shape, chunks=chunks, dtype=dtype,
                             fill_value=0, **array_options())


@settings(max_examples=25, deadline=None)
@given(
    depth=st.integers(1, 9), rows=st.integers(1, 23), cols=st.integers(1, 23),
    chunks=st.tuples(st.integers(1, 4), st.integers(1, 9), st.integers(1, 9)),
    cuts=st.lists(st.integers(1, 8), min_size=1, max_size=6), seed=st.integers(0, 2**16),
)
def test_written_slabs_read_back_equal_and_zero_chunks_are_not_stored(tmp_path_factory, depth, rows, cols,
                                                                      chunks, cuts, seed):
    tmp_path = tmp_path_factory.mktemp("w")
    rng = np.random.default_rng(seed)
    data = (rng.random((depth, rows, cols)) < 0.05) * rng.integers(1, 2**31, (depth, rows, cols))
    data = data.astype(np.uint32)
    target = _new_target(tmp_path, data.shape, chunks)
    bounds, start = [], 0
    for cut in cuts + [depth]:  # slabs not always on chunk boundaries
        stop = min(depth, start + cut)
        if stop > start:
            bounds.append((start, stop))
        start = stop
    assert list(write_slabs(target, data, bounds)) == bounds
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "out.zarr"), mode="r")[:], data)
    stored = {tuple(int(k) for k in key.split("/")[1:]) for key in _keys(target)}
    expected = {
        (z, y, x)
        for z in range(-(-depth // chunks[0])) for y in range(-(-rows // chunks[1])) for x in range(-(-cols // chunks[2]))
        if data[z * chunks[0] : (z + 1) * chunks[0], y * chunks[1] : (y + 1) * chunks[1],
                x * chunks[2] : (x + 1) * chunks[2]].any()
    }
    assert stored == expected


def _keys(array):
    root = chunk_files(array).root
    return [str(p.relative_to(root)) for p in (root / "c").rglob("*") if p.is_file()]


def test_writes_leave_no_partial_files(tmp_path):
    data = np.arange(2 * 6 * 6, dtype=np.uint32).reshape(2, 6, 6)
    target = _new_target(tmp_path, data.shape, (1, 4, 4))
    list(write_slabs(target, data, [(0, 2)]))
    names = [p.name for p in (tmp_path / "out.zarr").rglob("*")]
    assert not [n for n in names if n.endswith(".partial")]
    np.testing.assert_array_equal(target[:], data)


def test_writes_through_zarr_for_other_compressors(tmp_path):
    data = np.zeros((3, 8, 8), np.uint16)
    data[1, 2:5, 3] = 9
    target = zarr.create_array(store=str(tmp_path / "b.zarr"), shape=data.shape, chunks=(1, 4, 4),
                               dtype=data.dtype, compressors=(BloscCodec(),))
    assert not chunk_files(target).writable
    list(write_slabs(target, data, [(0, 2), (2, 3)]))
    np.testing.assert_array_equal(target[:], data)


@pytest.mark.parametrize("compressor", sorted(V3_COMPRESSORS))
def test_nonzero_equals_a_search_of_the_read_block(tmp_path, compressor):
    rng = np.random.default_rng(3)
    data = (rng.random((7, 30, 41)) < 0.05) * rng.integers(1, 1000, (7, 30, 41))
    data = data.astype(np.uint32)
    data[:, :, 20:] = 0  # chunks of zeros, not stored
    array = zarr.create_array(store=str(tmp_path / "a.zarr"), shape=data.shape, chunks=(3, 8, 9), dtype=data.dtype,
                              fill_value=0, compressors=V3_COMPRESSORS[compressor],
                              config={"write_empty_chunks": False})
    array[...] = data
    files = chunk_files(array)
    assert files is not None
    for region in (((0, 7), (0, 30), (0, 41)), ((2, 5), (3, 29), (1, 40)), ((4, 4), (0, 30), (0, 41))):
        block = data[tuple(slice(a, b) for a, b in region)]
        flat, values = files.nonzero(region)
        np.testing.assert_array_equal(flat, np.flatnonzero(block))
        np.testing.assert_array_equal(values, block.reshape(-1)[np.flatnonzero(block)])


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_count_nonzero_planes_reads_the_stored_chunks(tmp_path, zarr_format):
    rng = np.random.default_rng(8)
    data = ((rng.random((7, 30, 41)) < 0.05) * rng.integers(1, 9, (7, 30, 41))).astype(np.uint16)
    data[:, :, 18:] = 0
    data[5] = 0
    array = zarr.create_array(store=str(tmp_path / "a.zarr"), shape=data.shape, chunks=(3, 8, 9), dtype=data.dtype,
                              fill_value=0, zarr_format=zarr_format, config={"write_empty_chunks": False})
    array[...] = data
    files = chunk_files(array)
    assert files is not None
    expected = np.count_nonzero(data.reshape(7, -1), axis=1)
    for n_jobs in (1, 3):
        np.testing.assert_array_equal(files.count_nonzero_planes(n_jobs=n_jobs), expected)
    # A nonzero fill value would make the skipped chunks' zeros wrong: refused.
    files.fill_value = 1
    with pytest.raises(ValueError, match="fill value is 0"):
        files.count_nonzero_planes(n_jobs=2)
