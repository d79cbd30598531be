"""Map 16-bit intensities onto the 256 bins of the intensity model.

Design note
-----------
The mixture models a volume by 256-bin intensity histograms, and its
posterior is a per-slice lookup table indexed by intensity. Data with more
than 8 bits per voxel (uint16 detectors, often using only part of their
range) therefore needs a rule that sends every value to one of 256 bins. The
rule here has three properties:

**Fixed before any slab is read.** A :class:`Binning` is decided once per
fit -- from the observed minimum and maximum (a first streaming pass, e.g.
the sum of :func:`value_histogram` over slabs) or from bounds the user
gives -- and then applied voxel by voxel. The bin of a voxel depends only on
its value, never on the slab or chunk it was read in, so results do not
depend on how the volume is chunked or cut into slabs. A per-slab rescaling
(each slab stretched to its own min..max) would break this and is not
offered.

**Exact for 8-bit data.** In the default mode, "auto", data whose maximum
is at most 255 keeps its values: bin ``v`` holds intensity ``v``, so a
uint16 array holding 8-bit values gives exactly the results of the same
array as uint8. (This identity is the "range" rule with ``low=0`` and
``high=255``.)

**Cheap per voxel.** For uint16 the rule is tabulated once into a 65,536-entry
uint8 table (64 KiB); mapping a slab is then one table lookup per voxel.

The rules, for an integer value ``v``:

``"range"`` (linear)
    ``bin = floor((v - low) * 256 / (high - low + 1))``, clipped to
    [0, 255]. The ``high - low + 1`` values from `low` to `high` are split
    into 256 bins of (within one) equal width; values below `low` go to bin
    0 and values above `high` to bin 255. A range of exactly 256 values is a
    pure offset (``bin = v - low``); a range of fewer than 256 values leaves
    some bins empty. `low` and `high` default to the observed minimum and
    maximum.
``"shift"`` (power of two)
    ``bin = min(v >> k, 255)`` with the smallest ``k`` that brings the
    maximum (observed, or `high`) under 256. Bins are ``2**k`` values wide
    and start at zero, so the bin width is a power of two and 0 stays 0;
    when the data sits far above zero most bins stay empty.
``"auto"`` (default)
    The identity when the maximum is at most 255 and no bounds are given;
    otherwise "range".

Alternatives considered: mapping the whole dtype range (0..65535) into 256
bins of 256 values wastes most bins when a detector uses a few thousand grey
levels; keeping 65,536 bins would make the histograms and lookup tables 256
times larger and the EM on them much slower, for an intensity model whose
two components are smooth. Outliers (hot pixels) stretch the observed
min..max; pass `low` and `high` -- for instance percentiles of the first
pass's histogram -- when they are a concern.

Wiring into the mixture: pass 1 sums :func:`value_histogram` of every
sampled slab; :func:`choose_binning` turns that histogram into a
:class:`Binning`, stored with the fitted model; every later slab (fit and
predict) goes through :meth:`Binning.apply` before the 8-bit kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ._plan import compute
from ._volume import is_dask_array, is_lazy

__all__ = ["Binning", "choose_binning", "to_8bit", "value_histogram"]

N_BINS = 256
MODES = ("auto", "range", "shift")
_SUPPORTED = (np.dtype(np.uint8), np.dtype(np.uint16))


def check_intensity_dtype(dtype, name="X"):
    """Raise a clear TypeError unless `dtype` is uint8 or uint16; return it as a dtype."""
    dtype = np.dtype(dtype)
    if dtype in _SUPPORTED:
        return dtype
    if dtype.kind == "b":
        hint = "a boolean array is a mask, not intensities."
    elif dtype.kind == "f":
        hint = (
            "scale floating-point intensities to integers first, e.g. with "
            "skimage.util.img_as_uint for images in [0, 1], or by rescaling your "
            "intensity range to 0-65535 and casting to uint16."
        )
    elif dtype.kind == "i":
        hint = (
            "shift signed data to non-negative values and cast it to uint16; data stored "
            "as int16 with an offset of -32768 comes back with "
            "(x.astype(np.int32) + 32768).astype(np.uint16)."
        )
    elif dtype.kind == "u":
        hint = "data with more than 16 bits per voxel is not supported; reduce it to uint16 first."
    else:
        hint = "pass an array of integer intensities."
    raise TypeError(
        f"{name} must hold unsigned 8- or 16-bit intensities (uint8 or uint16); got {dtype}: {hint}"
    )


def _check_bound(value, name, dtype):
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer intensity or None; got {value!r}.")
    top = np.iinfo(dtype).max
    if not 0 <= value <= top:
        raise ValueError(f"{name} must be an intensity from 0 to {top} for {dtype} data; got {value}.")
    return int(value)


@dataclass(frozen=True)
class Binning:
    """A fixed map from integer intensities to the 256 bins.

    Parameters
    ----------
    mode : {"range", "shift"}
        The rule (see the module's design note).
    low, high : int
        "range": the values mapped linearly onto the bins, both included.
        "shift": `low` is 0 and `high` the largest value the shift keeps
        below 256.
    shift : int
        "shift": bits dropped; 0 for "range".
    """

    mode: str
    low: int
    high: int
    shift: int = 0

    def __post_init__(self):
        if self.mode not in ("range", "shift"):
            raise ValueError(f"mode must be 'range' or 'shift'; got {self.mode!r}.")
        if not 0 <= self.low <= self.high:
            raise ValueError(f"need 0 <= low <= high; got low={self.low}, high={self.high}.")
        if self.mode == "shift" and (self.low != 0 or self.shift < 0):
            raise ValueError("a shift binning starts at 0 and drops a non-negative number of bits.")

    @property
    def is_identity(self):
        """True when every value from 0 to 255 keeps its value as its bin."""
        if self.mode == "shift":
            return self.shift == 0
        return self.low == 0 and self.high == N_BINS - 1

    def bins(self, values):
        """Bins of integer `values` (any shape), as uint8, computed arithmetically."""
        values = np.asarray(values, dtype=np.int64)
        if self.mode == "shift":
            out = values >> self.shift
        else:
            out = (values - self.low) * N_BINS // (self.high - self.low + 1)
        return np.clip(out, 0, N_BINS - 1).astype(np.uint8)

    @property
    def edges(self):
        """Bin edges, (257,) int64: bin ``b`` holds the values ``edges[b] <= v < edges[b + 1]``.

        Values below ``edges[0]`` also fall in bin 0 and values from
        ``edges[256]`` on in bin 255 (clipping). Equal consecutive edges mark
        an empty bin.
        """
        b = np.arange(N_BINS + 1, dtype=np.int64)
        if self.mode == "shift":
            return b << self.shift
        width = self.high - self.low + 1
        # Smallest v with (v - low) * 256 // width >= b: v = low + ceil(b * width / 256).
        return self.low + -(-b * width // N_BINS)

    def table(self, dtype):
        """The map tabulated for every value of `dtype`: uint8 array of 2**bits entries."""
        return _table(self, check_intensity_dtype(dtype).itemsize * 8)

    def fold(self, counts):
        """Counts by value turned into counts by bin, along the last axis.

        Parameters
        ----------
        counts : array_like of int, shape (..., 256) or (..., 65536)
            Counts of every uint8 or uint16 value, e.g. from
            :func:`value_histogram` or per-slice histograms.

        Returns
        -------
        binned : ndarray of int64, shape (..., 256)
            ``binned[..., b]`` is the total count of the values whose bin is
            ``b``: the histogram of the mapped data, computed without mapping it.
        """
        counts = np.asarray(counts)
        if counts.shape[-1:] not in ((N_BINS,), (2**16,)) or counts.dtype.kind not in "iu":
            raise ValueError(
                "counts must hold integer counts of every uint8 or uint16 value along its last axis "
                f"(256 or 65536 entries); got shape {counts.shape} and dtype {counts.dtype}."
            )
        table = self.table(np.uint8 if counts.shape[-1] == N_BINS else np.uint16)
        # Both rules are non-decreasing in the value, so each bin holds one run of
        # consecutive values: its count is a difference of cumulative sums (exact).
        cumulative = np.zeros((*counts.shape[:-1], counts.shape[-1] + 1), dtype=np.int64)
        np.cumsum(counts, axis=-1, out=cumulative[..., 1:])
        bins = np.arange(N_BINS)
        starts = np.searchsorted(table, bins, side="left")
        stops = np.searchsorted(table, bins, side="right")
        return cumulative[..., stops] - cumulative[..., starts]

    def apply(self, slab):
        """Bins of a NumPy slab of uint8 or uint16 intensities, as uint8.

        An identity binning returns a uint8 slab unchanged (not a copy).
        """
        from ._backend import CPU
        from ._ops.lookup import to_bins

        slab = np.asarray(slab)
        check_intensity_dtype(slab.dtype)
        return to_bins(CPU, slab, self)


@lru_cache(maxsize=16)
def _table(binning, bits):
    table = binning.bins(np.arange(2**bits))
    table.flags.writeable = False
    return table


def value_histogram(slab):
    """Counts of every value of a uint8 or uint16 slab: (256,) or (65536,) int64.

    Sum it over the slabs of a first pass and give it to :func:`choose_binning`.
    """
    slab = np.asarray(slab)
    dtype = check_intensity_dtype(slab.dtype)
    return np.bincount(slab.ravel(), minlength=2 ** (dtype.itemsize * 8)).astype(np.int64, copy=False)


def _resolve(mode, dtype, observed, low, high):
    """The binning for `mode` given the observed (min, max) and optional bounds."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}; got {mode!r}.")
    low = _check_bound(low, "low", dtype)
    high = _check_bound(high, "high", dtype)
    if mode == "shift":
        if low not in (None, 0):
            raise ValueError(
                "mode='shift' always starts its first bin at 0; low cannot be set to another value "
                "(use mode='range')."
            )
        top = observed[1] if high is None else high
        return Binning("shift", 0, top, max(0, int(top).bit_length() - 8))
    if mode == "auto" and low is None and high is None and observed[1] < N_BINS:
        return Binning("range", 0, N_BINS - 1)
    low = observed[0] if low is None else low
    high = observed[1] if high is None else high
    if low > high:
        raise ValueError(f"low ({low}) must not exceed high ({high}).")
    return Binning("range", low, high)


