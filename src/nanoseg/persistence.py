"""Save and load nanoseg models in a file format that cannot run code.

A pickle (or joblib) file is a program: loading one runs whatever its author
put in it. Fitted nanoseg models are shared between people and machines, so
:func:`save` writes them in a format that holds only data, and :func:`load`
reads it without ever unpickling:

* the file is a zip archive (the ``.npz`` layout of :func:`numpy.savez`);
* its entry ``nanoseg_model.json`` is a JSON document naming the format and
  its version, the nanoseg version that wrote it, and a tree of estimators:
  for each one, its class (by a stable name from a fixed registry), its
  parameters as returned by ``get_params(deep=False)``, and its fitted
  attributes;
* every NumPy value (fitted arrays, NumPy scalars) is an ``.npy`` entry of
  its own, written and read with ``allow_pickle=False``; the JSON document
  names each entry with its dtype and shape;
* the scikit-learn classifier of a :class:`~nanoseg.NanoparticleClassifier`
  (decision trees, random forests, extra trees, histogram gradient boosting,
  logistic regression) is stored the same way: its trees as columns of node
  arrays, its coefficients as arrays. They are rebuilt without unpickling,
  after checks that every tree is a tree and every index in range. Other
  classifiers are refused at save time.

:func:`load` opens the archive with ``numpy.load(..., allow_pickle=False)``
and parses the document with :func:`json.loads`. The classes a file may name
are those of the registry -- the file can only choose among them, never name
a module to import -- and every estimator is rebuilt through its constructor,
so its parameters go through the same validation as in ``fit``.

Version policy
--------------
``FORMAT_VERSION`` changes only when the layout of the file changes; a file
with a newer format version than this nanoseg reads is refused with an error
that says to upgrade. A model written by another nanoseg version loads with a
:class:`ModelVersionWarning` naming both versions: its parameters and arrays
are still validated, but the results of the loaded model may differ from
those of the model that was saved, so check them, or refit.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import uuid
import warnings
import zipfile
import zlib
from importlib import import_module
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from . import _sklearn_arrays

__all__ = ["FORMAT_VERSION", "ModelVersionWarning", "load", "register_estimator", "save"]

#: Name written in every model file, so that other JSON-in-zip files are told apart.
FORMAT_NAME = "nanoseg-model"

#: Version of the file layout that :func:`save` writes and the newest :func:`load` reads.
FORMAT_VERSION = 1

#: Archive entry that holds the JSON document.
DOCUMENT_ENTRY = "nanoseg_model.json"

# Classes a model file may name, keyed by the stable name written in the file.
# Values are "module:qualified.name" strings, imported only when a file names
# the class: entries may point at modules that are optional or not written yet.
# To make a new estimator savable, add one line here (or call
# register_estimator); its parameters and fitted attributes must be values
# the format can hold (see _Writer.value).
_REGISTRY = {
    "NanoparticleMixture": "nanoseg.mixture:NanoparticleMixture",
    "NanoparticleLabeler": "nanoseg.labeler:NanoparticleLabeler",
    "GlobalThreshold": "nanoseg.baselines:GlobalThreshold",
    "PosteriorSmoother": "nanoseg.preprocessing:PosteriorSmoother",
    "BackgroundSubtractor": "nanoseg.preprocessing:BackgroundSubtractor",
    "SliceEqualizer": "nanoseg.preprocessing:SliceEqualizer",
    "ParticleSplitter": "nanoseg.splitting:ParticleSplitter",
    "PerVolume": "nanoseg.tuning:PerVolume",
    "PrefitMixture": "nanoseg.tuning:PrefitMixture",
    "Pipeline": "sklearn.pipeline:Pipeline",
    "FrozenEstimator": "sklearn.frozen:FrozenEstimator",
    "NanoparticleClassifier": "nanoseg.classifier:NanoparticleClassifier",
    # scikit-learn classifiers, for NanoparticleClassifier: their fitted
    # state is converted to plain arrays by _sklearn_arrays, never pickled.
    **_sklearn_arrays.CLASSES,
}

# Expected fitted attributes of some registered classes: numpy dtype kinds
# and shape (() for a scalar). A file must hold all of them or none (an
# unfitted estimator), with these kinds and shapes.
_HISTOGRAM = ("iu", (256,))
_PMF = ("f", (256,))
_INTEGER = ("iu", ())
_REAL = ("f", ())
_FLAG = ("b", ())
_INTEGERS = ("iu", (None,))  # None: a dimension of any length
_OPTIONAL_REAL = ("f?", ())  # "?": None is allowed too
_NAMES = ("str", (None,))  # a list of str
_CLASSIFIER = ("classifier", ())  # a fitted classifier of the registry
_FITTED_ATTRIBUTES = {
    "NanoparticleMixture": {
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
        # The map from intensities to bins (binning_mode_, a string, is
        # checked by the mixture when the model is used).
        "binning_low_": _INTEGER,
        "binning_high_": _INTEGER,
        "binning_shift_": _INTEGER,
    },
    "GlobalThreshold": {"threshold_": _INTEGER, "histogram_": _HISTOGRAM},
    "NanoparticleClassifier": {
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
}

# dtype kinds an array may have: booleans and numbers. Object, string, void
# (structured) and datetime arrays are refused.
_ARRAY_KINDS = "biufc"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_ATTRIBUTE = re.compile(r"[A-Za-z][A-Za-z0-9_]*_")
# Zip entries get a fixed timestamp so that saving the same model twice
# writes the same bytes.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


class ModelVersionWarning(UserWarning):
    """Warning that a model file was written by another nanoseg version.

    The model is loaded, but it may not give the results it gave when it was
    saved; check them, or refit the model with this version.

    Parameters
    ----------
    saved_version : str
        nanoseg version that wrote the file.
    current_version : str
        nanoseg version loading it.
    """

    def __init__(self, saved_version, current_version):
        self.saved_version = saved_version
        self.current_version = current_version
        super().__init__(
            f"This model was saved with nanoseg {saved_version} and is loaded with nanoseg "
            f"{current_version}. Its parameters and arrays are valid for this version, but "
            "its results may differ from those of the saved model: check them, or refit "
            f"the model with nanoseg {current_version} and save it again."
        )


def _nanoseg_version():
    # Read at call time, so that tests can stand in another version.
    from . import _version

    return _version.__version__


def register_estimator(name, target):
    """Allow an estimator class in model files.

    Parameters
    ----------
    name : str
        Stable name written in the files for this class. Keep it when the
        class moves to another module, so that older files still load.
    target : type or str
        The class (a subclass of :class:`sklearn.base.BaseEstimator`), or its
        import path as ``"module:QualifiedName"``, imported only when a file
        names it.

    Raises
    ------
    ValueError
        If `name` is not a dotted identifier, or is already registered for
        another class.

    Notes
    -----
    Loading a file rebuilds a registered class with the parameters the file
    holds (validated by the class) and sets its fitted attributes: register
    only classes whose constructor only stores its parameters, as scikit-learn
    requires.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"name must be a dotted identifier such as 'MyStep'; got {name!r}.")
    if isinstance(target, str):
        if target.count(":") != 1 or not all(_NAME.fullmatch(part) for part in target.split(":")):
            raise ValueError(f"target must be a class or a 'module:QualifiedName' string; got {target!r}.")
    elif not (isinstance(target, type) and issubclass(target, BaseEstimator)):
        raise ValueError(f"target must be a scikit-learn estimator class; got {target!r}.")
    current = _REGISTRY.get(name)
    if current is not None and current is not target and current != target:
        raise ValueError(f"{name!r} is already registered for {current!r}; choose another name.")
    _REGISTRY[name] = target


