"""The global-threshold baselines: thresholds, masks, pipelines and errors."""

import io
import pickle

import joblib
import numpy as np
import pytest
from skimage.filters import threshold_li, threshold_multiotsu, threshold_otsu
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline

from nanoseg import NanoparticleLabeler
from nanoseg.baselines import GlobalThreshold
from nanoseg.datasets import make_crops


@pytest.fixture(scope="module")
def crops():
    return make_crops(4, (6, 64, 64), n_particles=12, random_state=0)


def bimodal_image(seed=0):
    """Background around 60, a bright square around 180."""
    rng = np.random.default_rng(seed)
    image = rng.normal(60, 6, size=(64, 64))
    image[20:40, 20:40] = rng.normal(180, 6, size=(20, 20))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def tile_image():
    """64 x 64 background of 100-110 (every 32 x 32 tile reaches 110) and a 3 x 3 particle."""
    image = np.full((64, 64), 100, dtype=np.uint8)
    image[::2, ::3] = 105
    for r in (0, 32):
        for c in (0, 32):
            image[r + 5, c + 7] = 110
    image[40:43, 10:13] = 200
    return image


def dice(estimator, X, y):
    """Mean Dice coefficient between predicted particles and the true masks."""
    scores = []
    for labels, mask in zip(estimator.transform(X), y):
        predicted = labels > 0
        total = predicted.sum() + mask.sum()
        scores.append(1.0 if total == 0 else 2.0 * np.logical_and(predicted, mask).sum() / total)
    return float(np.mean(scores))


# -- thresholds ------------------------------------------------------------
def test_fixed_is_strictly_greater():
    image = np.array([[0, 127, 128], [129, 200, 255]], dtype=np.uint8)
    baseline = GlobalThreshold(method="fixed", threshold=128).fit(image)
    assert baseline.threshold_ == 128
    expected = np.array([[0, 0, 0], [1, 1, 1]], dtype=np.float32)
    out = baseline.transform(image)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(baseline.histogram_[[0, 127, 128, 129, 200, 255]], 1)
    assert baseline.histogram_.sum() == image.size


def test_fixed_on_volume_list(crops):
    images, _ = crops
    baseline = GlobalThreshold(method="fixed", threshold=140).fit(images)
    out = baseline.transform(images)
    assert isinstance(out, list) and len(out) == len(images)
    for image, mask in zip(images, out):
        assert mask.shape == image.shape and mask.dtype == np.float32
        np.testing.assert_array_equal(mask, (image > 140).astype(np.float32))


@pytest.mark.parametrize(
    "method, reference",
    [
        ("otsu", lambda v: threshold_otsu(v)),
        ("li", lambda v: np.floor(threshold_li(v))),
        ("multiotsu", lambda v: threshold_multiotsu(v, classes=3)[-1]),
    ],
)
def test_threshold_matches_skimage_on_pooled_values(crops, method, reference):
    images, _ = crops
    values = np.concatenate([image.ravel() for image in images])
    baseline = GlobalThreshold(method=method).fit(images)
    assert isinstance(baseline.threshold_, int)
    assert baseline.threshold_ == int(reference(values))
    np.testing.assert_array_equal(baseline.histogram_, np.bincount(values, minlength=256))


def test_multiotsu_classes_changes_threshold(crops):
    images, _ = crops
    values = np.concatenate([image.ravel() for image in images])
    baseline = GlobalThreshold(method="multiotsu", classes=4).fit(images)
    assert baseline.threshold_ == int(threshold_multiotsu(values, classes=4)[-1])


@pytest.mark.parametrize("method", ["otsu", "li", "multiotsu"])
def test_bimodal_threshold_between_modes(method):
    image = bimodal_image()
    baseline = GlobalThreshold(method=method).fit(image)
    assert 60 < baseline.threshold_ < 180
    mask = baseline.transform(image).astype(bool)
    truth = np.zeros(image.shape, dtype=bool)
    truth[20:40, 20:40] = True
    if method != "multiotsu":  # two modes: two classes split them exactly
        np.testing.assert_array_equal(mask, truth)


