"""Spatial context around the intensity mixture: pipeline steps and helpers.

The mixture looks at one voxel's intensity at a time. The steps here add what
the neighbourhood knows, as scikit-learn transformers that slot into a
:class:`~sklearn.pipeline.Pipeline` and whose parameters can be searched:

* before :class:`~nanoseg.NanoparticleMixture`, on uint8 intensities (uint8
  out): :class:`SliceEqualizer` removes slice-to-slice brightness drift and
  :class:`BackgroundSubtractor` removes slowly varying background;
* between the mixture and :class:`~nanoseg.NanoparticleLabeler`, on the
  posterior: :class:`PosteriorSmoother` smooths it in logit space and can
  average it over blocks (for example to isotropic voxels);
* :func:`upsample` and :func:`full_resolution_scorer` bring results computed
  on a downsampled grid back to the grid of the input and its annotations.

Every step takes NumPy arrays (processed in memory, NumPy out), zarr or dask
arrays (lazy dask out, never loaded whole) and lists of them (crops; a list
out).
"""

from __future__ import annotations

import itertools
import math
from numbers import Integral, Real

import numpy as np
from scipy import ndimage as ndi
from scipy.special import expit
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from . import _kernels
from ._backend import CPU
from ._base import VolumeEstimatorMixin, map_volumes
from ._engine.overlap import map_overlap
from ._labeling import check_probabilities
from ._model import N_BINS
from ._volume import as_volumes, check_targets, is_lazy
from .mixture import check_intensity_volume

__all__ = [
    "SliceEqualizer",
    "BackgroundSubtractor",
    "PosteriorSmoother",
    "upsample",
    "full_resolution_scorer",
]


# ---------------------------------------------------------------------------
# per-axis parameters
# ---------------------------------------------------------------------------


def _per_axis(value, ndim, name):
    """`value` (a scalar, or one entry per axis) as a tuple of `ndim` floats.

    A 2D input takes the last two entries of a 3-entry (z, y, x) value, so
    one setting serves volumes and single images alike.
    """
    values = np.atleast_1d(np.asarray(value, dtype=float))
    if values.ndim != 1 or values.size not in (1, 2, 3):
        raise ValueError(
            f"{name} must be a number or one number per axis, (z, y, x) or (y, x); got {value!r}."
        )
    if values.size == 1:
        return (float(values[0]),) * ndim
    if values.size == ndim:
        return tuple(float(v) for v in values)
    if values.size == 3 and ndim == 2:
        return tuple(float(v) for v in values[1:])
    raise ValueError(
        f"{name}={value!r} has 2 entries (y, x), but the input is 3D: give one number or "
        "three (z, y, x)."
    )


def _to_3d(values, ndim, fill):
    """Per-axis values of a 2D input, with `fill` for the added leading axis."""
    return tuple(values) if ndim == 3 else (fill, *values)


def _nonnegative(values, name, value):
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"{name} must be finite and >= 0 on every axis; got {value!r}.")
    return values


# ---------------------------------------------------------------------------
# lazy plumbing
# ---------------------------------------------------------------------------


def _whole_planes(volume):
    """The volume as a 3D dask array whose blocks hold whole (Y, X) planes.

    Per-slice steps need a slice's every pixel (its percentiles, its median),
    and the package reads whole planes anyway; the chunking along Z is kept.
    """
    return volume.to_dask().rechunk({1: -1, 2: -1})


def _meta(dtype):
    return np.empty((0, 0, 0), dtype=dtype)


# ---------------------------------------------------------------------------
# PosteriorSmoother
# ---------------------------------------------------------------------------


def _check_posterior_volume(volume):
    """Raise a clear error unless `volume` can hold probabilities."""
    if volume.dtype.kind != "f":
        hint = (
            " Convert a mask with mask.astype(numpy.float32) first."
            if volume.dtype == bool
            else " Pass the output of NanoparticleMixture.transform, not the raw image."
        )
        raise TypeError(
            f"{volume.name} must be a posterior probability map (float in [0, 1]); got "
            f"{volume.dtype}.{hint}"
        )
    if not is_lazy(volume.array):
        check_probabilities(volume.read(0, volume.shape[0]), volume.name)


def _smooth_logit(block, sigma, clip, truncate, check, name="X"):
    """Gaussian of the clipped logit, back through the sigmoid (float64).

    The logit is taken in float64 so that probabilities near the clip bounds
    keep their precision.
    """
    if check:
        check_probabilities(block, name)
    p = np.clip(block.astype(np.float64), clip, 1.0 - clip)
    logit = np.log(p) - np.log1p(-p)
    if any(s > 0 for s in sigma):
        logit = ndi.gaussian_filter(logit, sigma, mode="reflect", truncate=truncate)
    return expit(logit)


def _gaussian_depth(sigma, truncate):
    """Half-width of scipy's Gaussian kernel along each axis."""
    return tuple(int(truncate * s + 0.5) if s > 0 else 0 for s in sigma)


