"""Model files for NanoparticleClassifier: its scikit-learn classifier as plain arrays."""

import io
import json
import zipfile

import joblib
import numpy as np
import pytest
from sklearn.base import BaseEstimator, clone
from sklearn.ensemble import (
    ExtraTreesClassifier,
    GradientBoostingClassifier,
    HistGradientBoostingClassifier,
    RandomForestClassifier,
)
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier, ExtraTreeClassifier
from sklearn.utils.validation import check_is_fitted

from nanoseg import NanoparticleClassifier, NanoparticleLabeler, NanoparticleMixture, persistence
from nanoseg.persistence import load, save

DOCUMENT = "nanoseg_model.json"

CLASSIFIERS = {
    "default": None,
    "RandomForestClassifier": RandomForestClassifier(n_estimators=7, max_depth=8, random_state=0),
    "ExtraTreesClassifier": ExtraTreesClassifier(n_estimators=5, random_state=0),
    "DecisionTreeClassifier": DecisionTreeClassifier(max_depth=6, random_state=0),
    "ExtraTreeClassifier": ExtraTreeClassifier(random_state=0),
    "LogisticRegression": LogisticRegression(C=0.5, max_iter=500),
    "HistGradientBoostingClassifier": HistGradientBoostingClassifier(max_iter=6, random_state=0),
}


@pytest.fixture(scope="module")
def fitted(phantom_64x64):
    """One fitted NanoparticleClassifier per classifier, and its probability map."""
    image, mask = phantom_64x64
    models = {}
    for name, classifier in CLASSIFIERS.items():
        model = NanoparticleClassifier(classifier=classifier, n_jobs=1, random_state=0, max_samples=2000)
        model.fit(image, mask)
        models[name] = (model, model.predict_proba(image))
    return models


@pytest.fixture
def path(tmp_path):
    return tmp_path / "model.npz"


def round_trip(estimator, path):
    save(estimator, path)
    return load(path)


def assert_same_state(restored, original, where="estimator"):
    """Same type and the same values throughout, private attributes included."""
    assert type(restored) is type(original), where
    if isinstance(original, np.ndarray):
        assert restored.dtype == original.dtype, where
        assert restored.shape == original.shape, where
        if original.dtype.hasobject:
            assert restored.tolist() == original.tolist(), where
        else:
            assert restored.tobytes() == original.tobytes(), where
    elif isinstance(original, (list, tuple)):
        assert len(restored) == len(original), where
        for i, (a, b) in enumerate(zip(restored, original)):
            assert_same_state(a, b, f"{where}[{i}]")
    elif isinstance(original, dict):
        assert list(restored) == list(original), where
        for key in original:
            assert_same_state(restored[key], original[key], f"{where}[{key!r}]")
    elif isinstance(original, np.random.Generator):
        assert restored.bit_generator.state == original.bit_generator.state, where
    elif type(original).__name__ == "Tree":
        a, b = restored.__getstate__(), original.__getstate__()
        assert (a["max_depth"], a["node_count"]) == (b["max_depth"], b["node_count"]), where
        assert a["nodes"].dtype == b["nodes"].dtype and a["nodes"].tobytes() == b["nodes"].tobytes(), where
        assert a["values"].tobytes() == b["values"].tobytes(), where
    elif type(original).__module__.startswith("sklearn._loss"):
        # Loss objects hold compiled functions: the same loss for the same classes.
        assert restored.n_classes == original.n_classes, where
    elif isinstance(original, BaseEstimator) or type(original).__name__ == "TreePredictor":
        # Attributes are set in another order when loading, and the methods
        # that scikit-learn leaves bound in an instance are not state.
        def state(estimator):
            return {k: v for k, v in sorted(vars(estimator).items()) if getattr(v, "__self__", None) is not estimator}

        assert_same_state(state(restored), state(original), where)
    elif type(original).__module__.startswith("sklearn.metrics"):
        assert repr(restored) == repr(original), where  # a scorer: no __eq__
    elif isinstance(original, np.generic):
        assert restored.dtype == original.dtype and restored == original, where
    else:
        assert restored == original, where


