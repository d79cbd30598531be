"""Evaluate nanoseg against global-threshold baselines on real annotated images.

Datasets (read from the shared data folder, never copied; see its README):

* EMPS, the 25 "bright_small" images (small bright particles) and all 366
  images of the training split (2D SEM/TEM figures, instance masks);
* BAM TiO2: 40 SEM images of agglomerated TiO2 particles (rows [:712], the
  rest is the microscope's data bar; instances are the 4-connected
  components of the manual masks).

Protocol, the same for every method:

1. Each dataset's images are split once, with a fixed seed, into a tuning
   half and a held-out half. EMPS images are grouped by the article they come
   from (several images can share one), so that no article is on both sides;
   the bright_small images are split half and half. Settings for "EMPS all"
   are chosen on 32 images drawn at random from its tuning half
   (``--emps-tuning``), to keep a full run near half an hour on two CPUs; its
   whole held-out half is scored.
2. nanoseg is one pipeline -- background subtraction, the per-image
   :class:`~nanoseg.NanoparticleMixture`, posterior smoothing, labelling,
   splitting of touching particles. Every baseline, one
   :class:`~nanoseg.baselines.GlobalThreshold` method, runs twice: as a
   global threshold followed by labelling (its own settings and the
   minimum particle size searched, see :func:`threshold_steps`), and inside
   nanoseg's pipeline in place of the mixture (``<method>+steps``: the
   same background, smoothing, labelling and splitting options as nanoseg).
   Each intensity step is fitted on each image on its own
   (:class:`~nanoseg.tuning.PerVolume`); the other settings are shared by
   all images of a dataset and searched.
3. Each method's grid (its own intensity settings, see
   :func:`intensity_steps`, times its other steps' options, see
   :func:`shared_steps` and :func:`threshold_steps`) is
   searched exhaustively on the tuning images; the setting with the best
   pooled object F1 (IoU > 0.5, as :data:`nanoseg.metrics.object_f1_scorer`)
   wins. No cross-validation is needed: nothing is learned from other
   images, so the search only chooses settings. Intermediate results are
   shared between candidates (each image's posterior is computed once per
   upstream setting; see :func:`_image_counts`).
4. The winning pipeline is built as a scikit-learn Pipeline and labels the
   tuning images (its pooled F1 must equal the search's: a check of the
   shortcuts) and the held-out images, which are scored: object F1,
   precision and recall, panoptic quality and voxel Dice, pooled.

The learned pipeline (``learned``: :class:`~nanoseg.NanoparticleClassifier`,
then :class:`~nanoseg.NanoparticleLabeler` with ``radius=0``, then optional
splitting) learns from the annotations of other images, so choosing its
settings on the images it was trained on would flatter it. It follows the
same split with cross-validation inside the tuning half (see
:func:`evaluate_learned`):

a. Training images: the whole tuning half (BAM, EMPS bright_small), or for
   EMPS all a random draw of ``--learned-emps-train`` of its 183 tuning-half
   images (by default the 32 the other methods are tuned on), to bound the
   run time.
b. Those images are cut into 3 folds (EMPS: whole articles in one fold; BAM,
   one session: single images). For every classifier setting of
   :func:`learned_settings`, a classifier trained on two folds gives the
   probability maps of the third, and every labeller and splitter setting of
   :func:`learned_steps` labels them. The (classifier, labeller, splitter)
   setting with the best pooled out-of-fold object F1 wins ("tuning F1" in
   the tables is that cross-validated score).
c. The winning classifier setting is trained again on all the training
   images, and the pipeline labels the held-out half, scored as above.

EMPS particles are bright on some images and dark on others. The polarity
of each image is taken from the dataset's stats.csv (derived from the
annotations), and dark images are inverted (255 - v) when loaded, for every
method alike.

Run from the repository root::

    python benchmarks/evaluate_real.py                   # full run, ~55 min on 2 CPUs
    python benchmarks/evaluate_real.py --quick           # small grids and image sets, ~5-10 min
    python benchmarks/evaluate_real.py --output results.rst --cache ~/.cache/nanoseg-eval
    python benchmarks/evaluate_real.py --methods learned # the learned pipeline only, ~30 min
    python benchmarks/evaluate_real.py --methods nanoseg otsu li  # skip the learned pipeline

The data folder defaults to ``../shared/data`` next to the repository; use
``--data DIR`` or the environment variable ``NANOSEG_SHARED_DATA``. With
``--cache DIR`` the per-image search results are kept (joblib.Memory, keyed
by the search space and the image), so that a rerun only recomputes what
changed; clear it after changing nanoseg itself.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.pipeline import Pipeline

from nanoseg import NanoparticleClassifier, NanoparticleLabeler, NanoparticleMixture
from nanoseg.baselines import GlobalThreshold
from nanoseg.metrics import match_objects, voxel_scores
from nanoseg.preprocessing import BackgroundSubtractor, PosteriorSmoother
from nanoseg.splitting import ParticleSplitter
from nanoseg.tuning import PerVolume

SEED = 0
# EMPS images the settings are chosen on (of the 183 of the tuning half), to
# keep a full run near half an hour on 2 CPUs; the held-out half is scored whole.
EMPS_TUNING = 32
STEPS = ("background", "intensity", "smooth", "labeler", "split")
BASELINES = ("fixed", "otsu", "li", "multiotsu", "tile_maxima")
# Each baseline runs twice: as the issue of record describes it (its global
# threshold, then labelling with a searched minimum size), and inside
# nanoseg's whole pipeline ("+steps": background subtraction, smoothing,
# labelling and splitting searched exactly as for nanoseg).
STEPS_SUFFIX = "+steps"
# The pipeline learned from the tuning half's annotations (NanoparticleClassifier),
# tuned by cross-validation instead of the exhaustive search: see evaluate_learned.
LEARNED = "learned"
GRID_METHODS = ("nanoseg", *BASELINES, *(name + STEPS_SUFFIX for name in BASELINES))
METHODS = (*GRID_METHODS, LEARNED)
# EMPS images the learned pipeline is trained and cross-validated on (of the
# 183 of the tuning half): the same draw as the EMPS_TUNING images the other
# methods are tuned on, so that every method sees the same annotations, and
# few enough for its cross-validation (3 classifier settings x 3 folds, every
# pixel classified) to take ~15 min on 2 CPUs.
LEARNED_EMPS_TRAIN = EMPS_TUNING
# Folds of the cross-validation that chooses the learned pipeline's settings.
CV_FOLDS = 3


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------


def default_data_dir():
    if os.environ.get("NANOSEG_SHARED_DATA"):
        return Path(os.environ["NANOSEG_SHARED_DATA"])
    return Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass
class Dataset:
    name: str
    ids: list  # unique across datasets ("emps/<id>", "bam/<name>")
    images: list  # uint8 arrays, particles bright
    labels: list  # instance labels
    tuning: list = field(default_factory=list)  # indices of the images settings are chosen on
    held_out: list = field(default_factory=list)  # indices of the images scored
    n_tuning_pool: int = 0  # size of the tuning half `tuning` was drawn from
    tuning_pool: list = field(default_factory=list)  # indices of the whole tuning half
    groups: list = field(default_factory=list)  # per image: its article (EMPS) or itself (BAM)

    def subset(self, indices):
        return [self.images[i] for i in indices], [self.labels[i] for i in indices]


def _read_png(path):
    from skimage.io import imread

    return np.asarray(imread(path))


def load_emps(root, ids=None):
    """EMPS training images (dark ones inverted) and instance masks, and each image's article."""
    import pandas as pd

    folder = root / "emps-train"
    stats = pd.read_csv(folder / "stats.csv").set_index("id")
    articles = pd.read_csv(folder / "metadata.csv")
    articles = dict(zip(articles["filename"].str.replace(".png", "", regex=False), articles["doi"]))
    ids = list(stats.index) if ids is None else list(ids)
    images, labels = [], []
    for image_id in ids:
        image = _read_png(folder / "images" / f"{image_id}.png")
        if image.ndim == 3:  # R = G = B upstream; keep one channel
            image = image[..., 0]
        if stats.loc[image_id, "polarity"] == "dark":
            image = 255 - image
        images.append(image.astype(np.uint8))
        labels.append(_read_png(folder / "masks" / f"{image_id}.png").astype(np.uint32))
    return ids, images, labels, [articles[i] for i in ids]


