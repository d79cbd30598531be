"""Slab-wise labelling equals whole-volume labelling (scipy/scikit-image)."""

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.measure import label
from skimage.morphology import ball, closing, disk
from skimage.segmentation import relabel_sequential

import nanoseg._engine.labeling as labeling_module
import nanoseg._ops._numba as jit
from nanoseg import NanoparticleLabeler
from nanoseg._engine.labeling import face_offsets
from nanoseg._ops.components import label_set
from nanoseg._ops.morphology import close_set, footprint


@pytest.fixture(autouse=True, params=["sparse-compiled", "sparse-numpy", "dense"])
def label_path(request, monkeypatch):
    """Run every test with closing/labelling forced onto each implementation:
    voxel sets with the numba kernels, voxel sets in NumPy, dense ndimage."""
    monkeypatch.setattr(labeling_module, "SPARSE_MAX_FRACTION", -1.0 if request.param == "dense" else 1.0)
    monkeypatch.setattr(jit, "ENABLED", request.param != "sparse-numpy")
    if request.param == "sparse-compiled":
        assert jit.available()
    return request.param


def whole_volume_labels(mask, radius, connectivity, min_size):
    """Reference: whole-array closing, labelling, size filter, relabel."""
    if radius:
        footprint = ball(radius) if mask.ndim == 3 else disk(radius)
        mask = closing(mask, footprint, mode="ignore")
    labels = label(mask, connectivity=connectivity)
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    labels[small[labels]] = 0
    return relabel_sequential(labels)[0]


def random_mask(shape, density, smooth, seed):
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.random(shape), smooth)
    return field > np.quantile(field, 1 - density)


@pytest.mark.parametrize("connectivity", [1, 2, 3])
@pytest.mark.parametrize("radius", [0, 1, 2])
@pytest.mark.parametrize("slab_bytes", [None, 1, 3 * 40 * 36 * 12])
def test_slabs_match_whole_volume_exactly(connectivity, radius, slab_bytes, small_slabs):
    if slab_bytes is not None:
        small_slabs(slab_bytes)  # 1 byte -> one slice per slab
    mask = random_mask((23, 40, 36), density=0.12, smooth=1.0, seed=connectivity + 10 * radius)
    expected = whole_volume_labels(mask, radius, connectivity, min_size=4)
    got = NanoparticleLabeler(threshold=0.5, radius=radius, connectivity=connectivity, min_size=4).transform(
        mask.astype(np.float32)
    )
    assert got.dtype == np.uint32
    # Identical, not only up to renumbering: the order is raster order.
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("seed", range(4))
def test_sparse_noise_masks_many_slabs(seed, small_slabs):
    small_slabs(1)
    rng = np.random.default_rng(seed)
    mask = rng.random((15, 30, 30)) < 0.25
    expected = whole_volume_labels(mask, 1, 3, min_size=3)
    got = NanoparticleLabeler(threshold=0.5, radius=1, connectivity=3, min_size=3).transform(mask)
    np.testing.assert_array_equal(got, expected)


def test_component_spanning_every_slab_is_one_label(small_slabs):
    small_slabs(1)
    mask = np.zeros((12, 13, 13), dtype=bool)
    # A staircase that only touches diagonally between slices.
    for z in range(12):
        mask[z, z, z] = True
    by_face = NanoparticleLabeler(radius=0, connectivity=1, min_size=1).transform(mask)
    by_edge = NanoparticleLabeler(radius=0, connectivity=3, min_size=1).transform(mask)
    assert by_face.max() == 12  # 6-connectivity: every voxel alone
    assert by_edge.max() == 1  # 26-connectivity: one diagonal chain
    assert by_edge[mask].min() == 1


def test_min_size_counts_voxels_across_slabs(small_slabs):
    small_slabs(1)
    mask = np.zeros((6, 5, 5), dtype=bool)
    mask[:, 2, 2] = True  # 6 voxels, one per slab
    kept = NanoparticleLabeler(radius=0, connectivity=1, min_size=6).transform(mask)
    dropped = NanoparticleLabeler(radius=0, connectivity=1, min_size=7).transform(mask)
    assert kept.max() == 1 and np.count_nonzero(kept) == 6
    assert dropped.max() == 0


def test_closing_fills_gap_between_slabs(small_slabs):
    small_slabs(1)
    mask = np.zeros((7, 9, 9), dtype=bool)
    mask[:3, 3:6, 3:6] = True
    mask[4:, 3:6, 3:6] = True  # one empty slice in between
    open_labels = NanoparticleLabeler(radius=0, min_size=1).transform(mask)
    closed_labels = NanoparticleLabeler(radius=1, min_size=1).transform(mask)
    assert open_labels.max() == 2
    assert closed_labels.max() == 1
    assert closed_labels[3, 4, 4] == 1


