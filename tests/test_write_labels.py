"""Lazy labels written from their voxel lists equal the dense labels; a lazy
posterior's mask is looked up from the tables it was made with."""

import dask.array as da
import numpy as np
import pytest
import zarr

import nanoseg._engine.labeling as labeling_module
import nanoseg._zarr_store as store_module
from nanoseg import _handoff as handoff
from nanoseg import NanoparticleLabeler, NanoparticleMixture
from nanoseg.io import write_ome_zarr


def _local(tmp_path, array, chunks, name="image.zarr"):
    z = zarr.create_array(store=str(tmp_path / name), shape=array.shape, chunks=chunks, dtype=array.dtype)
    z[...] = array
    return z


@pytest.fixture(scope="module")
def fitted(volume_20x96x112):
    return NanoparticleMixture().fit(volume_20x96x112)


@pytest.mark.parametrize("kept_bytes", [2**30, 0], ids=["kept", "labelled-again"])
@pytest.mark.parametrize("chunks", [(1, 96, 112), (2, 40, 50), (3, 96, 17)])
def test_labels_written_from_voxel_lists_equal_the_dense_labels(
    tmp_path, volume_20x96x112, fitted, small_slabs, monkeypatch, kept_bytes, chunks
):
    small_slabs(4 * 96 * 112 * 6)
    monkeypatch.setattr(labeling_module, "KEPT_LABEL_BYTES", kept_bytes)
    source = _local(tmp_path, volume_20x96x112, chunks)
    labels = NanoparticleLabeler(min_size=3).transform(fitted.transform(source))
    assert handoff.find(labels, handoff.SPARSE_LABELS) is not None
    expected = NanoparticleLabeler(min_size=3).transform(fitted.transform(volume_20x96x112))
    assert expected.max() > 1
    assert handoff.find(labels, handoff.SPARSE_LABELS).n_labels == expected.max()
    assert handoff.find(labels, handoff.SPARSE_LABELS).n_voxels == np.count_nonzero(expected)
    used = []
    original = store_module.write_sparse_slabs
    monkeypatch.setattr(
        "nanoseg.io.write_sparse_slabs", lambda *a, **k: used.append(1) or original(*a, **k)
    )
    written = write_ome_zarr(tmp_path / "labels.zarr", labels, spacing=(50, 10, 10), kind="labels",
                             chunks=(chunks[0], 32, 48), progress=False)
    assert used
    np.testing.assert_array_equal(written[:], expected)
    np.testing.assert_array_equal(labels.compute(), expected)
    # Chunks without a labelled voxel are not stored.
    stored = [p for p in (tmp_path / "labels.zarr" / "0" / "c").rglob("*") if p.is_file()]
    assert 0 < len(stored) < np.prod([-(-n // c) for n, c in zip(expected.shape, (chunks[0], 32, 48))])


def test_slabs_labelled_again_take_their_masks_from_graph_windows_or_chunk_files(
    tmp_path, volume_20x96x112, fitted, small_slabs, monkeypatch
):
    # A slab labelled again when written computes its mask from a culled
    # window of the graph, not from a slice of the whole graph (whose cull
    # costs every slab time in proportion to the volume's depth); a mixture's
    # lookup of a local zarr array is read from the chunk files, without dask.
    from nanoseg._engine.graph_windows import GraphWindows
    from nanoseg._engine.posterior import LookedUpChunks

    small_slabs(2 * 96 * 112 * 6)
    monkeypatch.setattr(labeling_module, "KEPT_LABEL_BYTES", 0)
    monkeypatch.setattr(GraphWindows, "whole", property(lambda self: False))  # windows even for this small volume
    expected = NanoparticleLabeler(min_size=3).transform(fitted.transform(volume_20x96x112))
    posterior = zarr.create_array(store=str(tmp_path / "p.zarr"), shape=expected.shape, chunks=(1, 96, 112), dtype="float32")
    posterior[...] = fitted.transform(volume_20x96x112)
    windowed, direct = [], []
    compute, getitem = GraphWindows.compute, LookedUpChunks.__getitem__
    monkeypatch.setattr(GraphWindows, "compute", lambda self, lo, hi: windowed.append((lo, hi)) or compute(self, lo, hi))
    monkeypatch.setattr(LookedUpChunks, "__getitem__", lambda self, key: direct.append(key) or getitem(self, key))
    for source, through in [(posterior, windowed), (fitted.transform(_local(tmp_path, volume_20x96x112, (1, 96, 112))), direct)]:
        labels = NanoparticleLabeler(min_size=3).transform(source)
        windowed.clear(), direct.clear()
        written = write_ome_zarr(tmp_path / "labels.zarr", labels, spacing=(50, 10, 10), kind="labels",
                                 overwrite=True, progress=False)
        np.testing.assert_array_equal(written[:], expected)
        assert len(through) == len(handoff.find(labels, handoff.SPARSE_LABELS).bounds)
        assert not (windowed if through is direct else direct)


def test_slabs_that_split_output_chunks_are_written_densely(tmp_path, volume_20x96x112, fitted, small_slabs):
    small_slabs(4 * 96 * 112 * 6)  # slabs of a few planes, not multiples of 7
    source = _local(tmp_path, volume_20x96x112, (1, 96, 112))
    labels = NanoparticleLabeler(min_size=3).transform(fitted.transform(source))
    target = zarr.create_array(store=str(tmp_path / "t.zarr"), shape=labels.shape, chunks=(7, 96, 112),
                               dtype=labels.dtype, fill_value=0, **store_module.array_options())
    assert store_module.write_sparse_slabs(target, handoff.find(labels, handoff.SPARSE_LABELS)) is None
    written = write_ome_zarr(tmp_path / "labels.zarr", labels, spacing=(50, 10, 10), kind="labels",
                             chunks=(7, 96, 112), progress=False)
    np.testing.assert_array_equal(written[:], labels.compute())


def test_only_the_labelers_own_output_carries_voxel_lists(tmp_path, volume_20x96x112, fitted):
    source = _local(tmp_path, volume_20x96x112, (2, 96, 112))
    labels = NanoparticleLabeler(min_size=3).transform(fitted.transform(source))
    shifted = labels + 1
    assert handoff.find(shifted, handoff.SPARSE_LABELS) is None
    written = write_ome_zarr(tmp_path / "shifted.zarr", shifted, spacing=(50, 10, 10), kind="labels",
                             progress=False)
    np.testing.assert_array_equal(written[:], labels.compute() + 1)


def test_a_lazy_posteriors_mask_keeps_the_tables_it_was_made_with(tmp_path, volume_20x96x112):
    mixture = NanoparticleMixture().fit(volume_20x96x112)
    source = _local(tmp_path, volume_20x96x112, (2, 48, 112))
    lazy = mixture.transform(source)
    posterior = lazy.compute()
    # Refitting with another prior afterwards changes the mixture, not `lazy`.
    mixture.set_params(beta_prior=(1.0, 50.0)).fit(volume_20x96x112[::-1])
    for threshold in (0.5, 0.95):
        expected = posterior >= threshold
        np.testing.assert_array_equal(handoff.find(lazy, handoff.MASK_AT)(threshold).compute(), expected)
        labels = NanoparticleLabeler(threshold=threshold, min_size=1).transform(lazy)
        dense = NanoparticleLabeler(threshold=threshold, min_size=1).transform(posterior)
        np.testing.assert_array_equal(labels.compute(), dense)


def test_float16_posterior_mask_equals_its_threshold(tmp_path, volume_20x96x112):
    mixture = NanoparticleMixture(posterior_dtype="float16").fit(volume_20x96x112)
    lazy = mixture.transform(da.from_array(volume_20x96x112, chunks=(3, 96, 112)))
    posterior = lazy.compute()
    assert posterior.dtype == np.float16
    np.testing.assert_array_equal(handoff.find(lazy, handoff.MASK_AT)(0.95).compute(), posterior >= 0.95)


@pytest.mark.parametrize("posterior_dtype", ["float32", "float16"])
@pytest.mark.parametrize("chunks", [(1, 96, 112), (3, 40, 50), (20, 96, 17)])
def test_posterior_looked_up_from_chunk_files_equals_the_in_memory_one(
    tmp_path, volume_20x96x112, posterior_dtype, chunks, monkeypatch
):
    import nanoseg._engine.posterior as posterior_module
    import nanoseg._volume as volume_module

    monkeypatch.setattr(volume_module, "DASK_BLOCK_BYTES", 2 * 96 * 112)  # blocks of several chunks
    image = volume_20x96x112.copy()
    image[: chunks[0], : chunks[1], : chunks[2]] = 0  # an all-zero chunk, not stored: read as the fill value
    source = _local(tmp_path, image, chunks)
    assert not (tmp_path / "image.zarr" / "c" / "0" / "0" / "0").exists()
    mixture = NanoparticleMixture(posterior_dtype=posterior_dtype)
    lazy = mixture.fit_transform(source)  # tables from the fit's histograms
    assert lazy.name.startswith("nanoseg-lookup-")  # decoded and looked up in one task per block
    expected = mixture.transform(image)
    np.testing.assert_array_equal(lazy.compute(), expected)
    np.testing.assert_array_equal(lazy[5:9, 10:70].compute(), expected[5:9, 10:70])
    np.testing.assert_array_equal(handoff.find(lazy, handoff.MASK_AT)(0.9).compute(), expected >= 0.9)
    with pytest.raises(IndexError):
        posterior_module.LookedUpChunks(posterior_module.ChunkFiles(source, tmp_path / "image.zarr", None),
                                        np.zeros((20, 256), np.float32))[[0, 1]]


@pytest.mark.parametrize("posterior_dtype", ["float32", "float16"])
def test_one_pass_posterior_of_whole_slice_blocks_from_chunk_files(tmp_path, volume_20x96x112, posterior_dtype):
    """A new volume's posterior (slice weights from its own histograms) read in whole-slice blocks."""
    mixture = NanoparticleMixture(posterior_dtype=posterior_dtype).fit(volume_20x96x112)
    source = _local(tmp_path, volume_20x96x112, (1, 48, 56))
    lazy = mixture.transform(source)
    assert lazy.name.startswith("nanoseg-one-pass-")  # decoded, counted and looked up in one task
    expected = mixture.transform(volume_20x96x112)
    np.testing.assert_array_equal(lazy.compute(), expected)
    np.testing.assert_array_equal(lazy[3:11].compute(), expected[3:11])
    np.testing.assert_array_equal(handoff.find(lazy, handoff.MASK_AT)(0.95).compute(), expected >= 0.95)
    np.testing.assert_array_equal(mixture.predict(source, threshold=0.95).compute(), expected >= 0.95)
    labels = NanoparticleLabeler(min_size=3).transform(lazy)
    np.testing.assert_array_equal(labels.compute(), NanoparticleLabeler(min_size=3).transform(expected))


def test_one_pass_posterior_of_partial_slice_blocks_keeps_the_graph_histograms(
    tmp_path, volume_20x96x112, monkeypatch
):
    import nanoseg._volume as volume_module

    monkeypatch.setattr(volume_module, "DASK_BLOCK_BYTES", 48 * 56)  # blocks smaller than a slice
    mixture = NanoparticleMixture().fit(volume_20x96x112)
    lazy = mixture.transform(_local(tmp_path, volume_20x96x112, (1, 48, 56)))
    assert not lazy.name.startswith("nanoseg-one-pass-")
    np.testing.assert_array_equal(lazy.compute(), mixture.transform(volume_20x96x112))


def test_lookups_from_chunk_files_pickle_without_their_buffers(tmp_path, volume_20x96x112):
    import pickle

    mixture = NanoparticleMixture().fit(volume_20x96x112)
    lazy = mixture.transform(_local(tmp_path, volume_20x96x112, (2, 96, 112)))
    expected = lazy.compute()
    (reader,) = [v for v in lazy.dask.values() if type(v).__name__ == "LookedUpChunks"]
    copy = pickle.loads(pickle.dumps(reader))
    np.testing.assert_array_equal(copy[0:4], expected[0:4])


def _assert_same_table(got, expected):
    """Equal tables; means may differ in the last bits (sums taken in other runs of planes)."""
    import pandas as pd

    means = [c for c in expected.columns if c.startswith(("mean_", "centroid_"))]
    pd.testing.assert_frame_equal(got.drop(columns=means), expected.drop(columns=means), check_exact=True)
    pd.testing.assert_frame_equal(got[means], expected[means], check_exact=False, rtol=1e-12)


@pytest.mark.filterwarnings("ignore:The memory budget leaves:UserWarning")  # tiny budgets on purpose
@pytest.mark.parametrize("kept_bytes", [2**30, 0], ids=["kept", "labelled-again"])
@pytest.mark.parametrize("graph", ["fit_transform", "transform"])
def test_particle_table_of_voxel_lists_equals_the_dense_one(
    tmp_path, volume_20x96x112, small_slabs, monkeypatch, kept_bytes, graph
):
    """Lazy labels measured from their voxel lists, and a lazy posterior looked
    up at the particle voxels only, give the table of the dense arrays."""
    from nanoseg import measure

    small_slabs(4 * 96 * 112 * 6)
    monkeypatch.setattr(labeling_module, "KEPT_LABEL_BYTES", kept_bytes)
    source = _local(tmp_path, volume_20x96x112, (1, 96, 112))
    mixture = NanoparticleMixture()
    posterior = mixture.fit_transform(source) if graph == "fit_transform" else mixture.fit(source).transform(source)
    labels = NanoparticleLabeler(min_size=3).transform(posterior)
    assert handoff.find(labels, handoff.SPARSE_LABELS) is not None and handoff.find(posterior, handoff.POSTERIOR_AT) is not None
    dense_labels, dense_posterior = labels.compute(), posterior.compute()
    assert dense_labels.max() > 3
    dense_reads = []
    original = measure._reduce_slab
    monkeypatch.setattr(measure, "_reduce_slab", lambda *a, **k: dense_reads.append(1) or original(*a, **k))
    kwargs = {"spacing": (50, 10, 10), "memory_budget": 96 * 112 * 5 * 3}
    got = measure.particle_table(labels, posterior=posterior, intensity=source, **kwargs)
    assert not dense_reads
    expected = measure.particle_table(dense_labels, posterior=dense_posterior, intensity=volume_20x96x112, **kwargs)
    _assert_same_table(got, expected)
    # One companion, or none.
    _assert_same_table(
        measure.particle_table(labels, posterior=posterior, **kwargs),
        expected.drop(columns=["mean_intensity", "max_intensity"]),
    )
    _assert_same_table(
        measure.particle_table(labels, **kwargs),
        expected.drop(columns=["mean_intensity", "max_intensity", "mean_posterior", "max_posterior"]),
    )


def test_posterior_at_voxels_equals_the_posterior(tmp_path, volume_20x96x112):
    source = _local(tmp_path, volume_20x96x112, (2, 40, 50))
    mixture = NanoparticleMixture(polarity="bright", posterior_dtype="float16").fit(source)
    for posterior in (mixture.transform(source), mixture.transform(da.from_array(volume_20x96x112, (3, 96, 112)))):
        dense = posterior.compute()
        flat = np.random.default_rng(0).choice(5 * 96 * 112, 300, replace=False)
        got = handoff.find(posterior, handoff.POSTERIOR_AT)(6, 11, np.sort(flat))
        assert got.dtype == dense.dtype
        np.testing.assert_array_equal(got, dense[6:11].reshape(-1)[np.sort(flat)])


def test_posterior_at_voxels_of_16_bit_data(tmp_path, volume_20x96x112):
    wide = volume_20x96x112.astype(np.uint16) * 97 + 300
    source = _local(tmp_path, wide, (1, 96, 112))
    mixture = NanoparticleMixture().fit(source)
    for posterior in (mixture.transform(source), NanoparticleMixture().fit_transform(source)):
        dense = posterior.compute()
        flat = np.sort(np.random.default_rng(1).choice(4 * 96 * 112, 500, replace=False))
        np.testing.assert_array_equal(handoff.find(posterior, handoff.POSTERIOR_AT)(3, 7, flat), dense[3:7].reshape(-1)[flat])


def test_particle_table_of_voxel_lists_with_dask_companions(tmp_path, volume_20x96x112, small_slabs):
    """Companions that are plain dask arrays are computed run by run and give the dense table."""
    from nanoseg import measure

    small_slabs(4 * 96 * 112 * 6)
    source = _local(tmp_path, volume_20x96x112, (1, 96, 112))
    posterior = NanoparticleMixture().fit_transform(source)
    labels = NanoparticleLabeler(min_size=3).transform(posterior)
    image = da.from_array(volume_20x96x112, chunks=(3, 96, 112))
    probabilities = da.from_array(posterior.compute(), chunks=(4, 96, 112))
    kwargs = {"spacing": (50, 10, 10), "memory_budget": 96 * 112 * 5 * 3}
    got = measure.particle_table(labels, posterior=probabilities, intensity=image, **kwargs)
    expected = measure.particle_table(labels.compute(), posterior=probabilities.compute(), intensity=volume_20x96x112, **kwargs)
    _assert_same_table(got, expected)


@pytest.mark.filterwarnings("ignore:The memory budget leaves:UserWarning")  # tiny budgets on purpose
def test_particle_table_of_stored_labels_looks_the_posterior_up_at_their_voxels(
    tmp_path, volume_20x96x112, small_slabs, monkeypatch
):
    """Labels written to a local zarr are searched chunk by chunk, and a lazy
    mixture posterior beside them is looked up at their voxels only."""
    import nanoseg._engine.posterior as posterior_module
    from nanoseg import measure

    small_slabs(4 * 96 * 112 * 6)
    source = _local(tmp_path, volume_20x96x112, (1, 96, 112))
    posterior = NanoparticleMixture().fit_transform(source)
    labels = NanoparticleLabeler(min_size=3).transform(posterior)
    stored = write_ome_zarr(tmp_path / "labels.zarr", labels, spacing=(50, 10, 10), kind="labels",
                            chunks=(2, 32, 48), progress=False)
    looked_up = []
    original = posterior_module.PosteriorAt.__call__
    monkeypatch.setattr(posterior_module.PosteriorAt, "__call__",
                        lambda self, *a, **k: looked_up.append(1) or original(self, *a, **k))
    kwargs = {"spacing": (50, 10, 10), "memory_budget": 96 * 112 * 9 * 3}
    got = measure.particle_table(stored, posterior=posterior, intensity=source, **kwargs)
    assert looked_up
    expected = measure.particle_table(stored[:], posterior=posterior.compute(), intensity=volume_20x96x112, **kwargs)
    _assert_same_table(got, expected)


@pytest.mark.parametrize("radius, min_size, connectivity", [(0, 1, 1), (1, 10, 2), (2, 30, 3)])
def test_lazy_labels_count_their_particles_and_voxels(tmp_path, volume_20x96x112, fitted, small_slabs, radius, min_size, connectivity):
    from nanoseg._plot_particles import particles_and_voxels

    small_slabs(3 * 96 * 112 * 6)  # slabs of three planes: particles cross faces
    source = _local(tmp_path, volume_20x96x112, (2, 48, 56))
    params = {"threshold": 0.5, "radius": radius, "min_size": min_size, "connectivity": connectivity}
    lazy = NanoparticleLabeler(**params).transform(fitted.transform(source))
    dense = NanoparticleLabeler(**params).transform(fitted.transform(volume_20x96x112))
    sparse = handoff.find(lazy, handoff.SPARSE_LABELS)
    assert (sparse.n_labels, sparse.n_voxels) == (dense.max(), np.count_nonzero(dense)) and dense.max() > 1
    assert particles_and_voxels(lazy) == particles_and_voxels(dense)


@pytest.mark.parametrize("chunks", [None, (4, 50, 60)])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("made_by", ["transform", "fit_transform"])
def test_lazy_posterior_written_from_chunk_files_equals_its_graph(
    tmp_path, volume_20x96x112, monkeypatch, dtype, made_by, chunks
):
    # transform looks slices up with tables from their own histograms, in the
    # graph; fit_transform with the fit's tables: both are written from the
    # chunk files without dask, with the graph's values.
    source = _local(tmp_path, volume_20x96x112, (3, 96, 112))
    mixture = NanoparticleMixture(posterior_dtype=dtype)
    posterior = mixture.fit(source).transform(source) if made_by == "transform" else mixture.fit_transform(source)
    found = []
    original = store_module._posterior_planes
    monkeypatch.setattr(store_module, "_posterior_planes", lambda array: found.append(original(array)) or found[-1])
    written = write_ome_zarr(tmp_path / "posterior.zarr", posterior, spacing=(50, 10, 10), chunks=chunks,
                             progress=False)
    assert found and found[0] is not None
    assert written.chunks == (chunks or (1, 96, 112))  # a lazy input is written 1 plane deep by default
    expected = posterior.compute()
    assert written.dtype == expected.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(written[:], expected)
    np.testing.assert_array_equal(written[:], mixture.transform(volume_20x96x112))


def test_lazy_posterior_is_left_to_other_processes_and_to_changed_graphs(tmp_path, volume_20x96x112):
    import dask

    source = _local(tmp_path, volume_20x96x112, (3, 96, 112))
    posterior = NanoparticleMixture().fit(source).transform(source)
    assert store_module._posterior_planes(posterior) is not None
    with dask.config.set(scheduler="processes"):
        assert store_module._posterior_planes(posterior) is None
    assert store_module._posterior_planes(posterior[2:]) is None
    assert store_module._posterior_planes(posterior * 1.0) is None
