"""Labelling and closing of particle slabs: nanoseg's kernels against cc3d and SciPy.

The labeler closes and labels each slab of the thresholded volume with its own
kernels: on voxel sets (compiled union-find labelling and set closing) when at
most ``SPARSE_MAX_FRACTION`` of the slab is foreground, with dense SciPy
morphology and ``scipy.ndimage.label`` otherwise. This script times both
paths on the same masks as ``scipy.ndimage.label``, ``cc3d.connected_components``
(package ``connected-components-3d``; with ``fastremap`` to renumber) and
``scipy.ndimage.binary_closing``, and checks that the results agree.

Masks: phantoms from ``nanoseg.datasets.make_phantom`` (default texture, noise,
drift, half the particles in clusters) cut at one grey level halfway between
the background (~118) and the particles (~222). That is what the labeler sees
when the posterior separates the two: ``posterior >= threshold`` is a
per-slice intensity cut, which keeps the particles with their partial-volume
edges and noise. The particle count is scaled to reach each foreground
fraction (the mixture is not fitted, so the fractions are those asked for).

Every method runs once untimed (numba kernels compiled or loaded, outputs kept
for the checks), then ``--repeat`` rounds with the methods interleaved; the
median is reported. Everything runs on one thread.

Labelling uses the labeler's default connectivity (cc3d's 6/18/26 for 1/2/3).
Both nanoseg paths give the labeler's slab output: the sorted flat indices of
the foreground and their labels 1..n, numbered in raster order of each
component's first voxel (the dense path is ``scipy.ndimage.label`` followed by
that conversion). ``scipy.ndimage.label`` and cc3d are timed as called (a
dense label array), and cc3d also to the same slab output, once as it numbers
and once with ``fastremap.renumber`` of the voxel labels, which numbers them
in raster order whatever cc3d gave. Partitions are compared
label-agnostically (same voxels, one-to-one correspondence of the labels),
numbering voxel for voxel.

Closing uses the labeler's default radius (a ball). nanoseg's closing treats
outside the volume as background for the dilation and as foreground for the
erosion, so it never removes foreground at the faces; ``binary_closing`` has one
``border_value`` for both steps, and with 0 it erodes voxels within the
radius of the faces. skimage's ``binary_closing(mode="ignore")`` has nanoseg's
semantics: it is checked once per mask, and timed with ``--skimage``.

Usage, from the repository root with nanoseg installed (cc3d optional)::

    pip install connected-components-3d fastremap
    python benchmarks/bench_components.py            # about 2 minutes on 2 idle cores
    python benchmarks/bench_components.py --quick    # about 30 s

Making the masks takes about a third of the time (not timed); ``--cache DIR``
keeps them for the next run.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from datetime import date
from pathlib import Path

import numpy as np
import scipy
from scipy import ndimage as ndi

# ---------------------------------------------------------------------------
# Adapter: the only place that knows where nanoseg keeps its kernels. Each
# layout names every kernel as "module:attribute"; the first layout whose
# required names all import is used, so kernels of two layouts never mix.
# When the modules move again, add the new layout in front.
# ---------------------------------------------------------------------------

LAYOUTS = {
    "_ops/_engine": {
        "cpu_backend": "nanoseg._backend:CPU",
        "footprint": "nanoseg._ops.morphology:footprint",
        "close_mask": "nanoseg._ops.morphology:close_mask",
        "label_mask": "nanoseg._ops.components:label_mask",
        "sparse_close": "nanoseg._ops.morphology:close_set",
        "sparse_label": "nanoseg._ops.components:label_set",
        "sparse_max_fraction": "nanoseg._engine.labeling:SPARSE_MAX_FRACTION",
        "jit_available": "nanoseg._ops._numba:available",
        "jit_warm_up": "nanoseg._ops._numba:warm_up",
    },
    "_kernels/_sparse/_jit": {
        "cpu_backend": "nanoseg._backend:CPU",
        "footprint": "nanoseg._kernels:footprint",
        "close_mask": "nanoseg._kernels:close_mask",
        "label_mask": "nanoseg._kernels:label_mask",
        "sparse_close": "nanoseg._sparse:close",
        "sparse_label": "nanoseg._sparse:label",
        "sparse_max_fraction": "nanoseg._labeling:SPARSE_MAX_FRACTION",
        "jit_available": "nanoseg._jit:available",
        "jit_warm_up": "nanoseg._jit:warm_up",
    },
}
#: Names a layout may lack (the NumPy fallbacks are then timed, or nothing is warmed up).
OPTIONAL = {"jit_available", "jit_warm_up"}
#: Public names, outside the layouts.
PUBLIC = {"make_phantom": "nanoseg.datasets:make_phantom", "labeler": "nanoseg:NanoparticleLabeler"}


def load(spec):
    """The object named "module:attribute"."""
    module, _, attribute = spec.partition(":")
    found = importlib.import_module(module)
    for part in attribute.split("."):
        found = getattr(found, part)
    return found


def nanoseg_kernels():
    """(layout name, {name: object}) of the first layout that imports."""
    errors = []
    for layout, names in LAYOUTS.items():
        found = {}
        try:
            for name, spec in names.items():
                try:
                    found[name] = load(spec)
                except (ImportError, AttributeError):
                    if name not in OPTIONAL:
                        raise
                    found[name] = None
        except (ImportError, AttributeError) as exc:
            errors.append(f"{layout}: {exc}")
            continue
        return layout, found
    raise ImportError("nanoseg's kernels not found (" + "; ".join(errors) + "); add their layout to LAYOUTS")


class Nanoseg:
    """nanoseg's two per-slab paths, as the labeler calls them (``local_labels``)."""

    def __init__(self):
        self.layout, kernels = nanoseg_kernels()
        self.cpu = kernels["cpu_backend"]
        self._footprint = kernels["footprint"]
        self._close_mask = kernels["close_mask"]
        self._label_mask = kernels["label_mask"]
        self._sparse_close = kernels["sparse_close"]
        self._sparse_label = kernels["sparse_label"]
        self._warm_up = kernels["jit_warm_up"]
        self.sparse_max_fraction = float(kernels["sparse_max_fraction"])
        self.jit = bool(kernels["jit_available"]()) if kernels["jit_available"] else False
        # The labeler's defaults, which are what it labels and closes with.
        defaults = load(PUBLIC["labeler"])().get_params()
        self.connectivity = int(defaults["connectivity"])
        self.radius = int(defaults["radius"])

    def warm_up(self):
        """Compile (or load from numba's cache) the compiled kernels; seconds taken."""
        start = time.perf_counter()
        if self._warm_up is not None:
            self._warm_up()
        return time.perf_counter() - start

    def path(self, mask):
        """The path the labeler takes for this slab: "sparse" or "dense"."""
        return "sparse" if np.count_nonzero(mask) <= self.sparse_max_fraction * mask.size else "dense"

    def footprint(self, radius, ndim):
        return self._footprint(radius, ndim)

    # Labelling: mask -> (sorted flat indices, labels 1..n in raster order, n).
    def label_sparse(self, mask, connectivity):
        flat = np.flatnonzero(mask)
        ids, n = self._sparse_label(flat, mask.shape, connectivity)
        return flat, ids, int(n)

    def label_dense(self, mask, connectivity):
        labels, n = self._label_mask(self.cpu, mask, connectivity)
        return to_voxels(labels, n)

    # Closing: mask -> closed mask (sorted flat indices for the sparse path).
    def close_sparse(self, mask, radius):
        # The mask is copied for the compiled kernel's scratch (the labeler
        # skips the copy for masks it assembled itself).
        return self._sparse_close(np.flatnonzero(mask), mask.shape, self.footprint(radius, mask.ndim), mask=mask)

    def close_dense(self, mask, radius):
        return self._close_mask(self.cpu, mask, radius)


