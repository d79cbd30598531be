"""Thresholding a posterior block, checking on the way that it holds probabilities.

Lazy posteriors are validated block by block as the labeler thresholds them.
With NumPy that is three passes over the float block (minimum, maximum,
comparison); the compiled loop reads each value once, writes the mask and
counts the values outside [0, 1] (NaN included) without a branch, about
three times faster. float16 blocks, which numba cannot read, and device
arrays take the NumPy passes.
"""

from __future__ import annotations

import functools

import numpy as np

from . import _numba


def _k_threshold(values, threshold, out):
    # values: (n,) float32 or float64; out: (n,) bool. NaN fails both
    # comparisons, so it counts as outside [0, 1].
    outside = 0
    for k in range(values.size):
        v = values[k]
        out[k] = v >= threshold
        outside += not (v >= 0.0 and v <= 1.0)
    return outside


@functools.cache
def _compiled():
    return _numba.compile_into(globals(), ("_k_threshold",))


def threshold_probabilities(values, threshold):
    """``values >= threshold``, and whether every value is a probability.

    Parameters
    ----------
    values : ndarray of float
        A posterior block, NumPy or CuPy.
    threshold : float

    Returns
    -------
    mask : bool array of the same shape and kind
    valid : bool
        True when every value is finite and within [0, 1].
    """
    if isinstance(values, np.ndarray) and values.dtype in (np.float32, np.float64) and _numba.available():
        out = np.empty(values.shape, dtype=bool)
        outside = _compiled()["_k_threshold"](
            np.ascontiguousarray(values).reshape(-1), values.dtype.type(threshold), out.reshape(-1)
        )
        return out, outside == 0
    if values.size == 0:
        return values >= threshold, True
    low, high = float(values.min()), float(values.max())
    return values >= threshold, bool(0.0 <= low and high <= 1.0)
