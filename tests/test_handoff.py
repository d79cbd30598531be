"""Hand-offs between lazy results live beside the arrays, not on them."""

import gc

import dask.array as da
import numpy as np
import zarr

from nanoseg import NanoparticleLabeler, NanoparticleMixture
from nanoseg import _handoff as handoff


def lazy_pipeline(volume):
    z = zarr.create_array(store={}, shape=volume.shape, chunks=(4, *volume.shape[1:]), dtype=volume.dtype)
    z[...] = volume
    mixture = NanoparticleMixture().fit(z)
    posterior = mixture.transform(z)
    labels = NanoparticleLabeler(min_size=3).transform(posterior)
    return posterior, labels


def test_lazy_results_are_plain_dask_arrays_with_their_handoffs(volume_12x96x112):
    posterior, labels = lazy_pipeline(volume_12x96x112)
    for array in (posterior, labels):
        assert type(array) is da.Array
        assert not [name for name in vars(array) if "nanoseg" in name]
    assert handoff.find(posterior, handoff.MASK_AT) is not None
    assert handoff.find(posterior, handoff.POSTERIOR_AT) is not None
    assert handoff.find(labels, handoff.SPARSE_LABELS) is not None
    # Same name, same computation: a copy shares them; anything computed from
    # the array is another computation and has none.
    assert handoff.find(posterior.copy(), handoff.MASK_AT) is handoff.find(posterior, handoff.MASK_AT)
    assert handoff.find(posterior + 0, handoff.MASK_AT) is None
    assert handoff.find(labels[1:], handoff.SPARSE_LABELS) is None
    assert handoff.find(posterior, handoff.SPARSE_LABELS) is None
    assert handoff.find(np.asarray(labels), handoff.SPARSE_LABELS) is None


def test_an_entry_lives_as_long_as_an_array_it_was_attached_to():
    first = da.zeros((4, 4), chunks=2)
    second = da.zeros((4, 4), chunks=2)  # the same computation: the same name
    assert first.name == second.name and first is not second
    handoff.attach(first, mask_at="a")
    handoff.attach(second, posterior_at="b")
    name = first.name
    del first
    gc.collect()
    assert handoff.find(second, handoff.MASK_AT) == "a"
    assert handoff.find(second, handoff.POSTERIOR_AT) == "b"
    del second
    gc.collect()
    assert name not in handoff._ENTRIES
