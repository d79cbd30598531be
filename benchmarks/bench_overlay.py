"""Time and peak memory of ``plot_overlay`` on large planes.

For each plane size, a zarr image (uint8, random) and zarr labels (uint32,
2000 small square particles) of two planes are written to a temporary
folder by one process; a fresh process then draws and saves the whole-plane
overlay and the 512-pixel window overlay of the labelled plane (as
``nanoseg segment --report`` does) and prints the seconds each took and its
peak resident memory (``VmHWM``), which is then the figures' own.

    python benchmarks/bench_overlay.py --sizes 4096 8192 16384
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make(folder, n):
    import numpy as np
    import zarr

    rng = np.random.default_rng(0)
    image = zarr.create_array(store=str(folder / "image.zarr"), shape=(2, n, n), chunks=(1, 1024, 1024), dtype="u1")
    labels = zarr.create_array(
        store=str(folder / "labels.zarr"), shape=(2, n, n), chunks=(1, 1024, 1024), dtype="u4", fill_value=0
    )
    for z in range(2):
        image[z] = rng.integers(0, 200, (n, n), dtype=np.uint8)
    plane = np.zeros((n, n), dtype=np.uint32)
    for label, (row, col) in enumerate(rng.integers(0, n - 8, (2000, 2)), start=1):
        plane[row : row + 6, col : col + 6] = label
    labels[1] = plane


def draw(folder):
    import io

    import matplotlib
    import zarr

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from nanoseg.plotting import plot_overlay

    image = zarr.open_array(str(folder / "image.zarr"), mode="r")
    labels = zarr.open_array(str(folder / "labels.zarr"), mode="r")
    times = []
    for window in (None, 512):
        t0 = time.perf_counter()
        figure = Figure(figsize=(6.4, 4.4), layout="constrained")
        plot_overlay(image, labels, plane=1, ax=figure.subplots(), window=window)
        figure.savefig(io.BytesIO(), dpi=100, format="png")
        times.append(time.perf_counter() - t0)
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))
    print(f"{image.shape[1]:>6} x {image.shape[2]:<6} whole plane {times[0]:6.2f} s   "
          f"window 512 {times[1]:6.2f} s   peak RSS {peak:6.0f} MiB")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--step", choices=["make", "draw"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step == "make":
        return make(Path(args.folder), args.sizes[0])
    if args.step == "draw":
        return draw(Path(args.folder))
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as folder:
            for step in ("make", "draw"):
                subprocess.run(
                    [sys.executable, __file__, "--step", step, "--folder", folder, "--sizes", str(n)], check=True
                )


if __name__ == "__main__":
    main()
