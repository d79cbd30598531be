"""Synthetic SBF-SEM / FIB-SEM phantoms with ground truth.

The functions in this module build small, seedable volumes that look like
serial block-face (or focused ion beam) scanning electron microscopy data of
cells containing electron-dense nanoparticles (NPs):

* a textured, cell-like grey background (intensity ~90-140) with darker
  membrane-like lines and organelle-like blobs;
* a per-slice brightness offset that drifts along ``z`` as a random walk,
  as successive SBF-SEM block-face images do;
* Gaussian noise with a mild intensity-dependent (shot-noise-like) part;
* bright ellipsoidal particles (mean intensity ~200-245) with soft,
  partial-volume edges, part of them packed in tight clusters (as NPs in
  endosomes are) and the rest scattered uniformly.

Voxels are anisotropic: particle radii are given in units of the in-plane
(``x``) voxel size and converted to each axis with ``spacing``, so that with
the default spacing of 50 x 10 x 10 nm a particle 3 voxels in radius along
``y``/``x`` is only 0.6 slices in radius along ``z``.

The ground truth is exact: the mask holds the voxels whose centre lies inside
a particle's ellipsoid, and the optional instance labels give every particle
its own id.

Everything is determined by ``random_state``: the same seed gives
byte-identical output.
"""

import numbers
import warnings

import numpy as np
from scipy import ndimage as ndi

from ._spacing import check_spacing

__all__ = ["make_phantom", "make_crops"]

# Background model, in grey levels.
_BG_LEVEL = 118.0
_BG_COARSE = 9.0  # slowly varying cytoplasm shading
_BG_FINE = 5.0  # fine granular texture
_MEMBRANE_DEPTH = 32.0  # dark membrane-like lines
_MEMBRANE_WIDTH = 0.12  # width of the level set used for membranes (in std)
_ORGANELLE_DEPTH = 18.0  # darker organelle-like blobs
_ORGANELLE_THRESHOLD = 1.3  # fraction of the volume ~ P(N(0,1) > 1.3) ~ 10 %

# Physical correlation lengths of the background fields (nm).
_L_FINE = 15.0
_L_COARSE = 250.0
_L_MEMBRANE = 100.0
_L_ORGANELLE = 150.0

# Particle intensities.
_NP_MEAN = 222.0
_NP_STD = 7.0
_NP_RANGE = (200.0, 245.0)

# Particles per cluster, on average.
_CLUSTER_SIZE = 7

_MAX_TRIES = 60


# ---------------------------------------------------------------------------
# argument checking
# ---------------------------------------------------------------------------


def _check_rng(random_state):
    """Turn ``random_state`` into a :class:`numpy.random.Generator`."""
    if random_state is None:
        return np.random.default_rng()
    if isinstance(random_state, np.random.Generator):
        return random_state
    if isinstance(random_state, np.random.RandomState):
        # Draw a seed from the legacy generator: deterministic given its
        # state, and it advances that state as scikit-learn conventions expect.
        return np.random.default_rng(random_state.randint(0, 2**32, size=4, dtype=np.uint64))
    if isinstance(random_state, numbers.Integral) and not isinstance(random_state, bool | np.bool_):
        if random_state < 0:
            raise ValueError(f"random_state must be a non-negative integer, got {random_state}")
        return np.random.default_rng(int(random_state))
    raise ValueError(
        "random_state must be None, a non-negative int, a numpy.random.Generator "
        f"or a numpy.random.RandomState, got {random_state!r}"
    )


def _check_shape(shape):
    try:
        shape = tuple(shape)
    except TypeError:
        raise ValueError(f"shape must be a 2D (Y, X) or 3D (Z, Y, X) tuple of ints, got {shape!r}") from None
    if len(shape) not in (2, 3) or not all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool | np.bool_) for s in shape
    ):
        raise ValueError(f"shape must be a 2D (Y, X) or 3D (Z, Y, X) tuple of ints, got {shape!r}")
    if any(s <= 0 for s in shape):
        raise ValueError(f"shape must have positive sizes, got {shape!r}")
    return tuple(int(s) for s in shape)


