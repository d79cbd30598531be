"""Time the learned pipeline against the mixture pipeline on one zarr phantom.

Both pipelines read the same uint8 zarr volume (written by ``make_volume.py``:
the package's phantom with 0.1 % particle voxels) and write uint32 labels to
zarr, each in a fresh process, so that every figure includes what a user's
process pays (thread pools, first calls, graph building), but not imports:

``mixture``      ``NanoparticleMixture().fit(zarr)``, then
                 ``NanoparticleLabeler().transform(mixture.transform(zarr))`` stored to zarr
``classify``     ``NanoparticleClassifier.predict(zarr, threshold=0.5)``, only its sum computed
                 (the classification stage alone)
``classifier``   ``NanoparticleLabeler(threshold=0.5, radius=0).transform(classifier.transform(zarr))``
                 stored to zarr

The classifier is trained once, before the timed stages, on two annotated
16 x 128 x 128 crops of another phantom made with the same settings (its
training time is printed too). Each stage runs ``--repeat`` times; medians
are reported, with the ratio of the two pipelines, voxel throughput and the
peak resident set size of each stage's process.

Usage, from the repository root::

    python benchmarks/bench_classifier.py --size 0.54 --workdir /tmp/nanoseg-bench
    python benchmarks/bench_classifier.py --size 0.004 --repeat 1        # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPACING = (50.0, 10.0, 10.0)
HERE = Path(__file__).resolve().parent


def _peak_rss_mib():
    sys.path.insert(0, str(HERE))
    from stages import peak_rss_mib

    return peak_rss_mib()


def _shape(size_gvox):
    sys.path.insert(0, str(HERE))
    from bench_pipeline import shape_for

    return shape_for(size_gvox)


def train(workdir):
    """Train the classifier on two crops of a phantom like the benchmark volume's."""
    import joblib

    from nanoseg import NanoparticleClassifier
    from nanoseg.datasets import make_phantom

    # 0.1 % of voxels in particles of ~16 voxels, as make_volume.py's default.
    shape = (16, 512, 512)
    n_particles = int(1e-3 * 16 * 512 * 512 / 16)
    image, mask = make_phantom(shape, n_particles=n_particles, random_state=123)
    crops = [image[:, :128, :128], image[:, 256:384, 256:384]]
    masks = [mask[:, :128, :128], mask[:, 256:384, 256:384]]
    t0 = time.perf_counter()
    model = NanoparticleClassifier(spacing=SPACING, random_state=0).fit(crops, masks)
    seconds = time.perf_counter() - t0
    joblib.dump(model, workdir / "classifier.joblib")
    return seconds, model


def _store(labels, path, like):
    import dask.array as da
    import zarr

    target = zarr.create_array(
        str(path), shape=labels.shape, chunks=like.chunks, dtype=labels.dtype, overwrite=True
    )
    da.store(labels, target, lock=False)


def run_stage(stage, volume_path, workdir):
    """Run one stage in this process; return its record."""
    import warnings

    import joblib
    import zarr

    from nanoseg import NanoparticleLabeler, NanoparticleMixture

    volume = zarr.open_array(str(volume_path), mode="r")
    info = {}
    t0 = time.perf_counter()
    if stage == "mixture":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mixture = NanoparticleMixture().fit(volume)
        info["fit_s"] = time.perf_counter() - t0
        _store(NanoparticleLabeler().transform(mixture.transform(volume)), workdir / "mixture_labels.zarr", volume)
    elif stage == "classify":
        model = joblib.load(workdir / "classifier.joblib")
        info["particle_voxels"] = int(model.predict(volume, threshold=0.5).sum().compute())
    elif stage == "classifier":
        model = joblib.load(workdir / "classifier.joblib")
        labels = NanoparticleLabeler(threshold=0.5, radius=0).transform(model.transform(volume))
        _store(labels, workdir / "classifier_labels.zarr", volume)
    else:
        raise ValueError(stage)
    info.update(stage=stage, wall_s=time.perf_counter() - t0, peak_rss_mib=_peak_rss_mib())
    return info


def _fresh(stage, volume_path, workdir):
    result = workdir / f"{stage}.json"
    command = [sys.executable, __file__, "--stage", stage, "--volume", str(volume_path), "--workdir", str(workdir)]
    subprocess.run(command, check=True)
    return json.loads(result.read_text())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=float, default=0.54, help="volume size in Gvoxel (default 0.54)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--volume", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.stage:
        # Imports before the clock: a stage's figure is its own work.
        import dask.array  # noqa: F401
        import joblib  # noqa: F401

        import nanoseg  # noqa: F401

        record = run_stage(args.stage, args.volume, args.workdir)
        (args.workdir / f"{args.stage}.json").write_text(json.dumps(record))
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="nanoseg-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE))
    from make_volume import make_volume

    shape = _shape(args.size)
    volume_path = workdir / f"phantom_{'x'.join(map(str, shape))}.zarr"
    make_volume(volume_path, shape)
    n_voxels = shape[0] * shape[1] * shape[2]
    train_s, model = train(workdir)
    print(f"volume {shape} ({n_voxels / 1e9:.2f} Gvoxel); classifier trained in {train_s:.1f} s "
          f"({model.n_features_} features, gate recall {model.gate_recall_:.3f}, "
          f"gate fraction {model.gate_fraction_:.4f})")

    records = {stage: [] for stage in ("mixture", "classify", "classifier")}
    for _ in range(args.repeat):
        for stage in records:
            records[stage].append(_fresh(stage, volume_path, workdir))

    def median(stage, key):
        return statistics.median(r[key] for r in records[stage])

    print(f"\n| stage | median s | Mvoxel/s | peak RSS MiB (max) | runs |")
    print("|---|---|---|---|---|")
    for stage in records:
        seconds = median(stage, "wall_s")
        peak = max(r["peak_rss_mib"] for r in records[stage])
        print(f"| {stage} | {seconds:.1f} | {n_voxels / seconds / 1e6:.1f} | {peak:.0f} | {len(records[stage])} |")
    ratio = median("classifier", "wall_s") / median("mixture", "wall_s")
    print(f"\nclassifier + labeler / mixture + labeler: {ratio:.2f}x the time (median of {args.repeat})")


if __name__ == "__main__":
    main()
