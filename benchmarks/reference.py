"""Baseline for the benchmarks: the seed method written the plain way.

This module follows the data path of the published implementation step by
step, with no attempt at speed. It exists only so that the benchmarks can
time nanoseg against it on the same data; the package never imports it.

* fit -- two passes over the zarr array, one slice at a time: a 256-bin
  ``np.bincount`` histogram of every slice, then, per slice, the background
  histogram (seeds above the low threshold labelled in 2D with
  8-connectivity, ``find_objects``, bounding boxes of the seeds with at least
  ``min_size`` pixels grown by ``halo_pad`` and excluded, pixels at or above
  the high threshold excluded), and EM on the histograms with the published
  loop (``max_iter`` 10000, ``nll_tol`` 1e-10, ``eps`` 1e-12).
* predict -- per slice: histogram, MAP weight of the slice by
  ``scipy.optimize.minimize_scalar(method="bounded")`` under a Beta(1, 20)
  prior, a 256-entry lookup table, the float64 posterior of the slice by
  fancy indexing, written to a float16 zarr array chunked like the input.
* label -- the whole posterior is loaded from zarr, thresholded
  (``>= 0.95``), closed with ``ball(1)`` (dilation, then erosion with the
  outside counted as foreground: scikit-image's ``mode="ignore"``), labelled
  with ``skimage.measure.label(connectivity=2)``; components under 10 voxels
  are dropped, the rest renumbered 1..K in order, and the labels written to
  zarr (uint32).

One deliberate departure from the published code: a slice without any
background pixel adds nothing to the background histogram (the published
helper returns ``None`` there and the accumulation fails).
"""

from __future__ import annotations

import numpy as np
import zarr
from scipy import ndimage
from scipy.optimize import minimize_scalar
from skimage.measure import label as sk_label
from skimage.morphology import ball
from skimage.segmentation import relabel_sequential

MAX_ITER = 10000
EPS = 1e-12
NLL_TOL = 1e-10
PERCENT_TH_LOW = 99.5
PERCENT_TH_HIGH = 99.8
HALO_PAD = 20
MIN_SEED_SIZE = 20
BETA_PARAMS = (1.0, 20.0)
POSTERIOR_TH = 0.95
RADIUS = 1
CONNECTIVITY = 2
MIN_SIZE = 10


def bincount_ubyte(values):
    """256-bin count histogram of uint8 values."""
    return np.bincount(values.ravel(), minlength=256).astype(np.int64)


def normalize_pmf(hist, eps=EPS):
    pmf = hist.astype(np.float64)
    if pmf.sum() == 0:
        return np.full(256, 1 / 256, dtype=np.float64)
    pmf /= pmf.sum()
    pmf = np.maximum(pmf, eps)
    pmf /= pmf.sum()
    return pmf


# ---------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------
def expand_bbox(bbox, image_shape, halo_pad=HALO_PAD):
    slice_y, slice_x = bbox
    y0 = max(slice_y.start - halo_pad, 0)
    y1 = min(slice_y.stop + halo_pad, image_shape[0])
    x0 = max(slice_x.start - halo_pad, 0)
    x1 = min(slice_x.stop + halo_pad, image_shape[1])
    return (slice(y0, y1), slice(x0, x1))


def extract_bg_hist(image, th_low, th_high, min_size=MIN_SEED_SIZE, halo_pad=HALO_PAD):
    """Histogram of the background pixels of one 2D slice."""
    mask = image > th_low
    labels, num = ndimage.label(mask, structure=np.ones((3, 3), dtype=np.uint8))
    obj_mask = np.zeros(image.shape, dtype=bool)
    if num > 0:
        sizes = np.bincount(labels.ravel())[1:]
        keep = np.nonzero(sizes >= min_size)[0]
        bboxes = ndimage.find_objects(labels)
        for i in keep:
            obj_mask[expand_bbox(bboxes[int(i)], image.shape, halo_pad)] = True
    bright_mask = image >= th_high
    bg_mask = (~obj_mask) & (~bright_mask)
    if bg_mask.any():
        return bincount_ubyte(image[bg_mask])
    return np.zeros(256, dtype=np.int64)


def deconvolve_mixture(p_stack, p_bg, w_bg, p_np, max_iter=MAX_ITER, eps=EPS, nll_tol=NLL_TOL):
    """The published EM loop; returns (p_np, summary)."""

    def neg_log_likelihood(w_bg, p_np):
        mix = w_bg * p_bg + (1 - w_bg) * p_np
        return -np.sum(p_stack * np.log(mix + eps))

    nll_prev = np.inf
    nll = np.nan
    i = 0
    for i in range(max_iter):
        num_bg = w_bg * p_bg
        num_np = (1 - w_bg) * p_np
        gamma_bg = num_bg / (num_bg + num_np + eps)
        q = (1.0 - gamma_bg) * p_stack
        q_sum = q.sum()
        if q_sum > eps:
            p_np = normalize_pmf(q, eps)
            w_bg = np.sum(p_stack * gamma_bg)
            w_bg = np.clip(w_bg, eps, 1 - eps)
        else:
            raise RuntimeError(f"EM collapsed at iteration {i} (q_sum={q_sum:.2e})")
        nll = neg_log_likelihood(w_bg, p_np)
        if -(nll - nll_prev) < nll_tol:
            break
        nll_prev = nll
    return p_np, {"w_bg": float(w_bg), "nll": float(nll), "nit": int(i)}


