"""Splitting touching particles: distance transform, peaks and watershed."""

import pickle

import dask.array as da
import numpy as np
import pytest
from skimage.measure import label
from sklearn.base import clone
from sklearn.pipeline import Pipeline

from nanoseg import NanoparticleLabeler
from nanoseg.datasets import make_crops
from nanoseg.metrics import match_objects
from nanoseg.splitting import ParticleSplitter, split_touching


def discs(centres, radius, shape=(40, 60)):
    """Union of disks of `radius` around `centres` (row, col)."""
    rows, cols = np.indices(shape)
    mask = np.zeros(shape, dtype=bool)
    for r, c in centres:
        mask |= (rows - r) ** 2 + (cols - c) ** 2 <= radius**2
    return mask


def balls(centres, radius, shape, spacing=(1.0, 1.0, 1.0)):
    """Union of balls of physical `radius` around physical `centres` (z, y, x)."""
    grid = [np.arange(n) * s for n, s in zip(shape, spacing)]
    z, y, x = np.meshgrid(*grid, indexing="ij")
    mask = np.zeros(shape, dtype=bool)
    for cz, cy, cx in centres:
        mask |= (z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= radius**2
    return mask


def check_split_into_two(split, mask, first, second):
    """`split` covers exactly `mask`, with two pieces holding `first` and `second`."""
    assert split.dtype == np.uint32
    np.testing.assert_array_equal(split > 0, mask)
    assert set(np.unique(split[mask])) == {1, 2}
    assert split[first] != split[second]


# ---------------------------------------------------------------------------
# 2D
# ---------------------------------------------------------------------------


def test_two_overlapping_discs_are_split_along_the_neck():
    mask = discs([(20, 20), (20, 36)], 9)  # centres 16 apart, radii 9: they overlap
    assert label(mask).max() == 1
    split = split_touching(mask.astype(np.uint32))
    check_split_into_two(split, mask, (20, 20), (20, 36))
    # Each piece is the disc nearer to its centre, up to the cut at the neck.
    rows, cols = np.indices(mask.shape)
    left_of_neck = mask & (cols < 26)
    right_of_neck = mask & (cols > 30)
    assert (split[left_of_neck] == split[20, 20]).all()
    assert (split[right_of_neck] == split[20, 36]).all()


def test_a_single_disc_stays_whole():
    mask = discs([(20, 30)], 10)
    split = split_touching(mask.astype(np.uint8))
    np.testing.assert_array_equal(split, mask.astype(np.uint32))


def test_min_distance_keeps_close_peaks_together():
    mask = discs([(20, 20), (20, 36)], 9)
    assert split_touching(mask, min_distance=2).max() == 2
    # Centres 16 voxels apart: a larger minimum distance keeps one particle.
    assert split_touching(mask, min_distance=17).max() == 1


def test_separate_objects_are_numbered_sequentially_in_label_order():
    labels = np.zeros((30, 60), dtype=np.int32)
    labels[discs([(10, 10)], 5, labels.shape)] = 9
    labels[discs([(20, 45)], 5, labels.shape)] = 4
    labels[discs([(10, 28)], 4, labels.shape)] = 7
    split = split_touching(labels)
    lookup = {4: 1, 7: 2, 9: 3}
    expected = np.zeros(labels.shape, dtype=np.uint32)
    for old, new in lookup.items():
        expected[labels == old] = new
    np.testing.assert_array_equal(split, expected)


def test_touching_objects_with_different_labels_are_split_on_their_own():
    # Two rectangles side by side, each its own label: neither has a neck,
    # and the other label counts as background.
    labels = np.zeros((20, 40), dtype=np.uint16)
    labels[5:15, 5:20] = 1
    labels[5:15, 20:35] = 2
    np.testing.assert_array_equal(split_touching(labels), labels.astype(np.uint32))


def test_voxels_joined_by_a_corner_keep_a_piece_of_their_own_object():
    # An 8-connected object (as the labeller makes them) whose tail touches
    # it only at corners: the watershed, flooding through edges, cannot
    # reach the tail, yet every voxel must get one of the object's pieces,
    # never another object's number or the background.
    mask = discs([(20, 20), (20, 36)], 9)
    tail = [(29 + k, 20 + k) for k in range(1, 5)]  # a staircase from the left disc's bottom
    for r, c in tail:
        assert not mask[r, c]
        mask[r, c] = True
    labels = label(mask, connectivity=2).astype(np.uint32)
    assert labels.max() == 1
    labels[2:6, 50:55] = 2  # a second object, numbered after the first one's pieces
    split = split_touching(labels, min_distance=5)  # the two disc centres, no peak on the tail
    np.testing.assert_array_equal(split > 0, labels > 0)
    first = set(np.unique(split[labels == 1]))
    assert first == {1, 2}
    assert set(np.unique(split[labels == 2])) == {3}
    for r, c in tail:
        assert split[r, c] in first


def test_boolean_mask_is_split_per_connected_part():
    mask = discs([(12, 12), (12, 27)], 8) | discs([(32, 48)], 6)
    split = split_touching(mask)
    assert split.max() == 3
    np.testing.assert_array_equal(split > 0, mask)
    assert len({split[12, 12], split[12, 27], split[32, 48]}) == 3


def test_empty_labels_stay_empty():
    assert not split_touching(np.zeros((10, 10), dtype=np.uint32)).any()


# ---------------------------------------------------------------------------
# 3D and anisotropy
# ---------------------------------------------------------------------------


def test_two_overlapping_balls_are_split():
    mask = balls([(10, 12, 12), (10, 12, 24)], 7, (21, 25, 37))
    split = split_touching(mask.astype(np.uint32))
    check_split_into_two(split, mask, (10, 12, 12), (10, 12, 24))


def test_a_single_ball_stays_whole():
    mask = balls([(8, 10, 10)], 7, (17, 21, 21))
    np.testing.assert_array_equal(split_touching(mask), mask.astype(np.uint32))


def test_anisotropic_balls_need_the_spacing():
    # Physical balls of radius 60 nm, 100 nm apart along X, sampled at
    # 50 x 10 x 10 nm: 2-3 slices thick, 12 voxels wide.
    spacing = (50.0, 10.0, 10.0)
    two = balls([(100, 100, 100), (100, 100, 200)], 60, (5, 21, 31), spacing)
    one = balls([(100, 100, 150)], 60, (5, 21, 31), spacing)
    assert label(two).max() == 1
    split = split_touching(two, spacing=spacing)
    check_split_into_two(split, two, (2, 10, 10), (2, 10, 20))
    np.testing.assert_array_equal(split_touching(one, spacing=spacing), one.astype(np.uint32))
    # Seen as isotropic, the flat ball has a ridge of peaks and falls apart.
    assert split_touching(one).max() > 1
    # Only the ratios of the spacing matter.
    np.testing.assert_array_equal(split_touching(two, spacing=(5, 1, 1)), split)


def test_2d_input_takes_the_in_plane_spacing():
    mask = discs([(20, 20), (20, 36)], 9)
    np.testing.assert_array_equal(split_touching(mask, spacing=(50, 10, 10)), split_touching(mask, spacing=(1, 1)))


def test_splitting_separates_clustered_phantom_particles():
    _, masks, truth = make_crops(
        2, (10, 96, 96), n_particles=40, cluster_fraction=0.8, random_state=0, return_labels=True
    )
    merged = [label(mask, connectivity=2) for mask in masks]
    split = [split_touching(m, spacing=(50, 10, 10)) for m in merged]
    before = match_objects(merged, truth)
    after = match_objects(split, truth)
    # Clusters merge particles, so the components miss many; splitting finds more
    # of them without inventing particles.
    assert sum(int(s.max()) for s in split) > sum(int(m.max()) for m in merged)
    assert after["f1"] > before["f1"] + 0.1
    assert after["precision"] >= 0.9


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels, params, error, message",
    [
        (np.zeros((8, 8), dtype=np.float32), dict(), TypeError, "integer labels"),
        (np.full((8, 8), -1, dtype=np.int32), dict(), ValueError, "negative"),
        (np.zeros((8,), dtype=np.uint32), dict(), ValueError, "2D"),
        (np.zeros((0, 8), dtype=np.uint32), dict(), ValueError, "empty"),
        (np.zeros((8, 8), dtype=np.uint32), dict(min_distance=0), ValueError, "min_distance"),
        (np.zeros((8, 8), dtype=np.uint32), dict(spacing=(1, 0)), ValueError, "spacing"),
        (np.zeros((4, 8, 8), dtype=np.uint32), dict(spacing=(1, 1)), ValueError, "spacing"),
        (np.zeros((8, 8), dtype=np.uint32), dict(footprint=np.ones((3, 3, 3))), ValueError, "footprint"),
        (np.zeros((8, 8), dtype=np.uint32), dict(compactness=-1), ValueError, "compactness"),
    ],
)
def test_split_touching_rejects_bad_input(labels, params, error, message):
    with pytest.raises(error, match=message):
        split_touching(labels, **params)


