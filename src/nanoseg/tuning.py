"""Choose settings against annotated crops: meta-estimators and a one-call search.

Three pieces make a scikit-learn search fit the way nanoseg models are used:

* :class:`PerVolume` fits an intensity step (the mixture, or a baseline
  threshold) on each image or volume it transforms, so that crops from
  different acquisitions each get their own intensity model while the other
  settings are shared and searched;
* :class:`PrefitMixture` reuses a mixture already fitted on a large volume,
  so that a search over the Beta prior and the labelling settings never reads
  that volume again;
* :func:`tune` runs a recommended search over a whole pipeline (background
  subtraction, mixture, posterior smoothing, labelling, splitting of touching
  particles) in one call, built by :func:`tuning_pipeline` over the space of
  :func:`default_search_space`.
"""

from __future__ import annotations

import warnings
from numbers import Integral
from typing import ClassVar

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import (
    GridSearchCV,
    KFold,
    ParameterGrid,
    RandomizedSearchCV,
)
from sklearn.pipeline import Pipeline
from sklearn.utils._param_validation import (
    HasMethods,
    InvalidParameterError,
    StrOptions,
)
from sklearn.utils.validation import check_is_fitted

from ._base import VolumeEstimatorMixin, map_volumes
from ._model import EMCollapseError
from ._volume import as_volumes, check_targets, is_lazy, is_volume_list
from .mixture import NanoparticleMixture, check_beta_prior

__all__ = ["PerVolume", "PrefitMixture", "default_search_space", "tune", "tuning_pipeline"]


# ---------------------------------------------------------------------------
# PerVolume
# ---------------------------------------------------------------------------


def _empty_like(volume, dtype=np.float32):
    """All-zero map shaped like `volume` (lazy for a lazy volume)."""
    if is_lazy(volume.array):
        import dask.array as da

        return volume.restore(da.zeros(volume.shape, dtype=dtype, chunks=volume.to_dask().chunks))
    return np.zeros(volume.array.shape, dtype=dtype)


