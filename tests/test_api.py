"""scikit-learn estimator conventions, checked by hand.

``check_estimator`` skips estimators whose input is 3D, so the checks it
would run are parametrised here over both estimators.
"""

import pickle

import joblib
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.utils._param_validation import InvalidParameterError

from nanoseg import NanoparticleLabeler, NanoparticleMixture


@pytest.fixture(scope="module")
def posterior(volume_8x80x80):
    return NanoparticleMixture().fit(volume_8x80x80).transform(volume_8x80x80)


def data_for(estimator, image, posterior):
    return image if isinstance(estimator, NanoparticleMixture) else posterior


ESTIMATORS = [
    NanoparticleMixture(),
    NanoparticleMixture(beta_prior=(2.0, 50.0), halo_pad=5, sampling_step=2),
    NanoparticleLabeler(),
    NanoparticleLabeler(threshold=0.5, radius=0, connectivity=3, min_size=1),
]
IDS = ["mixture-default", "mixture-custom", "labeler-default", "labeler-custom"]


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=IDS)
def test_default_constructible_and_params_roundtrip(estimator):
    cls = type(estimator)
    default = cls()
    assert set(default.get_params()) == set(cls._parameter_constraints)
    params = estimator.get_params()
    rebuilt = cls(**params)
    assert rebuilt.get_params() == params
    # set_params then get_params is the identity.
    assert cls().set_params(**params).get_params() == params
    assert repr(estimator).startswith(cls.__name__)


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=IDS)
def test_clone_is_unfitted_with_same_params(estimator, volume_8x80x80, posterior):
    fitted = clone(estimator).fit(data_for(estimator, volume_8x80x80, posterior))
    cloned = clone(fitted)
    assert cloned.get_params() == fitted.get_params()
    assert not [k for k in vars(cloned) if k.endswith("_") and not k.startswith("__")]


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=IDS)
def test_fit_returns_self_and_keeps_params(estimator, volume_8x80x80, posterior):
    est = clone(estimator)
    before = pickle.dumps(est.get_params())
    assert est.fit(data_for(est, volume_8x80x80, posterior)) is est
    assert pickle.dumps(est.get_params()) == before


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=IDS)
def test_fit_transform_equals_fit_then_transform(estimator, volume_8x80x80, posterior):
    X = data_for(estimator, volume_8x80x80, posterior)
    a = clone(estimator).fit_transform(X)
    b = clone(estimator).fit(X).transform(X)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=IDS)
@pytest.mark.parametrize("dump", ["pickle", "joblib"])
def test_persistence_gives_identical_outputs(estimator, dump, volume_8x80x80, posterior, tmp_path):
    X = data_for(estimator, volume_8x80x80, posterior)
    est = clone(estimator).fit(X)
    if dump == "pickle":
        loaded = pickle.loads(pickle.dumps(est))
    else:
        joblib.dump(est, tmp_path / "model.joblib")
        loaded = joblib.load(tmp_path / "model.joblib")
    np.testing.assert_array_equal(loaded.transform(X), est.transform(X))


def test_mixture_not_fitted_errors(volume_8x80x80):
    mixture = NanoparticleMixture()
    for method in ("predict_proba", "transform", "slice_weights"):
        with pytest.raises(NotFittedError):
            getattr(mixture, method)(volume_8x80x80)
    with pytest.raises(NotFittedError):
        mixture.posterior_luts([0.1])


def test_labeler_is_stateless(posterior):
    labels = NanoparticleLabeler().transform(posterior)  # no fit needed
    assert labels.max() > 0
    assert NanoparticleLabeler().__sklearn_tags__().requires_fit is False


