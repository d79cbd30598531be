"""One benchmark stage, run in a fresh process by ``bench_pipeline.py``.

Each stage runs alone in its own interpreter so that its peak resident set
size is its own: the figure reported is the process's high-water mark
(``VmHWM`` from ``/proc/self/status``, which starts afresh at ``exec``), with
``ru_maxrss`` as a fallback where ``/proc`` is missing. The stage writes a
JSON record (wall time of the stage's own work, peak RSS and a few facts
about the result) to the file named by ``--result``.

Stages (all read the same uint8 zarr input ``--input`` and work in ``--workdir``):

``ref-fit``            reference fit, model saved to ``ref_model.npz``
``ref-posterior``      reference posterior, written to ``ref_posterior.zarr`` (float16)
``ref-labels``         reference labelling of ``ref_posterior.zarr`` -> ``ref_labels.zarr``
``ns-fit``             ``NanoparticleMixture().fit(zarr)``, saved with joblib
``ns-posterior-mask``  lazy posterior mask ``mixture.predict(zarr, threshold=0.95)`` (the same voxels as
                      ``posterior >= 0.95``), its ``.sum()`` computed, nothing stored
``ns-posterior-zarr``  lazy float16 posterior (``posterior_dtype="float16"``) written with ``write_ome_zarr`` to
                      ``ns_posterior.zarr``
``ns-labels``          ``NanoparticleLabeler().transform(mixture.transform(zarr))`` -> ``ns_labels.zarr``
``ns-end-to-end``      fit_transform, then labels -> ``ns_e2e_labels.zarr`` (as a Pipeline's fit_transform), in
                      one process with nothing warmed up
``read-once``          every plane of the input read (decoded) once on two threads, nothing computed
``read-once-files``    the same through nanoseg's chunk-file reader (``nanoseg._zarr_chunks``)
``compare``            label and posterior agreement between the two implementations
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import zarr

THRESHOLD = 0.95
#: Voxel size (z, y, x) in nm written with nanoseg's labels (the phantom's own is not stored).
SPACING = (50.0, 10.0, 10.0)
COMPARE_SLAB = 8


def peak_rss_mib():
    """High-water resident set size of this process, MiB."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def warm_up_jit():
    """Compile nanoseg's numba kernels, if it has any, before the clock starts.

    Compilation is a one-off cost per process (a whole pipeline in one process
    pays it once); it is timed and reported separately. Returns the seconds
    spent, or None when the package has no compiled kernels.
    """
    try:
        from nanoseg._ops import _numba as _jit  # one module per kernel concept
    except ImportError:
        try:
            from nanoseg import _jit  # earlier layout: all compiled loops in one module
        except ImportError:
            return None
    t0 = time.perf_counter()
    try:
        if not _jit.available():
            return None
        _jit.warm_up()
    except Exception:  # noqa: BLE001 - private API that may change; then nothing is warmed up
        return None
    return time.perf_counter() - t0


def import_deferred_modules():
    """Import the modules that would otherwise be imported inside a stage's first call.

    nanoseg imports numba (its compiled kernels) and ``dask.array`` (its lazy
    outputs) on first use, so that ``import nanoseg`` and the command line
    start fast; dask's first compute imports distributed, when it is
    installed, to look for a client. All are imports of other libraries,
    which the clock leaves out like every other; the seconds they
    take are recorded (``deferred_imports_s``). Loading the compiled kernels
    from numba's cache, thread pools and graph building stay in the clock.
    """
    t0 = time.perf_counter()
    names = []
    for name in ("numba", "dask.array", "distributed"):
        try:
            __import__(name)
        except ImportError:
            continue
        names.append(name)
    return names, time.perf_counter() - t0


def configure_dask(threads):
    import dask

    dask.config.set(scheduler="threads", num_workers=threads)


def write_labels(path, labels):
    """Write nanoseg's lazy labels as users do: an OME-Zarr label image
    (``nanoseg.io.write_ome_zarr``, as ``nanoseg segment`` writes it), its
    array at ``path/0``."""
    from nanoseg.io import write_ome_zarr

    write_ome_zarr(path, labels, spacing=SPACING, kind="labels", overwrite=True, progress=False)