def _import_target(target):
    module_name, qualname = target.split(":")
    obj = import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _registered_name(cls, where):
    path = f"{cls.__module__}:{cls.__qualname__}"
    for name, target in _REGISTRY.items():
        if target is cls or target == path:
            return name
    # A class re-exported under another module path: compare the objects of
    # the entries whose module is already imported (importing others could
    # not give `cls`, which is already loaded).
    for name, target in _REGISTRY.items():
        if isinstance(target, str) and target.split(":")[0] in sys.modules:
            try:
                if _import_target(target) is cls:
                    return name
            except AttributeError:
                continue
    if issubclass(cls, ClassifierMixin):
        # A classifier, most likely NanoparticleClassifier(classifier=...).
        raise _sklearn_arrays.unsupported(cls, where)
    raise TypeError(
        f"{where} is a {cls.__module__}.{cls.__qualname__}, which nanoseg model files cannot "
        "hold: only nanoseg estimators and scikit-learn Pipelines of them can be saved. "
        "To save your own estimator class, register it first with "
        "nanoseg.persistence.register_estimator."
    )


def _resolve_class(name, where):
    target = _REGISTRY.get(name) if isinstance(name, str) else None
    if target is None:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(
            f"The model file names an unknown estimator class {name!r} at {where}; this nanoseg "
            f"can load {known}. If the class comes from a newer nanoseg, upgrade; if it is "
            "your own, register it with nanoseg.persistence.register_estimator before loading."
        )
    if isinstance(target, str):
        try:
            target = _import_target(target)
        except (ImportError, AttributeError) as err:
            raise ValueError(
                f"The model file needs the estimator class {name!r} ({_REGISTRY[name]}), which "
                f"this installation cannot import ({err}). Upgrade nanoseg or install the "
                "package that provides it."
            ) from err
    if not (isinstance(target, type) and issubclass(target, BaseEstimator)):
        raise ValueError(f"The registry entry {name!r} is not a scikit-learn estimator class: {target!r}.")
    return target


