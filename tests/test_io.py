"""Reading TIFF / zarr / OME-Zarr with physical spacing, and writing OME-Zarr."""

import json

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr

import nanoseg.io as nio
from nanoseg.io import (
    check_output_path,
    convert,
    is_complete,
    read_image,
    read_spacing,
    slab_bounds,
    write_ome_zarr,
)


def _volume(shape=(5, 12, 9), seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _attrs(store):
    with open(store / "zarr.json") as handle:
        return json.load(handle)["attributes"]


# ---------------------------------------------------------------------------
# TIFF
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unit", "z", "xy", "expected"),
    [
        ("um", 0.05, 0.01, (50.0, 10.0, 10.0)),
        ("micron", 0.05, 0.004, (50.0, 4.0, 4.0)),
        ("\\u00B5m", 0.03, 0.005, (30.0, 5.0, 5.0)),
        ("nm", 40.0, 8.0, (40.0, 8.0, 8.0)),
    ],
)
def test_imagej_multipage_tiff(tmp_path, unit, z, xy, expected):
    volume = _volume()
    path = tmp_path / "stack.tif"
    tifffile.imwrite(
        path, volume, imagej=True, resolution=(1 / xy, 1 / xy), metadata={"spacing": z, "unit": unit, "axes": "ZYX"}
    )
    image, spacing = read_image(path)
    assert isinstance(image, da.Array)
    assert spacing == pytest.approx(expected)
    np.testing.assert_array_equal(image.compute(), volume)
    # Slices are read on their own.
    np.testing.assert_array_equal(image[3, 2:5].compute(), volume[3, 2:5])


def test_compressed_ome_tiff_reads_page_by_page(tmp_path):
    volume = _volume((4, 10, 11))
    path = tmp_path / "stack.ome.tif"
    # PhysicalSize units default to micrometres in OME-XML; z is given in nm.
    tifffile.imwrite(
        path, volume, ome=True, compression="zlib",
        metadata={"axes": "ZYX", "PhysicalSizeX": 0.012, "PhysicalSizeY": 0.011,
                  "PhysicalSizeZ": 45, "PhysicalSizeZUnit": "nm"},
    )
    image, spacing = read_image(path)
    assert spacing == pytest.approx((45.0, 11.0, 12.0))
    np.testing.assert_array_equal(image.compute(), volume)


def test_tiff_without_calibration_has_no_spacing(tmp_path):
    volume = _volume((3, 8, 8))
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, volume, photometric="minisblack")
    image, spacing = read_image(path)
    assert spacing is None
    np.testing.assert_array_equal(image.compute(), volume)
    _, spacing = read_image(path, spacing=(50, 10, 10))
    assert spacing == (50.0, 10.0, 10.0)


def test_single_tiff_image_is_one_slice(tmp_path):
    plane = _volume((7, 9))
    tifffile.imwrite(tmp_path / "one.tif", plane)
    image, _ = read_image(tmp_path / "one.tif")
    assert image.shape == (1, 7, 9)
    np.testing.assert_array_equal(image.compute()[0], plane)


def test_tiff_folder_is_stacked_in_natural_order(tmp_path):
    folder = tmp_path / "slices"
    folder.mkdir()
    volume = _volume((11, 6, 7))
    # Written out of order; lexical order would put 10 before 2.
    for z in [3, 10, 0, 2, 1, 9, 4, 8, 5, 7, 6]:
        tifffile.imwrite(folder / f"slice_{z}.tif", volume[z], imagej=True,
                         resolution=(100.0, 100.0), metadata={"unit": "um"})
    (folder / "notes.txt").write_text("not an image")
    image, spacing = read_image(folder)
    assert isinstance(image, da.Array) and image.chunks[0] == (1,) * 11
    np.testing.assert_array_equal(image.compute(), volume)
    # y and x are calibrated but one slice cannot say how far apart slices are.
    assert spacing is None
    assert read_image(folder, spacing=(50, 10, 10))[1] == (50.0, 10.0, 10.0)


def test_tiff_folder_with_a_mismatched_slice(tmp_path):
    for z in range(3):
        tifffile.imwrite(tmp_path / f"s{z}.tif", np.zeros((6, 6) if z != 2 else (6, 5), np.uint8))
    image, _ = read_image(tmp_path)
    with pytest.raises(ValueError, match=r"s2\.tif .* every slice must match"):
        image.compute()


