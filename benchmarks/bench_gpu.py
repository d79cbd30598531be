"""Time nanoseg on the CPU and on a CUDA GPU, and check that the labels agree.

A phantom of the requested size is written to zarr (as ``make_volume.py``
does: chunks of one slice by 1024 x 1024 pixels), then the three stages run
on it -- fit, posterior with its thresholded mask, labels -- on

* the CPU, from a NumPy array in memory (the reference for the labels);
* the CPU, from the zarr array (lazy dask results, computed);
* the GPU, streamed from host memory (NumPy input: slabs are copied to the
  GPU and results back);
* the GPU, streamed from the zarr array (lazy dask results, computed);
* the GPU, with the volume already on the device (CuPy input and outputs).

With ``device="cuda"``, the posterior of a host volume (NumPy or zarr) is
looked up on the host, as on the CPU; the fit and the labels run on the GPU.

Each configuration runs ``--repeat`` times; the script prints the median
throughput of every stage in Gvoxel/s, the device's name, and whether each
GPU configuration's labels are identical to the CPU's.

Then the pixel classifier: one ``NanoparticleClassifier`` is trained (on the
CPU) on a small annotated phantom, and its probabilities for the first
``--classifier-planes`` planes of the volume are computed with the features
on the CPU and on the GPU (NumPy and CuPy input). The script prints their
throughput and how far the GPU's probabilities are from the CPU's (the
features agree to float32 rounding; a rare voxel may take another branch of
a tree). GPU timings include
synchronising the device, so no work is left queued when a clock stops.

Examples::

    python benchmarks/bench_gpu.py --size 0.05 --repeat 1      # smoke run
    python benchmarks/bench_gpu.py --size 1.07 --repeat 3 --json gpu.json

Without CuPy or a usable CUDA device the script says so and exits with
status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_volume import make_volume

THRESHOLD = 0.95
STAGES = ("fit", "posterior + mask", "labels")
CONFIGS = (
    ("cpu", "numpy"),
    ("cpu", "zarr"),
    ("cuda", "numpy"),
    ("cuda", "zarr"),
    ("cuda", "cupy"),
)


def shape_for(size_gvox):
    """Volume shape for a size in Gvoxel: 2048 x 2048 planes (512 x 512 below 0.03), depth a multiple of 8."""
    plane = 2048 if size_gvox >= 0.03 else 512
    depth = size_gvox * 1e9 / plane**2
    depth = round(depth / 8) * 8 if depth >= 8 else max(1, round(depth))
    return (depth, plane, plane)


def find_gpu():
    """(cupy, device name), or print why there is no GPU and return None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import cupy
    except ImportError as exc:
        print(
            f"bench_gpu: CuPy is not installed ({exc}). Install it with "
            'pip install "nanoseg[gpu]" (CUDA 12) or pip install cupy-cuda13x (CUDA 13).',
            file=sys.stderr,
        )
        return None
    try:
        available = cupy.is_available()
    except (RuntimeError, OSError):
        available = False
    if not available:
        print("bench_gpu: CuPy finds no usable CUDA device; nothing to compare.", file=sys.stderr)
        return None
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    return cupy, name.decode() if isinstance(name, bytes) else str(name)


class Clock:
    """Wall time of a block, waiting for the GPU before reading the clock."""

    def __init__(self, cupy):
        self.cupy = cupy

    def __call__(self, function, *args):
        self.cupy.cuda.Device().synchronize()
        start = time.perf_counter()
        result = function(*args)
        self.cupy.cuda.Device().synchronize()
        return result, time.perf_counter() - start


def warm_up(device, sample, args):
    """One untimed run on a few slices: compiles the numba and CUDA kernels, fills caches."""
    from nanoseg import NanoparticleLabeler, NanoparticleMixture

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few slices may not let EM converge
        posterior = NanoparticleMixture(device=device, n_jobs=args.n_jobs).fit_transform(sample)
        NanoparticleLabeler(device=device, n_jobs=args.n_jobs).transform(posterior)


def _posterior_and_mask(mixture, X):
    import dask.array as da

    posterior = mixture.transform(X)
    mask = posterior >= THRESHOLD
    if isinstance(mask, da.Array):
        # Lazy: the posterior is never stored; compute the mask only.
        mask = mask.compute()
    return posterior, mask


def _labels(labeler, posterior):
    import dask.array as da

    result = labeler.transform(posterior)
    return result.compute() if isinstance(result, da.Array) else result


def run_config(device, kind, sources, clock, cupy, args):
    """Time the stages of one configuration; return {stage: [seconds]} and the labels on the host."""
    from nanoseg import NanoparticleLabeler, NanoparticleMixture

    X = sources[kind]
    times = {stage: [] for stage in STAGES}
    labels = None
    for _ in range(args.repeat):
        mixture = NanoparticleMixture(device=device, n_jobs=args.n_jobs)
        _, seconds = clock(mixture.fit, X)
        times["fit"].append(seconds)
        (posterior, mask), seconds = clock(_posterior_and_mask, mixture, X)
        times["posterior + mask"].append(seconds)
        del mask
        labeler = NanoparticleLabeler(device=device, n_jobs=args.n_jobs)
        labels, seconds = clock(_labels, labeler, posterior)
        times["labels"].append(seconds)
        del posterior
        if kind == "cupy":
            labels = cupy.asnumpy(labels)
            cupy.get_default_memory_pool().free_all_blocks()
    return times, labels


