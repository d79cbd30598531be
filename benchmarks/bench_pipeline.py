"""Time the reference implementation of the seed method and nanoseg on the same zarr volumes.

For every requested size a phantom is written to zarr (chunks of one slice by
1024 x 1024 pixels), then every stage of both implementations runs in its own
process on that array: fit, posterior, labels. The script prints wall time,
throughput, peak RSS and speed-up per stage, the end-to-end totals, and
whether the two label volumes agree.

Examples::

    python benchmarks/bench_pipeline.py --sizes 0.004
    python benchmarks/bench_pipeline.py --sizes 0.13 0.54 --markdown benchmarks/RESULTS.md

Sizes are in Gvoxel (1e9 voxels) and map to 2048 x 2048 planes (512 x 512
below 0.03 Gvoxel) with a depth rounded to a multiple of 8 slices:
0.13 -> 32 x 2048 x 2048, 0.54 -> 128 x 2048 x 2048, 1.07 -> 256 x 2048 x 2048.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_volume import make_volume

REF_STAGES = ["ref-fit", "ref-posterior", "ref-labels"]
NS_STAGES = ["read-once", "read-once-files", "ns-fit", "ns-posterior-mask", "ns-posterior-zarr", "ns-labels", "ns-end-to-end"]

#: (stage key, row label, implementation, what it does), in table order.
ROWS = [
    ("read-once", "read the input once", "-", "every plane decoded once on two threads, nothing computed"),
    ("read-once-files", "read the input once", "nanoseg reader", "the same, through nanoseg's chunk-file reader"),
    ("ref-fit", "fit", "reference", "two passes over the zarr slices + EM"),
    ("ns-fit", "fit", "nanoseg", "NanoparticleMixture().fit(zarr)"),
    ("ref-posterior", "posterior", "reference", "per-slice MAP + LUT, written to zarr float16"),
    ("ns-posterior-zarr", "posterior", "nanoseg", "lazy transform (posterior_dtype float16), written with write_ome_zarr"),
    ("ns-posterior-mask", "posterior + mask", "nanoseg", "lazy predict(threshold=0.95) mask, .sum(), nothing stored"),
    ("ref-labels", "labels", "reference", "whole posterior zarr loaded, close, label, filter, write"),
    ("ns-labels", "labels", "nanoseg", "Labeler().transform(mixture.transform(raw zarr)), written with write_ome_zarr"),
]
#: The end-to-end stage: fit and labels in one fresh process, first calls included.
ONE_PROCESS = "ns-end-to-end"
#: Which reference stage a nanoseg stage is compared with.
COUNTERPART = {
    "ns-fit": "ref-fit",
    "ns-posterior-zarr": "ref-posterior",
    "ns-posterior-mask": "ref-posterior",
    "ns-labels": "ref-labels",
}
#: Figures reported for the published implementation on a 2-core machine, by shape.
PUBLISHED = {
    (128, 2048, 2048): {"fit": 10.7, "posterior": 25.9, "labels": 39.6, "peak_gib": 7.8},
}
#: End to end: from the raw zarr to a labels zarr on disk.
END_TO_END = {
    "reference": ["ref-fit", "ref-posterior", "ref-labels"],
    "nanoseg": ["ns-fit", "ns-labels"],
}


def shape_for(size_gvox):
    """Volume shape for a size in Gvoxel (see the module docstring)."""
    plane = 2048 if size_gvox >= 0.03 else 512
    depth = size_gvox * 1e9 / plane**2
    depth = int(round(depth / 8) * 8) if depth >= 8 else max(1, round(depth))
    return (depth, plane, plane)


def machine_info():
    import dask
    import numpy
    import scipy
    import skimage
    import zarr

    import nanoseg

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "scikit-image": skimage.__version__,
        "zarr": zarr.__version__,
        "dask": dask.__version__,
        "nanoseg": nanoseg.__version__,
        "source": source_revision(),
        "date": datetime.date.today().isoformat(),
    }


def source_digest():
    """Hash of the installed nanoseg sources, to notice a package edited during a run."""
    import hashlib
    import importlib.util

    digest = hashlib.sha256()
    for location in importlib.util.find_spec("nanoseg").submodule_search_locations:
        for path in sorted(Path(location).rglob("*.py")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def source_revision():
    """Commit of the checkout this script sits in, marked when there are uncommitted changes."""
    try:
        rev = subprocess.run(
            ["git", "describe", "--always", "--dirty=+uncommitted-changes"],
            cwd=HERE, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev or "unknown"


def run_stage(stage, input_path, workdir, threads):
    """Run one stage in a fresh interpreter; return its JSON record plus the process wall time."""
    result = workdir / f"{stage}.json"
    result.unlink(missing_ok=True)
    cmd = [
        sys.executable, str(HERE / "stages.py"), stage,
        "--input", str(input_path), "--workdir", str(workdir),
        "--result", str(result), "--threads", str(threads),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    process_wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"stage {stage} failed with exit status {proc.returncode}")
    record = json.loads(result.read_text())
    record["process_s"] = process_wall
    return record


def summarise(records):
    """Median wall times and max peak RSS of repeated runs of one stage."""
    walls = [r["wall_s"] for r in records]
    return {
        "wall_s": statistics.median(walls),
        "walls_s": walls,
        "process_s": statistics.median(r["process_s"] for r in records),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in records),
        "last": records[-1],
    }


def bench_size(size, args, root):
    shape = tuple(args.shape) if args.shape else shape_for(size)
    n_voxels = shape[0] * shape[1] * shape[2]
    tag = "x".join(map(str, shape))
    workdir = root / tag
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"\n== {size:g} Gvox: shape {shape} ({n_voxels / 1e9:.3f} Gvox) in {workdir}", flush=True)

    t0 = time.perf_counter()
    volume = make_volume(workdir / "input.zarr", shape, seed=args.seed, workers=2)
    attrs = dict(volume.attrs)
    print(
        f"   phantom: chunks {volume.chunks}, NP voxel fraction {attrs['np_fraction']:.5f} "
        f"({time.perf_counter() - t0:.1f} s to build or reuse)",
        flush=True,
    )

    plan = []
    if not args.skip_reference:
        plan += [(s, args.repeat_reference) for s in REF_STAGES]
    plan += [(s, args.repeat) for s in NS_STAGES]
    stages = {}
    for stage, repeat in plan:
        records = []
        for i in range(repeat):
            record = run_stage(stage, workdir / "input.zarr", workdir, args.threads)
            records.append(record)
            print(
                f"   {stage:<18} run {i + 1}/{repeat}: {record['wall_s']:8.2f} s  "
                f"peak {record['peak_rss_mib']:7.0f} MiB",
                flush=True,
            )
        stages[stage] = summarise(records)

    agreement = None
    if not args.skip_reference:
        try:
            agreement = run_stage("compare", workdir / "input.zarr", workdir, args.threads)
        except RuntimeError as exc:
            agreement = {"error": str(exc)}
    return {
        "size_gvox": size,
        "shape": list(shape),
        "n_voxels": n_voxels,
        "chunks": list(volume.chunks),
        "np_fraction": attrs["np_fraction"],
        "stages": stages,
        "agreement": agreement,
    }


# ---------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------
def table_rows(result):
    """Rows (stage, implementation, wall, process, Mvox/s, peak, speed-up, note) of one size."""
    stages, n = result["stages"], result["n_voxels"]
    rows = []
    for key, label, impl, note in ROWS:
        if key not in stages:
            continue
        s = stages[key]
        ref = stages.get(COUNTERPART.get(key, ""))
        speed = f"{ref['wall_s'] / s['wall_s']:.1f}x" if ref else ("1x" if impl == "reference" else "")
        rows.append(
            (label, impl, f"{s['wall_s']:.2f}", f"{s['process_s']:.2f}", f"{n / s['wall_s'] / 1e6:.0f}",
             f"{s['peak_rss_mib']:.0f}", speed, note)
        )
    totals = {}
    for impl, keys in END_TO_END.items():
        if all(k in stages for k in keys):
            totals[impl] = (
                sum(stages[k]["wall_s"] for k in keys),
                sum(stages[k]["process_s"] for k in keys),
                max(stages[k]["peak_rss_mib"] for k in keys),
            )
    for impl, (wall, process, peak) in totals.items():
        speed = ""
        if "reference" in totals:
            speed = f"{totals['reference'][0] / wall:.1f}x"
        what = " + ".join(k.split("-", 1)[1] for k in END_TO_END[impl])
        rows.append(
            ("end to end", impl, f"{wall:.2f}", f"{process:.2f}", f"{n / wall / 1e6:.0f}", f"{peak:.0f}",
             speed, f"raw zarr -> labels zarr: {what}")
        )
    if ONE_PROCESS in stages:
        s = stages[ONE_PROCESS]
        speed = f"{totals['reference'][0] / s['wall_s']:.1f}x" if "reference" in totals else ""
        rows.append(
            ("end to end, one process", "nanoseg", f"{s['wall_s']:.2f}", f"{s['process_s']:.2f}",
             f"{n / s['wall_s'] / 1e6:.0f}", f"{s['peak_rss_mib']:.0f}", speed,
             "Pipeline(mixture, labeler).fit_transform, labels written with write_ome_zarr, in one fresh "
             "process; numba cache loads and first calls in the clock")
        )
    return rows


def nanoseg_end_to_end(stages):
    """nanoseg's end-to-end seconds: the one-process stage where it ran, else fit + labels."""
    if ONE_PROCESS in stages:
        return stages[ONE_PROCESS]["wall_s"]
    keys = END_TO_END["nanoseg"]
    return sum(stages[k]["wall_s"] for k in keys) if all(k in stages for k in keys) else None


