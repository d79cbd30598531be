"""How far can a per-image intensity model go on "EMPS all"? A check on unused tuning images.

``evaluate_real.py`` chooses settings on 32 images drawn from the 183 of the
EMPS tuning half. This script works on the other 151 tuning-half images
(never on held-out images) and asks two questions of nanoseg's
:class:`~nanoseg.NanoparticleMixture` and Otsu's threshold:

1. **With the pipeline's steps**, and each method's setting chosen with
   hindsight on these very images, which one scores better? Both search
   the evaluation's background, smoothing, labelling and splitting options,
   with a posterior threshold of 0.999 added; nanoseg searches four mixture
   settings written for dense particles (Otsu seed level, monotone
   posterior, narrow halos).
2. **Without them** (8-connected components of at least 40 px), where does
   each method put its cut? Every image's object matches are counted for
   every cut in steps of 2 grey levels, once; then a method that gives one
   cut per image is scored by reading its cuts off that table (the cut is
   rounded to the nearest level counted). The best cut of each image
   (the one maximising 2 TP - FP - FN) gives the ceiling of any per-image
   global cut.

Run from the repository root (about 10 min on 2 CPUs)::

    python benchmarks/emps_ceiling.py [--data DIR] [--n-jobs 2]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed
from skimage.filters import threshold_otsu
from skimage.measure import label
from sklearn.exceptions import ConvergenceWarning

sys.path.insert(0, str(Path(__file__).resolve().parent))

import evaluate_real as ev

from nanoseg import NanoparticleLabeler, NanoparticleMixture
from nanoseg.baselines import GlobalThreshold
from nanoseg.metrics import match_objects
from nanoseg.tuning import PerVolume

# Mixture settings for images crowded with particles (see the evaluation page).
DENSE_SETTINGS = (
    {"halo": "box", "halo_pad": 2, "min_seed_size": 5},
    {"halo": "dilation", "halo_pad": 5, "min_seed_size": 5},
    {"halo": "dilation", "halo_pad": 5, "min_seed_size": 20},
    {"halo": "dilation", "halo_pad": 10, "min_seed_size": 5},
)
POSTERIOR_THRESHOLDS = (0.95, 0.99, 0.995, 0.999, 0.9999)
LEVELS = np.arange(0, 256, 2)
MIN_SIZE = 40


def dense_mixture(setting):
    return NanoparticleMixture(percentile_low="otsu", monotone_posterior=True, n_jobs=1, **setting)


def unused_tuning_images(root):
    """The EMPS tuning-half images `evaluate_real.py` does not tune on."""
    ids, images, labels, articles = ev.load_emps(root)
    _, tuning, _ = ev.split_emps(root, ids, articles)
    drawn = set(ev._draw(tuning, ev.EMPS_TUNING))
    unused = [i for i in tuning if i not in drawn]
    return [images[i] for i in unused], [labels[i] for i in unused]


# ---------------------------------------------------------------------------
# 1. with the pipeline's steps
# ---------------------------------------------------------------------------


def pipeline_space(method):
    """The evaluation's shared steps, with a posterior threshold of 0.999 added."""
    steps = ev.shared_steps()
    labelers = steps["labeler"]
    steps["labeler"] = ev._grid(
        NanoparticleLabeler,
        threshold=sorted({option.threshold for option in labelers} | {0.999}),
        min_size=sorted({option.min_size for option in labelers}),
        n_jobs=[1],
    )
    if method == "nanoseg":
        estimators = [dense_mixture(setting) for setting in DENSE_SETTINGS]
    else:
        estimators = [GlobalThreshold(method="otsu")]
    steps["intensity"] = [PerVolume(est, on_error="empty") for est in estimators]
    return [(name, steps[name]) for name in ev.STEPS]


def best_in_hindsight(method, images, labels, n_jobs):
    space = pipeline_space(method)
    counts = Parallel(n_jobs=n_jobs)(delayed(ev._image_counts)(space, x, y) for x, y in zip(images, labels))
    f1 = ev.pooled_scores(np.sum(counts, axis=0))["f1"]
    best = int(np.argmax(f1))
    return float(f1[best]), ev.describe(space, ev.candidate(space, best))


# ---------------------------------------------------------------------------
# 2. without them: one cut per image
# ---------------------------------------------------------------------------


def counts_by_cut(image, truth):
    """(len(LEVELS), 3) object tp, fp, fn of ``image > level`` for every level."""
    out = np.zeros((LEVELS.size, 3))
    for k, level in enumerate(LEVELS):
        components = ev._drop_small(label(image > level, connectivity=2), MIN_SIZE)
        matched = match_objects(components, truth)
        out[k] = matched["tp"], matched["fp"], matched["fn"]
    return out


def mixture_cuts(image, setting):
    """First intensity kept at each posterior threshold (256: none), for one image."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        try:
            model = dense_mixture(setting).fit(image)
        except (ValueError, RuntimeError):
            return np.full(len(POSTERIOR_THRESHOLDS), 256)
        lut = model.posterior_luts(model.slice_weights(image))[0]
    return np.array([int(np.argmax(lut >= t)) if (lut >= t).any() else 256 for t in POSTERIOR_THRESHOLDS])


def score_cuts(tables, cuts):
    """Pooled object F1 of one cut per image (mask: intensity >= cut)."""
    total = np.zeros(3)
    for table, cut in zip(tables, cuts):
        total += table[int(np.argmin(np.abs(LEVELS - max(cut - 1, 0))))]
    tp, fp, fn = total
    return 2 * tp / (2 * tp + fp + fn)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="shared data folder (default: ../shared/data)")
    parser.add_argument("--n-jobs", type=int, default=2, help="processes (default 2)")
    args = parser.parse_args(argv)
    root = args.data if args.data is not None else ev.default_data_dir()
    if not (root / "emps-train").is_dir():
        parser.exit(1, f"no EMPS data in {root}: pass --data DIR\n")
    start = time.perf_counter()
    images, labels = unused_tuning_images(root)
    print(f"{len(images)} unused EMPS tuning-half images")

    print("\n1. With the pipeline's steps, each method's setting chosen with hindsight:")
    for method in ("otsu", "nanoseg"):
        f1, setting = best_in_hindsight(method, images, labels, args.n_jobs)
        print(f"  {method:8s} object F1 {f1:.3f}: {setting}", flush=True)

    print(f"\n2. One cut per image, labelling only (components of at least {MIN_SIZE} px):")
    tables = Parallel(n_jobs=args.n_jobs)(delayed(counts_by_cut)(x, y) for x, y in zip(images, labels))
    otsu = [int(threshold_otsu(x)) + 1 for x in images]
    print(f"  otsu                          object F1 {score_cuts(tables, otsu):.3f}")
    for setting in DENSE_SETTINGS:
        cuts = np.array(Parallel(n_jobs=args.n_jobs)(delayed(mixture_cuts)(x, setting) for x in images))
        scores = ", ".join(
            f"{t}: {score_cuts(tables, cuts[:, k]):.3f}" for k, t in enumerate(POSTERIOR_THRESHOLDS)
        )
        name = ", ".join(f"{k}={v}" for k, v in setting.items())
        print(f"  nanoseg ({name}) by posterior threshold: {scores}")
    best = [LEVELS[int(np.argmax(2 * t[:, 0] - t[:, 1] - t[:, 2]))] + 1 for t in tables]
    print(f"  best cut of each image        object F1 {score_cuts(tables, best):.3f}")
    print(f"\n{(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