class PerVolume(VolumeEstimatorMixin, TransformerMixin, BaseEstimator):
    """Fit a fresh copy of an intensity step on every image it transforms.

    ``transform(X)`` fits a clone of `estimator` on each image or volume of
    `X` and returns that clone's output on it; nothing is learned by `fit`.
    Inside a pipeline and a grid search, each crop is therefore modelled on
    its own, while `estimator`'s parameters (reached as
    ``<step>__estimator__<parameter>``) and those of the other steps are
    shared by all crops and searched.

    Parameters
    ----------
    estimator : estimator
        An unsupervised transformer with `fit` and `transform`, typically
        :class:`~nanoseg.NanoparticleMixture` or
        :class:`~nanoseg.baselines.GlobalThreshold`. It is cloned for every
        image and fitted without the annotations.
    on_error : {"raise", "empty"}, default="raise"
        What to do when the clone cannot be fitted on an image, e.g. the
        mixture's :class:`~nanoseg.EMCollapseError` on an image without
        particles or a baseline's ``ValueError`` on a constant one: "raise"
        passes the error on; "empty" warns and returns an all-zero float32
        map (no particle) for that image, so that one odd image does not
        void a whole search. Invalid parameters are always raised.

    See Also
    --------
    PrefitMixture : The opposite case: one mixture fitted once, reused.
    tune : A search over a pipeline built around this step.

    Notes
    -----
    **When to use it.** Use it when the crops do not share one intensity
    scale: images taken with different microscopes, detectors, staining or
    brightness and contrast settings -- for example figures collected from
    many papers, as in the EMPS dataset, where each image comes from another
    acquisition. A single mixture fitted on all of them would model no image
    well. When all crops come from one volume, fit the mixture once instead
    (directly, or on the whole volume with :class:`PrefitMixture`): the
    model then sees more data, and a crop with few particles borrows the
    others' strength.

    **Samples.** A list `X` holds one image or volume per item, and each item
    gets its own model (a list out); a single array is one volume (one model,
    one array out). The annotations `y` are checked against `X` but never
    passed to `estimator`.

    **Cost.** Every call to `transform` fits again: in a grid search, each
    candidate refits the intensity model of every crop it scores. The
    mixture's fit works on 256-bin histograms, so this costs a few
    milliseconds per image.

    Examples
    --------
    Two images whose backgrounds differ by 60 grey levels: a threshold
    learned on both together misses the dim image's particle, one learned per
    image finds both.

    >>> import numpy as np
    >>> from nanoseg.baselines import GlobalThreshold
    >>> from nanoseg.tuning import PerVolume
    >>> dim = np.full((6, 6), 20, dtype=np.uint8)
    >>> dim[2:4, 2:4] = 70
    >>> bright = np.full((6, 6), 140, dtype=np.uint8)
    >>> bright[2:4, 2:4] = 220
    >>> pooled = GlobalThreshold(method="otsu").fit([dim, bright])
    >>> [int(mask.sum()) for mask in pooled.transform([dim, bright])]
    [0, 36]
    >>> per_image = PerVolume(GlobalThreshold(method="otsu")).fit([dim, bright])
    >>> [int(mask.sum()) for mask in per_image.transform([dim, bright])]
    [4, 4]
    """

    _parameter_constraints: ClassVar[dict] = {
        "estimator": [HasMethods(["fit", "transform"])],
        "on_error": [StrOptions({"raise", "empty"})],
    }

    def __init__(self, estimator, *, on_error="raise"):
        self.estimator = estimator
        self.on_error = on_error

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # Nothing is learned by fit: transform works on a fresh instance.
        tags.requires_fit = False
        return tags

    def fit(self, X, y=None):
        """Validate the parameters, `X` and `y`; nothing is learned.

        Parameters
        ----------
        X : array or list of arrays
            Images (Y, X) or volumes (Z, Y, X), NumPy, zarr or dask, or a list
            of them.
        y : array or list of arrays, optional
            Annotations; only their shapes are checked against `X`.

        Returns
        -------
        self : PerVolume
        """
        self._validate_params()
        volumes, is_list = as_volumes(X)
        check_targets(y, volumes, is_list)
        return self

    def transform(self, X):
        """Fit a clone of `estimator` on each item of `X` and transform it.

        Parameters
        ----------
        X : array or list of arrays
            One image or volume, or a list of them.

        Returns
        -------
        out : array or list of arrays
            The output of each item's own fitted clone (for the mixture, its
            posterior); a list for a list input.
        """
        self._validate_params()
        return map_volumes(self._fit_transform_one, *as_volumes(X))

    def fit_transform(self, X, y=None):
        """Validate, then transform; same result as ``fit(X, y).transform(X)``.

        Parameters
        ----------
        X : array or list of arrays
            One image or volume, or a list of them.
        y : array or list of arrays, optional
            Annotations; only their shapes are checked against `X`.

        Returns
        -------
        out : array or list of arrays
            As in :meth:`transform`.
        """
        return self.fit(X, y).transform(X)

    def _fit_transform_one(self, volume):
        estimator = clone(self.estimator)
        try:
            return estimator.fit_transform(volume.array)
        except InvalidParameterError:
            raise
        except (ValueError, EMCollapseError) as error:
            if self.on_error == "raise":
                raise
            warnings.warn(
                f"{type(self.estimator).__name__} could not be fitted on {volume.name} "
                f"({type(error).__name__}: {error}); it is treated as holding no particle "
                "(on_error='empty').",
                UserWarning,
                stacklevel=3,
            )
            return _empty_like(volume)


# ---------------------------------------------------------------------------
# PrefitMixture
# ---------------------------------------------------------------------------


def _fitted_state(mixture):
    """Copies of the public fitted attributes (names ending in ``_``)."""
    return {
        name: value.copy() if isinstance(value, np.ndarray) else value
        for name, value in vars(mixture).items()
        if name.endswith("_") and not name.startswith("_")
    }


