"""Codecs for the OME-Zarr stores nanoseg writes: time, size and empty chunks.

:func:`nanoseg.io.write_ome_zarr` writes label volumes (uint32, mostly zeros)
and images (uint8) as zarr 3 arrays chunked in whole planes (1 x 1024 x 1024)
or like their input. This script writes the same data the same way -- one
group, dataset ``"0"``, the same chunks, ``fill_value=0``, slabs of about
256 MiB -- with several codecs and reports, for each:

* write s: creating the store and writing every slab (median of ``--repeat``
  runs, the codecs interleaved); the data lands in the page cache, as a
  pipeline's output does (no ``fsync``);
* read s: reading the whole array back with ``zarr.open_array(...)[...]``
  (median of the same runs);
* KiB on disk (the chunk files; the metadata, 1-2 KiB, is left out) and
  its ratio to zarr's default codec;
* chunk files written against the non-empty chunks of the data;
* whether the data read back is identical;
* encode s / decode s: the compression step alone (numcodecs' zstd or
  blosc on every chunk, one thread, no zarr and no files), to tell the
  codec's own cost from the rest of a write.

The row ``write_ome_zarr`` times the package's own function on the same data
(with whatever codec it uses), so that the table also shows what nanoseg
writes today.

Data: :func:`nanoseg.datasets.make_phantom` with ``return_labels=True``, the
particle count chosen for about 0.1 % and 1 % particle voxels; the labels are
renumbered 1..K in raster order of each particle's first voxel (as the
labeler numbers them) and stored as uint32. The image is the uint8 phantom of
the 0.1 % case. A last check writes the 0.1 % labels with the second half of
the planes cleared and counts the chunk files, to see whether all-zero chunks
are skipped with zarr's default configuration, with
``config={"write_empty_chunks": False}``, with ``True``, and by
``write_ome_zarr``.

Usage, from the repository root with nanoseg installed::

    python benchmarks/bench_codec.py            # 32 x 1024 x 1024, about a minute on 2 cores
    python benchmarks/bench_codec.py --quick    # 8 x 512 x 512, a few seconds
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from nanoseg.datasets import make_phantom
from nanoseg.io import DEFAULT_CHUNKS, WRITE_BYTES, write_ome_zarr

#: Mean particle voxels per particle of make_phantom's default radius range
#: (1.5-3.5 pixels at 50 x 10 x 10 nm), as in make_volume.py.
VOXELS_PER_PARTICLE = 16.0
SPACING = (50.0, 10.0, 10.0)
DEFAULT = "zarr default"
PACKAGE = "write_ome_zarr"


def candidates():
    """{name: keyword arguments of ``create_array``} of the codecs compared."""
    return {
        DEFAULT: {},
        "zstd 1": {"compressors": ZstdCodec(level=1)},
        "zstd 3": {"compressors": ZstdCodec(level=3)},
        "blosc lz4 bitshuffle": {"compressors": BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")},
        "blosc zstd 1 bitshuffle": {"compressors": BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle")},
        "none": {"compressors": None},
    }


def numcodecs_equivalents():
    """{name: numcodecs codec or None} doing the compression step of each candidate."""
    return {
        DEFAULT: numcodecs.Zstd(level=0),
        "zstd 1": numcodecs.Zstd(level=1),
        "zstd 3": numcodecs.Zstd(level=3),
        "blosc lz4 bitshuffle": numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE),
        "blosc zstd 1 bitshuffle": numcodecs.Blosc(cname="zstd", clevel=1, shuffle=numcodecs.Blosc.BITSHUFFLE),
        "none": None,
    }


def codec_alone(data, chunks, repeat):
    """{name: (encode s, decode s)}: every chunk through the compressor alone, one thread.

    Medians of `repeat` rounds (codecs interleaved); no zarr, no files.
    """
    blocks = [
        np.ascontiguousarray(data[z:z + chunks[0], y:y + chunks[1], x:x + chunks[2]])
        for z in range(0, data.shape[0], chunks[0])
        for y in range(0, data.shape[1], chunks[1])
        for x in range(0, data.shape[2], chunks[2])
    ]
    codecs = numcodecs_equivalents()
    times = {name: ([], []) for name in codecs}
    previous = numcodecs.blosc.use_threads
    numcodecs.blosc.use_threads = False
    try:
        for _ in range(repeat):
            for name, codec in codecs.items():
                if codec is None:
                    times[name][0].append(0.0)
                    times[name][1].append(0.0)
                    continue
                t0 = time.perf_counter()
                encoded = [codec.encode(block) for block in blocks]
                t1 = time.perf_counter()
                for item in encoded:
                    codec.decode(item)
                times[name][0].append(t1 - t0)
                times[name][1].append(time.perf_counter() - t1)
    finally:
        numcodecs.blosc.use_threads = previous
    return {name: (statistics.median(e), statistics.median(d)) for name, (e, d) in times.items()}


def describe_codecs(array):
    """The codec chain of a zarr 3 array, e.g. ``bytes + zstd(level=0)``."""
    parts = []
    for codec in array.metadata.codecs:
        config = codec.to_dict().get("configuration", {}) or {}
        name = codec.to_dict()["name"]
        keep = {k: v for k, v in config.items() if k not in ("endian", "typesize", "checksum", "blocksize")}
        parts.append(name + (f"({', '.join(f'{k}={v}' for k, v in keep.items())})" if keep else ""))
    return " + ".join(parts)


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------


def raster_relabel(labels):
    """Labels renumbered 1..K in raster order of each label's first voxel, as uint32."""
    flat = labels.ravel()
    where = np.flatnonzero(flat)
    values = flat[where]
    ids, first = np.unique(values, return_index=True)
    lut = np.zeros(int(ids.max()) + 1 if ids.size else 1, dtype=np.uint32)
    lut[ids[np.argsort(first)]] = np.arange(1, ids.size + 1, dtype=np.uint32)
    out = np.zeros(flat.shape, dtype=np.uint32)
    out[where] = lut[values]
    return out.reshape(labels.shape)


