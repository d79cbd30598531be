"""Per-voxel classification of volumes, block by block, gated and exact.

A :class:`SlabClassifier` holds everything a block needs (picklable, so dask
workers in other processes can use it): the intensity normalisation of the
volume, the feature specification, the fitted scikit-learn classifier, the
gate and, optionally, the intensity model's per-slice posterior tables.

Volumes are cut into blocks of a few dozen planes by a few hundred rows and
columns, each read with a halo of the features' reach (plus the gate's
margin) on every side, so that the features of its own voxels are those of
the whole volume and memory depends on the block size only, not on the
plane size. Inside a block only voxels the gate lets through are classified
(the rest get probability 0), and features are computed only in crops
around them. The result equals classifying the whole volume at once.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from .._backend import CPU
from .._model import otsu_intensity
from .._ops.filters import compute_features, support
from .._ops import _numba, lookup
from .._ops.histogram import slice_histograms
from .._ops.morphology import grow_box
from .._plan import SLAB_BYTES, ordered_map, rechunk
from .overlap import map_overlap

#: Tile edge (voxels, in the plane) by which the gate's voxels are grouped into crops.
TILE = 64

#: Most voxels of one crop (with its reach): bounds the dense arrays of a crop
#: (its intensities, their square, masks and index tables: about 20 bytes a
#: voxel). With these two sizes the 0.54 Gvoxel benchmark phantom classifies
#: about a quarter faster on two threads than with 32-pixel tiles and 2**20
#: voxels (fewer crops, so less of the work holds the interpreter), and a
#: denser phantom as fast; on one thread all sizes tie.
CROP_VOXELS = 2**21

#: The same on a GPU, where the dense filters cost little and each crop's
#: features are a few hundred small launches under the interpreter lock (on
#: an H200 the features of 64 crops of 2**21 voxels took 0.75 s of 1.86 s;
#: with crops of 2**23 and one block at a time the whole run took 0.46 s).
#: A crop never exceeds its block, so this is at most a block with its halo.
GPU_CROP_VOXELS = 2**23

#: Working bytes per voxel of a block (with its halo): the raw intensities,
#: the gate and its growth, the probabilities and the prior's posterior
#: logit. Crops add at most ``CROP_VOXELS`` times the features' bytes per voxel.
BLOCK_BYTES_PER_VOXEL = 16

#: Rows and columns of a block (with the volume's planes cut into such squares).
BLOCK_SIDE = 512

#: Serialises the GPU's share of the work (see SlabClassifier._features_on_host).
_DEVICE_LOCK = threading.Lock()

#: Posterior clip before the logit: keeps the feature finite and bounded.
LOGIT_CLIP = 1e-4


#: Most voxels counted for a volume's normalisation: evenly spaced slabs
#: beyond it. Quantiles and Otsu's split of 2**27 voxels are within a grey
#: level of the whole volume's, and a large volume is then not read once
#: more just to be normalised.
HISTOGRAM_VOXELS = 2**27


def histogram(volume, n_jobs=1, max_voxels=HISTOGRAM_VOXELS):
    """Counts of the intensity values of a uint8/uint16 volume, read slab by slab.

    Volumes of more than `max_voxels` voxels are sampled: evenly spaced runs
    of consecutive planes, the first and last planes included, that hold
    about `max_voxels` voxels. The runs depend on the volume's shape only,
    not on its chunks or on where it is stored, so a volume in memory and
    the same volume in zarr are normalised alike.
    """
    n_values = 256 if volume.dtype == np.uint8 else 65536
    n_planes = volume.shape[0]
    plane = int(np.prod(volume.shape[1:]))
    if n_planes * plane <= max_voxels:
        slabs = list(volume.slabs(volume.slab_depth(8)))
    else:
        # Runs of a slab's depth at most, and four runs at least.
        run = max(1, min(SLAB_BYTES // (8 * plane), max_voxels // (4 * plane)))
        starts = np.arange(0, n_planes, run)
        wanted = max(2, -(-max_voxels // (run * plane)))
        if wanted < starts.size:
            starts = starts[np.unique(np.linspace(0, starts.size - 1, wanted).round().astype(int))]
        slabs = [np.arange(a, min(n_planes, a + run)) for a in starts]

    def count(indices):
        slab = volume.read(int(indices[0]), int(indices[-1]) + 1)
        if slab.dtype == np.uint8:
            # The compiled per-slice histograms: several times np.bincount's speed.
            return slice_histograms(CPU, slab.reshape(slab.shape[0], -1)).sum(axis=0)
        return np.bincount(slab.ravel(), minlength=n_values)

    total = np.zeros(n_values, dtype=np.int64)
    for counts in ordered_map(count, slabs, n_jobs):
        total += counts
    return total


def _weighted_median(values, weights):
    cumulative = np.cumsum(weights)
    return float(values[np.searchsorted(cumulative, cumulative[-1] / 2.0)])


def robust_location_scale(counts, name="X"):
    """Median and scaled median absolute deviation of a histogram of intensities.

    The median and MAD follow the background in volumes where particles are a
    minority of the voxels, so intensities in units of ``(I - median) / scale``
    compare across acquisitions of different brightness and contrast. Falls
    back to the standard deviation when more than half of the voxels share
    one value.

    Raises
    ------
    ValueError
        For a constant volume.
    """
    values = np.arange(counts.size, dtype=np.float64)
    median = _weighted_median(values, counts)
    deviation = np.abs(values - median)
    order = np.argsort(deviation, kind="stable")
    mad = _weighted_median(deviation[order], counts[order])
    scale = 1.4826 * mad
    if scale == 0:
        mean = np.average(values, weights=counts)
        scale = float(np.sqrt(np.average((values - mean) ** 2, weights=counts)))
    if scale == 0:
        raise ValueError(
            f"{name} is constant (every voxel is {int(median)}): there is nothing to classify. "
            "Check that the right array was passed."
        )
    return median, scale


def two_class_location_scale(counts, name="X"):
    """Otsu's threshold of a histogram, and half the gap between its two class means.

    Intensities in units of ``(I - threshold) / scale`` put the image's own
    two-class split at 0 and its two class means near -1 and +1, whatever
    share of the image the particles cover, so that a classifier trained on
    some acquisitions sees others on the same footing (the per-image
    adaptivity that makes a global threshold carry over).

    Raises
    ------
    ValueError
        For a constant volume.
    """
    counts = np.asarray(counts, dtype=np.float64)
    present = np.flatnonzero(counts)
    if present.size < 2:
        value = int(present[0]) if present.size else 0
        raise ValueError(
            f"{name} is constant (every voxel is {value}): there is nothing to classify. "
            "Check that the right array was passed."
        )
    # Values up to `level` are the lower class, the rest the upper one.
    level = otsu_intensity(counts)
    values = np.arange(counts.size, dtype=np.float64)
    low, high = slice(0, level + 1), slice(level + 1, None)
    mean_low = np.average(values[low], weights=counts[low])
    mean_high = np.average(values[high], weights=counts[high])
    return level + 0.5, float(mean_high - mean_low) / 2.0


@dataclass(frozen=True)
class Normaliser:
    """Maps raw intensities to ``(I - location) / scale`` (float32) through a table.

    `second`, when given, is another ``(location, scale)`` of the same
    volume: the smoothed intensities are then also given in those units
    (see :func:`second_unit_columns`).
    """

    location: float
    scale: float
    n_values: int = 256
    second: tuple | None = None

    def second_units(self):
        """``(a, b)`` with ``a * x + b`` the second units of a value ``x`` in the first (None without)."""
        if self.second is None:
            return None
        location, scale = self.second
        return np.float32(self.scale / scale), np.float32((self.location - location) / scale)

    def table(self):
        values = np.arange(self.n_values, dtype=np.float64)
        return ((values - self.location) / self.scale).astype(np.float32)

    def level(self, normalised):
        """The raw intensity matching a normalised level."""
        return self.location + normalised * self.scale


#: Suffix of the names of the feature columns given in the second unit.
SECOND_UNIT_SUFFIX = ":background"


def second_unit_columns(names):
    """Columns of a feature matrix (by `names`) also given in a second intensity unit:
    the intensity and its Gaussian smoothings, whose values -- unlike
    differences and derivatives -- depend on where the unit's zero is."""
    return [i for i, name in enumerate(names) if name == "intensity" or name.startswith("gaussian@")]


