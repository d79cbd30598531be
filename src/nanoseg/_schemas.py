"""What a nanoseg model file stores for each estimator class it may name.

:data:`SCHEMAS` has one entry per class, under the stable name written in
the files: the class's import path and, where it is checked here, the fitted
attributes a file must hold for a fitted instance, with their dtype kinds and
shapes. :mod:`nanoseg.persistence` builds its registry of the classes a file
may name from it.

For every estimator a file stores

* its parameters, ``get_params(deep=False)``, which loading passes through
  the class's constructor and parameter validation;
* its fitted state (:func:`stored_state`): the public instance attributes
  whose names end in an underscore or, for the scikit-learn classifiers of
  :mod:`nanoseg._sklearn_arrays`, their fitted state as plain arrays.

On load, :func:`restore_state` checks the fitted values against the schema
-- all of the listed attributes or none (an unfitted estimator), each of the
listed kind and shape -- and rebuilds the scikit-learn classifiers, which
check their own arrays.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np
from sklearn.base import ClassifierMixin

from . import _sklearn_arrays

__all__ = [
    "MIXTURE_FITTED_ATTRIBUTES",
    "SCHEMAS",
    "Schema",
    "possible_fitted_attribute",
    "restore_state",
    "stored_state",
]

# Kinds of fitted values: numpy dtype kinds, and the shape (() for a scalar).
_HISTOGRAM = ("iu", (256,))
_PMF = ("f", (256,))
_INTEGER = ("iu", ())
_REAL = ("f", ())
_FLAG = ("b", ())
_INTEGERS = ("iu", (None,))  # None: a dimension of any length
_OPTIONAL_REAL = ("f?", ())  # "?": None is allowed too
_NAMES = ("str", (None,))  # a list of str
_CLASSIFIER = ("classifier", ())  # a fitted classifier of the registry

#: The fitted attributes of a :class:`~nanoseg.NanoparticleMixture`, with
#: their dtype kinds and shapes, as model files hold and check them. The
#: mixture also stores ``binning_mode_``, a string it checks itself when the
#: model is used (and whose absence it reads as the 8-bit identity binning).
MIXTURE_FITTED_ATTRIBUTES = {
    "stack_histogram_": _HISTOGRAM,
    "background_histogram_": _HISTOGRAM,
    "stack_pmf_": _PMF,
    "background_pmf_": _PMF,
    "particle_pmf_": _PMF,
    "low_intensity_": _INTEGER,
    "high_intensity_": _INTEGER,
    "background_weight_": _REAL,
    "neg_log_likelihood_": _REAL,
    "n_iter_": _INTEGER,
    "converged_": _FLAG,
    "n_slices_fit_": _INTEGER,
    "binning_low_": _INTEGER,
    "binning_high_": _INTEGER,
    "binning_shift_": _INTEGER,
}


class Schema(NamedTuple):
    """How model files store one estimator class.

    Attributes
    ----------
    target : str
        The class as ``"module:QualifiedName"``. It is imported only when a
        file names the class, so an entry may point at a module that is
        optional.
    fitted : dict or None
        The fitted attributes a file must hold for a fitted instance, as
        ``name: (dtype kinds, shape)``; None when they are not checked here.
    """

    target: str
    fitted: dict | None = None


#: Every class a model file may name, by the stable name written in files
#: (keep the name when a class moves, so that older files still load). To
#: make a new estimator savable, add its entry here; its parameters and
#: fitted attributes must be values the format can hold (see
#: ``nanoseg._codec.Encoder.value``).
SCHEMAS = {
    "NanoparticleMixture": Schema("nanoseg.mixture:NanoparticleMixture", MIXTURE_FITTED_ATTRIBUTES),
    "NanoparticleLabeler": Schema("nanoseg.labeler:NanoparticleLabeler"),
    "GlobalThreshold": Schema(
        "nanoseg.baselines:GlobalThreshold",
        {"threshold_": _INTEGER, "histogram_": _HISTOGRAM},
    ),
    "PosteriorSmoother": Schema("nanoseg.preprocessing:PosteriorSmoother"),
    "BackgroundSubtractor": Schema("nanoseg.preprocessing:BackgroundSubtractor"),
    "SliceEqualizer": Schema("nanoseg.preprocessing:SliceEqualizer"),
    "ParticleSplitter": Schema("nanoseg.splitting:ParticleSplitter"),
    "PerVolume": Schema("nanoseg.tuning:PerVolume"),
    "PrefitMixture": Schema("nanoseg.tuning:PrefitMixture"),
    "Pipeline": Schema("sklearn.pipeline:Pipeline"),
    "FrozenEstimator": Schema("sklearn.frozen:FrozenEstimator"),
    "NanoparticleClassifier": Schema(
        "nanoseg.classifier:NanoparticleClassifier",
        {
            "estimator_": _CLASSIFIER,
            "classes_": _INTEGERS,
            "feature_names_": _NAMES,
            "n_features_": _INTEGER,
            "n_dims_": _INTEGER,
            "particle_sign_": _INTEGER,
            "gate_level_": _OPTIONAL_REAL,
            "gate_recall_": _REAL,
            "gate_fraction_": _REAL,
            "n_samples_per_class_": _INTEGERS,
        },
    ),
    # scikit-learn classifiers, for NanoparticleClassifier: _sklearn_arrays
    # converts their fitted state to plain arrays (never pickled) and checks
    # it when rebuilding them.
    **{name: Schema(target) for name, target in _sklearn_arrays.CLASSES.items()},
}

# Names a fitted attribute may have in a file.
_ATTRIBUTE = re.compile(r"[A-Za-z][A-Za-z0-9_]*_")


def stored_state(name, estimator, where):
    """The fitted state a model file stores for `estimator`.

    Parameters
    ----------
    name : str
        The estimator's registered name.
    estimator : estimator
        The estimator, fitted or not.
    where : str
        Its place in the saved estimator, for errors.

    Returns
    -------
    state : dict
        Values by attribute name; empty for an unfitted estimator.
    """
    if name in _sklearn_arrays.CLASSES:
        return _sklearn_arrays.to_plain(name, estimator, where)
    # Public instance attributes ending in an underscore; private ones (such
    # as cached copies on a GPU) are left out.
    return {
        key: value
        for key, value in vars(estimator).items()
        if key.endswith("_") and not key.startswith("_")
    }


def possible_fitted_attribute(cls, key, parameters):
    """Whether a file may set `key` as a fitted attribute of `cls`.

    Parameters
    ----------
    cls : type
        The estimator class.
    key : str
        The name the file gives.
    parameters : list of str
        The class's parameter names.

    Returns
    -------
    possible : bool
        False for names that are not fitted-attribute names (a trailing
        underscore, no leading one), parameters, and class attributes
        (methods included).
    """
    return _ATTRIBUTE.fullmatch(key) is not None and key not in parameters and not hasattr(cls, key)


def restore_state(name, estimator, state, where, damaged):
    """Check the fitted state a file holds and return the attributes to set.

    Parameters
    ----------
    name : str
        The estimator's registered name.
    estimator : estimator
        The unfitted estimator, built from the file's parameters.
    state : dict
        The decoded fitted values, by attribute name.
    where : str
        Its place in the loaded estimator, for errors.
    damaged : callable
        ``damaged(where, problem)`` returns the error for a damaged file.

    Returns
    -------
    attributes : dict
        The attributes to set on `estimator`.
    """
    _check_fitted(name, state, where, damaged)
    if name in _sklearn_arrays.CLASSES:
        return _sklearn_arrays.from_plain(name, estimator, state, lambda key, problem: damaged(f"{where}.{key}", problem))
    return state


def _check_fitted(name, state, where, damaged):
    schema = SCHEMAS.get(name)
    expected = schema.fitted if schema is not None else None
    if not expected or not state:
        return
    missing = sorted(set(expected) - set(state))
    if missing:
        raise damaged(where, f"the fitted {name} lacks the attribute(s) {missing}")
    for key, (kinds, shape) in expected.items():
        value = state[key]
        if not _fits(value, kinds, shape):
            described = (
                f"an array of shape {value.shape} and dtype {value.dtype}"
                if isinstance(value, np.ndarray)
                else f"{type(value).__name__} {value!r}"
            )
            raise damaged(f"{where}.{key}", f"expected {_wanted(kinds, shape)}, found {described}")


def _fits(value, kinds, shape):
    """Whether a fitted value matches its schema entry."""
    if kinds == "classifier":
        return isinstance(value, ClassifierMixin)
    if kinds == "str":
        return type(value) is list and all(type(item) is str for item in value)
    if value is None:
        return "?" in kinds
    if shape == ():
        ok = type(value) in (bool, int, float) or isinstance(value, np.generic)
    else:
        ok = (
            isinstance(value, np.ndarray)
            and value.ndim == len(shape)
            and all(size in (None, length) for size, length in zip(shape, value.shape))
        )
    return ok and np.asarray(value).dtype.kind in kinds.replace("?", "")


def _wanted(kinds, shape):
    if kinds == "classifier":
        return "a fitted classifier"
    if kinds == "str":
        return "a list of strings"
    what = "a scalar" if shape == () else f"an array of shape {tuple('any' if s is None else s for s in shape)}"
    optional = " (or None)" if "?" in kinds else ""
    return f"{what} of dtype kind {' or '.join(kinds.replace('?', ''))}{optional}"
