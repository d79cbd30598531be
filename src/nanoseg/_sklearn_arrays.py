"""Fitted scikit-learn classifiers as plain arrays and JSON values, and back.

:mod:`nanoseg.persistence` writes estimators as JSON values plus boolean and
numeric arrays. A fitted scikit-learn classifier holds objects that are
neither -- the ``Tree`` of a decision tree, the predictors and bin mapper of a
gradient-boosting model -- and pickling them would let a model file run code.
:func:`to_plain` turns the fitted state of the classifiers in :data:`CLASSES`
into plain values, and :func:`from_plain` rebuilds it from them.

The rebuilt objects are walked by compiled scikit-learn code that trusts
them: a child index out of range reads outside the node array, a cycle never
ends. So :func:`from_plain` checks, before it builds each object, that every
tree is a tree (children after their parent, every node but the root the child of
exactly one node), that features and classes index what exists, and that
shapes and dtypes agree.

Only single-output classifiers with numeric classes, and gradient boosting
without categorical features, are covered; anything else is refused at save
time with an error that names it.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import clone

__all__ = ["CLASSES", "from_plain", "to_plain", "unsupported"]

# Classes whose fitted state this module converts, under the stable names of
# the model-file registry (nanoseg._schemas.SCHEMAS adds them all).
CLASSES = {
    "DecisionTreeClassifier": "sklearn.tree:DecisionTreeClassifier",
    "ExtraTreeClassifier": "sklearn.tree:ExtraTreeClassifier",
    "RandomForestClassifier": "sklearn.ensemble:RandomForestClassifier",
    "ExtraTreesClassifier": "sklearn.ensemble:ExtraTreesClassifier",
    "HistGradientBoostingClassifier": "sklearn.ensemble:HistGradientBoostingClassifier",
    "LogisticRegression": "sklearn.linear_model:LogisticRegression",
}

# Node fields of sklearn.tree._tree.Tree, by the names of its array
# properties (tree_.children_left...), with the dtype kinds they may have.
_TREE_FIELDS = {
    "children_left": ("left_child", "i"),
    "children_right": ("right_child", "i"),
    "feature": ("feature", "i"),
    "threshold": ("threshold", "f"),
    "impurity": ("impurity", "f"),
    "n_node_samples": ("n_node_samples", "i"),
    "weighted_n_node_samples": ("weighted_n_node_samples", "f"),
    "missing_go_to_left": ("missing_go_to_left", "u"),
}
_LEAF = -1  # sklearn.tree._tree.TREE_LEAF: the children of a leaf

# Kinds of the fields of a HistGradientBoosting predictor node (same names).
_PREDICTOR_KINDS = {"value": "f", "num_threshold": "f", "gain": "f", "feature_idx": "i"}

# Instance attributes of each class that to_plain knows: those it stores or
# rebuilds, and those __init__ sets besides the parameters. Any other one
# (a newer scikit-learn's) is refused rather than silently dropped.
_COMMON = {"n_features_in_", "feature_names_in_", "classes_"}
_FOREST = _COMMON | {
    "estimator", "estimator_params", "estimator_", "estimators_", "n_outputs_", "n_classes_",
    "_n_samples", "_n_samples_bootstrap", "_sample_weight", "oob_score_", "oob_decision_function_",
}
_TREE = _COMMON | {"n_outputs_", "n_classes_", "max_features_", "tree_"}
_LINEAR = _COMMON | {"coef_", "intercept_", "n_iter_"}
_BOOSTING = _COMMON | {
    "is_categorical_", "_preprocessor", "_is_categorical_remapped", "_label_encoder",
    "n_trees_per_iteration_", "_random_seed", "_feature_subsample_rng", "_n_features", "_loss",
    "do_early_stopping_", "_use_validation_data", "_bin_mapper", "_baseline_prediction",
    "_predictors", "_scorer", "train_score_", "validation_score_", "_fitted_with_sw",
}


def unsupported(cls, where, reason=None):
    """The error for a classifier, or a configuration of one, that files cannot hold.

    Parameters
    ----------
    cls : type
        The classifier's class.
    where : str
        Where it sits in the saved estimator (``estimator.estimator_``).
    reason : str, optional
        What is not supported, when the class itself is.

    Returns
    -------
    error : TypeError
    """
    what = f"{cls.__module__}.{cls.__qualname__}"
    because = f" ({reason})" if reason else ""
    return TypeError(
        f"{where} is a {what}{because}, which nanoseg model files cannot hold: they store the "
        f"fitted state of scikit-learn's {', '.join(CLASSES)} as plain arrays (single output, "
        "numeric classes, no categorical features). Use one of these, or save the model with "
        "joblib.dump instead -- but a joblib file is a program that runs whatever its author put "
        "in it when loaded: load it only if you trust where it comes from."
    )


def _is_fitted(estimator):
    # The rule of sklearn.utils.validation.check_is_fitted.
    return any(key.endswith("_") and not key.startswith("__") for key in vars(estimator))


def _own_methods(estimator):
    """Instance attributes that are just the class's methods, bound to the estimator.

    HistGradientBoosting's early stopping with a scorer leaves its bound
    ``_raw_predict`` in the instance: there is nothing in it to store.
    """
    cls = type(estimator)
    return {
        key
        for key, value in vars(estimator).items()
        if getattr(value, "__self__", None) is estimator and getattr(value, "__func__", None) is getattr(cls, key, None)
    }


def to_plain(name, estimator, where):
    """The fitted state of `estimator` as JSON values and numeric arrays.

    Parameters
    ----------
    name : str
        Its key in :data:`CLASSES`.
    estimator : classifier
        A fitted or unfitted instance.
    where : str
        Its place in the saved estimator, for error messages.

    Returns
    -------
    state : dict
        Plain values by attribute-like names; empty when unfitted.

    Raises
    ------
    TypeError
        If its configuration (several outputs, string classes, categorical
        features, attributes of another scikit-learn version) is not covered.
    """
    if not _is_fitted(estimator):
        return {}
    encode, known = _ENCODERS[name]
    unknown = sorted(set(vars(estimator)) - known - set(estimator.get_params(deep=False)) - _own_methods(estimator))
    if unknown:
        # Storing only what is known would silently drop state a newer
        # scikit-learn may need.
        raise unsupported(type(estimator), where, f"unknown attributes {unknown}")
    classes = getattr(estimator, "classes_", None)
    if not isinstance(classes, np.ndarray) or classes.ndim != 1 or classes.dtype.kind not in "biuf":
        raise unsupported(type(estimator), where, "classes that are not one numeric array: several outputs or strings")
    state = {"n_features_in_": estimator.n_features_in_, "classes_": classes}
    if hasattr(estimator, "feature_names_in_"):
        state["feature_names_in_"] = [str(feature) for feature in estimator.feature_names_in_]
    state.update(encode(estimator, where))
    return state


def from_plain(name, estimator, state, damaged):
    """Check decoded plain values and rebuild the fitted attributes from them.

    Parameters
    ----------
    name : str
        Its key in :data:`CLASSES`.
    estimator : classifier
        The unfitted instance, built from the file's parameters.
    state : dict
        What :func:`to_plain` wrote, as the model file decodes it.
    damaged : callable
        ``damaged(where, problem)`` returns the loader's error for a damaged
        file; `where` is the attribute name, with keys of nested values.

    Returns
    -------
    attributes : dict
        The attributes to set on `estimator`, private ones included.
    """
    if not state:
        return {}
    fields = _Fields(state, "", damaged)
    n_features = fields.integer("n_features_in_", low=1, high=2**31 - 1)
    classes = fields.array("classes_", "biuf", (None,))
    if classes.size == 0:
        raise fields.fail("classes_", "a fitted classifier has at least one class")
    attributes = {"n_features_in_": n_features, "classes_": classes}
    names = fields.get("feature_names_in_", None)
    if names is not None:
        if not (isinstance(names, list) and len(names) == n_features and all(type(n) is str for n in names)):
            raise fields.fail("feature_names_in_", f"expected {n_features} feature names")
        # scikit-learn keeps them as an object array of str.
        attributes["feature_names_in_"] = np.asarray(names, dtype=object)
    attributes.update(_DECODERS[name](estimator, fields, n_features, classes))
    fields.check_all_read()
    return attributes


class _Fields:
    """Checked reads from a decoded dict, raising the loader's damaged-file error."""

    def __init__(self, values, where, damaged):
        if not isinstance(values, dict):
            raise damaged(where or "state", f"expected a JSON object, found {type(values).__name__}")
        self.values, self.where, self.damaged = values, where, damaged
        self.read = set()

    def fail(self, key, problem):
        return self.damaged(f"{self.where}[{key!r}]" if self.where else key, problem)

    def get(self, key, default=...):
        self.read.add(key)
        if key not in self.values:
            if default is ...:
                raise self.fail(key, "this value is missing")
            return default
        return self.values[key]

    def check_all_read(self):
        extra = sorted(set(self.values) - self.read)
        if extra:
            raise self.fail(extra[0], f"unexpected value(s) {extra}")

    def sub(self, key):
        return _Fields(self.get(key), f"{self.where}[{key!r}]" if self.where else key, self.damaged)

    def array(self, key, kinds, shape):
        value = self.get(key)
        if (
            isinstance(value, np.ndarray)
            and value.dtype.kind in kinds
            and value.ndim == len(shape)
            and all(s is None or s == n for s, n in zip(shape, value.shape))
        ):
            return value
        wanted = "(" + ", ".join("any" if s is None else str(s) for s in shape) + ")"
        found = (
            f"shape {value.shape} and dtype {value.dtype}" if isinstance(value, np.ndarray) else type(value).__name__
        )
        raise self.fail(key, f"expected an array of shape {wanted} and dtype kind {kinds}, found {found}")

    def integer(self, key, low=None, high=2**63 - 1, optional=False):
        # The default bound keeps values within what compiled code takes (intp).
        value = self.get(key, None if optional else ...)
        if value is None and optional:
            return None
        if not (type(value) is int or isinstance(value, np.integer)):
            raise self.fail(key, f"expected an integer, found {type(value).__name__}")
        if (low is not None and value < low) or (high is not None and value > high):
            raise self.fail(key, f"{value} is outside [{low}, {high}]")
        return value

    def real(self, key):
        value = self.get(key)
        if not (type(value) in (int, float) or isinstance(value, (np.floating, np.integer))):
            raise self.fail(key, f"expected a number, found {type(value).__name__}")
        return value

    def flag(self, key):
        value = self.get(key)
        if not (type(value) is bool or isinstance(value, np.bool_)):
            raise self.fail(key, f"expected a boolean, found {type(value).__name__}")
        return value


