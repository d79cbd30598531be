"""Shared fixtures and helpers for the test suite.

The phantoms below are built once per test session and shared by every test
module that asks for them. Tests must treat them as read-only (copy before
changing one): each fixture checks at teardown that its arrays were not
modified in place. ``volume_*`` fixtures are the image alone; ``phantom_*``
and ``default_phantom`` are tuples with the ground truth.
"""

import numpy as np
import pytest

import nanoseg._plan as plan_module
from nanoseg.datasets import make_phantom


@pytest.fixture
def small_slabs(monkeypatch):
    """Force tiny slabs so that small test volumes are cut into many slabs."""

    def set_budget(n_bytes):
        monkeypatch.setattr(plan_module, "SLAB_BYTES", n_bytes)

    return set_budget


# -- shared phantoms ------------------------------------------------------------
def _shared(data):
    """Yield ``data`` (an array or a tuple of arrays), then check that no test changed it."""
    arrays = data if isinstance(data, tuple) else (data,)
    originals = [(array.copy(), array.flags.writeable) for array in arrays]
    yield data
    for array, (original, writeable) in zip(arrays, originals, strict=True):
        assert array.flags.writeable == writeable, "a test changed the flags of a shared phantom"
        np.testing.assert_array_equal(array, original, err_msg="a test modified a shared phantom in place")


@pytest.fixture(scope="session")
def volume_6x64x64():
    """``make_phantom((6, 64, 64), n_particles=10, random_state=4)[0]``."""
    yield from _shared(make_phantom((6, 64, 64), n_particles=10, random_state=4)[0])


@pytest.fixture(scope="session")
def volume_8x80x80():
    """``make_phantom((8, 80, 80), n_particles=15, random_state=2)[0]``."""
    yield from _shared(make_phantom((8, 80, 80), n_particles=15, random_state=2)[0])


@pytest.fixture(scope="session")
def volume_10x72x80():
    """``make_phantom((10, 72, 80), n_particles=20, random_state=2)[0]``."""
    yield from _shared(make_phantom((10, 72, 80), n_particles=20, random_state=2)[0])


@pytest.fixture(scope="session")
def volume_12x96x112():
    """``make_phantom((12, 96, 112), n_particles=15, random_state=3)[0]``."""
    yield from _shared(make_phantom((12, 96, 112), n_particles=15, random_state=3)[0])


@pytest.fixture(scope="session")
def volume_20x96x112():
    """``make_phantom((20, 96, 112), n_particles=30, random_state=7)[0]``."""
    yield from _shared(make_phantom((20, 96, 112), n_particles=30, random_state=7)[0])


@pytest.fixture(scope="session")
def phantom_40x96x96():
    """``(volume, truth)``: ``make_phantom((40, 96, 96), n_particles=100, spacing=(50, 10, 10), random_state=1)``."""
    yield from _shared(make_phantom((40, 96, 96), n_particles=100, spacing=(50.0, 10.0, 10.0), random_state=1))


@pytest.fixture(scope="session")
def phantom_64x64():
    """``(image, mask)`` of a 2D phantom: ``make_phantom((64, 64), n_particles=8, random_state=0)``."""
    yield from _shared(make_phantom((64, 64), n_particles=8, random_state=0))


@pytest.fixture(scope="session")
def default_phantom():
    """``(image, mask, labels)``: ``make_phantom(random_state=0, return_labels=True)``."""
    yield from _shared(make_phantom(random_state=0, return_labels=True))