def make_data(shape, fractions, seed):
    """{name: array} of the label volumes (one per fraction) and the image."""
    data = {}
    n_voxels = int(np.prod(shape))
    for index, fraction in enumerate(fractions):
        n_particles = max(1, round(fraction * n_voxels / VOXELS_PER_PARTICLE))
        t0 = time.perf_counter()
        image, mask, labels = make_phantom(
            shape, n_particles=n_particles, random_state=seed + index, return_labels=True
        )
        print(f"phantom {fraction:g}: {n_particles} particles, {time.perf_counter() - t0:.1f} s",
              file=sys.stderr, flush=True)
        data[f"labels {100 * mask.mean():.2f} %"] = raster_relabel(labels)
        if index == 0:
            first_image = image
        del image, mask, labels
    data["image (uint8)"] = first_image
    return data


# ---------------------------------------------------------------------------
# writing and measuring
# ---------------------------------------------------------------------------


def write_like_package(path, data, chunks, codec_kwargs, config=None):
    """Write `data` as write_ome_zarr lays it out, with the codec keywords given."""
    root = zarr.open_group(store=str(path), mode="w-", zarr_format=3)
    extra = {} if config is None else {"config": config}
    target = root.create_array(
        "0", shape=data.shape, dtype=data.dtype, chunks=chunks, fill_value=0,
        dimension_names=("z", "y", "x")[-data.ndim:], **codec_kwargs, **extra,
    )
    plane_bytes = int(np.prod(data.shape[1:])) * data.dtype.itemsize
    depth = max(1, WRITE_BYTES // max(1, plane_bytes))
    # Slabs as write_ome_zarr cuts an in-memory array: whole chunks, at most ~256 MiB.
    depth = max(chunks[0], depth - depth % chunks[0])
    for start in range(0, data.shape[0], depth):
        target[start:start + depth] = data[start:start + depth]
    return target


def write(path, data, chunks, name, codecs):
    if name == PACKAGE:
        kind = "labels" if data.dtype.kind in "ui" and data.dtype.itemsize > 1 else "image"
        write_ome_zarr(path, data, spacing=SPACING, kind=kind, chunks=chunks, progress=False)
    else:
        write_like_package(path, data, chunks, codecs[name])


def chunk_bytes(path):
    """Bytes of the chunk files of dataset "0" (metadata, 1-2 KiB, left out)."""
    folder = Path(path) / "0" / "c"
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0


def chunk_files(path):
    folder = Path(path) / "0" / "c"
    return sum(1 for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0


def non_empty_chunks(data, chunks):
    """Chunks of `data` holding a non-zero value."""
    count = 0
    grid = [range(0, s, c) for s, c in zip(data.shape, chunks)]
    for z in grid[0]:
        for y in grid[1]:
            for x in grid[2]:
                if data[z:z + chunks[0], y:y + chunks[1], x:x + chunks[2]].any():
                    count += 1
    return count


def measure(data, chunks, names, codecs, repeat, workdir):
    """{codec name: record} for one array, the codecs interleaved in every round."""
    records = {name: {"write": [], "read": [], "identical": True} for name in names}
    for round_ in range(repeat):
        for name in names:
            path = Path(workdir) / f"{name.replace(' ', '_')}-{round_}.zarr"
            t0 = time.perf_counter()
            write(path, data, chunks, name, codecs)
            records[name]["write"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            array = zarr.open_array(store=str(path / "0"), mode="r")
            back = array[...]
            records[name]["read"].append(time.perf_counter() - t0)
            records[name]["identical"] &= bool(np.array_equal(back, data)) and back.dtype == data.dtype
            if round_ == 0:
                records[name].update(bytes=chunk_bytes(path), files=chunk_files(path),
                                     codecs=describe_codecs(array))
            del back, array
            shutil.rmtree(path)
    return records


def empty_chunk_check(data, chunks, workdir):
    """Chunk files written for `data` under several write_empty_chunks settings."""
    cases = {
        "create_array, no config (installed default)": None,
        'config={"write_empty_chunks": False}': {"write_empty_chunks": False},
        'config={"write_empty_chunks": True}': {"write_empty_chunks": True},
        PACKAGE: PACKAGE,
    }
    rows = []
    for label, config in cases.items():
        path = Path(workdir) / "empty.zarr"
        if config == PACKAGE:
            write_ome_zarr(path, data, spacing=SPACING, kind="labels", chunks=chunks, progress=False)
        else:
            write_like_package(path, data, chunks, {}, config=config)
        back = zarr.open_array(store=str(path / "0"), mode="r")[...]
        rows.append((label, chunk_files(path), bool(np.array_equal(back, data))))
        shutil.rmtree(path)
    return rows


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def git_head():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def print_report(results, empty_rows, empty_info, args, elapsed, load):
    shape = "x".join(map(str, args.shape))
    print(f"# Codecs of written stores ({date.today().isoformat()})\n")
    print(f"- machine: {os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}; "
          f"1-minute load average {load[0]:.1f} at start, {load[1]:.1f} at end")
    print(f"- commit {git_head()}; zarr {zarr.__version__}, numcodecs {numcodecs.__version__}, "
          f"numpy {np.__version__}")
    print(f"- shape {shape}, chunks {'x'.join(map(str, args.chunks))}, {args.repeat} rounds "
          f"(codecs interleaved), medians; {elapsed:.0f} s in all")
    print(f"- zarr's `array.write_empty_chunks` default: {zarr.config.get('array.write_empty_chunks')}")
    for dataset, records in results.items():
        print(f"- {dataset}: zarr default codec {records[DEFAULT]['codecs']}")
    print()
    print("| data | codec | write s | read s | write + read s | KiB on disk | size / default "
          "| chunk files / non-empty | identical | encode s | decode s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for dataset, records in results.items():
        base = records[DEFAULT]["bytes"]
        for name, rec in records.items():
            w, r = statistics.median(rec["write"]), statistics.median(rec["read"])
            label = name if name != PACKAGE else f"{PACKAGE} ({rec['codecs']})"
            alone = " | ".join(f"{t:.3f}" for t in rec["alone"]) if "alone" in rec else "|"
            print(f"| {dataset} | {label} | {w:.3f} | {r:.3f} | {w + r:.3f} | {rec['bytes'] / 2**10:.0f} "
                  f"| {rec['bytes'] / base:.3f} | {rec['files']} / {rec['non_empty']} "
                  f"| {'yes' if rec['identical'] else 'NO'} | {alone} |")
    print()
    print("Runs (write s; read s):\n")
    for dataset, records in results.items():
        for name, rec in records.items():
            print(f"- {dataset}, {name}: {', '.join(f'{t:.3f}' for t in rec['write'])}; "
                  f"{', '.join(f'{t:.3f}' for t in rec['read'])}")
    print()
    total, non_empty, dataset = empty_info
    print(f"Empty chunks: {dataset} with planes {args.shape[0] // 2}-{args.shape[0] - 1} cleared, "
          f"{total} chunks, {non_empty} non-empty (zarr default codec):\n")
    print("| written with | chunk files | identical |")
    print("|---|---:|---|")
    for label, files, same in empty_rows:
        print(f"| {label} | {files} | {'yes' if same else 'NO'} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"), default=[32, 1024, 1024],
                        help="volume shape (default 32 1024 1024)")
    parser.add_argument("--chunks", type=int, nargs=3, metavar=("Z", "Y", "X"), default=None,
                        help="chunk shape (default: write_ome_zarr's, 1 x 1024 x 1024 capped by the shape)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.001, 0.01],
                        help="particle voxel fractions of the label volumes (default 0.001 0.01)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds of every codec (default 5)")
    parser.add_argument("--quick", action="store_true", help="8 x 512 x 512 (a few seconds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="where the stores are written (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.quick:
        args.shape = [8, 512, 512]
    args.shape = tuple(args.shape)
    args.chunks = tuple(min(c, s) for c, s in zip(args.chunks or DEFAULT_CHUNKS, args.shape))

    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    started = time.perf_counter()
    data = make_data(args.shape, args.fractions, args.seed)
    codecs = candidates()
    names = [*codecs, PACKAGE]
    results = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        for dataset, array in data.items():
            print(f"{dataset} ...", file=sys.stderr, flush=True)
            results[dataset] = measure(array, args.chunks, names, codecs, args.repeat, workdir)
            non_empty = non_empty_chunks(array, args.chunks)
            for rec in results[dataset].values():
                rec["non_empty"] = non_empty
            for name, pair in codec_alone(array, args.chunks, args.repeat).items():
                results[dataset][name]["alone"] = pair
        first = next(iter(data))
        cleared = data[first].copy()
        cleared[args.shape[0] // 2:] = 0
        grid = int(np.prod([-(-s // c) for s, c in zip(args.shape, args.chunks)]))
        empty_rows = empty_chunk_check(cleared, args.chunks, workdir)
        empty_info = (grid, non_empty_chunks(cleared, args.chunks), first)
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print_report(results, empty_rows, empty_info, args, time.perf_counter() - started, (load_start, load_end))


if __name__ == "__main__":
    main()