class PrefitMixture(VolumeEstimatorMixin, TransformerMixin, BaseEstimator):
    """A mixture fitted once, reused with a searchable Beta prior.

    Fitting :class:`~nanoseg.NanoparticleMixture` on a large volume takes two
    passes over it. The Beta prior acts only at prediction -- it sets each
    slice's MAP particle fraction, not the fitted intensity PMFs -- so the
    fitted model can serve any prior. `PrefitMixture` wraps an already
    fitted mixture: its `fit` copies the mixture's fitted state, touching no
    data, and its `transform` is the mixture's posterior under this
    estimator's `beta_prior`. In a pipeline, a grid search over
    ``<step>__beta_prior`` and the labeller's settings on small annotated
    crops then never reads the large volume again.

    Parameters
    ----------
    mixture : NanoparticleMixture
        A fitted mixture (or a :class:`sklearn.frozen.FrozenEstimator`
        wrapping one). It is never modified nor refitted. :func:`sklearn.base.clone`
        keeps this very object (fitted), as it does for a
        :class:`~sklearn.frozen.FrozenEstimator`, so the state survives the
        clones a search makes; with ``n_jobs > 1`` it is pickled to the
        workers with its fitted attributes, a few kilobytes.
    beta_prior : (float, float), default=None
        Shape parameters ``(a, b)`` of the Beta prior on each slice's
        particle fraction; None keeps the mixture's.
    posterior_dtype : {"float32", "float16"}, default=None
        dtype of the posterior; None keeps the mixture's.

    Attributes
    ----------
    mixture_ : NanoparticleMixture
        A fitted copy of `mixture` with `beta_prior` and `posterior_dtype`
        applied; its fitted attributes (``particle_pmf_``,
        ``background_pmf_``, ...) are those of `mixture`.

    See Also
    --------
    PerVolume : The opposite case: one model per crop.
    nanoseg.NanoparticleMixture : The wrapped model.

    Notes
    -----
    Only prediction-time settings are searchable here. The mixture's other
    parameters (percentiles, halo, EM settings, ...) shape the fitted PMFs;
    to search them, fit a :class:`~nanoseg.NanoparticleMixture` in the
    pipeline instead. Nested parameters (``<step>__mixture__<parameter>``)
    are not exposed, so that no candidate of a search can alter the shared
    fitted mixture.

    Examples
    --------
    >>> from sklearn.model_selection import GridSearchCV
    >>> from sklearn.pipeline import Pipeline
    >>> from nanoseg import NanoparticleLabeler, NanoparticleMixture
    >>> from nanoseg.datasets import make_crops, make_phantom
    >>> from nanoseg.metrics import object_f1_scorer
    >>> from nanoseg.tuning import PrefitMixture
    >>> volume, _ = make_phantom((16, 96, 96), n_particles=30, random_state=0)
    >>> mixture = NanoparticleMixture(max_iter=100_000).fit(volume)  # the big, one-off fit
    >>> crops, masks = make_crops(4, (4, 48, 48), n_particles=6, random_state=1)
    >>> pipeline = Pipeline([("mixture", PrefitMixture(mixture)),
    ...                      ("labeler", NanoparticleLabeler(min_size=3))])
    >>> grid = {"mixture__beta_prior": [(1.0, 20.0), (1.0, 1000.0)],
    ...         "labeler__threshold": [0.5, 0.95]}
    >>> search = GridSearchCV(pipeline, grid, scoring=object_f1_scorer, cv=2).fit(crops, masks)
    >>> prior = search.best_params_["mixture__beta_prior"]
    >>> refitted = NanoparticleMixture(beta_prior=prior, max_iter=100_000).fit(volume)
    >>> posterior = search.best_estimator_["mixture"].transform(crops[0])
    >>> bool((posterior == refitted.predict_proba(crops[0])).all())
    True
    """

    _parameter_constraints: ClassVar[dict] = {
        "mixture": [HasMethods(["fit", "transform"])],
        "beta_prior": [None, "array-like"],
        "posterior_dtype": [None, StrOptions({"float32", "float16"})],
    }

    def __init__(self, mixture, *, beta_prior=None, posterior_dtype=None):
        self.mixture = mixture
        self.beta_prior = beta_prior
        self.posterior_dtype = posterior_dtype

    def __sklearn_clone__(self):
        # The fitted mixture is the point of this estimator: keep the object
        # itself (sklearn.base.clone would make an unfitted copy of it), and
        # clone the other parameters as usual.
        params = self.get_params(deep=False)
        mixture = params.pop("mixture")
        return type(self)(mixture, **{name: clone(value, safe=False) for name, value in params.items()})

    def get_params(self, deep=True):
        """Parameters of this estimator, never those of the wrapped mixture.

        Parameters
        ----------
        deep : bool, default=True
            Ignored: the wrapped mixture's parameters are not exposed (see
            Notes), so the deep and shallow parameters are the same.

        Returns
        -------
        params : dict
            ``mixture``, ``beta_prior`` and ``posterior_dtype``.
        """
        return super().get_params(deep=False)

    def set_params(self, **params):
        """Set this estimator's parameters; the wrapped mixture's cannot be set.

        Parameters
        ----------
        **params : dict
            ``mixture``, ``beta_prior`` or ``posterior_dtype``.

        Returns
        -------
        self : PrefitMixture
        """
        nested = sorted(key for key in params if "__" in key)
        if nested:
            raise ValueError(
                f"Invalid parameter {nested[0]!r} for PrefitMixture: the wrapped mixture is fitted "
                "and shared by every clone, so its parameters cannot be set. Search beta_prior "
                "(or posterior_dtype) of PrefitMixture itself."
            )
        return super().set_params(**params)

    def _source(self):
        """The wrapped NanoparticleMixture, checked to be fitted."""
        mixture = self.mixture.estimator if isinstance(self.mixture, FrozenEstimator) else self.mixture
        if not isinstance(mixture, NanoparticleMixture):
            raise TypeError(
                "mixture must be a fitted NanoparticleMixture (or a FrozenEstimator wrapping one); "
                f"got {type(mixture).__name__}. To fit a mixture within the pipeline, use "
                "NanoparticleMixture itself as the step."
            )
        check_is_fitted(
            mixture,
            msg=(
                "The NanoparticleMixture given to PrefitMixture is not fitted: fit it first, e.g. "
                "mixture = NanoparticleMixture().fit(volume)."
            ),
        )
        return mixture

    def fit(self, X=None, y=None):
        """Copy the wrapped mixture's fitted state; `X` is not read.

        Parameters
        ----------
        X : ignored
            Present for pipelines; never read, so a large volume costs
            nothing here.
        y : ignored

        Returns
        -------
        self : PrefitMixture
        """
        self._validate_params()
        source = self._source()
        overrides = {}
        if self.beta_prior is not None:
            overrides["beta_prior"] = check_beta_prior(self.beta_prior)
        if self.posterior_dtype is not None:
            overrides["posterior_dtype"] = self.posterior_dtype
        mixture = clone(source).set_params(**overrides)
        for name, value in _fitted_state(source).items():
            setattr(mixture, name, value)
        self.mixture_ = mixture
        return self

    def predict_proba(self, X):
        """Posterior particle probability of each voxel of `X`.

        Parameters
        ----------
        X : array or list of arrays
            uint8 image, volume or list of them (NumPy, zarr or dask).

        Returns
        -------
        posterior : array or list of arrays
            As :meth:`nanoseg.NanoparticleMixture.predict_proba`, with this
            estimator's `beta_prior`.
        """
        check_is_fitted(self)
        return self.mixture_.predict_proba(X)

    def transform(self, X):
        """Posterior particle probability of each voxel; same as :meth:`predict_proba`.

        Parameters
        ----------
        X : array or list of arrays
            uint8 image, volume or list of them (NumPy, zarr or dask).

        Returns
        -------
        posterior : array or list of arrays
        """
        return self.predict_proba(X)

    def slice_weights(self, X):
        """MAP particle fraction of every slice under this `beta_prior`.

        Parameters
        ----------
        X : array or list of arrays
            As in :meth:`predict_proba`.

        Returns
        -------
        weights : ndarray of shape (Z,), or list of them
        """
        check_is_fitted(self)
        return self.mixture_.slice_weights(X)