# ---------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------
def ref_fit(volume, workdir, info):
    import reference

    model = reference.fit(volume)
    np.savez(workdir / "ref_model.npz", **model)
    info.update(em_iterations=int(model["nit"]) + 1, th_low=model["th_low"], th_high=model["th_high"])


def ref_posterior(volume, workdir, info):
    import reference

    model = dict(np.load(workdir / "ref_model.npz"))
    reference.predict(model, volume, workdir / "ref_posterior.zarr")


def ref_labels(volume, workdir, info):
    import reference

    posterior = zarr.open_array(str(workdir / "ref_posterior.zarr"), mode="r")
    _, info["n_labels"] = reference.label(posterior, workdir / "ref_labels.zarr")


# ---------------------------------------------------------------------------
# nanoseg
# ---------------------------------------------------------------------------
def load_mixture(workdir):
    import joblib

    return joblib.load(workdir / "ns_mixture.joblib")


def ns_fit(volume, workdir, info):
    import joblib
    from sklearn.exceptions import ConvergenceWarning

    from nanoseg import NanoparticleMixture

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        mixture = NanoparticleMixture().fit(volume)
    joblib.dump(mixture, workdir / "ns_mixture.joblib")
    info.update(
        em_iterations=int(mixture.n_iter_),
        converged=bool(mixture.converged_),
        convergence_warning=any(issubclass(w.category, ConvergenceWarning) for w in caught),
        th_low=int(mixture.low_intensity_),
        th_high=int(mixture.high_intensity_),
    )


def ns_posterior_mask(volume, workdir, info):
    mixture = load_mixture(workdir)
    t0 = time.perf_counter()
    # predict looks voxels up in boolean tables (posterior >= threshold per
    # intensity): no float posterior is made.
    mask = mixture.predict(volume, threshold=THRESHOLD)
    info["transform_s"] = time.perf_counter() - t0
    info["mask_voxels"] = int(mask.sum().compute())


def ns_posterior_zarr(volume, workdir, info):
    from nanoseg.io import write_ome_zarr

    mixture = load_mixture(workdir)
    # Tables in float16 (rounded once from float64, as the reference's values
    # are): the lookup writes float16 directly, with no float32 -> float16 cast.
    mixture.set_params(posterior_dtype="float16")
    posterior = mixture.transform(volume)
    # Written as users write it (nanoseg's writer; dask.array.store into a
    # plain zarr array took about 1.5x as long in the 2026-12-04 run).
    write_ome_zarr(workdir / "ns_posterior.zarr", posterior, spacing=SPACING, overwrite=True, progress=False)


def ns_labels(volume, workdir, info):
    from nanoseg import NanoparticleLabeler

    mixture = load_mixture(workdir)
    t0 = time.perf_counter()
    labels = NanoparticleLabeler().transform(mixture.transform(volume))
    t1 = time.perf_counter()
    write_labels(workdir / "ns_labels.zarr", labels)
    t2 = time.perf_counter()
    info.update(
        transform_s=t1 - t0,
        store_s=t2 - t1,
        label_slab_depth=int(labels.chunks[0][0]),
        labels_dtype=str(labels.dtype),
    )


def read_once(volume, workdir, info, threads=2, depth=8):
    """Read (decode) every plane of the input once, on `threads` threads,
    computing nothing: the floor under any pass over the input."""
    from concurrent.futures import ThreadPoolExecutor

    starts = range(0, volume.shape[0], depth)
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(lambda z0: int(volume[z0 : z0 + depth][:, 0, 0].sum()), starts))
    info["checksum"] = total


def read_once_files(volume, workdir, info, threads=2, depth=8):
    """As :func:`read_once`, with nanoseg's reader of local zarr chunk files
    (what its passes read through) instead of zarr's indexing."""
    from nanoseg._volume import as_volume

    reader = as_volume(volume).reader
    info["direct_chunk_files"] = reader is not volume
    read_once(reader, workdir, info, threads=threads, depth=depth)