def test_fitted_attributes_are_small_numpy(volume_8x80x80):
    mixture = NanoparticleMixture().fit(volume_8x80x80)
    fitted = {k: v for k, v in vars(mixture).items() if k.endswith("_")}
    assert set(fitted) == {
        "stack_histogram_", "background_histogram_", "stack_pmf_", "background_pmf_", "particle_pmf_",
        "low_intensity_", "high_intensity_", "background_weight_", "neg_log_likelihood_", "n_iter_",
        "converged_", "n_slices_fit_", "binning_mode_", "binning_low_", "binning_high_", "binning_shift_",
    }
    for name in ("stack_histogram_", "background_histogram_"):
        assert fitted[name].dtype == np.int64 and fitted[name].shape == (256,)
    for name in ("stack_pmf_", "background_pmf_", "particle_pmf_"):
        assert fitted[name].dtype == np.float64 and fitted[name].shape == (256,)
        assert fitted[name].sum() == pytest.approx(1.0)
    assert isinstance(mixture.n_iter_, int) and mixture.converged_ is True
    assert 0 < mixture.background_weight_ < 1
    assert mixture.stack_histogram_.sum() == volume_8x80x80.size
    # 8-bit data is binned by identity.
    assert (mixture.binning_low_, mixture.binning_high_, mixture.binning_shift_) == (0, 255, 0)
    # Nothing in the fitted model refers to the data.
    assert len(pickle.dumps(mixture)) < 20_000


def test_non_convergence_warns(volume_8x80x80):
    with pytest.warns(ConvergenceWarning, match="max_iter=3"):
        mixture = NanoparticleMixture(max_iter=3).fit(volume_8x80x80)
    assert mixture.n_iter_ == 3 and mixture.converged_ is False


def test_tags_declare_3d_input():
    for est in (NanoparticleMixture(), NanoparticleLabeler()):
        tags = est.__sklearn_tags__()
        assert tags.input_tags.three_d_array and not tags.input_tags.two_d_array
        assert tags.target_tags.required is False


@pytest.mark.parametrize(
    "estimator, message",
    [
        (NanoparticleMixture(beta_prior=(0.0, 20.0)), "beta_prior must be a pair"),
        (NanoparticleMixture(beta_prior=(1.0, -1.0)), "beta_prior must be a pair"),
        (NanoparticleMixture(beta_prior=(1.0, 2.0, 3.0)), "beta_prior must be a pair"),
        (NanoparticleMixture(beta_prior=(1.0, np.nan)), "beta_prior must be a pair"),
        (NanoparticleMixture(beta_prior="flat"), "beta_prior"),
        (NanoparticleMixture(percentile_low=0), "'percentile_low' parameter"),
        (NanoparticleMixture(percentile_high=101), "'percentile_high' parameter"),
        (NanoparticleMixture(percentile_low=99.9, percentile_high=99.0), "must not exceed"),
        (NanoparticleMixture(halo_pad=-1), "'halo_pad' parameter"),
        (NanoparticleMixture(min_seed_size=0), "'min_seed_size' parameter"),
        (NanoparticleMixture(sampling_step=0), "'sampling_step' parameter"),
        (NanoparticleMixture(max_iter=0), "'max_iter' parameter"),
        (NanoparticleMixture(tol=-1.0), "'tol' parameter"),
        (NanoparticleMixture(eps=0.0), "'eps' parameter"),
        (NanoparticleMixture(halo_pad=2.5), "'halo_pad' parameter"),
        (NanoparticleLabeler(threshold=1.5), "'threshold' parameter"),
        (NanoparticleLabeler(threshold=-0.1), "'threshold' parameter"),
        (NanoparticleLabeler(radius=-1), "'radius' parameter"),
        (NanoparticleLabeler(connectivity=0), "'connectivity' parameter"),
        (NanoparticleLabeler(connectivity=4), "'connectivity' parameter"),
        (NanoparticleLabeler(min_size=-3), "'min_size' parameter"),
        (NanoparticleLabeler(memory_budget="a lot"), "memory_budget must be a number of bytes"),
        (NanoparticleMixture(memory_budget="12 parsecs"), "memory_budget must be a number of bytes"),
        (NanoparticleMixture(memory_budget=0), "'memory_budget' parameter"),
        (NanoparticleMixture(posterior_dtype="float64"), "'posterior_dtype' parameter"),
    ],
)
def test_invalid_hyper_parameters_are_named(estimator, message, volume_8x80x80, posterior):
    X = data_for(estimator, volume_8x80x80, posterior)
    with pytest.raises(ValueError, match=message):
        estimator.fit(X)
    if isinstance(estimator, NanoparticleLabeler):
        with pytest.raises(ValueError, match=message):
            estimator.transform(X)


def test_sklearn_parameter_errors_are_its_own_type(volume_8x80x80):
    with pytest.raises(InvalidParameterError):
        NanoparticleMixture(max_iter="many").fit(volume_8x80x80)
