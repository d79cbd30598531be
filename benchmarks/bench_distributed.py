"""Time the mixture pipeline under a ``dask.distributed`` LocalCluster against dask's threaded scheduler.

The same uint8 zarr phantom as ``bench_pipeline.py`` (``make_volume.py``,
chunks 1 x 1024 x 1024, 0.1 % particle voxels; ``--workdir`` reuses it) is
labelled end to end twice, each time in a fresh process:

``threads``      dask's default threaded scheduler (``--threads`` workers)
``distributed``  ``Client(LocalCluster(n_workers=2, threads_per_worker=1, processes=True))``

Each run times three stages separately (cluster start-up, with the numba
kernels loaded on the workers, is timed on its own and is in none of them):

``fit``     ``NanoparticleMixture().fit(zarr)`` (under the cluster, one task per slab on the workers)
``labels``  ``NanoparticleLabeler().transform(mixture.transform(zarr))`` stored to a uint32 zarr
            array: the analysis pass (``transform``) and the writing of the lazy labels are
            reported apart
``mask``    ``mixture.predict(zarr, threshold=0.95).sum()``: only dask tasks, so under the cluster
            only the workers compute; it gives the workers' own throughput

For every stage the script reports wall time, Mvoxel/s, the peak resident set
size of the client process (``VmHWM``, reset between stages through
``/proc/self/clear_refs``) and, under the cluster, of every worker process,
and the CPU seconds spent in the client (scheduler included) and in the
workers, with the workers' task time by task name (dask's task stream).
The two label volumes are then compared voxel for voxel, slab by slab; the
script exits with status 1 if they differ.

A second part measures the cost of merging labels across slab faces against
the number of slabs: the posterior of the same fitted mixture is labelled
with several slab depths (``memory_budget`` set to give each depth, two
slabs in flight), each in a fresh process with the threaded scheduler. The
benchmark wraps (in its own process only; nothing in nanoseg is changed)
``face_pairs``, the per-face search for touching components, and
``SlabLabeler._merge``, the final union-find over all faces, and times them
with ``time.perf_counter``; the recorded faces are then searched again one
after the other, with nothing else running. The face merge runs in the
client in both modes.

A third part measures what one slab of the analysis pass costs as the
volume gets deeper: the fitted mixture's lazy mask over an unwritten
in-memory zarr array with the phantom's planes and chunks (zeros, no disk),
from this volume's depth up to 1e12 voxels, one slab's planes computed.
Every slab is one ``compute()``, and dask culls the whole graph for it.

Usage, from the repository root::

    python benchmarks/bench_distributed.py --quick        # 16 x 512 x 512, about 30 s in all
    python benchmarks/bench_distributed.py --size 0.54 --repeat 3 --workdir WORKDIR

Sizes are in Gvoxel, as in ``bench_pipeline.py``: 0.13 -> 32 x 2048 x 2048,
0.54 -> 128 x 2048 x 2048. Building the 0.54 Gvoxel phantom takes about a
minute on 2 cores and is not timed; the rest takes about 3 minutes with
``--repeat 3``. The workers' numbers come from ``psutil`` (installed with
``distributed``) and ``/proc``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# The same kernel warm-up as the pipeline benchmark's stages.
from stages import warm_up_jit  # noqa: E402

THRESHOLD = 0.95
COMPARE_SLAB = 8
QUICK_SHAPE = (16, 512, 512)


# ---------------------------------------------------------------------------
# process-level measurements (also run on the workers, so self-contained)
# ---------------------------------------------------------------------------
def peak_rss_mib():
    """This process's resident-set high-water mark (VmHWM), MiB."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource as _resource

    return _resource.getrusage(_resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss():
    """Restart VmHWM from the current RSS (Linux ``clear_refs`` 5); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def cpu_seconds():
    """User + system CPU seconds of this process, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker_state():
    """Peak RSS (MiB), current RSS (MiB) and CPU seconds of a worker process (run through client.run)."""
    import psutil

    process = psutil.Process()
    times = process.cpu_times()
    return {
        "peak_rss_mib": peak_rss_mib(),
        "rss_mib": process.memory_info().rss / 2**20,
        "cpu_s": times.user + times.system,
    }


def warm_up_worker():
    """Import nanoseg and load its kernels on a worker (run through client.run), as the client does."""
    import dask.array  # noqa: F401
    import zarr  # noqa: F401

    # nanoseg imports its estimators on first use: import what the tasks will run.
    from nanoseg import NanoparticleLabeler, NanoparticleMixture  # noqa: F401
    from nanoseg._engine import labeling, posterior  # noqa: F401

    return warm_up_jit()


def worker_reset():
    """Reset a worker's VmHWM (run through client.run)."""
    return reset_peak_rss()


# ---------------------------------------------------------------------------
# instrumentation of the labeller, in the benchmark's process only
# ---------------------------------------------------------------------------
class Probe:
    """Wraps a few functions of nanoseg's lazy labeller to time them (this process only).

    Nothing changes in what they compute: each wrapper calls the original
    and adds its duration to a counter.
    """

    def __init__(self, keep_faces=False):
        self.lock = threading.Lock()
        self.keep_faces = keep_faces
        self.faces = []  # face_pairs' arguments (copies), to time them again alone
        self.reset()

    def reset(self):
        self.data = {
            "face_pairs_s": 0.0, "face_pairs_calls": 0, "face_pair_rows": 0,
            "merge_s": 0.0, "merge_global_ids": 0, "merge_pairs": 0, "n_labels": None,
            "local_labels_s": 0.0, "local_labels_calls": 0,
            "read_mask_s": 0.0, "read_mask_bytes": 0,
            "worker_slabs": 0, "worker_wait_s": 0.0, "worker_voxel_bytes": 0,
            "analyse_s": 0.0, "slab_depth": None, "n_slabs": None, "compute_options": None,
        }

    def add(self, **values):
        with self.lock:
            for key, value in values.items():
                self.data[key] += value

    def install(self):
        from nanoseg._engine import labeling

        probe = self
        face_pairs = labeling.face_pairs
        local_labels = labeling.local_labels
        merge = labeling.SlabLabeler._merge
        read_mask = labeling.SlabLabeler.read_mask
        analyse = labeling.SlabLabeler.analyse
        options = labeling.SlabLabeler._slab_compute_options
        on_workers = labeling.SlabLabeler._labelled_on_workers

        self.face_pairs = face_pairs

        def timed_face_pairs(*args, **kwargs):
            if probe.keep_faces:
                lower, upper, *rest = args
                probe.faces.append(((lower[0].copy(), lower[1].copy()), (upper[0].copy(), upper[1].copy()), *rest))
            t0 = time.perf_counter()
            pairs = face_pairs(*args, **kwargs)
            probe.add(face_pairs_s=time.perf_counter() - t0, face_pairs_calls=1, face_pair_rows=len(pairs))
            return pairs

        def timed_local_labels(*args, **kwargs):
            t0 = time.perf_counter()
            out = local_labels(*args, **kwargs)
            probe.add(local_labels_s=time.perf_counter() - t0, local_labels_calls=1)
            return out

        def timed_merge(self, merger):
            t0 = time.perf_counter()
            merged = merge(self, merger)
            # The union-find's nodes are the components touching across a face.
            probe.add(merge_s=time.perf_counter() - t0, merge_global_ids=merged.n_open, merge_pairs=merged.n_pairs)
            probe.data["n_labels"] = int(merged.n_labels)
            return merged

        def timed_read_mask(self, lo, hi):
            t0 = time.perf_counter()
            mask = read_mask(self, lo, hi)
            probe.add(read_mask_s=time.perf_counter() - t0, read_mask_bytes=int(mask.nbytes))
            probe.data["masks_packed"] = getattr(self, "_packed_mask", None) is not None
            return mask

        def timed_analyse(self, *args, **kwargs):
            probe.data["slab_depth"] = int(self.depth)
            probe.data["n_slabs"] = len(self.bounds)
            t0 = time.perf_counter()
            plan = analyse(self, *args, **kwargs)
            probe.add(analyse_s=time.perf_counter() - t0)
            return plan

        def timed_on_workers(self):
            # Slabs labelled by worker tasks: time waiting for each, and what
            # crossed (the summaries: sizes and the two faces' voxels).
            results = on_workers(self)
            while True:
                t0 = time.perf_counter()
                try:
                    count, sizes, first, last, kept = next(results)
                except StopIteration:
                    return
                # As sent: 32-bit sizes and face indices (widened on arrival).
                sent = 4 * sizes.size + sum(8 * face[0].size for face in (first, last))
                probe.add(worker_slabs=1, worker_wait_s=time.perf_counter() - t0, worker_voxel_bytes=sent)
                yield count, sizes, first, last, kept

        def recorded_options(self):
            out = options(self)
            probe.data["compute_options"] = dict(out)
            return out

        labeling.face_pairs = timed_face_pairs
        labeling.local_labels = timed_local_labels
        labeling.SlabLabeler._merge = timed_merge
        labeling.SlabLabeler.read_mask = timed_read_mask
        labeling.SlabLabeler.analyse = timed_analyse
        labeling.SlabLabeler._slab_compute_options = recorded_options
        labeling.SlabLabeler._labelled_on_workers = timed_on_workers


# ---------------------------------------------------------------------------
# child processes
# ---------------------------------------------------------------------------
def _out_array(path, like, dtype):
    import zarr

    return zarr.create_array(store=str(path), shape=like.shape, chunks=like.chunks, dtype=dtype, overwrite=True)


def _task_summary(records):
    """Compute and transfer seconds of a task stream: by task name, and by worker."""
    from dask.utils import key_split

    by_name, by_worker = {}, {}
    transfer = 0.0
    for record in records:
        compute = sum(s["stop"] - s["start"] for s in record["startstops"] if s["action"] == "compute")
        transfer += sum(s["stop"] - s["start"] for s in record["startstops"] if s["action"] == "transfer")
        name = key_split(record["key"])
        entry = by_name.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += compute
        by_worker[record["worker"]] = by_worker.get(record["worker"], 0.0) + compute
    return {
        "n_tasks": len(records),
        "compute_s_by_name": {k: {"tasks": v[0], "s": v[1]} for k, v in sorted(by_name.items(), key=lambda kv: -kv[1][1])},
        "compute_s_by_worker": by_worker,
        "transfer_s": transfer,
    }


def child_run(args):
    """One end-to-end run (fit, labels, mask) under one scheduler; writes a JSON record."""
    import contextlib
    import warnings

    import dask
    import dask.array as da
    import joblib
    import zarr

    from nanoseg import NanoparticleLabeler, NanoparticleMixture

    distributed = args.mode == "distributed"
    if distributed:
        from dask.distributed import Client, LocalCluster, get_task_stream
    record = {"mode": args.mode, "client_jit_s": warm_up_jit(), "pid": os.getpid()}
    probe = Probe()
    probe.install()
    outdir = Path(args.workdir)
    volume = zarr.open_array(str(args.input), mode="r")
    n_voxels = int(volume.size)

    client = cluster = None
    if distributed:
        t0 = time.perf_counter()
        cluster = LocalCluster(
            n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None,
        )
        client = Client(cluster)
        record["startup_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        record["worker_jit_s"] = client.run(warm_up_worker)
        record["worker_jit_wall_s"] = time.perf_counter() - t0
        record["scheduler"] = "dask.distributed"
    else:
        dask.config.set(scheduler="threads", num_workers=args.threads)
        record["scheduler"] = f"threads ({args.threads})"

    def workers():
        return client.run(worker_state) if client is not None else {}

    stages = {}

    @contextlib.contextmanager
    def stage(name):
        probe.reset()
        reset_peak_rss()
        if client is not None:
            client.run(worker_reset)
        before_workers = workers()
        cpu0 = cpu_seconds()
        info = {}
        stream = get_task_stream(client=client) if client is not None else contextlib.nullcontext()
        with stream as ts:
            t0 = time.perf_counter()
            yield info
            info["wall_s"] = time.perf_counter() - t0
        info["client_cpu_s"] = cpu_seconds() - cpu0
        info["client_peak_rss_mib"] = peak_rss_mib()
        after = workers()
        if after:
            info["workers"] = {
                w: {"peak_rss_mib": s["peak_rss_mib"], "rss_mib": s["rss_mib"],
                    "cpu_s": s["cpu_s"] - before_workers[w]["cpu_s"]}
                for w, s in after.items()
            }
            info["workers_cpu_s"] = sum(s["cpu_s"] for s in info["workers"].values())
            info["tasks"] = _task_summary(ts.data)
        info["probe"] = dict(probe.data)
        stages[name] = info

    with stage("fit"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mixture = NanoparticleMixture().fit(volume)
    joblib.dump(mixture, outdir / f"mixture_{args.mode}.joblib")

    with stage("labels") as info:
        t0 = time.perf_counter()
        labels = NanoparticleLabeler().transform(mixture.transform(volume))
        t1 = time.perf_counter()
        target = _out_array(outdir / f"labels_{args.mode}.zarr", volume, labels.dtype)
        da.store(labels, target, lock=False)
        info.update(analysis_s=t1 - t0, store_s=time.perf_counter() - t1, labels_dtype=str(labels.dtype),
                    output_blocks=len(labels.chunks[0]),
                    graph_tasks=len(dict(labels.__dask_graph__())))

    with stage("mask") as info:
        info["mask_voxels"] = int(mixture.predict(volume, threshold=THRESHOLD).sum().compute())

    if distributed:
        t0 = time.perf_counter()
        client.close()
        cluster.close()
        record["shutdown_s"] = time.perf_counter() - t0
    record.update(n_voxels=n_voxels, stages=stages, process_peak_rss_mib=peak_rss_mib())
    return record


def child_merge(args):
    """Label the fitted mixture's posterior with one slab depth (threaded scheduler); time the merge."""
    import dask
    import joblib
    import numpy as np
    import zarr

    from nanoseg import NanoparticleLabeler
    from nanoseg._plan import LABEL_BYTES_PER_VOXEL

    dask.config.set(scheduler="threads", num_workers=args.threads)
    jit_s = warm_up_jit()
    probe = Probe(keep_faces=True)
    probe.install()
    volume = zarr.open_array(str(args.input), mode="r")
    mixture = joblib.load(Path(args.workdir) / "mixture_threads.joblib")
    n_jobs = args.threads
    plane = volume.shape[1] * volume.shape[2]
    # memory_budget is shared by the n_jobs slabs in flight: each gets depth planes' worth.
    budget = None if args.depth == 0 else n_jobs * args.depth * plane * LABEL_BYTES_PER_VOXEL
    labeler = NanoparticleLabeler(memory_budget=budget, n_jobs=n_jobs)
    t0 = time.perf_counter()
    labels = labeler.transform(mixture.transform(volume))
    analysis_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    # A checksum of the final labels: identical labels for every depth give the same figures.
    checksum = int(labels.sum(dtype=np.uint64).compute())
    foreground = int((labels > 0).sum().compute())
    labels_s = time.perf_counter() - t0
    # The same faces again, one after the other with nothing else running: the merge's own cost.
    t0 = time.perf_counter()
    for face in probe.faces:
        probe.face_pairs(*face)
    alone_s = time.perf_counter() - t0
    face_voxels = [int(f[0][0].size + f[1][0].size) for f in probe.faces]
    return {
        "face_pairs_alone_s": alone_s, "face_voxels_mean": statistics.mean(face_voxels) if face_voxels else 0,
        "requested_depth": args.depth, "memory_budget": budget, "n_jobs": n_jobs, "jit_s": jit_s,
        "analysis_s": analysis_s, "checksum_s": labels_s, "label_sum": checksum, "foreground": foreground,
        "peak_rss_mib": peak_rss_mib(), **probe.data,
    }


def child_graph(args):
    """Per-slab compute overhead of the analysis pass on an unwritten zarr volume `args.depth` planes deep.

    The volume has the benchmark's planes and chunks but no data (zarr's
    fill value, in memory): what is timed is building the graph, culling it
    for one slab's planes, and computing those planes of zeros.
    """
    import dask
    import joblib
    import zarr

    from nanoseg._engine.labeling import SlabLabeler
    from nanoseg._volume import as_volume

    dask.config.set(scheduler="threads", num_workers=args.threads)
    warm_up_jit()
    like = zarr.open_array(str(args.input), mode="r")
    mixture = joblib.load(Path(args.workdir) / "mixture_threads.joblib")
    reset_peak_rss()
    empty = zarr.create_array(
        store=zarr.storage.MemoryStore(), shape=(args.depth, *like.shape[1:]), chunks=like.chunks,
        dtype="u1", fill_value=0,
    )
    t0 = time.perf_counter()
    labeler = SlabLabeler(
        as_volume(mixture.transform(empty)), threshold=THRESHOLD, radius=1, connectivity=2, min_size=10,
        n_jobs=args.threads,
    )
    mask = labeler.lazy_mask()
    graph_s = time.perf_counter() - t0
    # One slab with its halo, as the analysis pass asks for the first time it meets it.
    planes = min(args.depth, args.planes)
    starts = [0, args.depth // 2, max(0, args.depth - planes)]
    mask[0:planes].compute(scheduler="sync")  # first call: thread pools, caches
    times = []
    for z in starts:
        t0 = time.perf_counter()
        mask[z : z + planes].compute(scheduler="sync")
        times.append(time.perf_counter() - t0)
    # The analysis pass computes its slabs through culled windows of the
    # graph (nanoseg._engine.graph_windows): one cull per window, then slabs
    # from the window's small graph. Amortised per slab: the slab's compute
    # plus its share of the window's cull.
    windows = labeler._windows
    middle = args.depth // 2
    t0 = time.perf_counter()
    windows.window(middle, middle + planes)
    cull_s = time.perf_counter() - t0
    window_times = []
    for z in (middle, middle + labeler.depth, middle + 2 * labeler.depth):
        z = min(z, args.depth - planes)
        t0 = time.perf_counter()
        windows.compute(z, z + planes)
        window_times.append(time.perf_counter() - t0)
    per_window = max(1, windows.stride // labeler.depth)
    return {
        "volume_depth": args.depth, "plane": list(like.shape[1:]), "graph_tasks": len(mask.__dask_graph__()),
        "graph_s": graph_s, "slab_planes": planes, "slab_compute_s": statistics.median(times),
        "slab_compute_runs_s": times, "n_slabs": len(labeler.bounds), "slab_depth": labeler.depth,
        "windowed": not windows.whole, "window_stride": windows.stride, "window_cull_s": cull_s,
        "slab_window_s": statistics.median(window_times),
        "slab_amortised_s": statistics.median(window_times) + (cull_s / per_window if not windows.whole else 0.0),
        "peak_rss_mib": peak_rss_mib(),
    }


def child_main(args):
    # Imports before any clock: the figures are the stages' own work.
    import dask.array  # noqa: F401
    import joblib  # noqa: F401
    import zarr  # noqa: F401

    import nanoseg  # noqa: F401

    if args.mode == "distributed":
        import distributed  # noqa: F401
    record = {"run": child_run, "merge": child_merge, "graph": child_graph}[args.child](args)
    Path(args.result).write_text(json.dumps(record, indent=1))


# ---------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------
def fresh(child, args, input_path, workdir, **extra):
    """Run a child in a fresh interpreter; return its record with the process's wall time."""
    name = f"dist_{child}_{extra.get('mode', '')}{extra.get('depth', '')}.json"
    result = workdir / name
    result.unlink(missing_ok=True)
    command = [
        sys.executable, str(Path(__file__).resolve()), "--child", child, "--input", str(input_path),
        "--workdir", str(workdir), "--result", str(result), "--threads", str(args.threads),
        "--workers", str(args.workers),
    ]
    for key, value in extra.items():
        command += [f"--{key}", str(value)]
    t0 = time.perf_counter()
    proc = subprocess.run(command, check=False, capture_output=True, text=True)
    process_s = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-6000:])
        raise RuntimeError(f"child {child} {extra} failed with exit status {proc.returncode}")
    record = json.loads(result.read_text())
    record["process_s"] = process_s
    return record


def compare_labels(path_a, path_b):
    """Voxel-for-voxel comparison of two label arrays, COMPARE_SLAB planes at a time."""
    import numpy as np
    import zarr

    a = zarr.open_array(str(path_a), mode="r")
    b = zarr.open_array(str(path_b), mode="r")
    if a.shape != b.shape or a.dtype != b.dtype:
        return {"identical": False, "reason": f"{a.shape} {a.dtype} against {b.shape} {b.dtype}"}
    differing = foreground = 0
    max_a = max_b = 0
    for z0 in range(0, a.shape[0], COMPARE_SLAB):
        sa, sb = a[z0 : z0 + COMPARE_SLAB], b[z0 : z0 + COMPARE_SLAB]
        differing += int(np.count_nonzero(sa != sb))
        foreground += int(np.count_nonzero(sa))
        max_a, max_b = max(max_a, int(sa.max())), max(max_b, int(sb.max()))
    return {"identical": differing == 0, "voxels_differing": differing, "foreground": foreground,
            "n_labels": [max_a, max_b]}


def same_fit(workdir):
    """Whether both runs fitted the same mixture (PMFs and thresholds equal)."""
    import joblib
    import numpy as np

    a = joblib.load(workdir / "mixture_threads.joblib")
    b = joblib.load(workdir / "mixture_distributed.joblib")
    return bool(
        np.array_equal(a.particle_pmf_, b.particle_pmf_) and np.array_equal(a.background_pmf_, b.background_pmf_)
        and a.low_intensity_ == b.low_intensity_ and a.high_intensity_ == b.high_intensity_
    )


def sweep_depths(shape, requested):
    """Slab depths for the merge sweep: powers of two up to half the depth, and 0 (the default)."""
    if requested is not None:
        return requested
    depths, d = [], 1
    while d <= max(1, shape[0] // 2):
        depths.append(d)
        d *= 2
    return [0, *depths]


def graph_depths(shape, requested):
    """Volume depths for the graph-overhead probe: this volume's, and up to 1e12 voxels of its planes."""
    if requested is not None:
        return requested
    deepest = int(1e12 // (shape[1] * shape[2]))
    if shape[1] * shape[2] < 2048 * 2048:
        return [shape[0], 1024, 8192]
    return [shape[0], 8192, 65536, deepest]


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, spec=".2f"):
    return "-" if value is None else format(value, spec)


def summarise(runs, n_voxels):
    """Medians over repeats of one mode's figures."""
    def stage(name, key):
        return median([r["stages"][name].get(key) for r in runs])

    out = {
        "fit_s": stage("fit", "wall_s"), "labels_s": stage("labels", "wall_s"),
        "analysis_s": stage("labels", "analysis_s"), "store_s": stage("labels", "store_s"),
        "mask_s": stage("mask", "wall_s"),
        "startup_s": median([r.get("startup_s") for r in runs]),
        "worker_jit_wall_s": median([r.get("worker_jit_wall_s") for r in runs]),
        "shutdown_s": median([r.get("shutdown_s") for r in runs]),
        "process_s": median([r["process_s"] for r in runs]),
        "client_peak_mib": {s: max(r["stages"][s]["client_peak_rss_mib"] for r in runs) for s in ("fit", "labels", "mask")},
        "walls": {s: [r["stages"][s]["wall_s"] for r in runs] for s in ("fit", "labels", "mask")},
    }
    out["end_to_end_s"] = out["fit_s"] + out["labels_s"]
    if "workers" in runs[0]["stages"]["labels"]:
        out["worker_peak_mib"] = {
            s: max(w["peak_rss_mib"] for r in runs for w in r["stages"][s]["workers"].values())
            for s in ("fit", "labels", "mask")
        }
    out["cpu"] = {
        s: (median([r["stages"][s]["client_cpu_s"] for r in runs]),
            median([r["stages"][s].get("workers_cpu_s") for r in runs]))
        for s in ("fit", "labels", "mask")
    }
    return out


def print_report(result):
    n = result["n_voxels"]
    shape = result["shape"]
    modes = result["summary"]
    print(f"\nvolume {' x '.join(map(str, shape))} uint8 ({n / 1e9:.3f} Gvoxel), chunks "
          f"{' x '.join(map(str, result['chunks']))}, NP voxel fraction {result['np_fraction'] * 100:.3f} %; "
          f"medians of {result['repeat']} run(s)")
    head = ("scheduler", "start-up s", "fit s", "labels s", "(analysis + write)", "end to end s", "e2e Mvox/s",
            "labels Mvox/s", "mask s", "mask Mvox/s", "client peak MiB", "worker peak MiB")
    rows = []
    for mode, s in modes.items():
        peaks = s["client_peak_mib"]
        worker = s.get("worker_peak_mib")
        rows.append((
            "threads" if mode == "threads" else f"LocalCluster {result['workers']}x1",
            fmt(s["startup_s"]) if s["startup_s"] is not None else "-",
            fmt(s["fit_s"]), fmt(s["labels_s"]), f"{fmt(s['analysis_s'])} + {fmt(s['store_s'])}",
            fmt(s["end_to_end_s"]), f"{n / s['end_to_end_s'] / 1e6:.0f}", f"{n / s['labels_s'] / 1e6:.0f}",
            fmt(s["mask_s"]), f"{n / s['mask_s'] / 1e6:.0f}",
            " / ".join(f"{peaks[k]:.0f}" for k in ("fit", "labels", "mask")),
            " / ".join(f"{worker[k]:.0f}" for k in ("fit", "labels", "mask")) if worker else "-",
        ))
    print()
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print("\n(peaks per stage: fit / labels / mask; worker peak is the largest worker's VmHWM)")

    dist = modes.get("distributed")
    thr = modes.get("threads")
    if dist and thr:
        print(f"\ndistributed / threads wall time: fit {dist['fit_s'] / thr['fit_s']:.2f}x, labels "
              f"{dist['labels_s'] / thr['labels_s']:.2f}x (analysis {dist['analysis_s'] / thr['analysis_s']:.2f}x, "
              f"write {dist['store_s'] / thr['store_s']:.2f}x), mask {dist['mask_s'] / thr['mask_s']:.2f}x, "
              f"end to end {dist['end_to_end_s'] / thr['end_to_end_s']:.2f}x")
        print(f"cluster: start-up {fmt(dist['startup_s'])} s, numba kernels loaded on the workers "
              f"{fmt(dist['worker_jit_wall_s'])} s, shutdown {fmt(dist['shutdown_s'])} s (none of them in the stage "
              f"times); whole process {fmt(dist['process_s'])} s against {fmt(thr['process_s'])} s threaded")
        per_worker = n / dist["mask_s"] / 1e6 / result["workers"]
        print(f"per-worker throughput (mask stage: workers only): {per_worker:.0f} Mvoxel/s per 1-thread worker; "
              f"writing the labels: {n / dist['store_s'] / 1e6 / result['workers']:.0f} Mvoxel/s per worker")
    print("\nCPU seconds (client process incl. scheduler / all workers), medians:")
    for mode, s in modes.items():
        parts = ", ".join(f"{k} {fmt(c)} / {fmt(w)}" for k, (c, w) in s["cpu"].items())
        print(f"  {mode:<12} {parts}")
    last = result["runs"]["distributed"][-1] if result["runs"].get("distributed") else None
    if last:
        for name in ("labels", "mask"):
            tasks = last["stages"][name].get("tasks")
            if not tasks:
                continue
            top = list(tasks["compute_s_by_name"].items())[:8]
            print(f"worker tasks in '{name}' (last run): {tasks['n_tasks']} tasks; compute s by name: "
                  + ", ".join(f"{k} {v['s']:.2f} ({v['tasks']})" for k, v in top)
                  + f"; transfer {tasks['transfer_s']:.2f} s")
        p = last["stages"]["labels"]["probe"]
        print(f"client side of 'labels' under the cluster (last run): analysis pass {p['analyse_s']:.2f} s, "
              f"threads waiting for masks from the cluster {p['read_mask_s']:.2f} s ({p['read_mask_bytes'] / 2**20:.0f} "
              f"MiB of boolean slabs with halos{', sent packed 8 pixels a byte' if p.get('masks_packed') else ''}), "
              f"slabs labelled by worker tasks {p.get('worker_slabs', 0)} (waited {p.get('worker_wait_s', 0):.2f} s, "
              f"{p.get('worker_voxel_bytes', 0) / 2**20:.1f} MiB of slab summaries received), "
              f"local close + label {p['local_labels_s']:.2f} s "
              f"({p['local_labels_calls']} slabs of {p['slab_depth']} planes), face pairs {p['face_pairs_s']:.3f} s, "
              f"union-find {p['merge_s']:.3f} s; slab compute options {p['compute_options']}")
        graph = last["stages"]["labels"]["graph_tasks"]
        print(f"lazy labels graph: {graph} tasks, {last['stages']['labels']['output_blocks']} output blocks")
    if result["runs"].get("threads"):
        pt = result["runs"]["threads"][-1]["stages"]["labels"]["probe"]
        print(f"client side of 'labels' threaded (last run): analysis pass {pt['analyse_s']:.2f} s, computing masks "
              f"{pt['read_mask_s']:.2f} s, local close + label {pt['local_labels_s']:.2f} s; slab compute options "
              f"{pt['compute_options']}")

    print()
    for i, cmp in enumerate(result["agreement"]):
        if cmp.get("reason"):
            print(f"run {i + 1}: labels DIFFER: {cmp['reason']}")
            continue
        print(f"run {i + 1}: labels identical voxel for voxel: {'yes' if cmp['identical'] else 'NO'} "
              f"({cmp['voxels_differing']} voxels differ; {cmp['foreground']} particle voxels, "
              f"{cmp['n_labels'][0]} / {cmp['n_labels'][1]} particles); same fitted mixture: "
              f"{'yes' if result['same_fit'][i] else 'NO'}")

    sweep = result.get("sweep")
    if sweep:
        print("\nface merge against the number of slabs (threaded scheduler, 2 slabs in flight, fresh process each):\n")
        head = ("slab depth", "slabs", "faces", "analysis s", "face pairs s", "ms / face", "alone ms / face",
                "union-find s",
                "union-find nodes (components touching a face)", "face pairs", "particles", "label checksum", "peak RSS MiB")
        print("| " + " | ".join(head) + " |")
        print("|" + "---:|" * len(head))
        for r in sweep:
            faces = r["n_slabs"] - 1
            per_face = f"{r['face_pairs_s'] / faces * 1e3:.2f}" if faces else "-"
            alone = f"{r['face_pairs_alone_s'] / faces * 1e3:.2f}" if faces else "-"
            depth = f"{r['slab_depth']}" + (" (default)" if r["requested_depth"] == 0 else "")
            print(f"| {depth} | {r['n_slabs']} | {faces} | {r['analysis_s']:.2f} | {r['face_pairs_s']:.3f} | "
                  f"{per_face} | {alone} | {r['merge_s']:.3f} | {r['merge_global_ids']} | {r['merge_pairs']} | "
                  f"{r['n_labels']} | {r['label_sum']} | {r['peak_rss_mib']:.0f} |")
        print("\n(face pairs s: inside the analysis pass, while other threads label slabs; alone: the same"
              " faces again, one after the other, nothing else running; mean foreground voxels on the two"
              " planes of a face: " + ", ".join(f"{r['face_voxels_mean']:.0f}" for r in sweep if r["n_slabs"] > 1)
              + ")")
        sums = {(r["label_sum"], r["foreground"], r["n_labels"]) for r in sweep}
        print(f"\nsame labels for every slab depth (particles, label sum, particle voxels): "
              f"{'yes' if len(sums) == 1 else 'NO'}")

    graph = result.get("graph")
    if graph:
        base = graph[0]["slab_compute_s"]
        print("\nper-slab overhead against the volume's depth (empty in-memory zarr with these planes and"
              " chunks; one slab's mask computed, median of 3):\n")
        head = ("planes", "Gvoxel", "graph tasks", "slabs (default depth)", "build graph s",
                "one slab, whole graph s", "over the smallest s", "that x slabs, h", "window stride",
                "window cull s", "one slab, windowed s (amortised)", "over the smallest s", "that x slabs, h",
                "peak RSS MiB")
        print("| " + " | ".join(head) + " |")
        print("|" + "---:|" * len(head))
        windowed_base = graph[0].get("slab_amortised_s", base)
        for r in graph:
            extra = r["slab_compute_s"] - base
            plane = r["plane"][0] * r["plane"][1]
            amortised = r.get("slab_amortised_s", float("nan"))
            extra_w = amortised - windowed_base
            print(f"| {r['volume_depth']} | {r['volume_depth'] * plane / 1e9:.2f} | {r['graph_tasks']} | "
                  f"{r['n_slabs']} | {r['graph_s']:.2f} | {r['slab_compute_s']:.3f} | {extra:.3f} | "
                  f"{extra * r['n_slabs'] / 3600:.2f} | {r.get('window_stride', '-')} | "
                  f"{r.get('window_cull_s', float('nan')):.3f} | {r.get('slab_window_s', float('nan')):.3f} "
                  f"({amortised:.3f}) | {extra_w:.3f} | {extra_w * r['n_slabs'] / 3600:.2f} | "
                  f"{r['peak_rss_mib']:.0f} |")

    print("\nnotes:")
    for line in NOTES:
        print(f"- {line}")


NOTES = [
    ("fit: under a distributed client, NanoparticleMixture.fit of the zarr volume runs one task per slab on the"
     " workers (nanoseg._engine.fit_workers): each reads its slab's chunk files and returns its slice histograms"
     " and its seed boxes' excluded histograms at a few candidate levels (5 around its own for the first five"
     " slabs, then those between their prediction and its own); the client adds up the counts"
     " and runs EM. Under the threaded scheduler the fit reads its slabs on n_jobs threads of the process."),
    ("labels: under the cluster, transform()'s analysis pass runs one task per slab on the workers: each takes"
     " the lazy mask's blocks that hold its slab and halo (zarr read, slice histograms, lookup, threshold; each"
     " block computed once), closes and labels the slab, and keeps its labelled voxels on the worker; the client"
     " receives each slab's component sizes and the voxels of its two faces, merges the faces and runs the"
     " union-find. The writing (final labels from the voxels kept on the workers, zarr writes) runs as worker"
     " tasks: nothing is labelled again and the input is not read again."),
    ("The threaded run computes each slab's mask with dask's synchronous scheduler inside one of the"
     " labeller's n_jobs threads; no data crosses a process boundary."),
    ("mask: predict(...).sum() is pure dask, so under the cluster it runs entirely on the workers;"
     " it is the measure of the workers' own throughput."),
    ("On a 2-core machine the client's threads, the scheduler and the workers share the same two cores;"
     " the figures say what the extra process boundary costs, not what more machines would gain."),
    ("Graph overhead: a compute() of a slice of the lazy mask makes dask cull the whole volume's graph"
     " (HighLevelGraph.cull lists the output keys of every blockwise layer), so its cost grows with the"
     " volume's depth, in the client, under the GIL ('whole graph' columns). The analysis pass computes its"
     " slabs from culled windows of the graph instead (nanoseg._engine.graph_windows): one whole-graph cull"
     " per window of about sqrt(planes x slab depth) planes, then each slab from the window's small graph"
     " ('windowed' columns; amortised = the slab plus its share of its window's cull)."),
]


def redact(argv):
    from bench_pipeline import redact as _redact

    return _redact(argv)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=0.54, help="volume size in Gvoxel (default 0.54)")
    parser.add_argument("--quick", action="store_true", help="a 16 x 512 x 512 volume, a few seconds a run")
    parser.add_argument("--workdir", help="directory for the phantom and outputs (kept; the phantom is reused)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each scheduler (default 1; medians reported)")
    parser.add_argument("--threads", type=int, default=2, help="threaded-scheduler workers, and n_jobs in the merge sweep (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (1 thread each)")
    parser.add_argument("--depths", type=int, nargs="*", default=None,
                        help="slab depths of the merge sweep (0: the labeller's default); default: 0 and powers "
                        "of two up to half the volume's depth; no value skips the sweep")
    parser.add_argument("--graph-depths", type=int, nargs="*", default=None,
                        help="volume depths (planes) of the graph-overhead probe on an empty in-memory zarr; "
                        "default: this volume's, 8192, 65536 and 1e12 voxels' worth (2048 x 2048 planes); "
                        "no value skips it")
    parser.add_argument("--json", help="also write the raw records as JSON to this file")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed")
    parser.add_argument("--child", choices=["run", "merge", "graph"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="", help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--planes", type=int, default=9, help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args)
        return 0

    try:
        import distributed  # noqa: F401
    except ImportError:
        parser.error("dask.distributed is needed: pip install 'nanoseg[dask]'")
    from bench_pipeline import machine_info, shape_for, source_digest
    from make_volume import make_volume

    load_before = os.getloadavg()[0]
    digest = source_digest()
    shape = QUICK_SHAPE if args.quick else shape_for(args.size)
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="nanoseg-dist-"))
    workdir = root / "x".join(map(str, shape))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    volume = make_volume(workdir / "input.zarr", shape, seed=args.seed, workers=2)
    n_voxels = int(volume.size)
    print(f"phantom {shape} ({n_voxels / 1e9:.3f} Gvoxel) in {workdir}: chunks {volume.chunks}, NP fraction "
          f"{volume.attrs['np_fraction']:.5f} ({time.perf_counter() - t0:.1f} s to build or reuse)", flush=True)

    runs = {"threads": [], "distributed": []}
    agreement, fits = [], []
    for i in range(args.repeat):
        for mode, records in runs.items():
            record = fresh("run", args, workdir / "input.zarr", workdir, mode=mode)
            records.append(record)
            st = record["stages"]
            print(f"run {i + 1}/{args.repeat} {mode:<11}: start-up {fmt(record.get('startup_s'))} s, fit "
                  f"{st['fit']['wall_s']:.2f} s, labels {st['labels']['wall_s']:.2f} s, mask {st['mask']['wall_s']:.2f} s, "
                  f"process {record['process_s']:.1f} s", flush=True)
        t0 = time.perf_counter()
        agreement.append(compare_labels(workdir / "labels_threads.zarr", workdir / "labels_distributed.zarr"))
        fits.append(same_fit(workdir))
        print(f"compared the labels in {time.perf_counter() - t0:.1f} s: identical "
              f"{agreement[-1]['identical']}", flush=True)

    sweep = []
    requested = [0, 1, 4] if args.quick and args.depths is None else args.depths
    for depth in sweep_depths(shape, requested):
        record = fresh("merge", args, workdir / "input.zarr", workdir, depth=depth)
        sweep.append(record)
        print(f"merge sweep: depth {record['slab_depth']} ({record['n_slabs']} slabs): analysis "
              f"{record['analysis_s']:.2f} s, face pairs {record['face_pairs_s']:.3f} s, union-find "
              f"{record['merge_s']:.3f} s", flush=True)

    graph = []
    depths = graph_depths(shape, args.graph_depths)
    if depths:
        # The planes of one default slab and its halo (at most the smallest volume's depth), the same for all.
        from nanoseg._plan import LABEL_BYTES_PER_VOXEL
        from nanoseg._volume import as_volume

        slab = as_volume(volume).slab_depth(LABEL_BYTES_PER_VOXEL) + 4
        planes = min(min(depths), slab)
    for depth in depths:
        record = fresh("graph", args, workdir / "input.zarr", workdir, depth=depth, planes=planes)
        graph.append(record)
        print(f"graph overhead: {depth} planes ({record['graph_tasks']} tasks): one slab of "
              f"{record['slab_planes']} planes {record['slab_compute_s']:.3f} s", flush=True)

    result = {
        "command": "python benchmarks/bench_distributed.py " + " ".join(shlex.quote(a) for a in redact(argv or sys.argv[1:])),
        "machine": machine_info(),
        "shape": list(shape), "chunks": list(volume.chunks), "n_voxels": n_voxels,
        "np_fraction": volume.attrs["np_fraction"], "repeat": args.repeat, "workers": args.workers,
        "threads": args.threads,
        "runs": runs, "summary": {mode: summarise(r, n_voxels) for mode, r in runs.items() if r},
        "agreement": agreement, "same_fit": fits, "sweep": sweep, "graph": graph,
    }
    info = result["machine"]
    info["source_changed_during_run"] = source_digest() != digest
    if info["source_changed_during_run"]:
        print("\nWARNING: the nanoseg sources changed during the run; runs may have measured different versions")
    print(f"\n{result['command']}")
    print(f"machine: {info['cpus']} CPUs, {info['platform']}, Python {info['python']}; dask {info['dask']}, "
          f"distributed {__import__('distributed').__version__}, zarr {info['zarr']}, numpy {info['numpy']}, "
          f"nanoseg {info['nanoseg']} (source {info['source']}); load average before the run "
          f"{load_before:.2f}, after {os.getloadavg()[0]:.2f}")
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if not all(a.get("identical") for a in agreement):
        print("\nERROR: the labels of the threaded and distributed runs differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
