"""Property-based tests: invariants that must hold for any input, not only the examples.

Hypothesis draws the phantom seeds, shapes, chunkings, slab budgets and
parameters; each property is checked against an independent computation
(scipy labelling, NumPy input) rather than a stored expected value.
"""

import warnings

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi
from sklearn.exceptions import ConvergenceWarning

from nanoseg import NanoparticleLabeler, NanoparticleMixture
from nanoseg._ops.components import connectivity_structure
from nanoseg.datasets import make_phantom

SETTINGS = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)


def phantom(seed, shape):
    image, mask = make_phantom(shape, n_particles=max(3, shape[1] * shape[2] // 600), random_state=seed)
    return image, mask


def fitted_mixture(image, **params):
    # Few EM updates suffice for the properties; a slow convergence is not what is tested.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return NanoparticleMixture(**params).fit(image)


def to_zarr(array, chunks):
    z = zarr.create_array(store={}, shape=array.shape, chunks=chunks, dtype=array.dtype)
    z[...] = array
    return z


shapes = st.tuples(st.integers(3, 9), st.integers(40, 72), st.integers(40, 72))
seeds = st.integers(0, 2**16)
beta_priors = st.tuples(st.floats(0.5, 5.0), st.floats(1.0, 200.0))


@SETTINGS
@given(seed=seeds, shape=shapes, beta_prior=beta_priors)
def test_posterior_is_a_probability(seed, shape, beta_prior):
    image, _ = phantom(seed, shape)
    mixture = fitted_mixture(image, beta_prior=beta_prior)
    posterior = mixture.predict_proba(image)
    assert posterior.shape == image.shape
    assert np.isfinite(posterior).all()
    assert posterior.min() >= 0.0 and posterior.max() <= 1.0
    # Within a slice the posterior is a function of intensity alone.
    z = seed % shape[0]
    values, first = np.unique(image[z], return_index=True)
    table = posterior[z].ravel()[first]
    np.testing.assert_array_equal(posterior[z], table[np.searchsorted(values, image[z])])


@st.composite
def masks(draw):
    shape = draw(st.tuples(st.integers(1, 8), st.integers(1, 24), st.integers(1, 24)))
    density = draw(st.floats(0.0, 0.6))
    seed = draw(seeds)
    rng = np.random.default_rng(seed)
    return rng.random(shape) < density


@SETTINGS
@given(mask=masks(), connectivity=st.integers(1, 3), min_size=st.integers(1, 6))
def test_labels_are_sequential_and_follow_the_mask(mask, connectivity, min_size):
    labels = NanoparticleLabeler(threshold=0.5, radius=0, connectivity=connectivity, min_size=min_size).transform(
        mask.astype(np.float32)
    )
    assert labels.dtype == np.uint32 and labels.shape == mask.shape
    present = np.unique(labels)
    # Sequential: 0 (if any background) and 1..K with no gaps.
    assert np.array_equal(present[present > 0], np.arange(1, present.max() + 1)) or present.max() == 0
    # Independent check: components of the mask with scipy, small ones dropped.
    reference, n = ndi.label(mask, structure=connectivity_structure(3, connectivity))
    sizes = np.bincount(reference.ravel(), minlength=n + 1)
    kept = sizes >= min_size
    kept[0] = False
    np.testing.assert_array_equal(labels > 0, kept[reference])
    # Every kept component carries exactly one label, and no label spans two.
    pairs = np.unique(np.stack([reference[labels > 0], labels[labels > 0]]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


@SETTINGS
@given(mask=masks(), radius=st.integers(1, 2))
def test_closing_only_adds_voxels(mask, radius):
    labels = NanoparticleLabeler(threshold=0.5, radius=radius, min_size=1).transform(mask.astype(np.float32))
    # A closing is extensive: every mask voxel stays foreground.
    assert np.all(labels[mask] > 0)


chunkings = st.tuples(st.integers(1, 9), st.integers(7, 72), st.integers(7, 72))


@pytest.mark.filterwarnings("ignore:The memory budget leaves:UserWarning")  # tiny budgets on purpose
@SETTINGS
@given(seed=seeds, shape=shapes, chunks=chunkings, budget=st.integers(1, 200_000))
def test_results_do_not_depend_on_chunking(seed, shape, chunks, budget):
    image, _ = phantom(seed, shape)
    chunks = tuple(min(c, s) for c, s in zip(chunks, shape))
    mixture = fitted_mixture(image)
    stored = fitted_mixture(to_zarr(image, chunks), memory_budget=budget)
    np.testing.assert_array_equal(stored.particle_pmf_, mixture.particle_pmf_)
    np.testing.assert_array_equal(stored.background_histogram_, mixture.background_histogram_)
    posterior = mixture.predict_proba(image)
    lazy = stored.predict_proba(to_zarr(image, chunks)).compute()
    np.testing.assert_array_equal(lazy, posterior)
    labeler = NanoparticleLabeler(threshold=0.5, min_size=2)
    expected = labeler.transform(posterior)
    got = NanoparticleLabeler(threshold=0.5, min_size=2, memory_budget=budget).transform(to_zarr(posterior, chunks))
    np.testing.assert_array_equal(got.compute(), expected)


@SETTINGS
@given(seed=seeds, n_crops=st.integers(2, 5), data=st.data())
def test_permuting_crops_permutes_outputs(seed, n_crops, data):
    rng = np.random.default_rng(seed)
    crops = [phantom(int(s), (int(rng.integers(2, 5)), 48, 56))[0] for s in rng.integers(0, 2**16, n_crops)]
    order = data.draw(st.permutations(range(n_crops)))
    mixture = fitted_mixture(crops)
    permuted = fitted_mixture([crops[i] for i in order])
    # The crops' histograms are pooled, so the fit does not see the order ...
    np.testing.assert_array_equal(permuted.particle_pmf_, mixture.particle_pmf_)
    # ... and each crop's outputs depend on that crop alone.
    posteriors = mixture.transform(crops)
    permuted_posteriors = permuted.transform([crops[i] for i in order])
    for position, i in enumerate(order):
        np.testing.assert_array_equal(permuted_posteriors[position], posteriors[i])
    labeler = NanoparticleLabeler(threshold=0.5, min_size=2)
    labels = labeler.transform(posteriors)
    permuted_labels = labeler.transform(permuted_posteriors)
    for position, i in enumerate(order):
        np.testing.assert_array_equal(permuted_labels[position], labels[i])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -0.1, 1.5])
def test_labeler_rejects_values_that_are_not_probabilities(bad):
    posterior = np.zeros((2, 8, 8), dtype=np.float32)
    posterior[1, 3, 3] = bad
    with pytest.raises(ValueError):
        NanoparticleLabeler().transform(posterior)