HEADERS = ("stage", "implementation", "wall s", "process s", "Mvox/s", "peak RSS MiB", "speed-up", "what runs")


def agreement_lines(result):
    a = result["agreement"]
    if not a:
        return ["labels not compared (--skip-reference)"]
    if "error" in a:
        return [f"comparison failed: {a['error']}"]
    if "reason" in a:
        return [f"labels differ: {a['reason']}"]
    lines = [
        (f"labels identical (voxel for voxel): {'yes' if a['identical'] else 'no'}"
        f" ({a['voxels_differing']} voxels differ"
        + (f", {a['voxels_differing_off_faces']} of them off the volume's faces)"
           if "voxels_differing_off_faces" in a else ")")),
        (f"labels identical up to renumbering: {'yes' if a['same_partition'] else 'no'}"
        f" ({a['n_labels_ref']} particles in the reference, {a['n_labels_nanoseg']} in nanoseg;"
        f" foreground only in the reference: {a['foreground_only_ref']}, only in nanoseg:"
        f" {a['foreground_only_nanoseg']})"),
    ]
    if "posterior_comparison_error" in a:
        return lines + [f"posterior comparison failed: {a['posterior_comparison_error']}"]
    return lines + [
        (f"posterior: max |reference float16 - nanoseg float32| = {a['max_abs_diff_posterior']:.2e};"
        f" voxels on different sides of 0.95: {a['threshold_mask_voxels_differing']}"),
        f"PMFs: max |diff| p_np {a['max_abs_diff_p_np']:.1e}, p_bg {a['max_abs_diff_p_bg']:.1e}",
    ]


