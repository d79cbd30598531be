"""Pickles carry the nanoseg version and warn when loaded by another one."""

import pickle
import warnings

import numpy as np
import pytest

import nanoseg
import nanoseg._version
from nanoseg import NanoparticleLabeler, NanoparticleMixture
from nanoseg.datasets import make_phantom
from nanoseg.persistence import ModelVersionWarning


@pytest.fixture(scope="module")
def fitted():
    image = make_phantom((4, 48, 48), n_particles=5, random_state=0)[0]
    return NanoparticleMixture(max_iter=100_000).fit(image), image


def test_same_version_round_trip_is_silent_and_identical(fitted):
    mixture, image = fitted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = pickle.loads(pickle.dumps(mixture))
    assert not hasattr(loaded, "_nanoseg_version")
    np.testing.assert_array_equal(loaded.predict_proba(image), mixture.predict_proba(image))


@pytest.mark.parametrize("estimator", [NanoparticleLabeler(), None])
def test_other_version_warns_with_both_versions(fitted, monkeypatch, estimator):
    estimator = fitted[0] if estimator is None else estimator
    monkeypatch.setattr(nanoseg._version, "__version__", "0.0.1")
    data = pickle.dumps(estimator)
    monkeypatch.undo()
    with pytest.warns(ModelVersionWarning, match=r"0\.0\.1.*" + nanoseg.__version__.replace(".", r"\.")):
        loaded = pickle.loads(data)
    assert loaded.get_params() == estimator.get_params()
