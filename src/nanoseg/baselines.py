"""Baseline segmenters: one global intensity threshold for the whole input."""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np
from skimage.filters import threshold_li, threshold_multiotsu, threshold_otsu
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._backend import CPU
from ._base import VolumeEstimatorMixin, map_volumes
from ._model import N_BINS
from ._ops.histogram import histogram as _histogram
from ._validation import check_intensity_volume, check_targets
from ._volume import as_volumes

__all__ = ["GlobalThreshold"]


def _tile_maxima(image, tile_size):
    """Maximum of every ``tile_size`` x ``tile_size`` tile of a 2D image.

    Tiles do not overlap; the last row and column of tiles may be smaller
    (partial edge tiles are kept).
    """
    rows = np.arange(0, image.shape[0], tile_size)
    cols = np.arange(0, image.shape[1], tile_size)
    return np.maximum.reduceat(np.maximum.reduceat(image, rows, axis=0), cols, axis=1)


class GlobalThreshold(VolumeEstimatorMixin, TransformerMixin, BaseEstimator):
    """One global intensity threshold: a baseline for the mixture step.

    `fit` learns a single intensity threshold from all of `X` -- the pooled
    intensities of every crop, or of the whole volume -- and `transform`
    marks the voxels brighter than it. The output is a float32 map of 0.0
    and 1.0, so that it can take the place of
    :class:`~nanoseg.NanoparticleMixture` in front of
    :class:`~nanoseg.NanoparticleLabeler` (any labeler threshold in (0, 1]
    keeps exactly the marked voxels).

    Parameters
    ----------
    method : {"fixed", "otsu", "li", "multiotsu", "tile_maxima"}, default="otsu"
        How the threshold is chosen:

        - "fixed": `threshold`, nothing is learned from the data;
        - "otsu": Otsu's method on the pooled 256-bin histogram
          (:func:`skimage.filters.threshold_otsu`);
        - "li": Li's minimum cross-entropy method on the pooled intensities
          (:func:`skimage.filters.threshold_li`), rounded down to an integer;
        - "multiotsu": multi-level Otsu on the pooled histogram
          (:func:`skimage.filters.threshold_multiotsu`) with `classes`
          classes; the foreground is the brightest class, so the highest of
          the thresholds is used;
        - "tile_maxima": the histogram of tile maxima, see Notes.
    threshold : int, default=128
        Intensity threshold of the "fixed" method, from 0 to 255.
    classes : int, default=3
        Number of classes of the "multiotsu" method (at least 3).
    tile_size : int, default=32
        Side in pixels of the square tiles of the "tile_maxima" method.
    tile_factor : float, default=1.2
        Factor applied to the most common tile maximum by the "tile_maxima"
        method.
    polarity : {"bright", "dark"}, default="bright"
        "bright" for particles brighter than the background. "dark" for
        particles darker than the background: intensities ``v`` are replaced
        by ``255 - v`` before anything else, so the threshold, the histogram
        and the "fixed" `threshold` all refer to inverted intensities.

    Attributes
    ----------
    threshold_ : int
        The learned threshold: voxels of (possibly inverted) intensity
        strictly above it are foreground.
    histogram_ : ndarray of shape (256,), int64
        Pooled intensity counts of `X` (after inversion for "dark").

    See Also
    --------
    NanoparticleMixture : The model-based step this baseline replaces.
    NanoparticleLabeler : Turns the output into labelled particles.

    Notes
    -----
    **Foreground convention.** A voxel is foreground when its intensity is
    strictly greater than `threshold_`, as for
    :func:`skimage.filters.threshold_otsu`. The thresholds of Otsu and
    multi-level Otsu are intensities of the input, the last one of the lower
    class; Li's threshold is a real number ``t`` and ``floor(t)`` selects the
    same integer intensities.

    **Histogram of tile maxima.** Every 2D slice is cut into non-overlapping
    `tile_size` x `tile_size` tiles (the tiles at the right and bottom edges
    may be smaller and are counted too), and the maximum intensity of each
    tile is taken. Particles are small and sparse, so most tiles hold only
    background and their maxima pile up around the brightest background
    noise. The most common tile maximum ``A`` (the lowest one on ties) thus
    describes the background's upper end; the threshold is set just beyond
    it, at ``min(255, round(tile_factor * A))`` (halves rounded up), which
    background tiles rarely exceed but particles do.

    **Input conventions.** `X` is a uint8 2D image (Y, X), 3D volume
    (Z, Y, X), or a list of them (crops), held in memory as NumPy arrays.
    zarr and dask inputs are not supported by the baselines.

    **16-bit data.** The baseline works on 8-bit intensities only: its
    `threshold`, `threshold_` and `histogram_` are on the 0-255 scale, and the
    "multiotsu" method would be far too slow on 65,536 grey levels. uint16
    input raises a :class:`TypeError` that says how to map it to 8 bits with
    one rule for the whole volume, e.g.
    ``skimage.exposure.rescale_intensity(X, in_range=(low, high),
    out_range=np.uint8)``. :class:`~nanoseg.NanoparticleMixture` takes uint16
    data directly (see its `binning` parameter).

    Examples
    --------
    >>> import numpy as np
    >>> from nanoseg.baselines import GlobalThreshold
    >>> image = np.full((4, 4), 10, dtype=np.uint8)
    >>> image[1:3, 1:3] = 200
    >>> baseline = GlobalThreshold(method="otsu").fit(image)
    >>> baseline.threshold_
    10
    >>> baseline.transform(image)
    array([[0., 0., 0., 0.],
           [0., 1., 1., 0.],
           [0., 1., 1., 0.],
           [0., 0., 0., 0.]], dtype=float32)
    """

    _parameter_constraints = {
        "method": [StrOptions({"fixed", "otsu", "li", "multiotsu", "tile_maxima"})],
        "threshold": [Interval(Integral, 0, 255, closed="both")],
        "classes": [Interval(Integral, 3, None, closed="left")],
        "tile_size": [Interval(Integral, 1, None, closed="left")],
        "tile_factor": [Interval(Real, 0, None, closed="neither")],
        "polarity": [StrOptions({"bright", "dark"})],
    }

    def __init__(
        self,
        *,
        method="otsu",
        threshold=128,
        classes=3,
        tile_size=32,
        tile_factor=1.2,
        polarity="bright",
    ):
        self.method = method
        self.threshold = threshold
        self.classes = classes
        self.tile_size = tile_size
        self.tile_factor = tile_factor
        self.polarity = polarity

    def _intensity_arrays(self, X):
        """Validated (and, for "dark", inverted) arrays, and whether X was a list."""
        volumes, is_list = as_volumes(X)
        for volume in volumes:
            if volume.kind != "numpy":
                raise TypeError(
                    f"{volume.name} is a {volume.kind} array, but baselines work on in-memory "
                    "arrays: load it first, e.g. with numpy.asarray."
                )
            check_intensity_volume(volume)
        arrays = [volume.array for volume in volumes]
        if self.polarity == "dark":
            arrays = [np.subtract(255, array, dtype=np.uint8) for array in arrays]
        return volumes, arrays, is_list

    def fit(self, X, y=None):
        """Learn the global threshold from all of `X`.

        Parameters
        ----------
        X : ndarray or list of ndarray
            uint8 image (Y, X), volume (Z, Y, X), or a list of them (crops).
        y : ignored
            Present for pipelines; when given, its shape is checked against `X`.

        Returns
        -------
        self : GlobalThreshold
            The fitted estimator.

        Raises
        ------
        TypeError
            If `X` is not uint8 (uint16 included, see Notes), or not held in
            memory.
        ValueError
            If `X` has too few distinct intensities for the "otsu", "li" or
            "multiotsu" method.
        """
        self._validate_params()
        volumes, arrays, is_list = self._intensity_arrays(X)
        check_targets(y, volumes, is_list)
        histogram = sum(_histogram(CPU, array) for array in arrays)
        present = np.flatnonzero(histogram)

        if self.method in ("otsu", "li", "multiotsu"):
            needed = self.classes if self.method == "multiotsu" else 2
            if present.size < needed:
                raise ValueError(
                    f"X has {present.size} distinct intensit{'y' if present.size == 1 else 'ies'} "
                    f"({', '.join(str(int(v)) for v in present)}), so method={self.method!r} cannot "
                    f"split it into {needed} classes: there is not enough contrast. Check that the "
                    "right array (and channel) was passed, or use method='fixed'."
                )

        if self.method == "fixed":
            threshold = int(self.threshold)
        elif self.method in ("otsu", "multiotsu"):
            # The histogram cut to the intensities present: what scikit-image
            # builds itself from the raw values.
            low, high = present[0], present[-1]
            hist = (histogram[low : high + 1], np.arange(low, high + 1))
            if self.method == "otsu":
                threshold = int(threshold_otsu(hist=hist))
            else:
                threshold = int(threshold_multiotsu(hist=hist, classes=self.classes)[-1])
        elif self.method == "li":
            values = np.concatenate([array.ravel() for array in arrays])
            threshold = math.floor(threshold_li(values))
        else:  # tile_maxima
            maxima = np.zeros(N_BINS, dtype=np.int64)
            for array in arrays:
                for image in array.reshape((-1, *array.shape[-2:])):
                    maxima += _histogram(CPU, _tile_maxima(image, self.tile_size))
            mode = int(np.argmax(maxima))
            threshold = min(255, math.floor(self.tile_factor * mode + 0.5))

        self.threshold_ = threshold
        self.histogram_ = histogram
        return self

    def transform(self, X):
        """Mark the voxels above the learned threshold.

        Parameters
        ----------
        X : ndarray or list of ndarray
            uint8 image, volume or list of them, as in :meth:`fit`.

        Returns
        -------
        mask : ndarray or list of ndarray, float32
            Same shape as `X`: 1.0 where the (for "dark", inverted) intensity
            is strictly above `threshold_`, 0.0 elsewhere. A list for a list
            input.
        """
        check_is_fitted(self)
        self._validate_params()
        _, arrays, is_list = self._intensity_arrays(X)
        return map_volumes(lambda array: (array > self.threshold_).astype(np.float32), arrays, is_list)