@dataclass(frozen=True)
class PriorTables:
    """The intensity model's posterior as per-slice lookup tables.

    Attributes
    ----------
    luts : ndarray, float32, shape (Z, 256)
        ``luts[z, v]``: posterior of a voxel of bin ``v`` in plane ``z``.
    binning : object or None
        Maps raw 16-bit intensities to bins (None when values are bins).
    """

    luts: np.ndarray
    binning: object = None

    def logit(self, raw, z0):
        """Clipped posterior logit of the planes ``z0 : z0 + len(raw)``."""
        bins = raw if self.binning is None else self.binning.table(raw.dtype)[raw]
        luts = self.luts[z0 : z0 + raw.shape[0]]
        posterior = np.take_along_axis(luts, bins.reshape(raw.shape[0], -1).astype(np.intp), axis=1)
        posterior = np.clip(posterior.reshape(raw.shape), LOGIT_CLIP, 1 - LOGIT_CLIP)
        return (np.log(posterior) - np.log1p(-posterior)).astype(np.float32)


@dataclass
class SlabClassifier:
    """Classifies the voxels of blocks of one volume (see the module docstring).

    Attributes
    ----------
    spec : FeatureSpec
    estimator : classifier
        Fitted scikit-learn classifier over ``spec``'s features (plus the
        posterior logit when `prior` is set).
    normaliser : Normaliser
    output_classes : sequence of int
        Columns of ``estimator.predict_proba`` summed into the output.
    gate_level : float or None
        Normalised intensity at (or, for dark particles, below) which a voxel
        may be a particle; None classifies every voxel.
    particle_sign : {1, -1}
        1 for particles brighter than the background, -1 for darker.
    gate_margin : tuple of int
        Voxels per axis by which the gate is grown.
    prior : PriorTables or None
        The intensity model's posterior, whose logit is the last feature.
    backend : Backend
    """

    spec: object
    estimator: object
    normaliser: Normaliser
    output_classes: tuple
    gate_level: float | None = None
    particle_sign: int = 1
    gate_margin: tuple = (0, 0, 0)
    prior: PriorTables | None = None
    backend: object = CPU
    _table: np.ndarray = field(default=None, init=False, repr=False)

    _second_columns: list = field(default=None, init=False, repr=False)

    def feature_names(self):
        """Names of the feature matrix's columns: the spec's, those in the
        second unit (with `SECOND_UNIT_SUFFIX`), then the prior's."""
        names = self.spec.names()
        if self.normaliser.second is not None:
            names += [names[i] + SECOND_UNIT_SUFFIX for i in second_unit_columns(names)]
        return names + (["posterior_logit"] if self.prior is not None else [])

    @property
    def n_features(self):
        """Number of columns of the feature matrix."""
        return len(self.feature_names())

    def _add_second_units(self, feats):
        # The intensity and its smoothings in the second units, after the
        # spec's columns (and before the prior's); `feats` on the host.
        units = self.normaliser.second_units()
        if units is None:
            return feats
        if self._second_columns is None:
            self._second_columns = second_unit_columns(self.spec.names())
        n_spec = self.spec.n_features
        more = feats[self._second_columns] * units[0] + units[1]
        return np.concatenate([feats[:n_spec], more.astype(feats.dtype, copy=False), feats[n_spec:]])

    @property
    def halo(self):
        """Voxels per axis (z, y, x) read around a block: the features' reach plus the gate's margin."""
        reach = support(self.spec)
        return tuple(r + m for r, m in zip(reach, self.gate_margin))

    def normalise(self, raw):
        if self._table is None:
            self._table = self.normaliser.table()
        table = self._table
        if self.backend.is_gpu:
            table = self.backend.to_device(table)
            raw = self.backend.to_device(raw)
        elif raw.dtype == np.uint8 and _numba.available():
            # The compiled lookup: a few times faster than NumPy's gather.
            flat = np.ascontiguousarray(raw).reshape(1, -1)
            out = np.empty(flat.shape, dtype=table.dtype)
            return lookup.compiled_apply_luts(flat, table[None], out).reshape(raw.shape)
        return table[raw]

    def gate(self, raw):
        """Boolean mask of the voxels to classify (the grown gate), on the host."""
        shape = raw.shape
        if self.gate_level is None:
            return np.ones(shape, dtype=bool)
        level = self.normaliser.level(self.gate_level)
        raw = np.asarray(raw)
        if self.particle_sign > 0:
            mask = raw >= np.ceil(level)
        else:
            mask = raw <= np.floor(level)
        if any(self.gate_margin):
            mask = grow_box(mask, self.gate_margin)
        return mask

    def posterior_logit(self, raw, z0=0):
        if self.prior is None:
            return None
        return self.prior.logit(np.asarray(raw), z0)

    def _features_on_host(self, raw, extra=None, where=None):
        """`compute_features` of the normalised `raw` on the backend, as a host array.

        On a GPU one thread at a time (the dask blocks and slabs of other
        threads wait): with CuPy 14.2 on an H200, blocks classified from
        dask's threads at once failed with CUDA_ERROR_INVALID_HANDLE, and
        the features' many small launches hold the interpreter lock anyway
        (one thread was as fast as four: 1.72 s against 1.63 s for 67
        Mvoxel). The forest still runs on all threads.
        """
        if not self.backend.is_gpu:
            return compute_features(self.backend, self.normalise(raw), self.spec, extra, where)
        backend = self.backend
        with _DEVICE_LOCK:
            extra = None if extra is None else backend.to_device(extra)
            where = None if where is None else backend.to_device(where)
            return backend.to_host(compute_features(backend, self.normalise(raw), self.spec, extra, where))

    def features(self, raw, z0=0):
        """Features of every voxel of `raw` (planes from `z0`; no gate), as a (n_features, Z, Y, X) host array."""
        feats = self._add_second_units(self._features_on_host(raw, self.posterior_logit(raw, z0)))
        return feats.reshape(feats.shape[0], *raw.shape)

    def classify(self, raw, interior=None, z0=0):
        """Probability (float32) of the `interior` voxels of the block `raw`, read with its halo.

        Parameters
        ----------
        raw : ndarray, shape (Z, Y, X)
            The block's intensities, halo included.
        interior : tuple of slices, optional
            The block's own voxels (the whole block by default).
        z0 : int
            Volume plane of the block's first plane (for the per-slice prior).
        """
        interior = tuple(slice(0, n) for n in raw.shape) if interior is None else interior
        wanted = self.gate(raw)
        # Only the block's own voxels are classified: clear the gate on the halo.
        for axis, part in enumerate(interior):
            index = [slice(None)] * raw.ndim
            index[axis] = slice(0, part.start)
            wanted[tuple(index)] = False
            index[axis] = slice(part.stop, None)
            wanted[tuple(index)] = False
        out_shape = tuple(s.stop - s.start for s in interior)
        out = np.zeros(out_shape, dtype=np.float32)
        if not wanted.any():
            return out
        logit = self.posterior_logit(raw, z0)
        max_voxels = GPU_CROP_VOXELS if self.backend.is_gpu else CROP_VOXELS
        for crop, inside in _crops(wanted, support(self.spec), max_voxels):
            extra = None if logit is None else logit[crop]
            flat = np.flatnonzero(inside)
            feats = self._features_on_host(raw[crop], extra, flat)
            proba = predict_proba(self.estimator, self._add_second_units(feats).T)
            # The crop's classified voxels, in the output's coordinates.
            at = np.unravel_index(flat, inside.shape)
            at = tuple(i + (c.start - part.start) for i, c, part in zip(at, crop, interior))
            out[at] = proba[:, list(self.output_classes)].sum(axis=1)
        return out


