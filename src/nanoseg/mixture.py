"""The empirical-Bayes intensity mixture: background vs nanoparticle."""

from __future__ import annotations

import functools
import warnings
from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import metadata_routing
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from tqdm import tqdm

from . import _kernels, _model
from ._backend import CPU as CPU_BACKEND
from ._backend import DEVICES, get_backend, to_numpy
from ._base import VolumeEstimatorMixin, map_volumes
from ._intensity import MODES as BINNING_MODES
from ._intensity import Binning, check_intensity_dtype, choose_binning
from ._parallel import device_n_jobs, ordered_map, slab_budget
from ._volume import as_volumes, check_finite, check_targets, is_lazy, parse_bytes

__all__ = ["DegenerateFitWarning", "NanoparticleMixture"]

# Working bytes per voxel for the histogram passes (the uint8 slab plus the
# background kernel's boolean masks) and for the in-memory posterior
# (the uint8 slab and its float32 output). A slab that is mapped to bins
# first (16-bit data) adds its raw voxels: see _mapping_bytes.
_HISTOGRAM_BYTES_PER_VOXEL = 4
_POSTERIOR_BYTES_PER_VOXEL = 5

#: The binning of 8-bit data under binning="auto": every value is its own bin.
_IDENTITY = Binning("range", 0, 255)
_UINT16_MAX = 2**16 - 1
# Above this fraction of voxels at or beyond the seed percentile, the data is
# treated as saturated (see NanoparticleMixture._check_not_saturated).
_SATURATED_FRACTION = 0.5


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


class DegenerateFitWarning(UserWarning):
    """The fitted particle component is empty or collapsed: the model will find no particles."""


def _refuse_colour(volume):
    """Raise for an (Y, X, 3) or (Y, X, 4) array: an RGB(A) image, not a 3-slice volume."""
    shape = volume.shape
    if not volume.is_2d and shape[-1] in (3, 4) and min(shape[0], shape[1]) > shape[-1]:
        raise ValueError(
            f"{volume.name} has shape {tuple(shape)}: it looks like an RGB{'A' if shape[-1] == 4 else ''} "
            "image (Y, X, channels), not a volume of planes. nanoseg needs one intensity channel: "
            f"convert it, e.g. skimage.util.img_as_ubyte(skimage.color.rgb2gray({volume.name}"
            f"{'[..., :3]' if shape[-1] == 4 else ''})), or take one channel, {volume.name}[..., 0]. "
            "A real volume of 3 or 4 columns is refused too: transpose it to (Z, Y, X)."
        )


def check_intensity_volume(volume, *, allow_uint16=False):
    """Raise a clear error unless `volume` holds 8-bit intensities (or 16-bit ones, if allowed).

    Steps that work on 8-bit intensities only keep the default; the mixture,
    which maps 16-bit data to its 256 bins itself, passes ``allow_uint16=True``.
    """
    _refuse_colour(volume)
    if volume.dtype == np.uint8 or (allow_uint16 and volume.dtype == np.uint16):
        return
    if volume.in_memory:
        check_finite(volume.array, volume.name)
    if allow_uint16:
        check_intensity_dtype(volume.dtype, volume.name)
    if volume.dtype == np.uint16:
        raise TypeError(
            f"{volume.name} must hold 8-bit intensities (uint8) for this step; got uint16. "
            "NanoparticleMixture takes 16-bit data directly (see its binning parameter); for this "
            "step, map the data to 8 bits with one rule for the whole volume, e.g. "
            "skimage.exposure.rescale_intensity(X, in_range=(low, high), out_range=np.uint8) "
            "with the same low and high for every slab."
        )
    raise TypeError(
        f"{volume.name} must hold 8-bit intensities (uint8); got {volume.dtype}. Convert it first, "
        "e.g. with skimage.util.img_as_ubyte for images scaled to [0, 1], or by rescaling "
        "your intensity range to 0-255."
    )


