"""Choose settings against annotated crops: a one-call search and its pieces.

* :func:`tune` cross-validates, in one call, the two ways nanoseg finds
  particles -- the intensity mixture fitted to each crop, with background
  subtraction, smoothing and labelling around it, and the classifier
  learned from the annotations (:class:`~nanoseg.NanoparticleClassifier`)
  -- on the same folds with the same score, and keeps the best setting of
  either. Work is shared between candidates: each crop's mixture is
  fitted, and each fold's classifier trained, once per setting, and the
  cheap labelling settings are all tried on that output.
* :func:`tuning_pipeline` and :func:`default_search_space` are the pipeline
  it searches and the recommended space.
* :class:`PerVolume` fits an intensity step (the mixture, or a baseline
  threshold) on each image or volume it transforms, so that crops from
  different acquisitions each get their own intensity model while the other
  settings are shared and searched;
* :class:`PrefitMixture` reuses a mixture already fitted on a large volume,
  so that a search over the Beta prior and the labelling settings never reads
  that volume again.
"""

from __future__ import annotations

from numbers import Integral

import numpy as np
from sklearn.model_selection import KFold, ParameterGrid
from sklearn.pipeline import Pipeline
from sklearn.utils import check_random_state

from ._search import SharedGridSearchCV
from ._tuning_steps import PerVolume, PrefitMixture
from ._validation import check_targets
from ._volume import as_volumes, is_volume_list
from .mixture import NanoparticleMixture

__all__ = ["PerVolume", "PrefitMixture", "default_search_space", "tune", "tuning_pipeline"]

#: Names of the steps of :func:`tuning_pipeline`, in order.
STEP_NAMES = ("background", "classifier", "mixture", "smooth", "labeler", "split")

#: Steps fitted to the data (the costly part of a setting); the later steps
#: work on their output and are tried in every combination.
FITTED_STEPS = ("background", "classifier", "mixture")

#: Mixture parameters that act only at prediction: all their values share one
#: fit, so they are tried in every combination too.
PREDICTION_ONLY = tuple(
    f"mixture__{nested}{name}" for nested in ("", "estimator__") for name in ("beta_prior", "posterior_dtype")
)


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
        off: ``"passthrough"`` method), ``classifier`` (``"passthrough"``:
        off; a :class:`~nanoseg.NanoparticleClassifier` takes the place of
        the mixture when searched), ``mixture``, ``smooth``
        (:class:`~nanoseg.preprocessing.PosteriorSmoother`, the published
        sigma), ``labeler`` (:class:`~nanoseg.NanoparticleLabeler`, defaults)
        and ``split`` (``"passthrough"``: off). Parameters are addressed as
        ``<step>__<parameter>``, e.g. ``mixture__beta_prior``, also through
        :class:`PerVolume`.

    See Also
    --------
    tune, default_search_space

    Examples
    --------
    >>> from nanoseg.tuning import tuning_pipeline
    >>> pipeline = tuning_pipeline()
    >>> [name for name, _ in pipeline.steps]
    ['background', 'classifier', 'mixture', 'smooth', 'labeler', 'split']
    >>> pipeline.get_params()["mixture__beta_prior"]
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
            ("classifier", "passthrough"),
            ("mixture", _mixture_step(mixture, per_volume)),
            ("smooth", PosteriorSmoother()),
            ("labeler", NanoparticleLabeler()),
            ("split", "passthrough"),
        ]
    )


def _mixture_step(estimator, per_volume):
    """`estimator` wrapped in PerVolume when asked, unless it is fitted once by design."""
    if (
        not per_volume
        or isinstance(estimator, (PerVolume, PrefitMixture))
        or (isinstance(estimator, str) and estimator == "passthrough")
    ):
        return estimator
    return PerVolume(estimator)


def _object_sizes(y):
    """Voxel counts of the annotated particles of `y` (a list of annotations or one)."""
    from scipy import ndimage as ndi

    sizes = []
    for target in y if isinstance(y, (list, tuple)) else [y]:
        target = np.asarray(target)
        if target.dtype == bool:
            # Touching particles in a mask count as one, as the scorers count them.
            target, _ = ndi.label(target, structure=np.ones((3,) * target.ndim, dtype=bool))
        counts = np.bincount(target[target > 0].ravel().astype(np.int64))
        sizes.append(counts[counts > 0])
    return np.concatenate(sizes) if sizes else np.zeros(0, dtype=np.int64)


def _min_sizes(y):
    """Minimum particle sizes to try: 3 voxels, and 1/16 and 1/4 of the median annotated particle."""
    sizes = _object_sizes(y) if y is not None else np.zeros(0)
    if sizes.size == 0:
        return [3, 10, 30]
    median = float(np.median(sizes))
    return sorted({3, *(max(3, round(median * share)) for share in (1 / 16, 1 / 4))})


