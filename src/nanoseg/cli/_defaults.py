"""Estimators' default parameters for the help text, read without importing the estimators.

``nanoseg --help`` should answer at once, and importing an estimator brings
in scikit-learn (seconds). The defaults are the literal values of the
keyword arguments of each class's ``__init__``, read from the module's
source with :mod:`ast`; the tests check them against ``get_params()``.
"""

from __future__ import annotations

import ast
import importlib.util
from functools import lru_cache


@lru_cache(maxsize=None)
def estimator_defaults(module, name):
    """``{parameter: default}`` of ``module.name.__init__``'s literal keyword defaults.

    Parameters
    ----------
    module : str
        Dotted module name, e.g. ``"nanoseg.mixture"``.
    name : str
        Class name.

    Returns
    -------
    dict
        Defaults that are Python literals; others are left out.
    """
    spec = importlib.util.find_spec(module)
    with open(spec.origin, encoding="utf-8") as source:
        tree = ast.parse(source.read())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    return _literal_defaults(item.args)
    raise LookupError(f"{module}.{name}.__init__ not found")


def _literal_defaults(args):
    out = {}
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        if default is None:
            continue
        try:
            out[arg.arg] = ast.literal_eval(default)
        except ValueError:
            continue
    return out