def _check_number(value, name, *, low=0.0, high=None, low_inclusive=True):
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    ok = np.isfinite(value) and (value >= low if low_inclusive else value > low)
    if high is not None:
        ok = ok and value <= high
    if not ok:
        bound = f">= {low}" if low_inclusive else f"> {low}"
        if high is not None:
            bound = f"in [{low}, {high}]"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
    return value


def _check_radius(radius):
    if isinstance(radius, numbers.Real) and not isinstance(radius, bool | np.bool_):
        r = _check_number(radius, "radius", low_inclusive=False)
        return r, r
    try:
        pair = tuple(radius)
    except TypeError:
        raise ValueError(f"radius must be a positive number or a (min, max) pair, got {radius!r}") from None
    if len(pair) != 2:
        raise ValueError(f"radius must be a positive number or a (min, max) pair, got {radius!r}")
    rmin = _check_number(pair[0], "radius", low_inclusive=False)
    rmax = _check_number(pair[1], "radius", low_inclusive=False)
    if rmin > rmax:
        raise ValueError(f"radius must be a (min, max) pair with min <= max, got {radius!r}")
    return rmin, rmax


# ---------------------------------------------------------------------------
# background
# ---------------------------------------------------------------------------


def _upsample_axis(a, axis, factor, n):
    """Linear interpolation of ``a`` along ``axis`` onto ``n`` points, step 1/factor."""
    if factor == 1:
        return np.take(a, np.arange(n), axis=axis)
    pos = np.arange(n, dtype=np.float64) / factor
    i0 = np.floor(pos).astype(np.intp)
    w = (pos - i0).astype(np.float32)
    shape = [1] * a.ndim
    shape[axis] = n
    w = w.reshape(shape)
    return np.take(a, i0, axis=axis) * (1 - w) + np.take(a, i0 + 1, axis=axis) * w


