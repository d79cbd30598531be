"""The empirical-Bayes intensity mixture: background vs nanoparticle."""

from __future__ import annotations

import warnings
from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from tqdm import tqdm

from . import _kernels, _model
from ._backend import DEVICES, get_backend, to_numpy
from ._base import VolumeEstimatorMixin, map_volumes
from ._parallel import device_n_jobs, ordered_map, slab_budget
from ._volume import as_volumes, check_finite, check_targets, is_lazy, parse_bytes

__all__ = ["NanoparticleMixture"]

# Working bytes per voxel for the histogram passes (the uint8 slab plus the
# background kernel's boolean masks) and for the in-memory posterior
# (the uint8 slab and its float32 output).
_HISTOGRAM_BYTES_PER_VOXEL = 4
_POSTERIOR_BYTES_PER_VOXEL = 5


def check_beta_prior(beta_prior):
    """Validate a Beta prior ``(a, b)`` and return it as a tuple of floats."""
    try:
        values = tuple(float(v) for v in beta_prior)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 2 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(
            "beta_prior must be a pair (a, b) of finite numbers > 0, the shape parameters "
            f"of the Beta prior on each slice's particle fraction; got {beta_prior!r}."
        )
    return values


def check_intensity_volume(volume):
    """Raise a clear error unless `volume` holds 8-bit intensities."""
    if volume.dtype == np.uint8:
        return
    if volume.in_memory:
        check_finite(volume.array, volume.name)
    raise TypeError(
        f"{volume.name} must hold 8-bit intensities (uint8); got {volume.dtype}. Convert it first, "
        "e.g. with skimage.util.img_as_ubyte for images scaled to [0, 1], or by rescaling "
        "your intensity range to 0-255."
    )