def test_closing_keeps_foreground_at_borders():
    mask = np.zeros((4, 6, 6), dtype=bool)
    mask[0, 0, :] = True
    labels = NanoparticleLabeler(radius=2, min_size=1).transform(mask)
    assert labels[0, 0].all()


def test_2d_uses_disk_and_2d_connectivity():
    mask = np.zeros((8, 8), dtype=bool)
    mask[1, 1] = mask[2, 2] = True  # diagonal neighbours
    four = NanoparticleLabeler(radius=0, connectivity=1, min_size=1).transform(mask)
    eight = NanoparticleLabeler(radius=0, connectivity=2, min_size=1).transform(mask)
    assert four.shape == (8, 8) and four.max() == 2
    assert eight.max() == 1
    rng = np.random.default_rng(3)
    mask = ndi.gaussian_filter(rng.random((60, 50)), 1.5) > 0.52
    for radius in (1, 2):
        expected = whole_volume_labels(mask, radius, 2, min_size=5)
        got = NanoparticleLabeler(threshold=0.5, radius=radius, min_size=5).transform(mask)
        np.testing.assert_array_equal(got, expected)


def test_threshold_is_inclusive():
    posterior = np.full((3, 3), 0.5, dtype=np.float32)
    assert NanoparticleLabeler(threshold=0.5, radius=0, min_size=1).transform(posterior).max() == 1
    assert NanoparticleLabeler(threshold=0.51, radius=0, min_size=1).transform(posterior).max() == 0


def test_face_offsets_follow_connectivity():
    assert face_offsets(1) == [(0, 0)]
    assert sorted(face_offsets(2)) == [(-1, 0), (0, -1), (0, 0), (0, 1), (1, 0)]
    assert len(face_offsets(3)) == 9


@pytest.mark.parametrize("shape", [(9, 17, 13), (21, 19)])
@pytest.mark.parametrize("radius", [1, 2, 3])
def test_sparse_closing_equals_dense(shape, radius):
    rng = np.random.default_rng(radius)
    mask = rng.random(shape) < 0.06
    mask[0, ...] |= rng.random(shape[1:]) < 0.3  # foreground on the border
    fp = footprint(radius, len(shape))
    dilated = ndi.binary_dilation(mask, fp)
    expected = np.flatnonzero(ndi.binary_erosion(dilated, fp, border_value=1))
    np.testing.assert_array_equal(close_set(np.flatnonzero(mask), shape, fp), expected)
    # Given the dense mask, the closing may run compiled (label_path decides); same set.
    before = mask.copy()
    np.testing.assert_array_equal(close_set(np.flatnonzero(mask), shape, fp, mask=mask), expected)
    np.testing.assert_array_equal(mask, before)  # the caller's mask is left alone
    scratch = mask.copy()
    np.testing.assert_array_equal(close_set(np.flatnonzero(mask), shape, fp, mask=scratch, overwrite=True), expected)


def test_compiled_closing_grows_its_buffer_between_calls(monkeypatch):
    """Isolated voxels each add every neighbour to the dilation, more than
    the buffer's first size holds: the dilation stops, the caller grows the
    buffer and resumes, and the set is the dense closing's."""
    from nanoseg._ops import _numba, morphology

    if not _numba.available():
        pytest.skip("the compiled closing needs numba")
    mask = np.zeros((9, 60, 60), dtype=bool)
    mask[1::3, 1::3, 1::3] = True  # 1200 voxels, none touching
    fp = footprint(1, 3)
    kernels = morphology._compiled()
    calls = []
    dilate = kernels["_k_dilate_set"]
    monkeypatch.setitem(kernels, "_k_dilate_set", lambda *args: calls.append(args[2]) or dilate(*args))
    expected = np.flatnonzero(ndi.binary_erosion(ndi.binary_dilation(mask, fp), fp, border_value=1))
    np.testing.assert_array_equal(close_set(np.flatnonzero(mask), mask.shape, fp, mask=mask), expected)
    assert len(calls) > 1 and calls[0] == 0 and calls == sorted(calls)  # resumed further on each time


@pytest.mark.parametrize("shape, connectivity", [((7, 15, 16), 1), ((7, 15, 16), 2), ((7, 15, 16), 3), ((30, 31), 1), ((30, 31), 2)])
def test_sparse_label_equals_scipy(shape, connectivity):
    rng = np.random.default_rng(connectivity)
    mask = rng.random(shape) < 0.2
    expected, count = ndi.label(mask, ndi.generate_binary_structure(len(shape), connectivity))
    flat = np.flatnonzero(mask)
    ids, n = label_set(flat, shape, connectivity)
    assert n == count
    np.testing.assert_array_equal(ids, expected.ravel()[flat])


