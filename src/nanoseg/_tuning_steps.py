"""The two ways of fitting an intensity step inside a search: per crop, or once.

:class:`PerVolume` and :class:`PrefitMixture` are documented and imported
from :mod:`nanoseg.tuning`; they live here so that the search itself
(:mod:`nanoseg._search`) and :func:`nanoseg.tune` stay readable.
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.frozen import FrozenEstimator
from sklearn.utils._param_validation import (
    HasMethods,
    InvalidParameterError,
    StrOptions,
)
from sklearn.utils.validation import check_is_fitted

from ._base import VolumeEstimatorMixin, map_volumes
from ._model import EMCollapseError
from ._validation import check_beta_prior, check_targets
from ._volume import as_volumes, is_lazy
from .mixture import NanoparticleMixture

__all__ = ["PerVolume", "PrefitMixture"]

#: Errors of an unsupervised fit that say the image does not suit the
#: settings (rather than that the settings are invalid).
FIT_ERRORS = (ValueError, EMCollapseError)


def fit_hint(error):
    """What to change when an intensity model could not be fitted, or ''."""
    message = str(error)
    if "No background voxels are left" in message:
        return (
            'Try halo="dilation": halos around the seed pixels rather than their bounding boxes, '
            "which can cover a whole image where particles are dense or touch. A smaller halo_pad "
            "or a higher percentile_low (fewer seeds) also leaves background to learn from."
        )
    if isinstance(error, EMCollapseError):
        return (
            "The image may hold no particle brighter than its background: check it, or try a "
            "lower percentile_low or halo_pad."
        )
    return ""


def located_error(error, estimator, where):
    """`error` again, its message naming the image it came from and the remedy."""
    hint = fit_hint(error)
    message = f"{type(estimator).__name__} could not be fitted on {where}: {error}"
    if hint and hint not in message:
        message = f"{message} {hint}"
    try:
        return type(error)(message)
    except Exception:  # an exception type built from other arguments: keep it as it is
        return error


# ---------------------------------------------------------------------------
# PerVolume
# ---------------------------------------------------------------------------


def _empty_like(volume, dtype=np.float32):
    """All-zero map shaped like `volume` (lazy for a lazy volume)."""
    if is_lazy(volume.array):
        import dask.array as da

        return volume.restore(da.zeros(volume.shape, dtype=dtype, chunks=volume.to_dask().chunks))
    return np.zeros(volume.array.shape, dtype=dtype)


#: Stands in for the fit of an image that could not be fitted, with on_error="empty".
NOT_FITTED = object()


class PerVolume(VolumeEstimatorMixin, TransformerMixin, BaseEstimator):
    """Fit a fresh copy of an intensity step on every image it transforms.

    ``transform(X)`` fits a clone of `estimator` on each image or volume of
    `X` and returns that clone's output on it; nothing is learned by `fit`.
    Inside a pipeline and a grid search, each crop is therefore modelled on
    its own, while `estimator`'s parameters and those of the other steps are
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
        passes the error on, its message naming the image (``X[i]``, the
        i-th image given) and what to change; "empty" warns and returns an
        all-zero float32 map (no particle) for that image, so that one odd
        image does not void a whole search. Invalid parameters are always
        raised.

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

    **Parameters of the wrapped estimator.** They are parameters of this
    step too: in a pipeline whose step ``"mixture"`` is
    ``PerVolume(NanoparticleMixture())``, a grid search sets the mixture's
    prior as ``mixture__beta_prior``, exactly as without the wrapper. The
    scikit-learn spelling ``mixture__estimator__beta_prior`` works as well.
    `estimator` and `on_error` keep their meaning here, for this step, even
    if the wrapped estimator has parameters of those names.

    **Samples.** A list `X` holds one image or volume per item, and each item
    gets its own model (a list out); a single array is one volume (one model,
    one array out). The annotations `y` are checked against `X` but never
    passed to `estimator`.

    **Cost.** Every call to `transform` fits again: in a plain grid search,
    each candidate refits the intensity model of every crop it scores, and
    of every training crop (which the pipeline transforms before fitting its
    later steps). :func:`tune` fits each crop once per setting instead.

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

    The wrapped estimator's parameters are this step's:

    >>> step = PerVolume(GlobalThreshold(method="otsu"))
    >>> step.set_params(method="li").estimator.method
    'li'
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

    # -- parameters --------------------------------------------------------
    def _wrapped_params(self, deep=True):
        get_params = getattr(self.estimator, "get_params", None)
        return get_params(deep=deep) if callable(get_params) and not isinstance(self.estimator, type) else {}

    def get_params(self, deep=True):
        """Parameters of this step, and with `deep` those of the wrapped estimator.

        Parameters
        ----------
        deep : bool, default=True
            Also list the wrapped estimator's parameters, under their own
            names (``beta_prior``) and under scikit-learn's nested names
            (``estimator__beta_prior``).

        Returns
        -------
        params : dict
            ``estimator`` and ``on_error``; with `deep`, the wrapped
            estimator's parameters too. :func:`sklearn.base.clone` uses the
            shallow ones.
        """
        own = super().get_params(deep=False)
        if not deep:
            return own
        inner = self._wrapped_params(deep=True)
        params = dict(own)
        params.update({f"estimator__{key}": value for key, value in inner.items()})
        # This step's own names win over the wrapped estimator's.
        params.update({key: value for key, value in inner.items() if key not in own})
        return params

    def set_params(self, **params):
        """Set this step's parameters or the wrapped estimator's.

        Parameters
        ----------
        **params : dict
            ``estimator``, ``on_error``, ``estimator__<parameter>``, or any
            parameter of the wrapped estimator by its own name.

        Returns
        -------
        self : PerVolume

        Raises
        ------
        ValueError
            If a name is neither this step's nor the wrapped estimator's.
        """
        own = set(self._get_param_names())
        direct = {key: value for key, value in params.items() if key in own or key.startswith("estimator__")}
        # The estimator may be replaced in the same call: set it first.
        super().set_params(**direct)
        delegated = {key: value for key, value in params.items() if key not in direct}
        if delegated:
            valid = self._wrapped_params(deep=True)
            unknown = sorted(key for key in delegated if key not in valid)
            if unknown:
                raise ValueError(
                    f"Invalid parameter {unknown[0]!r} for PerVolume({type(self.estimator).__name__}). "
                    f"Valid parameters are PerVolume's own {sorted(own)} and those of the wrapped "
                    f"{type(self.estimator).__name__}: {sorted(self._wrapped_params(deep=False))}."
                )
            self.estimator.set_params(**delegated)
        return self

    # -- fitting -----------------------------------------------------------
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
        return self._guarded(volume, lambda estimator: estimator.fit_transform(volume.array))

    def _fit_one(self, volume):
        """A clone of `estimator` fitted on one volume, or NOT_FITTED (on_error="empty").

        For searches that predict with several prediction-only settings
        (the mixture's prior) from one fit; see :meth:`_transform_fitted`.
        """
        return self._guarded(volume, lambda estimator: estimator.fit(volume.array), empty=NOT_FITTED)

    @staticmethod
    def _transform_fitted(fitted, volume):
        """The output of :meth:`_fit_one`'s model on the same volume."""
        return _empty_like(volume) if fitted is NOT_FITTED else fitted.transform(volume.array)

    def _guarded(self, volume, work, empty=None):
        estimator = clone(self.estimator)
        try:
            return work(estimator)
        except InvalidParameterError:
            raise
        except FIT_ERRORS as error:
            if self.on_error == "raise":
                raise located_error(error, self.estimator, volume.name) from error
            warnings.warn(
                f"{type(self.estimator).__name__} could not be fitted on {volume.name} "
                f"({type(error).__name__}: {error}); it is treated as holding no particle "
                "(on_error='empty').",
                UserWarning,
                stacklevel=4,
            )
            return _empty_like(volume) if empty is None else empty


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


# Both are documented, pickled and named in model files as nanoseg.tuning's.
PerVolume.__module__ = PrefitMixture.__module__ = "nanoseg.tuning"