def _has_stacks(X):
    """Whether some crop of `X` holds more than one slice (one array is one volume of slices)."""
    if not is_volume_list(X):
        return True
    return any(np.ndim(crop) == 3 and np.shape(crop)[0] > 1 for crop in X)


def default_search_space(X=None, y=None, *, per_volume=True):
    """The recommended space of the intensity-mixture pipeline, fitted to the data.

    Parameters
    ----------
    X : list of ndarray or ndarray, default=None
        The crops to be searched on; they decide whether the Beta prior is
        searched (see Notes). None: as for crops of several slices.
    y : list of ndarray or ndarray, default=None
        Their annotations; the sizes of the annotated particles set the
        labeller's minimum sizes. None: 3, 10 and 30 voxels.
    per_volume : bool, default=True
        Whether the mixture is fitted on every crop on its own, as in
        :func:`tune`.

    Returns
    -------
    space : dict
        Parameter lists keyed as for :class:`~sklearn.model_selection.GridSearchCV`
        over :func:`tuning_pipeline`.

    See Also
    --------
    tune : Searches this space and the learned classifier's.

    Notes
    -----
    The space covers:

    - ``background``: off, or a white top-hat of radius 10 voxels (in plane)
      that removes background structures larger than the particles;
    - ``mixture__percentile_low``: the intensity percentile from which
      voxels seed particles, 99.5 (the published default, for sparse
      particles), 97 or 90 (for images where particles cover a few percent
      up to a tenth of the area), or ``"otsu"`` (each volume's Otsu
      threshold, for crops whose particle cover varies);
    - ``mixture__monotone_posterior``: the published, unconstrained
      posterior, or one that never decreases with intensity;
    - ``mixture__halo``: the published bounding-box halos, or halos around
      the seed pixels (``"dilation"``), which leave background between
      touching particles;
    - ``mixture__beta_prior``, only when it can matter (see below): no
      preference on each slice's particle fraction ``(1, 1)``, the default
      ``(1, 20)``, or a strong pull towards few particles ``(1, 1000)``;
    - ``smooth__sigma``: no smoothing, or the published ``(0.5, 1.5, 1.5)``
      voxels (z, y, x); a 2D image uses the (y, x) part;
    - ``labeler__threshold``: 0.5, 0.9 or 0.99;
    - ``labeler__min_size``: 3 voxels, and a sixteenth and a quarter of the
      median annotated particle (at least 3): particles of a few voxels in
      SBF-SEM, larger ones in micrographs, where noise makes blobs of tens
      of pixels.

    **The Beta prior and 2D crops.** The prior weighs each slice's particle
    fraction. An image fitted on its own is one slice, and EM has already
    fitted its particle fraction: the flat prior ``(1, 1)`` gives exactly
    that fraction back, and any other prior adds its ``a - 1`` and
    ``b - 1`` pseudo-counts to the image's N pixels, which multiplies the
    posterior odds of the whole image by one factor. That is what moving the
    labelling threshold does, and the threshold is searched anyway: on a
    512 x 512 image, ``(1, 20)`` moves the fraction in the fourth decimal,
    and even ``(1, 1000)`` by a few percent. So the prior is searched only
    when a crop holds several slices (each then gets its own fraction) or
    the mixture is fitted on several crops at once (``per_volume=False``).

    Splitting touching particles (``split``) is left out: a watershed on
    every labelled candidate costs more than the rest of the search. Add
    ``{"split": ["passthrough", ParticleSplitter(min_distance=3)]}`` to a
    space of your own when particles touch.

    Examples
    --------
    >>> from nanoseg.datasets import make_crops
    >>> from nanoseg.tuning import default_search_space
    >>> crops, masks = make_crops(4, (64, 64), n_particles=8, random_state=0)
    >>> space = default_search_space(crops, masks)
    >>> "mixture__beta_prior" in space, sorted(space)[:3]
    (False, ['background', 'labeler__min_size', 'labeler__threshold'])
    """
    from .preprocessing import BackgroundSubtractor

    space = {
        "background": [BackgroundSubtractor(method="passthrough"), BackgroundSubtractor(method="tophat", radius=10)],
        "mixture__percentile_low": [99.5, 97.0, 90.0, "otsu"],
        # Both off in the published method. On real images with dense or
        # touching particles, the monotone posterior kept dark background
        # from looking like particles, and dilation halos left background to
        # learn from where bounding boxes covered whole images.
        "mixture__monotone_posterior": [False, True],
        "mixture__halo": ["box", "dilation"],
        "mixture__beta_prior": [(1.0, 1.0), (1.0, 20.0), (1.0, 1000.0)],
        "smooth__sigma": [0.0, (0.5, 1.5, 1.5)],
        "labeler__threshold": [0.5, 0.9, 0.99],
        "labeler__min_size": _min_sizes(y),
    }
    if X is not None and per_volume and not _has_stacks(X):
        del space["mixture__beta_prior"]
    return space


