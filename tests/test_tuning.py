"""Tuning against annotated crops: PerVolume, PrefitMixture and tune."""

import pickle
from typing import ClassVar

import numpy as np
import pytest
import zarr
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.pipeline import Pipeline
from sklearn.utils._param_validation import InvalidParameterError
from zarr.storage import MemoryStore, WrapperStore

from nanoseg import EMCollapseError, NanoparticleLabeler, NanoparticleMixture
from nanoseg.baselines import GlobalThreshold
from nanoseg.datasets import make_crops, make_phantom
from nanoseg.metrics import match_objects, object_f1_scorer
from nanoseg.preprocessing import PosteriorSmoother
from nanoseg.splitting import ParticleSplitter
from nanoseg.tuning import (
    PerVolume,
    PrefitMixture,
    default_search_space,
    tune,
    tuning_pipeline,
)


def two_backgrounds():
    """A dim and a bright image, each with one 2 x 2 particle 50-80 levels above its background."""
    dim = np.full((6, 6), 20, dtype=np.uint8)
    dim[2:4, 2:4] = 70
    bright = np.full((6, 6), 140, dtype=np.uint8)
    bright[2:4, 2:4] = 220
    return [dim, bright]


class RecordsFit(GlobalThreshold):
    """A baseline that records what its fit received."""

    calls: ClassVar[list] = []

    def fit(self, X, y=None):
        RecordsFit.calls.append((np.asarray(X).copy(), y))
        return super().fit(X, y)


# -- PerVolume ---------------------------------------------------------------
def test_per_volume_fits_each_item_on_its_own():
    images = two_backgrounds()
    # One Otsu threshold for both images lies between the two backgrounds,
    # so the whole bright image is foreground and the dim particle is lost.
    pooled = GlobalThreshold(method="otsu").fit(images).transform(images)
    assert [int(m.sum()) for m in pooled] == [0, 36]
    per_volume = PerVolume(GlobalThreshold(method="otsu"))
    out = per_volume.fit(images).transform(images)
    assert isinstance(out, list) and len(out) == 2
    for image, mask in zip(images, out):
        expected = np.zeros((6, 6), dtype=np.float32)
        expected[2:4, 2:4] = 1
        np.testing.assert_array_equal(mask, expected)
        # Same as fitting a fresh threshold on that image alone.
        np.testing.assert_array_equal(mask, GlobalThreshold(method="otsu").fit(image).transform(image))


def test_per_volume_mixture_equals_one_mixture_per_crop():
    crops, _ = make_crops(3, (4, 48, 48), n_particles=6, random_state=3)
    mixture = NanoparticleMixture(max_iter=100_000)
    out = PerVolume(mixture).fit_transform(crops)
    for crop, posterior in zip(crops, out):
        np.testing.assert_array_equal(posterior, clone(mixture).fit(crop).predict_proba(crop))
    # A single array is one volume: one model, one array out.
    single = PerVolume(mixture).transform(crops[0])
    np.testing.assert_array_equal(single, out[0])


def test_per_volume_fit_learns_nothing_and_never_passes_annotations():
    images = two_backgrounds()
    masks = [image > 100 for image in images]
    per_volume = PerVolume(RecordsFit(method="otsu"))
    before = dict(vars(per_volume))
    assert per_volume.fit(images, masks) is per_volume
    assert vars(per_volume) == before
    RecordsFit.calls.clear()
    per_volume.fit_transform(images, masks)
    assert len(RecordsFit.calls) == 2
    assert all(y is None for _, y in RecordsFit.calls)
    np.testing.assert_array_equal(RecordsFit.calls[1][0], images[1])
    # The wrapped estimator itself is never fitted.
    assert not hasattr(per_volume.estimator, "threshold_")


def test_per_volume_params_are_searchable_in_a_pipeline():
    pipeline = Pipeline([("mixture", PerVolume(NanoparticleMixture())), ("labeler", NanoparticleLabeler())])
    assert pipeline.get_params()["mixture__estimator__beta_prior"] == (1.0, 20.0)
    pipeline.set_params(mixture__estimator__beta_prior=(1.0, 500.0))
    assert pipeline["mixture"].estimator.beta_prior == (1.0, 500.0)
    cloned = clone(pipeline)
    assert cloned["mixture"].estimator.beta_prior == (1.0, 500.0)
    assert cloned["mixture"].estimator is not pipeline["mixture"].estimator