# -- tree structure ------------------------------------------------------------


def _check_tree(fields, key, index, left, right, split, feature, n_features, threshold):
    """Check that nodes form one tree rooted at 0 and return its depth.

    Children must come after their parent (as scikit-learn numbers them), so
    no walk down the tree can cycle, and every node but the root must be
    the child of exactly one node.
    """
    n = left.size

    def fail(problem):
        return fields.fail(key, f"tree {index}: {problem}")

    nodes = np.flatnonzero(split)
    lefts, rights = left[nodes].astype(np.int64), right[nodes].astype(np.int64)
    if np.any(lefts <= nodes) or np.any(rights <= nodes) or np.any(lefts >= n) or np.any(rights >= n):
        raise fail(f"a child index is outside its node's successors [i + 1, {n})")
    parents = np.bincount(np.concatenate([lefts, rights]), minlength=n)
    if n and (parents[0] != 0 or np.any(parents[1:] != 1)):
        raise fail("the nodes do not form a tree (a node without, or with several, parents)")
    features = feature[nodes]
    if np.any(features < 0) or np.any(features >= n_features):
        raise fail(f"a split feature is outside [0, {n_features})")
    if np.any(np.isnan(threshold[nodes])):
        # +inf is legitimate: it sends only missing values right.
        raise fail("a split threshold is NaN")
    depth, level = 0, np.zeros(1, dtype=np.int64)
    while True:
        level = level[split[level]]
        if level.size == 0:
            return depth
        level = np.concatenate([left[level], right[level]]).astype(np.int64)
        depth += 1


