"""The mixture's EM updates as one compiled loop, identical to NumPy's to the bit.

:func:`nanoseg._model.fit_particle_pmf` makes thousands of updates on 256
bins; in NumPy each update is a dozen calls of a microsecond or more on
arrays that take nanoseconds to compute, so the fit of a small volume spent
about 0.1 s there. The loop below makes the same IEEE operations in the same
order, so it gives the same PMF to the bit:

* element-wise products, quotients, sums and maxima are exactly rounded
  wherever they are computed (numba adds no fused multiply-adds without
  ``fastmath``);
* every sum over the bins follows NumPy's pairwise summation
  (:func:`_k_pairwise_sum`), whose order fixes the rounding.

Only the logarithm may differ: NumPy may use its own vectorised ``log``,
numba the C library's, and the two can differ in the last bits. The log
enters only the negative log-likelihood, which decides when to stop. So the
loop returns whenever a stopping test comes within a safe margin of the
other outcome; the caller decides that test with NumPy's log on the same
(identical) PMFs and resumes the loop if it goes on. The number of updates is
then NumPy's in every case. Near convergence EM's steps shrink slowly, so a
fit hands back the tests of a dozen or two of its last updates (14-18 of
8,500-8,800 on the benchmark phantoms), each costing two NumPy likelihoods.
"""

from __future__ import annotations

import functools

import numpy as np

from . import _numba

#: Outcomes of the compiled loop.
DONE, RAN_OUT, COLLAPSED, UNSURE = 0, 1, 2, 3

#: Margin, relative to the likelihood, around ``tol`` within which a
#: stopping test is left to NumPy: about ten times the most that last-bit
#: differences of 256 logarithms, and the roundings they change, can shift
#: the likelihood by (on the benchmark phantoms the two likelihoods were
#: equal at every test handed back).
STOP_MARGIN = 1e-13

# NumPy's pairwise summation sums blocks of up to 128 numbers with eight
# accumulators and splits longer runs in two, at a multiple of eight.
_PAIRWISE_BLOCK = 128


