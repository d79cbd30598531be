"""``nanoseg train``: learn particles from annotated crops (NanoparticleClassifier)."""

from __future__ import annotations

from ._common import (
    EXIT_OK,
    InputError,
    _check_parent,
    _match_slices,
    _save_model,
    _set_performance,
    _spacing_text,
    _to_stderr,
)

_CLASS_NAMES = {0: "background", 1: "particle", 2: "border between touching particles"}


def _make_classifier(args):
    """The classifier of the options given, validated before anything is read."""
    from ..classifier import NanoparticleClassifier

    options = {}
    if args.features is not None:
        options["features"] = tuple(args.features)
    if args.sigmas is not None:
        options["sigmas"] = tuple(args.sigmas)
    for name in ("max_samples", "border_width", "random_state", "normalize"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.gate_recall is not None:
        options["gate_recall"] = None if args.gate_recall == "none" else args.gate_recall
    if args.prior:
        from ..mixture import NanoparticleMixture

        options["prior"] = NanoparticleMixture()
    classifier = NanoparticleClassifier(**options, verbose=args.verbose)
    _set_performance([classifier], args)
    classifier._check_params()
    return classifier


def _read_pairs(images, annotations):
    """Each image with its annotation, checked to match; and the images' voxel sizes.

    2D images (TIFF, PNG, JPEG...) come back as (Y, X) with a (y, x) pixel size.
    """
    from ..io import read_image

    crops, targets, spacings = [], [], []
    for image_path, annotation_path in zip(images, annotations):
        image, spacing = read_image(image_path, keep_2d=True)
        annotation, _ = read_image(annotation_path, keep_2d=True)
        annotation = _match_slices(annotation, image)
        kind = annotation.dtype.kind
        if kind not in "biu":
            hint = " (threshold it first, e.g. probability > 0.5)" if kind == "f" else ""
            raise InputError(
                f"the annotation {annotation_path} holds {annotation.dtype} values; annotations must be a "
                "boolean mask or integer labels (0 background, positive particles, -1 not annotated)" + hint + "."
            )
        if tuple(image.shape) != tuple(annotation.shape):
            raise InputError(
                f"the annotation {annotation_path} has shape {tuple(annotation.shape)} but its image "
                f"{image_path} has shape {tuple(image.shape)}; each annotation must have the shape of its image."
            )
        crops.append(image)
        targets.append(annotation)
        spacings.append(spacing)
    return crops, targets, spacings


def _choose_spacing(given, found, images, is_2d, native_2d=False):
    """The classifier's voxel size: --spacing, else the images' metadata (one for all).

    Single-slice volumes are learned as 2D images but may keep a Z Y X
    spacing; 2D image files take Y X only, as in the other commands.
    """
    if given is not None:
        if len(given) not in (2, 3):
            raise InputError(f"--spacing takes Z Y X for volumes or Y X for 2D images; got {len(given)} values.")
        if len(given) == 2 and not is_2d:
            raise InputError("--spacing Y X is for 2D images, but the images are volumes; pass --spacing Z Y X.")
        if len(given) == 3 and native_2d:
            raise InputError("--spacing Z Y X is for volumes, but the images are 2D images; pass --spacing Y X.")
        return tuple(float(v) for v in given)
    missing = [path for path, spacing in zip(images, found) if spacing is None]
    if missing:
        if is_2d:
            return None  # square pixels: the filters' scales are in pixels
        raise InputError(
            f"the image {missing[0]} has no voxel size in its metadata; pass --spacing Z Y X "
            "(nanometres, e.g. --spacing 50 10 10)."
        )
    distinct = sorted(set(found))
    if len(distinct) > 1:
        sizes = ", ".join(_spacing_text(s) for s in distinct)
        raise InputError(f"the images have different voxel sizes ({sizes}); pass --spacing to use one for all.")
    return distinct[0]


def _summary(classifier, n_crops, is_2d, output):
    kind = ("2D image", "(Y, X)") if is_2d else ("volume", "(Z, Y, X)")
    crops = f"{n_crops} {kind[0]}{'s' if n_crops > 1 else ''} {kind[1]}"
    # Only 2D images may lack a voxel size (see _choose_spacing).
    spacing = "pixels taken as square" if classifier.spacing is None else f"spacing {_spacing_text(classifier.spacing)}"
    classes = ", ".join(f"{c} {_CLASS_NAMES.get(int(c), 'class')}" for c in classifier.classes_)
    counts = ", ".join(
        f"{_CLASS_NAMES.get(int(c), str(c)).split()[0]} {int(classifier.n_samples_per_class_[c])}"
        for c in classifier.classes_
    )
    lines = [
        f"Trained a NanoparticleClassifier on {crops}, {classifier.n_features_} features ({spacing}).",
        f"Classes: {classes}.",
        f"Training voxels per class: {counts}.",
    ]
    if classifier.gate_level_ is None:
        lines.append("Gate: none (every voxel is classified).")
    else:
        lines.append(
            f"Gate: recall {100 * classifier.gate_recall_:.1f} % of the annotated particle voxels, "
            f"fraction {100 * classifier.gate_fraction_:.1f} % of all voxels classified."
        )
        if classifier.gate_recall_ < 0.95:
            lines.append(
                "The gate misses annotated particle voxels: raise --gate-recall (or pass "
                "--gate-recall none) if particles are cut short."
            )
    lines.append(f"Saved the model to {output}.")
    return "\n".join(lines)


def train(args):
    """``nanoseg train``: fit a NanoparticleClassifier to annotated crops and save it."""
    from ..io import check_output_path

    images, annotations = list(args.images), list(args.annotations)
    if len(images) != len(annotations):
        raise InputError(
            f"{len(images)} image(s) but {len(annotations)} annotation(s) were given; pass one annotation "
            "per image, in the same order."
        )
    check_output_path(args.output, inputs=[*images, *annotations], overwrite=args.overwrite)
    _check_parent(args.output, "model")
    classifier = _make_classifier(args)
    crops, targets, found = _read_pairs(images, annotations)
    # 2D images and single slices are learned in 2D: the classifier is then
    # applied to volumes slice by slice.
    native_2d = all(crop.ndim == 2 for crop in crops)
    is_2d = all(crop.ndim == 2 or crop.shape[0] == 1 for crop in crops)
    classifier.set_params(spacing=_choose_spacing(args.spacing, found, images, is_2d, native_2d))
    if is_2d:
        crops = [crop if crop.ndim == 2 else crop[0] for crop in crops]
        targets = [target if target.ndim == 2 else target[0] for target in targets]
    else:
        # Among volumes, a 2D image is a volume of one slice.
        crops = [crop if crop.ndim == 3 else crop[None] for crop in crops]
        targets = [target if target.ndim == 3 else target[None] for target in targets]
    with _to_stderr():
        classifier.fit(crops, targets)
    _save_model(classifier, args.output, overwrite=args.overwrite)
    print(_summary(classifier, len(crops), is_2d, args.output))
    return EXIT_OK
