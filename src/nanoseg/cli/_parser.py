"""The ``nanoseg`` argument parser: every command, its options and its help."""

from __future__ import annotations

import argparse
import math
import textwrap

from .._version import __version__
from ._defaults import estimator_defaults


def _description(text, example):
    """A command's description, wrapped, followed by its example (kept as is)."""
    return textwrap.fill(text, 79) + "\n\nexample:\n  " + example


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text):
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _seed_percentile(text):
    if text.lower() == "otsu":
        return "otsu"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a percentile (0-100] or 'otsu', got {text}") from None


def _intensity_bound(text):
    if text.lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be an integer intensity from 0 to 65535 or 'auto', got {text}")
    return value


def _add_common(parser, *, spacing=True, chunks=False, overwrite=True):
    if spacing:
        # Two or three values: the count is checked against the input once it is read.
        parser.add_argument(
            "--spacing", type=_positive_float, nargs="+", metavar="NM", default=None,
            help="voxel size in nanometres, Z Y X for a volume or Y X for a 2D image (three values "
            "for a 2D image are refused), used instead of the input's metadata (required when the "
            "metadata has none, as for PNG and JPEG)",
        )
    if chunks:
        parser.add_argument(
            "--chunks", type=_positive_int, nargs="+", metavar="N", default=None,
            help="chunk shape of the output, Z Y X for a volume or Y X for a 2D image (default: "
            "1 x 1024 x 1024, capped by the shape)",
        )
    if overwrite:
        parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _add_performance(parser):
    group = parser.add_argument_group("performance")
    group.add_argument("--memory-budget", default=None, metavar="BYTES",
                       help="working memory per pass, e.g. 2GiB (default: 128 MiB per thread)")
    group.add_argument("--n-jobs", type=int, default=None, metavar="N",
                       help="threads (default: one per CPU)")
    group.add_argument("--device", choices=("cpu", "cuda"), default=None,
                       help="where the per-slice work runs (default: the estimators' own)")


def _add_mixture_options(parser):
    defaults = estimator_defaults("nanoseg.mixture", "NanoparticleMixture")
    group = parser.add_argument_group("intensity mixture (see NanoparticleMixture)")
    group.add_argument("--beta-prior", type=_positive_float, nargs=2, metavar=("A", "B"), default=None,
                       help=f"Beta prior on each slice's particle fraction (default: {defaults['beta_prior']})")
    group.add_argument("--sampling-step", type=_positive_int, default=None, metavar="N",
                       help=f"fit on every N-th slice (default: {defaults['sampling_step']})")
    group.add_argument("--percentile-low", type=_seed_percentile, default=None, metavar="P",
                       help="seed percentile, or 'otsu' for the stack histogram's Otsu threshold "
                       f"(default: {defaults['percentile_low']})")
    group.add_argument("--percentile-high", type=float, default=None, metavar="P",
                       help=f"hard background exclusion percentile (default: {defaults['percentile_high']})")
    group.add_argument("--halo-pad", type=int, default=None, metavar="PX",
                       help=f"pixels excluded around seeds (default: {defaults['halo_pad']})")
    group.add_argument("--halo", choices=("box", "dilation"), default=None,
                       help="exclude each seed's grown bounding box, or the pixels near the seed "
                       f"itself (default: {defaults['halo']})")
    group.add_argument("--min-seed-size", type=int, default=None, metavar="PX",
                       help=f"smallest seed component (default: {defaults['min_seed_size']})")
    group.add_argument("--monotone-posterior", action="store_true", default=None,
                       help="constrain the posterior to never decrease towards the particles' side of "
                       "the intensity scale (default: the seed method's unconstrained posterior)")
    group.add_argument("--max-iter", type=_positive_int, default=None, metavar="N",
                       help=f"EM updates at most (default: {defaults['max_iter']})")
    group.add_argument("--tol", type=float, default=None,
                       help=f"EM stopping tolerance (default: {defaults['tol']})")
    group.add_argument("--binning", choices=("auto", "range", "shift"), default=None,
                       help="how 16-bit intensities are mapped to the model's 256 bins: 'range' splits "
                       "LOW..HIGH linearly, 'shift' drops low bits; 'auto' keeps 8-bit data as it is "
                       f"and uses 'range' otherwise (default: {defaults['binning']})")
    group.add_argument("--intensity-range", type=_intensity_bound, nargs=2, metavar=("LOW", "HIGH"),
                       default=None,
                       help="bounds of the binning, in the image's units; 'auto' for the observed "
                       "minimum or maximum (default: both observed)")


