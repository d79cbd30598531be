"""Pure math of the two-component intensity model, on 256-bin histograms.

Everything here works on small NumPy arrays (histograms, PMFs, per-slice
weights): no image data ever reaches this module, which is why it has no
backend dispatch. The estimators in :mod:`nanoseg.mixture` orchestrate it.

Notation: ``p_bg`` is the background PMF, ``p_np`` the nanoparticle (NP) PMF,
``w_bg`` the stack-level background weight and ``pi`` a per-slice NP weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_BINS = 256


# With polarity="dark" the model sees intensities 255 - v: a histogram (or
# PMF, or table) indexed by raw intensity is reversed to enter model space and
# reversed again to leave it. Copies keep the arrays contiguous, so sums over
# model space run exactly as they would for the bright model.
def mirror(array, dark):
    """`array` (indexed by intensity along its last axis) in model space, and back."""
    if dark:
        return np.ascontiguousarray(np.asarray(array)[..., ::-1])
    return array


def mirror_level(level, dark):
    """An intensity level in model space, and back."""
    return 255 - level if dark else level


def normalize_pmf(hist, eps):
    """Turn counts into a PMF with every bin floored at `eps`.

    An all-zero histogram gives the uniform PMF. The floor keeps every log in
    the likelihoods finite; the PMF is renormalised after flooring so that it
    still sums to one.

    Parameters
    ----------
    hist : (256,) array_like
        Non-negative counts or weights.
    eps : float
        Floor applied to every bin after the first normalisation.

    Returns
    -------
    pmf : (256,) ndarray of float64
    """
    pmf = np.asarray(hist, dtype=np.float64).copy()
    total = pmf.sum()
    if total == 0:
        return np.full(pmf.shape, 1.0 / pmf.size)
    pmf /= total
    np.maximum(pmf, eps, out=pmf)
    pmf /= pmf.sum()
    return pmf


def percentile_intensity(pmf, percentile):
    """Smallest intensity whose cumulative probability reaches `percentile` %.

    Implemented as a left ``searchsorted`` on the cumulative sum, so a
    percentile of 100 may return 256 when rounding keeps the total below one:
    "no intensity qualifies".
    """
    return int(np.searchsorted(np.cumsum(pmf), percentile / 100.0))


def otsu_intensity(hist):
    """Otsu's threshold of a histogram (256 bins, or 65,536 for 16-bit counts): intensities above it are the bright class.

    The level maximises the between-class variance of the split ``v <= t``
    against ``v > t`` (scikit-image's :func:`~skimage.filters.threshold_otsu`
    on the counts, bin ``v`` at intensity ``v``).
    """
    from skimage.filters import threshold_otsu

    return int(threshold_otsu(hist=np.asarray(hist, dtype=np.float64)))


def monotone_particle_pmf(particle_pmf, background_pmf):
    """The NP PMF closest to `particle_pmf` whose posterior never falls with intensity.

    For any slice weight, the posterior ``pi p_np / (pi p_np + (1 - pi) p_bg)``
    rises with intensity exactly where the likelihood ratio
    ``r = p_np / p_bg`` does. The ratio is replaced by its isotonic
    (non-decreasing) regression weighted by ``p_bg``: the least-squares
    non-decreasing fit, which pools a run of bins that break the order into
    their ``p_bg``-weighted mean ratio. Because the weighted mean is kept,
    ``sum(r_iso * p_bg) = sum(p_np) = 1``: the constrained PMF needs no
    renormalisation beyond rounding. It is not floored at `eps` either: on
    bins the background never reached (``p_bg`` at the floor) a floored NP
    PMF would give a posterior of about half the slice weight, out of order
    with the neighbouring bins; unfloored, those bins get their pooled ratio
    like the others. (Every log of the model adds `eps` to the mixture, so
    no floor is needed to keep it finite.)

    Why: EM with the background PMF held fixed gives the NP component any
    intensity the background histogram under-represents, including dark
    ones (e.g. when seeds' halos remove the darkest background pixels), so
    the unconstrained posterior can be high far below the particles'
    intensities.

    Parameters
    ----------
    particle_pmf, background_pmf : (256,) ndarray
        PMFs in model space (particles at the high end); `background_pmf`
        floored above zero, as :func:`normalize_pmf` leaves it.

    Returns
    -------
    pmf : (256,) ndarray of float64
        Positive wherever `background_pmf` is.
    """
    from sklearn.isotonic import isotonic_regression

    p_bg = np.asarray(background_pmf, dtype=np.float64)
    ratio = np.asarray(particle_pmf, dtype=np.float64) / p_bg
    pmf = np.asarray(isotonic_regression(ratio, sample_weight=p_bg, increasing=True)) * p_bg
    return pmf / pmf.sum()


@dataclass(frozen=True)
class EMResult:
    """Outcome of :func:`fit_particle_pmf`."""

    particle_pmf: np.ndarray
    background_weight: float
    neg_log_likelihood: float
    n_iter: int
    converged: bool


class EMCollapseError(RuntimeError):
    """Raised when the NP component's responsibility vanishes during EM."""


def mixture_nll(stack_pmf, background_pmf, particle_pmf, background_weight, eps):
    """Negative log-likelihood of the stack PMF under the two-component mixture."""
    mix = background_weight * background_pmf + (1.0 - background_weight) * particle_pmf
    return float(-np.sum(stack_pmf * np.log(mix + eps)))


def fit_particle_pmf(
    stack_pmf, background_pmf, initial_weight, low_intensity, *, max_iter, tol, eps
):
    """Estimate the NP PMF by EM with the background PMF held fixed.

    The model is ``w_bg * p_bg + (1 - w_bg) * p_np`` fitted to the stack PMF.
    ``p_np`` starts as the stack PMF's tail from `low_intensity` upwards and
    ``w_bg`` at `initial_weight`. Iteration stops as soon as an update lowers
    the negative log-likelihood by less than `tol` (an increase stops it too),
    or after `max_iter` updates.

    Returns
    -------
    EMResult
        ``n_iter`` counts the updates made; ``converged`` is False when the
        loop ran out of iterations.

    Raises
    ------
    EMCollapseError
        When the NP responsibility mass drops to `eps` or below: the data holds
        nothing the background PMF cannot explain.
    """
    p_stack = np.ascontiguousarray(stack_pmf, dtype=np.float64)
    p_bg = np.ascontiguousarray(background_pmf, dtype=np.float64)
    tail = np.zeros_like(p_stack)
    tail[low_intensity:] = p_stack[low_intensity:]
    p_np = normalize_pmf(tail, eps)
    w_bg = float(initial_weight)
    from ._ops import _numba, em  # the kernels import this module

    if not _numba.available():
        return _numpy_em(p_stack, p_bg, p_np, w_bg, max_iter=max_iter, tol=tol, eps=eps)
    # The same updates compiled, identical to the bit (see nanoseg._ops.em).
    # The loop hands back the stopping tests too close to call with its own
    # log; they are decided here, with NumPy's, as the NumPy loop decides them.
    nll_prev, n_iter = np.inf, 0
    while True:
        p_np, w_bg, p_before, w_before, nll, n_iter, status, mass = em.compiled_em(
            p_stack, p_bg, p_np, w_bg, nll_prev, n_iter, max_iter=max_iter, tol=tol, eps=eps
        )
        if status == em.COLLAPSED:
            raise _collapse_error(n_iter, mass)
        if n_iter == 0:
            return EMResult(p_np, w_bg, float("nan"), 0, False)
        # NumPy's likelihood: the same operations as the NumPy loop's.
        nll = mixture_nll(p_stack, p_bg, p_np, w_bg, eps)
        if status == em.UNSURE:
            before = mixture_nll(p_stack, p_bg, p_before, w_before, eps) if n_iter > 1 else np.inf
            if before - nll >= tol and n_iter < max_iter:
                nll_prev = nll
                continue
            status = em.DONE if before - nll < tol else em.RAN_OUT
        return EMResult(p_np, w_bg, nll, n_iter, status == em.DONE)


def _collapse_error(iteration, mass):
    return EMCollapseError(
        f"EM collapsed at iteration {iteration}: the nanoparticle component's "
        f"responsibility vanished (mass {mass:.2e}). The volume's bright tail is "
        "fully explained by the background histogram; check that the volume "
        "contains bright particles, or lower percentile_low / halo_pad."
    )


def _numpy_em(p_stack, p_bg, p_np, w_bg, *, max_iter, tol, eps):
    """The EM updates of :func:`fit_particle_pmf` in NumPy, from the start `p_np`, `w_bg`."""
    # Thousands of updates on 256 bins: the time goes to NumPy's per-call
    # overhead, not arithmetic. The loop below makes the same operations in
    # the same order as the textbook form (so the results are identical to
    # the bit), but into preallocated arrays, and computes the mixture
    # ``w_bg p_bg + (1 - w_bg) p_np + eps`` once per update: it is both the
    # likelihood's argument and the next E-step's denominator.
    weighted_bg, denominator, gamma_bg, work = (np.empty_like(p_stack) for _ in range(4))

    def mixture(w_bg, p_np):
        np.multiply(w_bg, p_bg, out=weighted_bg)
        np.multiply(1.0 - w_bg, p_np, out=work)
        np.add(weighted_bg, work, out=denominator)
        np.add(denominator, eps, out=denominator)

    mixture(w_bg, p_np)
    nll_prev = np.inf
    nll = np.nan
    converged = False
    n_iter = 0
    for iteration in range(max_iter):
        # E-step: responsibility of the background for each intensity bin.
        np.divide(weighted_bg, denominator, out=gamma_bg)
        # M-step: the NP PMF is the stack mass the background does not claim.
        particle_mass = np.subtract(1.0, gamma_bg, out=work)
        particle_mass *= p_stack
        mass = particle_mass.sum()
        if not mass > eps:
            raise _collapse_error(iteration, mass)
        # normalize_pmf(particle_mass, eps), whose first sum is `mass`.
        p_np = np.divide(particle_mass, mass)
        np.maximum(p_np, eps, out=p_np)
        p_np /= p_np.sum()
        # np.clip of a scalar, without its overhead.
        w_bg = min(max(float(np.multiply(p_stack, gamma_bg, out=work).sum()), eps), 1.0 - eps)
        # mixture_nll(p_stack, p_bg, p_np, w_bg, eps)
        mixture(w_bg, p_np)
        log_mix = np.log(denominator, out=work)
        log_mix *= p_stack
        nll = float(-log_mix.sum())
        n_iter = iteration + 1
        if nll_prev - nll < tol:
            converged = True
            break
        nll_prev = nll
    return EMResult(p_np, w_bg, nll, n_iter, converged)


def _log_posterior_slope(pi, hists, diff, p_bg, a, b, eps):
    """d/dpi of the per-slice MAP objective, for every slice at once."""
    mix = pi[:, None] * diff + p_bg + eps
    # A row-wise sum (pairwise, as the compiled loop of
    # nanoseg._ops.map_weights sums), not einsum, whose order it cannot follow.
    slope = (hists * (diff / mix)).sum(axis=1)
    return slope + (a - 1.0) / (pi + eps) - (b - 1.0) / (1.0 - pi + eps)


def _log_posterior(pi, hists, p_np, p_bg, a, b, eps):
    """Per-slice MAP objective (log-likelihood + Beta log-prior), vectorised.

    `pi` may be (Z,) or (Z, K) candidate weights.
    """
    pi = np.asarray(pi, dtype=np.float64)
    expand = pi[..., None]
    mix = expand * p_np + (1.0 - expand) * p_bg + eps
    loglik = np.einsum("zv,z...v->z...", hists, np.log(mix))
    prior = (a - 1.0) * np.log(pi + eps) + (b - 1.0) * np.log(1.0 - pi + eps)
    return loglik + prior


def map_slice_weights(hists, particle_pmf, background_pmf, beta_prior, eps, n_bisect=64):
    """MAP estimate of every slice's NP weight under a Beta prior.

    Maximises, for each slice ``z`` independently, ::

        sum_v h_z(v) log(pi p_np(v) + (1 - pi) p_bg(v) + eps)
            + (a - 1) log(pi + eps) + (b - 1) log(1 - pi + eps)

    over ``pi`` in [0, 1].

    When ``a, b >= 1`` the objective is concave, so its slope is decreasing:
    the maximum sits at 0 when the slope there is negative, at 1 when the
    slope there is positive, and otherwise at the slope's single root, found
    by bisection for all slices at once (64 halvings reach float64 spacing).
    With ``a < 1`` or ``b < 1`` the prior is not concave; then the objective is
    scanned on a grid dense near both ends, and the best grid point refined by
    golden-section search within its neighbours.

    Parameters
    ----------
    hists : (Z, 256) array_like
        Per-slice intensity histograms (counts).
    particle_pmf, background_pmf : (256,) ndarray
    beta_prior : (float, float)
        Shape parameters ``(a, b)`` of the Beta prior, both > 0.
    eps : float
        The same floor as in the objective above.

    Returns
    -------
    weights : (Z,) ndarray of float64
    """
    hists = np.atleast_2d(np.asarray(hists, dtype=np.float64))
    p_np = np.asarray(particle_pmf, dtype=np.float64)
    p_bg = np.asarray(background_pmf, dtype=np.float64)
    a, b = (float(v) for v in beta_prior)
    n = hists.shape[0]
    if n == 0:
        return np.zeros(0)
    if a >= 1.0 and b >= 1.0:
        return _map_concave(hists, p_np, p_bg, a, b, eps, n_bisect)
    return _map_grid(hists, p_np, p_bg, a, b, eps)


def _map_concave(hists, p_np, p_bg, a, b, eps, n_bisect):
    diff = p_np - p_bg
    from ._ops import _numba, map_weights  # the kernels import this module

    if _numba.available():
        # The same halvings compiled, identical to the bit: a lazy posterior
        # solves one slice at a time, where NumPy's calls cost about 0.8 ms.
        return map_weights.compiled_map_concave(hists, diff, p_bg, a, b, eps, n_bisect)
    n = hists.shape[0]
    lo = np.zeros(n)
    hi = np.ones(n)
    slope_lo = _log_posterior_slope(lo, hists, diff, p_bg, a, b, eps)
    slope_hi = _log_posterior_slope(hi, hists, diff, p_bg, a, b, eps)
    at_zero = slope_lo <= 0
    at_one = slope_hi >= 0
    for _ in range(n_bisect):
        mid = 0.5 * (lo + hi)
        rising = _log_posterior_slope(mid, hists, diff, p_bg, a, b, eps) > 0
        lo = np.where(rising, mid, lo)
        hi = np.where(rising, hi, mid)
    weights = 0.5 * (lo + hi)
    weights[at_one] = 1.0
    weights[at_zero] = 0.0
    return weights


def _weight_grid():
    """Candidate weights for the non-concave case: dense near 0 and near 1."""
    near = np.geomspace(1e-12, 0.5, 400)
    return np.unique(np.concatenate([[0.0], near, 1.0 - near, [1.0]]))


def _map_grid(hists, p_np, p_bg, a, b, eps, n_golden=80):
    grid = _weight_grid()
    n = hists.shape[0]
    best = np.empty(n)
    # Evaluate the grid in row blocks so memory stays (block, grid, 256).
    block = max(1, 2_000_000 // (grid.size * p_np.size))
    left = np.empty(n)
    right = np.empty(n)
    for start in range(0, n, block):
        rows = slice(start, min(n, start + block))
        h = hists[rows]
        values = _log_posterior(np.broadcast_to(grid, (h.shape[0], grid.size)), h, p_np, p_bg, a, b, eps)
        k = np.argmax(values, axis=1)
        best[rows] = grid[k]
        left[rows] = grid[np.maximum(k - 1, 0)]
        right[rows] = grid[np.minimum(k + 1, grid.size - 1)]
    best_value = _log_posterior(best, hists, p_np, p_bg, a, b, eps)
    # Golden-section refinement inside the bracketing grid cells.
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    lo, hi = left.copy(), right.copy()
    for _ in range(n_golden):
        x1 = hi - ratio * (hi - lo)
        x2 = lo + ratio * (hi - lo)
        f1 = _log_posterior(x1, hists, p_np, p_bg, a, b, eps)
        f2 = _log_posterior(x2, hists, p_np, p_bg, a, b, eps)
        keep_left = f1 >= f2
        hi = np.where(keep_left, x2, hi)
        lo = np.where(keep_left, lo, x1)
    refined = 0.5 * (lo + hi)
    refined_value = _log_posterior(refined, hists, p_np, p_bg, a, b, eps)
    return np.where(refined_value > best_value, refined, best)


def posterior_luts(weights, particle_pmf, background_pmf, eps, dtype=np.float32):
    """Per-slice posterior lookup tables.

    ``LUT_z(v) = pi_z p_np(v) / (pi_z p_np(v) + (1 - pi_z) p_bg(v) + eps)``,
    computed in float64 and returned as `dtype`.

    Parameters
    ----------
    weights : (Z,) array_like
        Per-slice NP weights.

    Returns
    -------
    luts : (Z, 256) ndarray
    """
    pi = np.asarray(weights, dtype=np.float64)[:, None]
    particle = pi * np.asarray(particle_pmf, dtype=np.float64)
    luts = particle / (particle + (1.0 - pi) * np.asarray(background_pmf, dtype=np.float64) + eps)
    return luts.astype(dtype, copy=False)
