"""Gaussians evaluated at chosen voxels, gate growth and the forest's loop: the values of the dense code, bit for bit."""

import numpy as np
import pytest
from scipy import ndimage as ndi
from sklearn.ensemble import ExtraTreesClassifier, GradientBoostingClassifier, RandomForestClassifier

import nanoseg._ops._numba as _numba
import nanoseg._ops.sparse_gaussian as sparse_gaussian
from nanoseg._backend import CPU
from nanoseg._engine.classify import predict_proba
from nanoseg._ops.filters import FEATURES, FeatureSpec, compute_features
from nanoseg._ops.morphology import grow_box

pytestmark = pytest.mark.skipif(not sparse_gaussian.available(), reason="needs the compiled kernels (numba)")


@pytest.mark.parametrize("shape", [(5, 9, 7), (1, 30, 40), (12, 50, 61), (3, 2, 3)])
@pytest.mark.parametrize(
    "sigma", [(0.8, 4.0, 4.0), (0.2, 1.0, 1.0), (0.0, 2.0, 2.0), (1.5, 0.0, 3.0), (2.0, 3.0, 0.0), (3.0, 7.0, 9.0)]
)
def test_gaussian_at_equals_the_dense_filter(shape, sigma):
    rng = np.random.default_rng(sum(shape))
    image = (rng.normal(size=shape) * 3).astype(np.float32)
    dense = ndi.gaussian_filter(image, sigma, mode="reflect", truncate=3.0)
    # Unsorted, with repeats: values come back in the order asked for.
    flat = rng.integers(0, image.size, size=min(image.size, 60))
    got = sparse_gaussian.gaussian_at(image, sigma, sparse_gaussian.Points(shape, flat), 3.0)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, dense.ravel()[flat])
    # The square, squared as the passes read it, equals the filter of image * image.
    squared = sparse_gaussian.gaussian_at(image, sigma, sparse_gaussian.Points(shape, flat), 3.0, square=True)
    dense_squared = ndi.gaussian_filter(image * image, sigma, mode="reflect", truncate=3.0)
    np.testing.assert_array_equal(squared, dense_squared.ravel()[flat])


def test_points_count_the_rows_they_touch():
    points = sparse_gaussian.Points((4, 10, 20), [0, 1, 25, 399])
    assert points.row_ids.tolist() == [0, 1, 19]
    assert points.row_fraction == pytest.approx(3 / 40)


@pytest.mark.parametrize("features", [FEATURES, ("gaussian", "contrast"), ("hessian",), ("gradient", "dog")])
@pytest.mark.parametrize("ndim", [2, 3])
def test_features_at_chosen_voxels_do_not_depend_on_the_sparse_path(features, ndim, monkeypatch):
    rng = np.random.default_rng(3)
    image = ndi.gaussian_filter(rng.normal(size=(9, 40, 44)), 1.0).astype(np.float32)
    sigmas = ((0.0, 1.0, 1.0), (0.0, 2.5, 2.5)) if ndim == 2 else ((0.4, 1.0, 1.0), (0.8, 2.0, 2.0))
    spec = FeatureSpec(features, sigmas)
    where = np.zeros(image.shape, dtype=bool)
    where[rng.integers(0, 9, 30), rng.integers(0, 40, 30), rng.integers(0, 44, 30)] = True
    where[0, 0, :3] = where[-1, -1, -2:] = True  # at the crop's edges
    sparse = compute_features(CPU, image, spec, where=where)
    monkeypatch.setattr(sparse_gaussian, "MAX_ROW_FRACTION", -1.0)  # always dense
    dense = compute_features(CPU, image, spec, where=where)
    np.testing.assert_array_equal(sparse, dense)


@pytest.mark.parametrize(
    ("shape", "density", "margin"),
    [((10, 40, 50), 0.001, (1, 2, 2)), ((5, 6, 7), 0.05, (2, 3, 1)), ((3, 30, 30), 0.3, (1, 1, 1)),
     ((4, 9, 9), 0.0, (1, 2, 2)), ((1, 20, 20), 0.01, (0, 2, 2))],
)
@pytest.mark.parametrize("compiled", [True, False])
def test_grow_box_equals_the_maximum_filter(shape, density, margin, compiled, monkeypatch):
    monkeypatch.setattr(_numba, "ENABLED", compiled)
    mask = np.random.default_rng(1).random(shape) < density
    expected = ndi.maximum_filter(mask.view(np.uint8), size=tuple(2 * m + 1 for m in margin), mode="constant")
    np.testing.assert_array_equal(grow_box(mask, margin), expected.view(bool))


class ForestSubclass(RandomForestClassifier):
    """Not exactly a RandomForestClassifier: called as is."""

    def predict_proba(self, X):
        return np.full((len(X), 2), 0.5)


@pytest.mark.parametrize("forest", [RandomForestClassifier, ExtraTreesClassifier])
@pytest.mark.parametrize("n_jobs", [None, 2])
def test_forest_loop_gives_the_forest_probabilities(forest, n_jobs):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 6)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 0).astype(int)
    model = forest(n_estimators=12, max_depth=5, random_state=0).fit(X, y)
    test = rng.normal(size=(300, 6)).astype(np.float32)
    expected = model.predict_proba(test)  # one job: trees added in order
    model.set_params(n_jobs=n_jobs)
    np.testing.assert_array_equal(predict_proba(model, test), expected)
    # Non-finite features go to the forest itself (which handles or refuses them).
    missing = test[:5].copy()
    missing[:, 2] = np.nan
    model.set_params(n_jobs=None)
    try:
        own = model.predict_proba(missing)
    except ValueError:
        with pytest.raises(ValueError):
            predict_proba(model, missing)
    else:
        np.testing.assert_array_equal(predict_proba(model, missing), own)