def _add_labeler_options(parser):
    defaults = estimator_defaults("nanoseg.labeler", "NanoparticleLabeler")
    group = parser.add_argument_group("labelling (see NanoparticleLabeler)")
    group.add_argument("--threshold", type=float, default=None, metavar="T",
                       help=f"posterior at or above which a voxel is a particle (default: {defaults['threshold']})")
    group.add_argument("--radius", type=int, default=None, metavar="R",
                       help="closing ball (disk for a 2D image) radius in voxels, 0 for none "
                       f"(default: {defaults['radius']})")
    group.add_argument("--min-size", type=int, default=None, metavar="N",
                       help=f"smallest particle kept, in voxels (pixels for a 2D image) (default: {defaults['min_size']})")
    group.add_argument("--connectivity", type=int, choices=(1, 2, 3), default=None,
                       help="1: 6-, 2: 18-, 3: 26-neighbourhood; for a 2D image 1: 4-, 2: 8-neighbourhood "
                       f"(default: {defaults['connectivity']})")


def _gate_recall(text):
    if text.lower() == "none":
        return "none"
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a share in (0, 1] or 'none', got {text}")
    return value


def _add_classifier_options(parser):
    from .._ops.filters import FEATURES

    defaults = estimator_defaults("nanoseg.classifier", "NanoparticleClassifier")
    group = parser.add_argument_group("classifier (see NanoparticleClassifier)")
    group.add_argument("--features", nargs="+", choices=FEATURES, default=None, metavar="NAME",
                       help=f"feature families, among {', '.join(FEATURES)} (default: all)")
    group.add_argument("--sigmas", type=_positive_float, nargs="+", default=None, metavar="S",
                       help="filter scales in nanometres (in voxels without a voxel size) (default: 1, 2 "
                       "and 4 times the smallest voxel size)")
    group.add_argument("--max-samples", type=int, default=None, metavar="N",
                       help=f"training voxels, shared equally between classes (default: {defaults['max_samples']})")
    group.add_argument("--border-width", type=int, default=None, metavar="N",
                       help="from instance labels, learn the voxels within N of another particle as "
                       f"borders that keep touching particles apart; 0 for none (default: {defaults['border_width']})")
    group.add_argument("--gate-recall", type=_gate_recall, default=None, metavar="R",
                       help="classify only voxels bright enough to be particles, at the level that keeps "
                       "this share of the annotated particle voxels; 'none' classifies every voxel "
                       f"(default: {defaults['gate_recall']})")
    group.add_argument("--normalize", choices=("otsu+background", "otsu", "background", "none"), default=None,
                       help="how each image's intensities are put on a common scale before the features "
                       f"(default: {defaults['normalize']})")
    group.add_argument("--prior", action="store_true",
                       help="fit the intensity mixture to each volume and use its posterior as a feature")
    group.add_argument("--random-state", type=int, default=None, metavar="SEED",
                       help="seed of the training voxels and the forest (default: none)")


