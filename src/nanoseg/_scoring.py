"""Scoring a downsampling pipeline against annotations at full resolution.

A pipeline whose :class:`~nanoseg.preprocessing.PosteriorSmoother` averages
over blocks returns labels on the block grid. The scorer that
:func:`nanoseg.preprocessing.full_resolution_scorer` returns brings those
labels back to the annotations' grid, with the block sizes of the pipeline's
smoothers, before the wrapped scorer sees them.
"""

from __future__ import annotations

import numpy as np

from ._blocks import repeat_blocks
from ._smoothing import PosteriorSmoother


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
                out = repeat_blocks(out, tuple(int(f) for f in factors), shape)
            restored.append(out)
        return self.scorer(_Precomputed(restored if is_list else restored[0]), X, y)

    def __repr__(self):
        return f"full_resolution_scorer({self.scorer!r})"


# Pickled scorers name the class as nanoseg.preprocessing's, a path that stays
# put while the implementation may move.
_FullResolutionScorer.__module__ = "nanoseg.preprocessing"