def test_tiff_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_image(tmp_path / "missing.tif")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="without TIFF files"):
        read_image(empty)
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((8, 8, 3), np.uint8), photometric="rgb")
    with pytest.raises(ValueError, match="single channel"):
        read_image(rgb)
    channels = tmp_path / "channels.tif"
    tifffile.imwrite(channels, np.zeros((3, 2, 8, 8), np.uint8), imagej=True, metadata={"axes": "ZCYX"})
    with pytest.raises(ValueError, match="single channel"):
        read_image(channels)
    other = tmp_path / "image.png"
    other.write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="neither a TIFF file"):
        read_image(other)


# ---------------------------------------------------------------------------
# zarr and OME-Zarr
# ---------------------------------------------------------------------------


def test_plain_zarr_array_is_returned_itself(tmp_path):
    volume = _volume()
    zarr.create_array(store=str(tmp_path / "plain.zarr"), data=volume, chunks=(2, 12, 9))
    image, spacing = read_image(tmp_path / "plain.zarr")
    assert isinstance(image, zarr.Array) and spacing is None
    np.testing.assert_array_equal(image[...], volume)


def _ngff_04(path, volume, axes, scales, extra=None):
    """An NGFF 0.4 image: zarr format 2, metadata in .zattrs."""
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    datasets = []
    for level, scale in enumerate(scales):
        data = volume[tuple(slice(None, None, 2**level) for _ in volume.shape)]
        root.create_array(str(level), data=data, chunks=data.shape)
        datasets.append({"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    root.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": datasets, **(extra or {})}]
    return path