def ns_end_to_end(volume, workdir, info):
    """Fit, then labels written to zarr, in this one process with nothing
    warmed up: numba's cache loads, thread pools and first calls are inside
    the clock, as every user's process pays them (imports are not, including
    the ones deferred to first use: see :func:`import_deferred_modules`)."""
    from nanoseg import NanoparticleLabeler, NanoparticleMixture

    t0 = time.perf_counter()
    # What Pipeline([mixture, labeler]).fit_transform(volume) does: the
    # mixture's fit_transform reuses the fit's slice histograms for the
    # posterior's tables, so the labelling pass computes none.
    posterior = NanoparticleMixture().fit_transform(volume)
    t1 = time.perf_counter()
    labels = NanoparticleLabeler().fit_transform(posterior)
    write_labels(workdir / "ns_e2e_labels.zarr", labels)
    t2 = time.perf_counter()
    info.update(fit_s=t1 - t0, labels_s=t2 - t1, labels_dtype=str(labels.dtype))


# ---------------------------------------------------------------------------
# agreement
# ---------------------------------------------------------------------------
#: The labelling's closing radius, the same in both implementations.
RADIUS = 1


def _off_faces(shape, z0, full, radius):
    """Mask of the voxels of a slab (starting at plane `z0`) farther than `radius` from every face."""
    inner = np.zeros(shape, dtype=bool)
    z = np.arange(z0, z0 + shape[0])
    keep_z = (z >= radius) & (z < full[0] - radius)
    inner[keep_z, radius : full[1] - radius, radius : full[2] - radius] = True
    return inner


def compare(volume, workdir, info):
    """Exact and up-to-renumbering label agreement, plus posterior differences."""
    ref = zarr.open_array(str(workdir / "ref_labels.zarr"), mode="r")
    ours = zarr.open_array(str(workdir / "ns_labels.zarr" / "0"), mode="r")
    if ref.shape != ours.shape:
        info.update(identical=False, same_partition=False, reason=f"shapes {ref.shape} != {ours.shape}")
        return
    n_diff = fg_only_ref = fg_only_ours = off_faces = 0
    pairs = []
    max_ref = max_ours = 0
    for z0 in range(0, ref.shape[0], COMPARE_SLAB):
        z1 = min(z0 + COMPARE_SLAB, ref.shape[0])
        a = ref[z0:z1]
        b = ours[z0:z1]
        differ = a != b
        n_diff += int(np.count_nonzero(differ))
        # The published closing erodes particle voxels within its radius of
        # the volume's faces, nanoseg's keeps them: count differences elsewhere.
        inner = _off_faces(differ.shape, z0, ref.shape, RADIUS)
        off_faces += int(np.count_nonzero(differ & inner))
        fa, fb = a != 0, b != 0
        fg_only_ref += int(np.count_nonzero(fa & ~fb))
        fg_only_ours += int(np.count_nonzero(fb & ~fa))
        both = fa & fb
        if both.any():
            pairs.append(np.unique(np.stack([a[both].astype(np.int64), b[both].astype(np.int64)], 1), axis=0))
        max_ref = max(max_ref, int(a.max()))
        max_ours = max(max_ours, int(b.max()))
    pairs = np.unique(np.concatenate(pairs), axis=0) if pairs else np.empty((0, 2), np.int64)
    bijective = (
        len(np.unique(pairs[:, 0])) == len(pairs) == len(np.unique(pairs[:, 1]))
        and len(pairs) == max_ref == max_ours
    )
    info.update(
        identical=n_diff == 0,
        voxels_differing=n_diff,
        voxels_differing_off_faces=off_faces,
        same_partition=bool(fg_only_ref == 0 and fg_only_ours == 0 and bijective),
        foreground_only_ref=fg_only_ref,
        foreground_only_nanoseg=fg_only_ours,
        n_labels_ref=max_ref,
        n_labels_nanoseg=max_ours,
    )
    try:
        compare_posteriors(volume, workdir, info)
    except Exception as exc:  # noqa: BLE001 - a diagnostic; the label verdict stands without it
        info["posterior_comparison_error"] = f"{type(exc).__name__}: {exc}"