def _offsets(fields, counts, size):
    """Start of each table in arrays of `size` nodes, from its node counts."""
    counts = counts.ravel()
    # Bounding each count first keeps the sum far from overflowing.
    if np.any(counts < 1) or np.any(counts > size) or int(counts.sum()) != size:
        raise fields.fail("node_count", f"the node counts do not add up to the {size} nodes stored")
    return [0, *np.cumsum(counts, dtype=np.int64).tolist()]


def _encode_trees(trees, where, cls):
    from sklearn.tree._tree import NODE_DTYPE

    known = {field for field, _ in _TREE_FIELDS.values()}
    if set(NODE_DTYPE.names) - known:
        raise unsupported(cls, where, f"tree node fields {NODE_DTYPE.names} of another scikit-learn")
    states = [tree.__getstate__() for tree in trees]
    plain = {"node_count": np.array([s["node_count"] for s in states], dtype=np.int64)}
    for name, (field, _) in _TREE_FIELDS.items():
        if field in NODE_DTYPE.names:
            plain[name] = np.concatenate([s["nodes"][field] for s in states])
    plain["value"] = np.concatenate([s["values"] for s in states])
    return plain


def _decode_trees(fields, n_trees, n_features, n_classes):
    from sklearn.tree._tree import NODE_DTYPE, Tree

    counts = fields.array("node_count", "iu", (n_trees,))
    total = fields.array("children_left", "i", (None,)).shape[0]
    offsets = _offsets(fields, counts, total)
    plain = {}
    for name, (field, kinds) in _TREE_FIELDS.items():
        if field in NODE_DTYPE.names:
            plain[name] = fields.array(name, kinds, (total,))
    value = fields.array("value", "f", (total, 1, n_classes))
    if not np.all(np.isfinite(value)):
        raise fields.fail("value", "node values must be finite")
    missing = plain.get("missing_go_to_left")
    if missing is not None and np.any(missing > 1):
        raise fields.fail("missing_go_to_left", "expected 0 or 1")
    if np.any(plain["n_node_samples"] < 0):
        raise fields.fail("n_node_samples", "negative sample counts")
    trees = []
    for i, (start, stop) in enumerate(zip(offsets[:-1], offsets[1:])):
        part = {name: array[start:stop] for name, array in plain.items()}
        left, right = part["children_left"], part["children_right"]
        split = left != _LEAF
        if np.any(right[~split] != _LEAF):
            raise fields.fail("children_right", f"tree {i}: a leaf has a right child")
        depth = _check_tree(
            fields, "children_left", i, left, right, split, part["feature"], n_features, part["threshold"]
        )
        nodes = np.zeros(stop - start, dtype=NODE_DTYPE)
        for name, array in part.items():
            nodes[_TREE_FIELDS[name][0]] = array
        tree = Tree(n_features, np.array([n_classes], dtype=np.intp), 1)
        tree.__setstate__(
            {
                "max_depth": depth,
                "node_count": stop - start,
                "nodes": nodes,
                "values": np.ascontiguousarray(value[start:stop], dtype=np.float64),
            }
        )
        trees.append(tree)
    return trees


