"""Choose NanoparticleClassifier's default classifier and settings by measurement.

Only the *tuning* halves of ``evaluate_real.py``'s split are used -- never a
held-out image -- so that the choice made here does not leak into the
held-out figures of the evaluation page.

Three questions, each answered by 3-fold cross-validation on tuning-half
images (on EMPS each article in one fold, so that every score is on
articles -- acquisitions -- the classifier never saw):

1. **Which classifier?** Random forests of two sizes, extra trees, gradient
   boosting, logistic regression (on standardised features) and k nearest
   neighbours (as in the pixel-classification literature) inside
   :class:`~nanoseg.NanoparticleClassifier` with its default features.
   Accuracy is the pooled out-of-fold object F1 (IoU > 0.5); speed is the
   classifier's own prediction rate, in million feature rows (voxels) a
   second, with one thread (``time.perf_counter``), on the default features
   of one BAM tuning image -- the part of the cost that grows with the
   volume.
2. **Which per-image intensity normalisation carries over to new
   acquisitions?** ``normalize="otsu"`` (each image's Otsu split at 0, its
   class means near -1 and +1), ``"otsu+background"`` (the same, with the
   intensity and its smoothings also in background units; the default),
   ``"background"`` (robust z-score of each image) and ``"none"`` (raw grey
   levels / 255), scored on EMPS articles the classifier was not trained
   on. ``--normalisation`` answers this question alone, on all three sets
   (with ``--emps-articles 30`` for a larger cross-article set).
3. **Does the mixture's posterior help as a feature?** With and without
   ``prior=NanoparticleMixture()``; and, since the gate decides which pixels
   are classified at all, the default gate (``gate_recall=0.99``) against
   none (``gate_recall=None``); and the default scales (1, 2, 4 px) against
   scales up to 16 px.

Each probability map is labelled by :class:`~nanoseg.NanoparticleLabeler`
(``radius=0``) at every threshold (0.3 to 0.9) and minimum size (10 to 640
px) of ``evaluate_real.learned_steps``, without splitting. Two F1 figures
are given: with the threshold and minimum size chosen inside the
cross-validation (for each fold, the setting with the best pooled F1 on the
other folds' out-of-fold maps scores this fold; "F1 tuned"), and with the
threshold fixed at 0.5 (the minimum size chosen the same way; "F1 @0.5").

Sets (tuning halves only): the 13 EMPS bright_small tuning images (12
articles; small bright particles, the package's target) and 6 of the 20 BAM
tuning images (touching particles; one session, folded image by image), on
which the classifiers are compared, and 12 images drawn from the 183 EMPS
tuning-half images ("EMPS articles", 10 articles: the cross-acquisition
question), on which the settings are compared.
(The sets are small: the script was sized to run in ~10 min on two CPUs
shared with other work; the ranking, not the third decimal, is the result.)

Settings shared by every run: 20,000 class-balanced training voxels,
``border_width=2`` (on BAM a width of 1 marks almost no pixel: touching
particles there are separated by a one-pixel background line, so their
pixels are 2 px apart), a fixed seed, one thread per process.

Run from the repository root (~8 min on 2 CPUs, longer when they are shared)::

    python benchmarks/choose_classifier.py
    python benchmarks/choose_classifier.py --quick     # smoke test of the code, ~1 min
    python benchmarks/choose_classifier.py --normalisation --emps-articles 30   # ~10 min

The data folder is found as in ``evaluate_real.py`` (``--data DIR``, or
``NANOSEG_SHARED_DATA``, or ``../shared/data`` next to the repository).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed
from sklearn.ensemble import ExtraTreesClassifier, HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))

import evaluate_real as ev  # noqa: E402  (the benchmarks folder is not a package)

from nanoseg import NanoparticleClassifier, NanoparticleMixture  # noqa: E402
from nanoseg.classifier import default_classifier  # noqa: E402

SEED = ev.SEED
# EMPS tuning-half images of the cross-article comparison (drawn at random
# from the 183; their articles are kept whole in the folds): enough to rank
# the settings, few enough for the whole script to run in ~10 min on 2
# shared CPUs.
EMPS_ARTICLES = 12
# BAM tuning images (of 20) on which the classifiers are also compared.
BAM_IMAGES = 6
# Training voxels per model, class-balanced: fewer than the package's default
# (100,000) to keep the 45 fits affordable; the same for every candidate.
MAX_SAMPLES = 20_000
_MAX_SAMPLES = [MAX_SAMPLES]  # --quick lowers it: a smoke test of the code, not a result
BORDER_WIDTH = 2
# Feature rows each classifier predicts in the speed test (k nearest
# neighbours, which compares every row with every training voxel, fewer).
SPEED_ROWS = 200_000
SPEED_ROWS_KNN = 10_000


def classifiers():
    """The candidate classifiers, by name (unfitted, one thread each).

    Returns
    -------
    dict
        Name to scikit-learn classifier. ``rf50_d12`` is the package's
        current default (:func:`nanoseg.classifier.default_classifier`).
    """
    return {
        "rf50_d12 (default)": default_classifier(n_jobs=1, random_state=SEED),
        "rf100_d16": RandomForestClassifier(
            n_estimators=100, max_depth=16, min_samples_leaf=2, n_jobs=1, random_state=SEED
        ),
        "extratrees100": ExtraTreesClassifier(n_estimators=100, min_samples_leaf=2, n_jobs=1, random_state=SEED),
        "histgb100": HistGradientBoostingClassifier(max_iter=100, random_state=SEED),
        "logistic": make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
        "knn15": KNeighborsClassifier(n_neighbors=15, n_jobs=1),
    }


def base_params(**changes):
    """Keyword arguments of :class:`~nanoseg.NanoparticleClassifier` shared by every run."""
    params = {"max_samples": _MAX_SAMPLES[0], "border_width": BORDER_WIDTH, "n_jobs": 1, "random_state": SEED}
    params.update(changes)
    return params


#: Name of the default settings in the settings table.
DEFAULT = "default (otsu+background, gate 0.99)"


def setting_variants():
    """The settings compared with the default classifier (question 2 and 3).

    Also the scales of the features: up to 16 px, for EMPS particles of
    tens to hundreds of pixels.
    """
    return {
        DEFAULT: base_params(),
        'normalize="otsu"': base_params(normalize="otsu"),
        'normalize="background"': base_params(normalize="background"),
        'normalize="none"': base_params(normalize="none"),
        "prior=NanoparticleMixture()": base_params(prior=NanoparticleMixture(n_jobs=1)),
        "gate_recall=None": base_params(gate_recall=None),
        "sigmas=(1, 2, 4, 8, 16)": base_params(sigmas=(1.0, 2.0, 4.0, 8.0, 16.0)),
    }


def normalisation_variants():
    """The per-image normalisations compared with ``--normalisation``, by name,
    with the sets each runs on (the scales up to 16 px on the EMPS sets only)."""
    everywhere = ["EMPS bright_small", "EMPS articles", "BAM TiO2"]
    emps = ["EMPS bright_small", "EMPS articles"]
    wide = (1.0, 2.0, 4.0, 8.0, 16.0)
    return [
        ('normalize="otsu"', base_params(normalize="otsu"), everywhere),
        ('normalize="background"', base_params(normalize="background"), everywhere),
        ('normalize="otsu+background" (default)', base_params(normalize="otsu+background"), everywhere),
        ('normalize="none"', base_params(normalize="none"), emps),
        ('"otsu", sigmas=(1, ..., 16)', base_params(normalize="otsu", sigmas=wide), emps),
        ('"background", sigmas=(1, ..., 16)', base_params(normalize="background", sigmas=wide), emps),
    ]


# ---------------------------------------------------------------------------
# data: the tuning halves only
# ---------------------------------------------------------------------------


def tuning_sets(root, quick=False, n_articles=EMPS_ARTICLES, n_bam=BAM_IMAGES):
    """The three sets of tuning images, with the group of each image.

    Parameters
    ----------
    root : Path
        The shared data folder.
    quick : bool
        Four images a set: a smoke test.
    n_articles : int
        EMPS tuning-half images drawn for the cross-article set.
    n_bam : int
        BAM tuning images drawn.

    Returns
    -------
    list of ev.Dataset
        Each ``Dataset`` holds *only* tuning-half images (in ``tuning``);
        ``held_out`` is empty.
    """
    sets = []
    for dataset in ev.load_datasets(root, emps_tuning=None, quick=quick):
        pool = dataset.tuning_pool or dataset.tuning
        if dataset.name == "EMPS all":
            pool = ev._draw(pool, 4 if quick else n_articles)
            name = "EMPS articles"
        elif dataset.name.startswith("BAM"):
            pool = ev._draw(pool, 4 if quick else n_bam)
            name = dataset.name
        else:
            pool = ev._draw(pool, 4) if quick else pool
            name = dataset.name
        images, labels = dataset.subset(pool)
        subset = ev.Dataset(name, [dataset.ids[i] for i in pool], images, labels, list(range(len(pool))), [])
        subset.groups = [dataset.groups[i] for i in pool]
        sets.append(subset)
    return sets


# ---------------------------------------------------------------------------
# cross-validation
# ---------------------------------------------------------------------------


def nested_f1(counts, fold, allowed=None):
    """Pooled F1 with the labelling chosen on the other folds.

    Parameters
    ----------
    counts : ndarray, shape (n_images, n_candidates, N_COUNTS)
        Out-of-fold counts of every labelling of every image.
    fold : ndarray of int
        Fold of each image.
    allowed : ndarray of bool, optional
        Labellings that may be chosen (all by default).

    Returns
    -------
    float
        The F1 of the pooled counts, each fold counted at the labelling
        with the best pooled F1 on the other folds' images.
    """
    allowed = np.ones(counts.shape[1], dtype=bool) if allowed is None else allowed
    total = np.zeros(ev.N_COUNTS)
    for k in np.unique(fold):
        f1 = ev.pooled_scores(counts[fold != k].sum(axis=0))["f1"]
        best = int(np.argmax(np.where(allowed, f1, -1.0)))
        total += counts[fold == k, best].sum(axis=0)
    return float(ev.pooled_scores(total[None])["f1"][0])


def run_jobs(sets, configs, space, n_jobs, log, memory=None):
    """Out-of-fold counts of every (configuration, set) pair.

    `configs` holds ``(name, params, set names)``: each configuration runs
    on the listed sets only.

    Returns
    -------
    dict
        ``(config name, set name)`` to ``(counts, fold, infos)``.
    """
    jobs = []
    folds = {}
    for dataset in sets:
        fold = ev.grouped_folds(dataset.groups, ev.CV_FOLDS)
        folds[dataset.name] = fold
        for config, params, names in configs:
            if dataset.name not in names:
                continue
            for k in range(ev.CV_FOLDS):
                fit = list(np.flatnonzero(fold != k))
                test = list(np.flatnonzero(fold == k))
                jobs.append((config, dataset, k, fit, test, params))
    # Slow classifiers first, so the two processes finish together.
    jobs.sort(key=lambda job: -_job_cost(job[0]) * sum(job[1].images[i].size for i in job[3] + job[4]))
    log(f"{len(jobs)} (configuration, set, fold) fits on {n_jobs} processes")
    start = time.perf_counter()
    function = memory.cache(ev.fold_counts) if memory is not None else ev.fold_counts
    results = Parallel(n_jobs=n_jobs, verbose=5)(
        delayed(function)(params, *dataset.subset(fit), *dataset.subset(test), space)
        for _, dataset, _, fit, test, params in jobs
    )
    log(f"cross-validated in {time.perf_counter() - start:.0f} s")
    out = {}
    for (config, dataset, k, _, test, _), (counts, info) in zip(jobs, results):
        key = (config, dataset.name)
        if key not in out:
            n = len(dataset.images)
            out[key] = (np.zeros((n, *counts.shape[1:])), folds[dataset.name], [None] * ev.CV_FOLDS)
        out[key][0][test] = counts
        out[key][2][k] = info
    return out


def _job_cost(config):
    return 3.0 if ("rf100" in config or "extratrees" in config or "prior" in config) else 1.0


# ---------------------------------------------------------------------------
# speed
# ---------------------------------------------------------------------------


def prediction_speed(dataset, candidates, log):
    """Each classifier's prediction rate on the default features of one image.

    Every classifier is trained (inside a NanoparticleClassifier, so on the
    voxels and classes the package would use) on the set's second image,
    then predicts feature rows of the first image; one thread.

    Returns
    -------
    dict
        Name to ``(fit seconds, million rows per second)``.
    """
    out = {}
    rng = np.random.default_rng(SEED)
    with threadpool_limits(1):
        features = None
        for name, estimator in candidates.items():
            start = time.perf_counter()
            model = ev._quiet(
                NanoparticleClassifier(classifier=estimator, **base_params()).fit, dataset.images[1], dataset.labels[1]
            )
            fit_s = time.perf_counter() - start
            if features is None:
                stack = model.features_of(dataset.images[0])
                features = stack.reshape(stack.shape[0], -1).T
                features = np.ascontiguousarray(features[rng.permutation(len(features))[:SPEED_ROWS]])
            rows = features[:SPEED_ROWS_KNN] if "knn" in name else features
            model.estimator_.predict_proba(rows[:1000])  # warm-up (lazy initialisation)
            start = time.perf_counter()
            model.estimator_.predict_proba(rows)
            seconds = time.perf_counter() - start
            out[name] = (fit_s, len(rows) / seconds / 1e6)
            log(f"  {name}: fit {fit_s:.1f} s, predict {len(rows) / seconds / 1e6:.3f} Mvoxel/s")
    return out, features.shape[1]


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def table(results, configs, sets, space, extra=None):
    """RST table: one row per configuration, F1 tuned / F1 @0.5 per set."""
    labelers = space[0][1]
    at_half = np.array([option.threshold == 0.5 for option in labelers for _ in space[1][1]])
    header = ["configuration"]
    for dataset in sets:
        header += [f"{dataset.name} F1 tuned", "F1 @0.5"]
    if extra is not None:
        header += extra[0]
    rows = []
    for config, _ in configs:
        row = [config]
        for dataset in sets:
            key = (config, dataset.name)
            if key not in results:
                row += ["--", "--"]
                continue
            counts, fold, _ = results[key]
            row += [f"{nested_f1(counts, fold):.3f}", f"{nested_f1(counts, fold, at_half):.3f}"]
        if extra is not None:
            row += extra[1](config)
        rows.append(row)
    return ev._rst_table(header, rows)


def gate_lines(results, configs, sets):
    """Mean training gate recall and gate fraction of each configuration, per set."""
    lines = []
    for config, _ in configs:
        parts = []
        for dataset in sets:
            key = (config, dataset.name)
            if key in results:
                infos = results[key][2]
                recall = np.mean([info["gate_recall"] for info in infos])
                fraction = np.mean([info["gate_fraction"] for info in infos])
                parts.append(f"{dataset.name} {recall:.3f} / {fraction:.3f}")
        lines.append(f"- {config}: " + "; ".join(parts))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="shared data folder (default: ../shared/data)")
    parser.add_argument("--quick", action="store_true", help="few images and configurations: a smoke test")
    parser.add_argument("--n-jobs", type=int, default=2, help="processes (default 2)")
    parser.add_argument(
        "--emps-articles",
        type=int,
        default=EMPS_ARTICLES,
        help=f"EMPS tuning-half images of the cross-article set (default {EMPS_ARTICLES})",
    )
    parser.add_argument(
        "--normalisation",
        action="store_true",
        help="only compare the per-image normalisations (use with --emps-articles 30)",
    )
    parser.add_argument("--cache", type=Path, default=None, help="cache each fold's counts in this folder")
    parser.add_argument("--output", type=Path, default=None, help="also write the tables (RST) to this file")
    args = parser.parse_args(argv)
    root = args.data if args.data is not None else ev.default_data_dir()
    if not (root / "emps-train").is_dir() or not (root / "bam-tio2-sem").is_dir():
        parser.exit(1, f"no evaluation data in {root}: pass --data DIR (see benchmarks/evaluate_real.py)\n")

    def log(message):
        print(message, flush=True)

    start = time.perf_counter()
    if args.quick:
        _MAX_SAMPLES[0] = 3000
    sets = tuning_sets(root, args.quick, args.emps_articles)
    for dataset in sets:
        log(f"{dataset.name}: {len(dataset.images)} tuning-half images, {len(set(dataset.groups))} groups")
    space = ev.learned_steps(quick=False)
    space = [space[0], ("split", ["passthrough"])]
    memory = None
    if args.cache is not None:
        from joblib import Memory

        memory = Memory(args.cache, verbose=0)
    if args.normalisation:
        return normalisation_main(args, argv, sets, space, memory, log, start)
    candidates = classifiers()
    # k nearest neighbours is left out of the cross-validation: at the speed
    # measured below it would take hours to predict the folds' images.
    accuracy_candidates = {name: c for name, c in candidates.items() if not name.startswith("knn")}
    if args.quick:
        accuracy_candidates = {name: accuracy_candidates[name] for name in ("rf50_d12 (default)", "logistic")}
    # Classifiers are compared on bright_small and BAM; the default one also
    # runs on the cross-article set, where the settings are compared (on
    # articles the model did not see).
    small = ["EMPS bright_small", "BAM TiO2"]
    emps = ["EMPS articles"]
    classifier_configs = [
        (name, base_params(classifier=c), small + emps if name.startswith("rf50_d12") else small)
        for name, c in accuracy_candidates.items()
    ]
    variants = setting_variants()
    if args.quick:
        variants = {name: variants[name] for name in list(variants)[:2]}
    # The default configuration of the settings comparison is the default
    # classifier's row of the classifier comparison: run it once.
    default_name = "rf50_d12 (default)"
    variant_configs = [(name, params, emps) for name, params in variants.items() if name != DEFAULT]
    results = run_jobs(sets, classifier_configs + variant_configs, space, args.n_jobs, log, memory)
    for dataset in sets:
        if (default_name, dataset.name) in results:
            results[(DEFAULT, dataset.name)] = results[(default_name, dataset.name)]

    log("prediction speed (one thread):")
    bam = next(d for d in sets if d.name.startswith("BAM"))
    speeds, n_features = prediction_speed(bam, candidates if not args.quick else accuracy_candidates, log)

    def speed_cells(config):
        if config not in speeds:
            return ["--", "--"]
        fit_s, rate = speeds[config]
        return [f"{fit_s:.1f}", f"{rate:.3f}"]

    all_classifiers = [(name, None) for name in (candidates if not args.quick else accuracy_candidates)]
    lines = ["Classifiers (default features, normalize='otsu+background', gate_recall=0.99, no prior)", ""]
    lines += table(results, all_classifiers, sets, space, (["fit s", "Mvoxel/s"], speed_cells))
    lines += [
        "",
        f"Speed: predict_proba on {SPEED_ROWS} feature rows ({SPEED_ROWS_KNN} for k nearest neighbours) "
        f"of one BAM tuning image, {n_features} features, one thread; fit: NanoparticleClassifier.fit on "
        f"another BAM tuning image ({_MAX_SAMPLES[0]} voxels), features included.",
        "",
        "Settings (default classifier)",
        "",
    ]
    variant_rows = [(name, None) for name in variants]
    lines += table(results, variant_rows, sets, space)
    lines += ["", "Mean training gate recall / gate fraction:", ""]
    lines += gate_lines(results, variant_rows, sets)
    return _report(lines, args, argv, start)


def _report(lines, args, argv, start):
    total = time.perf_counter() - start
    command = " ".join(["python benchmarks/choose_classifier.py", *(argv if argv is not None else sys.argv[1:])])
    footer = (
        f"``{command}``: {total / 60:.1f} min on {os.cpu_count()} CPUs ({platform.machine()}, "
        f"{platform.python_implementation()} {platform.python_version()}), n_jobs={args.n_jobs}, "
        f"{time.strftime('%Y-%m-%d')}."
    )
    text = "\n".join(lines)
    print()
    print(text)
    print()
    print(footer)
    if args.output is not None:
        args.output.write_text(text + "\n\n" + footer + "\n")
    return 0


def normalisation_main(args, argv, sets, space, memory, log, start):
    """Question 2 on its own, on all three sets: which per-image normalisation carries over."""
    configs = normalisation_variants()
    results = run_jobs(sets, configs, space, args.n_jobs, log, memory)
    lines = ["Per-image normalisation (default classifier and features, gate_recall=0.99, no prior)", ""]
    lines += table(results, [(name, None) for name, _, _ in configs], sets, space)
    return _report(lines, args, argv, start)


if __name__ == "__main__":
    sys.exit(main())