def entries(path):
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def rewrite(path, edit=None, arrays=None):
    """Rewrite a model file with its document edited and/or some arrays replaced."""
    contents = entries(path)
    document = json.loads(contents[DOCUMENT])
    if edit is not None:
        edit(document)
    contents[DOCUMENT] = json.dumps(document).encode()
    for name, array in (arrays or {}).items():
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        contents[name + ".npy"] = buffer.getvalue()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in contents.items():
            archive.writestr(name, data)


def stored(path, name):
    with np.load(path, allow_pickle=False) as archive:
        return archive[name]


# -- round trips ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_fitted_round_trip_gives_identical_probabilities(name, fitted, phantom_64x64, path):
    model, probability = fitted[name]
    restored = round_trip(model, path)
    assert type(restored.estimator_) is type(model.estimator_)
    assert np.array_equal(restored.predict_proba(phantom_64x64[0]), probability)
    # Not only the same output: the same fitted state, private parts included.
    assert_same_state(restored, model)


def test_estimator_is_rebuilt_without_unpickling(fitted, path, monkeypatch):
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("load unpickled something")

    save(fitted["RandomForestClassifier"][0], path)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    restored = load(path)
    assert len(restored.estimator_.estimators_) == 7


def test_prior_round_trips(phantom_64x64, path):
    image, mask = phantom_64x64
    prior = NanoparticleMixture(beta_prior=(1.0, 30.0))
    model = NanoparticleClassifier(prior=prior, n_jobs=1, random_state=0, max_samples=2000).fit(image, mask)
    assert model.feature_names_[-1] == "posterior_logit"
    restored = round_trip(model, path)
    assert type(restored.prior) is NanoparticleMixture
    assert restored.prior.get_params() == prior.get_params()
    with pytest.raises(NotFittedError):
        check_is_fitted(restored.prior)
    assert np.array_equal(restored.predict_proba(image), model.predict_proba(image))


def test_pipeline_with_labeler_round_trips(phantom_64x64, path):
    image, mask = phantom_64x64
    pipeline = Pipeline(
        [
            ("classifier", NanoparticleClassifier(n_jobs=1, random_state=0, max_samples=2000)),
            ("labeler", NanoparticleLabeler(radius=0)),
        ]
    ).fit(image, mask)
    restored = round_trip(pipeline, path)
    labels = pipeline.transform(image)
    assert labels.max() > 0
    assert np.array_equal(restored.transform(image), labels)
    assert np.array_equal(
        restored.named_steps["classifier"].predict_proba(image),
        pipeline.named_steps["classifier"].predict_proba(image),
    )


def test_unfitted_round_trip_keeps_parameters_and_stays_unfitted(phantom_64x64, path):
    model = NanoparticleClassifier(
        features=("intensity", "dog", "hessian"),
        sigmas=(1.0, 2.5),
        spacing=(1.0, 1.0),
        prior=NanoparticleMixture(beta_prior=(2.0, 30.0)),
        classifier=RandomForestClassifier(n_estimators=4, max_depth=3, class_weight="balanced", random_state=1),
        max_samples=1500,
        gate_recall=None,
        memory_budget="64MiB",
        n_jobs=1,
        random_state=3,
    )
    restored = round_trip(model, path)
    assert_same_state(restored, model)
    assert type(restored.classifier) is RandomForestClassifier
    assert type(restored.features) is tuple
    with pytest.raises(NotFittedError):
        check_is_fitted(restored)
    with pytest.raises(NotFittedError):
        check_is_fitted(restored.classifier)
    # The restored parameters train the same model.
    image, mask = phantom_64x64
    assert np.array_equal(restored.fit(image, mask).predict_proba(image), model.fit(image, mask).predict_proba(image))


@pytest.mark.parametrize("name", ["RandomForestClassifier", "LogisticRegression", "HistGradientBoostingClassifier"])
def test_joblib_round_trip_of_a_loaded_model(name, fitted, phantom_64x64, path, tmp_path):
    model, probability = fitted[name]
    restored = round_trip(model, path)
    for estimator in (model, restored):
        joblib.dump(estimator, tmp_path / "model.joblib")
        again = joblib.load(tmp_path / "model.joblib")
        assert np.array_equal(again.predict_proba(phantom_64x64[0]), probability)