def load_bam(root):
    """BAM TiO2 images cut to rows [:712] and their 4-connected instances."""
    import tifffile
    from skimage.measure import label

    folder = root / "bam-tio2-sem"
    ids, images, labels = [], [], []
    for path in sorted((folder / "images").glob("*.tif")):
        mask = tifffile.imread(folder / "masks_manual_4connected" / f"{path.stem}_m.tif")[:712]
        ids.append(path.stem)
        images.append(np.ascontiguousarray(tifffile.imread(path)[:712]))
        labels.append(label(mask > 0, connectivity=1).astype(np.uint32))
    return ids, images, labels


def split_groups(groups, marked, seed=SEED):
    """Tuning and held-out indices: whole groups on one side, about half the
    images (and half the `marked` ones) on each."""
    rng = np.random.default_rng(seed)
    order = {}
    for index, group in enumerate(groups):
        order.setdefault(group, []).append(index)
    names = list(order)
    rng.shuffle(names)
    # Groups holding marked images first, so that those are balanced too.
    names.sort(key=lambda g: not any(marked[i] for i in order[g]))
    sides = ([], [])
    for name in names:
        members = order[name]
        n_marked = sum(marked[i] for i in members)
        # A group with marked images goes to the side with fewer marked
        # images (then fewer images), any other to the side with fewer images.
        loads = [(sum(marked[i] for i in side), len(side)) if n_marked else (len(side),) for side in sides]
        target = 0 if loads[0] <= loads[1] else 1
        sides[target].extend(members)
    return sorted(sides[0]), sorted(sides[1])


def _draw(indices, n, seed=SEED):
    """At most `n` of `indices`, drawn at random (in their order)."""
    indices = list(indices)
    if n is None or len(indices) <= n:
        return indices
    drawn = np.random.default_rng(seed).choice(len(indices), size=n, replace=False)
    return sorted(indices[k] for k in drawn)


def split_emps(root, ids, articles):
    """Which EMPS images are bright_small, and the tuning and held-out halves."""
    bright_small = set((root / "emps-train" / "bright_small.txt").read_text().split())
    marked = [i in bright_small for i in ids]
    tuning, held_out = split_groups(articles, marked)
    return marked, tuning, held_out


def load_datasets(root, emps_tuning=None, quick=False):
    """The three evaluation sets, split into tuning and held-out images.

    `emps_tuning` caps the number of EMPS images settings are chosen on
    (drawn at random, so that the mix of image kinds is the held-out
    half's); `quick` also caps the other sides, for a smoke test.
    """
    ids, images, labels, articles = load_emps(root)
    marked, tuning, held_out = split_emps(root, ids, articles)
    keys = [f"emps/{i}" for i in ids]
    emps_all = Dataset(
        "EMPS all",
        keys,
        images,
        labels,
        _draw(tuning, emps_tuning),
        _draw(held_out, 48) if quick else held_out,
        len(tuning),
    )
    keep = [i for i, is_marked in enumerate(marked) if is_marked]
    position = {old: new for new, old in enumerate(keep)}
    emps_small = Dataset(
        "EMPS bright_small",
        [keys[i] for i in keep],
        [images[i] for i in keep],
        [labels[i] for i in keep],
        [position[i] for i in tuning if i in position],
        [position[i] for i in held_out if i in position],
    )
    emps_small.n_tuning_pool = len(emps_small.tuning)
    # The learned pipeline draws its own training images from the whole
    # tuning half, and its cross-validation keeps each article in one fold.
    emps_all.tuning_pool = list(tuning)
    emps_all.groups = list(articles)
    emps_small.tuning_pool = list(emps_small.tuning)
    emps_small.groups = [articles[i] for i in keep]
    ids, images, labels = load_bam(root)
    order = np.random.default_rng(SEED).permutation(len(ids))
    half = len(ids) // 2
    bam_tuning, bam_held_out = sorted(order[:half].tolist()), sorted(order[half:].tolist())
    if quick:
        bam_tuning, bam_held_out = _draw(bam_tuning, 4), _draw(bam_held_out, 4)
    bam = Dataset("BAM TiO2", [f"bam/{i}" for i in ids], images, labels, bam_tuning, bam_held_out, half)
    bam.tuning_pool = list(bam_tuning)
    # One microscope session: no group to keep together, each image is its own.
    bam.groups = list(bam.ids)
    return [emps_small, emps_all, bam]


