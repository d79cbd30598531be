"""Same results for NumPy, zarr and dask inputs; zarr is read by slabs."""

import itertools

import dask.array as da
import numpy as np
import pytest
import zarr
from zarr.storage import MemoryStore, WrapperStore

import nanoseg._engine.fit as fit_engine
import nanoseg._engine.labeling as labeling_module
import nanoseg._engine.posterior as posterior_engine
from nanoseg import _handoff as handoff
from nanoseg import NanoparticleLabeler, NanoparticleMixture, _model
from nanoseg._volume import as_volume
from nanoseg._zarr_chunks import ChunkFiles
from nanoseg.datasets import make_crops


@pytest.fixture(scope="module")
def reference(volume_20x96x112):
    mixture = NanoparticleMixture().fit(volume_20x96x112)
    posterior = mixture.predict_proba(volume_20x96x112)
    labels = NanoparticleLabeler(min_size=3).transform(posterior)
    return mixture, posterior, labels


@pytest.fixture(autouse=True)
def _stores_in(tmp_path, monkeypatch):
    # Arrays of this module live in local directories, as users' do, so that
    # their chunk files are read directly (nanoseg._zarr_chunks); other test
    # modules use in-memory stores, read through zarr.
    monkeypatch.setattr(to_zarr, "folder", tmp_path, raising=False)


def to_zarr(array, chunks, store=None):
    if store is None:
        folder = getattr(to_zarr, "folder", None)
        store = {} if folder is None else str(folder / f"array{next(to_zarr.count)}.zarr")
    z = zarr.create_array(store=store, shape=array.shape, chunks=chunks, dtype=array.dtype)
    z[...] = array
    return z


to_zarr.count = itertools.count()


@pytest.mark.parametrize("chunks", [(1, 96, 112), (3, 32, 40), (7, 96, 17), (20, 96, 112)])
def test_zarr_matches_numpy(volume_20x96x112, reference, chunks, small_slabs):
    small_slabs(5 * 96 * 112 * 12)
    mixture, posterior, labels = reference
    z = to_zarr(volume_20x96x112, chunks)
    assert isinstance(as_volume(z).reader, ChunkFiles)  # read from its chunk files
    fitted = NanoparticleMixture().fit(z)
    for name in ("stack_histogram_", "background_histogram_", "particle_pmf_", "background_pmf_"):
        np.testing.assert_array_equal(getattr(fitted, name), getattr(mixture, name))
    lazy_posterior = fitted.predict_proba(z)
    assert isinstance(lazy_posterior, da.Array)
    assert lazy_posterior.dtype == np.float32 and lazy_posterior.shape == volume_20x96x112.shape
    np.testing.assert_array_equal(lazy_posterior.compute(), posterior)
    lazy_labels = NanoparticleLabeler(min_size=3).transform(lazy_posterior)
    assert isinstance(lazy_labels, da.Array) and lazy_labels.dtype == np.uint32
    np.testing.assert_array_equal(lazy_labels.compute(), labels)
    # The labeler also reads a posterior stored in zarr.
    stored = to_zarr(posterior, chunks)
    np.testing.assert_array_equal(NanoparticleLabeler(min_size=3).transform(stored).compute(), labels)


@pytest.mark.parametrize("chunks", [(4, 48, 56), (1, 96, 112), (20, 32, 32)])
def test_dask_matches_numpy(volume_20x96x112, reference, chunks):
    mixture, posterior, labels = reference
    x = da.from_array(volume_20x96x112, chunks=chunks)
    fitted = NanoparticleMixture().fit(x)
    np.testing.assert_array_equal(fitted.particle_pmf_, mixture.particle_pmf_)
    lazy = fitted.transform(x)
    assert isinstance(lazy, da.Array) and lazy.chunks == x.chunks
    np.testing.assert_array_equal(lazy.compute(), posterior)
    np.testing.assert_array_equal(NanoparticleLabeler(min_size=3).transform(lazy).compute(), labels)


def test_sampling_step_reads_only_sampled_slices(volume_20x96x112):
    z = to_zarr(volume_20x96x112, (1, 96, 112))
    full = NanoparticleMixture(sampling_step=3, max_iter=100_000).fit(z)
    sub = NanoparticleMixture(max_iter=100_000).fit(volume_20x96x112[::3])
    np.testing.assert_array_equal(full.stack_histogram_, sub.stack_histogram_)
    np.testing.assert_array_equal(full.background_histogram_, sub.background_histogram_)
    assert full.n_slices_fit_ == 7