class NanoparticleMixture(VolumeEstimatorMixin, TransformerMixin, BaseEstimator):
    """Two-component intensity mixture for bright (or dark) nanoparticles (NPs).

    The volume's 256-bin intensity histogram is modelled as a mixture of a
    background PMF and an NP PMF. `fit` estimates the background PMF from
    pixels far from any bright seed, then the NP PMF by expectation-
    maximisation (EM) on the histograms alone. `predict_proba` estimates,
    for every slice, the MAP fraction of NP voxels under a Beta prior and
    turns it into a posterior lookup table over intensities: the posterior
    of a voxel is its slice's table at its intensity.

    Parameters
    ----------
    beta_prior : (float, float), default=(1.0, 20.0)
        Shape parameters ``(a, b)`` of the Beta prior on each slice's NP
        fraction. Larger ``b`` pulls the fraction towards zero, so fewer
        voxels reach a high posterior.
    percentile_low : float, default=99.5
        Percentile of the stack histogram above which a voxel seeds a
        candidate particle (when building the background histogram) and from
        which the NP PMF is initialised.
    percentile_high : float, default=99.8
        Percentile of the stack histogram at or above which a voxel is never
        counted as background. Must not be below `percentile_low`.
    halo_pad : int, default=20
        Pixels added on every side of a seed component's bounding box before
        excluding it from the background histogram.
    min_seed_size : int, default=20
        Seed components (8-connected, per slice) smaller than this many pixels
        are not excluded with a halo.
    sampling_step : int, default=1
        Use every `sampling_step`-th slice of each volume to fit.
    max_iter : int, default=10000
        Maximum number of EM updates.
    tol : float, default=1e-10
        EM stops when an update lowers the negative log-likelihood by less
        than `tol`.
    eps : float, default=1e-12
        Floor of every PMF bin, and regulariser in the posterior's
        denominator.
    memory_budget : int or str, default=None
        Working memory for the slabs in flight, in bytes or as a string such as
        ``"512MiB"``; it is shared by the `n_jobs` slabs processed at once, and
        a slab is never thinner than one input chunk. None means 128 MiB per
        job.
    n_jobs : int, default=None
        Threads working on slabs at once. None or -1 means one per CPU; -2
        all but one, and so on.
    posterior_dtype : {"float32", "float16"}, default="float32"
        dtype of the posterior. "float16" halves what a stored posterior
        takes; the lookup tables are rounded once to float16 (relative error
        below 5e-4), which is much faster than converting a float32 posterior
        voxel by voxel. Thresholds near a rounding step may then select
        slightly different voxels than with float32.
    polarity : {"bright", "dark"}, default="bright"
        "bright" for particles brighter than the background (backscattered
        electrons in SBF-SEM and FIB-SEM); "dark" for particles darker than it
        (bright-field TEM). "dark" fits the model to inverted intensities
        ``255 - v``: histograms and lookup tables are read mirrored, so no
        voxel is ever copied, and the output is still the NP posterior.
    device : {"cpu", "cuda", "auto"}, default="cpu"
        Where histograms and lookups run. "cuda" uses a CUDA GPU through CuPy
        (``pip install "nanoseg[gpu]"``) and raises
        :class:`~nanoseg.GPUUnavailableError` without one; "auto" uses
        the GPU when there is one and the CPU otherwise (saying so in the
        "nanoseg" log). CuPy input is always processed on the GPU (unless
        "cpu", which rejects it). Results are identical on every device.
    verbose : bool, default=False
        Show progress bars, and print the slab size each pass chose.

    Attributes
    ----------
    stack_histogram_ : ndarray of shape (256,), int64
        Intensity counts of all sampled voxels.
    background_histogram_ : ndarray of shape (256,), int64
        Intensity counts of the voxels kept as surely background.
    stack_pmf_, background_pmf_, particle_pmf_ : ndarray of shape (256,), float64
        The stack, background and fitted NP PMFs. Like the histograms, they
        are indexed by raw intensity, also with ``polarity="dark"``.
    low_intensity_, high_intensity_ : int
        Intensities at `percentile_low` and `percentile_high` of the stack PMF:
        voxels brighter than `low_intensity_` seed particles, and voxels at or
        above `high_intensity_` are never background. With ``polarity="dark"``
        both are mirrored (``255 -`` the level found on inverted intensities):
        voxels darker than `low_intensity_` seed, and voxels at or below
        `high_intensity_` are never background.
    background_weight_ : float
        Fitted background weight of the stack-level mixture.
    neg_log_likelihood_ : float
        Negative log-likelihood of the stack PMF at the end of EM.
    n_iter_ : int
        Number of EM updates made.
    converged_ : bool
        Whether EM met `tol` within `max_iter` updates.
    n_slices_fit_ : int
        Number of slices the model was fitted on.

    See Also
    --------
    NanoparticleLabeler : Turns the posterior into labelled particles.

    Notes
    -----
    **Input conventions.** `X` is a 2D image (Y, X), a 3D volume (Z, Y, X) --
    plane, row, column -- or a list of such arrays (annotated crops). Arrays may
    be NumPy, zarr or dask arrays of dtype uint8. For a single volume the
    samples, in the scikit-learn sense, are its Z slices (each slice gets its
    own NP fraction); for a list, each crop is one sample.

    **Out of core.** zarr and dask inputs are read slab by slab (whole planes,
    aligned to the chunks along Z) and never loaded whole; their posterior is
    returned as a lazy dask array.

    **Output dtype.** The posterior is float32 (or float16, see
    `posterior_dtype`): the lookup tables are computed in float64 and rounded
    once (relative error below 6e-8 for float32).

    **GPU.** With ``device="cuda"`` slabs are copied to the GPU one at a time
    (several threads overlap the copies with the computation) and results come
    back as the input's kind: NumPy for NumPy, lazy dask for zarr and dask,
    CuPy for CuPy. Fitted attributes are always NumPy, so a model fitted on a
    GPU loads and runs on a machine without one (set ``device="cpu"`` or
    ``"auto"`` there).

    Examples
    --------
    >>> from nanoseg import NanoparticleMixture
    >>> from nanoseg.datasets import make_phantom
    >>> image, mask = make_phantom(random_state=0)
    >>> mixture = NanoparticleMixture().fit(image)
    >>> posterior = mixture.predict_proba(image)
    >>> posterior.shape == image.shape, posterior.dtype
    (True, dtype('float32'))
    """

    _parameter_constraints = {
        "beta_prior": ["array-like"],
        "percentile_low": [Interval(Real, 0, 100, closed="right")],
        "percentile_high": [Interval(Real, 0, 100, closed="right")],
        "halo_pad": [Interval(Integral, 0, None, closed="left")],
        "min_seed_size": [Interval(Integral, 1, None, closed="left")],
        "sampling_step": [Interval(Integral, 1, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "eps": [Interval(Real, 0, 1, closed="neither")],
        "memory_budget": [None, Interval(Integral, 1, None, closed="left"), str],
        "n_jobs": [None, Integral],
        "posterior_dtype": [StrOptions({"float32", "float16"})],
        "polarity": [StrOptions({"bright", "dark"})],
        "device": [StrOptions(set(DEVICES))],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        *,
        beta_prior=(1.0, 20.0),
        percentile_low=99.5,
        percentile_high=99.8,
        halo_pad=20,
        min_seed_size=20,
        sampling_step=1,
        max_iter=10000,
        tol=1e-10,
        eps=1e-12,
        memory_budget=None,
        n_jobs=None,
        posterior_dtype="float32",
        polarity="bright",
        device="cpu",
        verbose=False,
    ):
        self.beta_prior = beta_prior
        self.percentile_low = percentile_low
        self.percentile_high = percentile_high
        self.halo_pad = halo_pad
        self.min_seed_size = min_seed_size
        self.sampling_step = sampling_step
        self.max_iter = max_iter
        self.tol = tol
        self.eps = eps
        self.memory_budget = memory_budget
        self.n_jobs = n_jobs
        self.posterior_dtype = posterior_dtype
        self.polarity = polarity
        self.device = device
        self.verbose = verbose

    def _check_params(self):
        self._validate_params()
        parse_bytes(self.memory_budget)
        check_beta_prior(self.beta_prior)
        if self.percentile_low > self.percentile_high:
            raise ValueError(
                f"percentile_low ({self.percentile_low}) must not exceed percentile_high "
                f"({self.percentile_high}): seeds start at the low percentile and the hard "
                "background exclusion at the high one."
            )

    def _slab_depth(self, volume, bytes_per_voxel, what):
        depth = volume.slab_depth(bytes_per_voxel, slab_budget(self.memory_budget, self.n_jobs))
        if self.verbose:
            print(volume.describe_plan(depth, bytes_per_voxel, what))
        return depth

    def _intensity_volumes(self, X):
        volumes, is_list = as_volumes(X)
        for volume in volumes:
            check_intensity_volume(volume)
        return volumes, is_list

    # With polarity="dark" the model sees intensities 255 - v: a histogram
    # (or PMF) indexed by raw intensity is reversed to enter model space and
    # reversed again to leave it. Copies keep the arrays contiguous, so sums
    # over model space run exactly as they would for the bright model.
    def _mirror(self, array):
        if self.polarity == "dark":
            return np.ascontiguousarray(np.asarray(array)[..., ::-1])
        return array

    def _mirror_level(self, level):
        return 255 - level if self.polarity == "dark" else level

    def _n_jobs(self, backend, volume):
        return device_n_jobs(self.n_jobs, backend, on_device=volume.kind == "cupy")

    def fit(self, X, y=None):
        """Learn the background and NP intensity PMFs from `X`.

        Parameters
        ----------
        X : array or list of arrays
            uint8 image (Y, X), volume (Z, Y, X), or a list of them (NumPy,
            zarr or dask). See the class Notes for the conventions.
        y : ignored
            Present for pipelines; when given, its shape is checked against `X`.

        Returns
        -------
        self : NanoparticleMixture
            The fitted estimator.

        Raises
        ------
        ValueError
            If `X` is constant, or no background voxels remain.
        nanoseg.EMCollapseError
            If EM finds nothing the background cannot explain.
        """
        self._fit(X, y)
        return self

    def _fit(self, X, y):
        """Fit; return the volumes, whether X was a list, and the sampled slices' histograms."""
        self._check_params()
        volumes, is_list = self._intensity_volumes(X)
        check_targets(y, volumes, is_list)
        backend = self._resolve_backend(volumes)
        n_jobs = min(self._n_jobs(backend, volume) for volume in volumes)
        dark = self.polarity == "dark"
        sampled = [np.arange(0, v.shape[0], self.sampling_step) for v in volumes]
        n_slices = int(sum(s.size for s in sampled))
        work = [
            (volume, group)
            for volume, indices in zip(volumes, sampled)
            for group in volume.slabs(self._slab_depth(volume, _HISTOGRAM_BYTES_PER_VOXEL, "histograms"), indices)
        ]

        # Pass 1: every sampled slice's histogram (kept: 2 KiB a slice), by raw intensity.
        def histograms(item):
            volume, group = item
            with backend.stream():
                return backend.to_host(_kernels.slice_histograms(backend, volume.read_slices(group, backend)))

        slice_hists = []
        with tqdm(total=n_slices, desc="Stack histogram", unit="slice", disable=not self.verbose) as bar:
            for hists in ordered_map(histograms, work, n_jobs):
                slice_hists.append(hists)
                bar.update(len(hists))
        slice_hists = np.concatenate(slice_hists)
        raw_stack_hist = slice_hists.sum(axis=0)
        stack_hist = self._mirror(raw_stack_hist)
        present = np.flatnonzero(raw_stack_hist)
        if present.size < 2:
            raise ValueError(
                f"X is constant: every sampled voxel has intensity {int(present[0])}, so there "
                "is no contrast to separate particles from background. Check that the right "
                "array (and channel) was passed."
            )
        stack_pmf = _model.normalize_pmf(stack_hist, self.eps)
        low = _model.percentile_intensity(stack_pmf, self.percentile_low)
        high = _model.percentile_intensity(stack_pmf, self.percentile_high)

        # Pass 2: subtract each slice's excluded pixels from its histogram.
        firsts = np.cumsum([0] + [len(group) for _, group in work])

        def background(numbered):
            position, (volume, group) = numbered
            first = firsts[position]
            with backend.stream():
                hists = _kernels.slab_background_histograms(
                    backend, volume.read_slices(group, backend), low, high,
                    min_seed_size=self.min_seed_size, halo_pad=self.halo_pad,
                    hists=slice_hists[first : first + len(group)], dark=dark,
                )
                return backend.to_host(hists).sum(axis=0), len(group)

        background_hist = np.zeros(_model.N_BINS, dtype=np.int64)
        with tqdm(total=n_slices, desc="Background histogram", unit="slice", disable=not self.verbose) as bar:
            for hist, n in ordered_map(background, enumerate(work), n_jobs):
                background_hist += hist
                bar.update(n)
        if background_hist.sum() == 0:
            side = "at or below" if dark else "at or above"
            raise ValueError(
                "No background voxels are left once particle seeds, their halos and voxels "
                f"{side} intensity {self._mirror_level(high)} are excluded. Lower halo_pad or "
                "raise percentile_low / percentile_high."
            )
        raw_background_hist = background_hist
        background_hist = self._mirror(background_hist)
        background_pmf = _model.normalize_pmf(background_hist, self.eps)

        result = _model.fit_particle_pmf(
            stack_pmf,
            background_pmf,
            background_hist.sum() / stack_hist.sum(),
            low,
            max_iter=self.max_iter,
            tol=self.tol,
            eps=self.eps,
        )
        if not result.converged:
            warnings.warn(
                f"EM did not converge within max_iter={self.max_iter} updates (last decrease of "
                f"the negative log-likelihood above tol={self.tol}). Increase max_iter or tol.",
                ConvergenceWarning,
                stacklevel=2,
            )

        self.stack_histogram_ = raw_stack_hist
        self.background_histogram_ = raw_background_hist
        self.stack_pmf_ = self._mirror(stack_pmf)
        self.background_pmf_ = self._mirror(background_pmf)
        self.particle_pmf_ = self._mirror(result.particle_pmf)
        self.low_intensity_ = self._mirror_level(low)
        self.high_intensity_ = self._mirror_level(high)
        self.background_weight_ = result.background_weight
        self.neg_log_likelihood_ = result.neg_log_likelihood
        self.n_iter_ = result.n_iter
        self.converged_ = result.converged
        self.n_slices_fit_ = n_slices
        return volumes, is_list, slice_hists

    def fit_transform(self, X, y=None):
        """Fit, then return the posterior of `X`; reuses the fit's slice histograms.

        Equivalent to ``fit(X).transform(X)``, but with ``sampling_step=1`` the
        per-slice histograms that `fit` computed serve the posterior too,
        saving one pass over the data (pipelines call this method).

        Parameters
        ----------
        X : array or list of arrays
            As in :meth:`fit`.
        y : ignored

        Returns
        -------
        posterior : array or list of arrays, of dtype `posterior_dtype` (float32)
        """
        volumes, is_list, slice_hists = self._fit(X, y)
        if self.sampling_step != 1:
            return self.transform(X)
        backend = self._resolve_backend(volumes)
        bounds = np.cumsum([0] + [volume.shape[0] for volume in volumes])
        return map_volumes(
            lambda item: self._posterior(item[0], backend, slice_hists[item[1] : item[2]]),
            list(zip(volumes, bounds[:-1], bounds[1:])),
            is_list,
        )

    # -- prediction -------------------------------------------------------
    def _slice_histograms(self, volume, desc, backend):
        depth = self._slab_depth(volume, _HISTOGRAM_BYTES_PER_VOXEL, "histograms")

        def histograms(group):
            with backend.stream():
                slab = volume.read(int(group[0]), int(group[-1]) + 1, backend)
                return backend.to_host(_kernels.slice_histograms(backend, slab))

        parts = []
        with tqdm(total=volume.shape[0], desc=desc, unit="slice", disable=not self.verbose) as bar:
            for hists in ordered_map(histograms, volume.slabs(depth), self._n_jobs(backend, volume)):
                parts.append(hists)
                bar.update(len(hists))
        return np.concatenate(parts)

    def _weights(self, volume, backend, hists=None):
        if hists is None:
            hists = self._slice_histograms(volume, "Slice weights", backend)
        # The MAP objective sums over intensities: evaluate it in model space,
        # where its terms come in the same order for either polarity.
        return _model.map_slice_weights(
            self._mirror(hists), self._mirror(self.particle_pmf_), self._mirror(self.background_pmf_),
            check_beta_prior(self.beta_prior), self.eps,
        )

    def slice_weights(self, X):
        """MAP estimate of each slice's NP fraction under the Beta prior.

        Parameters
        ----------
        X : array or list of arrays
            As in :meth:`fit`.

        Returns
        -------
        weights : ndarray of shape (Z,), float64, or list of them
            One weight per slice (a 2D image has one slice); a list for a
            list input.
        """
        check_is_fitted(self)
        self._check_params()
        volumes, is_list = self._intensity_volumes(X)
        backend = self._resolve_backend(volumes)
        return map_volumes(lambda volume: self._weights(volume, backend), volumes, is_list)

    def posterior_luts(self, weights):
        """Posterior lookup tables for given per-slice NP fractions.

        Parameters
        ----------
        weights : array_like of shape (Z,)
            Per-slice NP fractions, e.g. from :meth:`slice_weights`.

        Returns
        -------
        luts : ndarray of shape (Z, 256), of dtype `posterior_dtype`
            ``luts[z, v]`` is the posterior of a voxel of (raw) intensity ``v``
            in slice ``z``.
        """
        check_is_fitted(self)
        # Each entry depends on its own intensity's PMF values only, so raw
        # order (either polarity) needs no mirroring.
        return _model.posterior_luts(
            weights, self.particle_pmf_, self.background_pmf_, self.eps, dtype=np.dtype(self.posterior_dtype)
        )

    def _posterior(self, volume, backend, hists=None):
        luts = self.posterior_luts(self._weights(volume, backend, hists))
        if is_lazy(volume.array):
            return volume.restore(_lazy_posterior(volume.to_dask(), luts, backend.name))
        if volume.kind == "cupy":
            # Already on the GPU: one lookup over the whole volume, no copies.
            tables = backend.to_device(luts)
            return volume.restore(_kernels.apply_luts(backend, volume.read(0, volume.shape[0], backend), tables))
        out = np.empty(volume.shape, dtype=luts.dtype)
        depth = self._slab_depth(volume, _POSTERIOR_BYTES_PER_VOXEL, "posterior")
        tables = backend.to_device(luts)
        # The tables must be on the device before other threads' streams read them.
        backend.synchronize()

        def lookup(group):
            start, stop = int(group[0]), int(group[-1]) + 1
            with backend.stream():
                if not backend.is_gpu:
                    _kernels.apply_luts(backend, volume.read(start, stop), luts[start:stop], out=out[start:stop])
                    return
                result = _kernels.apply_luts(backend, volume.read(start, stop, backend), tables[start:stop])
                backend.to_host(result, out=out[start:stop])

        for _ in ordered_map(lookup, volume.slabs(depth), self._n_jobs(backend, volume)):
            pass
        return volume.restore(out)

    def predict_proba(self, X):
        """Posterior probability that each voxel belongs to a nanoparticle.

        Parameters
        ----------
        X : array or list of arrays
            uint8 image, volume or list of them, as in :meth:`fit`.

        Returns
        -------
        posterior : array or list of arrays, of dtype `posterior_dtype` (float32)
            Same shape as `X`. NumPy input gives a NumPy array; zarr and dask
            input give a lazy dask array (compute it, or store it with
            ``dask.array.to_zarr``). A list gives a list.
        """
        check_is_fitted(self)
        self._check_params()
        volumes, is_list = self._intensity_volumes(X)
        backend = self._resolve_backend(volumes)
        return map_volumes(lambda volume: self._posterior(volume, backend), volumes, is_list)

    def transform(self, X):
        """Posterior NP probability of each voxel; same as :meth:`predict_proba`.

        Parameters
        ----------
        X : array or list of arrays
            uint8 image, volume or list of them, as in :meth:`fit`.

        Returns
        -------
        posterior : array or list of arrays, of dtype `posterior_dtype` (float32)
        """
        return self.predict_proba(X)


def _apply_luts_block(block, luts, device="cpu"):
    """Look one chunk up; on a GPU, a host chunk is copied there and back."""
    backend = get_backend(device)
    if not backend.is_gpu:
        return _kernels.apply_luts(backend, to_numpy(block), luts)
    with backend.stream():
        result = _kernels.apply_luts(backend, backend.to_device(block), backend.to_device(luts))
        return result if backend.owns(block) else backend.to_host(result)


def _lazy_posterior(source, luts, device="cpu"):
    """Lazy per-slice lookup: one task per input chunk, on `device` ("cpu" or "cuda")."""
    import dask.array as da

    tables = da.from_array(luts, chunks=(source.chunks[0], luts.shape[1]))
    return da.blockwise(
        _apply_luts_block, "zyx", source, "zyx", tables, "zv",
        dtype=luts.dtype, concatenate=True, device=device,
    )