try:
    import cc3d
except ImportError:
    cc3d = None
try:
    import fastremap
except ImportError:
    fastremap = None


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def to_voxels(labels, n=None):
    """A dense label array as nanoseg's slab output: (flat, int32 ids, n)."""
    flat = np.flatnonzero(labels)
    ids = labels.reshape(-1)[flat].astype(np.int32, copy=False)
    return flat, ids, int(labels.max()) if n is None else int(n)


def cc3d_connectivity(connectivity, ndim):
    """skimage/scipy connectivity (orthogonal steps) as cc3d's neighbour count."""
    return {3: {1: 6, 2: 18, 3: 26}, 2: {1: 4, 2: 8}}[ndim][connectivity]


def same_partition(a, b):
    """Whether two (flat, ids, n) labellings split the same voxels into the same
    components, whatever their numbers: same voxels, and the pairs of labels
    that share a voxel form a one-to-one map."""
    (flat_a, ids_a, n_a), (flat_b, ids_b, n_b) = a, b
    if n_a != n_b or not np.array_equal(flat_a, flat_b):
        return False
    pairs = np.unique(ids_a.astype(np.int64) * (n_b + 1) + ids_b)
    return pairs.size == np.unique(ids_a).size == np.unique(ids_b).size == n_a


def same_numbering(a, b):
    return a[2] == b[2] and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def face_shell(shape, radius):
    """Voxels within `radius` of a face of an array of `shape`."""
    shell = np.zeros(shape, dtype=bool)
    for axis, n in enumerate(shape):
        index = [slice(None)] * len(shape)
        index[axis] = np.r_[0 : min(radius, n), max(n - radius, 0) : n]
        shell[tuple(index)] = True
    return shell