def test_file_holds_no_pickle(fitted, path):
    save(fitted["HistGradientBoostingClassifier"][0], path)
    names = [name for name in entries(path) if name != DOCUMENT]
    assert all(name.endswith(".npy") for name in names)
    with np.load(path, allow_pickle=False) as archive:
        for name in archive.files:
            value = archive[name]
            if name != DOCUMENT:
                assert value.dtype.kind in "biuf", name
    # The tree nodes are plain columns, not structured arrays.
    assert any("num_threshold" in name for name in names)


# -- other fitted configurations -------------------------------------------------


@pytest.fixture(scope="module")
def table():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 6))
    X[rng.random(X.shape) < 0.05] = np.nan  # missing values: +inf thresholds, missing_go_to_left
    y = (np.nan_to_num(X[:, 0]) + np.nan_to_num(X[:, 1]) > 0).astype(int) + (np.nan_to_num(X[:, 2]) > 1)
    return X, y


@pytest.mark.parametrize(
    "estimator",
    [
        DecisionTreeClassifier(random_state=0),
        RandomForestClassifier(n_estimators=30, max_depth=3, oob_score=True, random_state=0),
        RandomForestClassifier(n_estimators=3, max_samples=0.5, class_weight="balanced", random_state=0),
        ExtraTreesClassifier(n_estimators=3, random_state=0),
        HistGradientBoostingClassifier(max_iter=8, early_stopping=True, scoring="accuracy", random_state=0),
        HistGradientBoostingClassifier(max_iter=5, max_features=0.5, random_state=0),
    ],
    ids=[
        "tree",
        "forest-oob",
        "forest-subsampled-weighted",
        "extra-trees",
        "boosting-early-stopping",
        "boosting-subsampled",
    ],
)
def test_bare_classifiers_round_trip(estimator, table, path):
    X, y = table
    estimator = clone(estimator).fit(X, y)
    restored = round_trip(estimator, path)
    assert_same_state(restored, estimator)
    assert np.array_equal(restored.predict_proba(X), estimator.predict_proba(X))
    if hasattr(estimator, "estimators_samples_") and estimator.bootstrap:
        for a, b in zip(restored.estimators_samples_, estimator.estimators_samples_):
            assert np.array_equal(a, b)


@pytest.mark.parametrize(
    "estimator, binary",
    [
        (LogisticRegression(max_iter=500), False),
        (LogisticRegression(max_iter=500), True),
        (LogisticRegression(solver="liblinear", fit_intercept=False), True),
    ],
    ids=["lbfgs-3-classes", "lbfgs-2-classes", "liblinear-no-intercept"],
)
def test_logistic_regression_round_trips(estimator, binary, table, path):
    X, y = table
    X = np.nan_to_num(X)
    model = clone(estimator).fit(X, y > 0 if binary else y)
    restored = round_trip(model, path)
    assert_same_state(restored, model)
    assert np.array_equal(restored.predict_proba(X), model.predict_proba(X))


def test_feature_names_round_trip(table, path):
    pandas = pytest.importorskip("pandas")
    X, y = table
    frame = pandas.DataFrame(X, columns=[f"f{i}" for i in range(X.shape[1])])
    model = RandomForestClassifier(n_estimators=2, random_state=0).fit(frame, y)
    restored = round_trip(model, path)
    assert_same_state(restored, model)
    assert np.array_equal(restored.predict_proba(frame), model.predict_proba(frame))


@pytest.mark.parametrize(
    "estimator",
    [
        RandomForestClassifier(n_estimators=3, random_state=0),
        HistGradientBoostingClassifier(max_iter=3, max_features=0.5, random_state=0),
    ],
    ids=["forest", "boosting"],
)
def test_warm_start_continues_as_the_original(estimator, table, path):
    X, y = table
    model = clone(estimator).set_params(warm_start=True).fit(X, y)
    restored = round_trip(model, path)
    more = {"n_estimators": 6} if "n_estimators" in model.get_params() else {"max_iter": 6}
    model.set_params(**more).fit(X, y)
    restored.set_params(**more).fit(X, y)
    assert np.array_equal(restored.predict_proba(X), model.predict_proba(X))


