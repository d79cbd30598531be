"""Pipeline + GridSearchCV against annotated crops + joblib persistence."""

import joblib
import numpy as np
import pytest
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.pipeline import Pipeline

from nanoseg import NanoparticleLabeler, NanoparticleMixture
from nanoseg.datasets import make_crops, make_phantom


def dice_scorer(estimator, X, y):
    """Voxel Dice of the predicted particles against the masks, pooled over crops."""
    predicted = estimator.transform(X)
    if not isinstance(X, list):
        predicted, y = [predicted], [y]
    overlap = sum(np.count_nonzero((p > 0) & t) for p, t in zip(predicted, y))
    total = sum(np.count_nonzero(p > 0) + np.count_nonzero(t) for p, t in zip(predicted, y))
    return 2 * overlap / total if total else 1.0


def make_pipeline():
    # Some phantoms need slightly more EM updates than the default 10000.
    mixture = NanoparticleMixture(max_iter=100_000)
    return Pipeline([("mixture", mixture), ("labeler", NanoparticleLabeler(min_size=3))])


@pytest.fixture(scope="module")
def crops():
    return make_crops(6, (6, 64, 64), n_particles=12, random_state=11)


def test_pipeline_fit_transform_matches_steps():
    image, _ = make_phantom((10, 96, 96), random_state=5)
    labels = make_pipeline().fit_transform(image)
    mixture = NanoparticleMixture(max_iter=100_000).fit(image)
    expected = NanoparticleLabeler(min_size=3).transform(mixture.transform(image))
    np.testing.assert_array_equal(labels, expected)


def test_grid_search_over_prior_and_threshold(crops, tmp_path):
    X, y = crops
    grid = {
        "mixture__beta_prior": [(1.0, 20.0), (1.0, 1000.0)],
        "labeler__threshold": [0.5, 0.95, 0.999999],
    }
    search = GridSearchCV(make_pipeline(), grid, scoring=dice_scorer, cv=KFold(3), n_jobs=2, error_score="raise")
    search.fit(X, y)
    scores = search.cv_results_["mean_test_score"]
    assert scores.shape == (6,) and np.all((scores >= 0) & (scores <= 1))
    # The grid matters: the scores are not all the same.
    assert np.ptp(scores) > 0.01
    best = search.best_estimator_
    assert search.best_score_ == pytest.approx(scores.max())
    # The refitted best pipeline scores the crops as a scorer computed by hand.
    assert dice_scorer(best, X, y) == pytest.approx(search.score(X, y))
    # Sequential search agrees with the parallel one.
    serial = GridSearchCV(make_pipeline(), grid, scoring=dice_scorer, cv=KFold(3), n_jobs=1).fit(X, y)
    np.testing.assert_allclose(serial.cv_results_["mean_test_score"], scores)

    path = tmp_path / "best.joblib"
    joblib.dump(best, path)
    loaded = joblib.load(path)
    new_image, _ = make_phantom((6, 64, 64), n_particles=12, random_state=99)
    for a, b in zip(loaded.transform([new_image]), best.transform([new_image])):
        np.testing.assert_array_equal(a, b)
    assert loaded.get_params(deep=False).keys() == best.get_params(deep=False).keys()


def test_grid_search_on_slices_of_one_volume():
    image, mask = make_phantom((12, 80, 80), n_particles=25, random_state=8)
    search = GridSearchCV(
        make_pipeline(), {"labeler__threshold": [0.5, 0.9]}, scoring=dice_scorer, cv=KFold(2), n_jobs=1
    )
    search.fit(image, mask)  # samples are the Z slices of the volume
    assert search.best_estimator_.transform(image).shape == image.shape