def predict_proba(estimator, X):
    """``estimator.predict_proba(X)``, with less overhead for plain random forests.

    A forest's ``predict_proba`` dispatches every tree through joblib, even
    on one thread: with 50 trees and a few hundred crops per volume that
    dispatch cost about a tenth of the classification. Here a
    ``RandomForestClassifier`` or ``ExtraTreesClassifier`` (exactly those
    classes, one output) has its trees' probabilities summed in a loop on
    the calling thread: the same sum, in the same order, as scikit-learn's
    on one job (with several jobs scikit-learn adds the trees in whatever
    order its threads finish). Blocks are already classified on `n_jobs`
    threads, so the forest's own threads would only oversubscribe the
    cores. Anything else is called as is.
    """
    from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier

    plain = type(estimator) in (RandomForestClassifier, ExtraTreesClassifier)
    if not plain or getattr(estimator, "n_outputs_", 1) != 1:
        return estimator.predict_proba(X)
    X = np.ascontiguousarray(X, dtype=np.float32)
    if not np.isfinite(X).all():
        return estimator.predict_proba(X)  # scikit-learn's own error message
    n_classes = estimator.n_classes_
    total = np.zeros((X.shape[0], n_classes), dtype=np.float64)
    for tree in estimator.estimators_:
        # The fitted tree's own arrays: what ``tree.predict_proba`` returns
        # for one output (leaf class fractions), without its per-call checks,
        # which cost as much as the prediction on a crop's few hundred rows.
        total += tree.tree_.predict(X)[:, :n_classes]
    total /= len(estimator.estimators_)
    return total


