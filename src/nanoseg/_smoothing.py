"""Smoothing a posterior map in logit space.

:class:`~nanoseg.preprocessing.PosteriorSmoother`, documented and imported
from :mod:`nanoseg.preprocessing`, is the step between
:class:`~nanoseg.NanoparticleMixture` and :class:`~nanoseg.NanoparticleLabeler`:
a Gaussian of the clipped log-odds, run whole in memory or chunk by chunk
with a margin for lazy inputs, then optionally averaged over blocks of voxels.
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from scipy import ndimage as ndi
from scipy.special import expit
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils._param_validation import Interval, StrOptions

from ._axes import nonnegative, per_axis, to_3d
from ._base import VolumeEstimatorMixin, map_volumes
from ._blocks import block_mean, lazy_block_mean, repeat_blocks, trimmed
from ._engine.overlap import map_overlap
from ._validation import check_probabilities, check_targets
from ._volume import as_volumes, is_lazy


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
        return nonnegative(per_axis(self.sigma, ndim, "sigma"), "sigma", self.sigma)

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
            spacing = per_axis(self.spacing, ndim, "spacing")
            target = per_axis(self.target_spacing, ndim, "target_spacing")
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
        values = per_axis(self.downsample, ndim, "downsample")
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
        sigma = to_3d(self._sigma(ndim), ndim, 0.0)
        factors = to_3d(self.block_factors(ndim), ndim, 1)
        dtype = np.dtype(self.output_dtype)
        downsampling = any(f > 1 for f in factors)
        clip, truncate = float(self.clip), float(self.truncate)
        if not is_lazy(volume.array):
            data = volume.read(0, volume.shape[0])  # validated whole in _check_posterior_volume
            smoothed = _smooth_logit(data, sigma, clip, truncate, check=False)
            if downsampling:
                if self.trim_excess:
                    smoothed = trimmed(smoothed, factors)
                smoothed = block_mean(smoothed, factors, dtype)
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
                smoothed = trimmed(smoothed, factors)
            smoothed = lazy_block_mean(smoothed, factors, dtype)
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
        return repeat_blocks(labels, self.block_factors(len(shape)), shape)


# Documented, pickled and named in model files as nanoseg.preprocessing.PosteriorSmoother.
PosteriorSmoother.__module__ = "nanoseg.preprocessing"