def test_tile_maxima_hand_case():
    image = tile_image()
    baseline = GlobalThreshold(method="tile_maxima", tile_size=32, tile_factor=1.2).fit(image)
    assert baseline.threshold_ == 132  # mode of tile maxima 110, 1.2 * 110
    expected = np.zeros(image.shape, dtype=np.float32)
    expected[40:43, 10:13] = 1.0
    np.testing.assert_array_equal(baseline.transform(image), expected)


def test_tile_maxima_counts_partial_tiles():
    # 40 x 40 with 32-pixel tiles: one full tile and three partial ones.
    image = np.full((40, 40), 50, dtype=np.uint8)
    image[0, 0] = 90  # the full tile's maximum
    image[35, 5] = 70  # the partial tiles below and right of it reach 70
    image[5, 35] = 70
    image[35, 35] = 70
    baseline = GlobalThreshold(method="tile_maxima", tile_size=32, tile_factor=1.5).fit(image)
    assert baseline.threshold_ == 105  # mode 70 (three tiles), 1.5 * 70
    # Without the partial tiles the only maximum would be 90 -> 135.


def test_tile_maxima_pools_slices_and_caps_at_255():
    volume = np.stack([np.full((8, 8), 20, np.uint8), np.full((8, 8), 20, np.uint8)])
    volume[0, 0, 0] = 240  # one of the eight 4 x 4 tiles
    baseline = GlobalThreshold(method="tile_maxima", tile_size=4, tile_factor=1.5).fit(volume)
    assert baseline.threshold_ == 30
    baseline = GlobalThreshold(method="tile_maxima", tile_size=4, tile_factor=20.0).fit(volume)
    assert baseline.threshold_ == 255


# -- polarity ----------------------------------------------------------------
@pytest.mark.parametrize("method", ["fixed", "otsu", "li", "multiotsu", "tile_maxima"])
def test_dark_on_inverted_equals_bright_on_original(method):
    image = bimodal_image(seed=1)
    inverted = 255 - image
    bright = GlobalThreshold(method=method, tile_size=16).fit(image)
    dark = GlobalThreshold(method=method, tile_size=16, polarity="dark").fit(inverted)
    assert dark.threshold_ == bright.threshold_
    np.testing.assert_array_equal(dark.transform(inverted), bright.transform(image))
    np.testing.assert_array_equal(dark.histogram_, bright.histogram_)


# -- scikit-learn integration --------------------------------------------------
def test_pipeline_labels_particles(crops):
    images, masks = crops
    pipeline = Pipeline([("mixture", GlobalThreshold(method="otsu")), ("labeler", NanoparticleLabeler())])
    labels = pipeline.fit(images, masks).transform(images)
    threshold = pipeline.named_steps["mixture"].threshold_
    expected = NanoparticleLabeler().transform([image > threshold for image in images])
    assert len(labels) == len(images)
    for label, image, reference in zip(labels, images, expected):
        assert label.shape == image.shape and label.dtype == np.uint32
        assert label.max() > 0
        np.testing.assert_array_equal(label, reference)


def test_sparse_particles_need_more_than_otsu(crops):
    # Particles are about 1 % of the voxels: two-class Otsu splits the
    # background, while the top multi-Otsu class or the tile maxima find them.
    images, masks = crops

    def score(method):
        steps = [("mixture", GlobalThreshold(method=method)), ("labeler", NanoparticleLabeler())]
        return dice(Pipeline(steps).fit(images), images, masks)

    otsu = score("otsu")
    assert otsu < 0.2
    assert score("multiotsu") > otsu + 0.5
    assert score("tile_maxima") > otsu + 0.5


def test_grid_search(crops):
    images, masks = crops
    pipeline = Pipeline([("mixture", GlobalThreshold()), ("labeler", NanoparticleLabeler())])
    grid = {"mixture__method": ["fixed", "otsu"], "mixture__threshold": [60, 150]}
    search = GridSearchCV(pipeline, grid, scoring=dice, cv=2, n_jobs=1).fit(images, masks)
    scores = dict(zip(map(str, search.cv_results_["params"]), search.cv_results_["mean_test_score"]))
    assert len(scores) == 4 and all(np.isfinite(list(scores.values())))
    # Thresholding at 60 keeps nearly all background: the worst setting.
    worst = str({"mixture__method": "fixed", "mixture__threshold": 60})
    assert scores[worst] == min(scores.values())
    assert search.best_params_ != {"mixture__method": "fixed", "mixture__threshold": 60}


