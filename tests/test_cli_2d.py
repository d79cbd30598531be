"""The ``nanoseg`` command line on 2D images: TIFF, PNG and JPEG micrographs."""

import re

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr
from PIL import Image
from skimage.measure import label as connected_components

from nanoseg.__main__ import main
from nanoseg.datasets import make_phantom
from nanoseg.io import read_image, read_spacing
from nanoseg.measure import particle_table
from cli_helpers import error_line

# The phantom's particles cover about 2 % of the pixels, more than the 0.5 %
# the default seed percentiles assume: seed from the brightest 2 % instead.
MIXTURE = ["--percentile-low", "98", "--percentile-high", "99.9"]
FAST = ["--min-size", "2", "--n-jobs", "1", "-q"]


@pytest.fixture(scope="module")
def micrograph(tmp_path_factory):
    """A 2D phantom written as TIFF and PNG, its mask as TIFF and PNG."""
    image, mask = make_phantom((128, 128), n_particles=12, random_state=0)
    folder = tmp_path_factory.mktemp("micrograph")
    tifffile.imwrite(folder / "image.tif", image)
    Image.fromarray(image).save(folder / "image.png")
    Image.fromarray(mask.astype(np.uint8)).save(folder / "mask.png")
    return {"folder": folder, "image": image, "mask": mask, "n_particles": int(connected_components(mask).max())}


@pytest.fixture(scope="module", params=["image.tif", "image.png"])
def segmented(micrograph, request):
    """``nanoseg segment IMAGE labels.zarr --table particles.csv --spacing 10 10``."""
    folder = micrograph["folder"]
    stem = request.param.replace(".", "_")
    labels, table = folder / f"{stem}_labels.zarr", folder / f"{stem}_particles.csv"
    assert main(["segment", str(folder / request.param), str(labels), "--table", str(table),
                 "--spacing", "10", "10", *MIXTURE, *FAST]) == 0
    return {"labels": labels, "table": pd.read_csv(table)}


# ---------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["image.tif", "image.png"])
def test_convert_writes_a_2d_ome_zarr(micrograph, tmp_path, capsys, name):
    output = tmp_path / "image.zarr"
    assert main(["convert", str(micrograph["folder"] / name), str(output), "--spacing", "10", "10", "-q"]) == 0
    assert "128 x 128 pixels (y, x) of uint8, spacing 10 x 10 nm (y, x)" in capsys.readouterr().out
    multiscale = zarr.open_group(str(output), mode="r").attrs["ome"]["multiscales"][0]
    assert [axis["name"] for axis in multiscale["axes"]] == ["y", "x"]
    assert {axis["unit"] for axis in multiscale["axes"]} == {"nanometer"}
    assert multiscale["datasets"][0]["coordinateTransformations"] == [{"type": "scale", "scale": [10.0, 10.0]}]
    array = zarr.open_array(str(output / "0"), mode="r")
    assert array.metadata.dimension_names == ("y", "x")
    np.testing.assert_array_equal(array[...], micrograph["image"])
    assert read_spacing(output) == (10.0, 10.0)
    image, spacing = read_image(output, keep_2d=True)
    assert image.shape == (128, 128) and spacing == (10.0, 10.0)
    # Read as a volume it is one slice, and (y, x) alone cannot give a voxel size.
    image, spacing = read_image(output)
    assert image.shape == (1, 128, 128) and spacing is None


def test_convert_png_16_bit_and_jpeg(tmp_path, capsys):
    deep = (np.arange(32 * 48, dtype=np.uint32).reshape(32, 48) * 40).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert main(["convert", str(tmp_path / "deep.png"), str(tmp_path / "deep.zarr"), "--spacing", "7.5", "7.5", "-q"]) == 0
    written = zarr.open_array(str(tmp_path / "deep.zarr" / "0"), mode="r")
    assert written.dtype == np.uint16
    np.testing.assert_array_equal(written[...], deep)
    grey = np.tile(np.arange(48, dtype=np.uint8) * 5, (32, 1))
    Image.fromarray(grey).save(tmp_path / "grey.jpg", quality=95)
    assert main(["convert", str(tmp_path / "grey.jpg"), str(tmp_path / "grey.zarr"), "--spacing", "7.5", "7.5", "-q"]) == 0
    written = zarr.open_array(str(tmp_path / "grey.zarr" / "0"), mode="r")
    assert written.shape == (32, 48) and written.dtype == np.uint8
    assert np.abs(written[...].astype(int) - grey).max() <= 8  # JPEG is lossy
    assert read_spacing(tmp_path / "grey.zarr") == (7.5, 7.5)


