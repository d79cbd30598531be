"""tune shares work between candidates, reports failures once, and chooses between pipelines.

Also: PerVolume exposes the wrapped estimator's parameters under their own
names, and names the crop it could not fit.
"""

import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import FitFailedWarning
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.pipeline import Pipeline

from nanoseg import NanoparticleClassifier, NanoparticleLabeler, NanoparticleMixture
from nanoseg._search import _drop_small
from nanoseg.baselines import GlobalThreshold
from nanoseg.datasets import make_crops, make_phantom
from nanoseg.metrics import object_f1_scorer
from nanoseg.tuning import PerVolume, default_search_space, tune, tuning_pipeline


def framed(seed):
    """A crop inside a bright frame: one seed component whose bounding box is the whole crop."""
    rng = np.random.default_rng(seed)
    image = rng.normal(60, 6, (64, 64))
    frame = np.zeros((64, 64), dtype=bool)
    frame[:3], frame[-3:], frame[:, :3], frame[:, -3:] = True, True, True, True
    image[frame] = rng.uniform(215, 245, frame.sum())
    return image.clip(0, 255).astype(np.uint8), frame


def decoys(n, seed=0, size=128):
    """Crops whose particles (small discs, annotated) are exactly as bright as larger
    squares that are not particles: intensity alone cannot tell them apart, shape can."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    crops, masks = [], []
    for _ in range(n):
        image = rng.normal(60, 8, (size, size))
        mask = np.zeros((size, size), dtype=bool)
        taken = np.zeros((size, size), dtype=bool)
        for kind in ["disc"] * 6 + ["square"] * 6:
            for _ in range(100):
                cy, cx = rng.integers(8, size - 8, 2)
                room = (abs(yy - cy) <= 8) & (abs(xx - cx) <= 8)
                if not (taken & room).any():
                    break
            taken |= room
            if kind == "disc":
                shape = (yy - cy) ** 2 + (xx - cx) ** 2 <= 9
            else:
                shape = (abs(yy - cy) <= 5) & (abs(xx - cx) <= 5)
            image[shape] = rng.normal(170, 8, shape.sum())
            if kind == "disc":
                mask |= shape
        crops.append(image.clip(0, 255).astype(np.uint8))
        masks.append(mask)
    return crops, masks


def best_of(search, learned):
    """Best mean score among the candidates of the classifier (or the mixture) pipeline."""
    scores = search.cv_results_["mean_test_score"]
    rows = [i for i, params in enumerate(search.cv_results_["params"]) if ("classifier" in params) == learned]
    return np.nanmax(scores[rows]) if rows and not np.isnan(scores[rows]).all() else -np.inf


# -- PerVolume's parameters ----------------------------------------------------
def test_per_volume_get_params_clone_round_trip():
    step = PerVolume(NanoparticleMixture(beta_prior=(1.0, 5.0), max_iter=500), on_error="empty")
    shallow = step.get_params(deep=False)
    assert set(shallow) == {"estimator", "on_error"}
    deep = step.get_params(deep=True)
    assert deep["beta_prior"] == deep["estimator__beta_prior"] == (1.0, 5.0)
    assert deep["on_error"] == "empty" and deep["estimator"] is step.estimator
    cloned = clone(step)
    assert cloned is not step and cloned.estimator is not step.estimator
    assert cloned.get_params(deep=True).keys() == deep.keys()
    assert cloned.get_params()["max_iter"] == 500
    # Setting what get_params gives changes nothing; both spellings reach the estimator.
    cloned.set_params(**cloned.get_params(deep=False))
    cloned.set_params(beta_prior=(1.0, 50.0)).set_params(estimator__max_iter=7)
    assert cloned.estimator.beta_prior == (1.0, 50.0) and cloned.estimator.max_iter == 7
    assert step.estimator.beta_prior == (1.0, 5.0)  # the original is untouched
    # A new estimator and its parameter in one call: the parameter goes to the new one.
    cloned.set_params(estimator=GlobalThreshold(), method="li", on_error="raise")
    assert isinstance(cloned.estimator, GlobalThreshold) and cloned.estimator.method == "li"
    assert cloned.on_error == "raise"
    with pytest.raises(ValueError, match=r"'nope' for PerVolume\(GlobalThreshold\).*'estimator', 'on_error'.*'method'"):
        cloned.set_params(nope=1)


def test_mixture_parameters_through_per_volume_in_a_plain_grid_search():
    crops, masks = make_crops(4, (4, 48, 48), n_particles=6, random_state=6)
    pipeline = Pipeline(
        [("mixture", PerVolume(NanoparticleMixture(max_iter=100_000))), ("labeler", NanoparticleLabeler(min_size=3))]
    )
    priors = [(1.0, 1.0), (1.0, 5000.0)]
    search = GridSearchCV(
        pipeline, {"mixture__beta_prior": priors, "labeler__threshold": [0.5, 0.9]}, scoring=object_f1_scorer, cv=2
    ).fit(crops, masks)
    assert set(search.best_params_) == {"mixture__beta_prior", "labeler__threshold"}
    assert search.best_estimator_["mixture"].estimator.beta_prior == search.best_params_["mixture__beta_prior"]
    # The same scores as with scikit-learn's nested spelling.
    nested = GridSearchCV(
        pipeline, {"mixture__estimator__beta_prior": priors, "labeler__threshold": [0.5, 0.9]},
        scoring=object_f1_scorer, cv=2,
    ).fit(crops, masks)
    np.testing.assert_array_equal(search.cv_results_["mean_test_score"], nested.cv_results_["mean_test_score"])
    assert np.ptp(search.cv_results_["mean_test_score"]) > 0  # the prior is not ignored


def test_per_volume_error_names_the_crop_and_the_remedy():
    good = make_crops(1, (64, 64), n_particles=6, random_state=1)[0][0]
    bad, _ = framed(0)
    step = PerVolume(NanoparticleMixture(percentile_low="otsu", halo="box", max_iter=100_000))
    with pytest.raises(ValueError, match=r'on X\[1\]: No background voxels.*halo="dilation"'):
        step.transform([good, bad])
    # Dilation halos leave background between the frame's seeds.
    out = step.set_params(halo="dilation").transform([good, bad])
    assert out[1].shape == bad.shape


# -- shared work -----------------------------------------------------------------
def test_search_fits_each_crop_once_per_setting(monkeypatch):
    crops, masks = make_crops(6, (3, 40, 40), n_particles=5, random_state=2)
    space = {
        "mixture__percentile_low": [97.0, 99.5],
        "mixture__beta_prior": [(1.0, 1.0), (1.0, 20.0), (1.0, 1000.0)],
        "smooth__sigma": [0.0, 1.5],
        "labeler__threshold": [0.5, 0.9, 0.99],
        "labeler__min_size": [3, 10],
    }
    calls = {"fit": 0, "label": 0}
    fit, label = NanoparticleMixture.fit, NanoparticleLabeler.transform

    def counting_fit(self, X, y=None):
        calls["fit"] += 1
        return fit(self, X, y)

    def counting_label(self, X):
        calls["label"] += 1
        return label(self, X)

    monkeypatch.setattr(NanoparticleMixture, "fit", counting_fit)
    monkeypatch.setattr(NanoparticleLabeler, "transform", counting_label)
    search = tune(crops, masks, search_space=space, cv=3, random_state=0, refit=False)
    assert len(search.cv_results_["params"]) == 2 * 3 * 2 * 3 * 2
    # One mixture fit per crop and fitted setting, whatever the prior, the
    # smoothing and the labelling; one labelling for both minimum sizes.
    assert calls["fit"] == 2 * len(crops)
    assert calls["label"] == 2 * 3 * 2 * 3 * len(crops)


def test_search_scores_as_a_grid_search_that_refits_everything():
    crops, masks = make_crops(6, (3, 40, 40), n_particles=5, random_state=2)
    space = {
        "mixture__percentile_low": [97.0, 99.5],
        "mixture__beta_prior": [(1.0, 1.0), (1.0, 1000.0)],
        "labeler__threshold": [0.9],
        "labeler__min_size": [3, 10],
    }
    search = tune(crops, masks, search_space=space, cv=3, random_state=0)
    folds = KFold(3, shuffle=True, random_state=0)
    reference = GridSearchCV(tuning_pipeline(), space, scoring=object_f1_scorer, cv=folds).fit(crops, masks)
    assert reference.cv_results_["params"] == search.cv_results_["params"]
    for k in range(3):
        key = f"split{k}_test_score"
        np.testing.assert_array_equal(search.cv_results_[key], reference.cv_results_[key])
    np.testing.assert_array_equal(search.cv_results_["rank_test_score"], reference.cv_results_["rank_test_score"])
    assert search.best_params_ == reference.best_params_
    # The refitted pipeline labels as the grid search's does.
    np.testing.assert_array_equal(
        search.best_estimator_.transform(crops[0]), reference.best_estimator_.transform(crops[0])
    )


def test_one_volume_whose_slices_are_the_samples():
    volume, mask = make_phantom((8, 40, 40), n_particles=12, random_state=8)
    space = {"mixture__beta_prior": [(1.0, 1.0), (1.0, 1000.0)], "labeler__threshold": [0.5, 0.9]}
    search = tune(volume, mask, search_space=space, cv=2)
    reference = GridSearchCV(tuning_pipeline(), space, scoring=object_f1_scorer, cv=KFold(2)).fit(volume, mask)
    for k in range(2):
        key = f"split{k}_test_score"
        np.testing.assert_array_equal(search.cv_results_[key], reference.cv_results_[key])
    assert search.best_estimator_.transform(volume).shape == volume.shape


@pytest.mark.parametrize("shape", [(64, 64), (4, 40, 40)])
def test_minimum_sizes_from_one_labelling_equal_the_labeller(shape):
    from scipy import ndimage as ndi

    # Blobs of many sizes: smoothed noise.
    field = ndi.gaussian_filter(np.random.default_rng(0).normal(size=shape), 1.5)
    posterior = ((field - field.min()) / np.ptp(field)).astype(np.float32)
    base = NanoparticleLabeler(threshold=0.6, min_size=1).transform(posterior)
    assert base.max() > 10
    for min_size in (2, 5, 20, 10_000):
        expected = NanoparticleLabeler(threshold=0.6, min_size=min_size).transform(posterior)
        derived = _drop_small(base, min_size)
        assert derived.dtype == expected.dtype
        np.testing.assert_array_equal(derived, expected)


# -- failures ---------------------------------------------------------------------
@pytest.mark.parametrize("n_jobs", [1, 2])
def test_failed_fits_are_summarised_in_one_warning(n_jobs, capfd):
    crops, masks = make_crops(4, (64, 64), n_particles=6, random_state=4)
    for index, seed in ((1, 0), (4, 1)):
        image, frame = framed(seed)
        crops.insert(index, image)
        masks.insert(index, np.zeros_like(frame))
    space = {
        "mixture__percentile_low": ["otsu"],
        "mixture__halo": ["box", "dilation"],
        "labeler__threshold": [0.5, 0.9],
        "labeler__min_size": [3],
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        search = tune(crops, masks, search_space=space, cv=3, n_jobs=n_jobs, random_state=0)
    failed = [w for w in caught if issubclass(w.category, FitFailedWarning)]
    assert len(failed) == 1
    message = str(failed[0].message)
    # Which fits (the box halos on the folds that score crop 1 or 4), which
    # crops, which error, and what to change.
    folds = KFold(3, shuffle=True, random_state=0).split(np.arange(6))
    n_failed = 2 * sum(bool({1, 4} & set(test)) for _, test in folds)
    assert f"{n_failed} of 12 fits" in message
    assert "crops 1, 4 (indices into X)" in message
    assert "No background voxels" in message and 'halo="dilation"' in message
    assert "could not be fitted on X" not in message  # the crop is named by its index instead
    assert not [w for w in caught if "non-finite" in str(w.message)]
    # Nothing printed: no traceback of the fits, from this process or the workers.
    printed = capfd.readouterr()
    assert "Traceback" not in printed.err + printed.out
    # The box halos score nan; the search chose dilation.
    for params, score in zip(search.cv_results_["params"], search.cv_results_["mean_test_score"]):
        assert np.isnan(score) == (params["mixture__halo"] == "box")
    assert search.best_params_["mixture__halo"] == "dilation"


def test_every_fit_failing_is_an_error_that_says_why():
    crops, masks = [], []
    for seed in range(3):
        image, frame = framed(seed)
        crops.append(image)
        masks.append(frame)
    space = {"mixture__percentile_low": ["otsu"], "mixture__halo": ["box"], "labeler__threshold": [0.5]}
    with pytest.raises(ValueError, match=r"All the 3 fits failed.*crops 0, 1, 2.*halo=\"dilation\""):
        tune(crops, masks, search_space=space, cv=3)


# -- the search space and the two pipelines ------------------------------------------
def test_beta_prior_is_searched_only_where_it_can_matter():
    crops_2d, masks_2d = make_crops(3, (64, 64), n_particles=6, random_state=5)
    crops_3d, masks_3d = make_crops(3, (3, 32, 32), n_particles=6, random_state=5)
    assert "mixture__beta_prior" not in default_search_space(crops_2d, masks_2d)
    assert "mixture__beta_prior" in default_search_space(crops_2d, masks_2d, per_volume=False)
    assert "mixture__beta_prior" in default_search_space(crops_3d, masks_3d)
    assert "mixture__beta_prior" in default_search_space()
    # Why: a 2D crop is one slice, and under the flat prior its MAP particle
    # fraction is the one EM fitted; another prior only shrinks it a little.
    image = crops_2d[0]
    mixture = NanoparticleMixture(beta_prior=(1.0, 1.0), max_iter=100_000).fit(image)
    flat = mixture.slice_weights(image)[0]
    assert flat == pytest.approx(1.0 - mixture.background_weight_, abs=1e-4)
    strong = mixture.set_params(beta_prior=(1.0, 20.0)).slice_weights(image)[0]
    assert 0 < flat - strong < 0.02 * flat


def test_minimum_sizes_follow_the_annotated_particles():
    masks = [np.zeros((64, 64), dtype=bool) for _ in range(2)]
    masks[0][4:20, 4:20] = True  # 256 voxels
    masks[1][30:46, 30:46] = True
    masks[1][2:4, 2:4] = True  # 4 voxels
    assert default_search_space(y=masks)["labeler__min_size"] == [3, 16, 64]
    assert default_search_space()["labeler__min_size"] == [3, 10, 30]


def test_tune_picks_the_classifier_where_intensity_alone_fails():
    crops, masks = decoys(6)
    search = tune(crops, masks, cv=3, n_iter=2, random_state=0)
    assert isinstance(search.best_params_["classifier"], NanoparticleClassifier)
    assert search.best_params_["mixture"] == "passthrough"
    assert search.best_params_["labeler__radius"] == 0
    # The decoys are as bright as the particles: every mixture setting finds both.
    assert best_of(search, learned=True) > best_of(search, learned=False) + 0.2
    assert search.best_score_ == np.nanmax(search.cv_results_["mean_test_score"])
    # The refitted classifier labels new crops; it was trained on all the crops.
    new, new_masks = decoys(2, seed=1)
    labels = search.best_estimator_.transform(new)
    assert [int(labels[i].max()) > 0 for i in range(2)] == [True, True]
    assert search.best_estimator_["classifier"].n_samples_per_class_.sum() > 0


def test_tune_keeps_the_mixture_when_it_does_as_well():
    crops, masks = make_crops(6, (64, 64), n_particles=8, random_state=7)
    search = tune(crops, masks, cv=3, n_iter=2, random_state=0)
    mixture, learned = best_of(search, learned=False), best_of(search, learned=True)
    assert search.best_score_ == max(mixture, learned)
    # On ties the first candidate wins, and the mixture's come first.
    assert ("classifier" in search.best_params_) == (learned > mixture)
    assert isinstance(search, GridSearchCV)
