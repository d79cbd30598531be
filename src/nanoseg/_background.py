"""Removing slowly varying background from uint8 images.

:class:`~nanoseg.preprocessing.BackgroundSubtractor`, documented and imported
from :mod:`nanoseg.preprocessing`: a top-hat, a rolling ball or a Gaussian
estimates the background of each slice (or of the volume, with 3D filters),
which is subtracted with uint8 out, so that the step can precede
:class:`~nanoseg.NanoparticleMixture`.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np
from scipy import ndimage as ndi
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils._param_validation import Interval, StrOptions

from ._axes import per_axis, to_3d
from ._backend import CPU
from ._base import VolumeEstimatorMixin, map_volumes
from ._ops.histogram import slice_histograms
from ._slabs import apply_per_slab, intensity_volumes, passthrough, slice_percentiles, to_uint8
from ._validation import check_targets


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
    return slice_percentiles(slice_histograms(CPU, stack), [50.0])[:, 0].astype(np.float64)


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
                out[i] = to_uint8(_subtract(image, self.method, self.radii[1:], offsets[i]))
            return out
        return to_uint8(_subtract(stack, self.method, self.radii, offsets[:, None, None]))


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
        radii = per_axis(self.radius, ndim, "radius")
        if not all(math.isfinite(r) and r >= 0 for r in radii) or not any(r > 0 for r in radii):
            raise ValueError(
                f"radius must be finite and >= 0 on every axis, and > 0 on at least one; got "
                f"{self.radius!r}."
            )
        return radii

    def _volumes(self, X):
        self._validate_params()
        volumes, is_list = intensity_volumes(X)
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
            return passthrough(volume)
        ndim = 2 if volume.is_2d else 3
        radii = to_3d(self._radii(ndim), ndim, 0.0)
        per_slice = bool(self.per_slice) or volume.is_2d
        kernel = _BackgroundKernel(self.method, radii, self.offset, per_slice)
        depth = 0 if per_slice else _background_depth(self.method, radii)
        return apply_per_slab(volume, kernel, depth)


# Documented, pickled and named in model files as nanoseg.preprocessing.BackgroundSubtractor.
BackgroundSubtractor.__module__ = "nanoseg.preprocessing"