def check_intensity_range(intensity_range, binning="auto"):
    """Validate `intensity_range` for `binning`; return ``(low, high)``, None for a missing bound."""
    if intensity_range is None:
        return None, None
    try:
        values = tuple(intensity_range)
    except TypeError:
        values = ()
    if len(values) != 2 or not all(
        v is None or isinstance(v, Integral) and not isinstance(v, (bool, np.bool_)) for v in values
    ):
        raise ValueError(
            "intensity_range must be None or a pair (low, high) of integer intensities, either of "
            f"which may be None for the observed minimum or maximum; got {intensity_range!r}."
        )
    low, high = (None if v is None else int(v) for v in values)
    for name, value in (("low", low), ("high", high)):
        if value is not None and not 0 <= value <= _UINT16_MAX:
            raise ValueError(
                f"intensity_range: {name} must be an intensity from 0 to {_UINT16_MAX}; got {value}."
            )
    if low is not None and high is not None and low > high:
        raise ValueError(f"intensity_range: low ({low}) must not exceed high ({high}).")
    if binning == "shift" and low not in (None, 0):
        raise ValueError(
            "binning='shift' always starts its first bin at intensity 0, so intensity_range cannot "
            f"set low={low}: pass (None, high) or (0, high), or use binning='range'."
        )
    return low, high


def _to_bins(backend, slab, binning):
    """The bins of a slab of the backend: a uint8 slab under an identity binning as is.

    Any other slab takes one lookup per voxel in the binning's table (64 KiB
    for uint16), on the device that holds the slab.
    """
    if slab.dtype == np.uint8 and binning.is_identity:
        return slab
    return backend.to_device(binning.table(slab.dtype))[slab]


