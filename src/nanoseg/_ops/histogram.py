"""Intensity histograms of slices: NumPy, numba and CUDA variants behind one call.

Every pass of the mixture counts 256-bin histograms, per slice or per slab,
so this is the hottest kernel. On the CPU a compiled loop
(:func:`compiled_slice_histograms`) counts bytes at several Gvoxel/s without
the GIL; on a GPU a hand-written CUDA kernel counts in shared memory; the
generic code (``bincount``, spelled alike by NumPy and CuPy) is the fallback
on both and the reference the others are tested against.
"""

from __future__ import annotations

import functools

import numpy as np

from .. import _backend
from .._model import N_BINS
from . import _numba


# -- CPU: compiled loop -------------------------------------------------------
def _k_plane_histograms(planes, out):
    # planes: (n, m) uint8, out: (n, 256) int64. Bytes are loaded eight at a
    # time as one 64-bit word (fewer loads than one per byte: about 8 %
    # faster on 2048 x 2048 planes), and counted into four partial
    # histograms, which break the store-to-load dependency between equal
    # neighbouring values.
    partial = np.zeros((4, 256), dtype=np.int64)
    for i in range(planes.shape[0]):
        partial[:] = 0
        row = planes[i]
        m = row.size
        n_words = m // 8
        words = row[: 8 * n_words].view(np.uint64)  # x86 loads need no alignment
        for k in range(n_words):
            w = words[k]
            partial[0, w & 0xFF] += 1
            partial[1, (w >> 8) & 0xFF] += 1
            partial[2, (w >> 16) & 0xFF] += 1
            partial[3, (w >> 24) & 0xFF] += 1
            partial[0, (w >> 32) & 0xFF] += 1
            partial[1, (w >> 40) & 0xFF] += 1
            partial[2, (w >> 48) & 0xFF] += 1
            partial[3, w >> 56] += 1
        for k in range(8 * n_words, m):
            partial[0, row[k]] += 1
        for b in range(256):
            out[i, b] = partial[0, b] + partial[1, b] + partial[2, b] + partial[3, b]
    return out


@functools.cache
def _compiled():
    return _numba.compile_into(globals(), ("_k_plane_histograms",))


def compiled_slice_histograms(slab):
    """(n, 256) int64 histograms of a (n, ...) uint8 NumPy array's slices, by the compiled loop."""
    planes = np.ascontiguousarray(slab).reshape(slab.shape[0], -1)
    return _compiled()["_k_plane_histograms"](planes, np.empty((slab.shape[0], 256), dtype=np.int64))


# -- GPU: CUDA kernel ---------------------------------------------------------
# -- CUDA kernels ------------------------------------------------------------
_HISTOGRAM_SOURCE = r"""
extern "C" __global__
void plane_histograms(const unsigned char* values, const bool* mask, const int use_mask,
                      const long long plane_size, unsigned long long* out)
{
    // One 256-bin histogram per plane (blockIdx.y); each block counts its
    // share of the plane in shared memory, then adds it to the plane's row.
    __shared__ unsigned int counts[256];
    for (int b = threadIdx.x; b < 256; b += blockDim.x) counts[b] = 0;
    __syncthreads();
    const long long base = (long long)blockIdx.y * plane_size;
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < plane_size; k += step) {
        if (!use_mask || mask[base + k]) atomicAdd(&counts[values[base + k]], 1u);
    }
    __syncthreads();
    for (int b = threadIdx.x; b < 256; b += blockDim.x) {
        if (counts[b]) atomicAdd(&out[(long long)blockIdx.y * 256 + b], (unsigned long long)counts[b]);
    }
}
"""



class CudaHistograms:
    """Per-plane histograms by a hand-written CUDA kernel.

    ``cupy.bincount`` adds every voxel to one of a few hundred counters in
    global memory (and synchronises to size its output); counting in shared
    memory per block and merging once per block is much faster and queues
    without a synchronisation.
    """

    THREADS = 256
    MAX_PLANES = 65535  # the grid's y dimension

    def __init__(self, cupy):
        self.cupy = cupy
        self._kernel = cupy.RawKernel(_HISTOGRAM_SOURCE, "plane_histograms")

    def __call__(self, values, mask=None):
        """(n, 256) int64 counts of each plane of a (n, ...) uint8 array, within `mask`."""
        cp = self.cupy
        n = values.shape[0]
        planes = cp.ascontiguousarray(values).reshape(n, -1)
        plane_size = planes.shape[1]
        masks = planes if mask is None else cp.ascontiguousarray(mask, dtype=bool).reshape(n, -1)
        out = cp.zeros((n, 256), dtype=cp.uint64)
        blocks = max(1, min(1024, -(-plane_size // (self.THREADS * 16))))
        for first in range(0, n, self.MAX_PLANES):
            last = min(n, first + self.MAX_PLANES)
            self._kernel(
                (blocks, last - first),
                (self.THREADS,),
                (planes[first:last], masks[first:last], np.int32(mask is not None), np.int64(plane_size), out[first:last]),
            )
        return out.view(cp.int64)


@functools.cache
def _cuda_histograms(xp):
    return CudaHistograms(xp)


def _cuda(backend):
    """The CUDA histogram kernel for a CuPy backend, unless switched off (``_backend.FAST_KERNELS``)."""
    if backend.is_gpu and _backend.FAST_KERNELS and getattr(backend.xp, "__name__", "") == "cupy":
        return _cuda_histograms(backend.xp)
    return None


# -- one call -----------------------------------------------------------------
def histogram(backend, values):
    """256-bin histogram (int64) of uint8 `values` of any shape.

    Without the compiled loop, pairs of bytes are counted on the CPU as
    16-bit words (65536 bins) and folded back to 256 bins: half as many
    elements for ``bincount``, which roughly doubles its speed; the counts
    are exact.
    """
    xp = backend.xp
    if backend.name == "cpu" and _numba.available():
        return compiled_slice_histograms(values.reshape(1, -1))[0]
    if _cuda(backend) is not None:
        return _cuda(backend)(values.reshape(1, -1))[0]
    flat = values.reshape(-1)
    if backend.name != "cpu" or flat.size < 2**16:
        return xp.bincount(flat, minlength=N_BINS).astype(np.int64, copy=False)
    flat = np.ascontiguousarray(flat)
    even = flat.size - flat.size % 2
    pairs = np.bincount(flat[:even].view(np.uint16), minlength=N_BINS * N_BINS)
    pairs = pairs.reshape(N_BINS, N_BINS)
    hist = pairs.sum(axis=0) + pairs.sum(axis=1)
    if even < flat.size:
        hist[flat[-1]] += 1
    return hist.astype(np.int64, copy=False)


def slice_histograms(backend, slab):
    """Histogram of every slice of a (n, Y, X) uint8 slab: (n, 256) int64."""
    xp = backend.xp
    if backend.name == "cpu" and _numba.available():
        return compiled_slice_histograms(slab)
    if _cuda(backend) is not None:
        return _cuda(backend)(slab)
    out = xp.empty((slab.shape[0], N_BINS), dtype=np.int64)
    for i in range(slab.shape[0]):
        out[i] = histogram(backend, slab[i])
    return out


def masked_slice_histograms(backend, slab, mask):
    """Histogram of the voxels of each slice of `slab` where `mask` is True: (n, 256) int64."""
    xp = backend.xp
    if _cuda(backend) is not None:
        return _cuda(backend)(slab, mask)
    out = xp.empty((slab.shape[0], N_BINS), dtype=np.int64)
    for i in range(slab.shape[0]):
        out[i] = xp.bincount(slab[i][mask[i]], minlength=N_BINS)
    return out