# ---------------------------------------------------------------------------
# ParticleSplitter
# ---------------------------------------------------------------------------


def test_splitter_after_the_labeler_in_a_pipeline():
    mask = discs([(20, 20), (20, 36)], 9) | discs([(8, 52)], 4)
    posterior = np.where(mask, 0.99, 0.01).astype(np.float32)
    pipe = Pipeline([("labeler", NanoparticleLabeler()), ("split", ParticleSplitter())])
    labels = pipe.fit(posterior, mask).transform(posterior)
    np.testing.assert_array_equal(labels, split_touching(NanoparticleLabeler().transform(posterior)))
    assert labels.max() == 3


def test_splitter_on_lists_and_with_spacing():
    spacing = (50.0, 10.0, 10.0)
    two = balls([(100, 100, 100), (100, 100, 200)], 60, (5, 21, 31), spacing).astype(np.uint32)
    disc = discs([(20, 20), (20, 36)], 9).astype(np.uint32)
    results = ParticleSplitter(spacing=spacing).fit([two, disc]).transform([two, disc])
    assert isinstance(results, list)
    np.testing.assert_array_equal(results[0], split_touching(two, spacing=spacing))
    np.testing.assert_array_equal(results[1], split_touching(disc, spacing=spacing))


def test_splitter_refuses_lazy_input():
    labels = da.zeros((4, 16, 16), dtype=np.uint32, chunks=(2, 16, 16))
    with pytest.raises(NotImplementedError, match="whole"):
        ParticleSplitter().transform(labels)


def test_splitter_fit_accepts_coarser_labels_than_annotations():
    # After a downsampling smoother the labels are smaller than the masks.
    labels = discs([(10, 10), (10, 18)], 5, (20, 30)).astype(np.uint32)
    splitter = ParticleSplitter()
    assert splitter.fit(labels, np.zeros((40, 60), dtype=bool)) is splitter


def test_splitter_rejects_posteriors():
    with pytest.raises(TypeError, match="integer labels"):
        ParticleSplitter().fit(np.zeros((8, 8), dtype=np.float32))


@pytest.mark.parametrize(
    "splitter", [ParticleSplitter(), ParticleSplitter(min_distance=3, spacing=(5, 1, 1), compactness=0.1)]
)
def test_splitter_params_clone_and_pickle(splitter):
    assert set(ParticleSplitter().get_params()) == set(ParticleSplitter._parameter_constraints)
    params = splitter.get_params()
    assert ParticleSplitter(**params).get_params() == params
    labels = balls([(4, 10, 10), (4, 10, 20)], 5, (9, 21, 31)).astype(np.uint32)
    fitted = clone(splitter).fit(labels)
    restored = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(restored.transform(labels), fitted.transform(labels))
    with pytest.raises(TypeError):
        ParticleSplitter(2)