def test_chunks_take_one_value_per_axis(micrograph, tmp_path, capsys):
    source = str(micrograph["folder"] / "image.png")
    assert main(["convert", source, str(tmp_path / "a.zarr"), "--spacing", "10", "10", "--chunks", "64", "32", "-q"]) == 0
    assert zarr.open_array(str(tmp_path / "a.zarr" / "0"), mode="r").chunks == (64, 32)
    capsys.readouterr()
    assert main(["convert", source, str(tmp_path / "b.zarr"), "--spacing", "10", "10", "--chunks", "1", "64", "64", "-q"]) == 2
    assert "--chunks takes Y X for a 2D image" in error_line(capsys)
    assert not (tmp_path / "b.zarr").exists()


# ---------------------------------------------------------------------------
# segment: areas, not volumes
# ---------------------------------------------------------------------------


def test_segment_measures_areas_in_square_nanometres(segmented, micrograph):
    table = segmented["table"]
    assert {"pixel_count", "area", "equivalent_diameter", "centroid_y", "centroid_x"} <= set(table.columns)
    assert not {"volume", "voxel_count", "centroid_z", "bbox_z0"} & set(table.columns)
    # 10 x 10 nm pixels: 100 nm^2 each; the diameter is the circle's of that area.
    np.testing.assert_allclose(table["area"], table["pixel_count"] * 100.0)
    np.testing.assert_allclose(table["equivalent_diameter"], np.sqrt(4 * table["area"] / np.pi))
    assert abs(len(table) - micrograph["n_particles"]) <= 2
    # The particles found cover the phantom's particles, not the background.
    found = np.asarray(zarr.open_array(str(segmented["labels"] / "0"), mode="r")[...]) > 0
    overlap = (found & micrograph["mask"]).sum()
    assert overlap >= 0.8 * micrograph["mask"].sum() and overlap >= 0.8 * found.sum()


def test_segment_writes_2d_labels_measured_as_the_api_does(segmented):
    labels, spacing = read_image(segmented["labels"], keep_2d=True)
    assert labels.shape == (128, 128) and spacing == (10.0, 10.0)
    assert read_spacing(segmented["labels"]) == (10.0, 10.0)
    assert zarr.open_group(str(segmented["labels"]), mode="r").attrs["ome"]["image-label"] == {}
    expected = particle_table(np.asarray(labels[...]), spacing=(10, 10))
    pd.testing.assert_frame_equal(segmented["table"][expected.columns], expected, check_dtype=False)


def test_step_by_step_matches_segment(micrograph, tmp_path, capsys):
    folder = micrograph["folder"]
    image, model, posterior = folder / "image.tif", tmp_path / "model.npz", tmp_path / "posterior.zarr"
    labels, table = tmp_path / "labels.zarr", tmp_path / "particles.csv"
    assert main(["fit", str(image), str(model), "--spacing", "10", "10", *MIXTURE, "--n-jobs", "1", "-q"]) == 0
    assert "Fitted on 1 slice:" in capsys.readouterr().out
    assert main(["predict", str(image), str(model), str(posterior), "--spacing", "10", "10", "--n-jobs", "1", "-q"]) == 0
    assert read_spacing(posterior) == (10.0, 10.0)
    assert main(["label", str(posterior), str(labels), *FAST]) == 0
    assert main(["measure", str(labels), str(table), "--image", str(folder / "image.png"),
                 "--posterior", str(posterior), "-q"]) == 0
    assert "areas in nm^2" in capsys.readouterr().out
    steps = pd.read_csv(table)
    assert {"mean_intensity", "mean_posterior"} <= set(steps.columns) and "volume" not in steps.columns
    # The chain in one go gives the same particles.
    assert main(["segment", str(image), str(tmp_path / "once.zarr"), "--table", str(tmp_path / "once.csv"),
                 "--spacing", "10", "10", *MIXTURE, *FAST]) == 0
    once = pd.read_csv(tmp_path / "once.csv")
    pd.testing.assert_frame_equal(steps[once.columns], once)