# -- trees and forests ---------------------------------------------------------


def _single_output(estimator, where):
    if estimator.n_outputs_ != 1:
        raise unsupported(type(estimator), where, f"{estimator.n_outputs_} outputs")


def _encode_tree(tree, where):
    _single_output(tree, where)
    return {
        "n_outputs_": tree.n_outputs_,
        "n_classes_": tree.n_classes_,
        "max_features_": tree.max_features_,
        "tree_": _encode_trees([tree.tree_], where, type(tree)),
    }


def _decode_tree(tree, fields, n_features, classes):
    return {
        "n_outputs_": fields.integer("n_outputs_", low=1, high=1),
        "n_classes_": fields.integer("n_classes_", low=classes.size, high=classes.size),
        "max_features_": fields.integer("max_features_", low=1, high=n_features),
        "tree_": _decode_trees(fields.sub("tree_"), 1, n_features, classes.size)[0],
    }


def _encode_forest(forest, where):
    _single_output(forest, where)
    trees = forest.estimators_
    first = trees[0]
    for tree in trees:
        same = (
            type(tree) is type(forest.estimator_)
            and type(tree.random_state) is int
            and not hasattr(tree, "feature_names_in_")
            and (tree.n_features_in_, tree.n_outputs_, tree.n_classes_, tree.max_features_)
            == (first.n_features_in_, first.n_outputs_, first.n_classes_, first.max_features_)
            and np.array_equal(tree.classes_, first.classes_)
        )
        if not same:
            raise unsupported(type(forest), where, "trees that were not all fitted by the forest itself")
    plain = {
        "n_outputs_": forest.n_outputs_,
        "n_classes_": forest.n_classes_,
        "n_samples_": forest._n_samples,
        "n_samples_bootstrap_": forest._n_samples_bootstrap,
        "sample_weight_": forest._sample_weight,
        "estimators_": {
            **_encode_trees([tree.tree_ for tree in trees], where, type(forest)),
            "random_state": np.array([tree.random_state for tree in trees], dtype=np.int64),
            "classes": first.classes_,
            "n_classes": first.n_classes_,
            "max_features": first.max_features_,
        },
    }
    if hasattr(forest, "oob_score_"):
        plain["oob_score_"] = forest.oob_score_
        plain["oob_decision_function_"] = forest.oob_decision_function_
    return plain


