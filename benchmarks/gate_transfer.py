"""How well the classifier's gate carries over to images it was not trained on.

:class:`~nanoseg.NanoparticleClassifier` classifies only the pixels its gate
lets through: those at least as bright as a level learned from the training
annotations (in the volume's normalised units), grown by ``gate_margin``.
``gate_recall_`` says what share of the *training* particle pixels pass.
This script measures the same share on the held-out images of
``evaluate_real.py``'s three sets, which the gate never saw: pixels of
annotated particles that pass, particles with at least half of their pixels
through, particles with none, and the share of all pixels classified.

A classifier with the package's defaults (``gate_recall=0.99``) is trained
on each set's training images exactly as ``evaluate_real.py --methods
learned`` draws them (50,000 class-balanced training pixels, fixed seed).
Nothing is chosen from these figures.

Usage, from the repository root (needs the shared data folder)::

    python benchmarks/gate_transfer.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def gate_mask(model, image):
    """The grown gate of a fitted classifier on one image (pixels it classifies)."""
    volumes, _ = model._volumes(image)
    slab = model._slab_classifier(volumes[0], model.estimator_)
    return slab.gate(volumes[0].read(0, volumes[0].shape[0]))[0]


def transfer(model, images, labels):
    """Pooled gate figures over annotated images."""
    passed = total = kept = pixels = 0
    half = none = n_particles = 0
    for image, label in zip(images, labels):
        gate = gate_mask(model, image)
        inside = label > 0
        passed += int(np.count_nonzero(gate & inside))
        total += int(np.count_nonzero(inside))
        kept += int(np.count_nonzero(gate))
        pixels += gate.size
        ids = label.ravel()
        sizes = np.bincount(ids)
        through = np.bincount(ids, weights=gate.ravel().astype(np.float64), minlength=sizes.size)
        present = np.flatnonzero(sizes[1:]) + 1
        n_particles += present.size
        half += int(np.count_nonzero(through[present] >= 0.5 * sizes[present]))
        none += int(np.count_nonzero(through[present] == 0))
    return {
        "pixel_recall": passed / max(1, total),
        "particles_half_through": half / max(1, n_particles),
        "particles_missed": none / max(1, n_particles),
        "gate_fraction": kept / max(1, pixels),
        "n_particles": n_particles,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="the shared data folder")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import evaluate_real as er

    from nanoseg import NanoparticleClassifier

    root = args.data or er.default_data_dir()
    datasets = er.load_datasets(root)
    print("| set | training images | gate recall (training) | pixel recall | particles half through | "
          "particles missed | pixels classified | held-out particles |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for dataset in datasets:
        train = er.learned_training(dataset, er.LEARNED_EMPS_TRAIN)
        images, labels = dataset.subset(train)
        start = time.perf_counter()
        model = NanoparticleClassifier(max_samples=50_000, n_jobs=1, random_state=er.SEED).fit(images, labels)
        seconds = time.perf_counter() - start
        held_images, held_labels = dataset.subset(dataset.held_out)
        figures = transfer(model, held_images, held_labels)
        print(
            f"| {dataset.name} | {len(train)} | {model.gate_recall_:.3f} | {figures['pixel_recall']:.3f} | "
            f"{figures['particles_half_through']:.3f} | {figures['particles_missed']:.3f} | "
            f"{figures['gate_fraction']:.3f} | {figures['n_particles']} |",
            flush=True,
        )
        print(f"  (trained in {seconds:.1f} s; gate level {model.gate_level_:.2f} in normalised units)", file=sys.stderr)


if __name__ == "__main__":
    main()