def compare_posteriors(volume, workdir, info):
    """Fitted PMFs and posteriors of the two implementations, side by side."""
    mixture = load_mixture(workdir)
    model = np.load(workdir / "ref_model.npz")
    info["max_abs_diff_p_np"] = float(np.abs(model["p_np"] - mixture.particle_pmf_).max())
    info["max_abs_diff_p_bg"] = float(np.abs(model["p_bg"] - mixture.background_pmf_).max())
    posterior = mixture.transform(volume)  # lazy float32
    ref_post = zarr.open_array(str(workdir / "ref_posterior.zarr"), mode="r")
    mask_diff = 0
    max_post_diff = 0.0
    for z0 in range(0, ref_post.shape[0], COMPARE_SLAB):
        z1 = min(z0 + COMPARE_SLAB, ref_post.shape[0])
        pr = ref_post[z0:z1].astype(np.float32)
        po = np.asarray(posterior[z0:z1].compute())
        max_post_diff = max(max_post_diff, float(np.abs(pr - po).max()))
        mask_diff += int(np.count_nonzero((pr >= THRESHOLD) != (po >= THRESHOLD)))
    info.update(max_abs_diff_posterior=max_post_diff, threshold_mask_voxels_differing=mask_diff)


STAGES = {
    "ref-fit": ref_fit,
    "ref-posterior": ref_posterior,
    "ref-labels": ref_labels,
    "ns-fit": ns_fit,
    "ns-posterior-mask": ns_posterior_mask,
    "ns-posterior-zarr": ns_posterior_zarr,
    "ns-labels": ns_labels,
    "read-once-files": read_once_files,
    "ns-end-to-end": ns_end_to_end,
    "read-once": read_once,
    "compare": compare,
}

#: What each stage writes in the workdir. A previous run's copy is removed
#: before the clock starts, for both implementations alike: deleting an old
#: output is not part of the work measured (a first run has none to delete).
OUTPUTS = {
    "ref-posterior": ["ref_posterior.zarr"],
    "ref-labels": ["ref_labels.zarr"],
    "ns-posterior-zarr": ["ns_posterior.zarr"],
    "ns-labels": ["ns_labels.zarr"],
    "ns-end-to-end": ["ns_e2e_labels.zarr"],
}


def remove_old_outputs(stage, workdir):
    """Delete the outputs of `stage` left in `workdir` by an earlier run."""
    import shutil

    for name in OUTPUTS.get(stage, []):
        shutil.rmtree(workdir / name, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run one benchmark stage and record it as JSON.")
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--input", required=True, help="uint8 zarr array")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--result", required=True, help="JSON file to write")
    parser.add_argument("--threads", type=int, default=2, help="dask threaded-scheduler workers")
    args = parser.parse_args(argv)

    configure_dask(args.threads)
    # Import everything any stage uses before the clock starts: wall_s is the
    # stage's own work (reading, computing, writing), not interpreter start-up.
    import dask.array  # noqa: F401
    import joblib  # noqa: F401
    import reference  # noqa: F401
    import sklearn.exceptions  # noqa: F401

    import nanoseg  # noqa: F401
    # nanoseg imports its modules on first use: import the estimators (and
    # what they import) here, so that no stage's clock counts imports.
    from nanoseg import NanoparticleLabeler, NanoparticleMixture  # noqa: F401
    import nanoseg.io  # noqa: F401 - the writer of every stage that stores zarr

    deferred, deferred_s = import_deferred_modules()

    # The end-to-end stage warms nothing up: its first calls are part of its time.
    jit_s = warm_up_jit() if args.stage.startswith("ns-") and args.stage != "ns-end-to-end" else None
    workdir = Path(args.workdir)
    remove_old_outputs(args.stage, workdir)
    volume = zarr.open_array(args.input, mode="r")
    info = {}
    t0 = time.perf_counter()
    STAGES[args.stage](volume, workdir, info)
    wall = time.perf_counter() - t0
    record = {
        "stage": args.stage,
        "wall_s": wall,
        "peak_rss_mib": peak_rss_mib(),
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "pid": os.getpid(),
        "jit_s": jit_s,
        "deferred_imports": deferred,
        "deferred_imports_s": deferred_s,
        **info,
    }
    Path(args.result).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