def test_per_volume_on_error():
    flat = np.full((8, 8), 50, dtype=np.uint8)
    images = [two_backgrounds()[0], flat]
    with pytest.raises(ValueError, match="distinct intensit"):
        PerVolume(GlobalThreshold(method="otsu")).transform(images)
    with pytest.warns(UserWarning, match=r"X\[1\].*no particle"):
        out = PerVolume(GlobalThreshold(method="otsu"), on_error="empty").transform(images)
    assert out[0].sum() == 4
    assert out[1].dtype == np.float32 and out[1].shape == (8, 8) and not out[1].any()


def test_per_volume_on_error_empty_catches_em_collapse(monkeypatch):
    def collapse(self, X, y=None):
        raise EMCollapseError("the particle component vanished")

    monkeypatch.setattr(NanoparticleMixture, "fit_transform", collapse)
    image = two_backgrounds()[1]
    with pytest.raises(EMCollapseError):
        PerVolume(NanoparticleMixture()).transform(image)
    with pytest.warns(UserWarning, match="EMCollapseError"):
        out = PerVolume(NanoparticleMixture(), on_error="empty").transform(image)
    assert out.shape == image.shape and not out.any()


def test_per_volume_invalid_parameters_always_raise():
    image = two_backgrounds()[0]
    with pytest.raises(InvalidParameterError, match="method"):
        PerVolume(GlobalThreshold(method="nope"), on_error="empty").transform(image)
    with pytest.raises(InvalidParameterError, match="on_error"):
        PerVolume(GlobalThreshold(), on_error="skip").fit(image)
    with pytest.raises(InvalidParameterError, match="estimator"):
        PerVolume("otsu").fit(image)


def test_per_volume_checks_inputs():
    images = two_backgrounds()
    with pytest.raises(ValueError, match="empty list"):
        PerVolume(GlobalThreshold()).transform([])
    with pytest.raises(ValueError, match=r"y\[1\] has shape"):
        PerVolume(GlobalThreshold()).fit(images, [np.zeros((6, 6)), np.zeros((5, 6))])
    with pytest.raises(ValueError, match="2D image"):
        PerVolume(GlobalThreshold()).transform(np.zeros((2, 2, 2, 2), dtype=np.uint8))


def test_per_volume_lazy_input_gives_lazy_output():
    import dask.array as da

    volume, _ = make_phantom((6, 48, 48), n_particles=8, random_state=4)
    z = zarr.create_array(store={}, shape=volume.shape, chunks=(2, 48, 48), dtype=volume.dtype)
    z[...] = volume
    mixture = NanoparticleMixture(max_iter=100_000)
    out = PerVolume(mixture).transform(z)
    assert isinstance(out, da.Array)
    np.testing.assert_array_equal(out.compute(), clone(mixture).fit(volume).predict_proba(volume))


# -- PrefitMixture -----------------------------------------------------------
class CountingStore(WrapperStore):
    """Counts chunk reads; refuses to be pickled, so no worker process can hold it."""

    def __init__(self, store):
        super().__init__(store)
        self.reads = 0

    async def get(self, key, prototype, byte_range=None):
        if "/c/" in key or key.startswith("c/"):
            self.reads += 1
        return await super().get(key, prototype, byte_range)

    def __reduce__(self):
        raise TypeError("the big volume's store must not travel to a search's workers")


@pytest.fixture(scope="module")
def big_volume():
    volume, _ = make_phantom((24, 96, 96), n_particles=40, random_state=5)
    store = CountingStore(MemoryStore())
    z = zarr.create_array(store=store, shape=volume.shape, chunks=(4, 48, 48), dtype=volume.dtype)
    z[...] = volume
    return volume, z, store


@pytest.fixture(scope="module")
def crops():
    return make_crops(4, (4, 48, 48), n_particles=6, random_state=6)


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_prefit_search_never_reads_the_big_volume(big_volume, crops, n_jobs):
    volume, z, store = big_volume
    images, masks = crops
    store.reads = 0
    mixture = NanoparticleMixture(max_iter=100_000).fit(z)
    assert store.reads > 0  # the one fit did read it
    store.reads = 0
    pipeline = Pipeline([("mixture", PrefitMixture(mixture)), ("labeler", NanoparticleLabeler(min_size=3))])
    grid = {
        "mixture__beta_prior": [(1.0, 1.0), (1.0, 20.0), (1.0, 5000.0)],
        "labeler__threshold": [0.5, 0.9, 0.999],
    }
    search = GridSearchCV(pipeline, grid, scoring=object_f1_scorer, cv=2, n_jobs=n_jobs, error_score="raise")
    search.fit(images, masks)
    assert store.reads == 0
    # Every candidate used the big volume's model with its own prior: the
    # best one gives the posterior of a mixture fitted on the big volume with
    # that prior.
    prior = search.best_params_["mixture__beta_prior"]
    reference = NanoparticleMixture(beta_prior=prior, max_iter=100_000).fit(volume)
    best = search.best_estimator_
    for image in images[:2]:
        np.testing.assert_array_equal(best["mixture"].transform(image), reference.predict_proba(image))
    assert store.reads == 0
    # The search's scores differ between priors (the prior is not ignored).
    scores = search.cv_results_["mean_test_score"]
    assert np.ptp(scores) > 0


