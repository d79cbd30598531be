"""Tests for nanoseg.measure: the per-particle table and its writer."""

import os
import sys
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import zarr
from scipy import ndimage as ndi
from skimage.measure import label as sk_label
from skimage.measure import regionprops_table

from nanoseg import measure
from nanoseg.measure import particle_table, write_table

SPACING_3D = (50.0, 10.0, 7.0)
SPACING_2D = (10.0, 7.0)


def shared_data():
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    return Path(os.environ.get("NANOSEG_SHARED_DATA", default))


def random_labels(shape, seed, *, threshold=0.7, scramble=True):
    """Blobs of smoothed noise, labelled; ids shuffled and spread out when `scramble`.

    Shuffled, non-consecutive ids make sure nothing relies on raster-ordered
    or sequential labels.
    """
    rng = np.random.default_rng(seed)
    noise = ndi.gaussian_filter(rng.random(shape), 1.2)
    mask = noise > np.quantile(noise, threshold)
    labels = sk_label(mask, connectivity=1).astype(np.int64)
    if scramble:
        n = int(labels.max())
        ids = np.concatenate([[0], 3 * rng.permutation(n) + 5])
        labels = ids[labels]
    return labels.astype(np.uint32)


def reference(labels, spacing, intensity=None, posterior=None):
    """The same measures, computed by scikit-image on the whole array."""
    ndim = labels.ndim
    axes = "zyx"[-ndim:]
    props = regionprops_table(
        labels, spacing=spacing, properties=("label", "num_pixels", "area", "centroid", "bbox")
    )
    expected = {
        "label": props["label"],
        "voxel_count" if ndim == 3 else "pixel_count": props["num_pixels"],
        "volume" if ndim == 3 else "area": props["area"],
    }
    for i, axis in enumerate(axes):
        expected[f"centroid_{axis}"] = props[f"centroid-{i}"]
        expected[f"bbox_{axis}0"] = props[f"bbox-{i}"]
        expected[f"bbox_{axis}1"] = props[f"bbox-{i + ndim}"]
    for name, image in (("intensity", intensity), ("posterior", posterior)):
        if image is not None:
            # float64, so that float32 images are averaged as precisely as particle_table does.
            stats = regionprops_table(labels, intensity_image=np.asarray(image, dtype=np.float64), properties=("intensity_mean", "intensity_max"))
            expected[f"mean_{name}"] = stats["intensity_mean"]
            expected[f"max_{name}"] = stats["intensity_max"]
    return expected


def assert_matches(table, expected):
    assert len(table) == len(expected["label"])
    for name, values in expected.items():
        np.testing.assert_allclose(table[name].to_numpy(dtype=float), values, rtol=1e-10, err_msg=name)


# ---------------------------------------------------------------------------
# hand-computed cases
# ---------------------------------------------------------------------------


def test_tiny_3d_by_hand():
    labels = np.zeros((3, 4, 5), dtype=np.uint16)
    labels[0, 1, 1] = 2  # one voxel
    labels[1:3, 2, 3:5] = 7  # 2 planes x 1 row x 2 columns
    intensity = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    posterior = np.full((3, 4, 5), 0.5, dtype=np.float32)
    posterior[2, 2, 4] = 1.0
    table = particle_table(labels, spacing=(5.0, 2.0, 1.0), posterior=posterior, intensity=intensity)
    assert list(table["label"]) == [2, 7]
    assert list(table["voxel_count"]) == [1, 4]
    np.testing.assert_allclose(table["volume"], [10.0, 40.0])
    np.testing.assert_allclose(table["equivalent_diameter"], [(6 * 10 / np.pi) ** (1 / 3), (6 * 40 / np.pi) ** (1 / 3)])
    # Label 7 sits at z in {1, 2}, y = 2, x in {3, 4}: mean (1.5, 2, 3.5) voxels.
    np.testing.assert_allclose(table[["centroid_z", "centroid_y", "centroid_x"]].to_numpy(), [[0, 2, 1], [7.5, 4, 3.5]])
    bbox = ["bbox_z0", "bbox_y0", "bbox_x0", "bbox_z1", "bbox_y1", "bbox_x1"]
    assert table[bbox].to_numpy().tolist() == [[0, 1, 1, 1, 2, 2], [1, 2, 3, 3, 3, 5]]
    # Intensities are the flat indices: label 7 covers 33, 34, 53, 54.
    np.testing.assert_allclose(table["mean_intensity"], [6.0, (33 + 34 + 53 + 54) / 4])
    assert table["max_intensity"].tolist() == [6, 54]
    assert table["max_intensity"].dtype == np.uint8
    np.testing.assert_allclose(table["mean_posterior"], [0.5, 0.625])
    np.testing.assert_allclose(table["max_posterior"], [0.5, 1.0])


