"""A grid search over a pipeline that computes each step's output once per setting.

scikit-learn's :class:`~sklearn.model_selection.GridSearchCV` fits and runs
the whole pipeline for every candidate and fold. Candidates of a grid
usually share most of it: twenty labelling settings tried on one posterior
need that posterior once, not twenty times. :class:`SharedGridSearchCV`
arranges the candidates as a tree of step settings -- candidates that agree
on the first k steps share those steps' outputs -- and walks it once per
fold, so that every step runs once per distinct setting of the steps up to
it. The scores are those GridSearchCV computes: each candidate's pipeline is
fitted on the training crops of a fold and scored, by the same scorer, on
its test crops.

Two further shortcuts give outputs identical to running the step itself:

* a :class:`~nanoseg.tuning.PerVolume` mixture is fitted once per crop for
  all settings that differ only in what acts at prediction (the Beta prior,
  the posterior's dtype);
* :class:`~nanoseg.NanoparticleLabeler` settings that differ only in
  `min_size` label once, with the smallest, and drop the smaller components
  for the others.

Steps that learn nothing from the training crops (scikit-learn's tag
``requires_fit=False``, as every nanoseg step but the fitted models) are
applied crop by crop, so that an error names its crop and spoils only the
folds that score that crop. Errors and warnings raised while searching are
collected and reported once, summarised, instead of once per fit.
"""

from __future__ import annotations

import time
import warnings
from collections import defaultdict
from numbers import Real

import numpy as np
from joblib import Parallel, delayed, hash as joblib_hash
from sklearn.base import clone
from sklearn.exceptions import FitFailedWarning
from sklearn.model_selection import GridSearchCV, ParameterGrid, check_cv
from sklearn.pipeline import Pipeline
from sklearn.utils import get_tags

from ._search_report import failure, failure_summary, results_table, warn_collected
from ._tuning_steps import NOT_FITTED, PerVolume

__all__ = ["SharedGridSearchCV"]


# ---------------------------------------------------------------------------
# the tree of candidates
# ---------------------------------------------------------------------------


def _is_off(step):
    return step is None or (isinstance(step, str) and step == "passthrough")


def learns(step):
    """Whether `step` learns from the training crops (fit before transform)."""
    if _is_off(step):
        return False
    try:
        return bool(get_tags(step).requires_fit)
    except Exception:  # not a scikit-learn estimator: assume it learns
        return True


def _setting_key(step):
    return "passthrough" if _is_off(step) else joblib_hash(step)


class _Node:
    """One setting of one step, below the settings of the steps before it."""

    __slots__ = ("children", "learns_below", "leaves", "n_leaves", "name", "step")

    def __init__(self, name=None, step=None):
        self.name = name
        self.step = step
        self.children = {}
        self.leaves = []  # candidates ending here
        self.n_leaves = 0
        self.learns_below = False  # a step under this one learns

    def add(self, index, path):
        node = self
        for name, key, step in path:
            node = node.children.setdefault(key, _Node(name, step))
        node.leaves.append(index)

    def finish(self):
        """Count the leaves under every node and mark where learning steps lie below."""
        self.n_leaves = len(self.leaves)
        for child in self.children.values():
            child.finish()
            self.n_leaves += child.n_leaves
            self.learns_below |= child.learns_below or learns(child.step)
        return self


def _configure(pipeline, params):
    """The steps of a clone of `pipeline` with `params` set, as (name, key, step) triples."""
    configured = clone(pipeline).set_params(**clone(params, safe=False))
    return [(name, _setting_key(step), step) for name, step in configured.steps]


# ---------------------------------------------------------------------------
# outputs of a fold's crops
# ---------------------------------------------------------------------------


class _Failed:
    """Stands in for the output of a crop on which a step failed."""

    __slots__ = ("error", "step")

    def __init__(self, step, error):
        self.step = step
        self.error = error


def _failed(outputs):
    return next((out for out in outputs if isinstance(out, _Failed)), None)