def detail_lines(result):
    """Sub-timings and facts reported by the stages."""
    stages = result["stages"]
    lines = []
    published = PUBLISHED.get(tuple(result["shape"]))
    if published and all(k in stages for k in REF_STAGES):
        ref = [stages[k]["wall_s"] for k in REF_STAGES]
        peak = max(stages[k]["peak_rss_mib"] for k in REF_STAGES) / 1024
        lines.append(
            f"the published implementation, as reported for this shape and chunking: fit {published['fit']} s,"
            f" posterior {published['posterior']} s, labels {published['labels']} s, peak"
            f" {published['peak_gib']} GiB; the reference here: {ref[0]:.1f} s, {ref[1]:.1f} s,"
            f" {ref[2]:.1f} s, {peak:.1f} GiB"
        )
    if "ns-fit" in stages:
        last = stages["ns-fit"]["last"]
        lines.append(
            f"nanoseg EM: {last['em_iterations']} updates, converged {last['converged']}"
            f" (ConvergenceWarning: {last['convergence_warning']})"
        )
    jit = [s["last"].get("jit_s") for k, s in stages.items() if k.startswith("ns-")]
    jit = [j for j in jit if j is not None]
    if jit:
        lines.append(
            f"nanoseg numba kernels: compiled before the clock in each nanoseg process,"
            f" {min(jit):.2f}-{max(jit):.2f} s (not in wall s; in process s)"
        )
    deferred = [s["last"].get("deferred_imports_s") for k, s in stages.items() if k.startswith("ns-")]
    deferred = [d for d in deferred if d is not None]
    if deferred:
        names = next(s["last"].get("deferred_imports") for k, s in stages.items() if k.startswith("ns-"))
        lines.append(
            f"imports deferred to first use ({', '.join(names) or 'none installed'}): imported before the clock"
            f" in every process, {min(deferred):.2f}-{max(deferred):.2f} s (not in wall s; in process s)"
        )
    if "ref-fit" in stages:
        lines.append(f"reference EM: {stages['ref-fit']['last']['em_iterations']} updates")
    if "ns-posterior-mask" in stages:
        last = stages["ns-posterior-mask"]["last"]
        lines.append(
            f"nanoseg posterior + mask: {last['transform_s']:.2f} s in predict (building the lazy graph;"
            f" the slice weights are computed with the lookup), {last['mask_voxels']} voxels >= 0.95"
        )
    if "ns-labels" in stages:
        last = stages["ns-labels"]["last"]
        lines.append(
            f"nanoseg labels: {last['transform_s']:.2f} s in transform (the analysis pass, slice weights included),"
            f" {last['store_s']:.2f} s computing and writing the lazy labels"
            f" (output blocks of {last['label_slab_depth']} slice(s), {last['labels_dtype']})"
        )
    for key, s in stages.items():
        if len(s["walls_s"]) > 1:
            lines.append(f"{key} runs: " + ", ".join(f"{w:.2f}" for w in s["walls_s"]) + " s")
    return lines