def test_tiny_2d_by_hand():
    labels = np.array([[0, 1, 1, 0], [0, 1, 0, 3], [0, 0, 0, 3]], dtype=np.int32)
    table = particle_table(labels, spacing=(2.0, 3.0))
    assert list(table.columns) == [
        "label", "pixel_count", "area", "equivalent_diameter", "centroid_y", "centroid_x",
        "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1",
    ]
    assert list(table["pixel_count"]) == [3, 2]
    np.testing.assert_allclose(table["area"], [18.0, 12.0])
    np.testing.assert_allclose(table["equivalent_diameter"], np.sqrt(4 * np.array([18.0, 12.0]) / np.pi))
    # Label 1: rows (0, 0, 1), columns (1, 2, 1); label 3: rows (1, 2), column 3.
    np.testing.assert_allclose(table["centroid_y"], [1.0 / 3 * 2.0, 1.5 * 2.0])
    np.testing.assert_allclose(table["centroid_x"], [4.0 / 3 * 3.0, 3 * 3.0])
    assert table[["bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1"]].to_numpy().tolist() == [[0, 1, 2, 3], [1, 3, 3, 4]]


def test_default_spacing_counts_voxels():
    labels = np.zeros((2, 3, 3), dtype=np.uint8)
    labels[:, 1, 1] = 1
    table = particle_table(labels)
    assert table.loc[0, "volume"] == 2.0
    assert table.loc[0, "centroid_z"] == 0.5


def test_no_particles_gives_empty_table_with_columns():
    table = particle_table(np.zeros((3, 4, 4), dtype=np.uint32), posterior=np.zeros((3, 4, 4), np.float32))
    assert len(table) == 0
    assert "voxel_count" in table.columns and "max_posterior" in table.columns
    assert table["label"].dtype == np.int64
    assert table["max_posterior"].dtype == np.float32


# ---------------------------------------------------------------------------
# against scikit-image, in and out of core
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_3d_numpy_matches_regionprops(seed):
    labels = random_labels((9, 30, 26), seed)
    rng = np.random.default_rng(seed + 10)
    intensity = rng.integers(0, 256, labels.shape, dtype=np.uint8)
    posterior = rng.random(labels.shape, dtype=np.float32)
    table = particle_table(labels, spacing=SPACING_3D, intensity=intensity, posterior=posterior)
    assert_matches(table, reference(labels, SPACING_3D, intensity=intensity, posterior=posterior))
    volume = table["volume"].to_numpy()
    np.testing.assert_allclose(table["equivalent_diameter"], (6 * volume / np.pi) ** (1 / 3))


def test_2d_numpy_matches_regionprops():
    labels = random_labels((40, 50), 3)
    intensity = np.random.default_rng(3).normal(100, 20, labels.shape)
    table = particle_table(labels, spacing=SPACING_2D, intensity=intensity)
    assert_matches(table, reference(labels, SPACING_2D, intensity=intensity))


def test_zarr_small_chunks_matches_regionprops(small_slabs):
    # 2-plane chunks and a tiny budget: particles span several slabs.
    labels = random_labels((12, 24, 20), 4, threshold=0.85)
    assert sum(np.ptp(np.nonzero(labels == i)[0]) >= 2 for i in np.unique(labels)[1:]) > 3
    intensity = np.random.default_rng(4).integers(0, 256, labels.shape, dtype=np.uint8)
    small_slabs(1)
    stored = zarr.create_array(store={}, shape=labels.shape, chunks=(2, 8, 8), dtype=labels.dtype)
    stored[...] = labels
    image = zarr.create_array(store={}, shape=labels.shape, chunks=(3, 24, 20), dtype=np.uint8)
    image[...] = intensity
    table = particle_table(stored, spacing=SPACING_3D, intensity=image)
    assert_matches(table, reference(labels, SPACING_3D, intensity=intensity))