def classifier_comparison(host, clock, cupy, args):
    """Time the classifier's probabilities with CPU and GPU features; compare them."""
    from nanoseg import NanoparticleClassifier
    from nanoseg.datasets import make_phantom

    crop, truth = make_phantom((24, 256, 256), n_particles=150, random_state=args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = NanoparticleClassifier(random_state=0, n_jobs=args.n_jobs, max_samples=50_000).fit(crop, truth)
    planes = host[: args.classifier_planes]
    sources = {"numpy": planes, "cupy": cupy.asarray(planes)}
    results = {}
    for device, kind in (("cpu", "numpy"), ("cuda", "numpy"), ("cuda", "cupy")):
        model = trained.set_params(device=device)
        model.predict_proba(sources[kind][:4])  # warm-up: kernels, caches
        times = []
        for _ in range(args.repeat):
            probability, seconds = clock(model.predict_proba, sources[kind])
            times.append(seconds)
        if kind == "cupy":
            probability = cupy.asnumpy(probability)
        results[(device, kind)] = {"times": times, "probability": probability}
    reference = results[("cpu", "numpy")]["probability"]
    n_voxels = planes.size
    print(
        f"classifier: {planes.shape[0]} x {planes.shape[1]} x {planes.shape[2]} planes "
        f"({n_voxels / 1e6:.0f} Mvoxel), median of {args.repeat} run(s)"
    )
    summary = []
    for (device, kind), result in results.items():
        seconds = statistics.median(result["times"])
        difference = np.abs(result["probability"].astype(np.float64) - reference)
        row = {
            "device": device,
            "input": kind,
            "times": result["times"],
            "max_difference": float(difference.max()),
            "voxels_differing": int(np.count_nonzero(difference > 1e-6)),
            "decisions_differing": int(np.count_nonzero((result["probability"] >= 0.5) != (reference >= 0.5))),
        }
        summary.append(row)
        print(
            f"  {device} ({kind}): {n_voxels / 1e6 / seconds:.1f} Mvoxel/s ({seconds:.2f} s); vs CPU: "
            f"max |difference| {row['max_difference']:.2g}, {row['voxels_differing']} voxels differ by "
            f"> 1e-6, {row['decisions_differing']} decisions at 0.5 differ"
        )
    return summary


def report(shape, name, results, args):
    n_voxels = float(np.prod(shape))
    print(f"device: {name}")
    print(
        f"volume: {shape[0]} x {shape[1]} x {shape[2]} uint8 ({n_voxels / 1e9:.3f} Gvoxel), "
        f"median of {args.repeat} run(s), throughput in Gvoxel/s"
    )
    header = ["stage"] + [f"{device} ({kind})" for device, kind in CONFIGS]
    rows = []
    for stage in (*STAGES, "end to end"):
        row = [stage]
        for config in CONFIGS:
            times = results[config]["times"]
            if stage == "end to end":
                seconds = sum(statistics.median(times[s]) for s in STAGES)
            else:
                seconds = statistics.median(times[stage])
            row.append(f"{n_voxels / 1e9 / seconds:.2f} ({seconds:.2f} s)")
        rows.append(row)
    rows.append(["labels identical to CPU"] + ["yes" if results[c]["identical"] else "NO" for c in CONFIGS])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=float, default=0.13, help="volume size in Gvoxel (1e9 voxels); default 0.13")
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration; the median is reported")
    parser.add_argument("--n-jobs", type=int, default=None, help="threads (the estimators' n_jobs); default all CPUs")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed")
    parser.add_argument("--workdir", type=Path, help="keep (and reuse) the zarr phantom here")
    parser.add_argument("--json", type=Path, help="also write the timings and agreement as JSON")
    parser.add_argument(
        "--classifier-planes", type=int, default=16, help="planes classified in the classifier comparison (0 skips it)"
    )
    args = parser.parse_args(argv)
    if args.size <= 0 or args.repeat < 1:
        parser.error("--size must be positive and --repeat at least 1")

    found = find_gpu()
    if found is None:
        return 2
    cupy, name = found
    clock = Clock(cupy)
    shape = shape_for(args.size)

    with tempfile.TemporaryDirectory() as scratch:
        root = args.workdir or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        print(f"building a {shape} phantom in {root} ...", flush=True)
        path = root / f"phantom-{shape[0]}x{shape[1]}x{shape[2]}-{args.seed}.zarr"
        stored = make_volume(path, shape, seed=args.seed, workers=min(8, os.cpu_count() or 1))
        host = stored[...]
        sources = {"numpy": host, "zarr": stored, "cupy": cupy.asarray(host)}

        results = {}
        reference = None
        for device, sample in [("cpu", host[:8]), ("cuda", host[:8]), ("cuda", sources["cupy"][:8])]:
            warm_up(device, sample, args)
        for device, kind in CONFIGS:
            print(f"running {device} ({kind}) ...", flush=True)
            times, labels = run_config(device, kind, sources, clock, cupy, args)
            if reference is None:
                reference = labels
            results[(device, kind)] = {
                "times": times,
                "identical": bool(np.array_equal(labels, reference)),
                "n_labels": int(labels.max()),
            }
            del labels
        classifier = classifier_comparison(host, clock, cupy, args) if args.classifier_planes > 0 else []

    report(shape, name, results, args)
    if args.json:
        payload = {
            "device": name,
            "shape": list(shape),
            "repeat": args.repeat,
            "n_jobs": args.n_jobs,
            "results": [
                {"device": device, "input": kind, **results[(device, kind)]} for device, kind in CONFIGS
            ],
            "classifier": classifier,
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0 if all(r["identical"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
