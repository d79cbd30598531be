"""Multi-scale local features of an image, for the pixel classifier.

Every feature is a separable Gaussian-family filter of the normalised
intensity, computed with the backend's ``ndimage`` (SciPy on the CPU,
``cupyx.scipy.ndimage`` on a GPU), so the same code gives the same features
on both. Scales are given per axis in voxels (see :func:`voxel_sigmas`), so
anisotropic voxels get anisotropic filters.

Features at a voxel depend only on the image within :func:`support` voxels
of it (per axis). Computing them on any crop that holds that neighbourhood
-- or reaches the image's own edge, where the filters reflect as they do on
the whole image -- gives the same values as on the whole image: this is what
lets large volumes be processed crop by crop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .._spacing import check_spacing
from . import point_derivatives, sparse_gaussian

#: Feature families, in the order their columns appear.
FEATURES = ("intensity", "gaussian", "dog", "gradient", "hessian", "contrast")

#: Filters' truncation, in standard deviations (scipy.ndimage's default is 4).
TRUNCATE = 3.0

#: Ratio of the wide to the narrow Gaussian of a difference of Gaussians
#: at the largest scale (smaller scales use the next scale as the wide one).
DOG_RATIO = 2.0


def _tag(scale):
    return "x".join(f"{s:.3g}" for s in scale)


def _dog_pairs(sigmas):
    """(narrow, wide) scales of the differences of Gaussians.

    Between consecutive scales, so that no wider Gaussian than the largest
    scale is needed (it would set the features' reach); a single scale is
    paired with one `DOG_RATIO` times wider.
    """
    if len(sigmas) == 1:
        return [(sigmas[0], tuple(DOG_RATIO * s for s in sigmas[0]))]
    return list(zip(sigmas[:-1], sigmas[1:]))


@dataclass(frozen=True)
class FeatureSpec:
    """What to compute: feature families and scales, per axis in voxels.

    Attributes
    ----------
    features : tuple of str
        Families from :data:`FEATURES`.
    sigmas : tuple of tuple of float
        One (z, y, x) standard deviation in voxels per scale. A 2D image has
        z = 0 (filters act within the plane only).
    """

    features: tuple
    sigmas: tuple

    @property
    def ndim(self):
        """Number of axes filtered: 2 for images (z sigma 0), else 3."""
        return 2 if all(s[0] == 0 for s in self.sigmas) else 3

    def names(self):
        """Column names of the feature matrix, in order."""
        names = []
        n_eigen = self.ndim
        for family in self.features:
            if family == "intensity":
                names.append("intensity")
                continue
            if family == "dog":
                names.extend(f"dog@{_tag(narrow)}-{_tag(wide)}" for narrow, wide in _dog_pairs(self.sigmas))
                continue
            for scale in self.sigmas:
                tag = _tag(scale)
                if family == "hessian":
                    names.extend(f"hessian_{i}@{tag}" for i in range(n_eigen))
                else:
                    names.append(f"{family}@{tag}")
        return names

    @property
    def n_features(self):
        return len(self.names())


def voxel_sigmas(sigmas, spacing, is_2d):
    """Per-axis standard deviations in voxels.

    Parameters
    ----------
    sigmas : sequence of float
        Scales, in the units of `spacing` (or voxels when `spacing` is None).
    spacing : sequence of float or None
        Voxel size (z, y, x), or for images (y, x) or (z, y, x) with z
        ignored; None means 1 along every axis. Checked by
        :func:`nanoseg._spacing.check_spacing`.
    is_2d : bool
        Images are filtered within the plane (z sigma 0).

    Returns
    -------
    tuple of (float, float, float)

    Raises
    ------
    ValueError
        If `spacing` is not a valid voxel size for the dimensionality.
    """
    if is_2d:
        y, x = check_spacing(spacing, ndim=2, drop_z=True, allow_none=True, warn=False)
        return tuple((0.0, float(sigma) / y, float(sigma) / x) for sigma in sigmas)
    spacing = check_spacing(spacing, ndim=3, allow_none=True, warn=False)
    return tuple(tuple(float(sigma) / s for s in spacing) for sigma in sigmas)


def _radius(sigma):
    # scipy.ndimage's kernel radius for a given sigma and truncate.
    return int(TRUNCATE * float(sigma) + 0.5)


def support(spec):
    """Voxels per axis (z, y, x) on each side that the features at a voxel read."""
    scales = list(spec.sigmas)
    if "dog" in spec.features:
        scales += [wide for _, wide in _dog_pairs(spec.sigmas)]
    # Finite differences of the smoothed image read one more voxel.
    extra = 1 if ("hessian" in spec.features or "gradient" in spec.features) else 0
    reach = [0, 0, 0]
    for scale in scales:
        for axis, sigma in enumerate(scale):
            reach[axis] = max(reach[axis], _radius(sigma))
    return tuple(r + (extra if (axis > 0 or spec.ndim == 3) else 0) for axis, r in enumerate(reach))


def _gaussian(ndi, image, sigma):
    if not any(sigma):
        return image
    return ndi.gaussian_filter(image, sigma, mode="reflect", truncate=TRUNCATE)


def _eigenvalues_2d(xp, hxx, hxy, hyy):
    half_trace = 0.5 * (hxx + hyy)
    root = xp.sqrt(0.25 * (hxx - hyy) ** 2 + hxy**2)
    return [half_trace + root, half_trace - root]


def _eigenvalues_3d(xp, a, b, c, d, e, f):
    """Eigenvalues, in decreasing order, of symmetric 3x3 matrices [[a, d, e], [d, b, f], [e, f, c]].

    The closed form (trigonometric solution of the characteristic cubic) is
    vectorised; float64 keeps it accurate where eigenvalues nearly coincide.
    """
    a, b, c, d, e, f = (v.astype(xp.float64) for v in (a, b, c, d, e, f))
    q = (a + b + c) / 3.0
    off = d * d + e * e + f * f
    p2 = (a - q) ** 2 + (b - q) ** 2 + (c - q) ** 2 + 2.0 * off
    p = xp.sqrt(p2 / 6.0)
    safe = xp.where(p > 0, p, 1.0)
    ba, bb, bc = (a - q) / safe, (b - q) / safe, (c - q) / safe
    bd, be, bf = d / safe, e / safe, f / safe
    det = ba * (bb * bc - bf * bf) - bd * (bd * bc - bf * be) + be * (bd * bf - bb * be)
    r = xp.clip(det / 2.0, -1.0, 1.0)
    phi = xp.arccos(r) / 3.0
    first = q + 2.0 * p * xp.cos(phi)
    third = q + 2.0 * p * xp.cos(phi + 2.0 * math.pi / 3.0)
    second = 3.0 * q - first - third
    return [first, second, third]


class _Stencil:
    """Values of dense arrays at chosen voxels and at their neighbours.

    Neighbours beyond the array's edge are clamped to it, so finite
    differences there are one-sided halves; inside, they are central.
    """

    def __init__(self, xp, shape, where):
        self.xp = xp
        self.shape = shape
        if where is None:
            flat = xp.arange(int(np.prod(shape)))
        elif where.dtype == bool:
            flat = xp.flatnonzero(where.ravel())
        else:  # already the chosen voxels' flat indices, in increasing order
            flat = where
        self.flat = flat
        self._coords = None
        self._cache = {}

    @property
    def coords(self):
        # Found when first asked for: the compiled derivatives never need them.
        if self._coords is None:
            self._coords = self.xp.unravel_index(self.flat, self.shape)
        return self._coords

    def index(self, offset):
        if offset not in self._cache:
            xp, shape = self.xp, self.shape
            flat = 0
            for axis, (c, d) in enumerate(zip(self.coords, offset)):
                c = c if d == 0 else xp.clip(c + d, 0, shape[axis] - 1)
                flat = flat * shape[axis] + c
            self._cache[offset] = flat
        return self._cache[offset]

    def at(self, array, offset=(0, 0, 0)):
        index = self.flat if not any(offset) else self.index(offset)
        if isinstance(array, _Sampled):
            # Where each voxel asked for sits among the sampled ones: the same
            # for every image sampled at the crop's points, so found once.
            key = ("sampled", offset)
            if key not in self._cache:
                self._cache[key] = np.searchsorted(array.flat, index)
            return array.values[self._cache[key]]
        return array.ravel()[index]


class _Sampled:
    """A smoothed image known only at the voxels of the sorted flat indices
    `flat`: every voxel a stencil reads (see _read_points), the same for
    every image of one crop."""

    def __init__(self, flat, values):
        self.flat = flat
        self.values = values


def _unit(axis, step=1):
    offset = [0, 0, 0]
    offset[axis] = step
    return tuple(offset)


def _add(a, b):
    return tuple(x + y for x, y in zip(a, b))


def _first(stencil, g, axis):
    return 0.5 * (stencil.at(g, _unit(axis)) - stencil.at(g, _unit(axis, -1)))


def _second(stencil, g, i, j):
    if i == j:
        return stencil.at(g, _unit(i)) - 2.0 * stencil.at(g) + stencil.at(g, _unit(i, -1))
    plus, minus = _unit(i), _unit(i, -1)
    return 0.25 * (
        stencil.at(g, _add(plus, _unit(j)))
        - stencil.at(g, _add(plus, _unit(j, -1)))
        - stencil.at(g, _add(minus, _unit(j)))
        + stencil.at(g, _add(minus, _unit(j, -1)))
    )


def _read_offsets(spec, axes):
    """Offsets (z, y, x) of the voxels the features of `spec` read around a chosen
    voxel, (n, 3) int64: the voxel itself and, for derivatives, the neighbours
    of :func:`~nanoseg._ops.point_derivatives.stencil_offsets` they need."""
    offsets = point_derivatives.stencil_offsets(axes)
    if "hessian" in spec.features:
        return offsets
    if "gradient" in spec.features:
        return offsets[: 1 + 2 * len(axes)]
    return offsets[:1]


def _read_points(stencil, spec, axes, neighbours=None):
    """Flat indices of every voxel the features of `spec` read at the stencil's voxels:
    the voxels themselves and, for derivatives, their (clamped) neighbours
    (given as flat indices in `neighbours` when already found)."""
    # Marking them in an image-sized mask is several times faster than
    # sorting or hashing the (many, repeated) indices, and gives them sorted.
    read = np.zeros(int(np.prod(stencil.shape)), dtype=bool)
    if neighbours is not None:
        read[neighbours] = True
        return np.flatnonzero(read)
    for offset in map(tuple, _read_offsets(spec, axes).tolist()):
        read[stencil.flat if not any(offset) else stencil.index(offset)] = True
    return np.flatnonzero(read)


def compute_features(backend, image, spec, extra=None, where=None):
    """Features of chosen voxels of a (Z, Y, X) float32 image.

    Gaussians are computed densely over `image`; everything derived from
    them (differences, finite-difference derivatives, Hessian eigenvalues)
    only at the chosen voxels, which is what keeps a sparse gate cheap.

    Parameters
    ----------
    backend : Backend
        Array namespace (``xp``) and ``ndimage`` (``ndi``) to compute with.
    image : array, float32, shape (Z, Y, X)
        Normalised intensities.
    spec : FeatureSpec
    extra : array or None
        A precomputed feature of `image`'s shape (the intensity model's
        posterior logit), appended as the last column.
    where : array of bool, array of int, or None
        Voxels to describe: a mask of `image`'s shape, or the increasing
        flat (C-order) indices of its chosen voxels; None means all of them.

    Returns
    -------
    features : array, float32, shape (n_features, n_voxels)
        One column per chosen voxel, in C order.
    """
    xp, ndi = backend.xp, backend.ndi
    axes = (0, 1, 2) if spec.ndim == 3 else (1, 2)
    stencil = _Stencil(xp, image.shape, where)
    smoothed = {}
    gradient_wanted, hessian_wanted = "gradient" in spec.features, "hessian" in spec.features
    # On the CPU, derivatives come from one compiled loop over the chosen
    # voxels and their neighbours, found once here (see point_derivatives).
    neighbours = None
    if backend.name == "cpu" and point_derivatives.available() and (gradient_wanted or hessian_wanted):
        neighbours = point_derivatives.neighbour_positions(stencil.flat, image.shape, _read_offsets(spec, axes))
    # Few chosen voxels (a gated crop): smooth only where the features read,
    # with the same values as the dense filter (see sparse_gaussian).
    points = None
    if where is not None and backend.name == "cpu" and sparse_gaussian.available():
        points = sparse_gaussian.Points(image.shape, _read_points(stencil, spec, axes, neighbours))
        if points.row_fraction > sparse_gaussian.MAX_ROW_FRACTION:
            points = None
    sampled_positions = []

    def derived(sigma):
        # (gradient, eigenvalues) of one scale, by the compiled loop.
        key = ("derived", sigma)
        if key not in smoothed:
            g = gaussian(sigma)
            if isinstance(g, _Sampled):
                if not sampled_positions:
                    found = point_derivatives.ranks(neighbours, points.flat, int(np.prod(image.shape)))
                    sampled_positions.append(found)
                    stencil._cache[("sampled", (0, 0, 0))] = found[:, 0]
                values, positions = g.values, sampled_positions[0]
            else:
                values, positions = np.ascontiguousarray(g, dtype=np.float32).ravel(), neighbours
            smoothed[key] = point_derivatives.derivatives(
                values, positions, len(axes), max(sigma), gradient_wanted, hessian_wanted
            )
        return smoothed[key]

    def smooth(source, sigma):
        if not any(sigma) or points is None:
            return _gaussian(ndi, source, sigma)
        # Only the voxels the features read get values.
        return _Sampled(points.flat, sparse_gaussian.gaussian_at(source, sigma, points, TRUNCATE))

    def gaussian(sigma):
        if sigma not in smoothed:
            smoothed[sigma] = smooth(image, sigma)
        return smoothed[sigma]

    square_of_image = []

    def smoothed_square_at_voxels(sigma):
        # The smoothed square is read at the chosen voxels only, never at
        # their neighbours: with sparse smoothing, only there (a small share
        # of the points the derivatives read), squaring the intensities as
        # the passes read them rather than squaring the whole crop first.
        if points is None:
            if not square_of_image:
                square_of_image.append(image * image)
            return stencil.at(_gaussian(ndi, square_of_image[0], sigma))
        if not any(sigma):
            return stencil.at(image) ** 2
        if not square_of_image:
            square_of_image.append(sparse_gaussian.Points(image.shape, stencil.flat))
        return sparse_gaussian.gaussian_at(image, sigma, square_of_image[0], TRUNCATE, square=True)

    columns = []
    for family in spec.features:
        if family == "intensity":
            columns.append(stencil.at(image))
            continue
        if family == "dog":
            for narrow, wide in _dog_pairs(spec.sigmas):
                columns.append(stencil.at(gaussian(narrow)) - stencil.at(gaussian(wide)))
            continue
        for sigma in spec.sigmas:
            # Scale-normalised derivatives (times sigma, sigma**2) make the
            # responses comparable across scales.
            scale = max(sigma)
            g = gaussian(sigma)
            if family == "gaussian":
                columns.append(stencil.at(g))
            elif family == "gradient" and neighbours is not None:
                columns.append(derived(sigma)[0])
            elif family == "hessian" and neighbours is not None:
                columns.extend(derived(sigma)[1])
            elif family == "gradient":
                squared = sum(_first(stencil, g, axis) ** 2 for axis in axes)
                columns.append(xp.sqrt(squared) * scale)
            elif family == "hessian":
                h = {(i, j): _second(stencil, g, i, j) for k, i in enumerate(axes) for j in axes[k:]}
                if spec.ndim == 3:
                    values = _eigenvalues_3d(xp, h[0, 0], h[1, 1], h[2, 2], h[0, 1], h[0, 2], h[1, 2])
                else:
                    values = _eigenvalues_2d(xp, h[2, 2], h[1, 2], h[1, 1])
                columns.extend(v * scale**2 for v in values)
            elif family == "contrast":
                # Local standard deviation at this scale.
                variance = smoothed_square_at_voxels(sigma) - stencil.at(g) ** 2
                columns.append(xp.sqrt(xp.maximum(variance, 0)))
            else:  # pragma: no cover - validated by the estimator
                raise ValueError(f"unknown feature family {family!r}")
    if extra is not None:
        columns.append(stencil.at(extra))
    out = xp.empty((len(columns), stencil.flat.size), dtype=xp.float32)
    for i, column in enumerate(columns):
        out[i] = column
    return out


def check_features(features):
    """Validate a feature-family selection; returns it as a tuple in canonical order."""
    if isinstance(features, str):
        features = (features,)
    features = tuple(features)
    unknown = [f for f in features if f not in FEATURES]
    if unknown or not features:
        raise ValueError(
            f"features must be a non-empty selection of {', '.join(map(repr, FEATURES))}; got {features!r}."
        )
    return tuple(f for f in FEATURES if f in features)


__all__ = [
    "FEATURES",
    "FeatureSpec",
    "check_features",
    "compute_features",
    "support",
    "voxel_sigmas",
]