def measure(methods, repeat):
    """Run each method once untimed (its output is returned), then `repeat`
    rounds with the methods interleaved. Returns (outputs, times)."""
    outputs = {name: call() for name, call in methods.items()}
    times = {name: [] for name in methods}
    for _ in range(repeat):
        for name, call in methods.items():
            gc.collect()
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return outputs, times


def git_revision():
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+uncommitted-changes-in-src" if dirty else "")


def version(module_name):
    try:
        from importlib.metadata import version as dist_version

        return dist_version(module_name)
    except Exception:
        return "-"


# ---------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------


def phantom_mask(shape, n_particles, args):
    """A thresholded phantom (bool), and the number of particles placed."""
    make_phantom = load(PUBLIC["make_phantom"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "only k of n particles could be placed"
        image, truth, labels = make_phantom(
            shape, n_particles=n_particles, radius=tuple(args.particle_radius),
            random_state=args.seed, return_labels=True,
        )
    mask = truth if args.mask == "truth" else image >= args.cut
    return np.ascontiguousarray(mask), int(labels.max())


def voxels_per_particle(args):
    """Mask voxels per placed particle, from a small phantom of the same kind."""
    mask, placed = phantom_mask((16, 256, 256), 100, args)
    return mask.sum() / max(placed, 1)


def cached_mask(shape, fraction, per_particle, args):
    size = int(np.prod(shape))
    n_particles = max(1, round(fraction * size / per_particle))
    path = None
    if args.cache:
        r0, r1 = args.particle_radius
        name = "x".join(map(str, shape)) + f"_n{n_particles}_r{r0:g}-{r1:g}_s{args.seed}_{args.mask}{args.cut}.npz"
        path = Path(args.cache) / name
        if path.exists():
            with np.load(path) as stored:
                mask = np.unpackbits(stored["bits"], count=size).astype(bool).reshape(shape)
                return mask, n_particles, int(stored["placed"])
    mask, placed = phantom_mask(shape, n_particles, args)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, bits=np.packbits(mask.reshape(-1)), placed=placed)
    return mask, n_particles, placed


# ---------------------------------------------------------------------------
# The two comparisons
# ---------------------------------------------------------------------------


FLATNONZERO = "np.flatnonzero(mask)"


def labelling_methods(ns, mask, connectivity):
    structure = ndi.generate_binary_structure(mask.ndim, connectivity)
    methods = {
        "nanoseg sparse": ("voxel list", lambda: ns.label_sparse(mask, connectivity)),
        "nanoseg dense": ("voxel list", lambda: ns.label_dense(mask, connectivity)),
        "scipy.ndimage.label": ("int32 array", lambda: ndi.label(mask, structure=structure)),
    }
    if cc3d is not None:
        neighbours = cc3d_connectivity(connectivity, mask.ndim)

        def cc3d_labels():
            return cc3d.connected_components(mask, connectivity=neighbours, return_N=True)

        def cc3d_voxels():
            labels, n = cc3d_labels()
            # The mask's foreground is the labels': finding it in the bool mask is cheaper.
            flat = np.flatnonzero(mask)
            return flat, labels.reshape(-1)[flat].astype(np.int32), int(n)

        methods["cc3d"] = ("array", cc3d_labels)
        methods["cc3d, voxel list"] = ("voxel list", cc3d_voxels)
        if fastremap is not None:

            def cc3d_renumbered():
                labels, n = cc3d_labels()
                flat = np.flatnonzero(mask)
                # First appearance in flat (raster) order numbers 1, 2, ...
                ids, _ = fastremap.renumber(labels.reshape(-1)[flat], in_place=True)
                return flat, ids.astype(np.int32, copy=False), int(n)

            methods["cc3d + renumber, voxel list"] = ("voxel list", cc3d_renumbered)
    # Not a labelling: what finding the foreground alone costs, for reference.
    methods[FLATNONZERO] = ("-", lambda: np.flatnonzero(mask))
    return methods


def closing_methods(ns, mask, radius, with_skimage):
    structure = ns.footprint(radius, mask.ndim)
    methods = {
        "nanoseg sparse": ("voxel list", lambda: ns.close_sparse(mask, radius)),
        "nanoseg dense": ("bool array", lambda: ns.close_dense(mask, radius)),
        "scipy binary_closing(border_value=0)": (
            "bool array", lambda: ndi.binary_closing(mask, structure=structure, border_value=0)
        ),
    }
    try:
        from skimage.morphology import binary_closing
    except ImportError:
        binary_closing = None
    if binary_closing is not None and with_skimage:

        def skimage_closing():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                return binary_closing(mask, structure, mode="ignore")

        methods["skimage binary_closing(mode='ignore')"] = ("bool array", skimage_closing)
    return methods


def skimage_identical(mask, structure, closed):
    """Whether skimage's binary_closing(mode="ignore") gives `closed` (None without skimage)."""
    try:
        from skimage.morphology import binary_closing
    except ImportError:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return bool(np.array_equal(binary_closing(mask, structure, mode="ignore"), closed))


def run_case(ns, shape, fraction, per_particle, args):
    start = time.perf_counter()
    mask, n_particles, placed = cached_mask(shape, fraction, per_particle, args)
    made = time.perf_counter() - start
    voxels = mask.size
    path = ns.path(mask)
    case = {
        "shape": shape, "target": fraction, "fraction": mask.mean(), "particles": n_particles,
        "placed": placed, "path": path, "voxels": voxels, "label": [], "close": [], "made": made,
    }

    # Labelling.
    methods = labelling_methods(ns, mask, args.connectivity)
    outputs, times = measure({name: call for name, (_, call) in methods.items()}, args.repeat)
    reference = to_voxels(*outputs["scipy.ndimage.label"])
    case["components"] = reference[2]
    chosen = statistics.median(times[f"nanoseg {path}"])
    case["flatnonzero"] = statistics.median(times.pop(FLATNONZERO))
    del methods[FLATNONZERO]
    for name, (kind, _) in methods.items():
        out = outputs[name]
        if not (isinstance(out, tuple) and len(out) == 3):  # a dense (labels, n) pair
            kind = f"{out[0].dtype} array"
            out = to_voxels(*out)
        median = statistics.median(times[name])
        case["label"].append(
            {
                "method": name + (" *" if name == f"nanoseg {path}" else ""), "output": kind,
                "median": median, "min": min(times[name]), "times": times[name], "mvox": voxels / median / 1e6, "ratio": chosen / median,
                "partition": same_partition(out, reference), "numbering": same_numbering(out, reference),
            }
        )
    del outputs

    # Closing.
    methods = closing_methods(ns, mask, args.radius, args.skimage)
    outputs, times = measure({name: call for name, (_, call) in methods.items()}, args.repeat)
    dense = outputs["nanoseg dense"]
    case["skimage_identical"] = skimage_identical(mask, ns.footprint(args.radius, mask.ndim), dense)
    shell = face_shell(shape, args.radius)
    case["closed_fraction"] = dense.mean()
    case["adds_only"] = bool(np.all(dense[mask]))
    chosen = statistics.median(times[f"nanoseg {path}"])
    for name, (kind, _) in methods.items():
        out = outputs[name]
        if out.ndim == 1:  # voxel list
            agree = "identical" if np.array_equal(out, np.flatnonzero(dense)) else "DIFFERENT"
        else:
            differ = out != dense
            n_differ = int(differ.sum())
            if n_differ == 0:
                agree = "identical"
            else:
                off_faces = int((differ & ~shell).sum())
                removed = int((mask & ~out).sum())
                agree = (
                    f"{n_differ} voxels differ, {off_faces} off the faces; "
                    f"{removed} mask voxels removed"
                )
        median = statistics.median(times[name])
        case["close"].append(
            {
                "method": name + (" *" if name == f"nanoseg {path}" else ""), "output": kind,
                "median": median, "min": min(times[name]), "times": times[name], "mvox": voxels / median / 1e6, "ratio": chosen / median,
                "agree": agree,
            }
        )
    return case


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def slab_name(shape):
    return " x ".join(map(str, shape))


def print_report(cases, ns, args, numba_s, elapsed):
    yes = {True: "yes", False: "NO"}
    print()
    print(f"Labelling (connectivity={args.connectivity}: "
          f"{cc3d_connectivity(args.connectivity, 3)}-neighbourhood); median of {args.repeat} runs")
    print()
    print("| slab | fg % | components | method | output | median ms | min ms | Mvoxel/s | vs nanoseg * | same partition | same numbering |")
    print("|---|---:|---:|---|---|---:|---:|---:|---:|---|---|")
    for case in cases:
        for row in case["label"]:
            print(
                f"| {slab_name(case['shape'])} | {100 * case['fraction']:.2f} | {case['components']} | {row['method']} "
                f"| {row['output']} | {1e3 * row['median']:.1f} | {1e3 * row['min']:.1f} | {row['mvox']:.0f} "
                f"| {row['ratio']:.2f}x | {yes[row['partition']]} | {yes[row['numbering']]} |"
            )
    print()
    print(f"Closing (ball of radius {args.radius}); median of {args.repeat} runs")
    print()
    print("| slab | fg % | closed % | method | output | median ms | min ms | Mvoxel/s | vs nanoseg * | result vs nanoseg dense |")
    print("|---|---:|---:|---|---|---:|---:|---:|---:|---|")
    for case in cases:
        for row in case["close"]:
            print(
                f"| {slab_name(case['shape'])} | {100 * case['fraction']:.2f} | {100 * case['closed_fraction']:.2f} "
                f"| {row['method']} | {row['output']} | {1e3 * row['median']:.1f} | {1e3 * row['min']:.1f} | {row['mvox']:.0f} "
                f"| {row['ratio']:.2f}x | {row['agree']} |"
            )
    print()
    print("Fastest per case (median ms)")
    print()
    print("| slab | fg % | nanoseg path | labelling: fastest | nanoseg * | labelling to voxel list: fastest | closing: fastest | nanoseg * |")
    print("|---|---:|---|---|---:|---|---|---:|")
    for case in cases:
        label = min(case["label"], key=lambda r: r["median"])
        listed = min((r for r in case["label"] if r["output"] == "voxel list"), key=lambda r: r["median"])
        close = min(case["close"], key=lambda r: r["median"])
        mine_l = next(r for r in case["label"] if r["method"].endswith("*"))
        mine_c = next(r for r in case["close"] if r["method"].endswith("*"))
        print(
            f"| {slab_name(case['shape'])} | {100 * case['fraction']:.2f} | {case['path']} "
            f"| {label['method']} {1e3 * label['median']:.1f} | {1e3 * mine_l['median']:.1f} "
            f"| {listed['method']} {1e3 * listed['median']:.1f} "
            f"| {close['method']} {1e3 * close['median']:.1f} | {1e3 * mine_c['median']:.1f} |"
        )
    print()
    print("Notes")
    print()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"- date {date.today().isoformat()}, nanoseg source {git_revision()}; command: "
          f"python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:])}".rstrip())
    print(f"- machine: {os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}; "
          f"1-minute load average {args.load_start:.2f} at the start, {load:.2f} at the end; total {elapsed:.0f} s")
    print(f"- versions: numpy {np.__version__}, scipy {scipy.__version__}, scikit-image {version('scikit-image')}, "
          f"numba {version('numba')}, connected-components-3d {version('connected-components-3d') if cc3d else 'not installed'}, "
          f"fastremap {version('fastremap') if fastremap else 'not installed'}")
    print(f"- masks: make_phantom(shape, n_particles, radius={tuple(args.particle_radius)}, random_state={args.seed}) "
          + (f"image >= {args.cut}" if args.mask == "cut" else "ground-truth mask")
          + "; particles asked for / placed: "
          + ", ".join(f"{slab_name(c['shape'])} {100 * c['target']:g} %: {c['particles']}/{c['placed']}" for c in cases))
    print(f"- * marks the path the labeler takes for the slab (sparse up to {100 * ns.sparse_max_fraction:g} % "
          f"foreground); 'vs nanoseg *' is its median time over the row's (above 1: the row is faster)")
    print(f"- nanoseg kernels from the {ns.layout} layout; numba kernels {'on' if ns.jit else 'OFF (NumPy fallbacks timed)'}; compiled or loaded before timing "
          f"in {numba_s:.2f} s (not in the timings). Every method runs on one thread.")
    print("- 'voxel list': sorted flat indices of the foreground and int32 labels, nanoseg's slab output; "
          "'same partition' compares with scipy.ndimage.label label-agnostically, 'same numbering' voxel for voxel "
          "(raster order of each component's first voxel)")
    print("- np.flatnonzero of the mask alone (included in nanoseg sparse and in the cc3d voxel lists; the labeler "
          "computes it once per slab to choose the path), median ms: "
          + ", ".join(f"{slab_name(c['shape'])} {100 * c['fraction']:.2f} %: {1e3 * c['flatnonzero']:.1f}" for c in cases))
    print("- nanoseg sparse closing includes np.flatnonzero of the mask and a uint8 copy of it (its kernel's scratch)")
    if cc3d is None:
        print("- cc3d columns skipped: connected-components-3d is not installed (pip install connected-components-3d fastremap)")
    elif fastremap is None:
        print("- cc3d + renumber skipped: fastremap is not installed")
    checked = [c["skimage_identical"] for c in cases]
    if None not in checked:
        print(f"- skimage.morphology.binary_closing(mode='ignore'), run once per case"
              f"{'' if args.skimage else ' (untimed; --skimage times it)'}: "
              f"{'identical to nanoseg dense in every case' if all(checked) else 'DIFFERENT from nanoseg dense in some case'}")
    print(f"- making the masks (make_phantom and the cut; not timed): "
          + ", ".join(f"{slab_name(c['shape'])} {100 * c['target']:g} %: {c['made']:.1f} s" for c in cases))
    print(f"- closing: nanoseg closes with {'all of its mask kept' if all(c['adds_only'] for c in cases) else 'SOME MASK VOXELS REMOVED'} "
          f"(outside = background for the dilation, foreground for the erosion); 'off the faces' counts voxels "
          f"more than {args.radius} voxel(s) from every face")