@pytest.mark.filterwarnings("ignore:The memory budget leaves:UserWarning")  # tiny budgets on purpose
def test_dask_labels_and_posterior_match_regionprops():
    labels = random_labels((10, 20, 22), 5, threshold=0.6)
    posterior = np.random.default_rng(5).random(labels.shape).astype(np.float32)
    table = particle_table(
        da.from_array(labels, chunks=(3, 10, 11)),
        spacing=SPACING_3D,
        posterior=da.from_array(posterior, chunks=(5, 20, 22)),
        memory_budget=20 * 22 * 8 * 3,
    )
    assert_matches(table, reference(labels, SPACING_3D, posterior=posterior))


def test_2d_zarr_and_dask_match_numpy():
    labels = random_labels((30, 40), 6)
    expected = particle_table(labels, spacing=SPACING_2D)
    stored = zarr.create_array(store={}, shape=labels.shape, chunks=(8, 8), dtype=labels.dtype)
    stored[...] = labels
    pd.testing.assert_frame_equal(particle_table(stored, spacing=SPACING_2D), expected)
    pd.testing.assert_frame_equal(particle_table(da.from_array(labels, chunks=7), spacing=SPACING_2D), expected)


@pytest.mark.filterwarnings("ignore:The memory budget leaves:UserWarning")  # tiny budgets on purpose
def test_slab_size_and_merging_do_not_change_the_table(monkeypatch):
    labels = random_labels((16, 20, 20), 7, threshold=0.55)
    intensity = np.random.default_rng(7).random(labels.shape)
    whole = particle_table(labels, spacing=SPACING_3D, intensity=intensity)
    # One plane per slab, and partials merged after every slab.
    monkeypatch.setattr(measure, "_MIN_MERGE_ROWS", 1)
    sliced = particle_table(labels, spacing=SPACING_3D, intensity=intensity, memory_budget=1)
    pd.testing.assert_frame_equal(sliced, whole, rtol=1e-12)


def test_signed_and_small_dtypes():
    labels = random_labels((5, 16, 16), 8, scramble=False)
    assert labels.max() < 128
    expected = particle_table(labels)
    for dtype in (np.int8, np.uint8, np.int16, np.int64, np.uint64):
        pd.testing.assert_frame_equal(particle_table(labels.astype(dtype)), expected)


def test_pipeline_output_on_phantom_matches_regionprops():
    from nanoseg import NanoparticleLabeler, NanoparticleMixture
    from nanoseg.datasets import make_phantom

    image, _ = make_phantom((8, 64, 64), n_particles=12, random_state=2)
    posterior = NanoparticleMixture().fit_transform(image)
    labels = NanoparticleLabeler(min_size=2).transform(posterior)
    assert labels.max() > 3
    table = particle_table(labels, spacing=(50.0, 10.0, 10.0), posterior=posterior, intensity=image)
    assert_matches(table, reference(labels, (50.0, 10.0, 10.0), intensity=image, posterior=posterior))
    assert (table["max_posterior"] >= 0.95).all()


# ---------------------------------------------------------------------------
# physical sizes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("radius", [3, 5, 8])
def test_equivalent_diameter_of_a_digital_ball(radius):
    grid = np.indices((2 * radius + 3,) * 3) - (radius + 1)
    labels = ((grid**2).sum(axis=0) <= radius**2).astype(np.uint8)
    table = particle_table(labels, spacing=(4.0, 4.0, 4.0))
    assert table.loc[0, "equivalent_diameter"] == pytest.approx(2 * radius * 4.0, rel=0.04)
    np.testing.assert_allclose(table.loc[0, ["centroid_z", "centroid_y", "centroid_x"]], [(radius + 1) * 4.0] * 3)


