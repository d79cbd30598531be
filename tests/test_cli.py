"""The ``nanoseg`` command line."""

import hashlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr

from nanoseg import NanoparticleLabeler, NanoparticleMixture
from nanoseg.__main__ import main
from nanoseg.datasets import make_phantom
from nanoseg.io import is_complete, read_image, read_spacing, write_ome_zarr
from cli_helpers import error_line

SPACING = (50.0, 10.0, 10.0)
COMMANDS = ["convert", "fit", "predict", "label", "measure", "segment", "demo"]


def _digest(path):
    """Hash of every file under `path` (or of the file itself), by relative name."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f.relative_to(path.parent)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture(scope="module")
def big_particles(tmp_path_factory):
    """A phantom whose particles are at least 3 voxels in radius along every axis.

    At 50 x 10 x 10 nm, an in-plane radius of 15-18 voxels is 3-3.6 slices.
    Few particles keep the particle fraction (about 0.5 %) in the range the
    method assumes.
    """
    image, _, truth = make_phantom(
        (24, 384, 384), n_particles=4, radius=(15, 18), cluster_fraction=0, spacing=SPACING,
        random_state=1, return_labels=True,
    )
    folder = tmp_path_factory.mktemp("data")
    slices = folder / "slices"
    slices.mkdir()
    for z in range(image.shape[0]):
        # ImageJ calibrates each slice in y and x; the z step is not recorded.
        tifffile.imwrite(slices / f"slice{z}.tif", image[z], imagej=True,
                         resolution=(100.0, 100.0), metadata={"unit": "um"})
    return folder, image, truth


@pytest.fixture(scope="module")
def segmented(big_particles):
    """TIFF folder -> convert -> segment --table, with the input hashes around it."""
    folder, image, truth = big_particles
    before = _digest(folder / "slices")
    assert main(["convert", str(folder / "slices"), str(folder / "image.zarr"), "--spacing", "50", "10", "10", "-q"]) == 0
    converted = _digest(folder / "image.zarr")
    assert main(["segment", str(folder / "image.zarr"), str(folder / "labels.zarr"),
                 "--table", str(folder / "particles.csv"), "-q"]) == 0
    return {
        "folder": folder, "image": image, "truth": truth,
        "unchanged": (before == _digest(folder / "slices"), converted == _digest(folder / "image.zarr")),
    }


# ---------------------------------------------------------------------------
# help, entry points, demo
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as excinfo:
        main([command, "--help"])
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: nanoseg {command}") and "example:" in out


def test_installed_entry_point():
    script = Path(sys.executable).parent / "nanoseg"
    if not script.exists():
        pytest.skip("the nanoseg script is not installed next to this Python")
    completed = subprocess.run([str(script), "convert", "no-such-input.tif", "out.zarr"], capture_output=True, text=True, check=False)
    assert completed.returncode == 2
    assert completed.stderr.strip() == "nanoseg convert: error: no-such-input.tif does not exist."
    completed = subprocess.run([sys.executable, "-m", "nanoseg", "--help"], capture_output=True, text=True, check=False)
    assert completed.returncode == 0
    assert all(command in completed.stdout for command in COMMANDS)


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main([])
    assert excinfo.value.code == 2
    with pytest.raises(SystemExit) as excinfo:
        main(["convert", "in.tif", "out.zarr", "--spacing", "50", "-10", "10"])
    assert excinfo.value.code == 2
    assert "must be a positive number" in capsys.readouterr().err


def test_demo_reports_what_it_found(capsys):
    assert main(["demo", "--shape", "12", "128", "128", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    found = int(re.search(r"Found (\d+) particles", out).group(1))
    truth = int(re.search(r"Phantom: .* (\d+) particles", out).group(1))
    hit = re.search(r"overlapped by a detection: (\d+) of (\d+)", out)
    dice = float(re.search(r"Voxel Dice against the ground truth: (\d\.\d+)", out).group(1))
    f1 = float(re.search(r"Object F1 against the ground truth \(IoU > 0.5\): (\d\.\d+)", out).group(1))
    assert truth == int(hit.group(2)) > 0
    assert found > 0 and int(hit.group(1)) <= truth
    # The demo phantom is one the method handles: most particles are found.
    assert int(hit.group(1)) >= truth // 2 and dice > 0.3 and 0 < f1 <= 1
    merged = re.search(r"more than one ground-truth particle: (\d+)", out)
    assert merged is None or 0 < int(merged.group(1)) <= found


def test_demo_counts_detections_that_merge_particles():
    from nanoseg.cli._segment import _detections_merging

    truth = np.zeros((1, 6, 12), dtype=np.int32)
    truth[0, 1:3, 1:3], truth[0, 1:3, 3:5], truth[0, 1:3, 8:10] = 1, 2, 3
    labels = np.zeros_like(truth, dtype=np.uint32)
    labels[0, 1:3, 1:5] = 7  # covers particles 1 and 2
    labels[0, 1:3, 8:10] = 2  # covers particle 3 alone
    labels[0, 4, 4] = 5  # covers none
    assert _detections_merging(labels, truth) == 1
    assert _detections_merging(labels, np.zeros_like(truth)) == 0
    labels[0, 2, 9] = 7  # detection 7 now touches three particles: still one detection
    assert _detections_merging(labels, truth) == 1


@pytest.mark.parametrize("compile_seconds, mentioned", [(0.0, False), (0.2, False), (7.4, True)])
def test_run_time_mentions_a_first_run_compilation(compile_seconds, mentioned):
    from types import SimpleNamespace

    from nanoseg.cli._segment import _timing_text

    text = _timing_text(SimpleNamespace(seconds=8.56, compile_seconds=compile_seconds))
    assert text.startswith("8.56 s")
    assert ("7.4 s of it compiling" in text) is mentioned


def test_demo_keeps_its_files_in_a_folder(tmp_path, capsys):
    assert main(["demo", str(tmp_path), "--shape", "8", "96", "96"]) == 0
    out = capsys.readouterr().out
    labels, spacing = read_image(tmp_path / "labels.zarr")
    truth, _ = read_image(tmp_path / "truth.zarr")
    assert spacing == SPACING == read_spacing(tmp_path / "phantom.zarr")
    assert int(np.asarray(labels).max()) == int(re.search(r"Found (\d+) particles", out).group(1))
    assert int(np.asarray(truth).max()) == int(re.search(r"Phantom: .* (\d+) particles", out).group(1))
    # Running it again replaces the demo's own files.
    assert main(["demo", str(tmp_path), "--shape", "8", "96", "96", "--seed", "2"]) == 0


# ---------------------------------------------------------------------------
# the workflow: TIFF folder -> OME-Zarr -> labels and table
# ---------------------------------------------------------------------------


def test_convert_needs_a_voxel_size(big_particles, tmp_path, capsys):
    folder, _, _ = big_particles
    assert main(["convert", str(folder / "slices"), str(tmp_path / "x.zarr"), "-q"]) == 2
    assert "--spacing Z Y X" in error_line(capsys)
    assert not (tmp_path / "x.zarr").exists()


def test_segment_round_trip_sizes_match_the_truth(segmented):
    folder, truth = segmented["folder"], segmented["truth"]
    # Every output carries the voxel size in its metadata.
    assert read_spacing(folder / "image.zarr") == SPACING
    assert read_spacing(folder / "labels.zarr") == SPACING
    assert is_complete(folder / "image.zarr") and is_complete(folder / "labels.zarr")
    labels = np.asarray(zarr.open_array(str(folder / "labels.zarr" / "0"), mode="r")[...])
    table = pd.read_csv(folder / "particles.csv")

    # The table describes the written labels, in nanometres.
    counts = np.bincount(labels.ravel())
    assert table["label"].tolist() == list(range(1, labels.max() + 1))
    np.testing.assert_array_equal(table["voxel_count"], counts[1:])
    np.testing.assert_allclose(table["volume"], counts[1:] * np.prod(SPACING))
    np.testing.assert_allclose(table["equivalent_diameter"], np.cbrt(6 * table["volume"] / np.pi))

    # Each true particle is found once, with its size within 10 %.
    true_counts = np.bincount(truth.ravel())
    for particle in range(1, truth.max() + 1):
        inside = labels[truth == particle]
        found = np.bincount(inside).argmax()
        assert found > 0, f"particle {particle} was missed"
        assert set(np.unique(truth[labels == found])) <= {0, particle}
        row = table.set_index("label").loc[found]
        assert row["voxel_count"] == pytest.approx(true_counts[particle], rel=0.10)
        true_diameter = np.cbrt(6 * true_counts[particle] * np.prod(SPACING) / np.pi)
        assert row["equivalent_diameter"] == pytest.approx(true_diameter, rel=0.10)
        true_centroid = np.argwhere(truth == particle).mean(axis=0) * SPACING
        found_centroid = row[["centroid_z", "centroid_y", "centroid_x"]].to_numpy(float)
        assert np.all(np.abs(found_centroid - true_centroid) < SPACING)


def test_segment_never_modifies_its_input(segmented):
    assert segmented["unchanged"] == (True, True)


def test_segment_records_provenance(segmented):
    with open(segmented["folder"] / "labels.zarr" / "zarr.json") as handle:
        attrs = json.load(handle)["attributes"]
    assert "image-label" in attrs["ome"]
    assert attrs["nanoseg"]["complete"] is True and attrs["nanoseg"]["command"] == "segment"
    assert attrs["nanoseg"]["labeler"]["threshold"] == NanoparticleLabeler().threshold


def test_measure_with_image_and_posterior(segmented, tmp_path, capsys):
    folder, image = segmented["folder"], segmented["image"]
    mixture = NanoparticleMixture().fit(image)
    write_ome_zarr(tmp_path / "posterior.zarr", mixture.predict_proba(image), spacing=SPACING, progress=False)
    table_path = tmp_path / "table.parquet"
    assert main(["measure", str(folder / "labels.zarr"), str(table_path), "--image", str(folder / "image.zarr"),
                 "--posterior", str(tmp_path / "posterior.zarr"), "-q"]) == 0
    assert re.search(r"Measured \d+ particles", capsys.readouterr().out)
    table = pd.read_parquet(table_path)
    labels = np.asarray(zarr.open_array(str(folder / "labels.zarr" / "0"))[...])
    posterior = mixture.predict_proba(image)
    for _, row in table.iterrows():
        inside = labels == row["label"]
        assert row["mean_intensity"] == pytest.approx(image[inside].mean())
        assert row["max_posterior"] == pytest.approx(posterior[inside].max())
    # The table exists now: writing it again needs --overwrite.
    assert main(["measure", str(folder / "labels.zarr"), str(table_path), "-q"]) == 2
    assert "--overwrite" in error_line(capsys)


def test_label_matches_the_estimator(tmp_path, capsys):
    image, _ = make_phantom((8, 96, 96), n_particles=12, random_state=5)
    posterior = NanoparticleMixture().fit(image).predict_proba(image)
    write_ome_zarr(tmp_path / "posterior.zarr", posterior, spacing=SPACING, progress=False)
    assert main(["label", str(tmp_path / "posterior.zarr"), str(tmp_path / "labels.zarr"),
                 "--threshold", "0.9", "--min-size", "3", "--connectivity", "1", "-q"]) == 0
    expected = NanoparticleLabeler(threshold=0.9, min_size=3, connectivity=1).transform(posterior)
    labels, spacing = read_image(tmp_path / "labels.zarr")
    np.testing.assert_array_equal(labels[...], expected)
    assert spacing == SPACING
    assert f"Wrote {expected.max()} particles" in capsys.readouterr().out
    # A raw image is not a posterior.
    write_ome_zarr(tmp_path / "image.zarr", image, spacing=SPACING, progress=False)
    assert main(["label", str(tmp_path / "image.zarr"), str(tmp_path / "l2.zarr"), "-q"]) == 2
    assert "posterior probability map" in error_line(capsys)
    assert not (tmp_path / "l2.zarr").exists()


def test_fit_predict_chain_equals_segment(segmented, tmp_path, capsys):
    pytest.importorskip("nanoseg.persistence")
    folder = segmented["folder"]
    model = tmp_path / "model.npz"
    assert main(["fit", str(folder / "image.zarr"), str(model), "-q"]) == 0
    assert "Saved the model" in capsys.readouterr().out
    assert main(["predict", str(folder / "image.zarr"), str(model), str(tmp_path / "posterior.zarr"), "-q"]) == 0
    assert main(["label", str(tmp_path / "posterior.zarr"), str(tmp_path / "labels.zarr"), "-q"]) == 0
    assert read_spacing(tmp_path / "posterior.zarr") == SPACING == read_spacing(tmp_path / "labels.zarr")
    posterior, _ = read_image(tmp_path / "posterior.zarr")
    expected = NanoparticleMixture().fit(segmented["image"]).predict_proba(segmented["image"])
    np.testing.assert_array_equal(posterior[...], expected)
    chained = zarr.open_array(str(tmp_path / "labels.zarr" / "0"))[...]
    np.testing.assert_array_equal(chained, zarr.open_array(str(folder / "labels.zarr" / "0"))[...])
    # A saved model replaces fitting in segment.
    assert main(["segment", str(folder / "image.zarr"), str(tmp_path / "again.zarr"), "--model", str(model), "-q"]) == 0
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "again.zarr" / "0"))[...], chained)
    # float16 posterior.
    assert main(["predict", str(folder / "image.zarr"), str(model), str(tmp_path / "p16.zarr"), "--dtype", "float16", "-q"]) == 0
    assert read_image(tmp_path / "p16.zarr")[0].dtype == np.float16
    # Fit-only options make no sense with a saved model.
    assert main(["segment", str(folder / "image.zarr"), str(tmp_path / "x.zarr"), "--model", str(model),
                 "--sampling-step", "2", "-q"]) == 2
    assert "--sampling-step acts only while fitting" in error_line(capsys)


# ---------------------------------------------------------------------------
# bad inputs and outputs
# ---------------------------------------------------------------------------


@pytest.fixture
def small_image(tmp_path):
    image, _ = make_phantom((6, 64, 64), n_particles=6, random_state=2)
    write_ome_zarr(tmp_path / "image.zarr", image, spacing=SPACING, progress=False)
    return tmp_path / "image.zarr"


def test_segment_refuses_bad_outputs_before_computing(small_image, capsys):
    folder = small_image.parent
    (folder / "labels.zarr").mkdir()
    (folder / "labels.zarr" / "zarr.json").write_text("{}")
    before = _digest(folder / "labels.zarr")
    cases = [
        (["segment", str(small_image), str(folder / "labels.zarr")], "already exists; pass --overwrite"),
        (["segment", str(small_image), str(small_image / "out.zarr")], "lies inside the input"),
        (["segment", str(small_image), str(folder / "new.zarr"), "--table", str(folder / "t.xlsx")], "must end in .csv or .parquet"),
        (["segment", str(folder / "missing.zarr"), str(folder / "new.zarr")], "missing.zarr does not exist"),
        (["segment", str(small_image), str(folder / "new.zarr"), "--table", str(folder / "no" / "t.csv")],
         "does not exist; create it first"),
        (["segment", str(small_image), str(folder / "new.zarr"), "--threshold", "1.5"], "'threshold' parameter"),
    ]
    for argv, message in cases:
        assert main([*argv, "-q"]) == 2, argv
        assert message in error_line(capsys)
    assert not (folder / "new.zarr").exists()
    assert _digest(folder / "labels.zarr") == before


def test_segment_rejects_images_that_are_not_uint8_or_uint16(tmp_path, capsys):
    write_ome_zarr(tmp_path / "signed.zarr", np.zeros((2, 16, 16), np.int16), spacing=SPACING, progress=False)
    assert main(["segment", str(tmp_path / "signed.zarr"), str(tmp_path / "labels.zarr"), "-q"]) == 2
    assert "uint8 or uint16" in error_line(capsys)


def test_incomplete_inputs_are_refused(small_image, capsys):
    group = zarr.open_group(str(small_image), mode="r+")
    group.attrs["nanoseg"] = {"complete": False}
    assert main(["segment", str(small_image), str(small_image.parent / "labels.zarr"), "-q"]) == 2
    assert "not written completely" in error_line(capsys)


def test_tiff_input_without_spacing(tmp_path, capsys):
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((3, 16, 16), np.uint8), photometric="minisblack")
    assert main(["segment", str(tmp_path / "stack.tif"), str(tmp_path / "labels.zarr"), "-q"]) == 2
    assert "has no voxel size in its metadata; pass --spacing Z Y X" in error_line(capsys)


def test_warnings_are_one_line(small_image, capsys):
    out = small_image.parent / "labels.zarr"
    assert main(["segment", str(small_image), str(out), "--max-iter", "1", "-q"]) == 0
    err = capsys.readouterr().err
    assert "nanoseg: warning: EM did not converge within max_iter=1" in err and "Traceback" not in err


def test_cuda_without_a_gpu(small_image, capsys):
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed: --device cuda may work here")
    assert main(["segment", str(small_image), str(small_image.parent / "labels.zarr"), "--device", "cuda", "-q"]) in (1, 2)
    assert re.search(r"cuda|CuPy|GPU|CPU only", error_line(capsys))


@pytest.mark.parametrize(
    "shape, expected",
    [
        # Small images: used whole.
        ((10, 96, 112), (slice(0, 10), slice(0, 96), slice(0, 112))),
        ((96, 112), (slice(0, 96), slice(0, 112))),
        # Deep stacks: the 32 central slices.
        ((100, 64, 64), (slice(34, 66), slice(0, 64), slice(0, 64))),
        # Large planes: a central window of about 32 Mi voxels in all.
        ((128, 2048, 2048), (slice(48, 80), slice(512, 1536), slice(512, 1536))),
        ((8, 4096, 3000), (slice(0, 8), slice(1024, 3072), slice(476, 2524))),
        # Planes so large that 32 of them would be read: fewer slices.
        ((64, 8192, 8192), (slice(30, 34), slice(2648, 5544), slice(2648, 5544))),
        ((20000, 300), (slice(7104, 12896), slice(0, 300))),
    ],
)
def test_sensitivity_sample(shape, expected):
    from nanoseg.cli import _segment

    sample = _segment.sensitivity_sample(shape)
    assert sample == expected
    assert np.prod([s.stop - s.start for s in sample]) <= _segment.SENSITIVITY_VOXELS


def test_report(segmented, tmp_path):
    pytest.importorskip("matplotlib")
    folder = segmented["folder"]
    report = tmp_path / "report"
    assert main(["segment", str(folder / "image.zarr"), str(tmp_path / "labels.zarr"), "--report", str(report), "-q"]) == 0
    assert (report / "index.html").exists() and (report / "overlay.png").exists()
    # An existing report is kept unless --overwrite.
    assert main(["segment", str(folder / "image.zarr"), str(tmp_path / "l2.zarr"), "--report", str(report), "-q"]) == 2
    assert not (tmp_path / "l2.zarr").exists()


def test_scheduler(small_image, capsys):
    distributed = pytest.importorskip("distributed")
    folder = small_image.parent
    assert main(["segment", str(small_image), str(folder / "local.zarr"), "-q"]) == 0
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        assert main(["segment", str(small_image), str(folder / "remote.zarr"), "--scheduler", cluster.scheduler_address, "-q"]) == 0
    np.testing.assert_array_equal(
        zarr.open_array(str(folder / "remote.zarr" / "0"))[...], zarr.open_array(str(folder / "local.zarr" / "0"))[...]
    )
    capsys.readouterr()
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        assert main(["segment", str(small_image), str(folder / "x.zarr"), "--scheduler", "tcp://127.0.0.1:1", "-q"]) == 1
    assert "could not connect to the dask scheduler" in error_line(capsys)


def test_segment_that_finds_nothing_says_what_to_try(small_image, capsys):
    out = small_image.parent / "none.zarr"
    assert main(["segment", str(small_image), str(out), "--min-size", "100000", "-q"]) == 0
    captured = capsys.readouterr()
    assert "Found 0 particles" in captured.out
    assert "No particle was found (threshold" in captured.err and "minimum size 100000 voxels" in captured.err
    assert "--report DIR" in captured.err
    assert int(np.asarray(zarr.open_group(str(out), mode="r")["0"]).max()) == 0