# ---------------------------------------------------------------------------
# search spaces
# ---------------------------------------------------------------------------


def _grid(cls, **values):
    """One estimator per combination of the listed parameter values."""
    names = list(values)
    return [cls(**dict(zip(names, combo))) for combo in itertools.product(*values.values())]


def shared_steps(quick=False):
    """Background, smoothing, labelling and splitting options: the same for every method."""
    if quick:
        return {
            "background": ["passthrough"],
            "smooth": [PosteriorSmoother(sigma=0), PosteriorSmoother(sigma=1.5)],
            "labeler": _grid(NanoparticleLabeler, threshold=[0.5, 0.9], min_size=[20], n_jobs=[1]),
            "split": ["passthrough", ParticleSplitter(min_distance=8)],
        }
    return {
        "background": ["passthrough", BackgroundSubtractor(method="gaussian", radius=50)],
        "smooth": [PosteriorSmoother(sigma=s) for s in (0, 1.5)],
        # Thresholds up to 0.99 for posteriors that run wide of the particles;
        # sizes up to 640 px, since 160 px (the previous largest) was chosen
        # by almost every method.
        "labeler": _grid(
            NanoparticleLabeler, threshold=[0.5, 0.8, 0.95, 0.99], min_size=[10, 40, 160, 640], n_jobs=[1]
        ),
        "split": ["passthrough", ParticleSplitter(min_distance=8)],
    }


def threshold_steps(quick=False):
    """A global threshold's own pipeline: labelling, with the minimum size searched.

    The intensity step gives a 0/1 map, so the labeller's threshold does not
    matter and no other step is applied.
    """
    return {
        "background": ["passthrough"],
        "smooth": ["passthrough"],
        "labeler": _grid(NanoparticleLabeler, threshold=[0.5], min_size=[20] if quick else [10, 40, 160, 640], n_jobs=[1]),
        "split": ["passthrough"],
    }


def intensity_steps(method, quick=False):
    """The method's own intensity settings."""
    if method == "nanoseg":
        if quick:
            return _grid(NanoparticleMixture, percentile_low=[95.0], n_jobs=[1])
        return _grid(
            NanoparticleMixture,
            # A seed level for dense particles, and one that follows each
            # image (its Otsu threshold). The seed's default, 99.5, was never
            # chosen in earlier runs; 85 and 90 were dropped to make room for
            # the halo's shape at the same grid size (a larger grid let
            # nanoseg fit the tuning images better and the held-out ones
            # worse in an earlier run).
            percentile_low=[95.0, "otsu"],
            # The seed's bounding-box halo, and one around the seed pixels,
            # which leaves background between particles that touch.
            halo=["box", "dilation"],
            # The seed's halo, and a narrow one for images crowded with particles.
            halo_pad=[20, 5],
            # The seed's smallest haloed seed, and a smaller one so that small
            # particles do not stay in the background histogram. The Beta
            # prior is left at its default: on a 2D image of 10^5 pixels or
            # more, its pull on the particle fraction is negligible ((1, 1)
            # and (1, 20) give the same posteriors on these images).
            min_seed_size=[20, 5],
            # The seed method's posterior, and one constrained to rise with
            # intensity (no high posterior in the dark background).
            monotone_posterior=[False, True],
            n_jobs=[1],
        )
    if method == "fixed":
        values = [96, 160] if quick else list(range(48, 241, 16))
        return _grid(GlobalThreshold, method=["fixed"], threshold=values)
    if method == "multiotsu":
        return _grid(GlobalThreshold, method=["multiotsu"], classes=[3] if quick else [3, 4])
    if method == "tile_maxima":
        if quick:
            return [GlobalThreshold(method="tile_maxima")]
        return _grid(GlobalThreshold, method=["tile_maxima"], tile_size=[16, 32, 64], tile_factor=[1.1, 1.2, 1.5])
    return [GlobalThreshold(method=method)]


def search_space(method, quick=False):
    """The method's grid: its intensity settings times its other steps' options.

    nanoseg and the ``+steps`` baselines search :func:`shared_steps`; a plain
    baseline searches :func:`threshold_steps`.
    """
    base = method.removesuffix(STEPS_SUFFIX)
    steps = threshold_steps(quick) if method in BASELINES else shared_steps(quick)
    steps["intensity"] = [PerVolume(est, on_error="empty") for est in intensity_steps(base, quick)]
    return [(name, steps[name]) for name in STEPS]


@functools.lru_cache
def _n_other_options(method):
    """How many settings of the steps other than the intensity step `method` searches."""
    return int(np.prod([len(options) for name, options in search_space(method) if name != "intensity"]))


def n_candidates(space):
    return int(np.prod([len(options) for _, options in space]))


def candidate(space, index):
    """Option indices of candidate `index` (grid order, last step fastest)."""
    sizes = [len(options) for _, options in space]
    return np.unravel_index(index, sizes)


def build_pipeline(space, choice):
    return Pipeline(
        [(name, options[j] if options[j] == "passthrough" else clone(options[j])) for (name, options), j in zip(space, choice)]
    )


