"""Annotated crops as training targets: dense masks, instance labels or sparse scribbles.

Conventions (as in ilastik and scikit-learn's semi-supervised estimators):

* a boolean mask: True is particle, False background, every voxel annotated;
* integer labels: 0 is background and positive values are particles (one
  value per particle for instance labels);
* -1 marks voxels that are not annotated: they are never used for training
  nor for measuring anything.

From instance labels, the voxels of a particle that lie within
`border_width` voxels of another particle form a third class, the *border*
between touching particles (the border-core representation): a classifier
that learns it keeps touching particles apart.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi

#: Class codes of the training targets.
UNLABELLED, BACKGROUND, PARTICLE, BORDER = -1, 0, 1, 2


def check_annotation(y, shape, name="y"):
    """`y` as an int32 array of -1 (not annotated), 0 (background) and particle ids.

    Raises
    ------
    ValueError
        For a float or otherwise non-integer array, values below -1, or a
        shape other than `shape`.
    """
    from ._backend import to_numpy
    from ._plan import compute
    from ._volume import is_dask_array

    if is_dask_array(y):
        (y,) = compute(y)
    y = to_numpy(y[...] if hasattr(y, "chunks") and not isinstance(y, np.ndarray) else y)
    y = np.asarray(y)
    if tuple(y.shape) != tuple(shape):
        raise ValueError(
            f"{name} has shape {tuple(y.shape)} but the image it annotates has shape {tuple(shape)}; "
            "annotations must have exactly the shape of their images."
        )
    if y.dtype == bool:
        return y.astype(np.int32)
    if y.dtype.kind not in "iu":
        raise ValueError(
            f"{name} must be a boolean mask or integer labels (0 background, positive particles, "
            f"-1 not annotated); got dtype {y.dtype}. Convert a probability map with `{name} > 0.5`."
        )
    if y.size and y.min() < UNLABELLED:
        raise ValueError(f"{name} has values below -1; use -1 for voxels that are not annotated.")
    if y.size and y.dtype.kind == "u" and y.max() > np.iinfo(np.int32).max:
        raise ValueError(f"{name} has labels above 2**31 - 1; relabel them sequentially.")
    return y.astype(np.int32, copy=False)


def touching_borders(labels, width, is_2d):
    """Voxels of each particle within `width` voxels of another particle."""
    particles = labels > 0
    if width <= 0 or not particles.any():
        return np.zeros(labels.shape, dtype=bool)
    size = (1 if is_2d else 2 * width + 1, 2 * width + 1, 2 * width + 1)
    if labels.ndim == 2:
        size = size[1:]
    positive = np.where(particles, labels, 0)
    highest = ndi.maximum_filter(positive, size=size, mode="constant", cval=0)
    big = np.iinfo(np.int32).max
    lowest = ndi.minimum_filter(np.where(particles, labels, big), size=size, mode="constant", cval=big)
    return particles & ((highest > labels) | (lowest < labels))


def classes(labels, border_width=0, is_2d=False):
    """Class map of an annotation: -1, background 0, particle 1 and, from instances, border 2."""
    out = np.full(labels.shape, UNLABELLED, dtype=np.int8)
    out[labels == 0] = BACKGROUND
    out[labels > 0] = PARTICLE
    if border_width > 0 and labels.max(initial=0) > 1:
        out[touching_borders(labels, border_width, is_2d)] = BORDER
    return out


def sample(class_maps, max_samples, random_state):
    """Pick training voxels, balanced between classes.

    Each class gets up to ``max_samples // n_classes`` voxels, drawn
    uniformly among its annotated voxels over all crops.

    Returns
    -------
    picks : list of ndarray of int64
        Flat indices into each crop.
    targets : list of ndarray of int8
        Their classes.
    """
    rng = np.random.default_rng(random_state)
    present = sorted({int(c) for m in class_maps for c in np.unique(m) if c != UNLABELLED})
    quota = max(1, max_samples // max(1, len(present)))
    picks = [[] for _ in class_maps]
    for cls in present:
        counts = [int(np.count_nonzero(m == cls)) for m in class_maps]
        total = sum(counts)
        chosen = np.sort(rng.choice(total, size=min(quota, total), replace=False))
        bounds = np.cumsum([0, *counts])
        for i, m in enumerate(class_maps):
            mine = chosen[(chosen >= bounds[i]) & (chosen < bounds[i + 1])] - bounds[i]
            if mine.size:
                picks[i].append(np.flatnonzero(m.ravel() == cls)[mine])
    picks = [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in picks]
    targets = [m.ravel()[p] for m, p in zip(class_maps, picks)]
    return picks, targets