def test_other_classifiers_are_called_as_they_are():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(100, 3)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    boosted = GradientBoostingClassifier(n_estimators=5).fit(X, y)
    np.testing.assert_array_equal(predict_proba(boosted, X), boosted.predict_proba(X))
    odd = ForestSubclass(n_estimators=3).fit(X, y)
    np.testing.assert_array_equal(predict_proba(odd, X), np.full((100, 2), 0.5))


@pytest.mark.parametrize("sigma", [(0.8, 4.0, 4.0), (0.0, 2.0, 2.0), (1.5, 0.0, 3.0), (2.0, 3.0, 0.0)])
def test_gaussian_at_few_columns_of_wide_rows_equals_the_dense_filter(sigma):
    # Chosen voxels in narrow runs of wide rows, at both edges and inside:
    # the passes compute only the columns read, and must still be exact.
    rng = np.random.default_rng(7)
    shape = (6, 40, 300)
    image = (rng.normal(size=shape) * 5).astype(np.float32)
    dense = ndi.gaussian_filter(image, sigma, mode="reflect", truncate=3.0)
    chosen = np.zeros(shape, dtype=bool)
    chosen[2, 5:9, 0:3] = True
    chosen[3, 20, 140:146] = True
    chosen[4, 30:33, 296:300] = True
    chosen[0, 39, 150] = True
    flat = np.flatnonzero(chosen)
    points = sparse_gaussian.Points(shape, flat)
    assert points.row_fraction < 0.5
    got = sparse_gaussian.gaussian_at(image, sigma, points, 3.0)
    np.testing.assert_array_equal(got, dense.ravel()[flat])


@pytest.mark.parametrize("features", [("gradient",), ("hessian",), ("gradient", "hessian", "contrast")])
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("sparse", [True, False])
def test_compiled_derivatives_equal_the_numpy_code(features, ndim, sparse, monkeypatch):
    # The compiled loop over chosen voxels (point_derivatives) against the
    # NumPy stencil code it replaces on the CPU, on the same smoothed images:
    # float32 differences alike to the bit; eigenvalues from float64 cosines
    # of two libraries, alike to float32 rounding.
    import nanoseg._ops.point_derivatives as point_derivatives

    rng = np.random.default_rng(11)
    image = ndi.gaussian_filter(rng.normal(size=(7, 33, 29)), 0.7).astype(np.float32) * 9
    sigmas = ((0.0, 1.0, 1.0), (0.0, 2.0, 2.0)) if ndim == 2 else ((0.5, 1.0, 1.0), (1.0, 2.5, 2.5))
    spec = FeatureSpec(features, sigmas)
    where = rng.random(image.shape) < (0.02 if sparse else 0.9)
    where[0, 0, 0] = where[-1, -1, -1] = where[3, 0, 28] = True  # clamped neighbours
    compiled = compute_features(CPU, image, spec, where=where)
    monkeypatch.setattr(point_derivatives, "available", lambda: False)
    numpy_code = compute_features(CPU, image, spec, where=where)
    assert compiled.dtype == numpy_code.dtype == np.float32
    np.testing.assert_allclose(compiled, numpy_code, rtol=2e-6, atol=1e-6)
    # At least the gradient (no cosines) is identical.
    if "gradient" in features:
        np.testing.assert_array_equal(compiled[: len(sigmas)], numpy_code[: len(sigmas)])


def test_neighbour_ranks_find_every_neighbour_among_the_sampled_voxels():
    import nanoseg._ops.point_derivatives as point_derivatives

    shape = (4, 6, 5)
    flat = np.array([0, 7, 33, 119])
    offsets = point_derivatives.stencil_offsets((0, 1, 2))
    neighbours = point_derivatives.neighbour_positions(flat, shape, offsets)
    # Clamped at the crop's faces, as the NumPy stencil does.
    z, y, x = np.unravel_index(flat, shape)
    expected = np.stack(
        [np.ravel_multi_index(tuple(np.clip(c + d, 0, n - 1) for c, d, n in zip((z, y, x), o, shape)), shape) for o in offsets],
        axis=1,
    )
    np.testing.assert_array_equal(neighbours, expected)
    sampled = np.unique(np.concatenate([neighbours.ravel(), [1, 2, 50]]))
    ranks = point_derivatives.ranks(neighbours, sampled, int(np.prod(shape)))
    np.testing.assert_array_equal(sampled[ranks], neighbours)


def test_row_passes_compute_only_the_column_tiles_that_are_read():
    tile = sparse_gaussian.TILE_COLUMNS
    shape = (3, 20, 10 * tile)
    flat = np.ravel_multi_index(([1, 1], [5, 5], [3 * tile + 2, 3 * tile + 3]), shape)
    points = sparse_gaussian.Points(shape, flat)
    # Radius 3 around columns 3T+2 and 3T+3: tiles 2 and 3 of row (1, 5) only.
    assert points.tiles(3).tolist() == [[t in (2, 3) for t in range(10)]]
    # The Z pass computes those tiles on every row the Y pass reads (within 4 rows, reflected).
    band_z, band_y, _ = points.band(4)
    marked = points.band_tiles(4, 3)
    assert sorted(band_y.tolist()) == list(range(1, 10)) and set(band_z.tolist()) == {1}
    assert marked.tolist() == [[t in (2, 3) for t in range(10)]] * 9
    # Near the row's start, the reflected columns lie in the first tile.
    edge = sparse_gaussian.Points(shape, np.ravel_multi_index(([0], [0], [1]), shape))
    assert edge.tiles(5).tolist() == [[t == 0 for t in range(10)]]