def _decode_forest(forest, fields, n_features, classes):
    attributes = {
        "n_outputs_": fields.integer("n_outputs_", low=1, high=1),
        "n_classes_": fields.integer("n_classes_", low=classes.size, high=classes.size),
        "_n_samples": fields.integer("n_samples_", low=1),
        "_n_samples_bootstrap": fields.integer("n_samples_bootstrap_", low=1, optional=True),
        "_sample_weight": fields.get("sample_weight_"),
    }
    weight = attributes["_sample_weight"]
    if weight is not None:
        attributes["_sample_weight"] = fields.array("sample_weight_", "f", (attributes["_n_samples"],))
    if "oob_score_" in fields.values:
        attributes["oob_score_"] = fields.real("oob_score_")
        attributes["oob_decision_function_"] = fields.array("oob_decision_function_", "f", (None, None))

    table = fields.sub("estimators_")
    seeds = table.array("random_state", "iu", (None,))
    if seeds.size == 0 or np.any(seeds < 0) or np.any(seeds >= 2**32):
        raise table.fail("random_state", "expected one seed in [0, 2**32) per tree, and at least one tree")
    tree_classes = table.array("classes", "biuf", (classes.size,))
    n_classes = table.integer("n_classes", low=classes.size, high=classes.size)
    max_features = table.integer("max_features", low=1, high=n_features)
    built = _decode_trees(table, seeds.size, n_features, classes.size)
    table.check_all_read()
    # As fit does: the template is the estimator made in __init__, and each
    # tree is a clone of it with the forest's tree parameters and its seed.
    template = forest.estimator
    params = {name: getattr(forest, name) for name in forest.estimator_params}
    estimators = []
    for seed, tree_ in zip(seeds.tolist(), built):
        tree = clone(template).set_params(**{**params, "random_state": seed})
        tree.n_features_in_, tree.n_outputs_ = n_features, 1
        tree.classes_, tree.n_classes_ = tree_classes.copy(), n_classes
        tree.max_features_, tree.tree_ = max_features, tree_
        estimators.append(tree)
    attributes.update(estimator_=template, estimators_=estimators)
    return attributes


# -- logistic regression -------------------------------------------------------


def _encode_linear(model, where):
    return {"coef_": model.coef_, "intercept_": model.intercept_, "n_iter_": model.n_iter_}


def _decode_linear(model, fields, n_features, classes):
    if classes.size < 2:
        raise fields.fail("classes_", "logistic regression has at least two classes")
    rows = 1 if classes.size == 2 else classes.size
    coef = fields.array("coef_", "f", (rows, n_features))
    intercept = fields.get("intercept_")
    # liblinear without an intercept leaves the scalar 0.0.
    if not (type(intercept) is float and intercept == 0.0):
        intercept = fields.array("intercept_", "f", (rows,))
    if not (np.all(np.isfinite(coef)) and np.all(np.isfinite(intercept))):
        raise fields.fail("coef_", "coefficients must be finite")
    n_iter = fields.get("n_iter_")
    if not (isinstance(n_iter, np.ndarray) and n_iter.dtype.kind in "iu" and n_iter.ndim >= 1):
        raise fields.fail("n_iter_", "expected an integer array")
    return {"coef_": coef, "intercept_": intercept, "n_iter_": n_iter}


# -- histogram gradient boosting -----------------------------------------------