# ---------------------------------------------------------------------------
# tune
# ---------------------------------------------------------------------------

#: Names of the steps of :func:`tuning_pipeline`, in order.
STEP_NAMES = ("background", "mixture", "smooth", "labeler", "split")


def _scorers():
    from .metrics import (
        dice_scorer,
        iou_scorer,
        make_object_scorer,
        object_f1_scorer,
        panoptic_quality_scorer,
    )

    return {
        "object_f1": object_f1_scorer,
        "object_precision": make_object_scorer("precision"),
        "object_recall": make_object_scorer("recall"),
        "panoptic_quality": panoptic_quality_scorer,
        "pq": panoptic_quality_scorer,
        "dice": dice_scorer,
        "iou": iou_scorer,
    }


def tuning_pipeline(*, per_volume=True, mixture=None):
    """The pipeline :func:`tune` searches, with neutral starting settings.

    Parameters
    ----------
    per_volume : bool, default=True
        Wrap the mixture in :class:`PerVolume`, so that every image or crop
        gets its own intensity model (see :func:`tune`).
    mixture : estimator, default=None
        The intensity step; None means
        ``NanoparticleMixture(max_iter=100_000)``. Any transformer from uint8
        images to a map in [0, 1] fits, e.g. a
        :class:`~nanoseg.baselines.GlobalThreshold` or a
        :class:`PrefitMixture` (never wrapped in :class:`PerVolume`: it is
        fitted already).

    Returns
    -------
    pipeline : sklearn.pipeline.Pipeline
        Steps ``background`` (:class:`~nanoseg.preprocessing.BackgroundSubtractor`,
        off: ``"passthrough"`` method), ``mixture``, ``smooth``
        (:class:`~nanoseg.preprocessing.PosteriorSmoother`, the published
        sigma), ``labeler`` (:class:`~nanoseg.NanoparticleLabeler`, defaults)
        and ``split`` (``"passthrough"``: off). Parameters are addressed as
        ``<step>__<parameter>``, e.g. ``mixture__estimator__beta_prior``
        with `per_volume`.

    See Also
    --------
    tune, default_search_space

    Examples
    --------
    >>> from nanoseg.tuning import tuning_pipeline
    >>> pipeline = tuning_pipeline()
    >>> [name for name, _ in pipeline.steps]
    ['background', 'mixture', 'smooth', 'labeler', 'split']
    >>> pipeline.get_params()["mixture__estimator__beta_prior"]
    (1.0, 20.0)
    """
    from .labeler import NanoparticleLabeler
    from .preprocessing import BackgroundSubtractor, PosteriorSmoother

    if mixture is None:
        # Small crops sometimes need more EM updates than the default allows.
        mixture = NanoparticleMixture(max_iter=100_000)
    return Pipeline(
        [
            ("background", BackgroundSubtractor(method="passthrough")),
            ("mixture", _mixture_step(mixture, per_volume)),
            ("smooth", PosteriorSmoother()),
            ("labeler", NanoparticleLabeler()),
            ("split", "passthrough"),
        ]
    )


