"""Tests for nanoseg.datasets (synthetic SBF-SEM phantoms)."""

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from nanoseg.datasets import make_crops, make_phantom

SMALL = (8, 64, 64)


def _centroids(labels, spacing):
    ids = np.arange(1, int(labels.max()) + 1)
    return np.array(ndi.center_of_mass(labels > 0, labels, ids)) * np.asarray(spacing)


def _median_nn(labels, spacing=(50.0, 10.0, 10.0)):
    c = _centroids(labels, spacing)
    d, _ = cKDTree(c).query(c, k=2)
    return float(np.median(d[:, 1]))


def test_default_shape_dtype(default_phantom):
    image, mask, labels = default_phantom
    assert image.shape == mask.shape == labels.shape == (24, 192, 192)
    assert image.dtype == np.uint8
    assert mask.dtype == bool
    assert labels.dtype == np.uint32


def test_two_outputs_by_default():
    out = make_phantom(SMALL, n_particles=5, random_state=0)
    assert len(out) == 2
    image, mask = out
    image3, mask3, _ = make_phantom(SMALL, n_particles=5, random_state=0, return_labels=True)
    np.testing.assert_array_equal(image, image3)
    np.testing.assert_array_equal(mask, mask3)


def test_labels_consistent_and_sequential(default_phantom):
    _, mask, labels = default_phantom
    np.testing.assert_array_equal(mask, labels > 0)
    ids = np.unique(labels[labels > 0])
    # One id per placed particle, all 40 placed at the defaults, ids 1..K.
    np.testing.assert_array_equal(ids, np.arange(1, 41))
    # Each particle is one connected blob.
    for i in ids[:10]:
        _, n = ndi.label(labels == i, structure=np.ones((3, 3, 3)))
        assert n == 1


def test_determinism():
    a = make_phantom(SMALL, n_particles=8, random_state=7, return_labels=True)
    b = make_phantom(SMALL, n_particles=8, random_state=7, return_labels=True)
    for x, y in zip(a, b, strict=True):
        assert x.tobytes() == y.tobytes()
    c = make_phantom(SMALL, n_particles=8, random_state=8)
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[1], c[1])


def test_generator_and_randomstate_accepted():
    a = make_phantom(SMALL, n_particles=4, random_state=np.random.default_rng(3))
    b = make_phantom(SMALL, n_particles=4, random_state=np.random.default_rng(3))
    np.testing.assert_array_equal(a[0], b[0])
    c = make_phantom(SMALL, n_particles=4, random_state=np.random.RandomState(3))
    d = make_phantom(SMALL, n_particles=4, random_state=np.random.RandomState(3))
    np.testing.assert_array_equal(c[0], d[0])


def test_2d_shape():
    image, mask, labels = make_phantom((96, 80), n_particles=6, random_state=1, return_labels=True)
    assert image.shape == mask.shape == labels.shape == (96, 80)
    assert image.dtype == np.uint8
    assert labels.max() == 6
    np.testing.assert_array_equal(mask, labels > 0)
    # 2D spacing of length 2 is accepted too, and changes nothing here.
    image2, _ = make_phantom((96, 80), n_particles=6, spacing=(10, 10), random_state=1)
    np.testing.assert_array_equal(image, image2)


def test_np_fraction_in_range(default_phantom):
    _, mask, _ = default_phantom
    frac = mask.mean()
    assert 0.0005 < frac < 0.01


def test_particles_brighter_than_background(default_phantom):
    image, mask, _ = default_phantom
    fg = image[mask].astype(float)
    bg = image[~mask].astype(float)
    assert fg.mean() - bg.mean() > 60
    assert 190 < fg.mean() < 250
    assert 90 < bg.mean() < 140
    # The background is textured, not bright.
    assert np.percentile(bg, 99) < 190


def test_particle_voxel_counts_vs_radius():
    # Larger radius -> more voxels per particle; z extent follows the spacing.
    _, m_small, lab_small = make_phantom(SMALL, n_particles=6, radius=2.0, random_state=0, return_labels=True)
    _, m_big, lab_big = make_phantom(SMALL, n_particles=6, radius=5.0, random_state=0, return_labels=True)
    assert m_big.sum() > 3 * m_small.sum()
    # radius 5 px at 10 nm -> 50 nm = 1 slice in z: at most 3 slices per particle.
    for i in range(1, int(lab_big.max()) + 1):
        zs = np.nonzero((lab_big == i).any(axis=(1, 2)))[0]
        assert 1 <= len(zs) <= 3


def test_particles_inside_volume():
    shape = (6, 40, 40)
    _, _, labels = make_phantom(shape, n_particles=15, radius=(2, 4), random_state=2, return_labels=True)
    c = _centroids(labels, (1, 1, 1))
    assert np.all(c >= 0) and np.all(c <= np.array(shape) - 1)