def _encode_boosting(model, where):
    from sklearn.ensemble._hist_gradient_boosting.common import PREDICTOR_RECORD_DTYPE

    cls = type(model)
    categorical = (model.is_categorical_, model._preprocessor, model._is_categorical_remapped)
    if any(value is not None for value in categorical):
        raise unsupported(cls, where, "categorical features")
    predictors = [p for iteration in model._predictors for p in iteration]
    if any(p.raw_left_cat_bitsets.size or p.binned_left_cat_bitsets.size for p in predictors):
        raise unsupported(cls, where, "categorical splits")
    mapper = model._bin_mapper
    if mapper.is_categorical is not None or mapper.known_categories is not None:
        raise unsupported(cls, where, "categorical features")
    nodes = np.concatenate([p.nodes for p in predictors])
    table = {"node_count": np.array([[p.nodes.size for p in it] for it in model._predictors], dtype=np.int64)}
    table.update({field: np.ascontiguousarray(nodes[field]) for field in PREDICTOR_RECORD_DTYPE.names})
    return {
        "n_trees_per_iteration_": model.n_trees_per_iteration_,
        "n_features_": model._n_features,
        "random_seed_": model._random_seed,
        "feature_subsample_rng_": model._feature_subsample_rng.bit_generator.state,
        "do_early_stopping_": model.do_early_stopping_,
        "use_validation_data_": model._use_validation_data,
        "fitted_with_sw_": getattr(model, "_fitted_with_sw", None),
        "baseline_prediction_": model._baseline_prediction,
        "train_score_": model.train_score_,
        "validation_score_": model.validation_score_,
        "predictors_": table,
        "bin_mapper_": {
            "n_bins": mapper.n_bins,
            "subsample": mapper.subsample,
            "random_state": mapper.random_state,
            "n_threads": mapper.n_threads,
            "missing_values_bin_idx_": mapper.missing_values_bin_idx_,
            "bin_thresholds_": list(mapper.bin_thresholds_),
            "n_bins_non_missing_": mapper.n_bins_non_missing_,
            "is_categorical_": mapper.is_categorical_,
        },
    }


def _decode_boosting(model, fields, n_features, classes):
    from sklearn.ensemble._hist_gradient_boosting.binning import _BinMapper
    from sklearn.ensemble._hist_gradient_boosting.common import PREDICTOR_RECORD_DTYPE, X_BITSET_INNER_DTYPE
    from sklearn.ensemble._hist_gradient_boosting.predictor import TreePredictor
    from sklearn.metrics import check_scoring
    from sklearn.preprocessing import LabelEncoder

    if classes.size < 2:
        raise fields.fail("classes_", "gradient boosting has at least two classes")
    per_iteration = 1 if classes.size == 2 else classes.size
    attributes = {
        "is_categorical_": None,
        "_preprocessor": None,
        "_is_categorical_remapped": None,
        "n_trees_per_iteration_": fields.integer("n_trees_per_iteration_", low=per_iteration, high=per_iteration),
        "_n_features": fields.integer("n_features_", low=n_features, high=n_features),
        "_random_seed": fields.integer("random_seed_", low=0),
        "_feature_subsample_rng": _generator(fields, "feature_subsample_rng_"),
        "do_early_stopping_": fields.flag("do_early_stopping_"),
        "_use_validation_data": fields.flag("use_validation_data_"),
        "_baseline_prediction": fields.array("baseline_prediction_", "f", (1, per_iteration)),
        "train_score_": fields.array("train_score_", "f", (None,)),
        "validation_score_": fields.array("validation_score_", "f", (None,)),
    }
    if fields.get("fitted_with_sw_") is not None:
        attributes["_fitted_with_sw"] = fields.flag("fitted_with_sw_")
    if not np.all(np.isfinite(attributes["_baseline_prediction"])):
        raise fields.fail("baseline_prediction_", "expected finite values")

    table = fields.sub("predictors_")
    counts = table.array("node_count", "iu", (None, per_iteration))
    total = table.array("value", "f", (None,)).shape[0]
    offsets = _offsets(table, counts, total)
    plain = {}
    for field in PREDICTOR_RECORD_DTYPE.names:
        kinds = _PREDICTOR_KINDS.get(field, "u")
        plain[field] = table.array(field, kinds, (total,))
    table.check_all_read()
    if np.any(plain["is_categorical"] != 0):
        raise table.fail("is_categorical", "categorical splits are not supported")
    if np.any(plain["is_leaf"] > 1) or np.any(plain["missing_go_to_left"] > 1):
        raise table.fail("is_leaf", "expected 0 or 1 flags")
    if not np.all(np.isfinite(plain["value"])):
        raise table.fail("value", "leaf values must be finite")
    predictors = []
    for i, (start, stop) in enumerate(zip(offsets[:-1], offsets[1:])):
        part = {field: array[start:stop] for field, array in plain.items()}
        split = part["is_leaf"] == 0
        _check_tree(
            table, "left", i, part["left"], part["right"], split, part["feature_idx"], n_features, part["num_threshold"]
        )
        nodes = np.zeros(stop - start, dtype=PREDICTOR_RECORD_DTYPE)
        for field, array in part.items():
            nodes[field] = array
        empty = np.zeros((0, 8), dtype=X_BITSET_INNER_DTYPE)
        predictors.append(TreePredictor(nodes, empty, empty.copy()))
    attributes["_predictors"] = [predictors[i : i + per_iteration] for i in range(0, len(predictors), per_iteration)]
    attributes["_bin_mapper"] = _bin_mapper(fields.sub("bin_mapper_"), n_features, _BinMapper)

    encoder = LabelEncoder()
    encoder.classes_ = classes
    attributes["_label_encoder"] = encoder
    # The loss and scorer are made from the parameters, as fit makes them.
    model.n_trees_per_iteration_ = attributes["n_trees_per_iteration_"]
    attributes["_loss"] = model._get_loss(sample_weight=None)
    scored = attributes["do_early_stopping_"] and model.scoring != "loss"
    attributes["_scorer"] = check_scoring(model, model.scoring) if scored else None
    return attributes