def fit(volume):
    """Fit the mixture on a (Z, Y, X) uint8 zarr array, reading one slice at a time.

    Returns a dict of NumPy arrays and scalars (savable with ``np.savez``).
    """
    n_slices = volume.shape[0]
    hist_stack = np.zeros(256, dtype=np.int64)
    for idx in range(n_slices):
        image = volume[idx]
        hist_stack += bincount_ubyte(image)
    p_stack = normalize_pmf(hist_stack)

    th_low = np.searchsorted(p_stack.cumsum(), PERCENT_TH_LOW / 100)
    th_high = np.searchsorted(p_stack.cumsum(), PERCENT_TH_HIGH / 100)
    hist_bg = np.zeros(256, dtype=np.int64)
    for idx in range(n_slices):
        image = volume[idx]
        hist_bg += extract_bg_hist(image, th_low, th_high)
    p_bg = normalize_pmf(hist_bg)

    w_bg0 = hist_bg.sum() / hist_stack.sum()
    p_np0 = np.zeros_like(p_stack, dtype=np.float64)
    p_np0[th_low:] = p_stack[th_low:]
    p_np0 = normalize_pmf(p_np0)
    p_np, summary = deconvolve_mixture(p_stack, p_bg, w_bg0, p_np0)
    return {
        "p_stack": p_stack,
        "p_bg": p_bg,
        "p_np": p_np,
        "hist_stack": hist_stack,
        "hist_bg": hist_bg,
        "th_low": int(th_low),
        "th_high": int(th_high),
        **summary,
    }


# ---------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------
def fit_pi(hist_image, p_np, p_bg, eps=EPS, beta_params=BETA_PARAMS):
    def nll_beta_prior(pi):
        mix = pi * p_np + (1 - pi) * p_bg
        ll = np.sum(hist_image * np.log(mix + eps))
        ll += (beta_params[0] - 1) * np.log(pi + eps) + (beta_params[1] - 1) * np.log(1 - pi + eps)
        return -ll

    res = minimize_scalar(nll_beta_prior, bounds=(0.0, 1.0), method="bounded")
    return float(res.x)


def posterior_image(image, p_np, p_bg, eps=EPS):
    hist_image = bincount_ubyte(image)
    pi = fit_pi(hist_image, p_np, p_bg, eps)
    mix = pi * p_np + (1 - pi) * p_bg
    posterior_bins = (pi * p_np) / (mix + eps)
    return posterior_bins[image]


def predict(model, volume, store_path):
    """Write the float16 posterior of `volume` to a zarr array at `store_path`."""
    dst = zarr.create_array(
        store=str(store_path), shape=volume.shape, chunks=volume.chunks, dtype="f2", overwrite=True
    )
    p_np, p_bg = model["p_np"], model["p_bg"]
    for idx in range(volume.shape[0]):
        image = volume[idx]
        dst[idx] = posterior_image(image, p_np, p_bg)
    return dst


# ---------------------------------------------------------------------------
# label
# ---------------------------------------------------------------------------
def binary_closing(mask, radius=RADIUS):
    """Closing with ball(radius), as the published pipeline does it.

    ``scipy.ndimage.binary_closing`` treats the outside of the volume as
    background for the erosion too (``border_value=0``), so particle voxels
    within `radius` of the volume's faces are eroded away. nanoseg keeps
    them (its closing never removes foreground); the benchmark reports where
    the two differ.
    """
    footprint = ball(radius).astype(bool)
    return ndimage.binary_closing(mask, structure=footprint, border_value=0)


def filter_and_relabel(labels, min_size=MIN_SIZE):
    """Drop components with fewer than `min_size` voxels; renumber the rest 1..K in order."""
    sizes = np.bincount(labels.ravel())
    too_small = sizes < min_size
    too_small[0] = False
    labels[too_small[labels]] = 0
    relabelled, _, _ = relabel_sequential(labels)
    return relabelled


def label(posterior_array, store_path):
    """Label the posterior held in a zarr array; write uint32 labels to `store_path`.

    Returns the output zarr array and the number of labels.
    """
    posterior = posterior_array[:]
    masks = posterior >= POSTERIOR_TH
    masks_filt = binary_closing(masks, radius=RADIUS)
    masks_filt = sk_label(masks_filt, connectivity=CONNECTIVITY)
    masks_filt = filter_and_relabel(masks_filt, min_size=MIN_SIZE)
    dst = zarr.create_array(
        store=str(store_path),
        shape=posterior_array.shape,
        chunks=posterior_array.chunks,
        dtype="u4",
        overwrite=True,
    )
    dst[:] = masks_filt.astype(np.uint32)
    return dst, int(masks_filt.max())
