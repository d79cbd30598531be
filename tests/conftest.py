"""Shared fixtures and helpers for the test suite."""

import pytest

import nanoseg._volume as volume_module


@pytest.fixture
def small_slabs(monkeypatch):
    """Force tiny slabs so that small test volumes are cut into many slabs."""

    def set_budget(n_bytes):
        monkeypatch.setattr(volume_module, "SLAB_BYTES", n_bytes)

    return set_budget