def format_text_table(rows):
    widths = [max(len(str(r[i])) for r in [HEADERS, *rows]) for i in range(len(HEADERS))]
    right = {2, 3, 4, 5, 6}

    def fmt(row):
        return "  ".join(
            str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))
        )

    return "\n".join([fmt(HEADERS), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)])


def format_markdown_table(rows):
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join(["---", "---", *["---:"] * 5, "---"]) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def targets(results):
    """Measured figures against the issue's targets, per size."""
    out = []
    for r in results:
        s, n = r["stages"], r["n_voxels"]
        tag = f"{r['size_gvox']:g} Gvox"
        ours = nanoseg_end_to_end(s)
        if all(k in s for k in END_TO_END["reference"]) and ours is not None:
            ref = sum(s[k]["wall_s"] for k in END_TO_END["reference"])
            what = "end to end speed-up" + (" (one process)" if ONE_PROCESS in s else "")
            out.append((tag, what, ">= 30x", f"{ref / ours:.1f}x", ref / ours >= 30))
        for key, what, goal in [
            ("ns-fit", "fit from zarr", 500),
            ("ns-posterior-mask", "lazy posterior + mask", 1000),
            ("ns-labels", "labels", 200),
        ]:
            if key in s:
                rate = n / s[key]["wall_s"] / 1e6
                out.append((tag, what, f">= {goal} Mvox/s", f"{rate:.0f} Mvox/s", rate >= goal))
        reads = [s[k]["wall_s"] for k in ("read-once", "read-once-files") if k in s]
        if "ns-fit" in s and reads:
            # Against the faster of the two ways of reading the input once.
            ratio = s["ns-fit"]["wall_s"] / min(reads)
            out.append((tag, "fit / one read of the input", "<= 1.5x", f"{ratio:.2f}x", ratio <= 1.5))
        ns_peak = max(s[k]["peak_rss_mib"] for k in NS_STAGES if k in s)
        ok = ns_peak <= 1024 if r["n_voxels"] >= 1e9 else None
        out.append((tag, "nanoseg peak RSS (any stage)", "<= 1024 MiB at 1 Gvox, flat", f"{ns_peak:.0f} MiB", ok))
    out += flatness(results)
    return out


