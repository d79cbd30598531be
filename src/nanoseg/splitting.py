"""Split touching particles: distance transform, peaks, watershed.

Particles packed in clusters touch and come out of connected-component
labelling as one object. Each object is split along the necks of its shape:
the Euclidean distance to the object's border (with the voxel `spacing`)
peaks once per convex part, and a watershed of the negated distance grows
one piece from each peak, within the object.
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from scipy import ndimage as ndi
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils._param_validation import Interval

from ._base import VolumeEstimatorMixin, map_volumes
from ._spacing import check_spacing
from ._volume import as_volumes, is_lazy

__all__ = ["split_touching", "ParticleSplitter"]


def _footprint(min_distance, spacing):
    """Box within which a peak must be the highest: `min_distance` voxels of
    the finest axis, converted to each axis, and at least one voxel."""
    finest = min(spacing)
    half = [max(1, int(round(min_distance * finest / s))) for s in spacing]
    return np.ones([2 * h + 1 for h in half], dtype=bool)


def _check_labels(labels, name="labels"):
    labels = np.asarray(labels)
    if labels.ndim not in (2, 3):
        raise ValueError(f"{name} must be a 2D (Y, X) or 3D (Z, Y, X) array; got {labels.ndim}D.")
    if labels.size == 0:
        raise ValueError(f"{name} is empty: shape {labels.shape}.")
    if labels.dtype != bool and labels.dtype.kind not in "iu":
        raise TypeError(
            f"{name} must be integer labels (0 = background) or a boolean mask; got {labels.dtype}. "
            "Pass the output of NanoparticleLabeler, not a posterior."
        )
    if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
        raise ValueError(f"{name} has negative values; labels must be >= 0 (0 = background).")
    return labels


def _markers(distance, inside, footprint, min_distance, scale):
    """One marker per peak of `distance`, peaks closer than `min_distance`
    (in finest-axis voxels, along `scale`) merged into the higher one.

    Returns the marker image (0 elsewhere) and the number of markers.
    """
    from skimage.feature import peak_local_max

    peaks = peak_local_max(
        distance, footprint=footprint, labels=inside.astype(np.uint8), min_distance=1, exclude_border=False
    )
    if len(peaks) <= 1:
        return None, len(peaks)
    peaks = peaks[np.argsort(-distance[tuple(peaks.T)], kind="stable")]
    # Neighbouring voxels of one flat top are one peak.
    peak_mask = np.zeros(inside.shape, dtype=bool)
    peak_mask[tuple(peaks.T)] = True
    groups, n = ndi.label(peak_mask, structure=np.ones((3,) * inside.ndim, dtype=bool))
    if n <= 1:
        return None, n
    # One representative per group: its first peak in order of decreasing
    # height (peak_local_max sorts them so).
    ids = groups[tuple(peaks.T)]
    _, first = np.unique(ids, return_index=True)
    first = np.sort(first)
    points = peaks[first] * scale
    keep = []
    for i, point in enumerate(points):
        if all(np.max(np.abs(point - points[j])) >= min_distance for j in keep):
            keep.append(i)
    if len(keep) <= 1:
        return None, len(keep)
    lookup = np.zeros(n + 1, dtype=np.int32)
    lookup[ids[first[keep]]] = np.arange(1, len(keep) + 1, dtype=np.int32)
    return lookup[groups], len(keep)


def split_touching(labels, *, spacing=None, min_distance=2, footprint=None, compactness=0.0):
    """Split labelled objects made of touching particles.

    Every object is treated on its own: the Euclidean distance transform of
    the object (other objects count as background) is computed with the
    voxel `spacing`, its peaks at least `min_distance` apart become markers,
    and a watershed of the negated distance, restricted to the object, cuts
    it into one piece per marker. Objects with a single peak are kept whole.

    Parameters
    ----------
    labels : ndarray of int or bool
        2D (Y, X) or 3D (Z, Y, X) labels, 0 for background, or a boolean mask
        (then each connected set of voxels is split on its own terms).
    spacing : float or sequence of float, optional
        Voxel size per axis (z, y, x) in physical units; a 2D input takes
        (y, x) or uses the last two entries of a 3-entry value. One number,
        or None, means isotropic voxels. Only the ratios matter.
    min_distance : int, optional
        Minimum distance between the centres of two particles, in voxels of
        the finest axis (with ``spacing=(50, 10, 10)``, 2 means 20 nm; along
        Z, where voxels are 5 times larger, it is rounded to whole voxels but
        never below 1). Peaks closer than this are merged into the higher
        one. Larger values split less.
    footprint : ndarray of bool, optional
        Neighbourhood within which a peak must be the highest voxel. By
        default, a box reaching `min_distance` finest-axis voxels along each
        axis (at least one voxel).
    compactness : float, optional
        Compactness of the watershed (:func:`skimage.segmentation.watershed`);
        0 is the classic watershed, larger values give more regular pieces.

    Returns
    -------
    split : ndarray of uint32
        Same shape as `labels`: 0 stays background, and the pieces are
        numbered 1..K, those of one object consecutively, objects in the
        order of their labels (so that unsplit labels 1..N in raster order
        keep that order).

    Raises
    ------
    TypeError
        If `labels` is neither integer nor boolean.
    ValueError
        If `labels` is not 2D or 3D, is empty or negative, or `spacing`,
        `min_distance` or `footprint` is not valid.

    See Also
    --------
    ParticleSplitter : The same as a pipeline step after the labeler.
    skimage.segmentation.watershed, skimage.feature.peak_local_max

    Notes
    -----
    A particle is split where its shape narrows: two touching balls have a
    neck between them, and the distance transform one peak in each ball.
    Irregular single particles can have several peaks too; `min_distance`
    keeps peaks nearer than a particle radius together. Objects are cut to
    their bounding boxes (plus one voxel) before the distance transform, so
    the cost grows with the objects' volume, not with the volume's.

    Examples
    --------
    Two overlapping disks, labelled as one object, are split in two:

    >>> import numpy as np
    >>> from nanoseg.splitting import split_touching
    >>> rows, cols = np.mgrid[:20, :30]
    >>> two = ((rows - 10) ** 2 + (cols - 9) ** 2 <= 36) | ((rows - 10) ** 2 + (cols - 20) ** 2 <= 36)
    >>> labels = two.astype(np.uint32)
    >>> split = split_touching(labels)
    >>> int(split.max()), int(split[10, 9]), int(split[10, 20])
    (2, 1, 2)
    """
    labels = _check_labels(labels)
    ndim = labels.ndim
    spacing = check_spacing(spacing, ndim=ndim, drop_z=True, allow_none=True, allow_scalar=True, warn=False)
    if isinstance(min_distance, bool) or not isinstance(min_distance, Integral | Real) or not (
        np.isfinite(min_distance) and min_distance >= 1
    ):
        raise ValueError(f"min_distance must be a number >= 1 (voxels); got {min_distance!r}.")
    if footprint is None:
        footprint = _footprint(min_distance, spacing)
    else:
        footprint = np.asarray(footprint, dtype=bool)
        if footprint.ndim != ndim or not footprint.any():
            raise ValueError(
                f"footprint must be a {ndim}D boolean array with at least one True, like the labels; "
                f"got shape {footprint.shape}."
            )
    if not (np.isfinite(compactness) and compactness >= 0):
        raise ValueError(f"compactness must be a finite number >= 0; got {compactness!r}.")

    from skimage.segmentation import watershed

    ids = labels.astype(np.uint8) if labels.dtype == bool else labels
    out = np.zeros(labels.shape, dtype=np.uint32)
    scale = np.array(spacing) / min(spacing)
    next_label = 1
    for index, box in enumerate(ndi.find_objects(ids)):
        if box is None:
            continue
        # Two markers must lie `min_distance` apart along some axis: an
        # object shorter than that along every axis stays whole, and most
        # small objects are skipped without a distance transform.
        if max((s.stop - s.start - 1) * f for s, f in zip(box, scale)) < min_distance:
            out[box][ids[box] == index + 1] = next_label
            next_label += 1
            continue
        # One voxel of margin so that the object's outside is background in
        # the crop too; the distance is then that of the whole volume.
        box = tuple(
            slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, labels.shape)
        )
        inside = ids[box] == index + 1
        distance = ndi.distance_transform_edt(inside, sampling=spacing)
        markers, n_markers = _markers(distance, inside, footprint, min_distance, scale)
        target = out[box]
        if markers is None:
            target[inside] = next_label
            next_label += 1
            continue
        pieces = watershed(-distance, markers, mask=inside, compactness=float(compactness))
        missed = inside & (pieces == 0)
        if missed.any():
            # The watershed floods through faces only: voxels joined to the
            # object by an edge or a corner (the labeller's connectivity)
            # are out of its reach. Give them the nearest piece, so that
            # every voxel of the object gets one of the object's pieces.
            nearest = ndi.distance_transform_edt(
                pieces == 0, sampling=spacing, return_distances=False, return_indices=True
            )
            pieces[missed] = pieces[tuple(coordinate[missed] for coordinate in nearest)]
        target[inside] = pieces[inside].astype(np.uint32) + (next_label - 1)
        next_label += n_markers
    if next_label - 1 > np.iinfo(np.uint32).max:
        raise OverflowError("More than 2**32 - 1 pieces: labels no longer fit in uint32.")
    return out


class ParticleSplitter(VolumeEstimatorMixin, TransformerMixin, BaseEstimator):
    """Pipeline step that splits touching particles in label images.

    Place it after :class:`~nanoseg.NanoparticleLabeler`: each labelled
    object is split by :func:`split_touching` at the necks of its shape. The
    splitter is stateless: `fit` only validates.

    Parameters
    ----------
    min_distance : int, default=2
        Minimum distance between the centres of two particles, in voxels of
        the finest axis; see :func:`split_touching`.
    spacing : float or sequence of float, default=None
        Voxel size (z, y, x) of the labels' grid -- after a downsampling
        :class:`~nanoseg.preprocessing.PosteriorSmoother`, the coarse grid's.
        None means isotropic voxels.
    compactness : float, default=0.0
        Compactness of the watershed.

    See Also
    --------
    split_touching : The function this step applies.
    NanoparticleLabeler : Produces the labels.

    Notes
    -----
    Splitting needs every particle whole, as the distance to its border
    depends on all of it. Labels are therefore split in memory: NumPy
    arrays and lists of them (crops). zarr and dask inputs raise
    :class:`NotImplementedError`; compute the labels of a region that
    holds the particles of interest first (``numpy.asarray(labels[...])``).

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.pipeline import Pipeline
    >>> from nanoseg import NanoparticleLabeler
    >>> from nanoseg.splitting import ParticleSplitter
    >>> rows, cols = np.mgrid[:20, :30]
    >>> two = ((rows - 10) ** 2 + (cols - 9) ** 2 <= 36) | ((rows - 10) ** 2 + (cols - 20) ** 2 <= 36)
    >>> posterior = two.astype(np.float32)
    >>> pipe = Pipeline([("labeler", NanoparticleLabeler()), ("split", ParticleSplitter())])
    >>> int(pipe.named_steps["labeler"].transform(posterior).max()), int(pipe.transform(posterior).max())
    (1, 2)
    """

    _parameter_constraints = {
        "min_distance": [Interval(Real, 1, None, closed="left")],
        "spacing": [None, Interval(Real, 0, None, closed="neither"), "array-like"],
        "compactness": [Interval(Real, 0, None, closed="left")],
    }

    def __init__(self, *, min_distance=2, spacing=None, compactness=0.0):
        self.min_distance = min_distance
        self.spacing = spacing
        self.compactness = compactness

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        return tags

    def _volumes(self, X):
        self._validate_params()
        volumes, is_list = as_volumes(X)
        arrays = []
        for volume in volumes:
            if is_lazy(volume.array):
                raise NotImplementedError(
                    f"{volume.name} is a {volume.kind} array, but splitting needs every particle "
                    "whole and works in memory: compute the labels of the region of interest first, "
                    "e.g. numpy.asarray(labels[z0:z1])."
                )
            labels = volume.restore(volume.read(0, volume.shape[0]))
            arrays.append(_check_labels(labels, volume.name))
            check_spacing(
                self.spacing, ndim=labels.ndim, drop_z=True, allow_none=True, allow_scalar=True, warn=False
            )
        return arrays, is_list

    def fit(self, X, y=None):
        """Validate the parameters and `X`; nothing is learned.

        Parameters
        ----------
        X : ndarray or list of ndarray
            Labels (integer, 0 = background) or boolean masks.
        y : ignored
            Present for pipelines. Its shape is not checked: after a
            downsampling :class:`~nanoseg.preprocessing.PosteriorSmoother`
            the labels are coarser than the annotations.

        Returns
        -------
        self : ParticleSplitter
        """
        self._volumes(X)
        return self

    def transform(self, X):
        """Split the touching particles of `X`.

        Parameters
        ----------
        X : ndarray or list of ndarray
            Labels (integer, 0 = background) or boolean masks, (Y, X) or
            (Z, Y, X).

        Returns
        -------
        split : ndarray or list of ndarray, uint32
            Same shape as `X`, pieces numbered 1..K.
        """
        arrays, is_list = self._volumes(X)
        return map_volumes(
            lambda labels: split_touching(
                labels,
                spacing=self.spacing,
                min_distance=self.min_distance,
                compactness=self.compactness,
            ),
            arrays,
            is_list,
        )