def test_prefit_clone_keeps_the_fitted_mixture(big_volume):
    volume = big_volume[0]
    mixture = NanoparticleMixture(max_iter=100_000).fit(volume)
    prefit = PrefitMixture(mixture, beta_prior=(1.0, 5.0))
    cloned = clone(prefit)
    assert cloned.mixture is mixture
    assert cloned.beta_prior == (1.0, 5.0) and cloned is not prefit
    assert not hasattr(cloned, "mixture_")  # the clone itself is unfitted
    pipeline_clone = clone(Pipeline([("mixture", prefit)]))
    assert pipeline_clone["mixture"].mixture is mixture
    # The wrapped mixture's parameters are not exposed, so no search can alter it.
    assert set(prefit.get_params(deep=True)) == {"mixture", "beta_prior", "posterior_dtype"}
    with pytest.raises(ValueError, match="Invalid parameter"):
        Pipeline([("mixture", prefit)]).set_params(mixture__mixture__beta_prior=(1.0, 1.0))


def test_prefit_fit_copies_state_and_applies_prior(big_volume, crops):
    volume = big_volume[0]
    image = crops[0][0]
    mixture = NanoparticleMixture(max_iter=100_000).fit(volume)
    pmf = mixture.particle_pmf_.copy()
    prefit = PrefitMixture(mixture, beta_prior=(1.0, 1000.0), posterior_dtype="float16")
    assert prefit.fit() is prefit
    fitted = prefit.mixture_
    assert fitted is not mixture
    np.testing.assert_array_equal(fitted.particle_pmf_, pmf)
    assert fitted.particle_pmf_ is not mixture.particle_pmf_
    assert fitted.low_intensity_ == mixture.low_intensity_
    assert fitted.beta_prior == (1.0, 1000.0) and fitted.posterior_dtype == "float16"
    # The wrapped mixture is left as it was.
    assert mixture.beta_prior == (1.0, 20.0) and mixture.posterior_dtype == "float32"
    np.testing.assert_array_equal(mixture.particle_pmf_, pmf)
    # Posterior and slice weights are those of the mixture under the new prior.
    expected = clone(mixture).set_params(beta_prior=(1.0, 1000.0), posterior_dtype="float16").fit(volume)
    np.testing.assert_array_equal(prefit.transform(image), expected.predict_proba(image))
    np.testing.assert_array_equal(prefit.slice_weights(image), expected.slice_weights(image))
    # A stronger pull towards zero lowers every slice's particle fraction.
    assert np.all(prefit.slice_weights(image) <= mixture.slice_weights(image))
    # None keeps the mixture's own settings.
    plain = PrefitMixture(mixture).fit()
    np.testing.assert_array_equal(plain.transform(image), mixture.predict_proba(image))
    # A FrozenEstimator is accepted as the wrapper of a fitted mixture.
    frozen = PrefitMixture(FrozenEstimator(mixture)).fit()
    np.testing.assert_array_equal(frozen.transform(image), mixture.predict_proba(image))
    # It survives pickling with its state.
    restored = pickle.loads(pickle.dumps(prefit))
    np.testing.assert_array_equal(restored.transform(image), prefit.transform(image))


def test_prefit_errors(crops):
    image = crops[0][0]
    with pytest.raises(NotFittedError, match="not fitted: fit it first"):
        PrefitMixture(NanoparticleMixture()).fit()
    with pytest.raises(TypeError, match="must be a fitted NanoparticleMixture"):
        PrefitMixture(GlobalThreshold().fit(image)).fit()
    mixture = NanoparticleMixture(max_iter=100_000).fit(image)
    with pytest.raises(ValueError, match="beta_prior must be a pair"):
        PrefitMixture(mixture, beta_prior=(1.0, -2.0)).fit()
    with pytest.raises(InvalidParameterError, match="posterior_dtype"):
        PrefitMixture(mixture, posterior_dtype="int8").fit()
    with pytest.raises(NotFittedError):
        PrefitMixture(mixture).transform(image)