def test_clone_and_params_round_trip():
    baseline = GlobalThreshold(method="tile_maxima", tile_size=16, tile_factor=1.3, polarity="dark")
    params = baseline.get_params()
    assert params == {
        "method": "tile_maxima", "threshold": 128, "classes": 3,
        "tile_size": 16, "tile_factor": 1.3, "polarity": "dark",
    }
    cloned = clone(baseline)
    assert cloned is not baseline and cloned.get_params() == params
    cloned.set_params(method="fixed", threshold=7)
    assert cloned.get_params()["method"] == "fixed" and cloned.threshold == 7
    assert GlobalThreshold(**params).get_params() == params


@pytest.mark.parametrize("dump", ["pickle", "joblib"])
def test_serialisation_round_trip(crops, dump):
    images, _ = crops
    baseline = GlobalThreshold(method="li").fit(images)
    if dump == "pickle":
        restored = pickle.loads(pickle.dumps(baseline))
    else:
        buffer = io.BytesIO()
        joblib.dump(baseline, buffer)
        buffer.seek(0)
        restored = joblib.load(buffer)
    assert restored.threshold_ == baseline.threshold_
    for a, b in zip(restored.transform(images), baseline.transform(images)):
        np.testing.assert_array_equal(a, b)


# -- errors ------------------------------------------------------------------
def test_not_fitted():
    with pytest.raises(NotFittedError):
        GlobalThreshold().transform(np.zeros((4, 4), np.uint8))


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_rejects_non_uint8(dtype):
    with pytest.raises(TypeError, match="uint8"):
        GlobalThreshold().fit(np.zeros((4, 4), dtype))
    fitted = GlobalThreshold(method="fixed").fit(np.zeros((4, 4), np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        fitted.transform([np.zeros((4, 4), np.uint8), np.zeros((4, 4), dtype)])


def test_rejects_lazy_arrays():
    zarr = pytest.importorskip("zarr")
    array = zarr.zeros((2, 4, 4), dtype=np.uint8)
    with pytest.raises(TypeError, match="in-memory arrays"):
        GlobalThreshold().fit(array)


@pytest.mark.parametrize("method", ["otsu", "li", "multiotsu"])
def test_constant_input(method):
    with pytest.raises(ValueError, match="distinct intensity"):
        GlobalThreshold(method=method).fit(np.full((8, 8), 77, np.uint8))


def test_multiotsu_needs_as_many_intensities_as_classes():
    image = np.array([[10, 200], [10, 200]], np.uint8)
    with pytest.raises(ValueError, match="into 3 classes"):
        GlobalThreshold(method="multiotsu").fit(image)
    assert GlobalThreshold(method="otsu").fit(image).threshold_ == 10


@pytest.mark.parametrize("method", ["fixed", "tile_maxima"])
def test_constant_input_allowed_without_histogram_method(method):
    image = np.full((8, 8), 77, np.uint8)
    out = GlobalThreshold(method=method).fit(image).transform(image)
    assert not out.any()


@pytest.mark.parametrize(
    "params, name",
    [
        ({"method": "kmeans"}, "method"),
        ({"threshold": 256}, "threshold"),
        ({"threshold": -1}, "threshold"),
        ({"threshold": 0.5}, "threshold"),
        ({"classes": 2}, "classes"),
        ({"tile_size": 0}, "tile_size"),
        ({"tile_factor": 0.0}, "tile_factor"),
        ({"polarity": "up"}, "polarity"),
    ],
)
def test_bad_params(params, name):
    with pytest.raises(ValueError, match=f"'{name}' parameter of GlobalThreshold"):
        GlobalThreshold(**params).fit(np.arange(16, dtype=np.uint8).reshape(4, 4))


def test_mismatched_targets():
    with pytest.raises(ValueError, match="shape"):
        GlobalThreshold().fit(bimodal_image(), np.zeros((3, 3), bool))