def _block_mean(array, factors, dtype):
    """Mean over non-overlapping blocks of `factors` voxels; partial edge blocks
    are averaged over the voxels they hold.

    The block's voxels are added in a fixed order, so that any chunking whose
    chunk edges fall on block edges gives bit-identical means.
    """
    out_shape = tuple(-(-n // f) for n, f in zip(array.shape, factors))
    total = np.zeros(out_shape, dtype=np.float64)
    for offsets in itertools.product(*(range(f) for f in factors)):
        part = array[tuple(slice(o, None, f) for o, f in zip(offsets, factors))]
        total[tuple(slice(0, s) for s in part.shape)] += part
    count = np.ones(out_shape, dtype=np.float64)
    for axis, (n, f) in enumerate(zip(array.shape, factors)):
        per_block = np.minimum(f, n - f * np.arange(out_shape[axis])).astype(np.float64)
        count = count * per_block.reshape([-1 if a == axis else 1 for a in range(array.ndim)])
    return (total / count).astype(dtype)


def _trimmed(array, factors):
    """`array` cut to whole blocks along every axis."""
    return array[tuple(slice(0, (n // f) * f) for n, f in zip(array.shape, factors))]


def _lazy_block_mean(array, factors, dtype):
    """:func:`_block_mean` of a dask array, one task per aligned chunk."""
    chunks = []
    for axis, f in enumerate(factors):
        size = max(array.chunks[axis])
        chunks.append(max(f, (size // f) * f))
    array = array.rechunk(tuple(chunks))
    out_chunks = tuple(
        tuple(-(-c // f) for c in array.chunks[axis]) for axis, f in enumerate(factors)
    )
    return array.map_blocks(_block_mean, factors, dtype, dtype=dtype, chunks=out_chunks, meta=_meta(dtype))


class PosteriorSmoother(VolumeEstimatorMixin, TransformerMixin, BaseEstimator):
    """Smooth a posterior map in logit space, optionally averaging over blocks.

    The posterior is clipped to ``[clip, 1 - clip]``, mapped to log-odds
    ``log(p / (1 - p))``, filtered with a Gaussian of standard deviation
    `sigma` voxels per axis, and mapped back through the sigmoid. A voxel
    whose neighbours agree thus becomes more certain, while an isolated
    bright voxel -- noise -- loses confidence. With `downsample` (or
    `spacing` and `target_spacing`), the smoothed posterior is then averaged
    over non-overlapping blocks, for example from 50 x 10 x 10 nm voxels to
    isotropic 50 x 50 x 50 nm voxels, where a ball-shaped closing and a voxel
    count mean the same in every direction.

    The smoother is stateless: `fit` only validates, and `transform` may be
    called without it.

    Parameters
    ----------
    sigma : float or sequence of float, default=(0.5, 1.5, 1.5)
        Standard deviation of the Gaussian in voxels, one number for all axes
        or one per axis (z, y, x). 0 on an axis means no smoothing along it;
        0 everywhere leaves only the clipping. A 2D image uses the last two
        entries of a 3-entry value, or a 2-entry (y, x) value.
    clip : float, default=1e-5
        Probabilities are clipped to ``[clip, 1 - clip]`` before the logit,
        which bounds the log-odds (about +-11.5 for the default) so that a
        single certain voxel cannot dominate its neighbourhood. In (0, 0.5).
    downsample : int or sequence of int, default=None
        Block size in voxels, per axis (z, y, x) or one for all axes, e.g.
        ``(1, 5, 5)``: each output voxel is the mean of a block of the
        smoothed posterior. None (and all ones) keeps the input grid.
    spacing : float or sequence of float, default=None
        Voxel size of the input (z, y, x), in physical units; used with
        `target_spacing` to derive the block size.
    target_spacing : float or sequence of float, default=None
        Voxel size wanted after downsampling, in the units of `spacing`. The
        block size along each axis is ``target_spacing / spacing``, which
        must be a whole number of at least 1. Give either `downsample` or
        `spacing` and `target_spacing`, not both.
    truncate : float, default=4.0
        The Gaussian is cut at this many standard deviations, as in
        :func:`scipy.ndimage.gaussian_filter`; it also sets how much
        neighbouring data each chunk of a lazy input reads.
    trim_excess : bool, default=False
        How axes that are not a multiple of the block size are treated: by
        default the last, partial block of each axis is averaged over the
        voxels it holds, so nothing is dropped and the output has
        ``ceil(n / factor)`` voxels along an axis of `n`. With True the
        partial blocks are dropped (``n // factor`` voxels, as
        ``dask.array.coarsen(..., trim_excess=True)``).
    output_dtype : {"float32", "float16", "float64"}, default="float32"
        dtype of the output. The computation is done in float64.

    See Also
    --------
    upsample : Map results on the downsampled grid back to the input grid.
    full_resolution_scorer : Score a downsampling pipeline against
        full-resolution annotations.
    NanoparticleMixture : Produces the posterior.
    NanoparticleLabeler : Labels the smoothed posterior.

    Notes
    -----
    **Defaults.** `sigma` and `clip` are those of the published pipeline
    (0.5 voxel along z and 1.5 voxels in plane, for 50 x 10 x 10 nm voxels),
    which also averages to 50 x 50 x 50 nm blocks before labelling. Here
    downsampling is off by default because it changes the output's shape:
    the labels then no longer overlay the image nor its annotations, and the
    labeler's `radius` and `min_size` refer to the coarser voxels (a
    `min_size` of 10 coarse voxels is 250 fine ones). Turn it on with
    ``downsample=(1, 5, 5)``, or with ``spacing=(50, 10, 10),
    target_spacing=50``, and map the labels back with :func:`upsample`.

    **Mapping labels back.** An output voxel ``(k, j, i)`` covers the input
    voxels ``(k * fz ... k * fz + fz - 1, ...)`` for block size
    ``(fz, fy, fx)``. :func:`upsample` (or the method :meth:`upsample`)
    repeats every output voxel over its block and cuts the result to the
    input's shape; with ``trim_excess=True`` the dropped edge voxels come
    back as 0 (background).

    **Lazy inputs.** For zarr and dask inputs the smoothing runs chunk by
    chunk with :func:`dask.array.map_overlap`, each chunk reading a margin of
    ``int(truncate * sigma + 0.5)`` voxels per axis from its neighbours (the
    Gaussian's own half-width), and the block means run on chunks aligned to
    the blocks; the result equals the in-memory one exactly. Values outside
    [0, 1] or NaN are reported when the result is computed. NumPy inputs are
    processed whole in float64, about three times the input's size in
    float64 of working memory: pass a zarr or dask array for volumes that do
    not fit that.

    Examples
    --------
    >>> import numpy as np
    >>> from nanoseg.preprocessing import PosteriorSmoother
    >>> posterior = np.full((3, 10, 10), 0.01, dtype=np.float32)
    >>> posterior[:, 3:7, 3:7] = 0.99          # a confident 4 x 4 particle
    >>> posterior[1, 0, 0] = 0.99              # an isolated bright voxel
    >>> smoothed = PosteriorSmoother().transform(posterior)
    >>> bool(smoothed[1, 5, 5] > 0.5), bool(smoothed[1, 0, 0] < 0.5)
    (True, True)

    Averaging over 1 x 5 x 5 blocks, and back to the input grid:

    >>> smoother = PosteriorSmoother(spacing=(50, 10, 10), target_spacing=50)
    >>> smoother.block_factors()
    (1, 5, 5)
    >>> coarse = smoother.transform(posterior)
    >>> coarse.shape
    (3, 2, 2)
    >>> smoother.upsample(coarse > 0.5, posterior.shape).shape
    (3, 10, 10)
    """

    _parameter_constraints = {
        "sigma": [Interval(Real, 0, None, closed="left"), "array-like"],
        "clip": [Interval(Real, 0, 0.5, closed="neither")],
        "downsample": [None, Interval(Integral, 1, None, closed="left"), "array-like"],
        "spacing": [None, Interval(Real, 0, None, closed="neither"), "array-like"],
        "target_spacing": [None, Interval(Real, 0, None, closed="neither"), "array-like"],
        "truncate": [Interval(Real, 0, None, closed="neither")],
        "trim_excess": ["boolean"],
        "output_dtype": [StrOptions({"float32", "float16", "float64"})],
    }

    def __init__(
        self,
        *,
        sigma=(0.5, 1.5, 1.5),
        clip=1e-5,
        downsample=None,
        spacing=None,
        target_spacing=None,
        truncate=4.0,
        trim_excess=False,
        output_dtype="float32",
    ):
        self.sigma = sigma
        self.clip = clip
        self.downsample = downsample
        self.spacing = spacing
        self.target_spacing = target_spacing
        self.truncate = truncate
        self.trim_excess = trim_excess
        self.output_dtype = output_dtype

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        return tags

    # -- parameters -------------------------------------------------------
    def _sigma(self, ndim):
        return _nonnegative(_per_axis(self.sigma, ndim, "sigma"), "sigma", self.sigma)

    def block_factors(self, ndim=3):
        """Block size of the downsampling along each axis.

        Parameters
        ----------
        ndim : {3, 2}
            Dimensionality of the input the factors are for.

        Returns
        -------
        factors : tuple of int
            One integer >= 1 per axis, all ones without downsampling.

        Raises
        ------
        ValueError
            If the downsampling parameters are inconsistent, or
            ``target_spacing / spacing`` is not a whole number >= 1.
        """
        self._validate_params()
        if self.target_spacing is not None or (self.spacing is not None and self.downsample is None):
            if self.downsample is not None:
                raise ValueError(
                    "Give either downsample (block sizes) or spacing and target_spacing, not both."
                )
            if self.target_spacing is None:
                return (1,) * ndim
            if self.spacing is None:
                raise ValueError(
                    "target_spacing needs spacing, the voxel size of the input (z, y, x), to "
                    "derive the block sizes; or give the block sizes as downsample=(fz, fy, fx)."
                )
            spacing = _per_axis(self.spacing, ndim, "spacing")
            target = _per_axis(self.target_spacing, ndim, "target_spacing")
            factors = []
            for s, t in zip(spacing, target):
                ratio = t / s
                factor = round(ratio)
                if factor < 1 or abs(ratio - factor) > 1e-6 * max(ratio, 1.0):
                    raise ValueError(
                        f"target_spacing={self.target_spacing!r} is not a whole multiple (>= 1) of "
                        f"spacing={self.spacing!r} on every axis ({t:g} / {s:g} = {ratio:g}); block "
                        "means need an integer number of input voxels per output voxel."
                    )
                factors.append(int(factor))
            return tuple(factors)
        if self.downsample is None:
            return (1,) * ndim
        values = _per_axis(self.downsample, ndim, "downsample")
        if not all(v >= 1 and v == int(v) for v in values):
            raise ValueError(
                f"downsample must hold integer block sizes >= 1, one per axis (z, y, x); got "
                f"{self.downsample!r}."
            )
        return tuple(int(v) for v in values)

    def _check_params(self):
        # Per-axis values are checked against each input's dimensionality.
        self._validate_params()

    def _posterior_volumes(self, X):
        self._check_params()
        volumes, is_list = as_volumes(X)
        for volume in volumes:
            _check_posterior_volume(volume)
            ndim = 2 if volume.is_2d else 3
            self._sigma(ndim)
            factors = self.block_factors(ndim)
            if self.trim_excess:
                short = [
                    (n, f)
                    for n, f in zip(volume.shape[-ndim:], factors)
                    if n < f
                ]
                if short:
                    n, f = short[0]
                    raise ValueError(
                        f"{volume.name} has an axis of {n} voxel(s), shorter than its block size {f}: "
                        "with trim_excess=True nothing would be left. Use trim_excess=False or "
                        "smaller blocks."
                    )
        return volumes, is_list

    # -- estimator API ----------------------------------------------------
    def fit(self, X, y=None):
        """Validate the parameters and `X`; nothing is learned.

        Parameters
        ----------
        X : array or list of arrays
            Posterior maps, float in [0, 1], (Y, X) or (Z, Y, X).
        y : ignored
            Present for pipelines; when given, its shape is checked against `X`.

        Returns
        -------
        self : PosteriorSmoother
        """
        volumes, is_list = self._posterior_volumes(X)
        check_targets(y, volumes, is_list)
        return self

    def transform(self, X):
        """Smooth (and, if asked, downsample) the posterior `X`.

        Parameters
        ----------
        X : array or list of arrays
            Posterior maps, float in [0, 1] without NaN, (Y, X) or (Z, Y, X),
            NumPy, zarr or dask.

        Returns
        -------
        posterior : array or list of arrays, of dtype `output_dtype`
            Same shape as `X`, or the downsampled shape (see the Notes).
            NumPy in gives NumPy out; zarr or dask in gives a lazy dask
            array. A list gives a list.
        """
        return map_volumes(self._smooth, *self._posterior_volumes(X))

    def _smooth(self, volume):
        ndim = 2 if volume.is_2d else 3
        sigma = _to_3d(self._sigma(ndim), ndim, 0.0)
        factors = _to_3d(self.block_factors(ndim), ndim, 1)
        dtype = np.dtype(self.output_dtype)
        downsampling = any(f > 1 for f in factors)
        clip, truncate = float(self.clip), float(self.truncate)
        if not is_lazy(volume.array):
            data = volume.read(0, volume.shape[0])  # validated whole in _check_posterior_volume
            smoothed = _smooth_logit(data, sigma, clip, truncate, check=False)
            if downsampling:
                if self.trim_excess:
                    smoothed = _trimmed(smoothed, factors)
                smoothed = _block_mean(smoothed, factors, dtype)
            return volume.restore(smoothed.astype(dtype, copy=False))

        work_dtype = np.float64 if downsampling else dtype
        smoothed = map_overlap(
            lambda block: _smooth_logit(block, sigma, clip, truncate, True, volume.name).astype(work_dtype),
            volume.to_dask(),
            _gaussian_depth(sigma, truncate),
            work_dtype,
        )
        if downsampling:
            if self.trim_excess:
                smoothed = _trimmed(smoothed, factors)
            smoothed = _lazy_block_mean(smoothed, factors, dtype)
        return volume.restore(smoothed)

    def upsample(self, labels, shape):
        """Bring a result on this smoother's block grid back to the input grid.

        Parameters
        ----------
        labels : array or list of arrays
            Labels (or any map) computed on the output of :meth:`transform`.
        shape : tuple of int, or list of them
            Shape of the input that was smoothed (one per array for a list).

        Returns
        -------
        upsampled : array or list of arrays
            See :func:`upsample`.
        """
        if isinstance(labels, (list, tuple)):
            return [self.upsample(part, s) for part, s in zip(labels, shape, strict=True)]
        return upsample(labels, self.block_factors(len(shape)), shape)


def upsample(labels, factors, shape):
    """Repeat every voxel over its block and cut the result to `shape`.

    The inverse of block averaging as far as the grid goes: an output
    voxel's block gets its value. Use it to overlay labels computed on a
    downsampled posterior (see :class:`PosteriorSmoother`) on the image or
    on full-resolution annotations.

    Parameters
    ----------
    labels : ndarray or dask array
        2D or 3D array on the block grid (any dtype).
    factors : int or sequence of int
        Block size per axis, as in :meth:`PosteriorSmoother.block_factors`.
    shape : tuple of int
        Shape of the full-resolution grid: along each axis of `n` blocks it
        must lie within ``(n - 1) * factor + 1`` and ``(n + 1) * factor - 1``
        voxels. Voxels beyond the repeated blocks (left over by
        ``trim_excess=True``) are set to 0.

    Returns
    -------
    upsampled : ndarray or dask array
        Of shape `shape` and the dtype of `labels`; lazy for a dask input.

    Raises
    ------
    ValueError
        If `shape` cannot come from the shape of `labels` with `factors`.

    See Also
    --------
    PosteriorSmoother.upsample : The same with the smoother's block sizes.

    Examples
    --------
    >>> import numpy as np
    >>> from nanoseg.preprocessing import upsample
    >>> upsample(np.array([[1, 2], [3, 0]], dtype=np.uint32), (2, 3), (4, 5))
    array([[1, 1, 1, 2, 2],
           [1, 1, 1, 2, 2],
           [3, 3, 3, 0, 0],
           [3, 3, 3, 0, 0]], dtype=uint32)
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(labels.shape)
    if len(shape) != ndim:
        raise ValueError(
            f"shape {shape} has {len(shape)} axes but labels of shape {tuple(labels.shape)} have {ndim}."
        )
    factors = _per_axis(factors, ndim, "factors")
    if not all(f >= 1 and f == int(f) for f in factors):
        raise ValueError(f"factors must be integers >= 1; got {factors!r}.")
    factors = tuple(int(f) for f in factors)
    for n, f, m in zip(labels.shape, factors, shape):
        if not (n - 1) * f < m < (n + 1) * f:
            raise ValueError(
                f"labels of shape {tuple(labels.shape)} with block sizes {factors} cannot come from a "
                f"grid of shape {shape}: each axis of n blocks covers between (n - 1) * factor + 1 "
                "and (n + 1) * factor - 1 voxels. Check the shape and the smoother's block sizes."
            )
    if is_lazy(labels):
        import dask.array as da

        if not hasattr(labels, "dask"):
            labels = da.from_zarr(labels)
        xp = da
    else:
        labels = np.asarray(labels)
        xp = np
    out = labels
    for axis, f in enumerate(factors):
        if f > 1:
            out = xp.repeat(out, f, axis=axis)
    out = out[tuple(slice(0, m) for m in shape)]
    missing = [(0, m - s) for m, s in zip(shape, out.shape)]
    if any(after for _, after in missing):
        out = xp.pad(out, missing, mode="constant", constant_values=0)
    return out


def _smoothers(estimator):
    """The PosteriorSmoother steps of an estimator or (nested) pipeline."""
    if isinstance(estimator, PosteriorSmoother):
        return [estimator]
    found = []
    for _, step in getattr(estimator, "steps", []):
        if step is not None and step != "passthrough":
            found.extend(_smoothers(step))
    return found


class _Precomputed:
    """Stands in for an estimator whose output is already known."""

    def __init__(self, output):
        self.output = output

    def transform(self, X):
        return self.output


class _FullResolutionScorer:
    """See :func:`full_resolution_scorer`."""

    def __init__(self, scorer):
        self.scorer = scorer

    def __call__(self, estimator, X, y):
        output = estimator.transform(X)
        smoothers = _smoothers(estimator)
        is_list = isinstance(output, (list, tuple))
        outputs, targets = (list(output), list(y)) if is_list else ([output], [y])
        restored = []
        for out, target in zip(outputs, targets, strict=True):
            shape = tuple(int(s) for s in np.shape(target))
            out = np.asarray(out)
            if out.shape != shape:
                factors = np.ones(len(shape), dtype=int)
                for smoother in smoothers:
                    factors = factors * np.array(smoother.block_factors(len(shape)))
                out = upsample(out, tuple(int(f) for f in factors), shape)
            restored.append(out)
        return self.scorer(_Precomputed(restored if is_list else restored[0]), X, y)

    def __repr__(self):
        return f"full_resolution_scorer({self.scorer!r})"


def full_resolution_scorer(scorer):
    """Wrap a scorer so that it scores downsampled labels at full resolution.

    A pipeline whose :class:`PosteriorSmoother` downsamples returns labels on
    the block grid, which annotations on the input grid cannot be compared
    with. The wrapped scorer runs ``estimator.transform(X)``, upsamples every
    output whose shape differs from its annotation with the block sizes of
    the estimator's smoothers (see :func:`upsample`), and hands the result
    to `scorer`.

    Parameters
    ----------
    scorer : callable
        ``scorer(estimator, X, y) -> float`` that calls
        ``estimator.transform(X)``, such as
        :data:`nanoseg.metrics.object_f1_scorer`.

    Returns
    -------
    scorer : callable
        ``scorer(estimator, X, y) -> float``, picklable when `scorer` is.

    See Also
    --------
    upsample : How labels are brought back to the input grid.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.pipeline import Pipeline
    >>> from nanoseg import NanoparticleLabeler
    >>> from nanoseg.metrics import object_f1_scorer
    >>> from nanoseg.preprocessing import PosteriorSmoother, full_resolution_scorer
    >>> posterior = np.zeros((2, 20, 20), dtype=np.float32)
    >>> posterior[:, 5:10, 5:10] = 1.0
    >>> truth = posterior > 0.5
    >>> pipe = Pipeline([
    ...     ("smooth", PosteriorSmoother(sigma=0, downsample=(1, 5, 5))),
    ...     ("labeler", NanoparticleLabeler(min_size=1)),
    ... ])
    >>> pipe.transform(posterior).shape
    (2, 4, 4)
    >>> full_resolution_scorer(object_f1_scorer)(pipe, posterior, truth)
    1.0
    """
    if not callable(scorer):
        raise TypeError(f"scorer must be a callable scorer(estimator, X, y); got {type(scorer).__name__}.")
    return _FullResolutionScorer(scorer)


# ---------------------------------------------------------------------------
# shared by the intensity steps
# ---------------------------------------------------------------------------


def _intensity_volumes(X):
    volumes, is_list = as_volumes(X)
    for volume in volumes:
        check_intensity_volume(volume)
    return volumes, is_list


def _apply_per_slab(volume, function, depth=0):
    """Run ``function((n, Y, X) uint8) -> (n, Y, X) uint8`` over a volume.

    In memory the whole volume is one slab. Lazy volumes are cut into chunks
    of whole planes; with `depth`, each chunk reads `depth` planes of its
    neighbours along Z (for 3D filters) that are trimmed from its result.
    """
    if not is_lazy(volume.array):
        return volume.restore(function(volume.read(0, volume.shape[0])))
    return volume.restore(map_overlap(function, _whole_planes(volume), (depth, 0, 0), np.uint8))


def _passthrough(volume):
    if is_lazy(volume.array):
        return volume.restore(volume.to_dask())
    return volume.array


def _to_uint8(values):
    """Round and clip to 0-255."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _slice_percentiles(hists, percentiles):
    """Inverted-CDF percentiles of 256-bin histograms, shape (n, len(percentiles)).

    The value of a percentile ``q`` is the smallest intensity ``v`` with at
    least ``ceil(q / 100 * count)`` (and at least one) voxels at or below
    it -- :func:`numpy.percentile` with ``method="inverted_cdf"``, read off
    the histogram: exact for uint8 data.
    """
    hists = np.atleast_2d(hists)
    cumulative = np.cumsum(hists, axis=1)
    totals = cumulative[:, -1]
    out = np.empty((hists.shape[0], len(percentiles)), dtype=np.int64)
    for j, q in enumerate(percentiles):
        needed = np.maximum(np.ceil(totals * (q / 100.0)), 1)
        out[:, j] = np.argmax(cumulative >= needed[:, None], axis=1)
    return out


# ---------------------------------------------------------------------------
# BackgroundSubtractor
# ---------------------------------------------------------------------------


def _ellipsoid(radii):
    """Boolean footprint: voxels within the ellipsoid of semi-axes `radii`
    (an axis of radius below 1 is one voxel thick)."""
    half = [int(math.floor(r)) for r in radii]
    grids = np.meshgrid(*[np.arange(-h, h + 1) for h in half], indexing="ij")
    inside = np.zeros(grids[0].shape, dtype=np.float64)
    for grid, r in zip(grids, radii):
        if r >= 1:
            inside += (grid / r) ** 2
    return inside <= 1.0


def _rolling_ball_kernel(radii):
    """Ball kernel (isotropic radii) or ellipsoid kernel of the rolling ball."""
    from skimage.restoration import ball_kernel, ellipsoid_kernel

    if len(set(radii)) == 1:
        return ball_kernel(radii[0], len(radii))
    semi = [max(1, int(round(r))) for r in radii]
    return ellipsoid_kernel([2 * s for s in semi], max(radii))


def _background_depth(method, radii):
    """Planes each side along Z that a 3D background estimate reads."""
    if method == "gaussian":
        return int(4.0 * radii[0] + 0.5) if radii[0] > 0 else 0
    if method == "tophat":
        # An opening is an erosion then a dilation: twice the footprint's reach.
        return 2 * (_ellipsoid(radii).shape[0] // 2)
    return _rolling_ball_kernel(radii).shape[0] // 2


def _subtract(image, method, radii, offset):
    """One image (2D, or 3D for whole-volume filters) minus its background."""
    if method == "tophat":
        from skimage.morphology import white_tophat

        difference = white_tophat(image, footprint=_ellipsoid(radii)).astype(np.float64)
    elif method == "rolling_ball":
        from skimage.restoration import rolling_ball

        difference = image.astype(np.float64) - rolling_ball(image, kernel=_rolling_ball_kernel(radii))
    else:  # gaussian
        image_f = image.astype(np.float64)
        difference = image_f - ndi.gaussian_filter(image_f, radii, mode="reflect")
    return difference + offset


def _slice_medians(stack):
    """Median intensity of every slice of a (n, Y, X) uint8 stack, shape (n,)."""
    return _slice_percentiles(_kernels.slice_histograms(CPU, stack), [50.0])[:, 0].astype(np.float64)


class _BackgroundKernel:
    """Picklable slab function of a :class:`BackgroundSubtractor`."""

    def __init__(self, method, radii, offset, per_slice):
        self.method, self.radii, self.offset, self.per_slice = method, radii, offset, per_slice

    def _offsets(self, stack):
        if self.offset is not None:
            return np.full(stack.shape[0], float(self.offset))
        if self.method == "gaussian":
            return _slice_medians(stack)
        return np.zeros(stack.shape[0])

    def __call__(self, stack):
        offsets = self._offsets(stack)
        if self.per_slice:
            out = np.empty(stack.shape, dtype=np.uint8)
            for i, image in enumerate(stack):
                out[i] = _to_uint8(_subtract(image, self.method, self.radii[1:], offsets[i]))
            return out
        return _to_uint8(_subtract(stack, self.method, self.radii, offsets[:, None, None]))


class BackgroundSubtractor(VolumeEstimatorMixin, TransformerMixin, BaseEstimator):
    """Remove slowly varying background so that small bright particles stand out.

    Uneven staining, charging and detector shading add a background that
    varies over distances much larger than a nanoparticle. This step
    estimates that background and subtracts it, on uint8 intensities, with
    uint8 out (rounded and clipped to 0-255), so that it can precede
    :class:`~nanoseg.NanoparticleMixture` in a pipeline.

    The step is stateless: `fit` only validates.

    Parameters
    ----------
    method : {"tophat", "rolling_ball", "gaussian", "passthrough"} or None, default="tophat"
        How the background is estimated:

        - "tophat": a white top-hat, the image minus its grey-level opening
          with a disk (ellipse, ellipsoid) of `radius` voxels
          (:func:`skimage.morphology.white_tophat`). Bright structures that
          the disk does not fit into are kept, everything larger is removed.
        - "rolling_ball": the image minus the background traced by a ball of
          `radius` rolled under the intensity surface
          (:func:`skimage.restoration.rolling_ball`).
        - "gaussian": the image minus its Gaussian blur of standard
          deviation `radius` voxels, re-offset (see `offset`).
        - "passthrough" or None: the input is returned unchanged, so that a
          grid search can switch the step off.
    radius : float or sequence of float, default=5
        Size of the structuring element in voxels: the disk's (or ball's)
        radius, or the Gaussian's standard deviation, one number for all
        axes or one per axis (z, y, x). It must exceed the radius of the
        largest particle (or cluster of touching particles), which would
        otherwise be taken for background. A 2D image (and per-slice
        processing) uses the last two entries of a 3-entry value.
    per_slice : bool, default=True
        Process a volume slice by slice (2D filters), as its slices were
        imaged. With False, a 3D filter is used: then give `radius` per axis
        for anisotropic voxels, e.g. ``(1, 5, 5)`` for 50 x 10 x 10 nm.
    offset : int, default=None
        Added to the result before clipping to 0-255. None means 0 for
        "tophat" and "rolling_ball", whose backgrounds lie below the image
        (results are >= 0), and each slice's median intensity for "gaussian",
        whose difference is centred on 0: the background then keeps its
        level and the noise on both sides of it instead of being clipped.

    See Also
    --------
    SliceEqualizer : Removes brightness changes between slices.
    NanoparticleMixture : The step this one prepares intensities for.

    Notes
    -----
    NumPy inputs are processed in memory; zarr and dask inputs lazily, one
    chunk of whole planes at a time (per slice, or with a margin of
    neighbouring planes along Z for 3D filters), and the result equals the
    in-memory one. Borders are handled as by the underlying filters (mirrored
    for "tophat" and "gaussian", ignored by "rolling_ball"); a background
    that rises towards a border is only partly removed within `radius` of
    it, because the disk cannot follow it there.

    The rolling ball's cost grows with the square (per slice) or cube (3D)
    of `radius`; the top-hat's and the Gaussian's grow more slowly.

    Examples
    --------
    >>> import numpy as np
    >>> from nanoseg.preprocessing import BackgroundSubtractor
    >>> image = np.tile(np.arange(40, 100, 2, dtype=np.uint8), (30, 1))  # a ramp
    >>> image[14:17, 14:17] += 80                                       # a particle
    >>> flat = BackgroundSubtractor(method="tophat", radius=5).transform(image)
    >>> int(flat[15, 15]), int(flat[:10, :20].max())
    (78, 0)
    """

    _parameter_constraints = {
        "method": [StrOptions({"tophat", "rolling_ball", "gaussian", "passthrough"}), None],
        "radius": [Interval(Real, 0, None, closed="neither"), "array-like"],
        "per_slice": ["boolean"],
        "offset": [None, Interval(Integral, 0, 255, closed="both")],
    }

    def __init__(self, *, method="tophat", radius=5, per_slice=True, offset=None):
        self.method = method
        self.radius = radius
        self.per_slice = per_slice
        self.offset = offset

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        return tags

    def _radii(self, ndim):
        radii = _per_axis(self.radius, ndim, "radius")
        if not all(math.isfinite(r) and r >= 0 for r in radii) or not any(r > 0 for r in radii):
            raise ValueError(
                f"radius must be finite and >= 0 on every axis, and > 0 on at least one; got "
                f"{self.radius!r}."
            )
        return radii

    def _volumes(self, X):
        self._validate_params()
        volumes, is_list = _intensity_volumes(X)
        if self.method not in (None, "passthrough"):
            for volume in volumes:
                self._radii(2 if volume.is_2d else 3)
        return volumes, is_list

    def fit(self, X, y=None):
        """Validate the parameters and `X`; nothing is learned.

        Parameters
        ----------
        X : array or list of arrays
            uint8 image (Y, X), volume (Z, Y, X), or a list of them.
        y : ignored
            Present for pipelines; when given, its shape is checked against `X`.

        Returns
        -------
        self : BackgroundSubtractor
        """
        volumes, is_list = self._volumes(X)
        check_targets(y, volumes, is_list)
        return self

    def transform(self, X):
        """Subtract the background from `X`.

        Parameters
        ----------
        X : array or list of arrays
            uint8 image (Y, X), volume (Z, Y, X), or a list of them; NumPy,
            zarr or dask.

        Returns
        -------
        flattened : array or list of arrays, uint8
            Same shape as `X`; NumPy in gives NumPy out, zarr or dask in a
            lazy dask array, a list a list.
        """
        return map_volumes(self._subtract_volume, *self._volumes(X))

    def _subtract_volume(self, volume):
        if self.method in (None, "passthrough"):
            return _passthrough(volume)
        ndim = 2 if volume.is_2d else 3
        radii = _to_3d(self._radii(ndim), ndim, 0.0)
        per_slice = bool(self.per_slice) or volume.is_2d
        kernel = _BackgroundKernel(self.method, radii, self.offset, per_slice)
        depth = 0 if per_slice else _background_depth(self.method, radii)
        return _apply_per_slab(volume, kernel, depth)


# ---------------------------------------------------------------------------
# SliceEqualizer
# ---------------------------------------------------------------------------


def _percentile_luts(lows_highs, reference):
    """(n, 256) uint8 tables mapping each slice's (low, high) to `reference`."""
    values = np.arange(N_BINS, dtype=np.float64)
    low, high = lows_highs[:, :1].astype(np.float64), lows_highs[:, 1:].astype(np.float64)
    ref_low, ref_high = reference
    span = high - low
    # A slice whose two percentiles coincide has no contrast to stretch: it is
    # only shifted.
    scale = np.where(span > 0, (ref_high - ref_low) / np.where(span > 0, span, 1.0), 1.0)
    return _to_uint8(ref_low + (values[None, :] - low) * scale)


class _PercentileKernel:
    """Picklable slab function: per-slice linear maps to the reference."""

    def __init__(self, percentiles, reference):
        self.percentiles, self.reference = percentiles, reference

    def __call__(self, stack):
        hists = _kernels.slice_histograms(CPU, stack)
        luts = _percentile_luts(_slice_percentiles(hists, self.percentiles), self.reference)
        return _kernels.apply_luts(CPU, np.ascontiguousarray(stack), luts)


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
            out[i] = _to_uint8(equalised * 255.0)
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
        volumes, is_list = _intensity_volumes(X)
        check_targets(y, volumes, is_list)
        self.n_slices_fit_ = int(sum(volume.shape[0] for volume in volumes))
        self.reference_ = None
        self.slice_percentiles_ = None
        if self.method != "percentile":
            return self
        hists = np.concatenate([self._histograms(volume) for volume in volumes])
        percentiles = self._percentiles()
        per_slice = _slice_percentiles(hists, percentiles)
        fixed = self._fixed_reference()
        if fixed is not None:
            reference = np.array(fixed, dtype=np.float64)
        elif self.reference == "median":
            reference = np.median(per_slice, axis=0).astype(np.float64)
        else:
            reference = _slice_percentiles(hists.sum(axis=0), percentiles)[0].astype(np.float64)
        self.reference_ = reference
        self.slice_percentiles_ = per_slice
        return self

    @staticmethod
    def _histograms(volume):
        """(Z, 256) slice histograms, read one slab of whole planes at a time."""
        depth = volume.slab_depth(1)
        parts = []
        for group in volume.slabs(depth):
            parts.append(_kernels.slice_histograms(CPU, volume.read(int(group[0]), int(group[-1]) + 1)))
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
        volumes, is_list = _intensity_volumes(X)
        if self.method in (None, "passthrough"):
            return map_volumes(_passthrough, volumes, is_list)
        if self.method == "percentile":
            if self.reference_ is None:
                raise ValueError(
                    "This SliceEqualizer was fitted with another method; fit it again after "
                    "setting method='percentile'."
                )
            kernel = _PercentileKernel(self._percentiles(), tuple(float(r) for r in self.reference_))
        else:
            kernel = _ClaheKernel(self.kernel_size, float(self.clip_limit))
        return map_volumes(lambda volume: _apply_per_slab(volume, kernel), volumes, is_list)