# -- refused -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "classifier, fit, named",
    [
        (SVC(probability=True), False, "sklearn.svm._classes.SVC"),
        # (SVC's probability is deprecated and warns at fit in scikit-learn 1.9.)
        (KNeighborsClassifier(n_neighbors=3), True, "KNeighborsClassifier"),
    ],
    ids=["unfitted-SVC", "fitted-KNeighborsClassifier"],
)
def test_unsupported_classifier_is_named_at_save(classifier, fit, named, phantom_64x64, path):
    model = NanoparticleClassifier(classifier=classifier, n_jobs=1, random_state=0, max_samples=300)
    if fit:
        model.fit(*phantom_64x64)
    with pytest.raises(TypeError, match=rf"{named}.*RandomForestClassifier.*joblib.dump.*trust") as info:
        save(model, path)
    assert "estimator.classifier" in str(info.value) or "estimator.estimator_" in str(info.value)
    assert not path.exists()


def test_unsupported_configurations_are_named_at_save(table, path):
    X, y = table
    two_outputs = DecisionTreeClassifier(max_depth=2).fit(X, np.stack([y, y > 0], axis=1))
    with pytest.raises(TypeError, match=r"DecisionTreeClassifier.*several outputs.*joblib"):
        save(two_outputs, path)
    categorical = HistGradientBoostingClassifier(max_iter=2, categorical_features=[5])
    categorical.fit(np.column_stack([X[:, :5], y % 2]), y)
    with pytest.raises(TypeError, match=r"HistGradientBoostingClassifier.*categorical features.*joblib"):
        save(categorical, path)
    with pytest.raises(TypeError, match=r"GradientBoostingClassifier.*joblib"):
        save(NanoparticleClassifier(classifier=GradientBoostingClassifier()), path)
    assert not path.exists()


FOREST = "estimator.estimator_.estimators_"


def forest_file(fitted, path):
    save(fitted["RandomForestClassifier"][0], path)
    counts = stored(path, f"{FOREST}['node_count']")
    left = stored(path, f"{FOREST}['children_left']")
    return counts, left


def assert_damaged(path, *patterns):
    with pytest.raises(ValueError, match="damaged or was edited") as info:
        load(path)
    for pattern in patterns:
        assert pattern in str(info.value), str(info.value)


def test_child_index_out_of_range_is_refused(fitted, path):
    counts, left = forest_file(fitted, path)
    left = left.copy()
    left[0] = counts[0] + 10**6
    rewrite(path, arrays={f"{FOREST}['children_left']": left})
    assert_damaged(path, "estimator.estimator_.estimators_['children_left']", "tree 0", "child index")


def test_cycle_in_a_tree_is_refused(fitted, path):
    counts, left = forest_file(fitted, path)
    left = left.copy()
    split = np.flatnonzero(left[: counts[0]] != -1)
    left[split[-1]] = 0  # back to the root: a walk down the tree would never end
    rewrite(path, arrays={f"{FOREST}['children_left']": left})
    assert_damaged(path, "child index")


def test_shared_child_is_refused(fitted, path):
    counts, left = forest_file(fitted, path)
    right = stored(path, f"{FOREST}['children_right']").copy()
    right[0] = left[0]
    rewrite(path, arrays={f"{FOREST}['children_right']": right})
    assert_damaged(path, "do not form a tree")


def test_feature_out_of_range_is_refused(fitted, path):
    forest_file(fitted, path)
    feature = stored(path, f"{FOREST}['feature']").copy()
    feature[0] = 10_000
    rewrite(path, arrays={f"{FOREST}['feature']": feature})
    n_features = next(iter(fitted.values()))[0].n_features_
    assert_damaged(path, f"split feature is outside [0, {n_features})")