def test_train_and_apply_a_classifier_to_2d_images(micrograph, tmp_path, capsys):
    folder = micrograph["folder"]
    model = tmp_path / "classifier.npz"
    assert main(["train", str(folder / "image.tif"), "--annotations", str(folder / "mask.png"), "-o", str(model),
                 "--spacing", "10", "10", "--max-samples", "2000", "--n-jobs", "1", "--random-state", "0"]) == 0
    assert "on 1 2D image (Y, X)" in capsys.readouterr().out
    table = tmp_path / "particles.csv"
    assert main(["segment", str(folder / "image.png"), str(tmp_path / "labels.zarr"), "--model", str(model),
                 "--table", str(table), "--spacing", "10", "10", *FAST]) == 0
    particles = pd.read_csv(table)
    assert "area" in particles.columns and "volume" not in particles.columns
    assert abs(len(particles) - micrograph["n_particles"]) <= 2
    # Z Y X is refused for 2D images here too.
    assert main(["train", str(folder / "image.tif"), "--annotations", str(folder / "mask.png"), "-o",
                 str(tmp_path / "other.npz"), "--spacing", "1", "10", "10"]) == 2
    assert "--spacing Z Y X is for volumes, but the images are 2D images" in error_line(capsys)


# ---------------------------------------------------------------------------
# refusals and warnings
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["convert", "segment"])
def test_three_spacing_values_are_refused_for_a_2d_image(micrograph, tmp_path, capsys, command):
    output = tmp_path / "out.zarr"
    assert main([command, str(micrograph["folder"] / "image.tif"), str(output),
                 "--spacing", "1", "10", "10", "-q"]) == 2
    message = error_line(capsys)
    assert "is a 2D image (Y, X)" in message and "--spacing Y X" in message
    assert not output.exists()


def test_a_2d_image_needs_its_pixel_size(micrograph, tmp_path, capsys):
    assert main(["segment", str(micrograph["folder"] / "image.png"), str(tmp_path / "out.zarr"), "-q"]) == 2
    assert "is a 2D image without a pixel size in its metadata; pass --spacing Y X" in error_line(capsys)
    assert main(["convert", str(micrograph["folder"] / "image.png"), str(tmp_path / "out.zarr"),
                 "--spacing", "10", "10", "10", "10", "-q"]) == 2
    assert "--spacing takes Z Y X for volumes or Y X for 2D images; got 4 values" in error_line(capsys)
    assert not (tmp_path / "out.zarr").exists()


def test_imagej_calibration_of_a_2d_tiff_is_its_pixel_size(tmp_path, capsys):
    plane = np.zeros((16, 24), np.uint8)
    # 0.0075 um per pixel, recorded as pixels per micrometre.
    tifffile.imwrite(tmp_path / "calibrated.tif", plane, imagej=True, resolution=(1 / 0.0075, 1 / 0.0075),
                     metadata={"unit": "um"})
    assert main(["convert", str(tmp_path / "calibrated.tif"), str(tmp_path / "out.zarr"), "-q"]) == 0
    assert read_spacing(tmp_path / "out.zarr") == pytest.approx((7.5, 7.5))


@pytest.mark.parametrize("mode, channels", [("RGB", 3), ("RGBA", 4)])
@pytest.mark.parametrize("command", ["convert", "segment"])
def test_colour_png_is_refused_with_the_recipe(tmp_path, capsys, mode, channels, command):
    colour = np.zeros((32, 32, channels), np.uint8)
    colour[8:16, 8:16] = 200
    Image.fromarray(colour).save(tmp_path / "colour.png")
    output = tmp_path / "out.zarr"
    assert main([command, str(tmp_path / "colour.png"), str(output), "--spacing", "10", "10", "-q"]) == 2
    message = error_line(capsys)
    assert f"holds {mode} colour pixels" in message and "not one greyscale channel" in message
    assert "PIL.Image.open('colour.png').convert('L').save('colour-grey.png')" in message
    assert not output.exists()


def test_connectivity_3_is_refused_before_fitting(micrograph, tmp_path, capsys):
    assert main(["segment", str(micrograph["folder"] / "image.tif"), str(tmp_path / "out.zarr"),
                 "--spacing", "10", "10", "--connectivity", "3", "-q"]) == 2
    captured = capsys.readouterr()
    assert "--connectivity 3 is for volumes" in captured.err and "Fitted" not in captured.out


def test_sub_nanometre_pixel_size_warns_of_a_unit_slip(micrograph, tmp_path, capsys):
    assert main(["convert", str(micrograph["folder"] / "image.png"), str(tmp_path / "out.zarr"),
                 "--spacing", "0.01", "0.01", "-q"]) == 0
    err = capsys.readouterr().err
    warning = "nanoseg: warning: spacing (0.01, 0.01) has a pixel size below 1 nm"
    assert warning in err and "probably micrometres" in err
    assert err.count(warning) == 1  # checked on reading and on writing, shown once
    assert read_spacing(tmp_path / "out.zarr") == (0.01, 0.01)