def test_equivalent_diameter_of_a_sphere_on_anisotropic_voxels():
    # A sphere of 200 nm radius sampled at 50 x 10 x 10 nm: 4 voxels in z, 20 in y and x.
    spacing = (50.0, 10.0, 10.0)
    z, y, x = (np.indices((11, 45, 45)) - np.array([5, 22, 22])[:, None, None, None]) * np.array(spacing)[:, None, None, None]
    labels = (z**2 + y**2 + x**2 <= 200.0**2).astype(np.uint32)
    table = particle_table(labels, spacing=spacing)
    assert table.loc[0, "equivalent_diameter"] == pytest.approx(400.0, rel=0.04)
    assert table.loc[0, "volume"] == pytest.approx(4 / 3 * np.pi * 200.0**3, rel=0.1)


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (np.zeros((3, 4, 4), dtype=float), "integer particle ids.*Label a boolean mask"),
        (np.zeros((3, 4, 4), dtype=bool), "integer particle ids.*Label a boolean mask"),
        (np.zeros((3, 4), dtype="U1"), "integer particle ids"),
    ],
)
def test_non_integer_labels_are_refused(labels, match):
    with pytest.raises(TypeError, match=match):
        particle_table(labels)


def test_list_of_crops_is_refused_with_a_hint():
    with pytest.raises(TypeError, match="pandas.concat"):
        particle_table([np.zeros((3, 3), np.uint8)])


@pytest.mark.filterwarnings("ignore:The memory budget leaves:UserWarning")  # tiny budgets on purpose
def test_negative_labels_are_refused_in_and_out_of_core():
    labels = np.zeros((6, 4, 4), dtype=np.int32)
    labels[4, 1, 1] = -3
    with pytest.raises(ValueError, match="non-negative.*-3"):
        particle_table(labels)
    with pytest.raises(ValueError, match="non-negative.*planes 4-5"):
        particle_table(da.from_array(labels, chunks=2), memory_budget=1)


@pytest.mark.parametrize("name", ["posterior", "intensity"])
def test_companion_shape_must_match(name):
    labels = np.zeros((3, 4, 4), dtype=np.uint32)
    with pytest.raises(ValueError, match=rf"{name} has shape \(3, 4, 5\) but labels has shape \(3, 4, 4\)"):
        particle_table(labels, **{name: np.zeros((3, 4, 5), np.float32)})
    with pytest.raises(TypeError, match=f"{name} must hold real numbers"):
        particle_table(labels, **{name: np.zeros((3, 4, 4), complex)})


def test_nan_inside_a_particle_is_refused():
    labels = np.zeros((3, 4, 4), dtype=np.uint32)
    labels[1, 1, 1] = 1
    posterior = np.zeros((3, 4, 4), np.float32)
    posterior[0, 0, 0] = np.nan  # outside particles: ignored
    assert particle_table(labels, posterior=posterior).loc[0, "mean_posterior"] == 0.0
    posterior[1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="posterior has NaN.*nan_to_num"):
        particle_table(labels, posterior=posterior)


@pytest.mark.parametrize(
    "spacing", [(1.0, 1.0), (1.0, 1.0, 1.0, 1.0), (0.0, 1.0, 1.0), (-1.0, 1.0, 1.0), (np.nan, 1, 1), (np.inf, 1, 1), "abc", 5.0, (True, 1, 1)]
)
def test_bad_spacing_is_refused(spacing):
    with pytest.raises(ValueError, match=r"spacing must give the voxel size along each of the 3 axes \(z, y, x\)"):
        particle_table(np.zeros((2, 3, 3), np.uint8), spacing=spacing)


def test_2d_needs_two_spacings():
    with pytest.raises(ValueError, match=r"2 axes \(y, x\)"):
        particle_table(np.zeros((3, 3), np.uint8), spacing=(1.0, 1.0, 1.0))


def test_bad_dimensionality_and_budget():
    with pytest.raises(ValueError, match="2D image .* or a 3D volume"):
        particle_table(np.zeros((2, 2, 2, 2), np.uint8))
    with pytest.raises(ValueError, match="memory_budget"):
        particle_table(np.zeros((2, 2), np.uint8), memory_budget="lots")


# ---------------------------------------------------------------------------
# write_table
# ---------------------------------------------------------------------------