def _mixture_step(estimator, per_volume):
    """`estimator` wrapped in PerVolume when asked, unless it is fitted once by design."""
    if not per_volume or isinstance(estimator, (PerVolume, PrefitMixture)) or estimator == "passthrough":
        return estimator
    return PerVolume(estimator)


def default_search_space():
    """The recommended search space of :func:`tune`.

    Returns
    -------
    space : dict
        Parameter lists keyed as for :class:`~sklearn.model_selection.GridSearchCV`
        over :func:`tuning_pipeline`; mixture parameters are written
        ``mixture__<parameter>`` (:func:`tune` adds ``estimator__`` when the
        mixture is fitted per volume).

    Notes
    -----
    The space, 5,184 settings in all, covers:

    - ``background``: off, or a white top-hat of radius 10 voxels (in plane)
      that removes background structures larger than the particles;
    - ``mixture__percentile_low``: the intensity percentile from which
      voxels seed particles, 99.5 (the published default, for sparse
      particles), 97 or 90 (for images where particles cover a few percent
      up to a tenth of the area), or ``"otsu"`` (each volume's Otsu
      threshold, for crops whose particle cover varies);
      ``percentile_high`` is kept at or above the percentiles;
    - ``mixture__monotone_posterior``: the published, unconstrained
      posterior, or one that never decreases with intensity;
    - ``mixture__halo``: the published bounding-box halos, or halos around
      the seed pixels (``"dilation"``), which leave background between
      touching particles;
    - ``mixture__beta_prior``: no preference on each slice's particle fraction
      ``(1, 1)``, the default ``(1, 20)``, or a strong pull towards few
      particles ``(1, 1000)``;
    - ``smooth__sigma``: no smoothing, the published ``(0.5, 1.5, 1.5)``
      voxels (z, y, x), or twice that; a 2D image uses the (y, x) part;
    - ``labeler__threshold``: 0.5, 0.9 or 0.99;
    - ``labeler__min_size``: 3, 10 or 30 voxels;
    - ``split``: off, or a watershed split of touching particles
      (:class:`~nanoseg.splitting.ParticleSplitter`) with ``min_distance`` 3.

    It is too large to search exhaustively with cross-validation in a few
    minutes, so :func:`tune` samples it (see `n_iter`). Narrow it to what
    matters for your data: a dict with fewer values per parameter, or a
    list of dicts (see :class:`~sklearn.model_selection.GridSearchCV`).

    Examples
    --------
    >>> from nanoseg.tuning import default_search_space
    >>> space = default_search_space()
    >>> sorted(space)[:3]
    ['background', 'labeler__min_size', 'labeler__threshold']
    """
    from .preprocessing import BackgroundSubtractor
    from .splitting import ParticleSplitter

    return {
        "background": [BackgroundSubtractor(method="passthrough"), BackgroundSubtractor(method="tophat", radius=10)],
        "mixture__percentile_low": [99.5, 97.0, 90.0, "otsu"],
        "mixture__percentile_high": [99.8],
        # Both off in the published method. On real images with dense or
        # touching particles, the monotone posterior kept dark background
        # from looking like particles, and dilation halos left background to
        # learn from where bounding boxes covered whole images.
        "mixture__monotone_posterior": [False, True],
        "mixture__halo": ["box", "dilation"],
        "mixture__beta_prior": [(1.0, 1.0), (1.0, 20.0), (1.0, 1000.0)],
        "smooth__sigma": [0.0, (0.5, 1.5, 1.5), (1.0, 3.0, 3.0)],
        "labeler__threshold": [0.5, 0.9, 0.99],
        "labeler__min_size": [3, 10, 30],
        "split": ["passthrough", ParticleSplitter(min_distance=3)],
    }