def describe(space, choice):
    parts = []
    for (name, options), j in zip(space, choice):
        option = options[j]
        if option == "passthrough":
            parts.append(f"{name}=off")
            continue
        if isinstance(option, PerVolume):
            option = option.estimator
        params = option.get_params()
        defaults = type(option)().get_params()
        changed = {k: v for k, v in params.items() if k != "n_jobs" and v != defaults.get(k)}
        parts.append(f"{name}(" + ", ".join(f"{k}={v}" for k, v in changed.items()) + ")")
    return "; ".join(parts)


# ---------------------------------------------------------------------------
# staged search
# ---------------------------------------------------------------------------

# Per candidate and image: object tp, fp, fn, sum of matched IoUs; voxel tp, fp, fn.
N_COUNTS = 7


def _counts(labels, truth):
    """The counts of one label image, with the scorer's functions."""
    objects = match_objects(labels, truth)
    voxels = voxel_scores(labels, truth)
    return (
        objects["tp"],
        objects["fp"],
        objects["fn"],
        objects["mean_matched_iou"] * objects["tp"],
        voxels["tp"],
        voxels["fp"],
        voxels["fn"],
    )


def _drop_small(labels, min_size):
    """The labeller's output for a larger `min_size`, from its output for a smaller one.

    Components do not depend on `min_size`; the labeller drops those under
    it and numbers the rest 1..K in raster order of their first voxel, which
    the order of the smaller run's labels already is.
    """
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    lookup = np.zeros(sizes.size, dtype=labels.dtype)
    lookup[keep] = np.arange(1, int(keep.sum()) + 1, dtype=labels.dtype)
    return lookup[labels]


def _split_pieces(base, split):
    """The splitter's output on `base` and the `base` object of each piece."""
    pieces = base if split == "passthrough" else clone(split).fit_transform(base)
    parent = np.zeros(int(pieces.max()) + 1, dtype=np.int64)
    parent[pieces.ravel()] = base.ravel()
    return pieces, parent


def _pieces_of_large(pieces, parent, sizes, min_size):
    """The splitter's output on ``_drop_small(base, min_size)``, from its output on `base`.

    Objects are split one by one, and their pieces are numbered
    consecutively, objects in label order: dropping an object drops its
    pieces, and the others keep their order.
    """
    keep = sizes[parent] >= min_size
    keep[0] = False
    lookup = np.zeros(keep.size, dtype=pieces.dtype)
    lookup[keep] = np.arange(1, int(keep.sum()) + 1, dtype=pieces.dtype)
    return lookup[pieces]


def _labeler_key(option):
    """The labeller's settings other than `threshold` and `min_size`."""
    return tuple(sorted((k, v) for k, v in option.get_params().items() if k not in ("min_size", "threshold")))


def _mask_key(data, labelers, members):
    """What the labeller settings `members` (one group) see of `data`: equal
    keys give equal labels. The labeller keeps the voxels at or above its
    threshold, so thresholds that select the same voxels are one case."""
    first = labelers[members[0]]
    mask = np.packbits(np.asarray(data) >= first.threshold)
    digest = hashlib.blake2b(mask.tobytes(), digest_size=16).hexdigest()
    return _labeler_key(first), tuple(sorted(labelers[j].min_size for j in members)), digest


def _image_counts(space, image, truth, exact=False):
    """Counts of every candidate on one image, sharing intermediate results.

    Every step's output is computed once and reused by all the candidates
    that share the settings up to that step. Labeller settings that differ
    only in `min_size` share one labelling, and one splitting per splitter
    (see :func:`_drop_small` and :func:`_pieces_of_large`); two thresholds
    that select the same voxels (as on a baseline's 0/1 map) share their
    labels and counts. With `exact`, every candidate runs its own labeller
    and splitter instead (a check of these shortcuts).
    """
    sizes = [len(options) for _, options in space]
    counts = np.zeros((*sizes, N_COUNTS))
    labeler_level = [name for name, _ in space].index("labeler")
    labelers = space[labeler_level][1]
    splits = space[labeler_level + 1][1]
    groups = {}
    for j, option in enumerate(labelers):
        key = j if exact else (_labeler_key(option), option.threshold)
        groups.setdefault(key, []).append(j)

    def label_group(data, members):
        """Counts of the labeller settings `members` (one group) and every splitter."""
        out = np.zeros((len(members), len(splits), N_COUNTS))
        smallest = min(members, key=lambda j: labelers[j].min_size)
        base = clone(labelers[smallest]).fit_transform(data)
        if exact:
            for a, j in enumerate(members):
                for k, split in enumerate(splits):
                    pieces = base if split == "passthrough" else clone(split).fit_transform(base)
                    out[a, k] = _counts(pieces, truth)
            return out
        base_sizes = np.bincount(base.ravel())
        for k, split in enumerate(splits):
            pieces, parent = _split_pieces(base, split)
            for a, j in enumerate(members):
                min_size = labelers[j].min_size
                kept = pieces if j == smallest else _pieces_of_large(pieces, parent, base_sizes, min_size)
                out[a, k] = _counts(kept, truth)
        return out

    def descend(level, data, prefix):
        if level == labeler_level:
            seen = {}
            for members in groups.values():
                key = None if exact else _mask_key(data, labelers, members)
                out = None if key is None else seen.get(key)
                if out is None:
                    out = label_group(data, members)
                    if key is not None:
                        seen[key] = out
                for a, j in enumerate(members):
                    counts[(*prefix, j)] = out[a]
            return
        for j, option in enumerate(space[level][1]):
            out = data if option == "passthrough" else clone(option).fit_transform(data)
            descend(level + 1, out, (*prefix, j))

    with warnings.catch_warnings():
        # Small EM fits may stop at max_iter, and empty images are reported by
        # PerVolume(on_error="empty"): neither is an error of the evaluation.
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", UserWarning)
        descend(0, image, ())
    return counts.reshape(-1, N_COUNTS)


