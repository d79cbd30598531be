"""``nanoseg train``, and ``segment``/``predict`` with a trained NanoparticleClassifier."""

import contextlib
import hashlib
import io
import json
import re

import joblib
import numpy as np
import pytest
import tifffile
import zarr
from skimage.measure import label as connected

from nanoseg import NanoparticleClassifier, NanoparticleLabeler, persistence
from nanoseg.__main__ import main
from nanoseg.datasets import make_phantom
from nanoseg.io import read_image
from cli_helpers import error_line

SPACING = (50.0, 10.0, 10.0)
# Small and fast: few training voxels, one thread, a fixed seed.
FAST = ["--max-samples", "4000", "--n-jobs", "1", "--random-state", "0"]


def _write_volume(path, image):
    """An ImageJ TIFF that records the voxel size (50 x 10 x 10 nm)."""
    tifffile.imwrite(path, image, imagej=True, resolution=(100.0, 100.0),
                     metadata={"axes": "ZYX", "spacing": 0.05, "unit": "um"})


def _load(path):
    return joblib.load(path) if str(path).endswith(".joblib") else persistence.load(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A phantom, its two halves as annotated TIFF crops, and the whole image as TIFF."""
    folder = tmp_path_factory.mktemp("train")
    image, mask = make_phantom((8, 64, 64), n_particles=10, random_state=0)
    halves = (slice(None), slice(0, 32)), (slice(None), slice(32, 64))
    crops, masks = [], []
    for i, half in enumerate(halves):
        crops.append(folder / f"crop{i}.tif")
        masks.append(folder / f"mask{i}.tif")
        _write_volume(crops[-1], image[half])
        tifffile.imwrite(masks[-1], mask[half])
    _write_volume(folder / "image.tif", image)
    return {"folder": folder, "image": image, "mask": mask, "crops": crops, "masks": masks, "halves": halves}


def _train_argv(data, output, *extra):
    return ["train", *map(str, data["crops"]), "--annotations", *map(str, data["masks"]),
            "-o", str(output), *FAST, *extra]


@pytest.fixture(scope="module", params=["npz", "joblib"])
def trained(request, data, tmp_path_factory):
    """``nanoseg train`` run once per model format; its model file and printed summary."""
    model = tmp_path_factory.mktemp("model") / f"model.{request.param}"
    # capsys is per test: capture this module-wide run's output by hand.
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(_train_argv(data, model))
    assert status == 0, err.getvalue()
    return model, out.getvalue()


def test_train_saves_a_classifier_that_predicts_the_full_image(data, trained):
    path, summary = trained
    model = _load(path)
    assert isinstance(model, NanoparticleClassifier)
    # The voxel size came from the crops' metadata.
    assert tuple(model.spacing) == SPACING and model.n_dims_ == 3
    # The model is the one the Python API trains with the same options.
    image, mask = data["image"], data["mask"]
    expected = NanoparticleClassifier(spacing=SPACING, max_samples=4000, n_jobs=1, random_state=0).fit(
        [image[h] for h in data["halves"]], [mask[h] for h in data["halves"]]
    )
    probability = model.predict_proba(image)
    assert probability.shape == image.shape and probability.dtype == np.float32
    np.testing.assert_array_equal(probability, expected.predict_proba(image))
    assert probability[mask].mean() > 0.8 and probability[~mask].mean() < 0.05
    # The summary reports the classes, the gate and the training voxels.
    assert "Classes: 0 background, 1 particle." in summary
    counts = re.search(r"Training voxels per class: background (\d+), particle (\d+)\.", summary)
    assert [int(c) for c in counts.groups()] == model.n_samples_per_class_.tolist()
    gate = re.search(r"Gate: recall ([\d.]+) % .*, fraction ([\d.]+) % ", summary)
    assert float(gate.group(1)) == pytest.approx(100 * model.gate_recall_, abs=0.06)
    assert float(gate.group(2)) == pytest.approx(100 * model.gate_fraction_, abs=0.06)
    assert f"Saved the model to {path}." in summary


def test_segment_with_a_classifier_finds_the_particles(data, trained, tmp_path, capsys):
    path, _ = trained
    labels_path = tmp_path / "labels.zarr"
    assert main(["segment", str(data["folder"] / "image.tif"), str(labels_path), "--model", str(path),
                 "--min-size", "2", "--table", str(tmp_path / "particles.csv"), "-q"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "Fitted on" not in out  # nothing was fitted
    labels, spacing = read_image(labels_path)
    labels = np.asarray(labels[...])
    assert spacing == SPACING
    truth = int(connected(data["mask"]).max())
    found = int(labels.max())
    assert f"Found {found} particles" in out
    assert found > 0 and abs(found - truth) <= max(2, truth // 4)
    assert "No particle was found" not in captured.err
    # The classifier's probability, labelled with its defaults (threshold 0.5, no closing).
    model = _load(path)
    expected = NanoparticleLabeler(threshold=0.5, radius=0, min_size=2).transform(model.predict_proba(data["image"]))
    np.testing.assert_array_equal(labels, expected)
    with open(labels_path / "zarr.json") as handle:
        provenance = json.load(handle)["attributes"]["nanoseg"]
    assert provenance["labeler"]["threshold"] == 0.5 and provenance["labeler"]["radius"] == 0
    assert provenance["classifier"]["max_samples"] == 4000 and "mixture" not in provenance


def test_segment_with_a_classifier_that_finds_nothing_suggests_training_on_this_image(data, trained, tmp_path, capsys):
    path, _ = trained
    argv = ["segment", str(data["folder"] / "image.tif"), str(tmp_path / "none.zarr"), "--model", str(path)]
    assert main([*argv, "--min-size", "1000000", "-q"]) == 0
    err = capsys.readouterr().err
    assert "No particle was found (threshold 0.5, minimum size 1000000 voxels)" in err
    assert "nanoseg train" in err


def test_explicit_labeler_options_win_over_the_classifier_defaults(data, trained, tmp_path):
    path, _ = trained
    assert main(["segment", str(data["folder"] / "image.tif"), str(tmp_path / "labels.zarr"), "--model", str(path),
                 "--threshold", "0.9", "--radius", "1", "-q"]) == 0
    provenance = zarr.open_group(str(tmp_path / "labels.zarr"), mode="r").attrs["nanoseg"]
    assert provenance["labeler"]["threshold"] == 0.9 and provenance["labeler"]["radius"] == 1


def test_predict_with_a_classifier(data, trained, tmp_path):
    path, _ = trained
    output = tmp_path / "posterior.zarr"
    assert main(["predict", str(data["folder"] / "image.tif"), str(path), str(output), "-q"]) == 0
    posterior, spacing = read_image(output)
    assert posterior.dtype == np.float32 and spacing == SPACING
    np.testing.assert_array_equal(posterior[...], _load(path).predict_proba(data["image"]))
    assert main(["predict", str(data["folder"] / "image.tif"), str(path), str(tmp_path / "p16.zarr"),
                 "--dtype", "float16", "-q"]) == 0
    assert read_image(tmp_path / "p16.zarr")[0].dtype == np.float16


def test_classifier_models_refuse_mixture_only_options(data, trained, tmp_path, capsys):
    path, _ = trained
    image = str(data["folder"] / "image.tif")
    assert main(["segment", image, str(tmp_path / "a.zarr"), "--model", str(path), "--beta-prior", "1", "20", "-q"]) == 2
    assert "--beta-prior sets an intensity mixture" in error_line(capsys)
    pytest.importorskip("matplotlib")
    assert main(["segment", image, str(tmp_path / "b.zarr"), "--model", str(path), "--report",
                 str(tmp_path / "report"), "-q"]) == 2
    assert "--report shows the fitted intensity mixture" in error_line(capsys)
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()


def test_single_slices_train_a_2d_model_applied_slice_by_slice(data, tmp_path, capsys):
    image, mask = data["image"], data["mask"]
    crops, masks = [], []
    for z in (2, 5):
        crops.append(tmp_path / f"slice{z}.tif")
        masks.append(tmp_path / f"slice{z}_mask.tif")
        tifffile.imwrite(crops[-1], image[z])
        tifffile.imwrite(masks[-1], mask[z].astype(np.uint8))
    model_path = tmp_path / "model2d.joblib"
    assert main(["train", *map(str, crops), "--annotations", *map(str, masks), "-o", str(model_path),
                 "--spacing", "10", "10", *FAST]) == 0
    assert "on 2 2D images (Y, X)" in capsys.readouterr().out
    model = joblib.load(model_path)
    assert model.n_dims_ == 2 and tuple(model.spacing) == (10.0, 10.0)
    assert main(["segment", str(data["folder"] / "image.tif"), str(tmp_path / "labels.zarr"), "--model",
                 str(model_path), "--min-size", "2", "-q"]) == 0
    labels = np.asarray(read_image(tmp_path / "labels.zarr")[0][...])
    probability = np.stack([model.predict_proba(plane) for plane in image])
    expected = NanoparticleLabeler(threshold=0.5, radius=0, min_size=2).transform(probability)
    np.testing.assert_array_equal(labels, expected)


# ---------------------------------------------------------------------------
# errors: nothing is trained, nothing is written
# ---------------------------------------------------------------------------


def test_train_refuses_a_different_number_of_annotations(data, tmp_path, capsys):
    output = tmp_path / "model.joblib"
    argv = ["train", *map(str, data["crops"]), "--annotations", str(data["masks"][0]), "-o", str(output), *FAST]
    assert main(argv) == 2
    assert "2 image(s) but 1 annotation(s)" in error_line(capsys)
    assert not output.exists()


def test_train_refuses_annotations_of_another_shape(data, tmp_path, capsys):
    output = tmp_path / "model.joblib"
    argv = ["train", *map(str, data["crops"]), "--annotations", str(data["masks"][0]),
            str(data["folder"] / "image.tif"), "-o", str(output), *FAST]
    assert main(argv) == 2
    message = error_line(capsys)
    assert "has shape (8, 64, 64) but its image" in message and "crop1.tif has shape (8, 32, 64)" in message
    assert not output.exists()


def test_train_refuses_float_annotations(data, tmp_path, capsys):
    soft = tmp_path / "soft.tif"
    tifffile.imwrite(soft, data["mask"][data["halves"][1]].astype(np.float32))
    output = tmp_path / "model.joblib"
    argv = ["train", *map(str, data["crops"]), "--annotations", str(data["masks"][0]), str(soft),
            "-o", str(output), *FAST]
    assert main(argv) == 2
    message = error_line(capsys)
    assert "soft.tif holds float32 values" in message and "boolean mask or integer labels" in message
    assert not output.exists()


def test_train_never_replaces_a_model_without_overwrite(data, tmp_path, capsys):
    output = tmp_path / "model.joblib"
    output.write_bytes(b"an earlier model")
    assert main(_train_argv(data, output)) == 2
    assert "already exists; pass --overwrite" in error_line(capsys)
    assert output.read_bytes() == b"an earlier model"
    assert main([*_train_argv(data, output), "--overwrite"]) == 0
    assert isinstance(joblib.load(output), NanoparticleClassifier)
    # Only the model file is left in the folder (no temporary file).
    assert [p.name for p in tmp_path.iterdir()] == ["model.joblib"]


def test_train_checks_the_voxel_size(data, tmp_path, capsys):
    output = tmp_path / "model.joblib"
    assert main([*_train_argv(data, output), "--spacing", "10", "10"]) == 2
    assert "--spacing Y X is for 2D images" in error_line(capsys)
    assert main([*_train_argv(data, output), "--spacing", "50", "10", "10", "10"]) == 2
    assert "--spacing takes Z Y X" in error_line(capsys)
    bare = tmp_path / "bare.tif"
    tifffile.imwrite(bare, data["image"][data["halves"][0]])
    assert main(["train", str(bare), "--annotations", str(data["masks"][0]), "-o", str(output), *FAST]) == 2
    assert "bare.tif has no voxel size in its metadata; pass --spacing Z Y X" in error_line(capsys)
    assert not output.exists()


def test_train_has_help(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["train", "--help"])
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: nanoseg train") and "example:" in out and "--gate-recall" in out


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_train_leaves_its_inputs_untouched(data, tmp_path):
    inputs = [*data["crops"], *data["masks"]]
    before = [_sha(p) for p in inputs]
    assert main(_train_argv(data, tmp_path / "model.joblib")) == 0
    assert [_sha(p) for p in inputs] == before


def test_normalize_option_reaches_the_classifier(data, tmp_path):
    output = tmp_path / "background.npz"
    assert main(_train_argv(data, output, "--normalize", "background")) == 0
    model = _load(output)
    classifier = model.steps[0][1] if hasattr(model, "steps") else model
    assert classifier.normalize == "background"
    assert not any(name.endswith(":background") for name in classifier.feature_names_)


def test_normalize_choices_are_the_estimators():
    # The option lists the estimator's values, every one of them.
    import argparse

    from nanoseg.cli._parser import build_parser

    (options,) = [c for c in NanoparticleClassifier._parameter_constraints["normalize"] if hasattr(c, "options")]
    (subcommands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    (action,) = [a for a in subcommands.choices["train"]._actions if a.dest == "normalize"]
    assert set(action.choices) == set(options.options)