def _mapping_bytes(volume, maps):
    """Extra working bytes per voxel when `volume`'s slabs are mapped to bins: the raw slab."""
    return volume.dtype.itemsize if maps or volume.dtype != np.uint8 else 0


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
        "cpu", which rejects it). Results are identical on every device.
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
        self._validate_params()
        parse_bytes(self.memory_budget)
        check_beta_prior(self.beta_prior)
        check_intensity_range(self.intensity_range, self.binning)
        if self.percentile_low != "otsu" and self.percentile_low > self.percentile_high:
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
            check_intensity_volume(volume, allow_uint16=True)
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
        dark = self.polarity == "dark"
        sampled = [np.arange(0, v.shape[0], self.sampling_step) for v in volumes]
        n_slices = int(sum(s.size for s in sampled))
        # 16-bit data (and 8-bit data given a binning) is mapped to bins slab by slab.
        wide = any(volume.dtype == np.uint16 for volume in volumes)
        maps = wide or not self._keeps_8bit_values()
        work = [
            (volume, group)
            for volume, indices in zip(volumes, sampled)
            for group in volume.slabs(
                self._slab_depth(volume, _HISTOGRAM_BYTES_PER_VOXEL + _mapping_bytes(volume, maps), "histograms"),
                indices,
            )
        ]

        if wide:
            # Pass 1 for 16-bit data: the binning must be fixed before any slab
            # is mapped, so this pass counts every raw value over all sampled
            # slices (65,536 counters: 512 KiB per thread, whatever the
            # volume's size). The per-slice histograms of the mapped data are
            # counted in pass 2, which reads every slab anyway: no extra pass.
            value_counts = self._value_counts(work, backend, n_jobs, n_slices)
            binning = self._choose_binning(value_counts)
            slice_hists = None
            raw_stack_hist = binning.fold(value_counts)
        else:
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
            value_counts = slice_hists.sum(axis=0)
            if maps:
                binning = self._choose_binning(value_counts)
                slice_hists = binning.fold(slice_hists)
            else:
                binning = _IDENTITY
            raw_stack_hist = slice_hists.sum(axis=0)
        stack_hist = self._mirror(raw_stack_hist)
        self._check_contrast(raw_stack_hist, value_counts, binning)
        stack_pmf = _model.normalize_pmf(stack_hist, self.eps)
        high = _model.percentile_intensity(stack_pmf, self.percentile_high)
        if self.percentile_low == "otsu":
            self._check_not_saturated(stack_hist, None, binning)
            low = _model.otsu_intensity(stack_hist)
            high = max(high, low)
        else:
            low = _model.percentile_intensity(stack_pmf, self.percentile_low)
            self._check_not_saturated(stack_hist, low, binning)

        # Pass 2: subtract each slice's excluded pixels from its histogram
        # (for 16-bit data, count each mapped slice's histogram first).
        firsts = np.cumsum([0] + [len(group) for _, group in work])

        def background(numbered):
            position, (volume, group) = numbered
            first = firsts[position]
            with backend.stream():
                slab = _to_bins(backend, volume.read_slices(group, backend), binning)
                if slice_hists is None:
                    hists = _kernels.slice_histograms(backend, slab)
                else:
                    hists = slice_hists[first : first + len(group)]
                background = _kernels.slab_background_histograms(
                    backend, slab, low, high,
                    min_seed_size=self.min_seed_size, halo_pad=self.halo_pad,
                    hists=hists, dark=dark, halo=self.halo,
                )
                counted = backend.to_host(hists) if slice_hists is None else None
                return backend.to_host(background).sum(axis=0), len(group), counted

        background_hist = np.zeros(_model.N_BINS, dtype=np.int64)
        counted_hists = []
        with tqdm(total=n_slices, desc="Background histogram", unit="slice", disable=not self.verbose) as bar:
            for hist, n, counted in ordered_map(background, enumerate(work), n_jobs):
                background_hist += hist
                counted_hists.append(counted)
                bar.update(n)
        if slice_hists is None:
            slice_hists = np.concatenate(counted_hists)
        if background_hist.sum() == 0:
            side = "at or below" if dark else "at or above"
            raise ValueError(
                "No background voxels are left once particle seeds, their halos and voxels "
                f"{side} {'intensity' if binning.is_identity else 'bin'} {self._mirror_level(high)} "
                "are excluded. Lower halo_pad or "
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

        self._warn_if_degenerate(result.particle_pmf, low, high, result.background_weight, is_list)
        particle_pmf = result.particle_pmf
        if self.monotone_posterior:
            particle_pmf = _model.monotone_particle_pmf(particle_pmf, background_pmf)

        self.stack_histogram_ = raw_stack_hist
        self.background_histogram_ = raw_background_hist
        self.stack_pmf_ = self._mirror(stack_pmf)
        self.background_pmf_ = self._mirror(background_pmf)
        self.particle_pmf_ = self._mirror(particle_pmf)
        self.low_intensity_ = self._mirror_level(low)
        self.high_intensity_ = self._mirror_level(high)
        self.background_weight_ = result.background_weight
        self.neg_log_likelihood_ = result.neg_log_likelihood
        self.n_iter_ = result.n_iter
        self.converged_ = result.converged
        self.n_slices_fit_ = n_slices
        self.binning_mode_ = binning.mode
        self.binning_low_ = int(binning.low)
        self.binning_high_ = int(binning.high)
        self.binning_shift_ = int(binning.shift)
        return volumes, is_list, slice_hists

    def _warn_if_degenerate(self, particle_pmf, low, high, background_weight, is_list):
        """Warn when the particle component is empty, or collapsed to a single intensity
        because the seed level met the background's exclusion level."""
        peak = int(np.argmax(particle_pmf))
        if low >= high and particle_pmf[peak] > 0.99:
            level = self._mirror_level(peak)
            cause = (
                f"the seed level met the background's exclusion level and the particle intensity "
                f"distribution collapsed onto one {'intensity' if self._keeps_8bit_values() else 'bin'} "
                f"({level}): the brightest voxels are too few or all alike to describe particles"
            )
        elif 1.0 - background_weight < 1e-6:
            cause = f"the particle component's weight is {1.0 - background_weight:.1e}, i.e. empty"
        else:
            return
        remedy = (
            "Crops pooled in one fit must share one intensity scale; when their brightness "
            "differs, fit one model per crop (nanoseg.tuning.PerVolume, as nanoseg.tune does). "
            if is_list
            else ""
        )
        warnings.warn(
            f"Degenerate fit: {cause}, so the posterior will find (almost) no particles. {remedy}"
            "Try percentile_low='otsu' or a lower percentile_low, and check that the image holds "
            "particles.",
            DegenerateFitWarning,
            stacklevel=3,
        )

    # -- binning ------------------------------------------------------------
    def _keeps_8bit_values(self):
        """True when 8-bit data keeps its values as bins (no binning asked for)."""
        return self.binning == "auto" and self.intensity_range is None

    def _value_counts(self, work, backend, n_jobs, n_slices):
        """Counts of every 16-bit value over the slabs of `work`: (65536,) int64."""

        def count(item):
            volume, group = item
            with backend.stream():
                slab = volume.read_slices(group, backend)
                total = backend.xp.zeros(_UINT16_MAX + 1, dtype=np.int64)
                # Plane by plane: bincount widens its input to 64-bit integers,
                # so this bounds that copy to one plane.
                for plane in slab:
                    total += backend.xp.bincount(plane.reshape(-1), minlength=_UINT16_MAX + 1)
                return backend.to_host(total), len(group)

        counts = np.zeros(_UINT16_MAX + 1, dtype=np.int64)
        with tqdm(total=n_slices, desc="Intensity range", unit="slice", disable=not self.verbose) as bar:
            for total, n in ordered_map(count, work, n_jobs):
                counts += total
                bar.update(n)
        return counts

    def _choose_binning(self, value_counts):
        """The binning for the counts of every value (256 or 65536 of them) and the parameters."""
        low, high = check_intensity_range(self.intensity_range, self.binning)
        counts = np.zeros(_UINT16_MAX + 1, dtype=np.int64)
        counts[: value_counts.size] = value_counts
        return choose_binning(counts, np.uint16, mode=self.binning, low=low, high=high)

    def _check_contrast(self, stack_hist, value_counts, binning):
        """Refuse data whose sampled voxels all fall in one bin."""
        present = np.flatnonzero(stack_hist)
        if present.size >= 2:
            return
        values = np.flatnonzero(value_counts)
        if values.size < 2:
            raise ValueError(
                f"X is constant: every sampled voxel has intensity {int(values[0])}, so there "
                "is no contrast to separate particles from background. Check that the right "
                "array (and channel) was passed."
            )
        raise ValueError(
            f"Every sampled voxel falls in bin {int(present[0])}: its intensities, from "
            f"{int(values[0])} to {int(values[-1])}, lie outside or at one end of the binning's "
            f"range ({binning.mode!r} from {binning.low} to {binning.high}), so there is no contrast "
            "left. Widen intensity_range, or leave it as None to use the observed range."
        )

    def _check_not_saturated(self, stack_hist, low, binning):
        """Refuse data where most voxels tie at or beyond the seed percentile.

        The seed threshold is the `percentile_low` percentile of the stack
        histogram, so normally only ``100 - percentile_low`` % of the voxels
        reach it. When most voxels share the brightest values (a saturated
        or all-bright acquisition) the percentile collapses onto them, and the
        model would call nearly the whole volume particles.
        """
        if low is None:
            # percentile_low="otsu": the level follows the data, so a large
            # share above it is no sign of saturation; most voxels piled up
            # in the extreme occupied bin are.
            low = int(np.flatnonzero(stack_hist)[-1])
            expected, level = 0.0, "its extreme value"
        else:
            # Twice the expected share, so that a deliberately low
            # percentile_low is not mistaken for saturation.
            expected, level = (100.0 - self.percentile_low) / 100.0, f"its {self.percentile_low:g} percentile"
        above = stack_hist[low:].sum() / stack_hist.sum()
        if above <= max(_SATURATED_FRACTION, 2 * expected):
            return
        unit = "intensity" if binning.is_identity else "bin"
        side = "at or below" if self.polarity == "dark" else "at or above"
        raise ValueError(
            f"X looks saturated: {100 * above:.1f} % of the sampled voxels are {side} {unit} "
            f"{self._mirror_level(low)}, {level}, so particles "
            "cannot be told from background. Check the acquisition's contrast and the polarity "
            "(polarity='dark' for particles darker than background); for 16-bit data, set "
            "intensity_range to the useful range."
        )

    def _fitted_binning(self):
        """The binning fixed by `fit`."""
        if not hasattr(self, "binning_mode_"):
            # Unpickled from a version that took 8-bit data only: values were bins.
            return _IDENTITY
        return Binning(self.binning_mode_, int(self.binning_low_), int(self.binning_high_), int(self.binning_shift_))

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
        binning = self._fitted_binning()
        maps = not binning.is_identity
        depth = self._slab_depth(volume, _HISTOGRAM_BYTES_PER_VOXEL + _mapping_bytes(volume, maps), "histograms")

        def histograms(group):
            with backend.stream():
                slab = _to_bins(backend, volume.read(int(group[0]), int(group[-1]) + 1, backend), binning)
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
            in slice ``z``; for 16-bit data, of a voxel in bin ``v`` (see
            `binning`).
        """
        check_is_fitted(self)
        # Each entry depends on its own intensity's PMF values only, so raw
        # order (either polarity) needs no mirroring.
        return _model.posterior_luts(
            weights, self.particle_pmf_, self.background_pmf_, self.eps, dtype=np.dtype(self.posterior_dtype)
        )

    def _posterior(self, volume, backend, hists=None, threshold=None):
        """The posterior of one volume, or with a `threshold` its mask ``posterior >= threshold``.

        A mask is looked up in boolean tables (each entry is the comparison
        the float posterior would make), so no float voxel is ever written.
        """
        binning = self._fitted_binning()
        maps = volume.dtype != np.uint8 or not binning.is_identity
        if is_lazy(volume.array) and hists is None and not backend.is_gpu:
            # The slice weights are computed inside the graph from the chunks
            # the lookup reads anyway: one pass over the input, not two.
            tables = _SliceTables(
                self._mirror(self.particle_pmf_), self._mirror(self.background_pmf_),
                check_beta_prior(self.beta_prior), self.eps, self.posterior_dtype, self.polarity == "dark",
            )
            source, binning = volume.to_dask(), binning if maps else None
            if threshold is not None:
                return volume.restore(_one_pass_mask(source, tables, binning, threshold))
            posterior = volume.restore(_one_pass_posterior(source, tables, binning))
            # NanoparticleLabeler thresholds this array through the tables
            # (one byte a voxel) rather than through the float posterior.
            posterior._nanoseg_mask = functools.partial(_one_pass_mask, source, tables, binning)
            return posterior
        luts = self.posterior_luts(self._weights(volume, backend, hists))
        if threshold is not None:
            luts = luts >= threshold
        if is_lazy(volume.array):
            return volume.restore(_lazy_posterior(volume.to_dask(), luts, backend.name, binning if maps else None))
        if volume.kind == "cupy":
            # Already on the GPU: one lookup over the whole volume, no copies
            # (but the mapped volume, for 16-bit data).
            tables = backend.to_device(luts)
            slab = _to_bins(backend, volume.read(0, volume.shape[0], backend), binning)
            return volume.restore(_kernels.apply_luts(backend, slab, tables))
        out = np.empty(volume.shape, dtype=luts.dtype)
        depth = self._slab_depth(volume, _POSTERIOR_BYTES_PER_VOXEL + _mapping_bytes(volume, maps), "posterior")
        tables = backend.to_device(luts)
        # The tables must be on the device before other threads' streams read them.
        backend.synchronize()

        def lookup(group):
            start, stop = int(group[0]), int(group[-1]) + 1
            with backend.stream():
                if not backend.is_gpu:
                    slab = _to_bins(backend, volume.read(start, stop), binning)
                    _kernels.apply_luts(backend, slab, luts[start:stop], out=out[start:stop])
                    return
                slab = _to_bins(backend, volume.read(start, stop, backend), binning)
                result = _kernels.apply_luts(backend, slab, tables[start:stop])
                backend.to_host(result, out=out[start:stop])

        for _ in ordered_map(lookup, volume.slabs(depth), self._n_jobs(backend, volume)):
            pass
        return volume.restore(out)

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
            ``dask.array.to_zarr``). A list gives a list.
        """
        return self._map_posterior(X)

    def _map_posterior(self, X, threshold=None):
        """:meth:`_posterior` (or its mask at `threshold`) of every volume of `X`."""
        check_is_fitted(self)
        self._check_params()
        volumes, is_list = self._intensity_volumes(X)
        backend = self._resolve_backend(volumes)
        return map_volumes(lambda volume: self._posterior(volume, backend, threshold=threshold), volumes, is_list)

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


def _apply_luts_block(block, luts, device="cpu", binning=None):
    """Look one chunk up (mapped to bins first when a `binning` is given); on a
    GPU, a host chunk is copied there and back."""
    backend = get_backend(device)
    if not backend.is_gpu:
        block = to_numpy(block)
        if binning is not None:
            block = _to_bins(backend, block, binning)
        return _kernels.apply_luts(backend, block, luts)
    with backend.stream():
        slab = backend.to_device(block)
        if binning is not None:
            slab = _to_bins(backend, slab, binning)
        result = _kernels.apply_luts(backend, slab, backend.to_device(luts))
        return result if backend.owns(block) else backend.to_host(result)


def _lazy_posterior(source, luts, device="cpu", binning=None):
    """Lazy per-slice lookup: one task per input chunk, on `device` ("cpu" or "cuda").

    With a `binning`, each chunk is mapped to bins in its own task, so the
    mapped volume never exists as a whole.
    """
    import dask.array as da

    tables = da.from_array(luts, chunks=(source.chunks[0], luts.shape[1]))
    options = {} if binning is None else {"binning": binning}
    return da.blockwise(
        _apply_luts_block, "zyx", source, "zyx", tables, "zv",
        dtype=luts.dtype, concatenate=True, device=device, **options,
    )


class _SliceTables:
    """Posterior lookup tables from slice histograms, as a small picklable callable.

    Gives exactly ``posterior_luts(_weights(hists))`` of the fitted mixture:
    each slice's MAP weight depends on its own histogram only, so tables
    computed for a few slices at a time equal those computed for all at once.
    The PMFs are stored in model space (mirrored for dark particles).
    """

    def __init__(self, particle_pmf, background_pmf, beta_prior, eps, dtype, dark, threshold=None):
        self.particle_pmf = particle_pmf
        self.background_pmf = background_pmf
        self.beta_prior = beta_prior
        self.eps = eps
        self.posterior_dtype = np.dtype(dtype)
        self.dark = dark
        self.threshold = threshold

    @property
    def dtype(self):
        """The tables' dtype: the posterior's, or bool once thresholded."""
        return self.posterior_dtype if self.threshold is None else np.dtype(bool)

    def thresholded(self, threshold):
        """The same tables as ``posterior >= threshold`` masks (bool tables).

        The comparison is the one a thresholded posterior makes (a table
        entry is a voxel's posterior), so the masks are identical.
        """
        return _SliceTables(
            self.particle_pmf, self.background_pmf, self.beta_prior, self.eps, self.posterior_dtype,
            self.dark, float(threshold),
        )

    def _mirror(self, array):
        return array[..., ::-1] if self.dark else array

    def __call__(self, hists):
        weights = _model.map_slice_weights(
            self._mirror(hists), self.particle_pmf, self.background_pmf, self.beta_prior, self.eps
        )
        luts = _model.posterior_luts(
            weights, self._mirror(self.particle_pmf), self._mirror(self.background_pmf), self.eps,
            dtype=self.posterior_dtype,
        )
        return luts if self.threshold is None else luts >= self.threshold

    def __dask_tokenize__(self):
        return (
            "nanoseg-slice-tables", self.particle_pmf.tobytes(), self.background_pmf.tobytes(),
            tuple(self.beta_prior), self.eps, str(self.posterior_dtype), self.dark, self.threshold,
        )


def _block_histograms(block, binning=None):
    """(n, 1, 1, 256) histograms of the slices of one (n, y, x) chunk, in bins."""
    block = to_numpy(block)
    if binning is not None:
        block = _to_bins(CPU_BACKEND, block, binning)
    return _kernels.slice_histograms(CPU_BACKEND, np.ascontiguousarray(block))[:, None, None, :]


def _one_pass_posterior(source, tables, binning=None):
    """Lazy posterior whose slice weights are part of the graph.

    Each input chunk feeds two tasks: a histogram of its part of each slice,
    summed over the slice's chunks into the slice's histogram, then turned
    into the slices' lookup tables by `tables`; and the lookup itself. In
    one computation dask reads each chunk once and frees it when both are
    done, so any part of the posterior costs one read of the chunks it
    covers (whole slices for the histograms) and memory stays per chunk.
    """
    import dask.array as da

    options = {} if binning is None else {"binning": binning}
    partial = da.blockwise(
        _block_histograms, "zyxv", source, "zyx", new_axes={"v": _model.N_BINS},
        adjust_chunks={"y": 1, "x": 1}, dtype=np.int64, **options,
    )
    hists = partial.sum(axis=(1, 2), dtype=np.int64)
    luts = hists.map_blocks(tables, dtype=tables.dtype)
    return da.blockwise(
        _apply_luts_block, "zyx", source, "zyx", luts, "zv",
        dtype=tables.dtype, concatenate=True, device="cpu", **options,
    )


def _one_pass_mask(source, tables, binning, threshold):
    """Lazy ``posterior >= threshold`` of :func:`_one_pass_posterior`, through boolean tables."""
    return _one_pass_posterior(source, tables.thresholded(threshold), binning)