def pooled_scores(counts):
    """Pooled scores from summed counts (one row per candidate)."""
    tp, fp, fn, iou_sum, vtp, vfp, vfn = counts.T
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 1.0)
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        pq = np.where(tp + fp + fn > 0, iou_sum / (tp + 0.5 * fp + 0.5 * fn), 1.0)
        dice = np.where(2 * vtp + vfp + vfn > 0, 2 * vtp / (2 * vtp + vfp + vfn), 1.0)
    return {"f1": f1, "precision": precision, "recall": recall, "pq": pq, "dice": dice}


def _quiet(function, *args):
    with warnings.catch_warnings():
        # Small EM fits may stop at max_iter, and empty images are reported by
        # PerVolume(on_error="empty"): neither is an error of the evaluation.
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", UserWarning)
        return function(*args)


def _predict(pipeline, image):
    return np.asarray(_quiet(pipeline.transform, image))


def _scores(predicted, labels):
    """Pooled object and voxel scores, with the functions the scorers use."""
    objects = match_objects(predicted, labels)
    return {
        "f1": objects["f1"],
        "precision": objects["precision"],
        "recall": objects["recall"],
        "pq": objects["panoptic_quality"],
        "dice": voxel_scores(predicted, labels)["dice"],
    }


# Rough relative cost of a method's grid per image, to start the long jobs first.
# Measured with the shared steps' options; a plain baseline searches fewer.
_COST = {"nanoseg": 8, "fixed": 10, "tile_maxima": 4, "multiotsu": 2, "otsu": 1, "li": 1}


def _cost(method):
    base = method.removesuffix(STEPS_SUFFIX)
    return _COST[base] * _n_other_options(method) / _n_other_options("nanoseg")


def tuning_counts(datasets, methods, quick, n_jobs, memory, log):
    """Counts of every candidate of every method on every tuning image.

    Each (method, image) pair is computed once, even when the image tunes
    two datasets (the bright_small tuning images are among those of EMPS
    all), and all pairs are spread over the `n_jobs` processes together.
    """
    function = memory.cache(_image_counts) if memory is not None else _image_counts
    jobs = {}
    for dataset in datasets:
        for index in dataset.tuning:
            for method in methods:
                key = (method, dataset.ids[index])
                if key not in jobs:
                    jobs[key] = (dataset.images[index], dataset.labels[index])
    order = sorted(jobs, key=lambda key: -_cost(key[0]) * jobs[key][0].size)
    log(f"searching: {len(order)} (method, image) pairs on {n_jobs} processes")
    start = time.perf_counter()
    results = Parallel(n_jobs=n_jobs, verbose=5 if len(order) > 20 else 0)(
        delayed(function)(search_space(method, quick), *jobs[(method, key)]) for method, key in order
    )
    log(f"searched in {time.perf_counter() - start:.0f} s")
    return dict(zip(order, results))


def evaluate(datasets, methods, quick, n_jobs, memory, log):
    """Tune every method on every dataset's tuning images, score on its held-out images."""
    counts = tuning_counts(datasets, methods, quick, n_jobs, memory, log)
    winners = []
    for dataset in datasets:
        for method in methods:
            space = search_space(method, quick)
            summed = np.sum([counts[(method, dataset.ids[i])] for i in dataset.tuning], axis=0)
            scores = pooled_scores(summed)
            best = int(np.argmax(scores["f1"]))  # first of equals, in grid order
            winners.append((dataset, method, space, candidate(space, best), float(scores["f1"][best])))

    # Every winner labels its dataset's tuning images (a check of the staged
    # search) and held-out images, all in one parallel pass.
    tasks = []
    for w, (dataset, _, space, choice, _) in enumerate(winners):
        pipeline = build_pipeline(space, choice)
        for side in ("tuning", "held_out"):
            tasks += [(w, side, i, pipeline) for i in getattr(dataset, side)]
    log(f"scoring: {len(tasks)} labellings")
    start = time.perf_counter()
    predicted = Parallel(n_jobs=n_jobs)(
        delayed(_predict)(pipeline, winners[w][0].images[i]) for w, _, i, pipeline in tasks
    )
    log(f"scored in {time.perf_counter() - start:.0f} s")
    results = {dataset.name: [] for dataset in datasets}
    for w, (dataset, method, space, choice, tuning_f1) in enumerate(winners):
        by_side = {}
        for side in ("tuning", "held_out"):
            pairs = [(p, t) for p, t in zip(predicted, tasks) if t[0] == w and t[1] == side]
            by_side[side] = _scores([p for p, _ in pairs], [dataset.labels[t[2]] for _, t in pairs])
        if not np.isclose(by_side["tuning"]["f1"], tuning_f1, rtol=0, atol=1e-12):
            raise AssertionError(
                f"{dataset.name}, {method}: the staged search scored {tuning_f1}, the pipeline "
                f"{by_side['tuning']['f1']} on the tuning images"
            )
        row = {
            "method": method,
            "tuning_f1": tuning_f1,
            **by_side["held_out"],
            "candidates": n_candidates(space),
            "setting": describe(space, choice),
        }
        results[dataset.name].append(row)
        log(
            f"{dataset.name:18s} {method:12s} held-out F1 {row['f1']:.3f} Dice {row['dice']:.3f} "
            f"(tuning F1 {tuning_f1:.3f}, {row['candidates']} candidates): {row['setting']}"
        )
    return results


# ---------------------------------------------------------------------------
# the learned pipeline, tuned by cross-validation
# ---------------------------------------------------------------------------


# Which voxels the classifier sees (NanoparticleClassifier's gate_recall): None
# classifies every pixel. A gate can only set pixels to 0 -- it saves time and
# never finds a particle the classifier misses -- and on 2D images classifying
# every pixel costs about a second an image, so these figures are the
# classifier's own. (The gate the classifier had when this was decided let
# through only half the annotated particle pixels of some EMPS images; see
# benchmarks/choose_classifier.py for today's gate.)
LEARNED_GATE = None