def _crops(wanted, reach, max_voxels=CROP_VOXELS):
    """Crops that cover the `wanted` voxels with `reach` voxels around them.

    The plane is cut into blocks of whole tiles, small enough that a block
    grown by the reach holds at most about `max_voxels` voxels over the
    slab's depth. In each block with wanted voxels, the crop is the box of
    its occupied tiles (and of the planes that hold wanted voxels), grown by
    `reach` and clipped to the slab. Yields ``(crop, inside)``: a tuple of
    slices and the crop-shaped mask of the wanted voxels of that block, so
    every wanted voxel is classified exactly once, in a crop that holds its
    whole neighbourhood (or the slab's edge).
    """
    n_planes, n_rows, n_cols = wanted.shape
    rz, ry, rx = reach
    ty, tx = min(TILE, n_rows), min(TILE, n_cols)
    gy, gx = -(-n_rows // ty), -(-n_cols // tx)
    padded = np.zeros((n_planes, gy * ty, gx * tx), dtype=bool)
    padded[:, :n_rows, :n_cols] = wanted
    occupied = padded.reshape(n_planes, gy, ty, gx, tx).any(axis=(0, 2, 4))
    depth = min(n_planes, n_planes + 2 * rz)
    side = 1
    while side < max(gy, gx) and depth * ((side + 1) * ty + 2 * ry) * ((side + 1) * tx + 2 * rx) <= max_voxels:
        side += 1
    for by in range(0, gy, side):
        for bx in range(0, gx, side):
            block = occupied[by : by + side, bx : bx + side]
            if not block.any():
                continue
            rows, cols = np.flatnonzero(block.any(axis=1)), np.flatnonzero(block.any(axis=0))
            y0, y1 = (by + rows[0]) * ty, min((by + rows[-1] + 1) * ty, n_rows)
            x0, x1 = (bx + cols[0]) * tx, min((bx + cols[-1] + 1) * tx, n_cols)
            planes = np.flatnonzero(wanted[:, y0:y1, x0:x1].any(axis=(1, 2)))
            if planes.size == 0:
                continue
            z0, z1 = int(planes[0]), int(planes[-1]) + 1
            crop = (
                slice(max(0, z0 - rz), min(n_planes, z1 + rz)),
                slice(max(0, y0 - ry), min(n_rows, y1 + ry)),
                slice(max(0, x0 - rx), min(n_cols, x1 + rx)),
            )
            inside = np.zeros(tuple(c.stop - c.start for c in crop), dtype=bool)
            region = tuple(slice(a - c.start, b - c.start) for (a, b), c in zip(((z0, z1), (y0, y1), (x0, x1)), crop))
            inside[region] = wanted[z0:z1, y0:y1, x0:x1]
            yield crop, inside


def axis_chunks(n, size, halo):
    """Chunk sizes along one axis: `size` each, the last one merged into the one
    before when it would be thinner than `halo` (dask's overlap needs it)."""
    size = max(1, min(n, size))
    sizes = [size] * (n // size) + ([n % size] if n % size else [])
    if len(sizes) > 1 and sizes[-1] < halo:
        last = sizes.pop()
        sizes[-1] += last
    return tuple(sizes)


def _boxes(chunks):
    """Interior boxes (tuples of slices) of a chunk grid."""
    bounds = [np.cumsum((0, *c)) for c in chunks]
    for i in range(len(chunks[0])):
        for j in range(len(chunks[1])):
            for k in range(len(chunks[2])):
                yield tuple(slice(int(b[a]), int(b[a + 1])) for b, a in zip(bounds, (i, j, k)))


def classify_in_memory(volume, slab, chunks, n_jobs=1, progress=None):
    """Probability of every voxel of an in-memory volume, block by block on `n_jobs` threads."""
    data = volume.read(0, volume.shape[0])
    halo = slab.halo
    out = np.zeros(volume.shape, dtype=np.float32)

    def one(box):
        grown = tuple(slice(max(0, b.start - h), min(n, b.stop + h)) for b, h, n in zip(box, halo, data.shape))
        interior = tuple(slice(b.start - g.start, b.stop - g.start) for b, g in zip(box, grown))
        return box, slab.classify(np.asarray(data[grown]), interior, grown[0].start)

    for box, values in ordered_map(one, _boxes(chunks), n_jobs):
        out[box] = values
        if progress is not None:
            progress.update(values.size)
    return out


def _classify_block(block, slab, chunks, halo, block_info=None):
    location = block_info[None]["chunk-location"]
    before, after, starts = [], [], []
    for axis, index in enumerate(location):
        n_chunks = len(chunks[axis])
        b = 0 if index == 0 else halo[axis]
        before.append(b)
        after.append(0 if index == n_chunks - 1 else halo[axis])
        starts.append(sum(chunks[axis][:index]) - b)
    interior = tuple(slice(b, n - a) for b, a, n in zip(before, after, block.shape))
    # The chunk's own voxels only (map_overlap is told so: nothing to trim).
    return slab.classify(np.asarray(block), interior, starts[0])


def classify_lazy(volume, slab, chunks):
    """Lazy dask array of the probabilities, computed block by block with halos."""
    array = rechunk(volume.to_dask(), chunks)
    halo = tuple(min(h, n) for h, n in zip(slab.halo, array.shape))
    function = partial(_classify_block, slab=slab, chunks=array.chunks, halo=halo)
    # axis_chunks keeps every chunk at least a halo deep, so the overlap
    # never rechunks: the chunk locations seen by the blocks are these.
    return map_overlap(function, array, halo, np.float32, trims_itself=True)
