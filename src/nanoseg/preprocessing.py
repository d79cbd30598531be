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

# The estimators live in private modules, one per step, and carry this
# module's name, under which they are documented, pickled and named in model
# files. The two functions are defined here, over private implementations:
# doctest credits a function's examples to the module that defines it, and
# theirs run as this module's.
from ._background import BackgroundSubtractor
from ._blocks import repeat_blocks
from ._equalize import SliceEqualizer
from ._scoring import _FullResolutionScorer
from ._smoothing import PosteriorSmoother

__all__ = [
    "SliceEqualizer",
    "BackgroundSubtractor",
    "PosteriorSmoother",
    "upsample",
    "full_resolution_scorer",
]


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
    return repeat_blocks(labels, factors, shape)


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