def test_nan_threshold_is_refused(fitted, path):
    forest_file(fitted, path)
    threshold = stored(path, f"{FOREST}['threshold']").copy()
    threshold[0] = np.nan
    rewrite(path, arrays={f"{FOREST}['threshold']": threshold})
    assert_damaged(path, "threshold is NaN")


def test_inconsistent_node_counts_are_refused(fitted, path):
    counts, _ = forest_file(fitted, path)
    counts = counts.copy()
    counts[0] += 1
    rewrite(path, arrays={f"{FOREST}['node_count']": counts})
    assert_damaged(path, "node counts do not add up")


def test_value_of_the_wrong_shape_is_refused(fitted, path):
    forest_file(fitted, path)
    value = stored(path, f"{FOREST}['value']")
    wider = np.concatenate([value, value[..., :1]], axis=2)

    def edit(document):
        entry = document["estimator"]["fitted"]["estimator_"]["estimator"]["fitted"]["estimators_"]["dict"]["value"]
        entry["shape"] = list(wider.shape)

    rewrite(path, edit, arrays={f"{FOREST}['value']": wider})
    assert_damaged(path, "['value']", "expected an array of shape")


def test_boosting_child_out_of_range_is_refused(fitted, path):
    save(fitted["HistGradientBoostingClassifier"][0], path)
    name = "estimator.estimator_.predictors_['left']"
    left = stored(path, name).copy()
    left[0] = 4_000_000_000
    rewrite(path, arrays={name: left})
    assert_damaged(path, "predictors_['left']", "child index")


def test_unknown_classifier_class_is_refused(fitted, path):
    save(fitted["DecisionTreeClassifier"][0], path)

    def edit(document):
        document["estimator"]["fitted"]["estimator_"]["estimator"]["class"] = "SVC"

    rewrite(path, edit)
    with pytest.raises(ValueError, match="unknown estimator class 'SVC'"):
        load(path)


def test_non_classifier_as_estimator_is_refused(fitted, path):
    save(fitted["DecisionTreeClassifier"][0], path)

    def edit(document):
        document["estimator"]["fitted"]["estimator_"] = {
            "estimator": {"class": "NanoparticleLabeler", "params": {}, "fitted": {}}
        }

    rewrite(path, edit)
    assert_damaged(path, "estimator.estimator_", "a fitted classifier")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("feature_names_", [1, 2], "a list of strings"),
        ("gate_level_", "high", "(or None)"),
        ("n_dims_", 2.5, "dtype kind i or u"),
    ],
)
def test_fitted_attributes_of_the_wrong_kind_are_refused(key, value, message, fitted, path):
    save(fitted["LogisticRegression"][0], path)

    def edit(document):
        document["estimator"]["fitted"][key] = value

    rewrite(path, edit)
    assert_damaged(path, f"estimator.{key}", message)


def test_gate_level_may_be_none(phantom_64x64, path):
    image, mask = phantom_64x64
    model = NanoparticleClassifier(gate_recall=None, n_jobs=1, random_state=0, max_samples=1000).fit(image, mask)
    assert model.gate_level_ is None
    restored = round_trip(model, path)
    assert restored.gate_level_ is None
    assert np.array_equal(restored.predict_proba(image), model.predict_proba(image))


def test_unexpected_plain_values_are_refused(fitted, path):
    save(fitted["LogisticRegression"][0], path)

    def edit(document):
        document["estimator"]["fitted"]["estimator_"]["estimator"]["fitted"]["callback_"] = 1

    rewrite(path, edit)
    assert_damaged(path, "unexpected value(s) ['callback_']")


def test_registry_lists_the_supported_classifiers():
    for name in ("RandomForestClassifier", "ExtraTreesClassifier", "DecisionTreeClassifier", "LogisticRegression"):
        assert persistence._REGISTRY[name].endswith(f":{name}")
    assert persistence._REGISTRY["NanoparticleClassifier"] == "nanoseg.classifier:NanoparticleClassifier"
    assert "SVC" not in persistence._REGISTRY