def _smooth_field(rng, shape, sigma):
    """Unit-variance Gaussian random field of ``shape`` with correlation ``sigma`` (voxels).

    Large correlation lengths are generated on a coarse grid and linearly
    interpolated, which keeps the cost linear in the number of voxels.
    """
    factors = [max(1, int(s // 2.5)) for s in sigma]
    coarse_shape = tuple(1 if n == 1 else (n - 1) // f + 2 for n, f in zip(shape, factors, strict=True))
    field = rng.standard_normal(coarse_shape, dtype=np.float32)
    coarse_sigma = [0.0 if n == 1 else s / f for n, s, f in zip(shape, sigma, factors, strict=True)]
    field = ndi.gaussian_filter(field, coarse_sigma, mode="reflect", truncate=3.0)
    for axis, (n, f) in enumerate(zip(shape, factors, strict=True)):
        if n > 1:
            field = _upsample_axis(field, axis, f, n)
    field = np.ascontiguousarray(field, dtype=np.float32)
    std = float(field.std())
    if not std > 0:
        return np.zeros(shape, dtype=np.float32)
    field -= field.mean(dtype=np.float64)
    field /= std
    return field


def _background(rng, shape, spacing):
    """Cell-like grey texture: shading, granularity, membranes and organelles."""

    def sig(length):
        return [length / s for s in spacing]

    coarse = _smooth_field(rng, shape, sig(_L_COARSE))
    fine = _smooth_field(rng, shape, sig(_L_FINE))
    memb = _smooth_field(rng, shape, sig(_L_MEMBRANE))
    organ = _smooth_field(rng, shape, sig(_L_ORGANELLE))

    bg = np.full(shape, _BG_LEVEL, dtype=np.float32)
    bg += _BG_COARSE * coarse
    bg += _BG_FINE * fine
    # Membranes: a thin band around the zero level set of a smooth field,
    # which gives closed, curving dark lines.
    memb *= 1.0 / _MEMBRANE_WIDTH
    np.square(memb, out=memb)
    np.negative(memb, out=memb)
    np.exp(memb, out=memb)
    bg -= _MEMBRANE_DEPTH * memb
    # Organelles: darker blobs where another smooth field is high (soft edge).
    organ -= _ORGANELLE_THRESHOLD
    organ *= -1.0 / 0.15
    np.clip(organ, -30.0, 30.0, out=organ)
    np.exp(organ, out=organ)
    organ += 1.0
    np.reciprocal(organ, out=organ)
    bg -= _ORGANELLE_DEPTH * organ
    return bg


# ---------------------------------------------------------------------------
# particles
# ---------------------------------------------------------------------------


def _centre_bounds(shape, semi):
    """Range of centre coordinates (voxels) keeping each particle inside the volume."""
    lo = np.empty(3)
    hi = np.empty(3)
    for k, (n, a) in enumerate(zip(shape, semi, strict=True)):
        mid = (n - 1) / 2.0
        lo[k] = min(a - 0.5, mid)
        hi[k] = max(n - 0.5 - a, mid)
    return lo, hi


def _place_particles(rng, shape, spacing, n_particles, cluster_fraction, rmin, rmax):
    """Choose centres (voxels) and semi-axes (voxels) of non-overlapping ellipsoids.

    Returns ``centres`` (K, 3) and ``semi`` (K, 3) with K <= n_particles.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    flat = shape[0] == 1  # a single slice: particles sit in the imaged plane
    radii = rng.uniform(rmin, rmax, size=n_particles)
    # Radius in units of the x voxel size -> physical -> voxels along each axis,
    # at least half a voxel so every particle is hit by one voxel centre.
    semi_all = np.maximum(radii[:, None] * spacing[-1] / spacing[None, :], 0.5)
    phys_all = semi_all * spacing[None, :]

    n_clustered = int(round(cluster_fraction * n_particles))
    n_clusters = 0 if n_clustered == 0 else max(1, int(np.ceil(n_clustered / _CLUSTER_SIZE)))
    # Clustered particles first (cluster j gets particles j, j + n_clusters, ...).
    cluster_of = np.full(n_particles, -1, dtype=np.intp)
    cluster_of[:n_clustered] = np.arange(n_clustered) % max(n_clusters, 1)
    cluster_members = [[] for _ in range(n_clusters)]

    centres = np.empty((n_particles, 3))  # voxels
    placed_semi = np.empty((n_particles, 3))
    placed_phys = np.empty((n_particles, 3))
    count = 0

    def fits(c, i):
        lo, hi = _centre_bounds(shape, semi_all[i])
        if np.any(c < lo - 1e-9) or np.any(c > hi + 1e-9):
            return False
        if count == 0:
            return True
        d = (centres[:count] - c) * spacing
        reach = placed_phys[:count] + phys_all[i]
        return bool(np.all(np.sum((d / reach) ** 2, axis=1) >= 1.0))

    def uniform_centre(i):
        lo, hi = _centre_bounds(shape, semi_all[i])
        c = rng.uniform(lo, hi)
        if flat:
            c[0] = 0.0
        return c

    for i in range(n_particles):
        c_new = None
        j = cluster_of[i]
        if j >= 0 and cluster_members[j]:
            # Next to a random member of the cluster, touching or nearly so.
            for _ in range(_MAX_TRIES):
                parent = cluster_members[j][rng.integers(len(cluster_members[j]))]
                u = rng.standard_normal(3)
                if flat:
                    u[0] = 0.0
                norm = np.linalg.norm(u)
                if norm == 0:
                    continue
                u /= norm
                reach = placed_phys[parent] + phys_all[i]
                contact = 1.0 / np.sqrt(np.sum((u / reach) ** 2))
                c = centres[parent] + u * contact * rng.uniform(1.0, 1.3) / spacing
                if fits(c, i):
                    c_new = c
                    break
        if c_new is None:
            for _ in range(_MAX_TRIES):
                c = uniform_centre(i)
                if fits(c, i):
                    c_new = c
                    break
        if c_new is None:
            continue
        centres[count] = c_new
        placed_semi[count] = semi_all[i]
        placed_phys[count] = phys_all[i]
        if j >= 0:
            cluster_members[j].append(count)
        count += 1
    return centres[:count], placed_semi[:count]


def _paint_particles(rng, shape, centres, semi):
    """Rasterise ellipsoids into labels, occupancy and particle intensity.

    A voxel belongs to a particle when its centre lies inside the ellipsoid;
    the voxel nearest the particle centre always does. Where particles
    overlap the later one wins.
    """
    labels = np.zeros(shape, dtype=np.uint32)
    occ = np.zeros(shape, dtype=np.float32)
    level = np.zeros(shape, dtype=np.float32)
    n = len(centres)
    intens = np.clip(rng.normal(_NP_MEAN, _NP_STD, size=n), *_NP_RANGE)
    shape_arr = np.asarray(shape)
    for i in range(n):
        c, a = centres[i], semi[i]
        lo = np.clip(np.floor(c - a).astype(int) - 1, 0, shape_arr - 1)
        hi = np.clip(np.ceil(c + a).astype(int) + 2, 1, shape_arr)
        box = tuple(slice(int(l_), int(h_)) for l_, h_ in zip(lo, hi, strict=True))
        grids = np.ogrid[box]
        rho2 = sum(((g - ck) / ak) ** 2 for g, ck, ak in zip(grids, c, a, strict=True))
        inside = rho2 <= 1.0
        nearest = tuple(int(v) for v in np.clip(np.rint(c).astype(int), 0, shape_arr - 1) - lo)
        inside[nearest] = True
        # Soft occupancy: 0.5 on the surface, reaching 1 half a voxel inside
        # and 0 half a voxel outside (partial-volume edges).
        a_plane = float(np.mean(a[1:]))
        soft = np.clip(0.5 + (1.0 - np.sqrt(rho2)) * a_plane, 0.0, 1.0).astype(np.float32)
        soft[nearest] = max(soft[nearest], 0.6)
        occ_box, level_box, lab_box = occ[box], level[box], labels[box]
        upd = (soft > occ_box) | inside
        occ_box[upd] = np.maximum(soft[upd], occ_box[upd])
        level_box[upd] = intens[i]
        lab_box[inside] = i + 1
    return labels, occ, level


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


def make_phantom(
    shape=(24, 192, 192),
    *,
    n_particles=40,
    cluster_fraction=0.5,
    radius=(1.5, 3.5),
    spacing=(50.0, 10.0, 10.0),
    drift=2.0,
    noise=6.0,
    random_state=None,
    return_labels=False,
):
    """Make a synthetic SBF-SEM-like volume with bright nanoparticles.

    Parameters
    ----------
    shape : tuple of int, optional
        Shape of the output, ``(Z, Y, X)`` for a volume or ``(Y, X)`` for a
        single slice.
    n_particles : int, optional
        Number of particles to place (``0`` gives a particle-free volume).
        Particles do not overlap; if the volume is too crowded to place them
        all, as many as fit are placed and a ``UserWarning`` is emitted.
    cluster_fraction : float, optional
        Fraction of the particles, in ``[0, 1]``, packed in a few tight
        clusters (about 7 particles each, touching or nearly touching, as NPs
        in endosomes). The others are scattered uniformly.
    radius : float or (float, float), optional
        Particle radius, or ``(min, max)`` range it is drawn from uniformly,
        in units of the in-plane ``x`` voxel size. The semi-axis along each
        axis is ``radius * spacing[-1] / spacing[axis]`` voxels, but at least
        0.5 voxel, so each particle appears in at least one slice.
    spacing : sequence of float, optional
        Voxel size along each axis (``(Z, Y, X)``; nm, or any unit used
        consistently). For a 2D ``shape`` either 2 values or the default 3
        (the first, z, is then ignored but must be valid too). Also sets the
        physical scale of the background texture.
    drift : float, optional
        Slice-to-slice brightness drift: each slice gets an additive offset
        following a Gaussian random walk along ``z`` with steps of standard
        deviation ``drift`` grey levels (mean offset over slices is zero).
        ``0`` disables it. Ignored for a 2D ``shape``. The method's global
        intensity model tolerates a few grey levels per step; at much larger
        drift (e.g. 8) bright background slices are mistaken for particles,
        which makes such phantoms a stress test.
    noise : float, optional
        Standard deviation of the Gaussian noise, in grey levels, on the
        background. A mild shot-noise-like part makes it grow with intensity:
        the local standard deviation is ``noise * sqrt(0.75 + 0.25 * I / 128)``.
    random_state : None, int, numpy.random.Generator or numpy.random.RandomState, optional
        Seed or generator. The same integer seed gives byte-identical output.
    return_labels : bool, optional
        Whether to also return the instance labels.

    Returns
    -------
    image : ndarray of uint8, shape `shape`
        The phantom.
    mask : ndarray of bool, shape `shape`
        Ground-truth particle voxels: voxels whose centre lies inside a
        particle (plus, for very small particles, the voxel nearest the
        centre).
    labels : ndarray of uint32, shape `shape`
        Only when ``return_labels`` is True. Particle ids ``1..K`` (``0`` is
        background), one per placed particle, ``mask == (labels > 0)``.
        Particles do not overlap; should two voxel sets still meet, the
        later particle keeps the shared voxels.

    Notes
    -----
    The background (mean ~115, mostly within 90-140) is a sum of smooth
    Gaussian random fields with physical correlation lengths, darkened along
    thin membrane-like level sets and in organelle-like blobs. Particles have
    per-particle intensities around 222 (within 200-245) and soft edges
    (partial volume). The slice drift is added to every voxel of a slice,
    then the noise; the result is clipped to ``[0, 255]`` and rounded.

    Examples
    --------
    >>> from nanoseg.datasets import make_phantom
    >>> image, mask = make_phantom((8, 64, 64), n_particles=10, random_state=0)
    >>> image.shape, image.dtype, mask.dtype
    ((8, 64, 64), dtype('uint8'), dtype('bool'))
    >>> bool(image[mask].mean() - image[~mask].mean() > 60)
    True

    Instance labels, and a single 2D slice:

    >>> image, mask, labels = make_phantom(
    ...     (8, 64, 64), n_particles=10, random_state=0, return_labels=True)
    >>> int(labels.max()), bool((mask == (labels > 0)).all())
    (10, True)
    >>> make_phantom((64, 64), n_particles=5, random_state=1)[0].shape
    (64, 64)
    """
    shape = _check_shape(shape)
    ndim = len(shape)
    if isinstance(n_particles, bool | np.bool_) or not isinstance(n_particles, numbers.Integral) or n_particles < 0:
        raise ValueError(f"n_particles must be a non-negative integer, got {n_particles!r}")
    n_particles = int(n_particles)
    cluster_fraction = _check_number(cluster_fraction, "cluster_fraction", low=0.0, high=1.0)
    rmin, rmax = _check_radius(radius)
    spacing = check_spacing(spacing, ndim=ndim, drop_z=True, warn=False)
    drift = _check_number(drift, "drift")
    noise = _check_number(noise, "noise")
    rng = _check_rng(random_state)

    # Work in 3D; a 2D image is a single slice.
    shape3 = shape if ndim == 3 else (1, *shape)
    spacing3 = spacing if ndim == 3 else (max(spacing), *spacing)

    # Fixed order of draws: background, drift, particles, noise.
    image = _background(rng, shape3, spacing3)

    steps = rng.standard_normal(shape3[0])
    if ndim == 3 and drift > 0:
        offsets = np.cumsum(steps * drift)
        offsets -= offsets.mean()
        image += offsets.astype(np.float32)[:, None, None]

    centres, semi = _place_particles(rng, shape3, spacing3, n_particles, cluster_fraction, rmin, rmax)
    if len(centres) < n_particles:
        warnings.warn(
            f"only {len(centres)} of n_particles={n_particles} particles could be placed "
            f"without overlap in a volume of shape {shape}",
            UserWarning,
            stacklevel=2,
        )
    labels, occ, level = _paint_particles(rng, shape3, centres, semi)
    if ndim == 3 and drift > 0:
        level += offsets.astype(np.float32)[:, None, None]
    # Partial-volume mix of background and particle.
    image += occ * (level - image)

    if noise > 0:
        sd = np.clip(image, 0.0, None)
        sd *= 0.25 / 128.0
        sd += 0.75
        np.sqrt(sd, out=sd)
        sd *= noise
        image += sd * rng.standard_normal(shape3, dtype=np.float32)

    np.clip(image, 0, 255, out=image)
    np.rint(image, out=image)
    image = image.astype(np.uint8).reshape(shape)

    labels = labels.reshape(shape)
    # Safety net: keep ids sequential should a particle have lost all voxels.
    present = np.bincount(labels.ravel(), minlength=len(centres) + 1)[1:] > 0
    if not present.all():
        lut = np.zeros(len(centres) + 1, dtype=np.uint32)
        lut[1:][present] = np.arange(1, int(present.sum()) + 1, dtype=np.uint32)
        labels = lut[labels]
    mask = labels > 0
    if return_labels:
        return image, mask, labels
    return image, mask


def make_crops(n_crops=6, shape=(8, 96, 96), *, random_state=None, **kwargs):
    """Make a list of independent small phantoms with ground truth.

    Parameters
    ----------
    n_crops : int, optional
        Number of crops (at least 1).
    shape : tuple of int, optional
        Shape of each crop, ``(Z, Y, X)``, or ``(Y, X)`` for 2D crops (one
        slice each).
    random_state : None, int, numpy.random.Generator or numpy.random.RandomState, optional
        Seed or generator from which one independent seed per crop is drawn.
        The same integer seed gives the same crops.
    **kwargs
        Passed on to :func:`make_phantom` (``n_particles``,
        ``cluster_fraction``, ``radius``, ``spacing``, ``drift``, ``noise``,
        ``return_labels``).

    Returns
    -------
    images : list of ndarray of uint8
        ``n_crops`` phantoms of shape `shape`.
    masks : list of ndarray of bool
        Their ground-truth particle masks.
    labels : list of ndarray of uint32
        Only when ``return_labels=True`` is passed: their instance labels.

    See Also
    --------
    make_phantom : Make one phantom.

    Examples
    --------
    >>> from nanoseg.datasets import make_crops
    >>> images, masks = make_crops(3, (4, 32, 32), n_particles=5, random_state=0)
    >>> len(images), images[0].shape, masks[0].dtype
    (3, (4, 32, 32), dtype('bool'))
    >>> images2, _ = make_crops(3, (4, 32, 32), n_particles=5, random_state=0)
    >>> all((a == b).all() for a, b in zip(images, images2))
    True
    """
    if isinstance(n_crops, bool | np.bool_) or not isinstance(n_crops, numbers.Integral) or n_crops < 1:
        raise ValueError(f"n_crops must be a positive integer, got {n_crops!r}")
    shape = _check_shape(shape)
    rng = _check_rng(random_state)
    seeds = rng.integers(0, 2**63, size=int(n_crops), dtype=np.int64)
    crops = [make_phantom(shape, random_state=int(seed), **kwargs) for seed in seeds]
    return tuple(list(part) for part in zip(*crops, strict=True))
