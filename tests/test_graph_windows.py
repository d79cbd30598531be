"""Slabs of lazy volumes from culled graph windows: same values, graphs that do not grow with the volume."""

import dask.array as da
import numpy as np
import pytest

import nanoseg._engine.graph_windows as windows_module
from nanoseg import NanoparticleLabeler, NanoparticleMixture
from nanoseg._engine.graph_windows import GraphWindows, narrowed


def n_tasks(array):
    return len(dict(array.__dask_graph__()))


@pytest.fixture(scope="module")
def deep():
    """A lazy volume of 240 one-plane chunks, a few graph layers deep."""
    rng = np.random.default_rng(0)
    values = rng.random((240, 12, 10)).astype(np.float32)
    lazy = (da.from_array(values, chunks=(1, 12, 10)) * 2.0 + 1.0).map_blocks(np.sqrt)
    return values, lazy


def test_narrowed_keeps_the_values_and_only_the_tasks_it_needs(deep):
    values, lazy = deep
    part = narrowed(lazy, 30, 41)
    np.testing.assert_array_equal(part.compute(), np.sqrt(values[30:41] * 2.0 + 1.0))
    # Culled: a handful of tasks per plane, not the whole volume's.
    assert n_tasks(part) <= 11 * 4 < n_tasks(lazy) / 10


def test_windows_give_the_slices_of_the_array(deep):
    values, lazy = deep
    expected = np.sqrt(values * 2.0 + 1.0)
    windows = GraphWindows(lazy, longest=9, depth=5, n_cached=2)
    assert not windows.whole and windows.stride == int(np.sqrt(240 * 5))
    rng = np.random.default_rng(1)
    starts = list(range(0, 240, 5)) + list(rng.integers(0, 231, 30))  # forward, then anywhere
    for lo in starts:
        hi = min(240, lo + int(rng.integers(1, 10)))
        np.testing.assert_array_equal(windows.compute(lo, hi), expected[lo:hi])
        assert len(windows._windows) <= 2
    with pytest.raises(ValueError, match="span more than 9"):
        windows.compute(0, 10)


def test_a_shallow_volume_is_computed_directly(deep):
    _, lazy = deep
    assert GraphWindows(lazy[:16], longest=9, depth=5).whole  # stride 8, + 9 planes >= 16
    assert not GraphWindows(lazy[:40], longest=9, depth=5).whole


def test_lazy_labelling_computes_slabs_from_windows(monkeypatch, small_slabs):
    """Every slab of the analysis pass is computed from a window of the
    graph (a few culls in all), and the labels equal the in-memory ones."""
    from nanoseg.datasets import make_phantom

    volume = make_phantom((60, 48, 48), n_particles=40, random_state=2)[0]
    mixture = NanoparticleMixture(tol=1e-6).fit(volume)
    small_slabs(48 * 48 * 12 * 2)
    culls = []
    original = windows_module.narrowed

    def counting(array, lo, hi):
        culls.append((lo, hi))
        return original(array, lo, hi)

    monkeypatch.setattr(windows_module, "narrowed", counting)
    lazy = NanoparticleLabeler(min_size=3).transform(mixture.transform(da.from_array(volume, chunks=(1, 48, 48))))
    expected = NanoparticleLabeler(min_size=3).transform(mixture.transform(volume))
    np.testing.assert_array_equal(lazy.compute(), expected)
    n_slabs = -(-60 // 2)
    assert 1 < len(culls) < n_slabs / 2