def _learned_space(y=None, random_state=None):
    """The learned pipeline's space: the default features, a few labelling settings."""
    from .classifier import NanoparticleClassifier, default_classifier

    # One classifier setting: training a fold's classifier and classifying
    # its test crops is the costliest part of the search (a second setting,
    # coarser scales, doubled it and scored no better on the EMPS images).
    # 20,000 training voxels (a fifth of the default) and 25 trees (half)
    # take a third of the time, at the same cross-validated F1 there
    # (0.617 against 0.615 with 50 trees, measured with the earlier
    # "background" normalisation).
    forest = default_classifier(random_state=random_state).set_params(n_estimators=25)
    return {
        "classifier": [NanoparticleClassifier(classifier=forest, max_samples=20_000, random_state=random_state)],
        "labeler__threshold": [0.5, 0.7],
        "labeler__min_size": _min_sizes(y),
    }


def _translate(space, per_volume):
    """A list of dicts ready for the pipeline: values checked, mixture estimators
    wrapped, and each part that sets a classifier completed as the learned pipeline."""
    if isinstance(space, dict):
        parts = [space]
    elif isinstance(space, (list, tuple)) and space and all(isinstance(part, dict) for part in space):
        parts = list(space)
    else:
        raise TypeError(
            "search_space must be 'default', a dict of parameter lists, or a list of such dicts; "
            f"got {type(space).__name__}."
        )
    return [_translate_one(part, per_volume) for part in parts]


def _translate_one(space, per_volume):
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
    learned = any(not (isinstance(v, str) and v == "passthrough") for v in out.get("classifier", ["passthrough"]))
    if learned:
        # The classifier replaces the intensity model and reads the raw
        # crops; its probabilities are labelled without a closing, which
        # would bridge the borders it leaves between touching particles.
        for step in ("background", "mixture", "smooth"):
            if not any(key == step or key.startswith(f"{step}__") for key in out):
                out[step] = ["passthrough"]
        if "labeler" not in out and "labeler__radius" not in out:
            out["labeler__radius"] = [0]
    return out


def _sample(space, n_iter, random_state):
    """Each part of `space` with at most `n_iter` settings of its fitted steps,
    drawn at random without replacement, each with every setting of the later steps."""
    sampled = []
    for part in space:
        fitted = {
            key: values
            for key, values in part.items()
            if key.split("__")[0] in FITTED_STEPS and key not in PREDICTION_ONLY
        }
        later = {key: values for key, values in part.items() if key not in fitted}
        grid = ParameterGrid(fitted)
        if len(grid) <= n_iter:
            sampled.append(part)
            continue
        picks = np.sort(random_state.choice(len(grid), size=n_iter, replace=False))
        sampled.extend({**{key: [value] for key, value in grid[int(i)].items()}, **later} for i in picks)
    return sampled


def _n_splits(cv):
    return cv if isinstance(cv, Integral) else getattr(cv, "n_splits", None)


def _seed(random_state):
    """An int seed (or None) for the classifiers, from `random_state`."""
    if random_state is None or isinstance(random_state, Integral):
        return random_state
    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


