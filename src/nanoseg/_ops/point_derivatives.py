"""Gradient magnitude and Hessian eigenvalues at chosen voxels, in one compiled pass.

The classifier's derivative features are central finite differences of a
smoothed image, read at a crop's chosen voxels and their neighbours (19 of
them in 3D: the voxel, two per axis, four per pair of axes). Written with
NumPy, each feature is a dozen gathers and array operations over the chosen
voxels, all holding the interpreter: on the benchmark phantom they took a
quarter of the classification and kept a second thread waiting. Here one
loop finds each neighbour once per crop (:func:`neighbour_positions`, and
:func:`ranks` where a smoothed image is known at some voxels only) and one
more computes every derivative feature of a scale from them
(:func:`derivatives`), without the GIL.

The arithmetic is that of the NumPy code in :mod:`nanoseg._ops.filters`
step by step (float32 differences, float64 eigenvalues), so the features
agree with it to the last bit or, where the float64 cosines of the two
libraries differ, to float32 rounding.
"""

from __future__ import annotations

import functools
import math
import threading

import numpy as np

from . import _numba


def stencil_offsets(axes):
    """Neighbour offsets (z, y, x), int64 (n, 3): the voxel; plus and minus one step
    along each of `axes`; then for each pair of axes ``(i, j)``, ``i < j``, the four
    diagonal steps ``(+i +j), (+i -j), (-i +j), (-i -j)``."""
    offsets = [(0, 0, 0)]
    for axis in axes:
        for step in (1, -1):
            offset = [0, 0, 0]
            offset[axis] = step
            offsets.append(tuple(offset))
    for k, i in enumerate(axes):
        for j in axes[k + 1 :]:
            for a in (1, -1):
                for b in (1, -1):
                    offset = [0, 0, 0]
                    offset[i], offset[j] = a, b
                    offsets.append(tuple(offset))
    return np.array(offsets, dtype=np.int64)


def _k_positions(flat, shape, offsets, out):
    # out[k, o]: flat index of voxel flat[k] + offsets[o], clamped to the crop.
    n_z, n_y, n_x = shape[0], shape[1], shape[2]
    plane = n_y * n_x
    for k in range(flat.size):
        f = flat[k]
        z = f // plane
        rest = f - z * plane
        y = rest // n_x
        x = rest - y * n_x
        for o in range(offsets.shape[0]):
            zz = min(max(z + offsets[o, 0], 0), n_z - 1)
            yy = min(max(y + offsets[o, 1], 0), n_y - 1)
            xx = min(max(x + offsets[o, 2], 0), n_x - 1)
            out[k, o] = (zz * n_y + yy) * n_x + xx
    return out


def _k_ranks(neighbours, sampled, table, out):
    # out[k, o]: index of neighbours[k, o] in the sorted `sampled`, through
    # `table` (crop-sized scratch: only the sampled voxels' entries are set
    # and read).
    for i in range(sampled.size):
        table[sampled[i]] = i
    for k in range(neighbours.shape[0]):
        for o in range(neighbours.shape[1]):
            out[k, o] = table[neighbours[k, o]]
    return out