def test_2d_images_and_lists():
    crops, _masks = make_crops(3, (64, 72), random_state=1)
    mixture = NanoparticleMixture().fit(crops)
    posteriors = mixture.transform(crops)
    assert isinstance(posteriors, list) and len(posteriors) == 3
    for crop, posterior in zip(crops, posteriors):
        assert posterior.shape == crop.shape and posterior.dtype == np.float32
        np.testing.assert_array_equal(posterior, mixture.transform(crop))
    weights = mixture.slice_weights(crops)
    assert [w.shape for w in weights] == [(1,)] * 3
    labels = NanoparticleLabeler().transform(posteriors)
    assert [lab.shape for lab in labels] == [c.shape for c in crops]
    # Mixed kinds inside one list.
    mixed = [crops[0], to_zarr(crops[1], (32, 32)), da.from_array(crops[2], chunks=(64, 36))]
    out = mixture.transform(mixed)
    assert isinstance(out[0], np.ndarray) and isinstance(out[1], da.Array) and isinstance(out[2], da.Array)
    for got, expected in zip(out, posteriors):
        np.testing.assert_array_equal(np.asarray(got), expected)


def test_fit_on_crops_pools_their_histograms():
    crops, _ = make_crops(2, (6, 64, 64), random_state=3)
    pooled = NanoparticleMixture().fit(crops)
    stacked = NanoparticleMixture().fit(np.concatenate(crops, axis=0))
    np.testing.assert_array_equal(pooled.stack_histogram_, stacked.stack_histogram_)
    np.testing.assert_array_equal(pooled.background_histogram_, stacked.background_histogram_)


def test_posterior_is_a_per_slice_lookup(volume_20x96x112, reference):
    mixture, posterior, _ = reference
    luts = mixture.posterior_luts(mixture.slice_weights(volume_20x96x112))
    for z in (0, 9, 19):
        np.testing.assert_array_equal(posterior[z], luts[z][volume_20x96x112[z]])


class CountingStore(WrapperStore):
    """A store that records every chunk key read."""

    def __init__(self, store):
        super().__init__(store)
        self.reads = []

    async def get(self, key, prototype, byte_range=None):
        if "/c/" in key or key.startswith("c/"):
            self.reads.append(key)
        return await super().get(key, prototype, byte_range)