def _generator(fields, key):
    """A NumPy Generator from the state dict of its PCG64 bit generator."""
    state = fields.get(key)
    generator = np.random.Generator(np.random.PCG64())
    if not (isinstance(state, dict) and state.get("bit_generator") == "PCG64"):
        raise fields.fail(key, "expected the state of a PCG64 generator")
    try:
        generator.bit_generator.state = state
    except (TypeError, ValueError, KeyError, OverflowError) as err:
        raise fields.fail(key, f"not a valid PCG64 state ({err})") from err
    return generator


def _bin_mapper(fields, n_features, mapper_class):
    n_bins = fields.integer("n_bins", low=3, high=256)
    mapper = mapper_class(
        n_bins=n_bins,
        subsample=fields.integer("subsample", low=1, optional=True),
        random_state=fields.integer("random_state", low=0, optional=True),
        n_threads=fields.integer("n_threads", optional=True),
    )
    mapper.missing_values_bin_idx_ = fields.integer("missing_values_bin_idx_", low=n_bins - 1, high=n_bins - 1)
    mapper.n_bins_non_missing_ = fields.array("n_bins_non_missing_", "u", (n_features,))
    mapper.is_categorical_ = fields.array("is_categorical_", "u", (n_features,))
    if np.any(mapper.is_categorical_ != 0) or np.any(mapper.n_bins_non_missing_ > n_bins - 1):
        raise fields.fail("is_categorical_", "categorical features or bin counts out of range")
    thresholds = fields.get("bin_thresholds_")
    if not (isinstance(thresholds, list) and len(thresholds) == n_features):
        raise fields.fail("bin_thresholds_", f"expected a list of {n_features} arrays")
    for i, array in enumerate(thresholds):
        if not (isinstance(array, np.ndarray) and array.dtype.kind == "f" and array.ndim == 1):
            raise fields.fail("bin_thresholds_", f"entry {i} is not a 1-D float array")
    mapper.bin_thresholds_ = thresholds
    fields.check_all_read()
    return mapper


_ENCODERS = {
    "DecisionTreeClassifier": (_encode_tree, _TREE),
    "ExtraTreeClassifier": (_encode_tree, _TREE),
    "RandomForestClassifier": (_encode_forest, _FOREST),
    "ExtraTreesClassifier": (_encode_forest, _FOREST),
    "HistGradientBoostingClassifier": (_encode_boosting, _BOOSTING),
    "LogisticRegression": (_encode_linear, _LINEAR),
}
_DECODERS = {
    "DecisionTreeClassifier": _decode_tree,
    "ExtraTreeClassifier": _decode_tree,
    "RandomForestClassifier": _decode_forest,
    "ExtraTreesClassifier": _decode_forest,
    "HistGradientBoostingClassifier": _decode_boosting,
    "LogisticRegression": _decode_linear,
}