def _k_block_sum(a, start, n):
    # One block of NumPy's pairwise summation (n <= 128).
    if n < 8:
        res = 0.0
        for i in range(start, start + n):
            res += a[i]
        return res
    r0 = a[start]
    r1 = a[start + 1]
    r2 = a[start + 2]
    r3 = a[start + 3]
    r4 = a[start + 4]
    r5 = a[start + 5]
    r6 = a[start + 6]
    r7 = a[start + 7]
    i = 8
    stop = n - n % 8
    while i < stop:
        r0 += a[start + i]
        r1 += a[start + i + 1]
        r2 += a[start + i + 2]
        r3 += a[start + i + 3]
        r4 += a[start + i + 4]
        r5 += a[start + i + 5]
        r6 += a[start + i + 6]
        r7 += a[start + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[start + i]
        i += 1
    return res


def _k_halves(n):
    # Where NumPy splits a run of n > 128: at half, rounded down to a multiple of 8.
    half = n // 2
    return half - half % 8


def _k_pairwise_sum(a, start, n):
    if n <= _PAIRWISE_BLOCK:
        return _k_block_sum(a, start, n)
    half = _k_halves(n)
    if n - half <= _PAIRWISE_BLOCK:  # the EM's 256 bins: one split
        return _k_block_sum(a, start, half) + _k_block_sum(a, start + half, n - half)
    # Longer runs: the recursion NumPy makes, unrolled on a stack (numba
    # cannot cache recursive functions). Each entry is a run still to sum,
    # or (n = -1) the marker that adds the two sums above it.
    runs = np.empty((192, 2), dtype=np.int64)
    sums = np.empty(64)
    top = 0
    depth = 0
    runs[0, 0] = start
    runs[0, 1] = n
    top = 1
    while top:
        top -= 1
        first, size = runs[top, 0], runs[top, 1]
        if size < 0:
            depth -= 1
            sums[depth - 1] = sums[depth - 1] + sums[depth]
        elif size <= _PAIRWISE_BLOCK:
            sums[depth] = _k_block_sum(a, first, size)
            depth += 1
        else:
            half = _k_halves(size)
            runs[top, 0], runs[top, 1] = 0, -1
            runs[top + 1, 0], runs[top + 1, 1] = first + half, size - half
            runs[top + 2, 0], runs[top + 2, 1] = first, half
            top += 3
    return sums[0]


def _k_sum(a):
    # ndarray.sum() of a contiguous float64 vector: the identity 0.0 plus
    # the pairwise sum of all elements.
    return 0.0 + _k_pairwise_sum(a, 0, a.size)


def _k_mixture(w_bg, p_bg, p_np, eps, weighted_bg, denominator):
    # w_bg p_bg, and the mixture w_bg p_bg + (1 - w_bg) p_np + eps, in the
    # NumPy loop's order of operations.
    for k in range(p_bg.size):
        weighted_bg[k] = w_bg * p_bg[k]
        denominator[k] = weighted_bg[k] + (1.0 - w_bg) * p_np[k]
        denominator[k] = denominator[k] + eps


def _k_em(p_stack, p_bg, p_np, w_bg, nll_prev, first, max_iter, tol, eps, margin, p_before):
    n = p_stack.size
    weighted_bg = np.empty(n)
    denominator = np.empty(n)
    gamma_bg = np.empty(n)
    work = np.empty(n)
    p_np = p_np.copy()
    _k_mixture(w_bg, p_bg, p_np, eps, weighted_bg, denominator)
    nll = np.nan
    w_before = w_bg
    for iteration in range(first, max_iter):
        w_before = w_bg
        for k in range(n):
            # Element by element, not p_before[:] = p_np: numba compiles a slice
            # assignment's shape-mismatch error message, seconds of a first run.
            p_before[k] = p_np[k]
            gamma_bg[k] = weighted_bg[k] / denominator[k]
            work[k] = (1.0 - gamma_bg[k]) * p_stack[k]
        mass = _k_sum(work)
        if not mass > eps:
            return p_np, w_bg, w_before, nll, iteration, COLLAPSED, mass
        for k in range(n):
            p_np[k] = max(work[k] / mass, eps)
        total = _k_sum(p_np)
        for k in range(n):
            p_np[k] = p_np[k] / total
            work[k] = p_stack[k] * gamma_bg[k]
        w_bg = min(max(_k_sum(work), eps), 1.0 - eps)
        _k_mixture(w_bg, p_bg, p_np, eps, weighted_bg, denominator)
        for k in range(n):
            work[k] = np.log(denominator[k]) * p_stack[k]
        nll = -_k_sum(work)
        step = nll_prev - nll
        if abs(step - tol) <= margin * max(abs(nll), 1.0):
            return p_np, w_bg, w_before, nll, iteration + 1, UNSURE, mass
        if step < tol:
            return p_np, w_bg, w_before, nll, iteration + 1, DONE, mass
        nll_prev = nll
    return p_np, w_bg, w_before, nll, max_iter, RAN_OUT, 0.0


@functools.cache
def _compiled():
    return _numba.compile_into(globals(), ("_k_block_sum", "_k_halves", "_k_pairwise_sum", "_k_sum", "_k_mixture", "_k_em"))


def compiled_em(p_stack, p_bg, p_np, w_bg, nll_prev, first, *, max_iter, tol, eps):
    """Run the EM updates of :func:`nanoseg._model.fit_particle_pmf` compiled,
    from update `first` (0-based) with the previous likelihood `nll_prev`.

    Parameters
    ----------
    p_stack, p_bg, p_np : (256,) float64 C-contiguous arrays
        The stack PMF, the fixed background PMF and the particle PMF to start from.
    w_bg : float
        The background weight to start from.

    Returns
    -------
    p_np, w_bg : the state after the last update made
    p_before, w_before : the state before it
    nll : float
        The likelihood after the last update, with numba's log.
    n_iter : int
        Updates made in all, counting from the start of the whole fit.
    status : int
        :data:`DONE` (the stopping test passed), :data:`RAN_OUT` (`max_iter`
        reached), :data:`COLLAPSED` (the particle mass `mass` fell to `eps` or
        below at update ``n_iter``) or :data:`UNSURE`: the last stopping test
        was within :data:`STOP_MARGIN` of the other outcome; the caller
        decides it with NumPy's log and resumes if it goes on.
    mass : float
    """
    kernel = _compiled()["_k_em"]
    p_before = np.empty_like(p_np)
    p_np, w_bg, w_before, nll, n_iter, status, mass = kernel(
        p_stack, p_bg, p_np, float(w_bg), float(nll_prev), int(first), int(max_iter), float(tol), float(eps),
        STOP_MARGIN, p_before,
    )
    return p_np, float(w_bg), p_before, float(w_before), float(nll), int(n_iter), int(status), float(mass)