def flatness(results):
    """Across sizes: nanoseg's end-to-end time per voxel and peak RSS, largest over smallest."""
    sized = [r for r in results if nanoseg_end_to_end(r["stages"]) is not None]
    if len(sized) < 2:
        return []
    tags = ", ".join(f"{r['size_gvox']:g}" for r in sized) + " Gvox"
    per_voxel = [nanoseg_end_to_end(r["stages"]) / r["n_voxels"] * 1e9 for r in sized]
    peaks = [max(r["stages"][k]["peak_rss_mib"] for k in NS_STAGES if k in r["stages"]) for r in sized]
    spread = max(per_voxel) / min(per_voxel) - 1
    # The target's "within +-25 %", read as every size within 25 % of the
    # sizes' median; the stricter largest-over-smallest spread beside it.
    middle = statistics.median(per_voxel)
    deviation = max(abs(v - middle) for v in per_voxel) / middle
    growth = max(peaks) / min(peaks) - 1
    return [
        (tags, "end-to-end s per Gvox, largest deviation from their median", "within +-25 %",
         " / ".join(f"{v:.1f}" for v in per_voxel) + f" s ({deviation * 100:.0f} %)", deviation <= 0.25),
        (tags, "end-to-end s per Gvox, largest over smallest", "-",
         f"{spread * 100:.0f} % more", None),
        (tags, "peak RSS, spread", "flat",
         " / ".join(f"{v:.0f}" for v in peaks) + f" MiB ({growth * 100:.0f} %)", None),
    ]


def report(results, info, command, markdown_path=None, notes=()):
    lines_text = [
        f"machine: {info['cpus']} CPUs, {info['platform']}, Python {info['python']}",
        "versions: " + ", ".join(f"{k} {info[k]}" for k in ("numpy", "scipy", "scikit-image", "zarr", "dask", "nanoseg"))
        + f" (source {info['source']})",
    ]
    if info.get("source_changed_during_run"):
        lines_text.append(
            "WARNING: the nanoseg sources changed while this ran; stages may have measured different versions"
        )
    print()
    print("\n".join(lines_text))
    md = [
        "# Benchmark results: reference implementation vs nanoseg",
        "",
        f"Measured on {info.get('date', datetime.date.today().isoformat())} with",
        "",
        "```",
        command,
        "```",
        "",
        *[f"- {line}" for line in lines_text],
        ("- every stage runs in its own process on the same zarr input; wall s is the median of the"
        " runs (the stage's own work, after imports), process s the median wall time of the whole"
        " process (interpreter start and imports included); peak RSS is the largest high-water mark"
        " of the runs; speed-up is the reference's wall s over nanoseg's for the same stage"),
        "",
    ]
    for r in results:
        rows = table_rows(r)
        title = (
            f"{r['size_gvox']:g} Gvox: {' x '.join(map(str, r['shape']))} uint8, chunks"
            f" {' x '.join(map(str, r['chunks']))}, NP voxel fraction {r['np_fraction'] * 100:.3f} %"
        )
        print(f"\n{title}\n")
        print(format_text_table(rows))
        extra = agreement_lines(r) + detail_lines(r)
        print("\n" + "\n".join(extra))
        md += [f"## {title}", "", format_markdown_table(rows), "", *[f"- {line}" for line in extra], ""]
    md += [
        "## Notes",
        "",
        ("- End to end is raw zarr to labels zarr on disk: fit + posterior + labels for the reference"
        " (its labelling reads the stored float16 posterior), fit + labels for nanoseg (its label"
        " stage reads the raw zarr and computes the posterior on the fly)."),
        ("- Both \"posterior\" rows store a float16 volume. The reference converts each slice's float64"
        " posterior on writing, which NumPy does tens of times slower for values below float16's"
        " normal range (most background voxels); nanoseg looks voxels up in float16 tables"
        " (posterior_dtype=\"float16\"), so it converts nothing. \"posterior + mask\" stores nothing."),
        *[f"- {note}" for note in notes],
        ("- Labels are compared slab by slab by a separate process; see benchmarks/README.md for"
        " the definitions of every figure."),
        "",
    ]
    goals = targets(results)
    if goals:
        print("\ntargets:")
        md += ["## Against the targets", "", "| size | figure | target | measured | met |", "|---|---|---|---|---|"]
        for tag, what, goal, got, ok in goals:
            verdict = "-" if ok is None else ("yes" if ok else "no")
            print(f"  {tag:<10} {what:<30} {goal:<28} {got:<14} {verdict}")
            md.append(f"| {tag} | {what} | {goal} | {got} | {verdict} |")
        md.append("")
    if markdown_path:
        Path(markdown_path).write_text("\n".join(md))
        print(f"\nwrote {markdown_path}")