def _needs_observation(mode, low, high):
    return high is None or (low is None and mode != "shift")


def choose_binning(hist_or_sample, dtype, *, mode="auto", low=None, high=None):
    """Decide the map from intensities to 256 bins, once, before mapping any slab.

    Parameters
    ----------
    hist_or_sample : array_like
        Either a sample of the intensities (an array of dtype `dtype`, any
        shape), or a histogram of them: a 1D array of counts, one per value of
        `dtype` (256 or 65,536 entries) and of another dtype, e.g. the sum of
        :func:`value_histogram` over a first pass. Only its smallest and
        largest present values are used.
    dtype : dtype
        dtype of the data: uint8 or uint16.
    mode : {"auto", "range", "shift"}, default="auto"
        See the module's design note.
    low, high : int, optional
        Bounds of the "range" rule (and of "auto" when given); for "shift",
        `high` replaces the observed maximum. Missing bounds are the
        observed minimum and maximum.

    Returns
    -------
    binning : Binning

    Raises
    ------
    TypeError
        If `dtype` is not uint8 or uint16.
    ValueError
        If the sample or histogram is empty, a histogram has the wrong length
        or negative counts, or the bounds are invalid.

    Examples
    --------
    >>> import numpy as np
    >>> choose_binning(np.array([3, 200], dtype=np.uint16), np.uint16)
    Binning(mode='range', low=0, high=255, shift=0)
    >>> choose_binning(np.array([100, 1123], dtype=np.uint16), np.uint16)
    Binning(mode='range', low=100, high=1123, shift=0)
    >>> choose_binning(np.array([100, 1123], dtype=np.uint16), np.uint16, mode="shift")
    Binning(mode='shift', low=0, high=1123, shift=3)
    """
    dtype = check_intensity_dtype(dtype, "dtype")
    observed = (0, 0)
    if _needs_observation(mode, low, high):
        observed = _observed_range(hist_or_sample, dtype)
    return _resolve(mode, dtype, observed, low, high)


