"""Estimator trees as JSON values plus named arrays, and back.

:class:`Encoder` turns an estimator (a pipeline, its steps, the classifier
inside a :class:`~nanoseg.NanoparticleClassifier`...) into a tree of JSON
values and a dict of the NumPy values it refers to; :class:`Decoder`
rebuilds the estimator from them. Each estimator is a JSON object
``{"class": name, "params": {...}, "fitted": {...}}``, where `name` is the
class's registered name; which fitted attributes are stored, and how they are
checked, is up to :mod:`nanoseg._schemas`.

The values an estimator may hold are None, booleans, integers, strings,
floats (NaN and infinities as ``{"float": "nan"}``), lists, tuples
(``{"tuple": [...]}``), dicts with string keys (``{"dict": {...}}``),
NumPy arrays and scalars of booleans or numbers (``{"ndarray": entry,
"dtype": ..., "shape": ...}``, or ``"scalar"``; the array itself is an
archive entry), and registered estimators (``{"estimator": {...}}``). Types
are checked exactly, so every value comes back as the type it was saved as;
anything else is refused at save time with an error that names it.

Decoding rebuilds every estimator through its constructor, then runs the
class's own parameter validation, before setting its fitted attributes.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.base import BaseEstimator

from . import _schemas
from ._safe_format import ARRAY_KINDS

__all__ = ["Decoder", "Encoder"]


class Encoder:
    """Encode an estimator tree as JSON values plus named arrays.

    Parameters
    ----------
    name_of : callable
        ``name_of(cls, where)`` returns the registered name of a class, or
        raises the error for a class model files cannot hold.

    Attributes
    ----------
    arrays : dict of str to ndarray
        The NumPy values met so far, by the entry names the JSON values use,
        in the order they were met.
    """

    def __init__(self, name_of):
        self.name_of = name_of
        self.arrays = {}

    def estimator(self, estimator, where):
        """The JSON object of one estimator; `where` names it in errors."""
        name = self.name_of(type(estimator), where)
        params = estimator.get_params(deep=False)
        state = _schemas.stored_state(name, estimator, where)
        # Parameters before fitted attributes: array entries are written in
        # the order they are met, so this order is part of the file's bytes.
        encoded_params = {key: self.value(value, f"{where}.{key}") for key, value in params.items()}
        encoded_state = {key: self.value(value, f"{where}.{key}", fitted=True) for key, value in state.items()}
        return {"class": name, "params": encoded_params, "fitted": encoded_state}

    def value(self, value, where, fitted=False):
        """The JSON value of a parameter or fitted value."""
        # Exact type checks: a subclass of int or str (an enum, say) would
        # not come back as itself.
        kind = type(value)
        if value is None or kind in (bool, int, str):
            return value
        if kind is float:
            return value if math.isfinite(value) else {"float": repr(value)}
        if isinstance(value, (np.ndarray, np.generic)):
            return self.array(value, where)
        if kind is tuple:
            return {"tuple": [self.value(v, f"{where}[{i}]", fitted) for i, v in enumerate(value)]}
        if kind is list:
            return [self.value(v, f"{where}[{i}]", fitted) for i, v in enumerate(value)]
        if kind is dict and all(type(key) is str for key in value):
            return {"dict": {key: self.value(v, f"{where}[{key!r}]", fitted) for key, v in value.items()}}
        if isinstance(value, BaseEstimator):
            return {"estimator": self.estimator(value, where)}
        what = "fitted attribute" if fitted else "parameter"
        raise TypeError(
            f"The {what} {where} is a {kind.__module__}.{kind.__qualname__}, which cannot be "
            "stored safely in a nanoseg model file. Model files hold None, booleans, numbers, "
            "strings, lists, tuples, dicts with string keys, NumPy arrays and scalars of "
            "booleans or numbers, and registered estimators."
        )

    def array(self, value, where):
        """Keep a NumPy value as the array entry named `where`; return its JSON reference."""
        array = np.asarray(value)
        if array.dtype.kind not in ARRAY_KINDS or array.dtype.hasobject:
            raise TypeError(
                f"{where} is a NumPy value of dtype {array.dtype}; nanoseg model files hold only "
                "boolean and numeric arrays (never Python objects)."
            )
        self.arrays[where] = array
        tag = "scalar" if isinstance(value, np.generic) else "ndarray"
        return {tag: where, "dtype": array.dtype.str, "shape": list(array.shape)}


class Decoder:
    """Rebuild an estimator tree from decoded JSON values and the archive's arrays.

    Parameters
    ----------
    entries : nanoseg._safe_format.ArrayEntries
        The array entries of the open archive; its ``damaged`` method gives
        the error for a damaged file.
    resolve : callable
        ``resolve(name, where)`` returns the class registered under `name`,
        or raises the error for a name that is not loadable.
    """

    def __init__(self, entries, resolve):
        self.entries = entries
        self.resolve = resolve
        self.damaged = entries.damaged

    def estimator(self, node, where):
        """The estimator a JSON object describes; `where` names it in errors."""
        if not isinstance(node, dict) or set(node) != {"class", "params", "fitted"}:
            raise self.damaged(where, "an estimator entry needs exactly 'class', 'params' and 'fitted'")
        name = node["class"]
        cls = self.resolve(name, where)
        params, fitted = node["params"], node["fitted"]
        if not isinstance(params, dict) or not isinstance(fitted, dict):
            raise self.damaged(where, "'params' and 'fitted' must be JSON objects")

        accepted = cls._get_param_names()
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise ValueError(
                f"The model file gives {name} (at {where}) the parameter(s) {unknown}, which this "
                f"version of {name} does not have (it has {accepted}). The file was probably "
                "written by another nanoseg version; refit the model with this one."
            )
        values = {key: self.value(value, f"{where}.{key}") for key, value in params.items()}
        estimator = _build(cls, values, name, where)

        state = {}
        for key, value in fitted.items():
            if not _schemas.possible_fitted_attribute(cls, key, accepted):
                raise self.damaged(where, f"{key!r} is not a possible fitted attribute of {name}")
            state[key] = self.value(value, f"{where}.{key}")
        for key, value in _schemas.restore_state(name, estimator, state, where, self.damaged).items():
            setattr(estimator, key, value)
        return estimator

    def value(self, node, where):
        """The Python value of a decoded JSON value."""
        if node is None or type(node) in (bool, int, float, str):
            return node
        if isinstance(node, list):
            return [self.value(v, f"{where}[{i}]") for i, v in enumerate(node)]
        if not isinstance(node, dict):
            raise self.damaged(where, f"unexpected JSON value {node!r}")
        if "ndarray" in node or "scalar" in node:
            return self.entries.read(node, where)
        if len(node) != 1:
            raise self.damaged(where, f"unexpected JSON object with keys {sorted(node)}")
        (tag, content), = node.items()
        if tag == "tuple" and isinstance(content, list):
            return tuple(self.value(v, f"{where}[{i}]") for i, v in enumerate(content))
        if tag == "dict" and isinstance(content, dict):
            return {key: self.value(v, f"{where}[{key!r}]") for key, v in content.items()}
        if tag == "float" and content in ("nan", "inf", "-inf"):
            return float(content)
        if tag == "estimator":
            return self.estimator(content, where)
        raise self.damaged(where, f"unexpected JSON object {tag!r}")


def _build(cls, params, name, where):
    """Construct `cls` with `params` and run the class's own parameter validation."""
    try:
        estimator = cls(**params)
        # The declared constraints first, then any checks of the class's own:
        # a class's _check_params need not repeat the constraints.
        if hasattr(estimator, "_parameter_constraints"):
            estimator._validate_params()
        check = getattr(estimator, "_check_params", None)
        if callable(check):
            check()
        validate_steps = getattr(estimator, "_validate_steps", None)
        if callable(validate_steps):
            validate_steps()
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"The parameters the model file gives {name} (at {where}) are not valid: {err}"
        ) from err
    return estimator
