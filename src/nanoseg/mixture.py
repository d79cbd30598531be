"""The empirical-Bayes intensity mixture: background vs nanoparticle.

The estimator holds the hyper-parameters, validates input and hands the work
to :mod:`nanoseg._engine.fit` (histogram passes and EM) and
:mod:`nanoseg._engine.posterior` (per-slice lookup tables, in memory, on a
GPU or as a lazy dask graph).
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils import metadata_routing
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from . import _model
from ._backend import CPU, DEVICES
from ._base import VolumeEstimatorMixin, map_volumes
from ._engine import fit as _fit_engine
from ._engine import posterior as _posterior
from ._engine.fit import DegenerateFitWarning
from ._intensity import MODES as BINNING_MODES
from ._plan import device_n_jobs
from ._validation import (
    check_beta_prior,
    check_intensity_range,
    check_intensity_volume,
    check_memory_budget,
    check_targets,
)
from ._volume import as_volumes

__all__ = ["DegenerateFitWarning", "NanoparticleMixture"]

# Documented (and pickled) as part of this module.
DegenerateFitWarning.__module__ = __name__


class NanoparticleMixture(VolumeEstimatorMixin, TransformerMixin, BaseEstimator):
    """Two-component intensity mixture for bright (or dark) nanoparticles (NPs).

    The volume's 256-bin intensity histogram is modelled as a mixture of a
    background PMF and an NP PMF (16-bit data is first mapped to 256 bins,
    see `binning`). `fit` estimates the background PMF from
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
    percentile_low : float or "otsu", default=99.5
        Percentile of the stack histogram above which a voxel seeds a
        candidate particle (when building the background histogram) and from
        which the NP PMF is initialised. "otsu" puts that seed level at the
        Otsu threshold of the stack histogram instead, so that it follows
        the data: one percentile cannot suit both a volume where particles
        are 0.1 % of the voxels and one where they are 30 %.
    percentile_high : float, default=99.8
        Percentile of the stack histogram at or above which a voxel is never
        counted as background. Must not be below a numeric `percentile_low`;
        with "otsu", the level used is the higher of the two.
    halo_pad : int, default=20
        Pixels added on every side of a seed component's bounding box (or of
        its pixels, see `halo`) before excluding it from the background
        histogram.
    halo : {"box", "dilation"}, default="box"
        Shape of the region excluded around each seed component: "box" its
        bounding box grown by `halo_pad` (the published method); "dilation"
        every pixel within `halo_pad` rows and columns of one of its pixels.
        They agree for compact particles; where particles touch in chains or
        networks, one bounding box can span most of an image and leave no
        background to learn from, while the dilation keeps the background
        between them. "dilation" labels every slice's seeds and filters the
        mask, so fitting is slower.
    min_seed_size : int, default=20
        Seed components (8-connected, per slice) smaller than this many pixels
        are not excluded with a halo.
    monotone_posterior : bool, default=False
        Constrain the fitted NP PMF so that the posterior never decreases
        towards the particles' side of the intensity scale (brighter for
        ``polarity="bright"``): after EM, the likelihood ratio
        ``p_np / p_bg`` is replaced by its isotonic regression weighted by
        ``p_bg``, which keeps the PMF's mass. EM alone hands the NP component
        whatever intensities the background histogram under-represents,
        dark ones included, so its posterior can be high in the background
        (typically when particles are not rare). False keeps the seed
        method's unconstrained PMF.
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
        a slab is never thinner than one input chunk (nor one slice): a
        budget too small for that is exceeded, with a warning. None means
        128 MiB per job.
    n_jobs : int, default=None
        Threads working on slabs at once. None takes the ``n_jobs`` of an
        enclosing :func:`joblib.parallel_config`, or else one per CPU; -1
        means one per CPU, -2 all but one, and so on. Under a
        ``dask.distributed`` client, `fit` sends the slabs of a zarr or
        dask volume to the workers instead (one task per slab).
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
        For 16-bit data ``v`` is the bin of a voxel (see `binning`).
    binning : {"auto", "range", "shift"}, default="auto"
        How intensities are mapped to the model's 256 bins; decided once in
        `fit` and kept for prediction (see Notes, *16-bit data*):

        - "range": the values from `low` to `high` are split linearly into
          256 bins of (within one) equal width,
          ``bin = (v - low) * 256 // (high - low + 1)``, clipped to 0-255;
        - "shift": ``bin = min(v >> k, 255)`` with the smallest ``k`` that
          brings `high` below 256 (bins ``2**k`` values wide, from 0);
        - "auto": each value is its own bin when the data fits in 8 bits
          (uint8 data, or uint16 data whose largest value is at most 255)
          and no `intensity_range` is given; otherwise "range".

        `low` and `high` are the smallest and largest values of the sampled
        slices unless `intensity_range` sets them. 8-bit data under "auto"
        is never mapped: results are exactly those of the 8-bit model.
    intensity_range : (int, int), default=None
        ``(low, high)`` bounds of the binning, in the data's units; either
        may be None for the observed minimum or maximum. Values below `low`
        go to bin 0 and values above `high` to bin 255. Give bounds when hot
        pixels or a few saturated voxels stretch the observed range, or to
        fix the same binning for several volumes. With "shift", `low` must
        be None or 0.
    device : {"cpu", "cuda", "auto"}, default="cpu"
        Where histograms and lookups run. "cuda" uses a CUDA GPU through CuPy
        (``pip install "nanoseg[gpu]"``) and raises
        :class:`~nanoseg.GPUUnavailableError` without one; "auto" uses
        the GPU when there is one and the CPU otherwise (saying so in the
        "nanoseg" log). CuPy input is always processed on the GPU (unless
        "cpu", which rejects it). The posterior of host input (NumPy, zarr,
        dask) is looked up on the host on either device: a lookup runs at
        memory speed there, and copying voxels to a GPU and posteriors back
        is slower. Results are identical on every device.
    verbose : bool, default=False
        Show progress bars, and print the slab size each pass chose.

    Attributes
    ----------
    stack_histogram_ : ndarray of shape (256,), int64
        Intensity counts of all sampled voxels, by bin (see `binning`; the
        bin is the intensity itself for 8-bit data).
    background_histogram_ : ndarray of shape (256,), int64
        Intensity counts of the voxels kept as surely background, by bin.
    stack_pmf_, background_pmf_, particle_pmf_ : ndarray of shape (256,), float64
        The stack, background and fitted NP PMFs. Like the histograms, they
        are indexed by raw intensity (bin), also with ``polarity="dark"``.
        With ``monotone_posterior=True``, `particle_pmf_` is the constrained
        PMF (the one every posterior uses).
    low_intensity_, high_intensity_ : int
        Intensities at `percentile_low` and `percentile_high` of the stack PMF
        (with ``percentile_low="otsu"``, its Otsu threshold and the higher of
        that and the `percentile_high` level):
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
    binning_mode_ : {"range", "shift"}
        The rule mapping intensities to the 256 bins (``"range"`` from 0 to
        255, the identity, for 8-bit data under ``binning="auto"``).
    binning_low_, binning_high_ : int
        Bounds of the rule: "range" maps `binning_low_` to `binning_high_`
        (both included) onto the 256 bins; "shift" has `binning_low_` 0 and
        `binning_high_` the value the shift was chosen for.
    binning_shift_ : int
        Bits dropped by the "shift" rule; 0 for "range".

    See Also
    --------
    NanoparticleLabeler : Turns the posterior into labelled particles.

    Notes
    -----
    **Input conventions.** `X` is a 2D image (Y, X), a 3D volume (Z, Y, X) --
    plane, row, column -- or a list of such arrays (annotated crops). Arrays may
    be NumPy, zarr or dask arrays of dtype uint8 or uint16. For a single volume
    the samples, in the scikit-learn sense, are its Z slices (each slice gets
    its own NP fraction); for a list, each crop is one sample.

    **16-bit data.** The model works on 256 bins. For uint16 data (or 8-bit
    data with a `binning` other than "auto" or an `intensity_range`), `fit`
    decides one map from values to bins -- the `binning` rule, with bounds
    from `intensity_range` or from the smallest and largest sampled values --
    and stores it (``binning_*_``). Every slab, in `fit` and afterwards, goes
    through that map (one lookup per voxel in a 64 KiB table) before the
    8-bit computations, so the bin of a voxel depends on its value only, not
    on the slab or chunk it is read in, and the posterior of a voxel is its
    slice's lookup table at its bin. The histograms, PMFs and
    ``low_intensity_``/``high_intensity_`` are then indexed by bin.
    Prediction applies the fitted map to any input; values outside
    ``binning_low_``..``binning_high_`` fall in the first or last bin. A
    uint16 array whose values all fit in 8 bits gives exactly the results of
    the same array as uint8. The bounds cost no extra pass over the data:
    the first pass counts every 16-bit value over the sampled slices
    (65,536 counters) instead of per-slice histograms, which the second pass
    then counts on the mapped slabs.

    **One read to fit.** The seed level is a percentile of the whole stack
    histogram, known only once every sampled slice is counted, so the
    published method reads the data twice. For 8-bit data on the CPU (no
    `binning` or `intensity_range`, ``halo="box"``) `fit` reads it once:
    while a slab's histograms are counted, its seed boxes are counted at the
    few seed levels that the histograms read so far predict, and slabs whose
    prediction missed the final level are read again. The fitted model is
    the same, to the bit, as with two passes; only the number of reads
    differs (one on stacks whose brightness is steady along z; a few slabs
    more where it drifts).

    **Out of core.** zarr and dask inputs are read slab by slab (whole planes,
    aligned to the chunks along Z) and never loaded whole; their posterior is
    returned as a lazy dask array. On the CPU its slice weights are computed
    inside the graph, from the planes the lookup reads: `transform` reads
    nothing, and computing the posterior (or labelling it with
    :class:`NanoparticleLabeler`) reads the input once (chunks deeper than
    one plane may be read twice where slab halos cut them).

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

    16-bit data whose range is given maps back onto the same 256 bins, so the
    posterior is the one of the 8-bit image:

    >>> import numpy as np
    >>> wide = image.astype(np.uint16) * 200 + 1000
    >>> mixture16 = NanoparticleMixture(binning="range", intensity_range=(1000, 52199))
    >>> mixture16 = mixture16.fit(wide)
    >>> mixture16.binning_mode_, mixture16.binning_low_, mixture16.binning_high_
    ('range', 1000, 52199)
    >>> bool((mixture16.predict_proba(wide) == posterior).all())
    True
    """

    # predict's `threshold` is an argument, not metadata to route: without
    # this, scikit-learn would add a set_predict_request method for it.
    __metadata_request__predict = {"threshold": metadata_routing.UNUSED}

    _parameter_constraints = {
        "beta_prior": ["array-like"],
        "percentile_low": [Interval(Real, 0, 100, closed="right"), StrOptions({"otsu"})],
        "percentile_high": [Interval(Real, 0, 100, closed="right")],
        "halo_pad": [Interval(Integral, 0, None, closed="left")],
        "halo": [StrOptions({"box", "dilation"})],
        "min_seed_size": [Interval(Integral, 1, None, closed="left")],
        "monotone_posterior": ["boolean"],
        "sampling_step": [Interval(Integral, 1, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "eps": [Interval(Real, 0, 1, closed="neither")],
        "memory_budget": [None, Interval(Integral, 1, None, closed="left"), str],
        "n_jobs": [None, Integral],
        "posterior_dtype": [StrOptions({"float32", "float16"})],
        "polarity": [StrOptions({"bright", "dark"})],
        "binning": [StrOptions(set(BINNING_MODES))],
        "intensity_range": [None, "array-like"],
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
        halo="box",
        min_seed_size=20,
        monotone_posterior=False,
        sampling_step=1,
        max_iter=10000,
        tol=1e-10,
        eps=1e-12,
        memory_budget=None,
        n_jobs=None,
        posterior_dtype="float32",
        polarity="bright",
        binning="auto",
        intensity_range=None,
        device="cpu",
        verbose=False,
    ):
        self.beta_prior = beta_prior
        self.percentile_low = percentile_low
        self.percentile_high = percentile_high
        self.halo_pad = halo_pad
        self.halo = halo
        self.min_seed_size = min_seed_size
        self.monotone_posterior = monotone_posterior
        self.sampling_step = sampling_step
        self.max_iter = max_iter
        self.tol = tol
        self.eps = eps
        self.memory_budget = memory_budget
        self.n_jobs = n_jobs
        self.posterior_dtype = posterior_dtype
        self.polarity = polarity
        self.binning = binning
        self.intensity_range = intensity_range
        self.device = device
        self.verbose = verbose

    def _check_params(self):
        """Checks beyond the parameter constraints (which `fit` validates on entry)."""
        check_memory_budget(self.memory_budget)
        check_beta_prior(self.beta_prior)
        check_intensity_range(self.intensity_range, self.binning)
        if self.percentile_low != "otsu" and self.percentile_low > self.percentile_high:
            raise ValueError(
                f"percentile_low ({self.percentile_low}) must not exceed percentile_high "
                f"({self.percentile_high}): seeds start at the low percentile and the hard "
                "background exclusion at the high one."
            )

    def _intensity_volumes(self, X):
        volumes, is_list = as_volumes(X)
        for volume in volumes:
            check_intensity_volume(volume, allow_uint16=True)
        return volumes, is_list

    def _n_jobs(self, backend, volume):
        return device_n_jobs(self.n_jobs, backend, on_device=volume.kind == "cupy")

    def _posterior_of(self, volume, backend, **options):
        """`volume`'s posterior (or mask), looked up where its voxels are.

        A host volume (NumPy, zarr, dask) is looked up on the host whatever
        the device: a table lookup runs at memory speed there, while on a GPU
        its bytes would cross the bus in (one a voxel) and the posterior's
        back (four). On an H200 machine with 16 cores the GPU took 0.99 s
        where the host took 0.38 s for 0.54 Gvoxel (``benchmarks/gpu``); on
        the host, the GPU run's posterior took 0.40 s. A CuPy volume is
        looked up on its GPU.
        """
        if volume.kind != "cupy":
            backend = CPU
        return _posterior.posterior(self, volume, backend, self._n_jobs(backend, volume), **options)

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Learn the background and NP intensity PMFs from `X`.

        Parameters
        ----------
        X : array or list of arrays
            uint8 or uint16 image (Y, X), volume (Z, Y, X), or a list of
            them (NumPy, zarr or dask). See the class Notes for the
            conventions.
        y : ignored
            Present for pipelines; when given, its shape is checked against `X`.

        Returns
        -------
        self : NanoparticleMixture
            The fitted estimator.

        Raises
        ------
        TypeError
            If `X` is not uint8 or uint16 (the message suggests a conversion).
        ValueError
            If `X` is constant (or all of it falls in one bin), or no
            background voxels remain.
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
        attributes, slice_hists = _fit_engine.fit_mixture(self, volumes, is_list, backend, n_jobs)
        for name, value in attributes.items():
            setattr(self, name, value)
        return volumes, is_list, slice_hists

    @_fit_context(prefer_skip_nested_validation=True)
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
            lambda item: self._posterior_of(item[0], backend, hists=slice_hists[item[1] : item[2]]),
            list(zip(volumes, bounds[:-1], bounds[1:])),
            is_list,
        )

    # -- prediction -------------------------------------------------------
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
        self._validate_params()
        self._check_params()
        volumes, is_list = self._intensity_volumes(X)
        backend = self._resolve_backend(volumes)
        return map_volumes(
            lambda volume: _posterior.slice_weights(
                self, _posterior.slice_histograms(self, volume, "Slice weights", backend, self._n_jobs(backend, volume))
            ),
            volumes,
            is_list,
        )

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
            in slice ``z``; for 16-bit data, of a voxel in bin ``v`` (see
            `binning`).
        """
        check_is_fitted(self)
        # Each entry depends on its own intensity's PMF values only, so raw
        # order (either polarity) needs no mirroring.
        return _model.posterior_luts(
            weights, self.particle_pmf_, self.background_pmf_, self.eps, dtype=np.dtype(self.posterior_dtype)
        )

    def predict_proba(self, X):
        """Posterior probability that each voxel belongs to a nanoparticle.

        Parameters
        ----------
        X : array or list of arrays
            uint8 or uint16 image, volume or list of them, as in :meth:`fit`.

        Returns
        -------
        posterior : array or list of arrays, of dtype `posterior_dtype` (float32)
            Same shape as `X`. NumPy input gives a NumPy array; zarr and dask
            input give a lazy dask array (compute it, or store it with
            :func:`nanoseg.io.write_ome_zarr`). A list gives a list.

        Notes
        -----
        A lazy 3D posterior is a plain dask array, but nanoseg keeps, for as
        long as it lives, how to make its mask (the lazy ``posterior >=
        threshold`` looked up in boolean tables, as :meth:`predict` does),
        which :class:`NanoparticleLabeler` uses, and its values at given
        voxels, which :func:`nanoseg.measure.particle_table` uses; both keep
        the tables the posterior was made with, whatever happens to the
        mixture afterwards. A local uint8 zarr volume is decoded and looked up
        in one task per block when its tables are known as the graph is built
        (:meth:`fit_transform`), or, read in blocks of whole slices, decoded,
        counted (for its slices' weights) and looked up in one task per block.
        """
        return self._map_posterior(X)

    def _map_posterior(self, X, threshold=None):
        """The posterior (or its mask at `threshold`) of every volume of `X`."""
        check_is_fitted(self)
        self._validate_params()
        self._check_params()
        volumes, is_list = self._intensity_volumes(X)
        backend = self._resolve_backend(volumes)
        return map_volumes(
            lambda volume: self._posterior_of(volume, backend, threshold=threshold),
            volumes,
            is_list,
        )

    def predict(self, X, *, threshold=0.5):
        """Which voxels have an NP posterior of at least `threshold`.

        Equal to ``predict_proba(X) >= threshold``, but computed through
        per-slice boolean lookup tables: no float posterior is ever made,
        so the work takes one byte a voxel instead of four (float32).

        Parameters
        ----------
        X : array or list of arrays
            uint8 or uint16 image, volume or list of them, as in :meth:`fit`.
        threshold : float, default=0.5
            Smallest posterior counted as a particle voxel; 0.5 is the
            more probable class.

        Returns
        -------
        mask : bool array or list of them
            Same shape as `X`; NumPy for NumPy input, a lazy dask array for
            zarr and dask input, CuPy for CuPy input.

        Examples
        --------
        >>> from nanoseg import NanoparticleMixture
        >>> from nanoseg.datasets import make_phantom
        >>> image, truth = make_phantom(shape=(4, 64, 64), random_state=0)
        >>> mixture = NanoparticleMixture().fit(image)
        >>> mask = mixture.predict(image, threshold=0.9)
        >>> mask.dtype, bool((mask == (mixture.predict_proba(image) >= 0.9)).all())
        (dtype('bool'), True)
        """
        if not (isinstance(threshold, Real) and 0.0 <= threshold <= 1.0):
            raise ValueError(f"threshold must be a number from 0 to 1; got {threshold!r}.")
        return self._map_posterior(X, threshold=float(threshold))

    def transform(self, X):
        """Posterior NP probability of each voxel; same as :meth:`predict_proba`.

        Parameters
        ----------
        X : array or list of arrays
            uint8 or uint16 image, volume or list of them, as in :meth:`fit`.

        Returns
        -------
        posterior : array or list of arrays, of dtype `posterior_dtype` (float32)
        """
        return self.predict_proba(X)