def test_slice_drift():
    def slice_means(image, mask):
        return np.array([image[z][~mask[z]].mean() for z in range(image.shape[0])])

    img0, m0 = make_phantom(n_particles=10, drift=0.0, random_state=3)
    img8, m8 = make_phantom(n_particles=10, drift=8.0, random_state=3)
    s0 = slice_means(img0, m0)
    s8 = slice_means(img8, m8)
    # Without drift only texture and noise move the slice means (noise alone
    # gives ~0.03 grey levels); with drift they wander by many grey levels.
    assert s0.std() < 3.0
    assert s8.std() > 5.0
    # Same seed: the difference is the per-slice offset, nearly constant in-slice.
    diff = img8.astype(float) - img0.astype(float)
    per_slice = diff.mean(axis=(1, 2))
    assert per_slice.std() > 5.0
    assert np.median(diff.std(axis=(1, 2))) < 3.0


def test_noise_level():
    img_clean, m = make_phantom(SMALL, n_particles=0, noise=0.0, drift=0.0, random_state=4)
    img_noisy, _ = make_phantom(SMALL, n_particles=0, noise=6.0, drift=0.0, random_state=4)
    resid = img_noisy.astype(float) - img_clean.astype(float)
    assert 5.0 < resid.std() < 7.0


def test_no_particles():
    image, mask, labels = make_phantom(SMALL, n_particles=0, random_state=0, return_labels=True)
    assert not mask.any()
    assert labels.max() == 0
    assert image.dtype == np.uint8
    assert image.max() < 200


def test_clusters_are_tighter():
    nn_clustered = []
    nn_uniform = []
    for seed in range(2):
        _, _, lab_c = make_phantom(cluster_fraction=1.0, random_state=seed, return_labels=True)
        _, _, lab_u = make_phantom(cluster_fraction=0.0, random_state=seed, return_labels=True)
        nn_clustered.append(_median_nn(lab_c))
        nn_uniform.append(_median_nn(lab_u))
    assert max(nn_clustered) < 0.5 * min(nn_uniform)


def test_clustered_particles_touch_but_keep_ids():
    _, mask, labels = make_phantom(cluster_fraction=1.0, random_state=0, return_labels=True)
    assert labels.max() == 40
    # Some particles touch (their voxel sets are adjacent), so connected
    # components of the mask merge particles while the labels keep them apart.
    _, n_components = ndi.label(mask, structure=np.ones((3, 3, 3)))
    assert n_components < labels.max()


def test_crowded_volume_warns_and_stays_consistent():
    with pytest.warns(UserWarning, match="could be placed"):
        _, mask, labels = make_phantom((2, 12, 12), n_particles=50, radius=3, random_state=0, return_labels=True)
    k = int(labels.max())
    assert 0 < k < 50
    np.testing.assert_array_equal(np.unique(labels[labels > 0]), np.arange(1, k + 1))
    np.testing.assert_array_equal(mask, labels > 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shape": (10,)}, "shape"),
        ({"shape": (2, 3, 4, 5)}, "shape"),
        ({"shape": (0, 10, 10)}, "shape"),
        ({"shape": (4, 10.5, 10)}, "shape"),
        ({"shape": 5}, "shape"),
        ({"n_particles": -1}, "n_particles"),
        ({"n_particles": 2.5}, "n_particles"),
        ({"cluster_fraction": 1.5}, "cluster_fraction"),
        ({"cluster_fraction": -0.1}, "cluster_fraction"),
        ({"radius": 0}, "radius"),
        ({"radius": (3, 2)}, "radius"),
        ({"radius": (1, 2, 3)}, "radius"),
        ({"radius": (-1, 2)}, "radius"),
        ({"spacing": (10, 10)}, "spacing"),
        ({"spacing": (50, 0, 10)}, "spacing"),
        ({"drift": -1}, "drift"),
        ({"noise": float("nan")}, "noise"),
        ({"random_state": "seed"}, "random_state"),
        ({"random_state": -3}, "random_state"),
    ],
)
def test_bad_arguments(kwargs, match):
    kwargs = {"shape": (4, 16, 16), **kwargs}
    with pytest.raises(ValueError, match=match):
        make_phantom(**kwargs)


def test_make_crops():
    images, masks = make_crops(3, (4, 48, 48), n_particles=6, random_state=5)
    assert isinstance(images, list) and isinstance(masks, list)
    assert len(images) == len(masks) == 3
    for im, m in zip(images, masks, strict=True):
        assert im.shape == m.shape == (4, 48, 48)
        assert im.dtype == np.uint8 and m.dtype == bool
        assert m.any()
    # Crops are independent of each other ...
    assert not np.array_equal(images[0], images[1])
    # ... and reproducible.
    images2, masks2 = make_crops(3, (4, 48, 48), n_particles=6, random_state=5)
    for a, b in zip(images + masks, images2 + masks2, strict=True):
        np.testing.assert_array_equal(a, b)
    other, _ = make_crops(3, (4, 48, 48), n_particles=6, random_state=6)
    assert not np.array_equal(images[0], other[0])


def test_make_crops_2d_and_labels():
    images, masks, labels = make_crops(2, (40, 40), n_particles=3, random_state=0, return_labels=True)
    assert len(images) == len(masks) == len(labels) == 2
    assert all(im.shape == (40, 40) for im in images)
    for m, lab in zip(masks, labels, strict=True):
        np.testing.assert_array_equal(m, lab > 0)


@pytest.mark.parametrize(("kwargs", "match"), [({"n_crops": 0}, "n_crops"), ({"shape": (5,)}, "shape")])
def test_make_crops_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_crops(**kwargs)