def _fitted_state(estimator):
    """Fitted attributes: public instance attributes ending in an underscore."""
    return {
        key: value
        for key, value in vars(estimator).items()
        if key.endswith("_") and not key.startswith("_")
    }


class _Writer:
    """Encode an estimator tree as a JSON-compatible document plus named arrays."""

    def __init__(self):
        self.arrays = {}

    def estimator(self, estimator, where):
        name = _registered_name(type(estimator), where)
        params = estimator.get_params(deep=False)
        if name in _sklearn_arrays.CLASSES:
            state = _sklearn_arrays.to_plain(name, estimator, where)
        else:
            state = _fitted_state(estimator)
        return {
            "class": name,
            "params": {key: self.value(value, f"{where}.{key}") for key, value in params.items()},
            "fitted": {key: self.value(value, f"{where}.{key}", fitted=True) for key, value in state.items()},
        }

    def value(self, value, where, fitted=False):
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
        array = np.asarray(value)
        if array.dtype.kind not in _ARRAY_KINDS or array.dtype.hasobject:
            raise TypeError(
                f"{where} is a NumPy value of dtype {array.dtype}; nanoseg model files hold only "
                "boolean and numeric arrays (never Python objects)."
            )
        self.arrays[where] = array
        tag = "scalar" if isinstance(value, np.generic) else "ndarray"
        return {tag: where, "dtype": array.dtype.str, "shape": list(array.shape)}


def _zip_info(name):
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def _write_member(archive, key, array):
    """Write one array as the ``.npy`` entry `key` of an open zip archive."""
    with archive.open(_zip_info(key + ".npy"), "w", force_zip64=array.nbytes > 2**30) as member:
        np.lib.format.write_array(member, array, allow_pickle=False)


def _write_archive(fileobj, document, arrays):
    with zipfile.ZipFile(fileobj, "w") as archive:
        archive.writestr(_zip_info(DOCUMENT_ENTRY), document.encode("utf-8"))
        for key, array in arrays.items():
            _write_member(archive, key, array)


def _publish(temporary, path, overwrite):
    """Move the finished temporary file to `path` in one step."""
    if overwrite:
        os.replace(temporary, path)
        return
    try:
        # A hard link fails if `path` exists, even when another process
        # creates it meanwhile; the temporary name is removed afterwards.
        os.link(temporary, path)
    except FileExistsError:
        raise _exists_error(path) from None
    except OSError:
        # File systems without hard links.
        if os.path.lexists(path):
            raise _exists_error(path) from None
        os.replace(temporary, path)
    else:
        os.unlink(temporary)


def _exists_error(path):
    return FileExistsError(f"{path} exists; pass overwrite=True to replace it, or choose another path.")


