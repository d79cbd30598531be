"""Per-slice intensity normalisation against slice-to-slice brightness drift.

:class:`~nanoseg.preprocessing.SliceEqualizer`, documented and imported from
:mod:`nanoseg.preprocessing`, maps each uint8 slice onto reference
intensities learned in `fit` (or equalises it with CLAHE), with uint8 out,
so that it can precede :class:`~nanoseg.NanoparticleMixture`.
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._backend import CPU
from ._base import VolumeEstimatorMixin, map_volumes
from ._model import N_BINS
from ._ops.histogram import slice_histograms
from ._ops.lookup import apply_luts
from ._slabs import apply_per_slab, intensity_volumes, passthrough, slice_percentiles, to_uint8
from ._validation import check_targets


def _percentile_luts(lows_highs, reference):
    """(n, 256) uint8 tables mapping each slice's (low, high) to `reference`."""
    values = np.arange(N_BINS, dtype=np.float64)
    low, high = lows_highs[:, :1].astype(np.float64), lows_highs[:, 1:].astype(np.float64)
    ref_low, ref_high = reference
    span = high - low
    # A slice whose two percentiles coincide has no contrast to stretch: it is
    # only shifted.
    scale = np.where(span > 0, (ref_high - ref_low) / np.where(span > 0, span, 1.0), 1.0)
    return to_uint8(ref_low + (values[None, :] - low) * scale)


class _PercentileKernel:
    """Picklable slab function: per-slice linear maps to the reference."""

    def __init__(self, percentiles, reference):
        self.percentiles, self.reference = percentiles, reference

    def __call__(self, stack):
        hists = slice_histograms(CPU, stack)
        luts = _percentile_luts(slice_percentiles(hists, self.percentiles), self.reference)
        return apply_luts(CPU, np.ascontiguousarray(stack), luts)


class _ClaheKernel:
    """Picklable slab function: CLAHE of every slice."""

    def __init__(self, kernel_size, clip_limit):
        self.kernel_size, self.clip_limit = kernel_size, clip_limit

    def __call__(self, stack):
        from skimage.exposure import equalize_adapthist

        out = np.empty(stack.shape, dtype=np.uint8)
        for i, image in enumerate(stack):
            if image.min() == image.max():
                out[i] = image  # nothing to equalise, and CLAHE would divide by zero
                continue
            equalised = equalize_adapthist(
                image, kernel_size=self.kernel_size, clip_limit=self.clip_limit, nbins=N_BINS
            )
            out[i] = to_uint8(equalised * 255.0)
        return out