def _ngff_05(path, data, axes, scale, outer=None):
    """An NGFF 0.5 image: zarr format 3, metadata under "ome"."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.create_array("s0", data=data, chunks=data.shape)
    multiscale = {
        "axes": axes,
        "datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
    }
    if outer is not None:
        multiscale["coordinateTransformations"] = [{"type": "scale", "scale": outer}]
    root.attrs["ome"] = {"version": "0.5", "multiscales": [multiscale]}
    return path


def _space(*units):
    return [{"name": n, "type": "space", "unit": u} for n, u in zip("zyx", units)]


def test_ome_zarr_04_full_resolution_in_micrometres(tmp_path):
    volume = _volume((4, 12, 12))
    store = _ngff_04(
        tmp_path / "v04.zarr", volume, _space("micrometer", "micrometer", "micrometer"),
        [[0.05, 0.01, 0.01], [0.1, 0.02, 0.02]],
    )
    image, spacing = read_image(store)
    assert isinstance(image, zarr.Array) and image.shape == (4, 12, 12)
    np.testing.assert_array_equal(image[...], volume)
    assert spacing == pytest.approx((50.0, 10.0, 10.0))
    assert read_spacing(store) == pytest.approx((50.0, 10.0, 10.0))


def test_ome_zarr_05_with_singleton_channel_and_global_scale(tmp_path):
    volume = _volume((3, 8, 10))
    axes = [{"name": "c", "type": "channel"}, *_space("nanometer", "angstrom", "angstrom")]
    # Dataset scale times the multiscale-level scale: z 25 * 2 nm, y/x 50 * 2 angstrom.
    store = _ngff_05(tmp_path / "v05.zarr", volume[None], axes, [1, 25, 50, 50], outer=[1, 2, 2, 2])
    image, spacing = read_image(store)
    assert image.shape == (3, 8, 10)
    np.testing.assert_array_equal(np.asarray(image), volume)
    assert spacing == pytest.approx((50.0, 10.0, 10.0))


@pytest.mark.parametrize(
    ("axes", "scale", "match"),
    [
        ([{"name": n, "type": "space"} for n in "zyx"], [50, 10, 10], "axis 'z' has no 'unit'"),
        (_space("nanometer", "parsec", "nanometer"), [50, 10, 10], "axis 'y' 'unit' is 'parsec'"),
        (_space("nanometer", "nanometer", "nanometer"), [50, 10], "'scale' must be a list of 3 numbers"),
        (_space("nanometer", "nanometer", "nanometer"), [50, -10, 10], "'scale' must be positive"),
        (_space("nanometer", "nanometer", "nanometer")[:2], [50, 10, 10], "must list 3 axes"),
    ],
)
def test_malformed_ome_zarr_metadata_names_the_field(tmp_path, axes, scale, match):
    store = _ngff_05(tmp_path / "bad.zarr", _volume((2, 4, 4)), axes, scale)
    with pytest.raises(ValueError, match=match) as excinfo:
        read_image(store)
    assert "--spacing" in str(excinfo.value)


def test_malformed_ome_zarr_structure(tmp_path):
    store = _ngff_05(tmp_path / "bad.zarr", _volume((2, 4, 4)), _space(*["nanometer"] * 3), [50, 10, 10])
    group = zarr.open_group(str(store), mode="r+")
    ome = group.attrs["ome"]
    ome["multiscales"][0]["datasets"][0].pop("coordinateTransformations")
    group.attrs["ome"] = ome
    with pytest.raises(ValueError, match="coordinateTransformations' is missing"):
        read_image(store)
    # A voxel size given by the caller makes the metadata's unnecessary.
    assert read_image(store, spacing=(50, 10, 10))[1] == (50.0, 10.0, 10.0)
    ome["multiscales"][0]["datasets"][0]["path"] = "nowhere"
    group.attrs["ome"] = ome
    with pytest.raises(ValueError, match="names 'nowhere', which does not exist"):
        read_image(store, spacing=(50, 10, 10))
    ome["multiscales"] = {}
    group.attrs["ome"] = ome
    with pytest.raises(ValueError, match="'multiscales' must be a non-empty list"):
        read_image(store)
    plain = zarr.open_group(str(tmp_path / "group.zarr"), mode="w")
    with pytest.raises(ValueError, match="without OME-Zarr 'multiscales'"):
        read_image(tmp_path / "group.zarr")
    with pytest.raises(ValueError, match="no voxel size|without OME-Zarr"):
        read_spacing(tmp_path / "group.zarr")
    del plain


def test_ome_zarr_with_several_channels_is_refused(tmp_path):
    axes = [{"name": "c", "type": "channel"}, *_space(*["nanometer"] * 3)]
    store = _ngff_05(tmp_path / "two.zarr", _volume((2, 3, 4, 4)), axes, [1, 50, 10, 10])
    with pytest.raises(ValueError, match="'c' axis of size 2"):
        read_image(store)


# ---------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------


def test_write_read_round_trip_and_metadata(tmp_path):
    volume = _volume((3, 20, 30))
    store = tmp_path / "image.zarr"
    written = write_ome_zarr(store, volume, spacing=(50, 10.5, 10), progress=False)
    assert written.read_only
    image, spacing = read_image(store)
    np.testing.assert_array_equal(image[...], volume)
    assert spacing == (50.0, 10.5, 10.0) == read_spacing(store)
    ome = _attrs(store)["ome"]
    assert ome["version"] == "0.5" and "image-label" not in ome
    (multiscale,) = ome["multiscales"]
    assert multiscale["axes"] == [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"]
    assert multiscale["datasets"] == [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [50.0, 10.5, 10.0]}]}
    ]
    array = zarr.open_array(str(store / "0"), mode="r")
    assert array.metadata.dimension_names == ("z", "y", "x")
    assert array.chunks == (1, 20, 30)  # the default 1 x 1024 x 1024, capped by the shape


def test_labels_are_written_as_image_label(tmp_path):
    labels = np.zeros((2, 5, 5), np.uint32)
    labels[1, 1:3, 1:3] = 7
    store = tmp_path / "labels.zarr"
    write_ome_zarr(store, labels, spacing=(50, 10, 10), kind="labels", chunks=(2, 3, 3), progress=False)
    assert "image-label" in _attrs(store)["ome"]
    array = zarr.open_array(str(store / "0"), mode="r")
    assert array.chunks == (2, 3, 3) and array.dtype == np.uint32
    np.testing.assert_array_equal(array[...], labels)
    with pytest.raises(ValueError, match="Label images must hold integers"):
        write_ome_zarr(tmp_path / "float.zarr", labels.astype(float), spacing=(1, 1, 1), kind="labels")
    # The arguments swapped: said so, and nothing written.
    for path in (tmp_path / "swapped.zarr", str(tmp_path / "swapped.zarr")):
        with pytest.raises(TypeError, match="look swapped"):
            write_ome_zarr(labels, path, spacing=(1, 1, 1), kind="labels")
    assert not (tmp_path / "swapped.zarr").exists()


def test_write_2d_and_zarr_inputs(tmp_path):
    plane = _volume((6, 7))
    write_ome_zarr(tmp_path / "plane.zarr", plane, spacing=(1, 2, 3), progress=False)
    assert read_image(tmp_path / "plane.zarr")[0].shape == (1, 6, 7)
    source = zarr.create_array(store=str(tmp_path / "src.zarr"), data=_volume((4, 6, 6)), chunks=(2, 3, 3))
    write_ome_zarr(tmp_path / "copy.zarr", source, spacing=(1, 1, 1), progress=False)
    copy = zarr.open_array(str(tmp_path / "copy.zarr" / "0"), mode="r")
    assert copy.chunks == (2, 3, 3)  # a zarr input keeps its chunks
    np.testing.assert_array_equal(copy[...], source[...])


def test_dask_input_is_written_block_by_block(tmp_path, monkeypatch):
    volume = _volume((10, 16, 16))
    computed = []

    def record(block, block_info=None):
        computed.append(block_info[None]["array-location"][0])
        return block

    lazy = da.from_array(volume, chunks=(3, 16, 16)).map_blocks(record, dtype=volume.dtype)
    # Two planes' worth of bytes per step: every step is one source block.
    monkeypatch.setattr(nio, "WRITE_BYTES", 2 * 16 * 16)
    write_ome_zarr(tmp_path / "lazy.zarr", lazy, spacing=(1, 1, 1), progress=False)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "lazy.zarr" / "0"))[...], volume)
    assert sorted(computed) == [(0, 3), (3, 6), (6, 9), (9, 10)]


def test_slab_bounds():
    # Source blocks of 3 slices, output chunks of 1, at most 7 slices per slab.
    assert slab_bounds([3, 6, 9, 10], 1, 7) == [(0, 6), (6, 10)]
    # Output chunks of 2: cuts prefer even positions (6), then any edge (9).
    assert slab_bounds([3, 6, 9, 12], 2, 4) == [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert slab_bounds([3, 6, 9, 12], 2, 6) == [(0, 6), (6, 12)]
    # A source block deeper than the budget is still read whole.
    assert slab_bounds([5, 6], 1, 2) == [(0, 5), (5, 6)]


def test_overwrite_is_refused_unless_asked(tmp_path):
    store = tmp_path / "image.zarr"
    write_ome_zarr(store, np.zeros((2, 4, 4), np.uint8), spacing=(1, 1, 1), progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_ome_zarr(store, np.ones((2, 4, 4), np.uint8), spacing=(1, 1, 1), progress=False)
    write_ome_zarr(store, np.ones((3, 4, 4), np.uint8), spacing=(2, 1, 1), overwrite=True, progress=False)
    image, spacing = read_image(store)
    assert image.shape == (3, 4, 4) and int(image[0, 0, 0]) == 1 and spacing == (2.0, 1.0, 1.0)
    # A folder that is not a zarr store is never deleted, even when asked.
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match="not a zarr store"):
        write_ome_zarr(folder, np.zeros((1, 2, 2), np.uint8), spacing=(1, 1, 1), overwrite=True)
    assert (folder / "keep.txt").read_text() == "precious"


def test_output_inside_input_is_refused(tmp_path):
    source = zarr.create_array(store=str(tmp_path / "in.zarr"), data=_volume((2, 4, 4)))
    with pytest.raises(ValueError, match="inside the input"):
        write_ome_zarr(tmp_path / "in.zarr" / "out.zarr", source, spacing=(1, 1, 1))
    with pytest.raises(ValueError, match="inside the input"):
        check_output_path(tmp_path / "in.zarr" / "sub" / "out.zarr", inputs=[tmp_path / "in.zarr"])
    with pytest.raises(ValueError, match="is the input"):
        check_output_path(tmp_path / "in.zarr", inputs=[None, tmp_path / "in.zarr"], overwrite=True)
    with pytest.raises(ValueError, match="contains the input"):
        check_output_path(tmp_path, inputs=[tmp_path / "in.zarr"], overwrite=True)
    assert check_output_path(tmp_path / "out.zarr", inputs=[tmp_path / "in.zarr"]) == (tmp_path / "out.zarr").resolve()


def test_completion_marker(tmp_path):
    store = tmp_path / "image.zarr"
    write_ome_zarr(store, np.zeros((2, 4, 4), np.uint8), spacing=(1, 1, 1), attributes={"source": "x"}, progress=False)
    assert is_complete(store)
    assert _attrs(store)["nanoseg"] == {"source": "x", "complete": True}

    def fail_late(block, block_info=None):
        if block_info[None]["array-location"][0][0] >= 2:
            raise RuntimeError("disk full")
        return block

    lazy = da.zeros((4, 4, 4), dtype=np.uint8, chunks=(1, 4, 4)).map_blocks(fail_late, dtype=np.uint8)
    broken = tmp_path / "broken.zarr"
    with pytest.raises(RuntimeError, match="disk full"):
        write_ome_zarr(broken, lazy, spacing=(1, 1, 1), progress=False)
    assert _attrs(broken)["nanoseg"]["complete"] is False
    assert not is_complete(broken)
    with pytest.raises(ValueError, match="not written completely"):
        read_image(broken)
    # Stores nanoseg did not write are not called complete.
    zarr.create_array(store=str(tmp_path / "plain.zarr"), data=np.zeros((2, 2)))
    assert not is_complete(tmp_path / "plain.zarr")


def test_invalid_write_arguments(tmp_path):
    data = np.zeros((2, 4, 4), np.uint8)
    for spacing in [(1, 1), (0, 1, 1), (1, float("nan"), 1), "abc"]:
        with pytest.raises(ValueError, match="spacing must be three positive numbers"):
            write_ome_zarr(tmp_path / "a.zarr", data, spacing=spacing)
    with pytest.raises(ValueError, match="chunks must be three positive integers"):
        write_ome_zarr(tmp_path / "a.zarr", data, spacing=(1, 1, 1), chunks=(1, 0, 4))
    with pytest.raises(ValueError, match="kind must be"):
        write_ome_zarr(tmp_path / "a.zarr", data, spacing=(1, 1, 1), kind="mask")
    with pytest.raises(ValueError, match="2D image"):
        write_ome_zarr(tmp_path / "a.zarr", np.zeros((1, 2, 2, 2)), spacing=(1, 1, 1))
    assert not (tmp_path / "a.zarr").exists()


def test_convert_tiff_folder(tmp_path):
    folder = tmp_path / "slices"
    folder.mkdir()
    volume = _volume((4, 9, 9))
    for z in range(4):
        tifffile.imwrite(folder / f"{z}.tif", volume[z])
    with pytest.raises(ValueError, match="spacing"):
        convert(folder, tmp_path / "out.zarr", progress=False)
    assert convert(folder, tmp_path / "out.zarr", spacing=(50, 10, 10), chunks=(2, 9, 9), progress=False) == (50.0, 10.0, 10.0)
    image, spacing = read_image(tmp_path / "out.zarr")
    np.testing.assert_array_equal(image[...], volume)
    assert spacing == (50.0, 10.0, 10.0) and image.chunks == (2, 9, 9)
    with pytest.raises(ValueError, match="inside the input"):
        convert(folder, folder / "out.zarr", spacing=(50, 10, 10))


def test_written_arrays_use_zstd_and_skip_empty_chunks(tmp_path):
    labels = np.zeros((4, 32, 32), dtype=np.uint32)
    labels[1, 3:6, 3:6] = 7
    written = nio.write_ome_zarr(tmp_path / "labels.zarr", labels, spacing=(50, 10, 10), kind="labels",
                                 chunks=(1, 32, 32), progress=False)
    compressors = written.metadata.codecs[1:]
    assert [type(c).__name__ for c in compressors] == ["ZstdCodec"]
    assert compressors[0].level == 1
    # One chunk holds a particle: only it is stored.
    stored = [p for p in (tmp_path / "labels.zarr" / "0").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert len(stored) == 1
    np.testing.assert_array_equal(written[:], labels)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_float_chunks_of_zeros_are_skipped_and_negative_zeros_kept(tmp_path, dtype):
    # Chunks are tested for zeros on their bits: a chunk of +0.0 is not
    # stored, one of -0.0 is (and reads back with its sign), one holding a
    # value or a NaN is.
    image = np.zeros((4, 8, 8), dtype=dtype)
    image[1] = -0.0
    image[2, 3, 4] = 0.25
    image[3, 0, 0] = np.nan
    written = nio.write_ome_zarr(tmp_path / "posterior.zarr", image, spacing=(50, 10, 10),
                                 chunks=(1, 8, 8), progress=False)
    stored = sorted(p.relative_to(tmp_path / "posterior.zarr" / "0").parts[1]
                    for p in (tmp_path / "posterior.zarr" / "0").rglob("*") if p.is_file() and p.name != "zarr.json")
    assert stored == ["1", "2", "3"]
    back = written[:]
    np.testing.assert_array_equal(back, image)
    assert np.signbit(back[1]).all() and not np.signbit(back[0]).any()