def table_for_writing():
    labels = random_labels((4, 12, 12), 9)
    return particle_table(labels, spacing=SPACING_3D, intensity=labels.astype(np.uint8))


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_write_table_round_trips(tmp_path, suffix):
    table = table_for_writing()
    path = write_table(table, tmp_path / f"particles{suffix}")
    assert path == tmp_path / f"particles{suffix}"
    back = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
    pd.testing.assert_frame_equal(back, table, check_dtype=suffix == ".parquet")


def test_write_table_refuses_to_overwrite(tmp_path):
    table = table_for_writing()
    path = tmp_path / "particles.csv"
    path.write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_table(table, path)
    assert path.read_text() == "keep me"
    write_table(table, str(path), overwrite=True)
    assert len(pd.read_csv(path)) == len(table)


def test_write_table_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"\.csv or \.parquet"):
        write_table(table_for_writing(), tmp_path / "particles.xlsx")


def test_write_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ImportError, match=r"nanoseg\[parquet\]"):
        write_table(table_for_writing(), tmp_path / "particles.parquet")
    assert not (tmp_path / "particles.parquet").exists()


# ---------------------------------------------------------------------------
# real data and docstrings
# ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:The memory budget leaves:UserWarning")  # tiny budgets on purpose
def test_real_anisotropic_nuclei_match_regionprops():
    folder = shared_data() / "nuclei3d"
    if not (folder / "nuclei_label.tif").exists():
        pytest.skip("shared nuclei3d data not available")
    tifffile = pytest.importorskip("tifffile")
    labels = tifffile.imread(folder / "nuclei_label.tif")
    image = tifffile.imread(folder / "nuclei.tif")
    spacing = (0.29, 0.26, 0.26)
    stored = zarr.create_array(store={}, shape=labels.shape, chunks=(8, 256, 256), dtype=labels.dtype)
    stored[...] = labels
    table = particle_table(stored, spacing=spacing, intensity=image, memory_budget="2MiB")
    assert_matches(table, reference(labels, spacing, intensity=image))


@pytest.mark.filterwarnings("ignore:The memory budget leaves:UserWarning")  # tiny budgets on purpose
def test_progress_bar_counts_planes(capsys):
    labels = random_labels((6, 10, 10), 11)
    table = particle_table(labels, progress=True, memory_budget=1)
    assert "Measuring" in capsys.readouterr().err
    pd.testing.assert_frame_equal(table, particle_table(labels))


@pytest.mark.parametrize("chunks", [(2, 8, 8), (3, 7, 9), (12, 24, 20)])
@pytest.mark.parametrize("zarr_format", [2, 3])
def test_local_zarr_labels_are_searched_chunk_by_chunk(tmp_path, small_slabs, monkeypatch, chunks, zarr_format):
    """Stored labels in a local zarr are read from their chunk files alone
    (missing ones skipped), with the same table."""
    labels = random_labels((12, 24, 20), 5, threshold=0.85)
    labels[:, :, 10:] = 0  # whole chunks of background, never stored
    intensity = np.random.default_rng(5).integers(0, 256, labels.shape, dtype=np.uint8)
    posterior = np.random.default_rng(6).random(labels.shape).astype(np.float32)
    small_slabs(1)
    stored = zarr.create_array(store=str(tmp_path / "labels.zarr"), shape=labels.shape, chunks=chunks,
                               dtype=labels.dtype, fill_value=0, zarr_format=zarr_format,
                               config={"write_empty_chunks": False})
    stored[...] = labels
    dense = []
    monkeypatch.setattr(measure, "_reduce_slab", lambda *a, **k: dense.append(1))
    for companions in ({}, {"intensity": intensity, "posterior": posterior}):
        table = particle_table(stored, spacing=SPACING_3D, **companions)
        assert_matches(table, reference(labels, SPACING_3D, **companions))
    assert not dense


def test_negative_labels_in_a_local_zarr_are_refused(tmp_path):
    labels = np.zeros((6, 4, 4), dtype=np.int32)
    labels[4, 1, 1] = -3
    stored = zarr.create_array(store=str(tmp_path / "labels.zarr"), shape=labels.shape, chunks=(2, 4, 4),
                               dtype=labels.dtype, fill_value=0)
    stored[...] = labels
    with pytest.raises(ValueError, match="non-negative.*-3"):
        particle_table(stored)