def save(estimator, path, *, overwrite=False):
    """Save an estimator (fitted or not) to a nanoseg model file.

    The file holds the estimator's parameters and fitted arrays, and no
    Python code: :func:`load` can read it safely, whoever wrote it.

    Parameters
    ----------
    estimator : estimator
        A :class:`~nanoseg.NanoparticleMixture`,
        :class:`~nanoseg.NanoparticleLabeler`,
        :class:`~nanoseg.baselines.GlobalThreshold`, another registered
        nanoseg estimator, or a :class:`sklearn.pipeline.Pipeline` of them.
    path : str or os.PathLike
        Where to write; ``.npz`` is the customary suffix (it is not added).
        The folder must exist.
    overwrite : bool, default=False
        Replace `path` if it exists.

    Raises
    ------
    FileExistsError
        If `path` exists and `overwrite` is False.
    TypeError
        If the estimator, one of its steps, or one of their parameters or
        fitted attributes cannot be stored (the message names it).

    See Also
    --------
    load : Read the file back.

    Notes
    -----
    The file is written under a temporary name in the same folder and moved
    to `path` only once complete, so an interrupted save never leaves a
    partial file at `path` (nor damages the file it was to replace).

    Fitted attributes are the public attributes whose names end in an
    underscore; private ones (a leading underscore, such as cached copies on
    a GPU) are not saved.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> import numpy as np
    >>> from nanoseg.baselines import GlobalThreshold
    >>> from nanoseg.persistence import load, save
    >>> image = np.full((4, 4), 10, dtype=np.uint8)
    >>> image[1:3, 1:3] = 200
    >>> model = GlobalThreshold(method="otsu").fit(image)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = pathlib.Path(folder) / "threshold.npz"
    ...     save(model, path)
    ...     restored = load(path)
    >>> restored
    GlobalThreshold()
    >>> restored.threshold_
    10
    """
    path = Path(os.fspath(path))
    if not overwrite and os.path.lexists(path):
        raise _exists_error(path)
    # Encode everything before touching the disk: an estimator that cannot
    # be stored fails here, leaving nothing behind.
    writer = _Writer()
    root = writer.estimator(estimator, "estimator")
    import sklearn

    document = json.dumps(
        {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "nanoseg_version": _nanoseg_version(),
            "sklearn_version": sklearn.__version__,
            "estimator": root,
        },
        indent=1,
        allow_nan=False,
    )
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    # os.open with O_EXCL and mode 0o666 gives the file the permissions a new
    # file normally gets (the umask applies), unlike tempfile's 0o600.
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as stream:
            _write_archive(stream, document, writer.arrays)
            stream.flush()
            os.fsync(stream.fileno())
        _publish(temporary, path, overwrite)
    finally:
        if os.path.lexists(temporary):
            os.unlink(temporary)


# -- loading ---------------------------------------------------------------


