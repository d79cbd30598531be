"""Time the start of the ``nanoseg`` command and of ``import nanoseg``, and a small whole job.

Each is run ``--repeat`` times in a fresh interpreter; the median wall time
is printed. ``--help`` must answer without loading scikit-learn, SciPy or
dask (the package resolves its public names on first use).

Usage, from the repository root with nanoseg installed::

    python benchmarks/bench_startup.py --repeat 7
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "nanoseg --help": [sys.executable, "-m", "nanoseg", "--help"],
    "nanoseg segment --help": [sys.executable, "-m", "nanoseg", "segment", "--help"],
    "nanoseg train --help": [sys.executable, "-m", "nanoseg", "train", "--help"],
    "import nanoseg": [sys.executable, "-c", "import nanoseg"],
    # A whole small job: imports, numba's set-up and kernel loads (compiled
    # on the first run after installing; run once before timing), the work.
    "nanoseg demo (24 x 192 x 192)": [sys.executable, "-m", "nanoseg", "demo"],
    "python (baseline)": [sys.executable, "-c", "pass"],
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    print("| command | median s | min s | runs |")
    print("|---|---:|---:|---:|")
    for name, command in COMMANDS.items():
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        print(f"| {name} | {statistics.median(times):.2f} | {min(times):.2f} | {args.repeat} |")


if __name__ == "__main__":
    main()
