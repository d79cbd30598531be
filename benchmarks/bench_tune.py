"""Time ``nanoseg.tune`` on the 25 EMPS bright_small images.

The images (2D SEM/TEM figures, 512 px high, up to 916 px wide; dark ones
inverted with the polarity of the dataset's stats.csv, as in
``evaluate_real.py``) and their instance masks are loaded once; then
``tune(images, masks, n_jobs=..., random_state=0)`` runs ``--repeat`` times
with its default search space, each run timed with ``time.perf_counter``
(wall clock: what a user waits, including starting the worker processes and
refitting the best setting) and ``time.process_time`` of this process. The
median wall time is printed with the cross-validated object F1 of the chosen
setting (``best_score_``), which setting it is, how many candidates were
scored, the warnings the search raised, and the machine's load average
before and after (the benchmark is only as quiet as the machine).

The data folder is found as in ``evaluate_real.py``: ``--data DIR``, or the
environment variable ``NANOSEG_SHARED_DATA``, or ``../shared/data`` next to
the repository. It holds the EMPS dataset (MIT licence; B. Yildirim and
J. M. Cole, J. Chem. Inf. Model. 61, 2021, doi:10.1021/acs.jcim.0c01455);
nothing of it is copied.

Run from the repository root::

    python benchmarks/bench_tune.py                 # 3 runs, n_jobs=2
    python benchmarks/bench_tune.py --repeat 1 --n-jobs 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np


def default_data_dir():
    if os.environ.get("NANOSEG_SHARED_DATA"):
        return Path(os.environ["NANOSEG_SHARED_DATA"])
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def load_bright_small(root):
    """The 25 bright_small images (particles bright) and their instance masks."""
    import pandas as pd
    from skimage.io import imread

    folder = root / "emps-train"
    ids = (folder / "bright_small.txt").read_text().split()
    polarity = pd.read_csv(folder / "stats.csv").set_index("id")["polarity"]
    images, masks = [], []
    for image_id in ids:
        image = np.asarray(imread(folder / "images" / f"{image_id}.png"))
        if image.ndim == 3:  # R = G = B upstream; keep one channel
            image = image[..., 0]
        if polarity[image_id] == "dark":
            image = 255 - image
        images.append(image.astype(np.uint8))
        masks.append(np.asarray(imread(folder / "masks" / f"{image_id}.png")).astype(np.uint32))
    return ids, images, masks


def describe(params):
    """The chosen setting in one line, steps that are off left out."""
    parts = []
    for key, value in sorted(params.items()):
        if isinstance(value, str) and value == "passthrough":
            continue
        parts.append(f"{key}={value!r}")
    return ", ".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="the shared data folder")
    parser.add_argument("--repeat", type=int, default=3, help="runs of tune (default 3)")
    parser.add_argument("--n-jobs", type=int, default=2, help="tune's n_jobs (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="tune's random_state (default 0)")
    args = parser.parse_args(argv)

    root = args.data or default_data_dir()
    if not (root / "emps-train" / "bright_small.txt").is_file():
        print(f"SKIPPED: the EMPS data is not in {root / 'emps-train'}.")
        return 0
    from nanoseg import tune

    ids, images, masks = load_bright_small(root)
    print(
        f"{len(images)} EMPS bright_small images, {sum(m.max() > 0 for m in masks)} with particles, "
        f"{sum(int(np.count_nonzero(np.bincount(m.ravel())[1:])) for m in masks)} particles; "
        f"{platform.python_version()} on {os.cpu_count()} CPUs"
    )
    walls, cpus = [], []
    for run in range(args.repeat):
        load_before = os.getloadavg()
        cpu, start = time.process_time(), time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            search = tune(images, masks, n_jobs=args.n_jobs, random_state=args.seed)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        walls.append(wall)
        cpus.append(cpu)
        results = search.cv_results_
        print(
            f"run {run + 1}: {wall:.1f} s wall ({cpu:.1f} s CPU in this process), "
            f"{len(results['params'])} candidates x {search.n_splits_} folds, "
            f"refit {search.refit_time_:.1f} s; load average {load_before[0]:.1f} before, "
            f"{os.getloadavg()[0]:.1f} after"
        )
        for warning in caught:
            print(f"  warning ({warning.category.__name__}): {str(warning.message)[:300]}")
    print(f"median wall time of {args.repeat} run(s): {statistics.median(walls):.1f} s")
    print(f"cross-validated object F1 (best_score_): {search.best_score_:.3f}")
    print(f"chosen: {describe(search.best_params_)}")
    mixture = [i for i, p in enumerate(results["params"]) if "classifier" not in p]
    learned = [i for i, p in enumerate(results["params"]) if "classifier" in p]
    for name, rows in (("mixture", mixture), ("classifier", learned)):
        scores = results["mean_test_score"][rows]
        if rows and not np.isnan(scores).all():
            print(f"best {name} candidate: {np.nanmax(scores):.3f} ({len(rows)} candidates)")
        elif rows:
            print(f"every {name} candidate failed ({len(rows)} candidates): see the warning above")
    return 0


if __name__ == "__main__":
    sys.exit(main())