def redact(argv):
    """The command-line arguments with machine-specific paths replaced by placeholders."""
    out, previous = [], None
    for arg in argv:
        if previous in ("--workdir", "--json"):
            arg = previous.lstrip("-").upper()
        elif arg.startswith(("--workdir=", "--json=")):
            arg = arg.split("=", 1)[0] + "=" + arg.split("=", 1)[0].lstrip("-").upper()
        elif os.path.isabs(arg):
            arg = Path(arg).name
        out.append(arg)
        previous = arg if arg.startswith("--") else None
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.004], help="volume sizes in Gvoxel")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"),
                        help="use this shape instead of the size's default (with a single size)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each nanoseg stage (median reported)")
    parser.add_argument("--repeat-reference", type=int, default=1, help="runs of each reference stage")
    parser.add_argument("--threads", type=int, default=2, help="dask threaded-scheduler workers")
    parser.add_argument("--workdir", help="directory for volumes and outputs (kept; phantoms are reused)")
    parser.add_argument("--markdown", help="also write the results as markdown to this file")
    parser.add_argument("--json", help="also write the raw records as JSON to this file")
    parser.add_argument("--skip-reference", action="store_true", help="time nanoseg only")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed")
    parser.add_argument("--report-only", metavar="JSON", nargs="+",
                        help="print (and with --markdown write) the report of runs saved with --json, "
                        "their sizes in one report; run nothing")
    parser.add_argument("--note", action="append", default=[],
                        help="a line for the report's notes (e.g. what else ran on the machine); repeatable")
    args = parser.parse_args(argv)
    if args.report_only:
        saved = [json.loads(Path(path).read_text()) for path in args.report_only]
        results = [r for run in saved for r in run["results"]]
        command = "\n".join(dict.fromkeys(run["command"] for run in saved))
        report(results, saved[0]["machine"], command, args.markdown, args.note)
        return
    if args.shape and len(args.sizes) != 1:
        parser.error("--shape goes with a single --sizes value")

    command = "python benchmarks/bench_pipeline.py " + " ".join(shlex.quote(a) for a in redact(argv or sys.argv[1:]))
    info = machine_info()
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="nanoseg-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    digest = source_digest()
    try:
        results = [bench_size(size, args, root) for size in args.sizes]
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    info["source_changed_during_run"] = source_digest() != digest
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "command": command, "results": results}, indent=1))
    if info["source_changed_during_run"]:
        print("WARNING: the nanoseg sources changed during the run", file=sys.stderr)
    report(results, info, command, args.markdown, args.note)


if __name__ == "__main__":
    main()