_PER_VOLUME_PARAMS = tuple(PerVolume._parameter_constraints)


def _translate(space, pipeline, per_volume):
    """Copy of `space` (a dict or a list of dicts) ready for the pipeline:
    mixture estimators wrapped and ``mixture__<p>`` keys routed through PerVolume."""
    if isinstance(space, dict):
        return _translate_one(space, pipeline, per_volume)
    if isinstance(space, (list, tuple)) and space and all(isinstance(part, dict) for part in space):
        return [_translate_one(part, pipeline, per_volume) for part in space]
    raise TypeError(
        "search_space must be 'default', a dict of parameter lists, or a list of such dicts; "
        f"got {type(space).__name__}."
    )


def _translate_one(space, pipeline, per_volume):
    out = {}
    for key, values in space.items():
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            raise TypeError(
                f"search_space[{key!r}] must be a list of values to try; got {values!r}. "
                f"Write [{values!r}] for a single value."
            )
        values = list(values)
        if not values:
            raise ValueError(f"search_space[{key!r}] is empty: give at least one value to try.")
        if key == "mixture":
            values = [_mixture_step(value, per_volume) for value in values]
        out[key] = values
    mixtures = out.get("mixture", [pipeline.named_steps["mixture"]])
    through_per_volume = all(isinstance(m, PerVolume) for m in mixtures)
    translated = {}
    for key, values in out.items():
        if through_per_volume and key.startswith("mixture__"):
            parameter = key[len("mixture__") :]
            if parameter.split("__")[0] not in _PER_VOLUME_PARAMS:
                key = f"mixture__estimator__{parameter}"
        translated[key] = values
    return translated