def test_sparse_empty_set():
    ids, n = label_set(np.zeros(0, dtype=np.int64), (3, 4, 5), 2)
    assert n == 0 and ids.size == 0
    assert close_set(np.zeros(0, dtype=np.int64), (3, 4, 5), footprint(1, 3)).size == 0
    empty = np.zeros((3, 4, 5), dtype=bool)
    assert close_set(np.flatnonzero(empty), empty.shape, footprint(1, 3), mask=empty).size == 0


def test_plane_cache_computes_each_plane_once_and_drops_it():
    import threading

    volume = np.arange(12 * 3 * 2).reshape(12, 3, 2)
    calls, lock = [], threading.Lock()

    def compute(lo, hi):
        with lock:
            calls.append((lo, hi))
        return volume[lo:hi] * 1

    slabs = [(max(0, s - 2), min(12, s + 3 + 2)) for s in range(0, 12, 3)]
    uses = np.zeros(12, dtype=int)
    for lo, hi in slabs:
        uses[lo:hi] += 1
    cache = labeling_module.PlaneCache(compute, uses)
    results = {}

    def read(bounds):
        results[bounds] = cache.read(*bounds)

    threads = [threading.Thread(target=read, args=(bounds,)) for bounds in slabs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for lo, hi in slabs:
        np.testing.assert_array_equal(results[(lo, hi)], volume[lo:hi])
    computed = np.concatenate([np.arange(lo, hi) for lo, hi in calls])
    np.testing.assert_array_equal(np.sort(computed), np.arange(12))  # every plane exactly once
    assert cache._planes == {}  # all dropped after their last read


def test_plane_cache_passes_errors_on():
    def compute(lo, hi):
        raise OSError("unreadable chunk")

    cache = labeling_module.PlaneCache(compute, np.ones(4, dtype=int))
    with pytest.raises(OSError, match="unreadable chunk"):
        cache.read(0, 4)


def test_lazy_slabs_run_one_block_at_a_time_per_thread(small_slabs):
    """With dask's threaded scheduler, n_jobs slabs in flight mean at most n_jobs blocks at once."""
    import threading
    import time

    import dask
    import dask.array as da

    lock, running, most = threading.Lock(), [0], [0]

    def watched(block):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        return block

    rng = np.random.default_rng(0)
    posterior = (rng.random((16, 32, 32)) > 0.97).astype(np.float32)
    lazy = da.from_array(posterior, chunks=(1, 16, 16)).map_blocks(watched, dtype=np.float32)
    small_slabs(4 * 32 * 32 * 6)
    expected = NanoparticleLabeler(min_size=1).transform(posterior)
    with dask.config.set(scheduler="threads", num_workers=4):
        labels = NanoparticleLabeler(min_size=1, n_jobs=2).transform(lazy)
        np.testing.assert_array_equal(labels.compute(), expected)
    assert most[0] <= 2


@pytest.mark.parametrize("connectivity", [1, 2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_face_pairs_equal_a_brute_force_search(connectivity, seed, monkeypatch):
    """Components touching across a slab face, compiled and in NumPy, against
    every pair of voxels tested directly."""
    from nanoseg._engine.labeling import face_offsets, face_pairs

    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(1, 30)), int(rng.integers(1, 40)))
    planes = [rng.random(shape) < rng.uniform(0.05, 0.6) for _ in range(2)]
    sets = []
    for plane in planes:
        flat = np.flatnonzero(plane)
        sets.append((flat, rng.integers(1, 50, flat.size).astype(np.int32)))
    (lower_flat, lower_ids), (upper_flat, upper_ids) = sets
    expected = set()
    for i, p in enumerate(lower_flat):
        y, x = divmod(int(p), shape[1])
        for dy, dx in face_offsets(connectivity):
            if 0 <= y + dy < shape[0] and 0 <= x + dx < shape[1]:
                hit = np.flatnonzero(upper_flat == (y + dy) * shape[1] + x + dx)
                if hit.size:
                    expected.add((int(lower_ids[i]) + 7, int(upper_ids[hit[0]]) + 100))
    expected = np.array(sorted(expected), dtype=np.int64).reshape(-1, 2)
    for enabled in (True, False):
        monkeypatch.setattr(jit, "ENABLED", enabled)
        got = face_pairs(sets[0], sets[1], shape, 7, 100, connectivity)
        np.testing.assert_array_equal(got, expected)