class _Scored:
    """A candidate's pipeline fitted on a fold, whose output on the test crops is known.

    The scorer's ``transform(X_test)`` gets that output; anything else (another
    method, another input) fits the candidate's real pipeline on the fold's
    training crops and asks it, so that any scorer gets the answer it would
    get in a GridSearchCV.
    """

    def __init__(self, steps, X_test, output, fit):
        self._steps = steps
        self._X_test = X_test
        self._output = output
        self._fit = fit
        self._fitted = None

    def transform(self, X):
        if X is self._X_test:
            return self._output
        return self._pipeline().transform(X)

    def _pipeline(self):
        if self._fitted is None:
            steps = [(name, step if _is_off(step) else clone(step)) for name, step in self._steps]
            self._fitted = self._fit(Pipeline(steps))
        return self._fitted

    def __getattr__(self, name):
        if name.startswith("__") or name in ("_steps", "_X_test", "_output", "_fit", "_fitted"):
            raise AttributeError(name)
        return getattr(self._pipeline(), name)


def _drop_small(labels, min_size):
    """`labels` without components of fewer than `min_size` voxels, renumbered 1..K.

    Components keep their order, so labels numbered in raster order of
    their first voxel stay so: the result is what the labeller gives with
    that `min_size`.
    """
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    lookup = np.cumsum(keep).astype(labels.dtype)
    lookup[~keep] = 0
    return lookup[labels]


def _labeler_family(step):
    """(family key, min_size) of a NanoparticleLabeler: settings alike but for min_size."""
    from .labeler import NanoparticleLabeler

    if type(step) is not NanoparticleLabeler:
        return None
    params = step.get_params(deep=False)
    return ("labeler", joblib_hash({k: v for k, v in params.items() if k != "min_size"})), params["min_size"]


#: Parameters of NanoparticleMixture that act only at prediction.
_PREDICTION_ONLY = ("beta_prior", "posterior_dtype")


def _mixture_family(step):
    """(family key, None) of a PerVolume mixture: settings alike but for prediction-only ones."""
    from .mixture import NanoparticleMixture

    if type(step) is not PerVolume or type(step.estimator) is not NanoparticleMixture:
        return None
    params = step.estimator.get_params(deep=False)
    fit_params = {k: v for k, v in params.items() if k not in _PREDICTION_ONLY}
    return ("mixture", joblib_hash((step.on_error, fit_params))), None


def _task_key(key, step):
    found = _mixture_family(step)
    return key if found is None else found[0]


class _Family:
    """Sibling settings of one step that share one computation per crop."""

    def __init__(self, kind, steps):
        self.kind = kind
        self.steps = steps
        self.cache = {}

    def smallest(self):
        return min(step.min_size for step in self.steps)

    def output(self, step, unit, value):
        from ._volume import as_volume

        if self.kind == "labeler":
            low = self.smallest()
            if unit not in self.cache:
                self.cache[unit] = clone(step).set_params(min_size=low).transform(value)
            base = self.cache[unit]
            if step.min_size == low:
                return base
            # Lazy labels (of zarr or dask crops) are labelled again instead.
            return _drop_small(base, step.min_size) if isinstance(base, np.ndarray) else step.transform(value)
        volume = as_volume(value)
        if unit not in self.cache:
            self.cache[unit] = step._fit_one(volume)
        fitted = self.cache[unit]
        if fitted is not NOT_FITTED:
            from ._tuning_steps import _fitted_state

            settings = {name: getattr(step.estimator, name) for name in _PREDICTION_ONLY}
            model = clone(fitted).set_params(**settings)
            vars(model).update(_fitted_state(fitted))
            fitted = model
        return PerVolume._transform_fitted(fitted, volume)


def _families(node):
    """Shortcut families among the children of `node`, keyed by child."""
    groups = defaultdict(list)
    for key, child in node.children.items():
        found = _labeler_family(child.step) or _mixture_family(child.step)
        if found is not None:
            groups[found[0]].append(key)
    families = {}
    for (kind, _), keys in groups.items():
        if len(keys) > 1:
            family = _Family(kind, [node.children[key].step for key in keys])
            families.update(dict.fromkeys(keys, family))
    return families