def test_zarr_is_read_slab_by_slab_never_whole(volume_20x96x112, small_slabs, monkeypatch):
    shape = volume_20x96x112.shape
    plane = shape[1] * shape[2]
    small_slabs(4 * plane * 12)  # four planes of labelling work per slab
    store = CountingStore(MemoryStore())
    z = to_zarr(volume_20x96x112, (2, 48, 56), store=store)
    n_chunks = (shape[0] // 2) * 2 * 2

    # Every read the package makes goes through Array.__getitem__ or
    # get_orthogonal_selection: record how many slices each one asks for.
    requested = []
    original_getitem = zarr.Array.__getitem__

    def spy_getitem(self, selection):
        out = original_getitem(self, selection)
        requested.append(out.shape[0] if out.ndim == 3 else 1)
        return out

    monkeypatch.setattr(zarr.Array, "__getitem__", spy_getitem)
    # Two passes (stack histogram, background histogram), each slice once per pass.
    monkeypatch.setattr(fit_engine, "ONE_READ", False)
    store.reads.clear()
    two_pass = NanoparticleMixture().fit(z)
    assert sum(requested) == 2 * shape[0]
    all_keys = set(store.reads)
    assert len(all_keys) == n_chunks
    assert requested and max(requested) < shape[0]
    # One read: each slice once, when every slab's predicted levels hold the
    # final one (here forced: every level predicted). The same model.
    monkeypatch.setattr(fit_engine, "ONE_READ", True)
    monkeypatch.setattr(fit_engine, "_candidate_levels", lambda so_far, own, settled, bounds=None: list(range(-1, 257)))
    requested.clear()
    store.reads.clear()
    mixture = NanoparticleMixture().fit(z)
    assert sum(requested) == shape[0] and max(requested) < shape[0]
    assert set(store.reads) == all_keys
    for name in ("stack_histogram_", "background_histogram_", "particle_pmf_"):
        np.testing.assert_array_equal(getattr(mixture, name), getattr(two_pass, name))

    store.reads.clear()
    requested.clear()
    posterior = mixture.predict_proba(z)
    # Nothing is read yet: the slice weights are computed in the graph, from
    # the chunks the lookup reads.
    assert store.reads == []
    store.reads.clear()
    np.testing.assert_array_equal(posterior.compute(), mixture.predict_proba(volume_20x96x112))
    assert sorted(store.reads) == sorted(all_keys)  # each chunk decoded once when computed

    store.reads.clear()
    requested.clear()
    labels = NanoparticleLabeler().transform(posterior)
    # The analysis pass reads every chunk once: the planes of the slab halos
    # are shared with the neighbouring slabs (halos and slabs align with the
    # chunks here).
    assert sorted(store.reads) == sorted(all_keys)
    store.reads.clear()
    labels.compute()
    assert store.reads == []  # sparse labels kept from the analysis pass
    # With no room to keep them, computing re-reads each slab with its halo.
    monkeypatch.setattr(labeling_module, "KEPT_LABEL_BYTES", 0)
    relabelled = NanoparticleLabeler().transform(posterior)
    store.reads.clear()
    np.testing.assert_array_equal(relabelled.compute(), labels.compute())
    assert set(store.reads) == set(all_keys) and len(store.reads) <= 2 * n_chunks
    # No read, in any pass, ever asked for the whole volume.
    assert max(requested) <= 8 < shape[0]


@pytest.mark.parametrize("kept_bytes", [0, 2000, 2**30])
def test_lazy_labels_with_and_without_kept_slabs(volume_20x96x112, reference, kept_bytes, small_slabs, monkeypatch):
    small_slabs(3 * 96 * 112 * 6)
    monkeypatch.setattr(labeling_module, "KEPT_LABEL_BYTES", kept_bytes)
    _, posterior, labels = reference
    lazy = NanoparticleLabeler(min_size=3).transform(da.from_array(posterior, chunks=(5, 96, 112)))
    np.testing.assert_array_equal(lazy.compute(), labels)


@pytest.mark.filterwarnings("ignore:The memory budget leaves:UserWarning")  # tiny budgets on purpose
def test_memory_budget_sets_slabs_not_results(volume_20x96x112, reference, capsys):
    mixture, posterior, labels = reference
    plane = volume_20x96x112.shape[1] * volume_20x96x112.shape[2]
    # The one-read fit keeps the values (a byte a voxel, against 4 bytes of
    # working memory) of HELD_SLABS slabs to the end: they count as
    # ceil(HELD_SLABS / 4) slabs, sharing the budget with one job's slab.
    held = -(-fit_engine.HELD_SLABS // 4)
    small = NanoparticleMixture(memory_budget=(1 + held) * 2 * plane * 4, n_jobs=1, verbose=True).fit(volume_20x96x112)
    np.testing.assert_array_equal(small.particle_pmf_, mixture.particle_pmf_)
    np.testing.assert_array_equal(small.transform(volume_20x96x112), posterior)
    tiny = NanoparticleLabeler(min_size=3, memory_budget="1KiB", verbose=True).transform(posterior)
    np.testing.assert_array_equal(tiny, labels)
    out = capsys.readouterr().out
    assert "histograms: X 20 x 96 x 112 (numpy), slabs of 2 slice(s)" in out
    assert "labelling: X 20 x 96 x 112 (numpy), slabs of 1 slice(s)" in out
    # Two jobs and the held slabs share the budget.
    NanoparticleMixture(memory_budget=(2 + held) * 2 * plane * 4, n_jobs=2, verbose=True).fit(volume_20x96x112)
    assert "slabs of 2 slice(s)" in capsys.readouterr().out


@pytest.mark.parametrize("n_jobs", [1, 2, 3, -1])
def test_threads_give_identical_results(volume_20x96x112, reference, n_jobs, small_slabs):
    small_slabs(2 * 96 * 112 * 6)
    mixture, posterior, labels = reference
    fitted = NanoparticleMixture(n_jobs=n_jobs).fit(volume_20x96x112)
    np.testing.assert_array_equal(fitted.background_histogram_, mixture.background_histogram_)
    np.testing.assert_array_equal(fitted.transform(volume_20x96x112), posterior)
    got = NanoparticleLabeler(min_size=3, n_jobs=n_jobs).transform(da.from_array(posterior, chunks=(3, 96, 112)))
    np.testing.assert_array_equal(got.compute(), labels)
    np.testing.assert_array_equal(NanoparticleLabeler(min_size=3, n_jobs=n_jobs).transform(posterior), labels)


def test_fit_transform_reuses_fit_histograms(volume_20x96x112, reference, monkeypatch):
    _mixture, posterior, _ = reference
    calls = []
    original = posterior_engine.slice_histograms
    monkeypatch.setattr(posterior_engine, "slice_histograms", lambda *a, **k: calls.append(1) or original(*a, **k))
    np.testing.assert_array_equal(NanoparticleMixture().fit_transform(volume_20x96x112), posterior)
    assert calls == []  # no extra pass over the data
    sampled = NanoparticleMixture(sampling_step=2, max_iter=100_000)
    np.testing.assert_array_equal(
        sampled.fit_transform(volume_20x96x112), sampled.fit(volume_20x96x112).transform(volume_20x96x112)
    )
    assert calls  # with sampling, the posterior needs every slice: one more pass


def test_a_memory_budget_too_small_for_one_slab_is_said(volume_20x96x112, reference):
    """A slab is never less than a chunk deep (nor a slice): a memory budget
    below that is exceeded with a warning, never silently; a budget that
    suffices, or none, warns of nothing."""
    import warnings

    mixture, posterior, _ = reference
    plane = volume_20x96x112.shape[1] * volume_20x96x112.shape[2]
    with pytest.warns(UserWarning, match=r"smallest slab \(one slice of 96 x 112 voxels\) needs about"):
        NanoparticleLabeler(min_size=3, memory_budget="1KiB").transform(posterior)
    with pytest.warns(UserWarning, match=r"4 slices of 96 x 112 voxels, its chunks' depth.*chunks one slice deep"):
        NanoparticleMixture(memory_budget=plane, max_iter=100_000).fit(to_zarr(volume_20x96x112, (4, 96, 112)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NanoparticleLabeler(min_size=3).transform(posterior)
        NanoparticleLabeler(min_size=3, memory_budget="1GiB").transform(posterior)
        from nanoseg.measure import particle_table

        particle_table(NanoparticleLabeler(min_size=3).transform(posterior), memory_budget="1GiB")


@pytest.mark.filterwarnings("ignore:The memory budget leaves:UserWarning")  # tiny budgets on purpose
def test_memory_budget_is_never_thinner_than_a_chunk(volume_20x96x112, capsys):
    z = to_zarr(volume_20x96x112, (4, 96, 112))
    NanoparticleMixture(memory_budget=1, verbose=True, max_iter=100_000).fit(z)
    assert "slabs of 4 slice(s)" in capsys.readouterr().out


def test_float16_posterior_is_the_rounded_lookup(volume_20x96x112, reference):
    mixture, posterior, _ = reference
    half = NanoparticleMixture(posterior_dtype="float16").fit(volume_20x96x112)
    got = half.transform(volume_20x96x112)
    assert got.dtype == np.float16
    # The float64 tables rounded once to float16, looked up per slice.
    luts = _model.posterior_luts(
        mixture.slice_weights(volume_20x96x112), mixture.particle_pmf_, mixture.background_pmf_, mixture.eps,
        dtype=np.float64,
    ).astype(np.float16)
    expected = np.stack([lut[s] for lut, s in zip(luts, volume_20x96x112)])
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(got.astype(np.float32), posterior, rtol=1e-3, atol=1e-7)
    lazy = half.transform(to_zarr(volume_20x96x112, (3, 96, 112)))
    assert lazy.dtype == np.float16
    np.testing.assert_array_equal(lazy.compute(), got)
    assert NanoparticleLabeler().transform(got).max() > 0


@pytest.mark.parametrize(
    "params, chunks",
    [
        ({"polarity": "dark"}, (3, 40, 112)),
        ({"posterior_dtype": "float16"}, (7, 96, 30)),
        ({"beta_prior": (0.5, 4.0)}, (1, 96, 112)),
    ],
)
def test_lazy_posterior_computes_weights_per_chunk_like_eager(volume_20x96x112, params, chunks):
    """The lazy posterior finds each slice's weight from its chunks; same values as eager."""
    image = 255 - volume_20x96x112 if params.get("polarity") == "dark" else volume_20x96x112
    mixture = NanoparticleMixture(**params).fit(image)
    eager = mixture.transform(image)
    lazy = mixture.transform(da.from_array(image, chunks=chunks))
    assert lazy.chunks == da.from_array(image, chunks=chunks).chunks and lazy.dtype == eager.dtype
    np.testing.assert_array_equal(lazy.compute(), eager)
    np.testing.assert_array_equal(lazy[5:9, 10:50].compute(), eager[5:9, 10:50])


def test_lazy_posterior_of_uint16_like_eager(volume_20x96x112):
    image = volume_20x96x112.astype(np.uint16) * 200 + 1000
    mixture = NanoparticleMixture().fit(image)
    lazy = mixture.transform(to_zarr(image, (2, 48, 112)))
    np.testing.assert_array_equal(lazy.compute(), mixture.transform(image))


def test_zarr_chunks_are_grouped_into_whole_planes_for_dask(volume_20x96x112, monkeypatch):
    from nanoseg import _volume

    assert _volume.dask_chunks((128, 2048, 2048), (1, 1024, 1024), 1) == (1, 2048, 2048)
    assert _volume.dask_chunks((128, 8192, 8192), (1, 1024, 1024), 1) == (1, 2048, 8192)  # 16 MiB cap
    assert _volume.dask_chunks((128, 2048, 2048), (64, 64, 64), 1) == (64, 128, 2048)
    assert _volume.dask_chunks((30, 50), (7, 9), 4, limit=10) == (7, 9)  # a chunk is never split
    # Lazy results keep the chunk depth and align with the zarr chunks.
    monkeypatch.setattr(_volume, "DASK_BLOCK_BYTES", 2 * 48 * 112)
    z = to_zarr(volume_20x96x112, (2, 48, 56))
    mixture = NanoparticleMixture().fit(volume_20x96x112)
    lazy = mixture.transform(z)
    assert lazy.chunks == ((2,) * 10, (48, 48), (112,))
    np.testing.assert_array_equal(lazy.compute(), mixture.transform(volume_20x96x112))


@pytest.mark.parametrize("threshold", [0.5, 0.95])
def test_labels_of_the_lazy_mask_from_predict_equal_those_of_the_posterior(
    volume_20x96x112, threshold, monkeypatch, small_slabs
):
    """The mixture hands the labeler a boolean mask from predict(X, threshold): same labels."""
    small_slabs(4 * 96 * 112 * 6)
    mixture = NanoparticleMixture().fit(volume_20x96x112)
    expected = NanoparticleLabeler(threshold=threshold, min_size=3).transform(mixture.transform(volume_20x96x112))
    source = to_zarr(volume_20x96x112, (2, 48, 56))
    lazy = mixture.transform(source)
    mask = mixture.predict(source, threshold=threshold)
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask.compute(), lazy.compute() >= threshold)
    # A boolean mask is labelled as it is: no block is thresholded on the way.
    calls = []
    original = labeling_module.mask_from_posterior
    monkeypatch.setattr(labeling_module, "mask_from_posterior", lambda *a, **k: calls.append(1) or original(*a, **k))
    labels = NanoparticleLabeler(threshold=threshold, min_size=3).transform(mask)
    np.testing.assert_array_equal(labels.compute(), expected)
    assert calls == []
    # The mixture's lazy float posterior carries its boolean tables: the
    # labeler looks the mask up through them, thresholding no float block.
    assert handoff.find(lazy, handoff.MASK_AT) is not None
    other = NanoparticleLabeler(threshold=threshold, min_size=3).transform(lazy)
    np.testing.assert_array_equal(other.compute(), expected)
    assert calls == []
    # Any other lazy float posterior (here one more step on the mixture's) is
    # thresholded block by block in its graph.
    plain = lazy.map_blocks(np.asarray, dtype=lazy.dtype)
    assert handoff.find(plain, handoff.MASK_AT) is None
    other = NanoparticleLabeler(threshold=threshold, min_size=3).transform(plain)
    np.testing.assert_array_equal(other.compute(), expected)
    assert calls
