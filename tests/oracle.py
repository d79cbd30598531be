"""Reference implementation ("oracle") of the nanoseg method, for tests only.

An independent, straightforward implementation of the published method: the
background / particle intensity model fitted by EM on 256-bin histograms, the
per-slice particle fraction (MAP under a Beta prior) and the posterior lookup
table, then thresholding, morphological closing, connected-component
labelling and removal of small components. It is written as plainly as
possible: one Python loop iteration per slice, float64 everywhere, scipy /
scikit-image for the image operations, and no attempt at speed. The package
under test is compared against these functions.

Semantics kept from the published code on purpose:

* every ``sampling_step``-th slice (0, s, 2s, ...) of every volume is used to
  build the histograms;
* thresholds are ``np.searchsorted(cumsum(p_stack), percentile / 100)`` with
  the default (left) side;
* seeds are pixels strictly above ``th_low``, labelled in 2D with
  8-connectivity; a component with at least ``min_seed_size`` pixels has its
  bounding box grown by ``halo_pad`` on all sides (clipped to the image)
  excluded; pixels at or above ``th_high`` are excluded too;
* PMF normalisation: counts / total, floored at ``eps``, renormalised; an
  all-zero histogram gives the uniform PMF;
* EM update order, stopping rule ``-(nll - nll_prev) < tol`` and the
  ``RuntimeError`` when the particle responsibility vanishes;
* per-slice MAP weight by bounded Brent (``minimize_scalar``) with a Beta
  log-prior, and the lookup table
  ``pi p_np / (pi p_np + (1 - pi) p_bg + eps)``.

Deliberate departure: in the published code a sampled slice with no
background pixel makes the per-slice helper return ``None`` and the histogram
accumulation crash. Here such a slice simply contributes zero counts.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.optimize import minimize_scalar
from skimage.measure import label as sk_label
from skimage.morphology import ball, disk
from skimage.segmentation import relabel_sequential

N_BINS = 256


# ---------------------------------------------------------------------------
# input handling
# ---------------------------------------------------------------------------
def _as_stack(volume) -> np.ndarray:
    """Return a uint8 (Z, Y, X) view of a 2D or 3D uint8 array."""
    arr = np.asarray(volume)
    if arr.dtype != np.uint8:
        raise TypeError(f"oracle expects uint8 input, got {arr.dtype}")
    if arr.ndim == 2:
        return arr[np.newaxis]
    if arr.ndim == 3:
        return arr
    raise ValueError(f"oracle expects a 2D or 3D array, got ndim={arr.ndim}")


def _as_crop_list(volume) -> list[np.ndarray]:
    """A single volume becomes a one-element list; each crop becomes (Z, Y, X)."""
    if isinstance(volume, (list, tuple)):
        crops = list(volume)
    else:
        crops = [volume]
    if len(crops) == 0:
        raise ValueError("empty list of volumes")
    return [_as_stack(c) for c in crops]


def _histogram(values: np.ndarray) -> np.ndarray:
    """256-bin count histogram of uint8 values, int64."""
    counts = np.bincount(np.asarray(values, dtype=np.uint8).ravel(), minlength=N_BINS)
    return counts.astype(np.int64)


# ---------------------------------------------------------------------------
# fit: building blocks
# ---------------------------------------------------------------------------
def oracle_normalize_pmf(hist, eps: float = 1e-12) -> np.ndarray:
    """Counts -> PMF, floored at eps and renormalised; all-zero -> uniform."""
    pmf = np.array(hist, dtype=np.float64)
    total = pmf.sum()
    if total == 0:
        return np.full(N_BINS, 1.0 / N_BINS, dtype=np.float64)
    pmf = pmf / total
    pmf = np.maximum(pmf, eps)
    pmf = pmf / pmf.sum()
    return pmf


def oracle_thresholds(p_stack, percentile_low: float, percentile_high: float) -> tuple[int, int]:
    """Intensities where the stack CDF first reaches the two percentiles."""
    cdf = np.cumsum(np.asarray(p_stack, dtype=np.float64))
    th_low = int(np.searchsorted(cdf, percentile_low / 100))
    th_high = int(np.searchsorted(cdf, percentile_high / 100))
    return th_low, th_high


def oracle_background_mask(
    image, th_low: int, th_high: int, *, halo_pad: int = 20, min_seed_size: int = 20
) -> np.ndarray:
    """Boolean mask of the pixels of one 2D slice that count as background."""
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError("background mask is defined per 2D slice")
    n_rows, n_cols = image.shape

    seeds = image > th_low
    eight_connected = np.ones((3, 3), dtype=bool)
    seed_labels, n_seeds = ndimage.label(seeds, structure=eight_connected)

    excluded = np.zeros(image.shape, dtype=bool)
    boxes = ndimage.find_objects(seed_labels)
    for k in range(1, n_seeds + 1):
        box = boxes[k - 1]
        size = int(np.count_nonzero(seed_labels[box] == k))
        if size < min_seed_size:
            continue
        rows, cols = box
        r0 = max(rows.start - halo_pad, 0)
        r1 = min(rows.stop + halo_pad, n_rows)
        c0 = max(cols.start - halo_pad, 0)
        c1 = min(cols.stop + halo_pad, n_cols)
        excluded[r0:r1, c0:c1] = True

    bright = image >= th_high
    return (~excluded) & (~bright)


def oracle_em(
    p_stack,
    p_bg,
    w_bg,
    p_np,
    *,
    max_iter: int = 10000,
    tol: float = 1e-10,
    eps: float = 1e-12,
) -> dict:
    """EM for ``p_stack ~ w_bg p_bg + (1 - w_bg) p_np`` with p_bg fixed.

    ``w_bg`` and ``p_np`` are the starting values. Returns a dict with
    ``p_np``, ``w_bg``, ``nll``, ``nit`` (0-based index of the last loop
    iteration, as in the published code) and ``converged`` (whether the loop
    left through the stopping rule rather than by exhausting ``max_iter``).
    """
    if max_iter < 1:
        raise ValueError("max_iter must be >= 1 (the published loop needs one pass)")
    p_stack = np.asarray(p_stack, dtype=np.float64)
    p_bg = np.asarray(p_bg, dtype=np.float64)
    p_np = np.asarray(p_np, dtype=np.float64)
    w_bg = float(w_bg)

    def negative_log_likelihood(w, p):
        mixture = w * p_bg + (1.0 - w) * p
        return float(-np.sum(p_stack * np.log(mixture + eps)))

    nll_prev = np.inf
    nll = np.nan
    converged = False
    iteration = -1
    for iteration in range(max_iter):
        # E-step: background responsibility per intensity bin
        bg_part = w_bg * p_bg
        np_part = (1.0 - w_bg) * p_np
        gamma_bg = bg_part / (bg_part + np_part + eps)

        # M-step: both updates use the same gamma_bg
        q = (1.0 - gamma_bg) * p_stack
        q_sum = float(q.sum())
        if not q_sum > eps:
            raise RuntimeError(
                f"EM collapsed at iteration {iteration}: the nanoparticle "
                f"responsibility vanished (sum={q_sum:.3e})"
            )
        p_np = oracle_normalize_pmf(q, eps)
        w_bg = float(np.sum(p_stack * gamma_bg))
        w_bg = min(max(w_bg, eps), 1.0 - eps)

        nll = negative_log_likelihood(w_bg, p_np)
        decrease = -(nll - nll_prev)
        if decrease < tol:
            converged = True
            break
        nll_prev = nll

    return {"p_np": p_np, "w_bg": w_bg, "nll": nll, "nit": iteration, "converged": converged}


# ---------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------
def oracle_fit(
    volume,
    *,
    percentile_low: float = 99.5,
    percentile_high: float = 99.8,
    halo_pad: int = 20,
    min_seed_size: int = 20,
    sampling_step: int = 1,
    max_iter: int = 10000,
    tol: float = 1e-10,
    eps: float = 1e-12,
) -> dict:
    """Fit the two-component intensity mixture on a volume or a list of crops.

    Returns a dict with ``hist_stack``, ``hist_bg`` (int64, 256), ``p_stack``,
    ``p_bg``, ``p_np`` (float64, 256), ``th_low``, ``th_high`` (int),
    ``w_bg``, ``nll`` (float), ``nit`` (int, 0-based index of the last EM
    iteration) and ``converged`` (bool).
    """
    if sampling_step < 1:
        raise ValueError("sampling_step must be >= 1")
    crops = _as_crop_list(volume)

    # 1. stack histogram over the sampled slices of every crop
    hist_stack = np.zeros(N_BINS, dtype=np.int64)
    for crop in crops:
        for z in range(0, crop.shape[0], sampling_step):
            hist_stack += _histogram(crop[z])
    p_stack = oracle_normalize_pmf(hist_stack, eps)

    # 2. thresholds from the stack CDF
    th_low, th_high = oracle_thresholds(p_stack, percentile_low, percentile_high)

    # 3. background histogram, slice by slice
    hist_bg = np.zeros(N_BINS, dtype=np.int64)
    for crop in crops:
        for z in range(0, crop.shape[0], sampling_step):
            image = crop[z]
            keep = oracle_background_mask(
                image, th_low, th_high, halo_pad=halo_pad, min_seed_size=min_seed_size
            )
            # a slice without background pixels adds nothing
            hist_bg += _histogram(image[keep])
    p_bg = oracle_normalize_pmf(hist_bg, eps)

    # 4. EM, started from the background fraction and the tail of p_stack
    w_bg0 = float(hist_bg.sum() / hist_stack.sum())
    tail = np.zeros(N_BINS, dtype=np.float64)
    tail[th_low:] = p_stack[th_low:]
    p_np0 = oracle_normalize_pmf(tail, eps)
    em = oracle_em(p_stack, p_bg, w_bg0, p_np0, max_iter=max_iter, tol=tol, eps=eps)

    return {
        "hist_stack": hist_stack,
        "hist_bg": hist_bg,
        "p_stack": p_stack,
        "p_bg": p_bg,
        "p_np": em["p_np"],
        "th_low": th_low,
        "th_high": th_high,
        "w_bg": em["w_bg"],
        "nll": em["nll"],
        "nit": em["nit"],
        "converged": em["converged"],
    }


# ---------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------
def oracle_map_weight(
    hist, p_np, p_bg, *, beta_prior=(1.0, 20.0), eps: float = 1e-12, xatol: float = 1e-5
) -> float:
    """MAP estimate of one slice's particle weight pi in [0, 1] (bounded Brent).

    ``xatol`` is scipy's default (the published code's); a smaller value runs
    the same optimiser to a tighter tolerance.
    """
    hist = np.asarray(hist, dtype=np.float64)
    p_np = np.asarray(p_np, dtype=np.float64)
    p_bg = np.asarray(p_bg, dtype=np.float64)
    a, b = float(beta_prior[0]), float(beta_prior[1])

    def objective(pi):
        mixture = pi * p_np + (1.0 - pi) * p_bg
        log_lik = np.sum(hist * np.log(mixture + eps))
        log_prior = (a - 1.0) * np.log(pi + eps) + (b - 1.0) * np.log(1.0 - pi + eps)
        return -(log_lik + log_prior)

    result = minimize_scalar(objective, bounds=(0.0, 1.0), method="bounded", options={"xatol": xatol})
    return float(result.x)


def oracle_lut(pi: float, p_np, p_bg, *, eps: float = 1e-12) -> np.ndarray:
    """Posterior probability of 'particle' for each of the 256 intensities."""
    p_np = np.asarray(p_np, dtype=np.float64)
    p_bg = np.asarray(p_bg, dtype=np.float64)
    numerator = pi * p_np
    return numerator / (numerator + (1.0 - pi) * p_bg + eps)


def _slice_weights_one(volume, model, beta_prior, eps, xatol=1e-5) -> np.ndarray:
    stack = _as_stack(volume)
    weights = np.zeros(stack.shape[0], dtype=np.float64)
    for z in range(stack.shape[0]):
        weights[z] = oracle_map_weight(
            _histogram(stack[z]), model["p_np"], model["p_bg"], beta_prior=beta_prior, eps=eps,
            xatol=xatol,
        )
    return weights


def oracle_slice_weights(volume, model, *, beta_prior=(1.0, 20.0), eps: float = 1e-12):
    """(Z,) MAP particle weight of every slice (a 2D image is one slice).

    ``model`` is a dict with ``p_np`` and ``p_bg`` (e.g. from :func:`oracle_fit`).
    A list of volumes gives a list of arrays.
    """
    if isinstance(volume, (list, tuple)):
        return [_slice_weights_one(v, model, beta_prior, eps) for v in volume]
    return _slice_weights_one(volume, model, beta_prior, eps)


def _posterior_one(volume, model, beta_prior, eps, xatol=1e-5) -> np.ndarray:
    arr = np.asarray(volume)
    stack = _as_stack(arr)
    weights = _slice_weights_one(stack, model, beta_prior, eps, xatol)
    posterior = np.zeros(stack.shape, dtype=np.float64)
    for z in range(stack.shape[0]):
        table = oracle_lut(weights[z], model["p_np"], model["p_bg"], eps=eps)
        posterior[z] = table[stack[z]]
    return posterior.reshape(arr.shape)


def oracle_posterior(volume, model, *, beta_prior=(1.0, 20.0), eps: float = 1e-12, xatol: float = 1e-5):
    """Per-voxel particle posterior (float64, same shape as ``volume``)."""
    if isinstance(volume, (list, tuple)):
        return [_posterior_one(v, model, beta_prior, eps, xatol) for v in volume]
    return _posterior_one(volume, model, beta_prior, eps, xatol)


# ---------------------------------------------------------------------------
# label
# ---------------------------------------------------------------------------
def oracle_footprint(ndim: int, radius: int) -> np.ndarray:
    """ball(radius) for 3D, disk(radius) for 2D, as a boolean array."""
    if ndim == 3:
        return ball(radius).astype(bool)
    if ndim == 2:
        return disk(radius).astype(bool)
    raise ValueError(f"labelling expects 2D or 3D input, got ndim={ndim}")


def oracle_closing(mask, radius: int) -> np.ndarray:
    """Binary closing with scikit-image ``mode="ignore"`` border semantics.

    Dilation treats the outside of the image as background, erosion treats
    it as foreground, so foreground touching the border is never removed.
    ``radius == 0`` returns the mask unchanged.
    """
    mask = np.asarray(mask, dtype=bool)
    if radius == 0:
        return mask.copy()
    footprint = oracle_footprint(mask.ndim, radius)
    dilated = ndimage.binary_dilation(mask, structure=footprint, border_value=0)
    closed = ndimage.binary_erosion(dilated, structure=footprint, border_value=1)
    return closed


def oracle_label(
    posterior,
    *,
    threshold: float = 0.95,
    radius: int = 1,
    connectivity: int = 2,
    min_size: int = 10,
) -> np.ndarray:
    """Threshold, close, label, drop small components, relabel 1..K (uint32)."""
    posterior = np.asarray(posterior)
    mask = posterior >= threshold
    closed = oracle_closing(mask, radius)
    labels = sk_label(closed, connectivity=connectivity)

    n_labels = int(labels.max())
    sizes = np.bincount(labels.ravel(), minlength=n_labels + 1)
    too_small = [k for k in range(1, n_labels + 1) if sizes[k] < min_size]
    labels[np.isin(labels, too_small)] = 0

    relabelled, _, _ = relabel_sequential(labels)
    return relabelled.astype(np.uint32)


# ---------------------------------------------------------------------------
# comparison helper
# ---------------------------------------------------------------------------
def assert_same_partition(a, b) -> None:
    """Assert two label images are equal up to renumbering of the nonzero ids.

    The background (0) must coincide exactly, and the nonzero ids must be in
    one-to-one correspondence with identical supports.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {a.shape} != {b.shape}")
    fg_a = a != 0
    fg_b = b != 0
    if not np.array_equal(fg_a, fg_b):
        only_a = int(np.count_nonzero(fg_a & ~fg_b))
        only_b = int(np.count_nonzero(fg_b & ~fg_a))
        raise AssertionError(
            f"foreground differs: {only_a} voxels labelled only in the first, "
            f"{only_b} only in the second"
        )
    ids_a = a[fg_a].astype(np.int64)
    ids_b = b[fg_b].astype(np.int64)
    unique_a = np.unique(ids_a)
    unique_b = np.unique(ids_b)
    pairs = np.unique(np.stack([ids_a, ids_b], axis=1), axis=0)
    # every id of a meets exactly one id of b and vice versa <=> bijection
    # with identical supports (the foregrounds already coincide)
    if len(pairs) == len(unique_a) == len(unique_b):
        return
    a_ids, a_counts = np.unique(pairs[:, 0], return_counts=True)
    b_ids, b_counts = np.unique(pairs[:, 1], return_counts=True)
    split = a_ids[a_counts > 1][:10].tolist()
    merged = b_ids[b_counts > 1][:10].tolist()
    raise AssertionError(
        f"partitions differ: {len(unique_a)} vs {len(unique_b)} components, "
        f"{len(pairs)} overlapping pairs; ids of the first split in the second: "
        f"{split}; ids of the second split in the first: {merged}"
    )