def learned_settings(quick=False):
    """Classifier settings the cross-validation chooses between.

    Every setting uses the package's default classifier and features, 50,000
    class-balanced training voxels (enough for the forest, and half the
    default, to bound the run time) and a fixed seed. Three settings are
    searched: at the default scales (1, 2 and 4 px), without and with
    borders between touching particles learned as a third class (0: no; 2:
    particle pixels within 2 px of another particle, which is what reaches
    across the one-pixel background lines that separate touching BAM
    particles -- a width of 1 marks almost none of them); and scales up to
    16 px (EMPS particles are 7 to 580 px across, 110 px median) without
    borders, which did best on EMPS tuning-half images in
    benchmarks/choose_classifier.py. (The fourth combination is left out to
    bound the run time.)

    Returns
    -------
    list of dict
        Keyword arguments of :class:`~nanoseg.NanoparticleClassifier`.
    """
    base = {"max_samples": 50_000, "gate_recall": LEARNED_GATE, "n_jobs": 1, "random_state": SEED}
    if quick:
        return [dict(base, border_width=width) for width in (0, 2)]
    return [
        dict(base, sigmas=None, border_width=0),
        dict(base, sigmas=None, border_width=2),
        dict(base, sigmas=(1.0, 2.0, 4.0, 8.0, 16.0), border_width=0),
    ]


def learned_steps(quick=False):
    """Labelling and splitting options searched for the learned pipeline.

    The labeller has ``radius=0``: a closing would bridge the gaps the
    classifier leaves between touching particles (its border class).

    Returns
    -------
    list of (str, list)
        A search space for :func:`_image_counts`: ``labeler`` then ``split``.
    """
    if quick:
        return [
            ("labeler", _grid(NanoparticleLabeler, threshold=[0.5, 0.7], min_size=[40], radius=[0], n_jobs=[1])),
            ("split", ["passthrough", ParticleSplitter(min_distance=8)]),
        ]
    return [
        (
            "labeler",
            _grid(
                NanoparticleLabeler,
                threshold=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
                min_size=[10, 40, 160, 640],
                radius=[0],
                n_jobs=[1],
            ),
        ),
        ("split", ["passthrough", ParticleSplitter(min_distance=8)]),
    ]


def grouped_folds(groups, n_folds=CV_FOLDS, seed=SEED):
    """Fold of each image: every group in one fold, folds of about equal size.

    Parameters
    ----------
    groups : sequence
        One group name per image (EMPS: its article; BAM: the image itself).
    n_folds : int
    seed : int
        Shuffles the groups before they are dealt out.

    Returns
    -------
    ndarray of int
        The fold, 0 to ``n_folds - 1``, of each image.
    """
    members = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    names = list(members)
    np.random.default_rng(seed).shuffle(names)
    # Largest groups first (the sort is stable: equal sizes stay shuffled),
    # each to the fold with fewest images so far.
    names.sort(key=lambda g: -len(members[g]))
    fold = np.zeros(len(groups), dtype=int)
    sizes = np.zeros(n_folds, dtype=int)
    for name in names:
        k = int(np.argmin(sizes))
        fold[members[name]] = k
        sizes[k] += len(members[name])
    return fold


def fold_counts(params, train_images, train_labels, test_images, test_labels, space):
    """Train a classifier on some images and count every labelling of others.

    Parameters
    ----------
    params : dict
        Keyword arguments of :class:`~nanoseg.NanoparticleClassifier`.
    train_images, train_labels : list of ndarray
        The images it learns from and their instance labels.
    test_images, test_labels : list of ndarray
        The images it predicts, and their labels to score against.
    space : list of (str, list)
        Labeller and splitter options (see :func:`learned_steps`).

    Returns
    -------
    counts : ndarray, shape (n_test_images, n_candidates, N_COUNTS)
        Counts of every labeller and splitter setting on every test image.
    info : dict
        The fitted model's ``gate_recall_`` and ``gate_fraction_``, and the
        seconds spent fitting and predicting.
    """
    start = time.perf_counter()
    model = _quiet(NanoparticleClassifier(**params).fit, train_images, train_labels)
    fitted = time.perf_counter()
    probabilities = _quiet(model.predict_proba, list(test_images))
    predicted = time.perf_counter()
    counts = np.stack([_image_counts(space, p, t) for p, t in zip(probabilities, test_labels)])
    info = {
        "gate_recall": model.gate_recall_,
        "gate_fraction": model.gate_fraction_,
        "fit_s": fitted - start,
        "predict_s": predicted - fitted,
    }
    return counts, info


def learned_training(dataset, emps_train):
    """Indices of the images the learned pipeline trains on: the tuning half,
    or `emps_train` of them drawn at random where the half is larger."""
    return _draw(dataset.tuning_pool or dataset.tuning, emps_train)


def cross_validate(plans, settings, space, n_folds, n_jobs, memory):
    """Out-of-fold counts of every (classifier setting, labelling) on each training set.

    Parameters
    ----------
    plans : list of (Dataset, list of int)
        Each dataset and the indices of its training images; the (setting,
        fold) fits of all of them are spread over the processes together,
        largest first.

    Returns
    -------
    list of (counts, infos)
        Per plan: `counts`, shape (n_settings, n_images, n_candidates,
        N_COUNTS), where row ``[s, i]`` is training image ``i`` labelled by
        the classifier of setting ``s`` trained on the folds without it; and
        `infos`, :func:`fold_counts`'s `info` per setting and fold.
    """
    function = memory.cache(fold_counts) if memory is not None else fold_counts
    jobs, folds = [], []
    for p, (dataset, train) in enumerate(plans):
        fold = grouped_folds([dataset.groups[i] for i in train], n_folds)
        folds.append(fold)
        for s, params in enumerate(settings):
            for k in range(n_folds):
                fit = [train[j] for j in np.flatnonzero(fold != k)]
                test = [train[j] for j in np.flatnonzero(fold == k)]
                jobs.append((p, s, k, fit, test, params))
    # Predicting a pixel costs about as much as training on one: order by pixels.
    jobs.sort(key=lambda job: -sum(plans[job[0]][0].images[i].size for i in job[3] + job[4]))
    results = Parallel(n_jobs=n_jobs, verbose=5 if len(jobs) > 20 else 0)(
        delayed(function)(params, *plans[p][0].subset(fit), *plans[p][0].subset(test), space)
        for p, _, _, fit, test, params in jobs
    )
    out = [
        (np.zeros((len(settings), len(train), n_candidates(space), N_COUNTS)), [[None] * n_folds for _ in settings])
        for _, train in plans
    ]
    for (p, s, k, _, _, _), (fold_result, info) in zip(jobs, results):
        out[p][0][s, np.flatnonzero(folds[p] == k)] = fold_result
        out[p][1][s][k] = info
    return out


