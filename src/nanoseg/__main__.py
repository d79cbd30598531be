"""Command line entry point: ``nanoseg`` / ``python -m nanoseg``."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _demo(args):
    from sklearn.pipeline import Pipeline

    from . import NanoparticleLabeler, NanoparticleMixture
    from .datasets import make_phantom

    shape = tuple(args.shape)
    # Keep the default phantom's particle density (about 40 per 0.9 Mvoxel):
    # the method assumes particles fill a fixed small fraction of the voxels.
    n_particles = max(1, round(40 * np.prod(shape) / (24 * 192 * 192)))
    image, mask, truth = make_phantom(
        shape, n_particles=n_particles, random_state=args.seed, return_labels=True
    )
    print(
        f"Phantom: {image.shape[0]} x {image.shape[1]} x {image.shape[2]} voxels (Z, Y, X), "
        f"{int(truth.max())} particles, {100 * mask.mean():.2f} % particle voxels."
    )
    pipeline = Pipeline(
        [("mixture", NanoparticleMixture(verbose=args.verbose)), ("labeler", NanoparticleLabeler())]
    )
    start = time.perf_counter()
    labels = pipeline.fit_transform(image)
    elapsed = time.perf_counter() - start
    mixture = pipeline.named_steps["mixture"]
    found = labels > 0
    dice = 2 * np.count_nonzero(found & mask) / max(1, np.count_nonzero(found) + np.count_nonzero(mask))
    hit = np.unique(truth[found & mask])
    print(
        f"EM: {mixture.n_iter_} iterations, converged={mixture.converged_}, "
        f"background weight {mixture.background_weight_:.5f}, "
        f"seed intensities >{mixture.low_intensity_}, hard exclusion >={mixture.high_intensity_}."
    )
    print(f"Found {int(labels.max())} particles in {elapsed:.2f} s.")
    print(f"Ground-truth particles overlapped by a detection: {hit.size} of {int(truth.max())}.")
    print(f"Voxel Dice against the ground truth: {dice:.3f}.")
    return 0


def build_parser():
    """The ``nanoseg`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="nanoseg", description="Find nanoparticles in volume electron microscopy."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="segment a built-in synthetic phantom and report what was found"
    )
    demo.add_argument("--shape", type=int, nargs=3, default=(24, 192, 192), metavar=("Z", "Y", "X"))
    demo.add_argument("--seed", type=int, default=0, help="random seed of the phantom")
    demo.add_argument("--verbose", action="store_true", help="show progress bars")
    demo.set_defaults(run=_demo)
    return parser


def main(argv=None):
    """Run the command line interface and return its exit code."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