def build_parser():
    """The ``nanoseg`` argument parser."""
    from . import _segment, _steps, _train
    parser = argparse.ArgumentParser(
        prog="nanoseg",
        description="Find nanoparticles in volume electron microscopy.",
        epilog="Voxel sizes are in nanometres, in (z, y, x) order; a 2D image's pixel size is (y, x). "
        "Run 'nanoseg COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"nanoseg {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help, description):
        text, example = description.split("\n\nexample:\n  ")
        return commands.add_parser(
            name, help=help, description=_description(text, example),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    convert = command(
        "convert", "convert a TIFF stack or folder, a PNG/JPEG image or a zarr array to OME-Zarr",
        "Convert a multi-page TIFF, a folder of TIFF slices (natural name order), a 2D TIFF, PNG or "
        "JPEG image (8- or 16-bit grey) or a zarr array to an OME-Zarr image with its voxel size; a "
        "2D image stays 2D, with a pixel size Y X.\n\nexample:\n"
        "  nanoseg convert slices/ image.zarr --spacing 50 10 10\n"
        "  nanoseg convert micrograph.png micrograph.zarr --spacing 7.3 7.3",
    )
    convert.add_argument("input", help="TIFF file, folder of TIFF slices, PNG or JPEG image, zarr array or OME-Zarr")
    convert.add_argument("output", help="OME-Zarr image to create")
    _add_common(convert, chunks=True)
    convert.set_defaults(run=_steps.convert)

    fit = command(
        "fit", "fit the intensity mixture and save it",
        "Fit the background/particle intensity mixture on an image and save the model.\n\n"
        "example:\n  nanoseg fit image.zarr model.npz --beta-prior 1 20 --sampling-step 4",
    )
    fit.add_argument("image", help="uint8 or uint16 image (OME-Zarr, zarr, TIFF, PNG or JPEG)")
    fit.add_argument("model", help="model file to write")
    _add_mixture_options(fit)
    _add_performance(fit)
    _add_common(fit)
    fit.set_defaults(run=_steps.fit)

    predict = command(
        "predict", "write the particle posterior of an image",
        "Compute each voxel's posterior particle probability with a saved model (an intensity "
        "mixture from 'nanoseg fit' or a classifier from 'nanoseg train') and write it as an "
        "OME-Zarr image with the input's voxel size.\n\n"
        "example:\n  nanoseg predict image.zarr model.npz posterior.zarr --dtype float16",
    )
    predict.add_argument("image", help="uint8 or uint16 image (OME-Zarr, zarr, TIFF, PNG or JPEG)")
    predict.add_argument("model", help="model written by 'nanoseg fit' or 'nanoseg train'")
    predict.add_argument("output", help="OME-Zarr posterior to create")
    predict.add_argument("--dtype", choices=("float32", "float16"), default=None,
                         help="posterior dtype (default: the model's, float32 unless changed)")
    predict.add_argument("--beta-prior", type=_positive_float, nargs=2, metavar=("A", "B"), default=None,
                         help="replace the model's Beta prior on each slice's particle fraction")
    _add_performance(predict)
    _add_common(predict, chunks=True)
    predict.set_defaults(run=_steps.predict)

    label = command(
        "label", "label particles in a posterior",
        "Threshold a posterior, close, label connected particles and drop small ones; write an "
        "OME-Zarr label image.\n\nexample:\n  nanoseg label posterior.zarr labels.zarr --threshold 0.9",
    )
    label.add_argument("posterior", help="posterior written by 'nanoseg predict'")
    label.add_argument("output", help="OME-Zarr label image to create")
    _add_labeler_options(label)
    _add_performance(label)
    _add_common(label, chunks=True)
    label.set_defaults(run=_steps.label)

    measure = command(
        "measure", "write a table of particle sizes and positions",
        "Measure every labelled particle (voxel count, volume, equivalent diameter, centroid, "
        "bounding box; mean/max posterior and intensity when given) in nanometres; for a 2D image, "
        "pixel count, area and the diameter of the circle of that area.\n\n"
        "example:\n  nanoseg measure labels.zarr particles.csv --image image.zarr",
    )
    measure.add_argument("labels", help="label image written by 'nanoseg label' or 'segment'")
    measure.add_argument("table", help="table to write (.csv or .parquet)")
    measure.add_argument("--posterior", default=None, help="posterior of the same shape")
    measure.add_argument("--image", default=None, help="image of the same shape")
    _add_common(measure)
    measure.set_defaults(run=_steps.measure)

    segment = command(
        "segment", "fit, predict, label and measure in one go",
        "Run the whole chain out of core: fit the mixture (or load a mixture or classifier with "
        "--model), compute the posterior "
        "lazily, label the particles and write them as an OME-Zarr label image; optionally a "
        "particle table and a quality-control report. The input is only read.\n\n"
        "example:\n  nanoseg segment image.zarr labels.zarr --table particles.csv --report report/",
    )
    segment.add_argument("image", help="uint8 or uint16 image (OME-Zarr, zarr, TIFF file or folder, PNG or JPEG)")
    segment.add_argument("output", help="OME-Zarr label image to create")
    segment.add_argument("--table", default=None, help="also write a particle table (.csv or .parquet)")
    segment.add_argument("--model", default=None,
                         help="use a model saved by 'nanoseg fit' or 'nanoseg train' instead of fitting "
                         "(after a classifier, --threshold and --radius default to 0.5 and 0)")
    segment.add_argument("--report", default=None, metavar="DIR",
                         help="write quality-control figures and index.html to DIR")
    segment.add_argument("--scheduler", default=None, metavar="ADDRESS",
                         help="run the lazy computations on a dask.distributed scheduler")
    _add_mixture_options(segment)
    _add_labeler_options(segment)
    _add_performance(segment)
    _add_common(segment, chunks=True)
    segment.set_defaults(run=_segment.segment)

    train = command(
        "train", "learn particles from annotated crops and save the classifier",
        "Fit a NanoparticleClassifier (multi-scale voxel features and a random forest) to images "
        "and their annotations -- a boolean mask or integer labels per image, 0 for background, "
        "positive values for particles, -1 for voxels not annotated -- and save it for 'segment "
        "--model' and 'predict'. Single-slice images are learned as 2D images and the model is "
        "then applied slice by slice.\n\n"
        "example:\n  nanoseg train crop1.tif crop2.tif --annotations mask1.tif mask2.tif -o model.npz",
    )
    train.add_argument("images", nargs="+", metavar="IMAGE",
                       help="uint8 or uint16 crops (TIFF file or folder, PNG or JPEG, zarr or OME-Zarr)")
    train.add_argument("--annotations", nargs="+", required=True, metavar="ANNOTATION",
                       help="one annotation per image, in the same order and of the same shape")
    train.add_argument("-o", "--output", required=True, metavar="MODEL",
                       help="model file to write: .npz (nanoseg's safe format) or .joblib")
    train.add_argument("--spacing", type=_positive_float, nargs="+", metavar="NM", default=None,
                       help="voxel size in nanometres, Z Y X (or Y X for 2D images), used instead of the "
                       "images' metadata (default: the metadata; square pixels for 2D images without it, "
                       "as for PNG and JPEG)")
    _add_classifier_options(train)
    _add_performance(train)
    train.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    train.add_argument("-v", "--verbose", action="store_true", help="show progress bars")
    train.set_defaults(run=_train.train)

    demo = command(
        "demo", "segment a built-in synthetic phantom and report what was found",
        "Build a synthetic SBF-SEM phantom with known particles, write it as OME-Zarr, segment it "
        "and compare with the ground truth.\n\nexample:\n  nanoseg demo demo-output/",
    )
    demo.add_argument("directory", nargs="?", default=None,
                      help="keep the phantom, labels and table here (default: a temporary folder); "
                      "the demo's files in it are replaced")
    demo.add_argument("--shape", type=_positive_int, nargs=3, default=(24, 192, 192), metavar=("Z", "Y", "X"),
                      help="phantom shape (default: 24 192 192)")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the phantom (default: 0)")
    demo.add_argument("--verbose", action="store_true", help="show progress bars")
    demo.set_defaults(run=_segment.demo)
    return parser