def _fit_model(params, images, labels):
    return _quiet(NanoparticleClassifier(**params).fit, images, labels)


def _label_images(pipeline, images):
    return [_predict(pipeline, image) for image in images]


def learned_space(settings, space):
    """The learned pipeline's whole search space, in :func:`describe`'s form."""
    return [("classifier", [NanoparticleClassifier(**params) for params in settings]), *space]


def evaluate_learned(datasets, quick, n_jobs, memory, log, emps_train=LEARNED_EMPS_TRAIN):
    """Train, cross-validate and score the learned pipeline on every dataset.

    Parameters
    ----------
    datasets : list of Dataset
    quick : bool
        Two classifier settings and a small labelling grid: a smoke test.
    n_jobs : int
        Processes: (setting, fold) pairs, then held-out images, run in parallel.
    memory : joblib.Memory or None
        Caches each fold's counts.
    log : callable
    emps_train : int
        At most this many training images, drawn from the tuning half.

    Returns
    -------
    dict
        Per dataset name, a list with one result row (as :func:`evaluate`'s).
    """
    settings = learned_settings(quick)
    space = learned_steps(quick)
    whole = learned_space(settings, space)
    plans = [(dataset, learned_training(dataset, emps_train)) for dataset in datasets]
    for dataset, train in plans:
        log(
            f"{dataset.name}: learned pipeline, {len(settings)} classifier settings x {CV_FOLDS} folds "
            f"on {len(train)} training images"
        )
    start = time.perf_counter()
    cross_validated = cross_validate(plans, settings, space, CV_FOLDS, n_jobs, memory)
    log(f"cross-validated in {time.perf_counter() - start:.0f} s")
    winners = []
    for (dataset, train), (counts, infos) in zip(plans, cross_validated):
        scores = pooled_scores(counts.sum(axis=1).reshape(-1, N_COUNTS))
        best = int(np.argmax(scores["f1"]))  # first of equals: settings, then labellers, in order
        choice = candidate(whole, best)
        recall = np.mean([info["gate_recall"] for info in infos[choice[0]]])
        seconds = sum(info["fit_s"] + info["predict_s"] for fold_infos in infos for info in fold_infos)
        log(
            f"{dataset.name}: best pooled out-of-fold F1 {scores['f1'][best]:.3f}: {describe(whole, choice)} "
            f"(mean training gate recall {recall:.3f}; {seconds:.0f} s fitting and predicting)"
        )
        for s in range(len(settings)):
            per = pooled_scores(counts[s].sum(axis=0))["f1"]
            log(f"    {describe(whole[:1], (s,))}: best F1 {per.max():.3f}")
        winners.append((dataset, train, choice, float(scores["f1"][best])))

    # Final models: each winner's classifier trained on all its training images.
    start = time.perf_counter()
    models = Parallel(n_jobs=n_jobs)(
        delayed(_fit_model)(settings[choice[0]], *dataset.subset(train)) for dataset, train, choice, _ in winners
    )
    log(f"final models trained in {time.perf_counter() - start:.0f} s")
    tasks = []
    for w, ((dataset, _, choice, _), model) in enumerate(zip(winners, models)):
        steps = [("classifier", model)]
        for (name, options), j in zip(space, choice[1:]):
            steps.append((name, options[j] if options[j] == "passthrough" else clone(options[j])))
        pipeline = Pipeline(steps)
        # A few chunks per process: each task ships the fitted forest once.
        for chunk in np.array_split(np.asarray(dataset.held_out), max(1, min(len(dataset.held_out), 2 * n_jobs))):
            tasks.append((w, pipeline, [int(i) for i in chunk]))
    start = time.perf_counter()
    predicted = Parallel(n_jobs=n_jobs)(
        delayed(_label_images)(pipeline, [winners[w][0].images[i] for i in chunk]) for w, pipeline, chunk in tasks
    )
    log(f"held-out images labelled in {time.perf_counter() - start:.0f} s")
    results = {}
    for w, (dataset, train, choice, tuning_f1) in enumerate(winners):
        labels = [p for (v, _, _), chunk in zip(tasks, predicted) if v == w for p in chunk]
        truth = [dataset.labels[i] for v, _, chunk in tasks if v == w for i in chunk]
        row = {
            "method": LEARNED,
            "tuning_f1": tuning_f1,
            **_scores(labels, truth),
            "candidates": n_candidates(whole),
            "setting": describe(whole, choice),
            "n_train": len(train),
        }
        results[dataset.name] = [row]
        log(
            f"{dataset.name:18s} {LEARNED:12s} held-out F1 {row['f1']:.3f} Dice {row['dice']:.3f} "
            f"(cross-validated F1 {tuning_f1:.3f}, {row['candidates']} candidates, "
            f"{len(train)} training images): {row['setting']}"
        )
    return results