# ---------------------------------------------------------------------------
# one task: a subtree of settings on one fold
# ---------------------------------------------------------------------------


class _Task:
    """The candidates under one setting of the leading steps, on one fold."""

    def __init__(self, tree, fold, test, train, X, y, inputs, is_list, scorer, error_score, single_thread):
        self.tree = tree
        self.fold = fold
        self.test = test
        self.train = train
        self.X = X  # the crops (dict by index), or the single volume
        self.y = y
        self.inputs = inputs  # outputs of the shared leading steps, as X
        self.is_list = is_list
        self.scorer = scorer
        self.error_score = error_score
        self.single_thread = single_thread


def _take(data, indices, is_list):
    return [data[i] for i in indices] if is_list else data[indices]


class _TaskRun:
    def __init__(self, task):
        self.task = task
        self.scores = {}
        self.fit_times = {}
        self.score_times = {}
        self.failures = []  # (crop, step name, step, error) of each failed fit or transform
        self.caught = []  # (category, message, crop) of each warning
        self.failed_fits = []  # candidates whose score on this fold failed
        self.X_test = _take(task.X, task.test, task.is_list)
        self.y_test = _take(task.y, task.test, task.is_list)
        self.y_train = _take(task.y, task.train, task.is_list) if len(task.train) else None
        self.units = list(task.test) if task.is_list else ["fold"]

    def run(self):
        task = self.task
        if task.is_list:
            test = [task.inputs[i] for i in task.test]
            train = _Lazy(lambda: [task.inputs[i] for i in task.train])
        else:
            test = [task.inputs[task.test]]
            train = _Lazy(lambda: task.inputs[task.train])
        self.walk(task.tree, test, train, [], 0.0)
        return self

    def _ready(self, step):
        if not self.task.single_thread or _is_off(step):
            return step
        # Processes run the candidates side by side: one thread each.
        step = clone(step)
        names = [key for key in step.get_params(deep=True) if key == "n_jobs" or key.endswith("__n_jobs")]
        return step.set_params(**dict.fromkeys(names, 1)) if names else step

    def walk(self, node, test, train, steps, share):
        families = _families(node)
        for key, child in node.children.items():
            start = time.perf_counter()
            step = self._ready(child.step)
            out_test, out_train = self.apply(child, step, test, train, families.get(key))
            child_share = share + (time.perf_counter() - start) / max(child.n_leaves, 1)
            path = [*steps, (child.name, child.step)]
            for index in child.leaves:
                self.score(index, path, out_test, child_share)
            if child.children:
                self.walk(child, out_test, out_train, path, child_share)

    def apply(self, node, step, test, train, family):
        if _is_off(step):
            return test, train
        if not learns(step):
            out = [self.unit(node.name, step, unit, value, family) for unit, value in zip(self.units, test)]
            return out, _Lazy(lambda: self.transform_all(node.name, step, train.get()))
        values = train.get()
        broken = _failed(values) if self.task.is_list else (values if isinstance(values, _Failed) else None)
        if broken is not None:
            return [broken] * len(test), _Lazy(lambda: broken)
        fitted = clone(step)
        try:
            if node.learns_below:
                fitted_train = fitted.fit_transform(values, self.y_train)
            else:
                fitted.fit(values, self.y_train)
                fitted_train = None
        except Exception as error:
            if self.task.error_score == "raise":
                raise
            failed = _Failed(node.name, error)
            self.failures.append((None, node.name, step, error))
            return [failed] * len(test), _Lazy(lambda: failed)
        out = [self.unit(node.name, fitted, unit, value, None) for unit, value in zip(self.units, test)]
        return out, _Lazy(lambda: fitted_train)

    def transform_all(self, name, step, values):
        if isinstance(values, _Failed):
            return values
        if not self.task.is_list:
            return self.unit(name, step, "train", values, None)
        return [self.unit(name, step, "train", value, None) for value in values]

    def unit(self, name, step, unit, value, family):
        if isinstance(value, _Failed):
            return value
        crop = int(unit) if self.task.is_list and unit != "train" else None
        # Warnings are kept with the crop they came from, for the summary.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out = family.output(step, unit, value) if family is not None else step.transform(value)
            except Exception as error:
                if self.task.error_score == "raise":
                    raise
                self.failures.append((crop, name, step, error))
                out = _Failed(name, error)
        self.caught.extend((w.category, str(w.message), crop) for w in caught)
        return out

    def score(self, index, path, test, fit_time):
        self.fit_times[index] = fit_time
        if _failed(test) is not None:
            self.scores[index] = self.task.error_score
            self.score_times[index] = 0.0
            self.failed_fits.append(index)
            return
        output = test if self.task.is_list else test[0]
        scored = _Scored(path, self.X_test, output, self.fit_pipeline)
        start = time.perf_counter()
        try:
            value = self.task.scorer(scored, self.X_test, self.y_test)
            if not isinstance(value, (Real, np.number)) or isinstance(value, bool):
                raise ValueError(f"scoring must return a number, got {value!r} ({type(value).__name__}).")
            value = float(value)
        except Exception as error:
            if self.task.error_score == "raise":
                raise
            self.failures.append((None, "scoring", self.task.scorer, error))
            self.failed_fits.append(index)
            value = self.task.error_score
        self.score_times[index] = time.perf_counter() - start
        self.scores[index] = value

    def fit_pipeline(self, pipeline):
        task = self.task
        if not len(task.train):
            # Nothing in this pipeline learns (the task holds no training
            # crops): fitting only validates, on any crops.
            return pipeline.fit(self.X_test, self.y_test)
        return pipeline.fit(_take(task.X, task.train, task.is_list), self.y_train)