class _Reader:
    """Rebuild an estimator tree from a decoded document and an open archive."""

    def __init__(self, archive, source):
        self.archive = archive
        self.source = source
        self.used = set()

    def damaged(self, where, problem):
        return ValueError(
            f"The model file {self.source} is damaged or was edited: at {where}, {problem}. "
            "Save the model again from the original estimator."
        )

    def estimator(self, node, where):
        if not isinstance(node, dict) or set(node) != {"class", "params", "fitted"}:
            raise self.damaged(where, "an estimator entry needs exactly 'class', 'params' and 'fitted'")
        name = node["class"]
        cls = _resolve_class(name, where)
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
            if not _ATTRIBUTE.fullmatch(key) or key in accepted or hasattr(cls, key):
                raise self.damaged(where, f"{key!r} is not a possible fitted attribute of {name}")
            state[key] = self.value(value, f"{where}.{key}")
        self.check_fitted(name, state, where)
        if name in _sklearn_arrays.CLASSES:
            state = _sklearn_arrays.from_plain(
                name, estimator, state, lambda key, problem: self.damaged(f"{where}.{key}", problem)
            )
        for key, value in state.items():
            setattr(estimator, key, value)
        return estimator

    def check_fitted(self, name, state, where):
        expected = _FITTED_ATTRIBUTES.get(name)
        if not expected or not state:
            return
        missing = sorted(set(expected) - set(state))
        if missing:
            raise self.damaged(where, f"the fitted {name} lacks the attribute(s) {missing}")
        for key, (kinds, shape) in expected.items():
            value = state[key]
            if not _fits(value, kinds, shape):
                described = (
                    f"an array of shape {value.shape} and dtype {value.dtype}"
                    if isinstance(value, np.ndarray)
                    else f"{type(value).__name__} {value!r}"
                )
                raise self.damaged(f"{where}.{key}", f"expected {_wanted(kinds, shape)}, found {described}")

    def value(self, node, where):
        if node is None or type(node) in (bool, int, float, str):
            return node
        if isinstance(node, list):
            return [self.value(v, f"{where}[{i}]") for i, v in enumerate(node)]
        if not isinstance(node, dict):
            raise self.damaged(where, f"unexpected JSON value {node!r}")
        if "ndarray" in node or "scalar" in node:
            return self.array(node, where)
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

    def array(self, node, where):
        tag = "scalar" if "scalar" in node else "ndarray"
        key = node[tag]
        if set(node) != {tag, "dtype", "shape"} or not isinstance(key, str):
            raise self.damaged(where, "an array entry needs exactly its entry name, 'dtype' and 'shape'")
        if key not in self.archive.files or key == DOCUMENT_ENTRY or key in self.used:
            raise self.damaged(where, f"the array entry {key!r} is missing or used twice")
        self.used.add(key)
        # The .npy header first: dtype and shape are checked before any array
        # memory is allocated or any data read.
        try:
            shape, dtype, size = self.entry_header(key)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            raise self.damaged(where, f"the array entry {key!r} cannot be read ({err})") from err
        if dtype.hasobject:
            raise ValueError(
                f"Refusing to load {self.source}: its entry {key!r} holds pickled Python "
                "objects, which could run code when loaded. nanoseg model files never "
                "contain them; this file was not written by nanoseg.persistence.save, or "
                "was altered. Do not load it with pickle or joblib unless you trust its source."
            )
        if dtype.kind not in _ARRAY_KINDS:
            raise self.damaged(
                where, f"the array {key!r} has dtype {dtype}; only booleans and numbers are allowed"
            )
        if dtype.str != node["dtype"] or list(shape) != node["shape"]:
            raise self.damaged(
                where,
                f"the array {key!r} has dtype {dtype} and shape {shape}, but the document "
                f"records {node['dtype']!r} and {node['shape']!r}",
            )
        if math.prod(shape) * dtype.itemsize > size:
            raise self.damaged(where, f"the array entry {key!r} is shorter than its shape requires")
        try:
            array = self.archive[key]
        except (ValueError, MemoryError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            raise self.damaged(where, f"the array entry {key!r} cannot be read ({err})") from err
        if tag == "scalar":
            if array.shape != ():
                raise self.damaged(where, f"the scalar {key!r} is an array of shape {array.shape}")
            return array[()]
        return array

    def entry_header(self, key):
        """Shape, dtype and stored size of an ``.npy`` entry, from its header alone."""
        info = self.archive.zip.getinfo(key + ".npy")
        with self.archive.zip.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
        return shape, dtype, info.file_size


def _fits(value, kinds, shape):
    """Whether a fitted value matches its schema entry in _FITTED_ATTRIBUTES."""
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


def _build(cls, params, name, where):
    """Construct `cls` with `params` and run the class's own parameter validation."""
    try:
        estimator = cls(**params)
        check = getattr(estimator, "_check_params", None)
        if callable(check):
            check()
        elif hasattr(estimator, "_parameter_constraints"):
            estimator._validate_params()
        validate_steps = getattr(estimator, "_validate_steps", None)
        if callable(validate_steps):
            validate_steps()
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"The parameters the model file gives {name} (at {where}) are not valid: {err}"
        ) from err
    return estimator