# -- tune ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def crops_2d():
    images, masks = make_crops(8, (96, 96), n_particles=10, random_state=7)
    return images, masks


def test_tune_on_2d_crops_in_parallel(crops_2d):
    images, masks = crops_2d
    train_x, train_y = images[:6], masks[:6]
    space = {
        "mixture__percentile_low": [97.0, 99.5],
        "smooth__sigma": [1.5],
        "labeler__threshold": [0.5, 0.99],
        "labeler__min_size": [3],
        "split": ["passthrough", ParticleSplitter(min_distance=3)],
    }
    search = tune(train_x, train_y, search_space=space, cv=3, n_jobs=2, random_state=0)
    assert isinstance(search, GridSearchCV)
    assert len(search.cv_results_["params"]) == 8
    # Mixture parameters keep their short names through PerVolume.
    assert set(search.best_params_) == {
        "mixture__percentile_low",
        "smooth__sigma",
        "labeler__threshold",
        "labeler__min_size",
        "split",
    }
    best = search.best_estimator_
    assert isinstance(best["mixture"], PerVolume)
    # The best setting labels new images; its labels are those of the same
    # steps run by hand, with the mixture fitted on that image.
    new_x, new_y = images[6:], masks[6:]
    labels = best.transform(new_x)
    assert isinstance(labels, list) and len(labels) == 2
    params = search.best_params_
    for image, out in zip(new_x, labels):
        assert out.shape == image.shape and out.dtype == np.uint32
        mixture = NanoparticleMixture(max_iter=100_000, percentile_low=params["mixture__percentile_low"])
        posterior = PosteriorSmoother(sigma=params["smooth__sigma"]).transform(mixture.fit_transform(image))
        expected = NanoparticleLabeler(
            threshold=params["labeler__threshold"], min_size=params["labeler__min_size"]
        ).transform(posterior)
        if params["split"] != "passthrough":
            expected = params["split"].transform(expected)
        np.testing.assert_array_equal(out, expected)
    # The phantom's particles are clearly brighter than the background: the
    # tuned pipeline finds most of them.
    assert match_objects(labels, new_y)["f1"] > 0.6
    # The best score is the best mean over the folds.
    assert search.best_score_ == np.max(search.cv_results_["mean_test_score"])


def test_tune_scores_by_hand(crops_2d):
    """best_score_ is the mean over KFold(2) of the pooled object F1 on the held-out crops."""
    images, masks = crops_2d
    images, masks = images[:4], masks[:4]
    space = {"mixture__percentile_low": [99.0], "labeler__threshold": [0.5, 0.95], "labeler__min_size": [3]}
    search = tune(images, masks, search_space=space, cv=2, per_volume=True)
    for i, params in enumerate(search.cv_results_["params"]):
        threshold = params["labeler__threshold"]
        fold_scores = []
        for train, test in KFold(2).split(images):
            labels = []
            for j in test:
                posterior = NanoparticleMixture(max_iter=100_000, percentile_low=99.0).fit_transform(images[j])
                posterior = PosteriorSmoother().transform(posterior)
                labels.append(NanoparticleLabeler(threshold=threshold, min_size=3).transform(posterior))
            fold_scores.append(match_objects(labels, [masks[j] for j in test])["f1"])
        assert search.cv_results_["mean_test_score"][i] == pytest.approx(np.mean(fold_scores), abs=1e-12)


def test_tune_pooled_mixture_and_baseline_steps(crops_2d):
    images, masks = crops_2d
    images, masks = images[:4], masks[:4]
    pooled = tune(
        images, masks, search_space={"labeler__threshold": [0.5], "mixture__beta_prior": [(1.0, 20.0)]},
        cv=2, per_volume=False,
    )
    assert isinstance(pooled.best_estimator_["mixture"], NanoparticleMixture)
    assert "mixture__beta_prior" in pooled.best_params_
    # The pooled mixture is fitted on all crops together.
    expected = NanoparticleMixture(max_iter=100_000).fit(images)
    np.testing.assert_array_equal(pooled.best_estimator_["mixture"].particle_pmf_, expected.particle_pmf_)
    baseline = tune(
        images, masks,
        search_space={"mixture": [GlobalThreshold(method="otsu")], "labeler__threshold": [0.5]},
        cv=2,
    )
    step = baseline.best_estimator_["mixture"]
    assert isinstance(step, PerVolume) and isinstance(step.estimator, GlobalThreshold)
    # A list of dicts: each dict routes its own keys.
    both = tune(
        images, masks,
        search_space=[
            {"mixture__percentile_low": [99.0, 99.5]},
            {"mixture": [GlobalThreshold()], "mixture__method": ["otsu", "li"]},
        ],
        cv=2,
    )
    keys = {key for params in both.cv_results_["params"] for key in params}
    assert {"mixture__percentile_low", "mixture__method", "mixture"} <= keys
    assert len(both.cv_results_["params"]) == 4