def _observed_range(hist_or_sample, dtype):
    data = np.asarray(hist_or_sample)
    n_values = 2 ** (dtype.itemsize * 8)
    if data.dtype == dtype:
        if data.size == 0:
            raise ValueError("The intensity sample is empty; pass at least one value.")
        return int(data.min()), int(data.max())
    if data.ndim != 1 or data.size != n_values or data.dtype.kind not in "iuf":
        raise ValueError(
            f"hist_or_sample must be a sample of {dtype} intensities (an array of that dtype) "
            f"or a histogram of counts with one entry per {dtype} value ({n_values} entries); "
            f"got an array of shape {data.shape} and dtype {data.dtype}."
        )
    if data.dtype.kind == "f" and not np.isfinite(data).all() or (data < 0).any():
        raise ValueError("The histogram must hold finite, non-negative counts.")
    present = np.flatnonzero(data)
    if present.size == 0:
        raise ValueError("The histogram is empty (all counts are zero); there is no intensity to bin.")
    return int(present[0]), int(present[-1])


def to_8bit(volume_or_slab, *, mode="auto", low=None, high=None):
    """Map uint8 or uint16 intensities to 8-bit bins with one fixed rule.

    Parameters
    ----------
    volume_or_slab : ndarray, zarr.Array or dask.array.Array
        Intensities, uint8 or uint16, of any shape.
    mode : {"auto", "range", "shift"}, default="auto"
        See the module's design note.
    low, high : int, optional
        Bounds of the rule (see :func:`choose_binning`). Missing ones are the
        minimum and maximum of the whole input -- computed in one streaming
        pass for zarr and dask inputs -- so when mapping a volume slab by
        slab, decide the binning once with :func:`choose_binning` and apply
        it to every slab, or pass both bounds.

    Returns
    -------
    binned : ndarray or dask.array.Array, uint8
        Same shape. NumPy in gives NumPy out (uint8 input under an identity
        binning comes back unchanged); zarr or dask in gives a lazy dask
        array, mapped chunk by chunk.

    Raises
    ------
    TypeError
        If the input is not uint8 or uint16 (signed, floating-point, boolean
        or wider integers), with a hint on how to convert it.

    Examples
    --------
    >>> import numpy as np
    >>> to_8bit(np.array([0, 17, 255], dtype=np.uint16))
    array([  0,  17, 255], dtype=uint8)
    >>> to_8bit(np.array([100, 103, 104, 1123], dtype=np.uint16))
    array([  0,   0,   1, 255], dtype=uint8)
    >>> to_8bit(np.array([0, 7, 8, 1023], dtype=np.uint16), mode="shift")
    array([  0,   1,   2, 255], dtype=uint8)
    """
    if not is_lazy(volume_or_slab):
        volume_or_slab = np.asarray(volume_or_slab)
    dtype = check_intensity_dtype(volume_or_slab.dtype)
    if is_lazy(volume_or_slab):
        import dask.array as da

        source = volume_or_slab if is_dask_array(volume_or_slab) else da.from_zarr(volume_or_slab)
        observed = (0, 0)
        if _needs_observation(mode, low, high):
            # One pass computes both: dask shares the chunk reads.
            observed = tuple(int(v) for v in compute(source.min(), source.max()))
        binning = _resolve(mode, dtype, observed, low, high)
        return source.map_blocks(binning.apply, dtype=np.uint8)
    data = volume_or_slab
    if data.size == 0:
        raise ValueError("The input is empty; there is no intensity to bin.")
    observed = (0, 0)
    if _needs_observation(mode, low, high):
        observed = (int(data.min()), int(data.max()))
    return _resolve(mode, dtype, observed, low, high).apply(data)