def parse_shape(text):
    shape = tuple(int(v) for v in text.lower().replace(",", "x").split("x"))
    if len(shape) != 3:
        raise argparse.ArgumentTypeError(f"expected Z x Y x X, got {text!r}")
    return shape


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=[(16, 1024, 1024), (64, 512, 512)],
                        help="slab shapes ZxYxX (default 16x1024x1024 64x512x512)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.005, 0.02, 0.10],
                        help="foreground fractions to aim for (default 0.005 0.02 0.1)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each method (default 5)")
    parser.add_argument("--quick", action="store_true", help="one 16x512x512 slab (about 30 s)")
    parser.add_argument("--connectivity", type=int, default=None, help="default: the labeler's")
    parser.add_argument("--radius", type=int, default=None, help="closing radius; default: the labeler's")
    parser.add_argument("--particle-radius", type=float, nargs=2, default=[3.0, 8.0], metavar=("MIN", "MAX"),
                        help="make_phantom's radius range (default 3 8: the default 1.5 3.5 needs too many "
                             "particles to place quickly at 10 %%)")
    parser.add_argument("--mask", choices=["cut", "truth"], default="cut",
                        help="'cut': image >= --cut (default); 'truth': the phantom's ground-truth mask")
    parser.add_argument("--cut", type=int, default=170, help="grey level of the cut (default 170)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skimage", action="store_true",
                        help="also time skimage's binary_closing(mode='ignore') (always checked once)")
    parser.add_argument("--cache", metavar="DIR", help="keep the masks there and reuse them in later runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes = [(16, 512, 512)]

    started = time.perf_counter()
    args.load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    ns = Nanoseg()
    args.connectivity = ns.connectivity if args.connectivity is None else args.connectivity
    args.radius = ns.radius if args.radius is None else args.radius
    numba_s = ns.warm_up()
    per_particle = voxels_per_particle(args)
    if cc3d is None:
        print("connected-components-3d is not installed: its columns are skipped", file=sys.stderr)
    cases = []
    for shape in args.shapes:
        for fraction in args.fractions:
            print(f"{slab_name(shape)}, {100 * fraction:g} % ...", file=sys.stderr, flush=True)
            cases.append(run_case(ns, shape, fraction, per_particle, args))
    print_report(cases, ns, args, numba_s, time.perf_counter() - started)


if __name__ == "__main__":
    main()
