"""The pipeline on a dask.distributed cluster gives the local results."""

import numpy as np
import pytest
import zarr

from nanoseg import NanoparticleLabeler, NanoparticleMixture
from nanoseg.datasets import make_phantom
from test_device import assert_same_fit

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, distributed.Client(cluster) as client:
        yield client


def test_local_cluster_matches_local(tmp_path, client, small_slabs):
    small_slabs(4 * 96 * 96 * 6)
    image, _ = make_phantom((16, 96, 96), n_particles=25, random_state=21)
    store = zarr.create_array(store=str(tmp_path / "image.zarr"), shape=image.shape, chunks=(2, 48, 96), dtype="uint8")
    store[...] = image
    z = zarr.open_array(str(tmp_path / "image.zarr"), mode="r")

    # The fixture's client is the default one: every dask computation,
    # including the labeller's analysis pass, runs on the cluster.
    mixture = NanoparticleMixture(max_iter=100_000).fit(z)
    with distributed.get_task_stream(client) as stream:
        posterior = mixture.transform(z)
        labels = NanoparticleLabeler(min_size=3).transform(posterior)
        on_cluster = labels.compute()
    workers = {task["worker"] for task in stream.data}
    assert workers and workers <= set(client.scheduler_info()["workers"])
    local_mixture = NanoparticleMixture(max_iter=100_000).fit(image)
    local = NanoparticleLabeler(min_size=3).transform(local_mixture.transform(image))
    np.testing.assert_array_equal(on_cluster, local)
    np.testing.assert_array_equal(posterior.compute(), local_mixture.transform(image))


def test_slabs_are_labelled_on_the_workers(tmp_path, client, small_slabs, monkeypatch):
    # On a cluster the analysis pass closes and labels each slab in a task on
    # the workers: no mask crosses to the client, only labelled voxels; the
    # labels are the local ones. Masks cross, packed 8 pixels a byte where
    # the X chunks allow it, only for slabs labelled again when written.
    from dask.utils import key_split

    import dask.array as da

    import nanoseg._engine.labeling as labeling

    small_slabs(4 * 96 * 96 * 6)
    image, _ = make_phantom((16, 96, 100), n_particles=25, random_state=22)
    posterior = NanoparticleMixture(max_iter=100_000).fit(image).transform(image)
    local = NanoparticleLabeler(min_size=3).transform(posterior)
    arrived = []
    unpack = labeling.unpack_mask_bits

    def recording(packed, width):
        arrived.append(packed.dtype)
        return unpack(packed, width)

    monkeypatch.setattr(labeling, "unpack_mask_bits", recording)
    store = zarr.create_array(store=str(tmp_path / "p.zarr"), shape=posterior.shape, chunks=(2, 48, 48), dtype="float32")
    store[...] = posterior
    stored = zarr.open_array(str(tmp_path / "p.zarr"), mode="r")
    for X in [stored, da.from_array(posterior, chunks=(2, 48, 36))]:
        arrived.clear()
        with distributed.get_task_stream(client) as stream:
            labels = NanoparticleLabeler(min_size=3).transform(X)
        assert not arrived
        # 16 planes in slabs of at most 4 (the budget, 6 bytes a voxel): 4 or more tasks.
        assert sum(key_split(task["key"]).startswith("nanoseg-label-slab") for task in stream.data) >= 4
        np.testing.assert_array_equal(labels.compute(), local)
    # Every slab's labelled voxels stay on the workers, whatever the budget
    # for keeping them: writing (twice here) takes them from there, with no
    # slab labelled again and no mask sent.
    from nanoseg.io import read_image, write_ome_zarr

    monkeypatch.setattr(labeling, "KEPT_LABEL_BYTES", 0)
    labels = NanoparticleLabeler(min_size=3).transform(stored)
    arrived.clear()
    for name in ("labels.zarr", "again.zarr"):
        with distributed.get_task_stream(client) as stream:
            write_ome_zarr(tmp_path / name, labels, spacing=(50.0, 10.0, 10.0), kind="labels", progress=False)
        names = [key_split(task["key"]) for task in stream.data]
        assert names.count("nanoseg-kept-voxels") >= 4, names
        assert not any(name.startswith("nanoseg-label-slab") for name in names), names
        np.testing.assert_array_equal(np.asarray(read_image(tmp_path / name)[0]), local)
    np.testing.assert_array_equal(labels.compute(), local)
    assert not arrived


def test_packed_masks_unpack_to_the_same_pixels():
    import dask.array as da

    from nanoseg._engine.labeling import pack_mask_bits, unpack_mask_bits

    mask = np.random.default_rng(5).random((5, 7, 43)) < 0.3
    for chunks in [(2, 7, 16), (5, 3, 8), (1, 7, 43)]:
        packed = pack_mask_bits(da.from_array(mask, chunks=chunks))
        assert packed.dtype == np.uint8 and packed.shape == (5, 7, 6)
        np.testing.assert_array_equal(unpack_mask_bits(packed.compute(), 43), mask)
        np.testing.assert_array_equal(unpack_mask_bits(packed[1:4].compute(), 43), mask[1:4])
    assert pack_mask_bits(da.from_array(mask, chunks=(2, 7, 12))) is None  # a block would end inside a byte