def _not_a_model(source, reason):
    return ValueError(
        f"{source} is not a nanoseg model file ({reason}). nanoseg.persistence.load reads only "
        "files written by nanoseg.persistence.save. A joblib or pickle file can run arbitrary "
        "code when loaded: open it with joblib.load only if you trust where it comes from."
    )


def _read_document(archive, source):
    if DOCUMENT_ENTRY not in archive.files:
        raise _not_a_model(source, f"it is a zip/npz archive without the entry {DOCUMENT_ENTRY!r}")
    try:
        raw = archive[DOCUMENT_ENTRY]
        if not isinstance(raw, bytes):
            raise ValueError("the document entry is not text")
        document = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise _not_a_model(source, f"its document entry cannot be read as JSON: {err}") from err
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise _not_a_model(source, f"its document does not declare the format {FORMAT_NAME!r}")
    return document


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def load(path):
    """Load an estimator saved with :func:`save`.

    Nothing in the file is executed: it is read with
    ``numpy.load(allow_pickle=False)`` and :func:`json.loads`, the classes it
    may name come from a fixed registry, and the estimator is rebuilt
    through its constructor and parameter validation.

    Parameters
    ----------
    path : str, os.PathLike or binary file object
        The model file.

    Returns
    -------
    estimator : estimator
        The estimator, with the parameters and fitted attributes it had
        when saved (or a :class:`~sklearn.pipeline.Pipeline` of them).

    Raises
    ------
    FileNotFoundError
        If `path` does not exist.
    ValueError
        If the file is not a nanoseg model file (a joblib or pickle file, or
        any other content), was written in a newer format version, names a
        class this installation cannot load, holds parameters the class
        rejects, holds pickled objects, or is damaged.

    Warns
    -----
    ModelVersionWarning
        If the file was written by another nanoseg version.

    See Also
    --------
    save : Write a model file.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> from nanoseg import NanoparticleLabeler
    >>> from nanoseg.persistence import load, save
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = pathlib.Path(folder) / "labeler.npz"
    ...     save(NanoparticleLabeler(threshold=0.9), path)
    ...     load(path)
    NanoparticleLabeler(threshold=0.9)
    """
    if hasattr(path, "read"):
        return _load_stream(path, getattr(path, "name", repr(path)))
    with open(path, "rb") as stream:
        return _load_stream(stream, os.fspath(path))


def _describe_content(start):
    """What a file that is not a zip archive looks like, from its first bytes."""
    if not start:
        return "it is empty"
    if start.startswith(np.lib.format.MAGIC_PREFIX):
        return "it is a single NumPy array (.npy), not an archive"
    if start.startswith(b"\x80"):
        return "it looks like a pickle or joblib file"
    return "it is not a zip (.npz) archive"


def _load_stream(stream, source):
    start = stream.read(len(np.lib.format.MAGIC_PREFIX))
    stream.seek(-len(start), os.SEEK_CUR)
    if not start.startswith(b"PK\x03\x04"):
        raise _not_a_model(source, _describe_content(start))
    try:
        archive = np.load(stream, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        reason = f"it cannot be read as a zip (.npz) archive, or it is damaged: {err}"
        raise _not_a_model(source, reason) from err
    with archive:
        document = _read_document(archive, source)
        version = document.get("format_version")
        if type(version) is not int or version < 1:
            raise _not_a_model(source, f"its format version {version!r} is not a positive integer")
        saved_with = document.get("nanoseg_version")
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{source} is a nanoseg model file in format version {version}, written by "
                f"nanoseg {saved_with}; this nanoseg ({_nanoseg_version()}) reads format versions "
                f"up to {FORMAT_VERSION}. Upgrade nanoseg to load it."
            )
        if saved_with != _nanoseg_version():
            warnings.warn(ModelVersionWarning(str(saved_with), _nanoseg_version()), stacklevel=3)
        reader = _Reader(archive, source)
        try:
            estimator = reader.estimator(document.get("estimator"), "estimator")
        except RecursionError as err:
            raise reader.damaged("estimator", "its values are nested too deeply") from err
        extra = sorted(set(archive.files) - reader.used - {DOCUMENT_ENTRY})
        if extra:
            raise reader.damaged("estimator", f"the archive holds entries no estimator uses: {extra}")
    return estimator