class _Lazy:
    """A value computed on first use (the training crops' outputs, needed only by learning steps)."""

    def __init__(self, compute):
        self._compute = compute
        self._done = False
        self._value = None

    def get(self):
        if not self._done:
            self._value, self._done = self._compute(), True
        return self._value


def _run_task(task):
    """Run one task, collecting its warnings instead of showing them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = _TaskRun(task).run()
    return {
        "fold": task.fold,
        "scores": run.scores,
        "fit_times": run.fit_times,
        "score_times": run.score_times,
        "failed_fits": run.failed_fits,
        "failures": [failure(crop, name, step, error) for crop, name, step, error in run.failures],
        "warnings": run.caught + [(w.category, str(w.message), None) for w in caught],
    }


def _shared_outputs(steps, value, index):
    """Outputs of the shared leading `steps` on one crop, or a _Failed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        failure = None
        for name, step in steps:
            if _is_off(step):
                continue
            try:
                value = step.transform(value)
            except Exception as error:
                value, failure = _Failed(name, error), failure(index, name, step, error)
                break
    return value, failure, [(w.category, str(w.message), index) for w in caught]


# ---------------------------------------------------------------------------
# the search
# ---------------------------------------------------------------------------


class SharedGridSearchCV(GridSearchCV):
    """Exhaustive search over a pipeline's settings, sharing work between candidates.

    The same search as :class:`~sklearn.model_selection.GridSearchCV` (same
    candidates, folds, scores and attributes), computed faster: every step
    runs once per fold for each distinct setting of the steps up to it, and
    steps that learn nothing run crop by crop (see the module's notes).
    Errors and warnings raised while searching are summarised once, with the
    crops they came from.

    Parameters
    ----------
    estimator : sklearn.pipeline.Pipeline
        The pipeline; its steps that learn nothing must transform each crop
        on its own.
    param_grid : dict or list of dict
        As for :class:`~sklearn.model_selection.GridSearchCV`.
    scoring : callable
        ``scorer(estimator, X, y) -> float``, greater is better.
    n_jobs : int, default=None
        Processes running tasks (a setting of the leading steps on a fold) in
        parallel; None means 1.
    refit : bool, default=True
        Refit the best candidate on all of `X` as ``best_estimator_``.
    cv : int, cross-validation generator or iterable, default=None
        As for :class:`~sklearn.model_selection.GridSearchCV`.
    verbose : int, default=0
        Verbosity of the parallel runs.
    error_score : "raise" or float, default=np.nan
        Score of a candidate on a fold where a step failed; "raise" raises.
    shared_steps : int, default=0
        Leading steps computed once per crop, before the tasks, for all folds
        (when `X` is a list and these steps learn nothing): for costly
        preprocessing shared by many settings of the next steps.
    task_steps : int, default=1
        Leading steps whose settings (with a fold) make one task; more tasks
        spread better over `n_jobs` processes, fewer share more.

    Notes
    -----
    The fitted attributes are those of
    :class:`~sklearn.model_selection.GridSearchCV` (``cv_results_``,
    ``best_index_``, ``best_params_``, ``best_score_``, ``best_estimator_``,
    ``refit_time_``, ``scorer_``, ``n_splits_``); the fit and score times in
    ``cv_results_`` are each candidate's share of the shared work.

    Two differences, both from not running steps that learn nothing on the
    training crops: a crop on which such a step fails spoils only the fold
    that scores it (a GridSearchCV, which transforms the training crops too,
    fails every fold; the candidate's mean is nan either way), and
    ``best_estimator_`` is fitted only up to its last step that learns (see
    :func:`fit_learning_steps`).
    """

    def __init__(
        self,
        estimator,
        param_grid,
        *,
        scoring=None,
        n_jobs=None,
        refit=True,
        cv=None,
        verbose=0,
        error_score=np.nan,
        shared_steps=0,
        task_steps=1,
    ):
        super().__init__(
            estimator, param_grid, scoring=scoring, n_jobs=n_jobs, refit=refit, cv=cv, verbose=verbose,
            error_score=error_score,
        )
        self.shared_steps = shared_steps
        self.task_steps = task_steps

    def fit(self, X, y=None, *, groups=None):
        """Run the search over crops `X` annotated by `y`.

        Parameters
        ----------
        X : list of arrays or array
            Crops (one sample each), or one volume whose first axis holds the
            samples.
        y : list of arrays or array
            One annotation per crop, or the volume's.
        groups : array-like, optional
            Group of each sample, for splitters that need them.

        Returns
        -------
        self : SharedGridSearchCV
        """
        return self._search(X, y, groups, stacklevel=3)

    def _search(self, X, y, groups, stacklevel):
        """The search; warnings point `stacklevel` frames up (at the caller's line)."""
        from ._volume import is_volume_list

        if not isinstance(self.estimator, Pipeline):
            raise TypeError(f"estimator must be a Pipeline; got {type(self.estimator).__name__}.")
        if not callable(self.scoring):
            raise TypeError(f"scoring must be a callable scorer(estimator, X, y); got {self.scoring!r}.")
        if not (self.error_score == "raise" or isinstance(self.error_score, Real)):
            raise ValueError(f"error_score must be 'raise' or a number; got {self.error_score!r}.")
        is_list = is_volume_list(X)
        n_samples = len(X) if is_list else np.shape(X)[0]
        cv = check_cv(self.cv)
        folds = list(cv.split(np.arange(n_samples), None, groups))
        candidates = list(ParameterGrid(self.param_grid))
        if not candidates:
            raise ValueError("param_grid holds no candidate.")
        paths = [_configure(self.estimator, params) for params in candidates]
        n_steps = len(paths[0])
        shared = min(self.shared_steps, n_steps) if is_list else 0
        if any(learns(step) for path in paths for _, _, step in path[:shared]):
            shared = 0
        depth = max(shared, min(self.task_steps, n_steps))

        parallel = Parallel(n_jobs=self.n_jobs, verbose=self.verbose)
        single_thread = parallel.n_jobs not in (None, 1)
        crops = dict(enumerate(X)) if is_list else X
        targets = dict(enumerate(y)) if is_list else y

        # The shared leading steps, once per crop and setting.
        prefixes = {}
        for path in paths:
            prefixes.setdefault(tuple(key for _, key, _ in path[:shared]), [(n, s) for n, _, s in path[:shared]])
        inputs, failures, caught = {}, [], []
        work = [
            (prefix, index) for prefix, steps in prefixes.items() if any(not _is_off(s) for _, s in steps)
            for index in range(n_samples)
        ]
        done = parallel(delayed(_shared_outputs)(prefixes[prefix], crops[index], index) for prefix, index in work)
        for (prefix, index), (value, failure, records) in zip(work, done):
            inputs.setdefault(prefix, dict(crops))[index] = value
            failures.extend([failure] if failure else [])
            caught.extend(records)

        # Tasks: a setting of the leading `depth` steps, on one fold.
        groups_of = defaultdict(list)
        for index, path in enumerate(paths):
            # Mixture settings that share a fit go to the same task.
            groups_of[tuple(_task_key(key, step) for _, key, step in path[:depth])].append(index)
        tasks = []
        for group in groups_of.values():
            tree = _Node()
            for index in group:
                tree.add(index, paths[index][shared:])
            tree.finish()
            prefix = tuple(key for _, key, _ in paths[group[0]][:shared])
            data = inputs.get(prefix, crops)
            for fold, (train, test) in enumerate(folds):
                need = list(test) + (list(train) if tree.learns_below else [])
                subset = (lambda d: {i: d[i] for i in need}) if is_list else (lambda d: d)
                tasks.append(
                    _Task(tree, fold, test, train if tree.learns_below else [], subset(crops), subset(targets),
                          subset(data), is_list, self.scoring, self.error_score, single_thread)
                )
        # Tasks that train a model first: they are the longest.
        tasks.sort(key=lambda task: not task.tree.learns_below)
        results = parallel(delayed(_run_task)(task) for task in tasks)

        n_splits = len(folds)
        scores = np.full((len(candidates), n_splits), np.nan)
        fit_times, score_times = np.zeros_like(scores), np.zeros_like(scores)
        n_failed = 0
        for result in results:
            fold = result["fold"]
            for index, value in result["scores"].items():
                scores[index, fold] = value
                fit_times[index, fold] = result["fit_times"][index]
                score_times[index, fold] = result["score_times"][index]
            n_failed += len(result["failed_fits"])
            failures.extend(result["failures"])
            caught.extend(result["warnings"])
        n_fits = scores.size
        warn_collected(caught, stacklevel + 1)
        summary = failure_summary(failures, n_failed, n_fits, is_list)
        if n_failed == n_fits:
            raise ValueError(f"All the {n_fits} fits failed. {summary}")
        if n_failed:
            warnings.warn(summary, FitFailedWarning, stacklevel=stacklevel)

        self.cv_results_ = results_table(candidates, scores, fit_times, score_times)
        self.n_splits_ = n_splits
        self.scorer_ = self.scoring
        self.multimetric_ = False
        self.best_index_ = int(np.argmin(self.cv_results_["rank_test_score"]))
        self.best_score_ = float(self.cv_results_["mean_test_score"][self.best_index_])
        self.best_params_ = candidates[self.best_index_]
        if self.refit:
            self.best_estimator_ = clone(self.estimator).set_params(**clone(self.best_params_, safe=False))
            start = time.perf_counter()
            fit_learning_steps(self.best_estimator_, X, y)
            self.refit_time_ = time.perf_counter() - start
        return self


def fit_learning_steps(pipeline, X, y):
    """Fit `pipeline` as ``Pipeline.fit`` does, up to its last step that learns.

    The later steps learn nothing (their `fit` only validates), so the
    training crops are not transformed through them: for a classifier, that
    spares classifying every training crop. The pipeline's `transform` is the
    same as after ``Pipeline.fit``.
    """
    steps = [(name, step) for name, step in pipeline.steps if not _is_off(step)]
    last = max((i for i, (_, step) in enumerate(steps) if learns(step)), default=-1)
    data = X
    for i, (_, step) in enumerate(steps[: last + 1]):
        if i == last:
            step.fit(data, y)
        else:
            data = step.fit_transform(data, y)
    return pipeline