def _n_splits(cv):
    return cv if isinstance(cv, Integral) else getattr(cv, "n_splits", None)


def tune(
    X,
    y,
    *,
    scoring="object_f1",
    cv=3,
    n_jobs=None,
    search_space="default",
    per_volume=True,
    n_iter=60,
    refit=True,
    verbose=0,
    random_state=None,
):
    """Search segmentation settings that reproduce annotated crops.

    Builds the pipeline of :func:`tuning_pipeline` -- background subtraction,
    intensity mixture, posterior smoothing, labelling, splitting of touching
    particles -- and searches `search_space` with cross-validation over the
    crops, scoring each candidate's labels against the annotations.

    Parameters
    ----------
    X : list of ndarray
        uint8 crops, 2D (Y, X) or 3D (Z, Y, X), one sample each. A single
        3D array is one volume whose Z slices are the samples.
    y : list of ndarray
        One annotation per crop, of its shape: a boolean mask (touching
        particles in it count as one object) or instance labels (0 is
        background).
    scoring : str or callable, default="object_f1"
        "object_f1" (F1 of particles matched at IoU > 0.5), "object_precision",
        "object_recall", "panoptic_quality" (or "pq"), "dice" or "iou"
        (voxel scores), all pooled over the crops of a fold (see
        :mod:`nanoseg.metrics`); or a callable ``scorer(estimator, X, y)``.
    cv : int or cross-validation splitter, default=3
        An int ``k`` means ``KFold(k)`` over the crops, shuffled with
        `random_state` when one is given. Needs at least ``k`` crops.
    n_jobs : int, default=None
        Processes evaluating candidates and folds in parallel (None: 1, -1:
        all CPUs); see :class:`~sklearn.model_selection.GridSearchCV`.
    search_space : "default", dict or list of dict, default="default"
        Values to try, keyed ``<step>__<parameter>`` (a step name alone
        replaces the step: e.g. ``{"split": ["passthrough",
        ParticleSplitter()]}``). "default" is :func:`default_search_space`.
        Mixture parameters may be written ``mixture__<parameter>`` in both
        modes: with `per_volume` they are routed to the estimator inside
        :class:`PerVolume`. Estimators given for the ``mixture`` step (a
        :class:`~nanoseg.baselines.GlobalThreshold`, say) are wrapped in
        :class:`PerVolume` too, except a :class:`PrefitMixture`.
    per_volume : bool, default=True
        Fit the intensity mixture on every crop on its own (see
        :class:`PerVolume`) rather than once on the training crops of each
        fold. Keep True when the crops come from different acquisitions; set
        False when they come from one volume or one session, so that the
        model is fitted on all of a fold's training crops together.
    n_iter : int, default=60
        When the space holds at most `n_iter` settings, all are tried
        (:class:`~sklearn.model_selection.GridSearchCV`); otherwise `n_iter`
        settings are drawn at random without replacement
        (:class:`~sklearn.model_selection.RandomizedSearchCV` with
        `random_state`), which finds a good setting of a large space far
        sooner than trying them all.
    refit : bool, default=True
        Refit the best setting on all crops, as ``best_estimator_``.
    verbose : int, default=0
        Verbosity of the search.
    random_state : int, numpy.random.RandomState or None, default=None
        Seeds the sampling of a large space and the shuffling of the folds.

    Returns
    -------
    search : GridSearchCV or RandomizedSearchCV
        The fitted search: ``best_params_``, ``best_score_``, ``cv_results_``
        and, with `refit`, ``best_estimator_`` (a fitted Pipeline whose
        `transform` labels new images).

    Raises
    ------
    ValueError
        If `X` and `y` do not match, there are fewer crops than folds, or
        `scoring` or `search_space` is not valid.

    See Also
    --------
    tuning_pipeline : The pipeline searched.
    default_search_space : The recommended space.
    PerVolume, PrefitMixture : The two ways of fitting the mixture.

    Notes
    -----
    Each candidate is fitted on the training crops of a fold and scored on
    its other crops, so the score estimates how the setting does on crops it
    has not seen. With `per_volume` nothing is learned across crops and the
    folds only separate the crops used for choosing from those used for
    scoring.

    The best pipeline can label a large volume: ``best_estimator_.transform``
    on a zarr or dask array (with `per_volume`, the mixture is then fitted
    on that volume). The splitter works in memory only: with ``split`` on,
    transform a NumPy array, or switch it off first with
    ``search.best_estimator_.set_params(split="passthrough")``.

    To search the Beta prior and labelling settings on crops of a volume that
    is too large to refit for every candidate, fit the mixture once on the
    volume and pass ``search_space={"mixture": [PrefitMixture(mixture)],
    "mixture__beta_prior": [...], ...}``.

    Examples
    --------
    >>> from nanoseg.datasets import make_crops
    >>> from nanoseg.tuning import tune
    >>> crops, masks = make_crops(6, (64, 64), n_particles=8, random_state=0)
    >>> space = {"mixture__percentile_low": [97.0, 99.5],
    ...          "labeler__threshold": [0.5, 0.9], "labeler__min_size": [3]}
    >>> search = tune(crops, masks, search_space=space, cv=2, random_state=0)
    >>> type(search).__name__, len(search.cv_results_["params"])
    ('GridSearchCV', 4)
    >>> labels = search.best_estimator_.transform(crops[0])
    >>> labels.shape, labels.dtype
    ((64, 64), dtype('uint32'))
    """
    if isinstance(scoring, str):
        scorers = _scorers()
        if scoring not in scorers:
            raise ValueError(f"scoring must be one of {sorted(scorers)} or a callable; got {scoring!r}.")
        scoring = scorers[scoring]
    elif not callable(scoring):
        raise TypeError(f"scoring must be a string or a callable scorer(estimator, X, y); got {scoring!r}.")
    if isinstance(n_iter, bool) or not isinstance(n_iter, Integral) or n_iter < 1:
        raise ValueError(f"n_iter must be an integer >= 1; got {n_iter!r}.")

    volumes, is_list = as_volumes(X)
    check_targets(y, volumes, is_list)
    n_samples = len(volumes) if is_list else volumes[0].shape[0]
    n_splits = _n_splits(cv)
    if n_splits is not None and n_splits > n_samples:
        what = "crops" if is_list else "slices"
        raise ValueError(
            f"cv={cv!r} needs at least {n_splits} {what}, but X has {n_samples}: annotate more "
            "crops or use fewer folds."
        )
    if isinstance(cv, Integral):
        shuffle = random_state is not None
        cv = KFold(n_splits=cv, shuffle=shuffle, random_state=random_state if shuffle else None)

    pipeline = tuning_pipeline(per_volume=per_volume)
    space = search_space
    if isinstance(space, str):
        if space != "default":
            raise ValueError(f"search_space must be 'default', a dict or a list of dicts; got {space!r}.")
        space = default_search_space()
    space = _translate(space, pipeline, per_volume)

    n_candidates = len(ParameterGrid(space))
    common = {"scoring": scoring, "cv": cv, "n_jobs": n_jobs, "refit": refit, "verbose": verbose}
    if n_candidates <= n_iter:
        search = GridSearchCV(pipeline, space, **common)
    else:
        search = RandomizedSearchCV(pipeline, space, n_iter=n_iter, random_state=random_state, **common)
    # Keep X as given: a list of crops stays a list (one sample per crop).
    return search.fit(X if is_volume_list(X) else volumes[0].array, y)