def _k_derivatives(values, pos, n_axes, scale, gradient, hessian):
    # Per chosen voxel k, from the smoothed values at its neighbours
    # values[pos[k, o]] (offsets as stencil_offsets over the last n_axes axes):
    # gradient[k] = |first differences| * scale, and the Hessian's eigenvalues
    # (decreasing) * scale**2 in hessian[:, k]. Either output may be empty.
    half = np.float32(0.5)
    quarter = np.float32(0.25)
    two = np.float32(2.0)
    scale32 = np.float32(scale)
    scale2 = scale * scale
    want_gradient = gradient.size > 0
    want_hessian = hessian.size > 0
    first = np.empty(3, dtype=np.float32)
    second = np.empty((3, 3), dtype=np.float32)
    n_pairs_start = 1 + 2 * n_axes
    for k in range(pos.shape[0]):
        centre = values[pos[k, 0]]
        for a in range(n_axes):
            plus = values[pos[k, 1 + 2 * a]]
            minus = values[pos[k, 2 + 2 * a]]
            first[a] = half * (plus - minus)
            second[a, a] = (plus - two * centre) + minus
        if want_gradient:
            total = np.float32(0.0)
            for a in range(n_axes):
                total = total + first[a] * first[a]
            gradient[k] = np.sqrt(total) * scale32
        if not want_hessian:
            continue
        o = n_pairs_start
        for i in range(n_axes):
            for j in range(i + 1, n_axes):
                pp = values[pos[k, o]]
                pm = values[pos[k, o + 1]]
                mp = values[pos[k, o + 2]]
                mm = values[pos[k, o + 3]]
                second[i, j] = quarter * (((pp - pm) - mp) + mm)
                o += 4
        if n_axes == 2:
            # filters._eigenvalues_2d (float32), with rows/columns (y, x).
            hyy, hxy, hxx = second[0, 0], second[0, 1], second[1, 1]
            half_trace = half * (hxx + hyy)
            difference = hxx - hyy
            root = np.sqrt(quarter * (difference * difference) + hxy * hxy)
            s2 = np.float32(scale2)
            hessian[0, k] = (half_trace + root) * s2
            hessian[1, k] = (half_trace - root) * s2
            continue
        # filters._eigenvalues_3d (float64).
        a_ = np.float64(second[0, 0])
        b_ = np.float64(second[1, 1])
        c_ = np.float64(second[2, 2])
        d_ = np.float64(second[0, 1])
        e_ = np.float64(second[0, 2])
        f_ = np.float64(second[1, 2])
        q = (a_ + b_ + c_) / 3.0
        off = d_ * d_ + e_ * e_ + f_ * f_
        p2 = (a_ - q) ** 2 + (b_ - q) ** 2 + (c_ - q) ** 2 + 2.0 * off
        p = np.sqrt(p2 / 6.0)
        safe = p if p > 0 else 1.0
        ba, bb, bc = (a_ - q) / safe, (b_ - q) / safe, (c_ - q) / safe
        bd, be, bf = d_ / safe, e_ / safe, f_ / safe
        det = ba * (bb * bc - bf * bf) - bd * (bd * bc - bf * be) + be * (bd * bf - bb * be)
        r = min(max(det / 2.0, -1.0), 1.0)
        phi = np.arccos(r) / 3.0
        largest = q + 2.0 * p * np.cos(phi)
        smallest = q + 2.0 * p * np.cos(phi + 2.0 * math.pi / 3.0)
        middle = 3.0 * q - largest - smallest
        hessian[0, k] = np.float32(largest * scale2)
        hessian[1, k] = np.float32(middle * scale2)
        hessian[2, k] = np.float32(smallest * scale2)
    return gradient, hessian


@functools.cache
def _compiled():
    return _numba.compile_into(globals(), ("_k_positions", "_k_ranks", "_k_derivatives"))


def available():
    """True when the compiled loops can be used."""
    return _numba.available()


def neighbour_positions(flat, shape, offsets):
    """Flat indices of the chosen voxels' neighbours, (n, len(offsets)) int64.

    Parameters
    ----------
    flat : ndarray of int64
        Flat (C-order) indices of the chosen voxels in a crop of `shape`.
    offsets : ndarray, (m, 3) int64
        From :func:`stencil_offsets`; neighbours beyond the crop are clamped to it.
    """
    out = np.empty((flat.size, offsets.shape[0]), dtype=np.int64)
    shape = np.asarray(shape, dtype=np.int64)
    return _compiled()["_k_positions"](np.asarray(flat, dtype=np.int64), shape, offsets, out)


_SCRATCH = threading.local()


def _scratch(size, dtype):
    # A per-thread buffer of at least `size` entries, kept between calls
    # (and for the thread's life): a fresh crop-sized table per crop would
    # cost its page faults every time.
    buffer = getattr(_SCRATCH, "table", None)
    if buffer is None or buffer.size < size or buffer.dtype != dtype:
        buffer = np.empty(max(size, 1), dtype=dtype)
        _SCRATCH.table = buffer
    return buffer


def ranks(neighbours, sampled, size):
    """Positions of `neighbours` (flat indices in a crop of `size` voxels) in the
    sorted flat indices `sampled`, which must hold every one of them."""
    out = np.empty(neighbours.shape, dtype=np.int64)
    # Positions are below the number of sampled voxels: 32 bits halve the table.
    dtype = np.int32 if sampled.size < 2**31 else np.int64
    return _compiled()["_k_ranks"](neighbours, np.asarray(sampled, dtype=np.int64), _scratch(size, dtype), out)


def derivatives(values, positions, n_axes, scale, gradient=True, hessian=True):
    """Gradient magnitude and Hessian eigenvalues at chosen voxels of a smoothed image.

    Parameters
    ----------
    values : ndarray of float32
        The smoothed image, flat (or its values at sampled voxels).
    positions : ndarray, (n, m) int64
        From :func:`neighbour_positions`, with offsets over `n_axes` axes.
    n_axes : {2, 3}
    scale : float
        The scale's largest sigma: derivatives are scale-normalised.

    Returns
    -------
    gradient : ndarray, (n,) float32, or None
    eigenvalues : ndarray, (n_axes, n) float32, decreasing, or None
    """
    n = positions.shape[0]
    g = np.empty(n if gradient else 0, dtype=np.float32)
    h = np.empty((n_axes, n) if hessian else (0, 0), dtype=np.float32)
    _compiled()["_k_derivatives"](values, positions, n_axes, float(scale), g, h)
    return (g if gradient else None), (h if hessian else None)