def _rst_table(header, rows):
    """An RST simple table (also readable as plain text)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    rule = "  ".join("=" * w for w in widths)

    def line(cells):
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    return [rule, line(header), rule, *(line(row) for row in rows), rule]


def _verdict(rows):
    """One sentence per comparison: nanoseg's (and the learned pipeline's)
    held-out F1 against the best baseline's."""
    f1 = {row["method"]: row["f1"] for row in rows}
    sentences = []
    thresholds = [name for name in GRID_METHODS if name != "nanoseg" and name in f1]
    if LEARNED in f1 and thresholds:
        best = max(thresholds, key=f1.get)
        margin = f1[LEARNED] - f1[best]
        outcome = "meets" if margin >= 0.10 else "does not meet"
        sentences.append(
            f"Learned pipeline: {f1[LEARNED]:.3f}, {margin:+.3f} against the best threshold, on its own or "
            f"inside nanoseg's pipeline ({best} {f1[best]:.3f}): it {outcome} the goal of +0.10."
        )
    if "nanoseg" not in f1:
        return [" ".join(sentences)] if sentences else []
    for label, names in (
        ("global thresholds", BASELINES),
        ("global thresholds inside nanoseg's pipeline", [b + STEPS_SUFFIX for b in BASELINES]),
    ):
        present = [name for name in names if name in f1]
        if not present:
            continue
        best = max(present, key=f1.get)
        outcome = "ahead of" if f1["nanoseg"] > f1[best] else "not ahead of"
        sentences.append(
            f"Against {label}: nanoseg {f1['nanoseg']:.3f} is {outcome} the best, {best} {f1[best]:.3f}."
        )
    return [" ".join(sentences)] if sentences else []


def report(results, datasets):
    """The results as RST: one table per dataset, then the chosen settings."""
    lines = []
    for dataset in datasets:
        rows = results[dataset.name]
        n_particles = sum(int(np.count_nonzero(np.unique(dataset.labels[i]))) for i in dataset.held_out)
        tuning = f"{len(dataset.tuning)}"
        if dataset.n_tuning_pool > len(dataset.tuning):
            tuning += f" (drawn from {dataset.n_tuning_pool})"
        title = f"{dataset.name}: {tuning} tuning images, {len(dataset.held_out)} held-out images ({n_particles} particles)"
        best = max(row["f1"] for row in rows)
        table = [
            [
                row["method"] + (" *" if row["f1"] == best else ""),
                f"{row['f1']:.3f}",
                f"{row['precision']:.3f}",
                f"{row['recall']:.3f}",
                f"{row['dice']:.3f}",
                f"{row['pq']:.3f}",
                f"{row['tuning_f1']:.3f}",
                row["candidates"],
            ]
            for row in rows
        ]
        header = ["method", "object F1", "precision", "recall", "Dice", "PQ", "tuning F1", "candidates"]
        lines += [title, "~" * len(title), "", *_rst_table(header, table), ""]
        lines += [*_verdict(rows), ""]
        lines += ["Chosen settings:", ""]
        for row in rows:
            trained = ""
            if "n_train" in row:
                trained = f" (trained on {row['n_train']} tuning images, settings by {CV_FOLDS}-fold cross-validation)"
            lines.append(f"- {row['method']}{trained}: ``{row['setting']}``")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="shared data folder (default: ../shared/data)")
    parser.add_argument("--quick", action="store_true", help="small search spaces and image sets: a smoke test")
    parser.add_argument("--output", type=Path, default=None, help="also write the tables (RST) to this file")
    parser.add_argument("--datasets", nargs="*", default=None, choices=("bright_small", "all", "bam"))
    parser.add_argument(
        "--methods",
        nargs="*",
        default=list(METHODS),
        choices=METHODS,
        help=f"methods to run (default all); '--methods {LEARNED}' runs only the learned pipeline",
    )
    parser.add_argument(
        "--learned-emps-train",
        type=int,
        default=LEARNED_EMPS_TRAIN,
        help=f"EMPS images the learned pipeline trains on, drawn from the tuning half (default {LEARNED_EMPS_TRAIN})",
    )
    parser.add_argument(
        "--emps-tuning",
        type=int,
        default=EMPS_TUNING,
        help=f"EMPS images settings are chosen on, drawn from the tuning half (default {EMPS_TUNING})",
    )
    parser.add_argument("--n-jobs", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--cache", type=Path, default=None, help="cache the per-image search results in this folder")
    args = parser.parse_args(argv)

    root = args.data if args.data is not None else default_data_dir()
    if not (root / "emps-train").is_dir() or not (root / "bam-tio2-sem").is_dir():
        parser.exit(1, f"no evaluation data in {root}: pass --data DIR (see benchmarks/evaluate_real.py)\n")

    def log(message):
        print(message, flush=True)

    start = time.perf_counter()
    emps_tuning = min(args.emps_tuning, 24) if args.quick else args.emps_tuning
    datasets = load_datasets(root, emps_tuning=emps_tuning, quick=args.quick)
    keys = {"EMPS bright_small": "bright_small", "EMPS all": "all", "BAM TiO2": "bam"}
    if args.datasets:
        datasets = [d for d in datasets if keys[d.name] in args.datasets]
    for dataset in datasets:
        log(f"{dataset.name}: {len(dataset.tuning)} tuning, {len(dataset.held_out)} held-out images")
    memory = None
    if args.cache is not None:
        from joblib import Memory

        memory = Memory(args.cache, verbose=0)
    grid_methods = [m for m in args.methods if m != LEARNED]
    results = {dataset.name: [] for dataset in datasets}
    if grid_methods:
        results = evaluate(datasets, grid_methods, args.quick, args.n_jobs, memory, log)
    if LEARNED in args.methods:
        emps_train = min(args.learned_emps_train, 12) if args.quick else args.learned_emps_train
        learned = evaluate_learned(datasets, args.quick, args.n_jobs, memory, log, emps_train)
        for name, rows in learned.items():
            results[name] += rows
    total = time.perf_counter() - start
    command = " ".join(["python benchmarks/evaluate_real.py", *(argv if argv is not None else sys.argv[1:])])
    text = report(results, datasets)
    footer = (
        f"``{command}``: {total / 60:.1f} min on {os.cpu_count()} CPUs ({platform.machine()}, "
        f"{platform.python_implementation()} {platform.python_version()}), n_jobs={args.n_jobs}, "
        f"{time.strftime('%Y-%m-%d')}."
    )
    print()
    print(text)
    print(footer)
    if args.output is not None:
        args.output.write_text(text + "\n" + footer + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
