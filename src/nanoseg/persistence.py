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

nanoseg keeps this format rather than skops.io. skops.io 0.16.0 (tried with
scikit-learn 1.9.1) also avoids pickle and round-trips nanoseg's estimators
and pipelines of them, but it refuses to load a nanoseg model until the
caller trusts, by module path, each nanoseg class in it and, for a
classifier, scikit-learn's ``Tree`` or ``TreePredictor``. Trusting them is not safe: skops rebuilds trusted objects
from the file's state without checking it -- a tree whose child index was
edited out of range loaded, and ``predict_proba`` then crashed Python -- and
bypasses the constructors (``tol=-1`` loaded without complaint). This format
names classes from a fixed registry, checks every tree before building it,
and validates parameters as ``fit`` does.

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

import os
import re
import sys
import warnings
from importlib import import_module
from pathlib import Path

from sklearn.base import BaseEstimator, ClassifierMixin

# The work is shared by private modules: _safe_format (the archive, its
# document and array entries), _codec (estimator trees as JSON values and
# arrays), _schemas (what is stored for each class) and _sklearn_arrays
# (scikit-learn classifiers as plain arrays). This module owns the registry
# and the public functions.
from . import _codec, _safe_format, _schemas, _sklearn_arrays
# The constants of the file format, importable from here too.
from ._safe_format import DOCUMENT_ENTRY, FORMAT_NAME, FORMAT_VERSION  # noqa: F401

__all__ = ["FORMAT_VERSION", "ModelVersionWarning", "load", "register_estimator", "save"]

# Classes a model file may name, keyed by the stable name written in the file.
# Values are "module:qualified.name" strings, imported only when a file names
# the class, or classes given to register_estimator. To make a new estimator
# savable, add its entry to _schemas.SCHEMAS (or call register_estimator).
_REGISTRY = {name: schema.target for name, schema in _schemas.SCHEMAS.items()}

# save writes each array entry through this name, looked up at call time.
_write_member = _safe_format.write_member

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


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
        raise _safe_format.exists_error(path)
    # Encode everything before touching the disk: an estimator that cannot
    # be stored fails here, leaving nothing behind.
    encoder = _codec.Encoder(_registered_name)
    root = encoder.estimator(estimator, "estimator")
    document = _safe_format.document_text(root, _nanoseg_version())
    _safe_format.write_file(path, document, encoder.arrays, overwrite=overwrite, write_member=_write_member)


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


def _load_stream(stream, source):
    archive = _safe_format.open_archive(stream, source)
    with archive:
        document = _safe_format.read_document(archive, source)
        version = document.get("format_version")
        if type(version) is not int or version < 1:
            raise _safe_format.not_a_model(source, f"its format version {version!r} is not a positive integer")
        saved_with = document.get("nanoseg_version")
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{source} is a nanoseg model file in format version {version}, written by "
                f"nanoseg {saved_with}; this nanoseg ({_nanoseg_version()}) reads format versions "
                f"up to {FORMAT_VERSION}. Upgrade nanoseg to load it."
            )
        if saved_with != _nanoseg_version():
            # stacklevel=3 points at the caller of load.
            warnings.warn(ModelVersionWarning(str(saved_with), _nanoseg_version()), stacklevel=3)
        entries = _safe_format.ArrayEntries(archive, source)
        decoder = _codec.Decoder(entries, _resolve_class)
        try:
            estimator = decoder.estimator(document.get("estimator"), "estimator")
        except RecursionError as err:
            raise entries.damaged("estimator", "its values are nested too deeply") from err
        entries.check_all_used("estimator")
    return estimator
