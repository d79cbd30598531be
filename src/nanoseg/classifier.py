"""Learn particles from annotated crops: a pixel classifier gated by intensity."""

from __future__ import annotations

import warnings
from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.utils import metadata_routing
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from . import _annotations, _plan
from ._backend import DEVICES
from ._base import VolumeEstimatorMixin, map_volumes
from ._engine.classify import (
    BLOCK_BYTES_PER_VOXEL,
    BLOCK_SIDE,
    Normaliser,
    PriorTables,
    SlabClassifier,
    axis_chunks,
    classify_in_memory,
    classify_lazy,
    histogram,
    robust_location_scale,
    two_class_location_scale,
)
from ._engine.fit import fitted_binning
from ._ops.filters import FEATURES, FeatureSpec, check_features, support, voxel_sigmas
from ._plan import device_n_jobs, effective_n_jobs, slab_budget
from ._spacing import check_spacing
from ._validation import check_intensity_volume, check_memory_budget
from ._volume import as_volumes, is_lazy, is_volume_list

__all__ = ["NanoparticleClassifier"]

#: Quantiles of the annotated particle voxels' intensities tried as gate levels.
GATE_QUANTILES = (0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001, 0.0)

#: Default scales, in units of the smallest voxel size (voxels without `spacing`).
DEFAULT_SIGMAS = (1.0, 2.0, 4.0)


def default_classifier(n_jobs=None, random_state=None):
    """The classifier used when ``classifier=None``: a shallow random forest.

    Chosen by measurement (see the "Learning from annotations" guide): on the
    annotated images it is as accurate as deeper forests and gradient
    boosting, and predicts several times faster.
    """
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(
        n_estimators=50, max_depth=12, min_samples_leaf=2, n_jobs=n_jobs, random_state=random_state
    )