def _assert_same_fit(ours, theirs):
    assert_same_fit(ours, theirs)
    assert ours.n_slices_fit_ == theirs.n_slices_fit_


def _stored(tmp_path, image, chunks, name="image.zarr"):
    store = zarr.create_array(store=str(tmp_path / name), shape=image.shape, chunks=chunks, dtype=image.dtype)
    store[...] = image
    return zarr.open_array(str(tmp_path / name), mode="r")


def _fit_task_names(client, X, **params):
    """Fit under the client; return the model and the names of the fit's tasks that ran on workers."""
    from dask.utils import key_split

    with distributed.get_task_stream(client) as stream:
        model = NanoparticleMixture(max_iter=100_000, **params).fit(X)
    return model, {key_split(task["key"]) for task in stream.data}


def test_fit_of_a_stored_volume_runs_on_the_workers(tmp_path, client, small_slabs):
    # Under a client the fit's slabs are tasks on the workers (one read:
    # histograms and seed boxes at a band of levels); the model is the
    # local one, to the bit.
    small_slabs(2 * 96 * 96 * 6)
    image, _ = make_phantom((24, 96, 96), n_particles=40, random_state=31)
    z = _stored(tmp_path, image, (2, 48, 96))
    model, names = _fit_task_names(client, z)
    assert any("slab-counts-and-boxes" in name for name in names), names
    _assert_same_fit(model, NanoparticleMixture(max_iter=100_000).fit(image))


def test_slabs_whose_levels_miss_the_stack_level_are_counted_again_on_the_workers(
    tmp_path, client, small_slabs, monkeypatch
):
    # A stack whose brightness drifts along Z: the first round's own levels
    # (a band of 0) differ from the stack's, and the prediction for the rest
    # is made wrong on purpose (the client predicts; the workers do not see
    # this patch), so most slabs are read again.
    from nanoseg._engine import fit as fit_engine
    from nanoseg._engine import fit_workers

    monkeypatch.setattr(fit_workers, "BAND", 0)
    monkeypatch.setattr(fit_engine, "_predicted_level", lambda model, hist, dark: 20)
    small_slabs(2 * 96 * 96 * 6)
    image, _ = make_phantom((24, 96, 96), n_particles=40, random_state=32)
    drift = np.linspace(-25, 25, image.shape[0])[:, None, None]
    image = np.clip(image + drift, 0, 255).astype(np.uint8)
    z = _stored(tmp_path, image, (2, 96, 96))
    model, names = _fit_task_names(client, z)
    assert any("slab-background" in name for name in names), names
    _assert_same_fit(model, NanoparticleMixture(max_iter=100_000).fit(image))


@pytest.mark.parametrize("params", [{"halo": "dilation"}, {"sampling_step": 3}, {"percentile_low": "otsu"}])
def test_fit_of_a_lazy_volume_on_the_workers_matches_local(client, small_slabs, params):
    import dask.array as da

    small_slabs(2 * 96 * 96 * 6)
    image, _ = make_phantom((20, 96, 96), n_particles=40, random_state=33)
    model, names = _fit_task_names(client, da.from_array(image, chunks=(3, 48, 48)), **params)
    task = "slab-slice-histograms" if params.get("halo") == "dilation" else "slab-counts-and-boxes"
    assert any(task in name for name in names), names
    _assert_same_fit(model, NanoparticleMixture(max_iter=100_000, **params).fit(image))


def test_16bit_fit_on_the_workers_matches_local(tmp_path, client, small_slabs):
    small_slabs(2 * 96 * 96 * 6)
    image, _ = make_phantom((12, 96, 96), n_particles=30, random_state=34)
    wide = (image.astype(np.uint16) * 37 + 900).astype(np.uint16)
    model, names = _fit_task_names(client, _stored(tmp_path, wide, (4, 96, 96)))
    assert any("slab-value-counts" in name for name in names), names
    _assert_same_fit(model, NanoparticleMixture(max_iter=100_000).fit(wide))
    for name in ("binning_mode_", "binning_low_", "binning_high_", "binning_shift_"):
        assert getattr(model, name) == getattr(NanoparticleMixture(max_iter=100_000).fit(wide), name)


def test_workers_that_cannot_open_the_input_are_named(tmp_path, client, capsys):
    # The zarr array is deleted after being opened, as if the workers could
    # not see it: every task fails to read its chunks (rather than reading
    # the fill value), and the error says where it ran and what workers need.
    import shutil

    image, _ = make_phantom((6, 48, 48), n_particles=10, random_state=36)
    z = _stored(tmp_path, image, (2, 48, 48))
    shutil.rmtree(tmp_path / "image.zarr")
    with pytest.raises(OSError) as raised:
        NanoparticleMixture(verbose=True).fit(z)
    assert "dask.distributed worker" in "\n".join(getattr(raised.value, "__notes__", []))
    assert "as tasks on the workers of tcp://" in capsys.readouterr().out


def test_in_memory_volumes_are_fitted_here(client):
    # A NumPy volume would have to travel to the workers whole: fitted in
    # this process, no task.
    image, _ = make_phantom((8, 64, 64), n_particles=15, random_state=35)
    _, names = _fit_task_names(client, image)
    assert not any(name.startswith("slab-") for name in names), names