def test_tune_samples_the_fitted_settings_of_large_spaces(crops_2d):
    images, masks = crops_2d
    # Five fitted (mixture) settings, two labelling settings: n_iter caps the
    # former, and each drawn mixture is tried with every labelling setting.
    space = {
        "mixture__percentile_low": [90.0, 95.0, 97.0, 99.0, 99.5],
        "labeler__threshold": [0.5, 0.9],
        "labeler__min_size": [3],
    }
    search = tune(images[:4], masks[:4], search_space=space, cv=2, n_iter=2, random_state=0, refit=False)
    assert isinstance(search, GridSearchCV)
    params = search.cv_results_["params"]
    assert len(params) == 4
    drawn = {p["mixture__percentile_low"] for p in params}
    assert len(drawn) == 2 and drawn <= set(space["mixture__percentile_low"])
    assert all(sum(p["mixture__percentile_low"] == value for p in params) == 2 for value in drawn)
    assert not hasattr(search, "best_estimator_")
    again = tune(images[:4], masks[:4], search_space=space, cv=2, n_iter=2, random_state=0, refit=False)
    assert again.cv_results_["params"] == params
    # Labelling settings alone are never sampled: they cost little.
    small = tune(images[:4], masks[:4], search_space={"labeler__threshold": [0.5, 0.6, 0.7, 0.8, 0.9]},
                 cv=2, n_iter=1, refit=False)
    assert len(small.cv_results_["params"]) == 5


def test_default_space_and_pipeline(crops_2d):
    pipeline = tuning_pipeline()
    assert [name for name, _ in pipeline.steps] == ["background", "classifier", "mixture", "smooth", "labeler", "split"]
    assert pipeline.named_steps["classifier"] == "passthrough"
    images, masks = crops_2d
    params = pipeline.get_params()
    pooled = tuning_pipeline(per_volume=False).get_params()
    for space in (default_search_space(), default_search_space(images, masks)):
        # Every key of the default space names a parameter of the pipeline,
        # through PerVolume or not.
        for key in space:
            assert key in params and key in pooled
        # Every percentile_low may be combined with the default percentile_high.
        numeric = [p for p in space["mixture__percentile_low"] if p != "otsu"]
        assert max(numeric) <= NanoparticleMixture().percentile_high
        assert "split" not in space
    # The count the documentation gives: 32 fitted settings, the prior only for stacks.
    fitted = [key for key in default_search_space() if key.split("__")[0] in ("background", "mixture")]
    fitted.remove("mixture__beta_prior")
    assert int(np.prod([len(default_search_space()[key]) for key in fitted])) == 32
    assert "mixture__beta_prior" not in default_search_space(images, masks)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"scoring": "accuracy"}, ValueError, "scoring must be one of"),
        ({"scoring": 3}, TypeError, "scoring must be a string or a callable"),
        ({"cv": 5}, ValueError, "needs at least 5 crops"),
        ({"n_iter": 0}, ValueError, "n_iter must be an integer"),
        ({"search_space": "everything"}, ValueError, "search_space must be 'default'"),
        ({"search_space": {"labeler__threshold": 0.5}}, TypeError, "must be a list of values"),
        ({"search_space": {"labeler__threshold": []}}, ValueError, "is empty"),
        ({"search_space": 7}, TypeError, "search_space must be 'default'"),
    ],
)
def test_tune_errors(crops_2d, kwargs, error, message):
    images, masks = crops_2d
    with pytest.raises(error, match=message):
        tune(images[:3], masks[:3], **{"cv": 2, **kwargs})


def test_tune_checks_annotations(crops_2d):
    images, masks = crops_2d
    with pytest.raises(ValueError, match="pass one mask per crop"):
        tune(images[:3], masks[:2], cv=2)
    with pytest.raises(ValueError, match="shape"):
        tune(images[:3], [masks[0], masks[1], masks[2][:10]], cv=2)


def test_tune_is_exported_at_the_top_level():
    import nanoseg
    import nanoseg.tuning

    assert nanoseg.tune is nanoseg.tuning.tune
    assert "tune" in nanoseg.__all__