class NanoparticleClassifier(VolumeEstimatorMixin, TransformerMixin, BaseEstimator):
    """Per-voxel particle probability learned from annotated crops.

    Each voxel is described by multi-scale local features of its intensity
    (Gaussian smoothing, difference of Gaussians, gradient magnitude, Hessian
    eigenvalues, local contrast), optionally with the posterior of an
    intensity model fitted to the same volume, and a scikit-learn classifier
    learns particle from background on the annotated voxels. Its output is a
    probability map that :class:`NanoparticleLabeler` turns into particles.

    Parameters
    ----------
    features : sequence of str, default=("intensity", "gaussian", "dog", "gradient", "hessian", "contrast")
        Feature families: ``"intensity"`` (the normalised intensity itself),
        and, at every scale, ``"gaussian"`` (smoothed intensity), ``"dog"``
        (difference of Gaussians between consecutive scales, or at sigma and
        2 sigma for a single scale: blob contrast),
        ``"gradient"`` (gradient magnitude), ``"hessian"`` (eigenvalues of
        the Hessian: 3 in a volume, 2 in an image) and ``"contrast"`` (local
        standard deviation).
    sigmas : sequence of float, default=None
        Scales of the filters, in the units of `spacing` (in voxels when
        `spacing` is None). None means 1, 2 and 4 times the smallest voxel
        size.
    spacing : sequence of float, default=None
        Voxel size (z, y, x), or (y, x) for images, in any unit. Filters are
        then anisotropic: a scale of 20 nm is 2 voxels in-plane and 0.4
        voxel along z for 50 x 10 x 10 nm voxels. None means isotropic
        voxels.
    prior : NanoparticleMixture, default=None
        An (unfitted) intensity model. When given, a copy of it is fitted to
        every crop and every volume predicted, and the logit of its
        posterior is one more feature: it absorbs slice-to-slice brightness
        drift as the mixture does. A volume whose model cannot be fitted
        gets a posterior of 0, with a warning.
    normalize : {"otsu+background", "otsu", "background", "none"}, default="otsu+background"
        How intensities are made comparable between volumes before the
        features: ``"otsu"`` uses ``(I - t) / s`` with ``t`` each volume's
        Otsu threshold and ``s`` half the gap between the mean intensities
        on either side of it, so that every volume's own two-class split sits
        at 0 whatever share of it the particles cover; ``"background"`` uses
        ``(I - median) / (1.4826 MAD)``, which follows the background where
        particles are a minority; ``"otsu+background"`` computes the features
        in Otsu units and adds the intensity and its Gaussian smoothings in
        background units (``feature_names_`` ending in ``":background"``);
        ``"none"`` divides by 255 (4095 for 16-bit data) and trusts all
        acquisitions to share one intensity scale. Chosen by cross-validation
        on acquisitions the classifier was not trained on (see the
        evaluation page).
    classifier : scikit-learn classifier, default=None
        Any classifier with ``fit`` and ``predict_proba``. None means a
        random forest of 50 trees of depth 12 (see :func:`default_classifier`).
        It is cloned at `fit`.
    max_samples : int, default=100000
        Training voxels drawn from the annotations, shared equally between
        the classes (class-balanced), so that rare particles are not drowned
        by background.
    border_width : int, default=1
        When the annotations are instance labels, particle voxels within this
        many voxels of another particle are learned as a third class, the
        border between touching particles, and left out of the output, so
        that touching particles come out as separate components. 0 disables
        it. Label with ``NanoparticleLabeler(radius=0)`` so that the closing
        does not bridge the borders again.
    gate_recall : float or None, default=0.99
        Only voxels that may be particles are classified: those at least as
        bright (as dark, for dark particles) as a level learned from the
        annotations, grown by `gate_margin`; the others get probability 0.
        The level is the highest that still lets through this share of the
        annotated particle voxels. This is what makes whole volumes
        affordable; check ``gate_recall_`` and ``gate_fraction_``. None
        classifies every voxel.
    gate_margin : int, default=2
        Voxels by which the gate is grown, in units of the smallest voxel
        size (fewer planes along a coarser z).
    memory_budget : int or str, default=None
        Working memory for the slabs in flight (bytes, or a string such as
        ``"512MiB"``); None means 128 MiB per job.
    n_jobs : int, default=None
        Threads working on slabs (and training the default forest). None
        takes the ``n_jobs`` of an enclosing :func:`joblib.parallel_config`,
        or else one per CPU; -1 means one per CPU, -2 all but one, and so on.
    device : {"cpu", "cuda", "auto"}, default="cpu"
        Where the features are computed ("cuda" through CuPy); the
        classifier itself runs on the CPU. Features match the CPU's within
        float tolerance. On a GPU at most four slabs are in flight and one
        block's features are computed at a time; on a 16-core H200 machine
        this was 1.9 times the CPU with the default gate (144 against 76
        Mvoxel/s; ``benchmarks/gpu``).
    verbose : bool, default=False
        Show progress bars and the slab size chosen.
    random_state : int, RandomState instance or None, default=None
        Seeds the choice of training voxels and the default forest.

    Attributes
    ----------
    estimator_ : classifier
        The fitted classifier.
    classes_ : ndarray of int
        Training classes: 0 background, 1 particle, and 2 for borders
        between touching particles when they were learned.
    feature_names_ : list of str
        Name of each feature column: the families at each scale, then (with
        ``normalize="otsu+background"``) the intensity and its smoothings in
        background units, named with a ``":background"`` suffix, and
        ``posterior_logit`` last, with `prior`.
    n_features_ : int
        Number of features.
    n_dims_ : int
        2 when trained on images, 3 on volumes; predictions need the same.
    particle_sign_ : int
        1 when annotated particles are brighter than their background, -1
        when darker.
    gate_level_ : float or None
        Normalised intensity that opens the gate, in the units of
        `normalize` (Otsu units for ``"otsu+background"``; None without a
        gate).
    gate_recall_ : float
        Share of the annotated particle voxels that the gate lets through
        (the classifier never sees the others): check it is close to 1.
    gate_fraction_ : float
        Share of all voxels of the training crops that the gate lets
        through: the work left to the classifier.
    n_samples_per_class_ : ndarray of int
        Training voxels drawn for each class.

    See Also
    --------
    NanoparticleMixture : The unsupervised intensity model, usable as `prior`.
    NanoparticleLabeler : Turns the probability map into particles.

    Notes
    -----
    Crops given to `fit` are read whole; volumes given to `predict_proba`
    are processed slab by slab with a halo of the filters' reach, so the
    result is identical to processing the whole volume at once, and zarr or
    dask input gives a lazy dask array. Voxels that are not annotated (-1)
    never enter training.

    Examples
    --------
    >>> from nanoseg import NanoparticleClassifier
    >>> from nanoseg.datasets import make_phantom
    >>> image, mask = make_phantom((96, 96), n_particles=12, random_state=0)
    >>> model = NanoparticleClassifier(random_state=0, n_jobs=1).fit(image, mask)
    >>> probability = model.predict_proba(image)
    >>> probability.shape, probability.dtype
    ((96, 96), dtype('float32'))
    """

    # predict's threshold is a plain argument, not metadata to route (and no
    # generated set_predict_request, whose docstring breaks the docs build).
    __metadata_request__predict = {"threshold": metadata_routing.UNUSED}  # noqa: RUF012

    _parameter_constraints = {
        "features": ["array-like", StrOptions(set(FEATURES))],
        "sigmas": [None, "array-like"],
        "spacing": [None, "array-like"],
        "prior": [None, HasMethods(["fit", "predict_proba"])],
        "normalize": [StrOptions({"otsu", "otsu+background", "background", "none"})],
        "classifier": [None, HasMethods(["fit", "predict_proba"])],
        "max_samples": [Interval(Integral, 2, None, closed="left")],
        "border_width": [Interval(Integral, 0, None, closed="left")],
        "gate_recall": [None, Interval(Real, 0, 1, closed="right")],
        "gate_margin": [Interval(Integral, 0, None, closed="left")],
        "memory_budget": [None, Interval(Integral, 1, None, closed="left"), str],
        "n_jobs": [None, Integral],
        "device": [StrOptions(set(DEVICES))],
        "verbose": ["verbose"],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        *,
        features=("intensity", "gaussian", "dog", "gradient", "hessian", "contrast"),
        sigmas=None,
        spacing=None,
        prior=None,
        normalize="otsu+background",
        classifier=None,
        max_samples=100_000,
        border_width=1,
        gate_recall=0.99,
        gate_margin=2,
        memory_budget=None,
        n_jobs=None,
        device="cpu",
        verbose=False,
        random_state=None,
    ):
        self.features = features
        self.sigmas = sigmas
        self.spacing = spacing
        self.prior = prior
        self.normalize = normalize
        self.classifier = classifier
        self.max_samples = max_samples
        self.border_width = border_width
        self.gate_recall = gate_recall
        self.gate_margin = gate_margin
        self.memory_budget = memory_budget
        self.n_jobs = n_jobs
        self.device = device
        self.verbose = verbose
        self.random_state = random_state

    # -- parameters ----------------------------------------------------------
    def _check_params(self):
        self._validate_params()
        check_memory_budget(self.memory_budget)
        check_features(self.features)
        if self.spacing is not None:
            # Any unit (sigmas are in the units of spacing): no nanometre warning.
            check_spacing(self.spacing, ndim=None, warn=False)
        if self.sigmas is not None:
            sigmas = np.asarray(self.sigmas, dtype=float)
            if sigmas.ndim != 1 or sigmas.size == 0 or not np.all(np.isfinite(sigmas)) or np.any(sigmas <= 0):
                raise ValueError(f"sigmas must be a non-empty sequence of positive scales; got {self.sigmas!r}.")

    def _spec(self, is_2d):
        spacing = self.spacing
        if spacing is not None and not is_2d and len(spacing) != 3:
            raise ValueError(
                f"spacing has {len(spacing)} values but the input is a volume; give (z, y, x)."
            )
        smallest = 1.0 if spacing is None else float(min(spacing[-2:] if is_2d else spacing))
        sigmas = DEFAULT_SIGMAS if self.sigmas is None else self.sigmas
        sigmas = [float(s) * (smallest if self.sigmas is None else 1.0) for s in sigmas]
        return FeatureSpec(check_features(self.features), voxel_sigmas(sigmas, spacing, is_2d))

    def _margin(self, is_2d):
        spacing = (1.0, 1.0, 1.0) if self.spacing is None else tuple(float(s) for s in self.spacing)
        spacing = spacing if len(spacing) == 3 else (spacing[0], *spacing)
        smallest = min(spacing[1:] if is_2d else spacing)
        margin = tuple(int(np.ceil(self.gate_margin * smallest / s - 1e-9)) for s in spacing)
        return (0, *margin[1:]) if is_2d else margin

    def _volumes(self, X):

        volumes, is_list = as_volumes(X)
        for volume in volumes:
            check_intensity_volume(volume, allow_uint16=True)
        return volumes, is_list

    def _normaliser(self, volume):
        n_values = 256 if volume.dtype == np.uint8 else 65536
        if self.normalize == "none":
            top = 255.0 if n_values == 256 else 4095.0
            return Normaliser(0.0, top, n_values)
        counts = histogram(volume, effective_n_jobs(self.n_jobs))
        if self.normalize == "background":
            return Normaliser(*robust_location_scale(counts, volume.name), n_values)
        location, scale = two_class_location_scale(counts, volume.name)
        second = robust_location_scale(counts, volume.name) if self.normalize == "otsu+background" else None
        return Normaliser(location, scale, n_values, second)

    def _fit_prior(self, volume):
        """The prior fitted to `volume`, as per-slice posterior tables (None without prior)."""
        if self.prior is None:
            return None
        model = clone(self.prior)
        if "n_jobs" in model.get_params(deep=False):
            model.set_params(n_jobs=1 if not is_lazy(volume.array) else self.n_jobs)
        try:
            model.fit(volume.array)
            luts = model.posterior_luts(model.slice_weights(volume.array)).astype(np.float32)
        except (ValueError, ArithmeticError) as error:
            warnings.warn(
                f"The intensity model (prior) could not be fitted to {volume.name} ({error}); its "
                "posterior feature is 0 there. Check the image, or fit without prior.",
                UserWarning,
                stacklevel=3,
            )
            return PriorTables(np.zeros((volume.shape[0], 256), dtype=np.float32))
        binning = fitted_binning(model)
        return PriorTables(luts, None if binning.is_identity and volume.dtype == np.uint8 else binning)

    def _slab_classifier(self, volume, estimator=None, is_2d=None):
        is_2d = volume.is_2d if is_2d is None else is_2d
        return SlabClassifier(
            spec=self._spec(is_2d),
            estimator=estimator,
            normaliser=self._normaliser(volume),
            output_classes=(_annotations.PARTICLE,),
            gate_level=getattr(self, "gate_level_", None),
            particle_sign=getattr(self, "particle_sign_", 1),
            gate_margin=self._margin(is_2d),
            prior=self._fit_prior(volume),
            backend=self._resolve_backend([volume]),
        )

    def _chunks(self, volume, spec):
        """Blocks (dask-style chunk sizes per axis) in which `volume` is classified.

        Squares of ``BLOCK_SIDE`` rows and columns, as many planes deep as
        the memory budget allows for whole planes (the labeler that follows
        works on slabs of whole planes, at least one output chunk deep), and
        at least twice the halo deep so that halo planes stay a minority of
        the work.
        """
        halo = tuple(r + m for r, m in zip(support(spec), self._margin(volume.is_2d)))
        n_planes, n_rows, n_cols = volume.shape
        rows, cols = min(BLOCK_SIDE, n_rows), min(BLOCK_SIDE, n_cols)
        budget = slab_budget(self.memory_budget, effective_n_jobs(self.n_jobs)) or _plan.SLAB_BYTES
        # The output's chunks are whole planes deep for the labeler, whose
        # slabs hold whole planes: size the depth by whole planes too.
        plane = n_rows * n_cols * BLOCK_BYTES_PER_VOXEL
        depth = max(1, int(budget // plane), 2 * halo[0])
        return (
            axis_chunks(n_planes, depth, halo[0]),
            axis_chunks(n_rows, rows, halo[1]),
            axis_chunks(n_cols, cols, halo[2]),
        )

    # -- fit -----------------------------------------------------------------
    def fit(self, X, y):
        """Learn particles from annotated crops.

        Parameters
        ----------
        X : array or list of arrays
            uint8 or uint16 images (Y, X) or volumes (Z, Y, X), NumPy, zarr
            or dask; a list holds crops of any shapes (all images or all
            volumes). Crops are read whole.
        y : array or list of arrays
            One annotation per crop, of its shape: a boolean mask, integer
            (instance) labels with 0 as background, or integer labels with -1
            where nothing is annotated (scribbles).

        Returns
        -------
        self : NanoparticleClassifier

        Raises
        ------
        ValueError
            If `y` is missing, float, shaped unlike `X`, holds a single class
            or no annotated voxel, or if the lists' lengths differ.
        """
        self._check_params()
        volumes, is_list = self._volumes(X)
        if y is None:
            raise ValueError("NanoparticleClassifier.fit needs annotations y: one mask or label image per crop.")
        if is_list != is_volume_list(y):
            raise ValueError(
                "X and y must both be lists (one annotation per crop) or both single arrays; got "
                f"{type(X).__name__} and {type(y).__name__}."
            )
        ys = list(y) if is_list else [y]
        if len(ys) != len(volumes):
            raise ValueError(f"y has {len(ys)} annotations but X has {len(volumes)} crops; pass one per crop.")
        dims = {2 if v.is_2d else 3 for v in volumes}
        if len(dims) > 1:
            raise ValueError("X mixes 2D images and 3D volumes; train on one kind (features differ).")
        is_2d = dims == {2}
        labels = [
            _annotations.check_annotation(t, v.array.shape, f"y[{i}]" if is_list else "y")
            for i, (t, v) in enumerate(zip(ys, volumes))
        ]
        class_maps = [_annotations.classes(lab, self.border_width, is_2d) for lab in labels]
        present = sorted({int(c) for m in class_maps for c in np.unique(m)} - {_annotations.UNLABELLED})
        if not present:
            raise ValueError("y annotates no voxel (every value is -1): annotate some particles and background.")
        if _annotations.BACKGROUND not in present or len(present) < 2:
            missing = "particle" if _annotations.BACKGROUND in present else "background"
            raise ValueError(
                f"y annotates a single class: no {missing} voxel is annotated. Annotate both particles "
                "(positive values) and background (0)."
            )

        picks, targets = _annotations.sample(class_maps, self.max_samples, self.random_state)
        rows, images, slabs = [], [], []
        labels = [lab.reshape(v.shape) for lab, v in zip(labels, volumes)]
        class_maps = [m.reshape(v.shape) for m, v in zip(class_maps, volumes)]
        for volume, pick in zip(volumes, picks):
            raw = np.asarray(volume.read(0, volume.shape[0]))
            slab = self._slab_classifier(volume, is_2d=is_2d)
            slabs.append(slab)
            images.append(raw)
            rows.append(_features_at(slab, raw, pick, self._chunks(volume, slab.spec)[0][0]))
        features = np.concatenate(rows, axis=0)
        target = np.concatenate(targets)

        estimator = (
            default_classifier(self.n_jobs, self.random_state) if self.classifier is None else clone(self.classifier)
        )
        estimator.fit(features, target)
        if "n_jobs" in estimator.get_params(deep=False):
            # Slabs are classified on their own threads.
            estimator.set_params(n_jobs=1)
        self.estimator_ = estimator
        self.classes_ = np.asarray(present, dtype=np.int64)
        self.feature_names_ = slabs[0].feature_names()
        self.n_features_ = len(self.feature_names_)
        self.n_dims_ = 2 if is_2d else 3
        self.n_samples_per_class_ = np.bincount(target.astype(np.int64), minlength=int(max(present)) + 1)
        self._fit_gate(slabs, images, labels, class_maps)
        return self

    def _fit_gate(self, slabs, images, labels, class_maps):
        particle, background = [], []
        for slab, raw, lab, cls in zip(slabs, images, labels, class_maps):
            values = _host(slab, slab.normalise(raw))
            particle.append(values[cls >= _annotations.PARTICLE])
            background.append(values[cls == _annotations.BACKGROUND])
        sign = 1 if np.median(np.concatenate(particle)) >= np.median(np.concatenate(background)) else -1
        self.particle_sign_ = sign
        if self.gate_recall is None:
            self.gate_level_ = None
            self.gate_recall_ = 1.0
            self.gate_fraction_ = 1.0
            return
        # The highest level at which the grown gate still lets through the
        # target share of the annotated particle voxels: tried from the
        # particles' median intensity down to their dimmest voxel (which lets
        # every one through).
        values = sign * np.concatenate(particle)
        candidates = np.unique(np.quantile(values, GATE_QUANTILES))[::-1]
        n_particle = values.size
        for level in candidates:
            passed = kept = total = 0
            for slab, raw, cls in zip(slabs, images, class_maps):
                slab.gate_level, slab.particle_sign = float(sign * level), sign
                gate = slab.gate(raw)
                passed += int(np.count_nonzero(gate & (cls >= _annotations.PARTICLE)))
                kept += int(np.count_nonzero(gate))
                total += gate.size
            if passed >= self.gate_recall * n_particle:
                break
        self.gate_level_ = float(sign * level)
        self.gate_recall_ = passed / max(1, n_particle)
        self.gate_fraction_ = kept / max(1, total)

    # -- predict -------------------------------------------------------------
    def _check_input(self, X):
        check_is_fitted(self, "estimator_")
        self._check_params()
        volumes, is_list = self._volumes(X)
        for volume in volumes:
            if (2 if volume.is_2d else 3) != self.n_dims_:
                kind = "images (Y, X)" if self.n_dims_ == 2 else "volumes (Z, Y, X)"
                raise ValueError(f"This classifier was trained on {kind}; {volume.name} is not one.")
        return volumes, is_list

    def _proba_one(self, volume):
        slab = self._slab_classifier(volume, self.estimator_)
        chunks = self._chunks(volume, slab.spec)
        if self.verbose:
            print(
                f"[nanoseg] classification: {volume.name} {' x '.join(map(str, volume.shape))} "
                f"({volume.kind}) in blocks of up to {max(chunks[0])} x {max(chunks[1])} x {max(chunks[2])} "
                f"voxels, each read with a halo of {' x '.join(map(str, slab.halo))}"
            )
        if is_lazy(volume.array):
            return volume.restore(classify_lazy(volume, slab, chunks))
        from tqdm import tqdm

        n_voxels = int(np.prod(volume.shape))
        with tqdm(total=n_voxels, desc="Classifying", unit="voxel", unit_scale=True, disable=not self.verbose) as bar:
            # On a GPU, few threads: each crop's features are many small
            # launches under the interpreter lock (on an H200, 16 threads took
            # 2.5 s where 4 took 1.6 s for 67 Mvoxel).
            n_threads = device_n_jobs(self.n_jobs, slab.backend)
            out = classify_in_memory(volume, slab, chunks, n_threads, bar)
        out = volume.restore(out)
        if volume.kind == "cupy":
            return slab.backend.to_device(out)
        return out

    def predict_proba(self, X):
        """Probability that each voxel belongs to a particle.

        Parameters
        ----------
        X : array or list of arrays
            uint8 or uint16 image(s) or volume(s), NumPy, zarr or dask.

        Returns
        -------
        probability : array or list of arrays, float32
            Same shape as `X`. Voxels outside the gate and borders between
            touching particles get (close to) 0. NumPy in gives NumPy out;
            zarr or dask in gives a lazy dask array.
        """
        volumes, is_list = self._check_input(X)
        return map_volumes(self._proba_one, volumes, is_list)

    def transform(self, X):
        """Same as :meth:`predict_proba`, for pipelines (feeds :class:`NanoparticleLabeler`)."""
        return self.predict_proba(X)

    def fit_transform(self, X, y=None, **fit_params):
        """Fit to the annotated crops, then give their probability maps."""
        return self.fit(X, y).predict_proba(X)

    def predict(self, X, *, threshold=0.5):
        """Boolean particle mask: ``predict_proba(X) >= threshold``."""
        if not isinstance(threshold, Real) or not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be a probability in [0, 1]; got {threshold!r}.")
        proba = self.predict_proba(X)
        if isinstance(proba, list):
            return [p >= threshold for p in proba]
        return proba >= threshold

    def features_of(self, X):
        """The feature stack the classifier sees, for inspection.

        Parameters
        ----------
        X : array
            One uint8 or uint16 image or volume, in memory.

        Returns
        -------
        features : ndarray, float32
            Shaped ``(n_features, *X.shape)``,
            in the order of ``feature_names_`` (the gate is not applied).
        """
        volumes, is_list = self._check_input(X)
        if is_list or is_lazy(volumes[0].array):
            raise ValueError("features_of takes one in-memory image or volume (crop it first).")
        volume = volumes[0]
        slab = self._slab_classifier(volume)
        feats = slab.features(np.asarray(volume.read(0, volume.shape[0])))
        return feats[:, 0] if volume.is_2d else feats

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        return tags


def _host(slab, array):
    return np.asarray(slab.backend.to_host(array) if slab.backend.is_gpu else array)


def _features_at(slab, raw, flat_indices, depth):
    """Feature rows of the voxels at `flat_indices` of `raw`, computed slab by slab with halos."""
    raw3 = raw  # (Z, Y, X): images are read as one plane
    n_planes, plane = raw3.shape[0], raw3.shape[1] * raw3.shape[2]
    halo = slab.halo[0]
    rows = []
    for start in range(0, n_planes, depth):
        stop = min(start + depth, n_planes)
        mine = flat_indices[(flat_indices >= start * plane) & (flat_indices < stop * plane)]
        if mine.size == 0:
            continue
        lo, hi = max(0, start - halo), min(n_planes, stop + halo)
        feats = slab.features(raw3[lo:hi], lo)
        rows.append(feats.reshape(feats.shape[0], -1)[:, mine - lo * plane].T)
    n = slab.n_features
    return np.concatenate(rows, axis=0) if rows else np.zeros((0, n), np.float32)