def tune(
    X,
    y,
    *,
    scoring="object_f1",
    cv=3,
    n_jobs=None,
    search_space="default",
    per_volume=True,
    n_iter=4,
    refit=True,
    verbose=0,
    random_state=None,
):
    """Search segmentation settings that reproduce annotated crops.

    Cross-validates two pipelines on the same folds with the same score, and
    keeps the best setting of either:

    - the intensity mixture (:func:`tuning_pipeline`): background
      subtraction, :class:`~nanoseg.NanoparticleMixture` fitted to each crop,
      posterior smoothing, labelling;
    - the classifier learned from the annotations:
      :class:`~nanoseg.NanoparticleClassifier`, trained on the training
      crops of each fold, then labelling.

    Each candidate is fitted on the training crops of a fold and scored on
    its other crops, against their annotations.

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
        :mod:`nanoseg.metrics`); or a callable ``scorer(estimator, X, y)``
        that calls ``estimator.transform(X)``.
    cv : int or cross-validation splitter, default=3
        An int ``k`` means ``KFold(k)`` over the crops, shuffled with
        `random_state` when one is given. Needs at least ``k`` crops.
    n_jobs : int, default=None
        Processes working in parallel (None: 1, -1: all CPUs), each on a
        setting of the fitted steps and a fold.
    search_space : "default", dict or list of dict, default="default"
        Values to try, keyed ``<step>__<parameter>`` (a step name alone
        replaces the step: e.g. ``{"split": ["passthrough",
        ParticleSplitter()]}``). "default" is
        ``default_search_space(X, y, per_volume=per_volume)`` for the
        mixture, and the classifier with its default features, trained on
        20,000 voxels by a forest of 25 trees (half the default), labelled
        at thresholds 0.5 and 0.7 with the same minimum sizes. A dict (or each dict of a list)
        is one part of the space. Estimators given for the ``mixture`` step
        (a :class:`~nanoseg.baselines.GlobalThreshold`, say) are wrapped in
        :class:`PerVolume` with `per_volume`, except a
        :class:`PrefitMixture`. A part that sets ``classifier`` describes the
        learned pipeline: unless it sets them, its ``background``,
        ``mixture`` and ``smooth`` steps are off and the labeller's
        ``radius`` is 0.
    per_volume : bool, default=True
        Fit the intensity mixture on every crop on its own (see
        :class:`PerVolume`) rather than once on the training crops of each
        fold. Keep True when the crops come from different acquisitions; set
        False when they come from one volume or one session, so that the
        model is fitted on all of a fold's training crops together.
    n_iter : int, default=4
        At most this many settings of the fitted steps -- background
        subtraction, the mixture or the classifier -- are tried in each part
        of the space, drawn at random without replacement when it holds
        more. Each is tried with every setting of the later steps
        (smoothing, labelling, splitting) and every Beta prior, which reuse
        its output and cost little; the cost of the search grows with
        `n_iter`. The default space's mixture part holds 32 fitted settings,
        its classifier part 1.
    refit : bool, default=True
        Refit the best setting on all crops, as ``best_estimator_``.
    verbose : int, default=0
        Verbosity of the parallel runs.
    random_state : int, numpy.random.RandomState or None, default=None
        Seeds the draw of settings, the shuffling of the folds and the
        default classifiers.

    Returns
    -------
    search : GridSearchCV
        The fitted search (of the candidates drawn): ``best_params_``,
        ``best_score_``, ``cv_results_`` (one row per candidate, as from
        :class:`~sklearn.model_selection.GridSearchCV`) and, with `refit`,
        ``best_estimator_`` (a fitted Pipeline whose `transform` labels new
        images). A candidate of the learned pipeline has a
        :class:`~nanoseg.NanoparticleClassifier` as ``classifier`` and
        ``"passthrough"`` as ``mixture``.

    Raises
    ------
    ValueError
        If `X` and `y` do not match, there are fewer crops than folds,
        `scoring` or `search_space` is not valid, or every candidate failed
        on some crop.

    Warns
    -----
    sklearn.exceptions.FitFailedWarning
        Once, when some candidates could not be fitted on some crops: it
        names the crops (indices into `X`), the error and what to change.
        Those candidates score nan and are not chosen. Other warnings raised
        while searching (e.g. EM not converging) are shown once each, with
        the crops they came from.

    See Also
    --------
    tuning_pipeline : The pipeline searched.
    default_search_space : The recommended space for the mixture.
    PerVolume, PrefitMixture : The two ways of fitting the mixture.

    Notes
    -----
    **Shared work.** A grid search would refit every step of the pipeline
    for every candidate and fold. Here each crop's mixture is fitted once
    per setting (once for all Beta priors: the prior acts at prediction),
    each fold's classifier trained once per setting, and each posterior or
    probability map smoothed and labelled once per setting of those steps;
    minimum sizes are tried on one labelling. The scores are those of the
    equivalent :class:`~sklearn.model_selection.GridSearchCV`.

    With `per_volume` nothing is learned across crops by the mixture, and
    the folds only separate the crops used for choosing from those used for
    scoring. The classifier learns from the annotations of the training
    crops of each fold, and is scored on crops it has not seen.

    The best pipeline can label a large volume: ``best_estimator_.transform``
    on a zarr or dask array (with `per_volume`, the mixture is then fitted
    on that volume). The splitter, when searched, works in memory only:
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
    >>> len(search.cv_results_["params"]), sorted(search.best_params_)
    (4, ['labeler__min_size', 'labeler__threshold', 'mixture__percentile_low'])
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
        space = [default_search_space(X, y, per_volume=per_volume), _learned_space(y, _seed(random_state))]
    space = _sample(_translate(space, per_volume), n_iter, check_random_state(random_state))

    search = SharedGridSearchCV(
        pipeline,
        space,
        scoring=scoring,
        cv=cv,
        n_jobs=n_jobs,
        refit=refit,
        verbose=verbose,
        # A background subtraction is computed once per crop; a task is one
        # setting of background, classifier and mixture on one fold.
        shared_steps=1,
        task_steps=3,
    )
    # Keep X as given: a list of crops stays a list (one sample per crop).
    # Warnings name the caller's line, not this one.
    return search._search(X if is_volume_list(X) else volumes[0].array, y, None, stacklevel=3)
