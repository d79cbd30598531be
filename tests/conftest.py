"""Shared fixtures and helpers for the test suite."""

import numpy as np
import pytest

import nanoseg._volume as volume_module


@pytest.fixture
def small_slabs(monkeypatch):
    """Force tiny slabs so that small test volumes are cut into many slabs."""

    def set_budget(n_bytes):
        monkeypatch.setattr(volume_module, "SLAB_BYTES", n_bytes)

    return set_budget


def assert_same_partition(a, b):
    """Assert two label arrays define the same objects, up to renumbering."""
    a = np.asarray(a)
    b = np.asarray(b)
    assert a.shape == b.shape
    np.testing.assert_array_equal(a > 0, b > 0)
    fg = a > 0
    pairs = np.unique(np.stack([a[fg], b[fg]], axis=1), axis=0)
    # A bijection: every id of a maps to exactly one id of b and vice versa.
    assert np.unique(pairs[:, 0]).size == pairs.shape[0]
    assert np.unique(pairs[:, 1]).size == pairs.shape[0]