class SliceEqualizer(VolumeEstimatorMixin, TransformerMixin, BaseEstimator):
    """Per-slice intensity normalisation against slice-to-slice brightness drift.

    Serial block-face images drift in brightness and contrast from slice to
    slice, so that a global intensity model sees bright background slices as
    particles. With the "percentile" method, `fit` learns reference
    intensities for two percentiles and `transform` maps each slice
    linearly so that its own two percentiles land on them. uint8 in, uint8
    out (rounded and clipped to 0-255), so it can precede
    :class:`~nanoseg.NanoparticleMixture` in a pipeline.

    Parameters
    ----------
    method : {"percentile", "clahe", "passthrough"} or None, default="percentile"
        - "percentile": each slice's `percentiles` are mapped linearly onto
          the learned reference intensities.
        - "clahe": contrast-limited adaptive histogram equalisation of each
          slice (:func:`skimage.exposure.equalize_adapthist`); nothing is
          learned. It changes the intensity distribution strongly; use it
          with care in front of the intensity mixture.
        - "passthrough" or None: the input is returned unchanged, so that a
          grid search can switch the step off.
    percentiles : (float, float), default=(5, 95)
        Low and high percentiles, in [0, 100], low < high, matched between
        slices. Both should fall in the background: particles fill a small
        and varying share of each slice, so a percentile among their
        intensities (such as 99.9 when particles cover 0.5 % of a slice)
        would move with the number of particles rather than with the drift,
        and stretch the background of particle-free slices up to particle
        intensities.
    reference : {"median", "volume"} or (float, float), default="median"
        Intensities the percentiles are mapped to: "median" takes, for each
        percentile, the median over the slices seen in `fit` of that
        slice's percentile (robust to a few odd slices); "volume" takes the
        percentiles of all those slices pooled, which drift widens; two
        numbers give them directly.
    kernel_size : int or sequence of int, default=None
        Tile size of "clahe" (None: 1/8 of the slice's height and width).
    clip_limit : float, default=0.01
        Clip limit of "clahe", in (0, 1].

    Attributes
    ----------
    reference_ : ndarray of shape (2,), float64, or None
        Intensities the low and high percentiles are mapped to (None unless
        the method is "percentile").
    slice_percentiles_ : ndarray of shape (n_slices, 2), int64, or None
        Low and high percentiles of every slice seen in `fit`, in order
        (crops one after the other): a record of the drift.
    n_slices_fit_ : int
        Number of slices seen in `fit`.

    See Also
    --------
    BackgroundSubtractor : Removes uneven background within slices.

    Notes
    -----
    Percentiles are read off 256-bin slice histograms, which is exact for
    uint8 data (:func:`numpy.percentile` with ``method="inverted_cdf"``):
    `fit` makes one streaming pass over a zarr or dask input, slab by slab,
    and keeps two numbers per slice. After the "percentile" transform every
    slice's two percentiles are exactly the rounded reference intensities
    (unless clipped at 0 or 255), because a non-decreasing map preserves
    inverted-CDF percentiles. A slice whose two percentiles coincide is only
    shifted. `transform` computes each slice's percentiles from the slice
    itself, so the step also applies to volumes other than the one it was
    fitted on; zarr and dask inputs are transformed lazily, one chunk of
    whole planes at a time.

    Examples
    --------
    >>> import numpy as np
    >>> from nanoseg.preprocessing import SliceEqualizer
    >>> rng = np.random.default_rng(0)
    >>> volume = rng.integers(80, 120, size=(4, 32, 32)).astype(np.uint8)
    >>> volume += np.array([0, 10, 20, 30], dtype=np.uint8)[:, None, None]  # drift
    >>> equalizer = SliceEqualizer(percentiles=(5, 95)).fit(volume)
    >>> flat = equalizer.transform(volume)
    >>> [int(np.percentile(s, 95, method="inverted_cdf")) for s in flat]
    [132, 132, 132, 132]
    """

    _parameter_constraints = {
        "method": [StrOptions({"percentile", "clahe", "passthrough"}), None],
        "percentiles": ["array-like"],
        "reference": [StrOptions({"median", "volume"}), "array-like"],
        "kernel_size": [None, Interval(Integral, 1, None, closed="left"), "array-like"],
        "clip_limit": [Interval(Real, 0, 1, closed="right")],
    }

    def __init__(
        self,
        *,
        method="percentile",
        percentiles=(5, 95),
        reference="median",
        kernel_size=None,
        clip_limit=0.01,
    ):
        self.method = method
        self.percentiles = percentiles
        self.reference = reference
        self.kernel_size = kernel_size
        self.clip_limit = clip_limit

    def _percentiles(self):
        try:
            values = tuple(float(v) for v in self.percentiles)
        except (TypeError, ValueError):
            values = ()
        if len(values) != 2 or not (0 <= values[0] < values[1] <= 100):
            raise ValueError(
                "percentiles must be two numbers (low, high) with 0 <= low < high <= 100; got "
                f"{self.percentiles!r}."
            )
        return values

    def _fixed_reference(self):
        if isinstance(self.reference, str):
            return None
        try:
            values = tuple(float(v) for v in self.reference)
        except (TypeError, ValueError):
            values = ()
        if len(values) != 2 or not (0 <= values[0] <= values[1] <= 255):
            raise ValueError(
                "reference must be 'median', 'volume' or two intensities (low, high) with "
                f"0 <= low <= high <= 255; got {self.reference!r}."
            )
        return values

    def _check_params(self):
        self._validate_params()
        if self.method == "percentile":
            self._percentiles()
            self._fixed_reference()

    def fit(self, X, y=None):
        """Learn the reference intensities from the slices of `X`.

        Parameters
        ----------
        X : array or list of arrays
            uint8 image (Y, X), volume (Z, Y, X), or a list of them (NumPy,
            zarr or dask). zarr and dask inputs are read once, slab by slab.
        y : ignored
            Present for pipelines; when given, its shape is checked against `X`.

        Returns
        -------
        self : SliceEqualizer
            The fitted estimator.
        """
        self._check_params()
        volumes, is_list = intensity_volumes(X)
        check_targets(y, volumes, is_list)
        self.n_slices_fit_ = int(sum(volume.shape[0] for volume in volumes))
        self.reference_ = None
        self.slice_percentiles_ = None
        if self.method != "percentile":
            return self
        hists = np.concatenate([self._histograms(volume) for volume in volumes])
        percentiles = self._percentiles()
        per_slice = slice_percentiles(hists, percentiles)
        fixed = self._fixed_reference()
        if fixed is not None:
            reference = np.array(fixed, dtype=np.float64)
        elif self.reference == "median":
            reference = np.median(per_slice, axis=0).astype(np.float64)
        else:
            reference = slice_percentiles(hists.sum(axis=0), percentiles)[0].astype(np.float64)
        self.reference_ = reference
        self.slice_percentiles_ = per_slice
        return self

    @staticmethod
    def _histograms(volume):
        """(Z, 256) slice histograms, read one slab of whole planes at a time."""
        depth = volume.slab_depth(1)
        parts = []
        for group in volume.slabs(depth):
            parts.append(slice_histograms(CPU, volume.read(int(group[0]), int(group[-1]) + 1)))
        return np.concatenate(parts)

    def transform(self, X):
        """Equalise every slice of `X`.

        Parameters
        ----------
        X : array or list of arrays
            uint8 image (Y, X), volume (Z, Y, X), or a list of them; NumPy,
            zarr or dask.

        Returns
        -------
        equalised : array or list of arrays, uint8
            Same shape as `X`; NumPy in gives NumPy out, zarr or dask in a
            lazy dask array, a list a list.
        """
        check_is_fitted(self)
        self._check_params()
        volumes, is_list = intensity_volumes(X)
        if self.method in (None, "passthrough"):
            return map_volumes(passthrough, volumes, is_list)
        if self.method == "percentile":
            if self.reference_ is None:
                raise ValueError(
                    "This SliceEqualizer was fitted with another method; fit it again after "
                    "setting method='percentile'."
                )
            kernel = _PercentileKernel(self._percentiles(), tuple(float(r) for r in self.reference_))
        else:
            kernel = _ClaheKernel(self.kernel_size, float(self.clip_limit))
        return map_volumes(lambda volume: apply_per_slab(volume, kernel), volumes, is_list)


# Documented, pickled and named in model files as nanoseg.preprocessing.SliceEqualizer.
SliceEqualizer.__module__ = "nanoseg.preprocessing"
