"""Tests for nanoseg.plotting: the QC figures render headless and show the right data."""

import re
import sys

import matplotlib

matplotlib.use("Agg")

import dask.array as da
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import zarr
from matplotlib.image import imread
from skimage.segmentation import find_boundaries
from sklearn.exceptions import NotFittedError

from nanoseg import (
    NanoparticleClassifier,
    NanoparticleLabeler,
    NanoparticleMixture,
    plotting,
)
from nanoseg import _handoff as handoff
from nanoseg.datasets import make_crops, make_phantom
from nanoseg.measure import particle_table
from nanoseg.plotting import (
    plot_feature_importances,
    plot_features,
    plot_mixture,
    plot_overlay,
    plot_probability,
    plot_size_distribution,
    plot_slice_weights,
    plot_threshold_sensitivity,
    write_report,
)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def fitted():
    """A fitted phantom pipeline: image, mixture, posterior, labels, table."""
    image, _ = make_phantom((12, 96, 96), n_particles=15, random_state=1)
    mixture = NanoparticleMixture().fit(image)
    posterior = mixture.transform(image)
    labels = NanoparticleLabeler().transform(posterior)
    table = particle_table(labels, spacing=(50.0, 10.0, 10.0), posterior=posterior, intensity=image)
    assert len(table) > 3
    return {"image": image, "mixture": mixture, "posterior": posterior, "labels": labels, "table": table}


def new_axes():
    return plt.subplots()[1]


# ---------------------------------------------------------------------------
# plot_mixture
# ---------------------------------------------------------------------------


def test_plot_mixture_shows_the_pmfs_and_thresholds(fitted):
    mixture = fitted["mixture"]
    ax = new_axes()
    assert plot_mixture(mixture, ax=ax) is ax
    assert ax.get_yscale() == "log"
    assert ax.get_title() == "Intensity mixture"
    assert "intensity" in ax.get_xlabel() and ax.get_ylabel() == "probability"
    stack, background, particles, low, high = ax.lines
    w = mixture.background_weight_
    np.testing.assert_array_equal(stack.get_xdata(), np.arange(256))
    np.testing.assert_allclose(stack.get_ydata(), mixture.stack_pmf_)
    np.testing.assert_allclose(background.get_ydata(), w * mixture.background_pmf_)
    np.testing.assert_allclose(particles.get_ydata(), (1 - w) * mixture.particle_pmf_)
    # The two components add up to the fitted model of the stack.
    np.testing.assert_allclose(
        background.get_ydata() + particles.get_ydata(),
        w * mixture.background_pmf_ + (1 - w) * mixture.particle_pmf_,
    )
    assert list(low.get_xdata()) == [mixture.low_intensity_] * 2
    assert list(high.get_xdata()) == [mixture.high_intensity_] * 2
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert f"seed intensity {mixture.low_intensity_}" in legend


def test_plot_mixture_makes_a_figure_when_no_axes(fitted):
    ax = plot_mixture(fitted["mixture"])
    assert ax.figure is plt.gcf()


def test_plot_mixture_needs_a_fitted_mixture():
    with pytest.raises(NotFittedError):
        plot_mixture(NanoparticleMixture())
    with pytest.raises(TypeError, match="Expected a fitted NanoparticleMixture; NanoparticleLabeler has no"):
        plot_mixture(NanoparticleLabeler())


def test_missing_matplotlib_names_the_extra(fitted, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"nanoseg\[plot\]"):
        plot_mixture(fitted["mixture"])


# ---------------------------------------------------------------------------
# plot_slice_weights
# ---------------------------------------------------------------------------


def test_plot_slice_weights_traces_each_slice(fitted):
    mixture, image = fitted["mixture"], fitted["image"]
    ax = plot_slice_weights(mixture, image, ax=new_axes())
    trace, reference = ax.lines
    np.testing.assert_array_equal(trace.get_xdata(), np.arange(image.shape[0]))
    np.testing.assert_allclose(trace.get_ydata(), mixture.slice_weights(image))
    assert list(reference.get_ydata()) == [pytest.approx(1 - mixture.background_weight_)] * 2
    assert ax.get_xlabel() == "slice (z)"


def test_plot_slice_weights_one_line_per_crop(fitted):
    crops, _ = make_crops(3, (4, 48, 48), n_particles=4, random_state=0)
    ax = plot_slice_weights(fitted["mixture"], crops)
    assert len(ax.lines) == 3 + 1
    for line, crop in zip(ax.lines, crops):
        assert line.get_ydata().shape == (crop.shape[0],)


# ---------------------------------------------------------------------------
# plot_threshold_sensitivity
# ---------------------------------------------------------------------------


def expected_counts(posterior, thresholds, **params):
    counts, voxels = [], []
    for t in thresholds:
        labels = NanoparticleLabeler(threshold=t, **params).transform(posterior)
        counts.append(np.unique(labels[labels > 0]).size)
        voxels.append(int(np.count_nonzero(labels)))
    return counts, voxels


def test_threshold_sensitivity_counts_particles_and_voxels(fitted):
    posterior = fitted["posterior"]
    thresholds = [0.99, 0.5, 0.9]
    ax = plot_threshold_sensitivity(posterior, thresholds, ax=new_axes())
    counts, voxels = expected_counts(posterior, [0.5, 0.9, 0.99])
    np.testing.assert_allclose(ax.lines[0].get_xdata(), [0.5, 0.9, 0.99])
    assert list(ax.lines[0].get_ydata()) == counts
    twin = ax.figure.axes[-1]
    assert twin is not ax
    assert list(twin.lines[0].get_ydata()) == voxels
    assert voxels[0] >= voxels[1] >= voxels[2]
    # The default labeler's threshold is marked.
    assert list(ax.lines[1].get_xdata()) == [0.95, 0.95]
    assert ax.get_title() == "Threshold sensitivity"


def test_threshold_sensitivity_uses_the_labelers_parameters(fitted):
    posterior = fitted["posterior"]
    labeler = NanoparticleLabeler(threshold=0.9, min_size=40, radius=0)
    ax = plot_threshold_sensitivity(posterior, [0.6, 0.95], labeler=labeler)
    counts, _ = expected_counts(posterior, [0.6, 0.95], min_size=40, radius=0)
    assert list(ax.lines[0].get_ydata()) == counts
    assert counts != expected_counts(posterior, [0.6, 0.95])[0]
    assert list(ax.lines[1].get_xdata()) == [0.9, 0.9]


def test_threshold_sensitivity_defaults_and_max_thresholds(fitted):
    posterior = fitted["posterior"][:4]
    ax = plot_threshold_sensitivity(posterior)
    np.testing.assert_allclose(ax.lines[0].get_xdata(), sorted({*plotting.DEFAULT_THRESHOLDS, 0.95}))
    ax = plot_threshold_sensitivity(posterior, [0.1, 0.3, 0.5, 0.7, 0.9], max_thresholds=3)
    np.testing.assert_allclose(ax.lines[0].get_xdata(), [0.1, 0.5, 0.9])


def test_threshold_sensitivity_on_dask_and_lists(fitted):
    posterior = fitted["posterior"]
    expected, voxels = expected_counts(posterior, [0.5, 0.95])
    lazy = plot_threshold_sensitivity(da.from_array(posterior, chunks=(4, 96, 96)), [0.5, 0.95])
    assert list(lazy.lines[0].get_ydata()) == expected
    assert list(lazy.figure.axes[-1].lines[0].get_ydata()) == voxels
    halves = [posterior[:6], posterior[6:]]
    pooled = plot_threshold_sensitivity(halves, [0.5, 0.95])
    count_halves = [expected_counts(h, [0.5, 0.95]) for h in halves]
    assert list(pooled.lines[0].get_ydata()) == [sum(c[0][i] for c in count_halves) for i in range(2)]
    assert list(pooled.figure.axes[-1].lines[0].get_ydata()) == [sum(c[1][i] for c in count_halves) for i in range(2)]


def test_threshold_sensitivity_computes_a_small_lazy_posterior_once(fitted, monkeypatch):
    import dask

    from nanoseg import _plot_particles

    posterior = fitted["posterior"]
    calls = []

    def counted(block):
        calls.append(1)
        return block

    lazy = da.from_array(posterior, chunks=(4, 96, 96)).map_blocks(counted, dtype=posterior.dtype)
    n_blocks = lazy.npartitions
    calls.clear()  # dask may call it once on a stand-in while building the graph
    held = _plot_particles.held_for_thresholds(lazy)
    assert len(calls) == n_blocks and held.chunks[0] == (1,) * posterior.shape[0]
    np.testing.assert_array_equal(held.compute(), posterior)
    ax = plot_threshold_sensitivity(lazy, [0.5, 0.9, 0.95])
    assert len(calls) == 2 * n_blocks  # once more for the figure, not once a threshold
    assert list(ax.lines[0].get_ydata()) == expected_counts(posterior, [0.5, 0.9, 0.95])[0]
    # Larger than the limit, or computed by other processes: left lazy.
    monkeypatch.setattr(_plot_particles, "SENSITIVITY_MEMORY_BYTES", lazy.nbytes - 1)
    assert _plot_particles.held_for_thresholds(lazy) is lazy
    monkeypatch.undo()
    with dask.config.set(scheduler="processes"):
        assert _plot_particles.held_for_thresholds(lazy) is lazy
    # Lists and 2D images are labelled as they are; NumPy volumes as dask arrays of planes.
    halves = [posterior[:6], posterior[6:]]
    assert _plot_particles.held_for_thresholds(halves) is halves
    plane = posterior[0]
    assert _plot_particles.held_for_thresholds(plane) is plane
    assert isinstance(_plot_particles.held_for_thresholds(posterior), da.Array)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"thresholds": [0.5, 1.5]}, r"thresholds must be one or more numbers in \[0, 1\]"),
        ({"thresholds": []}, r"thresholds must be one or more numbers in \[0, 1\]"),
        ({"max_thresholds": 0}, "max_thresholds must be a positive integer"),
    ],
)
def test_threshold_sensitivity_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plot_threshold_sensitivity(np.zeros((2, 4, 4), np.float32), **kwargs)


# ---------------------------------------------------------------------------
# plot_size_distribution
# ---------------------------------------------------------------------------


def test_size_distribution_histograms_the_column(fitted):
    table = fitted["table"]
    ax = plot_size_distribution(table, ax=new_axes(), bins=5)
    heights = [bar.get_height() for bar in ax.patches]
    assert len(heights) == 5
    assert sum(heights) == len(table)
    expected, _ = np.histogram(table["equivalent_diameter"], bins=5)
    assert heights == list(expected)
    assert list(ax.lines[0].get_xdata()) == [pytest.approx(table["equivalent_diameter"].median())] * 2
    assert ax.get_xlabel() == "equivalent diameter"
    assert ax.get_title() == f"{len(table)} particles"


def test_size_distribution_other_column_and_errors(fitted):
    ax = plot_size_distribution(fitted["table"], column="volume", bins=3)
    assert ax.get_xlabel() == "volume" and len(ax.patches) == 3
    with pytest.raises(ValueError, match="no column 'diameter'.*equivalent_diameter"):
        plot_size_distribution(fitted["table"], column="diameter")


def test_size_distribution_of_no_particles():
    ax = plot_size_distribution(pd.DataFrame({"equivalent_diameter": np.empty(0)}))
    assert len(ax.patches) == 0
    assert ax.texts[0].get_text() == "no particles"
    assert ax.get_title() == "0 particles"


# ---------------------------------------------------------------------------
# plot_overlay
# ---------------------------------------------------------------------------


def test_overlay_defaults_to_the_busiest_plane(fitted):
    image, labels = fitted["image"], fitted["labels"]
    busiest = int(np.argmax([np.count_nonzero(p) for p in labels]))
    ax = plot_overlay(image, labels, ax=new_axes())
    assert ax.get_title().startswith(f"plane z = {busiest}:")
    n = np.unique(labels[busiest][labels[busiest] > 0]).size
    assert ax.get_title().endswith(f"{n} particles")
    (shown,) = ax.images
    rgb = shown.get_array()
    assert rgb.shape == (*image.shape[1:], 3)
    outline = find_boundaries(labels[busiest], mode="outer")
    assert outline.any()
    np.testing.assert_allclose(rgb[outline], np.tile([1.0, 1.0, 0.0], (outline.sum(), 1)))
    # Away from particles the image is shown in grey, scaled from uint8.
    far = ~find_boundaries(labels[busiest] > 0, mode="thick") & (labels[busiest] == 0)
    np.testing.assert_allclose(rgb[far][:, 0], image[busiest][far] / 255.0, atol=1e-6)


def test_overlay_reads_zarr_and_dask_and_takes_a_plane(fitted):
    image, labels = fitted["image"], fitted["labels"]
    stored = zarr.create_array(store={}, shape=labels.shape, chunks=(2, 96, 96), dtype=labels.dtype)
    stored[...] = labels
    reference = plot_overlay(image, labels).images[0].get_array()
    lazy = plot_overlay(da.from_array(image, chunks=3), stored).images[0].get_array()
    np.testing.assert_array_equal(lazy, reference)
    ax = plot_overlay(image, labels, plane=0)
    assert ax.get_title().startswith("plane z = 0:")


def test_overlay_2d_and_errors(fitted):
    image, labels = fitted["image"], fitted["labels"]
    assert plot_overlay(image[3], labels[3] > 0).get_title().startswith("image:")
    with pytest.raises(ValueError, match="plane must be an integer from 0 to 11"):
        plot_overlay(image, labels, plane=12)
    with pytest.raises(ValueError, match=r"image has shape \(12, 96, 96\) but labels has shape \(12, 96, 95\)"):
        plot_overlay(image, labels[..., :95])
    with pytest.raises(TypeError, match="integer labels or a boolean mask"):
        plot_overlay(image, labels.astype(float))


def _window_counts_by_brute_force(plane, size, step):
    # Labelled pixels of every size x size window (the whole axis where the
    # plane is smaller) on a grid of `step`, with the window flush with the
    # far edges added, counted one by one, in raster order.
    def starts(n):
        width = min(size, n)
        found = list(range(0, n - width + 1, step))
        return found if found[-1] == n - width else [*found, n - width]

    return {
        (r, c): np.count_nonzero(plane[r : r + size, c : c + size])
        for r in starts(plane.shape[0])
        for c in starts(plane.shape[1])
    }


def _busiest_window_by_brute_force(plane, size):
    # The window the overlay shows: the most labelled pixels on a grid of a
    # quarter of `size`, the first in raster order among ties, the centre
    # when there is no particle.
    counts = _window_counts_by_brute_force(plane, size, max(1, size // 4))
    height, width = (min(size, n) for n in plane.shape)
    best = max(counts.values())
    if best:
        row0, col0 = next(start for start, count in counts.items() if count == best)
    else:
        row0, col0 = (plane.shape[0] - height) // 2, (plane.shape[1] - width) // 2
    return slice(row0, row0 + height), slice(col0, col0 + width)


def test_overlay_window_shows_the_busiest_square_at_full_resolution():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (2, 80, 96), dtype=np.uint8)
    labels = np.zeros(image.shape, dtype=np.uint32)
    labels[1, 5, 7] = 1  # a lone particle
    labels[1, 50:53, 60:63], labels[1, 55:58, 66:69], labels[1, 60:62, 61:64] = 2, 3, 4  # a cluster
    counts = _window_counts_by_brute_force(labels[1], 20, 5)
    best = max(counts.values())
    ax = plot_overlay(image, labels, window=20)
    title = ax.get_title()
    r0, r1, c0, c1 = map(int, re.search(r"rows (\d+)-(\d+), columns (\d+)-(\d+)", title).groups())
    assert title.startswith("plane z = 1: ") and (r1 - r0 + 1, c1 - c0 + 1) == (20, 20)
    assert counts[(r0, c0)] == best
    (shown,) = ax.images
    # The axes keep the plane's coordinates.
    assert shown.get_extent() == [c0 - 0.5, c1 + 0.5, r1 + 0.5, r0 - 0.5]
    window = shown.get_array()
    whole = plot_overlay(image, labels).images[0].get_array()[r0 : r1 + 1, c0 : c1 + 1]
    assert window.shape == (20, 20, 3)
    # Exactly those pixels of the whole plane's overlay: the same colours,
    # and outlines of particles just outside the window drawn at its edge.
    np.testing.assert_array_equal(window, whole)
    # Particle 2 (rows 50-52) lies just above this window: its outline's
    # lowest row is the window's first.
    below = plot_overlay(image, labels, window=(slice(53, 70), slice(58, 80))).images[0].get_array()
    whole = plot_overlay(image, labels).images[0].get_array()
    assert (below[0, 2:5] == (1.0, 1.0, 0.0)).all()
    np.testing.assert_array_equal(below, whole[53:70, 58:80])


def test_overlay_of_a_plane_too_large_to_show_whole_is_reduced(monkeypatch):
    """Past OVERVIEW_PIXELS a side, each block of pixels is shown as one: its
    largest label (no particle vanishes) over its mean intensity, read band
    by band; the axes keep the plane's coordinates and the title counts every
    particle of the plane."""
    from skimage.measure import block_reduce

    from nanoseg import _plot_volume
    from nanoseg._plot_volume import colour_labels, outer_boundaries

    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (3, 90, 77), dtype=np.uint8)
    labels = np.zeros(image.shape, dtype=np.uint32)
    # Small particles, some in the same block as another (a larger label hides a smaller one).
    for label, (row, col) in zip(rng.permutation(40) + 1, rng.integers(0, 86, (40, 2))):
        size = rng.integers(1, 4)
        labels[1, row : row + size, min(col, 74) : min(col, 74) + size] = label
    plane = 1
    monkeypatch.setattr(_plot_volume, "OVERVIEW_PIXELS", 20)
    monkeypatch.setattr(_plot_volume, "BAND_BYTES", 8 * 77 * 7)  # bands of 5 rows: whole blocks
    step = 5  # ceil(90 / 20)
    ax = plot_overlay(image, labels, plane=plane)
    ids = block_reduce(labels[plane].astype(np.int64), (step, step), np.max, cval=0)
    mean = block_reduce(image[plane] / 255.0, (step, step), np.nanmean, cval=np.nan)
    assert ids.shape == (18, 16)
    particles = np.unique(labels[plane][labels[plane] > 0])
    assert particles.size > np.unique(ids[ids > 0]).size  # some hidden at this scale, still counted
    expected = colour_labels(ids, mean, 0.3, palette_labels=particles)
    expected[outer_boundaries(ids)] = (1.0, 1.0, 0.0)
    (shown,) = ax.images
    np.testing.assert_allclose(shown.get_array(), expected, rtol=0, atol=1e-12)
    # Every block holding a particle pixel shows a particle.
    assert ((ids > 0) == block_reduce(labels[plane] > 0, (step, step), np.max)).all()
    assert ax.get_title() == f"plane z = {plane}: {particles.size} particles, shown 5x reduced"
    assert shown.get_extent() == [-0.5, 79.5, 89.5, -0.5]
    assert ax.get_xlim() == (-0.5, 76.5) and ax.get_ylim() == (89.5, -0.5)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_window_overlay_reads_the_plane_band_by_band(fitted, monkeypatch, dtype):
    """A window's overlay finds the busiest window, the plane's palette and
    its intensity range from bands of rows: the same as from the whole plane."""
    from skimage.color import label2rgb

    from nanoseg import _plot_volume
    from nanoseg._plot_common import grey

    image, labels = fitted["image"], fitted["labels"]
    if dtype == np.uint16:
        image = (image.astype(np.uint16) * 200 + 300).astype(np.uint16)
    monkeypatch.setattr(_plot_volume, "BAND_BYTES", 8 * 96 * 3)  # 3 rows a band
    for plane in (1, 6):
        ax = plot_overlay(image, labels, plane=plane, window=24)
        ids = labels[plane].astype(np.int64)
        rows, cols = _busiest_window_by_brute_force(ids, 24)
        assert f"rows {rows.start}-{rows.stop - 1}, columns {cols.start}-{cols.stop - 1}," in ax.get_title()
        expected = label2rgb(ids, image=grey(image[plane]), bg_label=0, bg_color=None, alpha=0.3)
        # int32: scikit-image's erosion overflows on int64 labels.
        expected[find_boundaries(ids.astype(np.int32), mode="outer")] = (1.0, 1.0, 0.0)
        np.testing.assert_allclose(ax.images[0].get_array(), expected[rows, cols], rtol=0, atol=1e-12)


def test_busiest_window_found_band_by_band_is_the_whole_planes(monkeypatch):
    """The window search from bands of rows (running sums at the rows that
    bound a window) picks the window that counting every window does."""
    from nanoseg import _plot_volume
    from nanoseg._plot_volume import _PlaneScan
    from nanoseg._volume import as_volume

    rng = np.random.default_rng(11)
    for trial in range(40):
        n_rows, n_cols = rng.integers(5, 60, 2)
        labels = np.zeros((2, n_rows, n_cols), dtype=np.uint16)
        labels[1] = (rng.random((n_rows, n_cols)) < rng.uniform(0.02, 0.3)) * rng.integers(1, 9, (n_rows, n_cols))
        image = rng.integers(0, 256, labels.shape, dtype=np.uint8)
        size = int(rng.integers(2, 40))
        monkeypatch.setattr(_plot_volume, "BAND_BYTES", int(8 * n_cols * rng.integers(1, 7)))
        scan = _PlaneScan(as_volume(image), as_volume(labels), 1, size=size).run()
        assert scan.window == _busiest_window_by_brute_force(labels[1], size), (trial, n_rows, n_cols, size)
        np.testing.assert_array_equal(scan.labels, np.unique(labels[1][labels[1] > 0]))


def test_probability_figure_of_a_large_plane_is_reduced(monkeypatch):
    """plot_probability past OVERVIEW_PIXELS a side: each block shown as its
    mean intensity, its largest probability and its largest label."""
    from skimage.measure import block_reduce

    from nanoseg import _plot_volume
    from nanoseg._plot_volume import outer_boundaries

    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (2, 45, 62), dtype=np.uint16) * 100  # scaled by the plane's range
    probability = rng.random(image.shape).astype(np.float32) ** 8
    labels = (probability > 0.7).astype(np.uint8)
    monkeypatch.setattr(_plot_volume, "OVERVIEW_PIXELS", 16)
    monkeypatch.setattr(_plot_volume, "BAND_BYTES", 8 * 62 * 8)  # bands of 8 rows
    step = 4  # ceil(62 / 16)
    grey, shown, outlined = plot_probability(image, probability, labels, plane=1)
    raw = image[1].astype(np.float64)
    mean = block_reduce(raw, (step, step), np.nanmean, cval=np.nan)
    expected_grey = (mean - raw.min()) / (raw.max() - raw.min())
    np.testing.assert_allclose(grey.images[0].get_array(), expected_grey, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(shown.images[0].get_array(), block_reduce(probability[1], (step, step), np.max))
    ids = block_reduce(labels[1].astype(np.int64), (step, step), np.max)
    rgb = np.dstack([expected_grey] * 3)
    rgb[outer_boundaries(ids)] = (1.0, 1.0, 0.0)
    np.testing.assert_allclose(outlined.images[0].get_array(), rgb, rtol=0, atol=1e-12)
    assert grey.get_title() == "plane z = 1, shown 4x reduced"
    assert shown.get_title() == "particle probability (block maxima)"
    assert outlined.get_title() == "1 particle"


def test_overlay_window_by_slices_small_planes_and_errors():
    image = np.zeros((12, 16), dtype=np.uint8)
    labels = np.zeros((12, 16), dtype=np.int32)
    labels[2:4, 3:5] = 1
    ax = plot_overlay(image, labels, window=(slice(1, 5), slice(2, None)))
    assert ax.get_title() == "image: rows 1-4, columns 2-15, 1 particle"
    assert ax.images[0].get_array().shape == (4, 14, 3)
    # A window larger than the plane shows it whole.
    assert ax.images[0].get_extent() == [1.5, 15.5, 4.5, 0.5]
    assert plot_overlay(image, labels, window=64).images[0].get_array().shape == (12, 16, 3)
    # No particle: the window in the middle.
    assert plot_overlay(image, np.zeros_like(labels), window=4).get_title() == "image: rows 4-7, columns 6-9, 0 particles"
    for bad, error in [(0, ValueError), (-3, ValueError), (True, TypeError), (2.5, TypeError), ((slice(0, 4),), TypeError)]:
        with pytest.raises(error, match="window must"):
            plot_overlay(image, labels, window=bad)
    with pytest.raises(ValueError, match="at least one row and one column"):
        plot_overlay(image, labels, window=(slice(3, 3), slice(None)))
    with pytest.raises(ValueError, match="without steps"):
        plot_overlay(image, labels, window=(slice(None, None, 2), slice(None)))


# ---------------------------------------------------------------------------
# the pixel classifier: plot_features, plot_feature_importances
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def learned():
    """A classifier fitted on a small phantom volume, and its outputs."""
    image, _, truth = make_phantom((12, 96, 96), n_particles=15, random_state=1, return_labels=True)
    classifier = NanoparticleClassifier(max_samples=4000, n_jobs=1, random_state=0).fit(image, truth)
    probability = classifier.predict_proba(image)
    labels = NanoparticleLabeler(threshold=0.5, radius=0).transform(probability)
    assert labels.max() > 3
    return {"image": image, "classifier": classifier, "probability": probability, "labels": labels}


def test_plot_features_shows_one_scale_per_family(learned):
    classifier, image = learned["classifier"], learned["image"]
    names = classifier.feature_names_
    axes = plot_features(classifier, image)
    titles = [ax.get_title() for ax in axes]
    # One column per family, the middle one; the largest Hessian eigenvalue;
    # none of the columns repeated in background units.
    expected = ["intensity"]
    for prefix in ("gaussian@", "dog@", "gradient@", "hessian_0@", "contrast@"):
        columns = [n for n in names if n.startswith(prefix) and not n.endswith(":background")]
        assert columns
        expected.append(columns[len(columns) // 2])
    assert titles == expected
    assert titles[1] == names[2]  # gaussian at the second of three scales
    assert axes[0].figure._suptitle.get_text() == "Features of plane z = 6"
    features = classifier.features_of(image)
    for ax, title in zip(axes, titles):
        (shown,) = ax.images
        assert shown.get_array().shape == image.shape[1:]
        np.testing.assert_array_equal(shown.get_array(), features[names.index(title), 6])
        low, high = np.percentile(features[names.index(title), 6], [1, 99])
        assert shown.get_clim() == pytest.approx((low, high))


def test_plot_features_by_name_and_family_on_given_axes(learned):
    classifier, image = learned["classifier"], learned["image"]
    names = classifier.feature_names_
    grid = plt.subplots(2, 6)[1]
    axes = plot_features(classifier, image, ["intensity", "hessian", names[1]], plane=2, axes=grid)
    hessian = [n for n in names if n.startswith("hessian_")]
    assert len(hessian) == 9  # 3 eigenvalues at 3 scales
    assert [ax.get_title() for ax in axes] == ["intensity", *hessian, names[1]]
    assert list(axes) == list(grid.ravel()[:11])
    assert not grid.ravel()[11].images
    features = classifier.features_of(image)
    np.testing.assert_array_equal(axes[-1].images[0].get_array(), features[1, 2])
    # One Hessian eigenvalue at every scale.
    axes = plot_features(classifier, image, "hessian_2")
    assert [ax.get_title() for ax in axes] == [n for n in names if n.startswith("hessian_2@")]


def test_plot_features_of_an_image_and_with_a_prior():
    image, mask = make_phantom((64, 64), n_particles=8, random_state=0)
    classifier = NanoparticleClassifier(
        features=("intensity", "gaussian"), sigmas=(1.0, 2.0), max_samples=2000, n_jobs=1, random_state=0
    ).fit(image, mask)
    # Three columns, and the intensity and its two smoothings in background units.
    assert len(classifier.feature_names_) == 6
    assert all(name.endswith(":background") for name in classifier.feature_names_[3:])
    axes = plot_features(classifier, image, plane=5)  # plane is ignored for images
    assert [ax.get_title() for ax in axes] == ["intensity", classifier.feature_names_[2]]  # the 2 px scale
    assert axes[0].images[0].get_array().shape == (64, 64)
    assert axes[0].figure._suptitle.get_text() == "Features of the image"
    volume, truth = make_phantom((8, 64, 64), n_particles=10, random_state=2)
    with_prior = NanoparticleClassifier(
        features=("gaussian",), sigmas=(2.0,), prior=NanoparticleMixture(max_iter=100_000),
        max_samples=2000, n_jobs=1, random_state=0,
    ).fit(volume, truth)
    assert with_prior.feature_names_[-1] == "posterior_logit"
    axes = plot_features(with_prior, volume)
    shown = [name for name in with_prior.feature_names_ if not name.endswith(":background")]
    assert [ax.get_title() for ax in axes] == shown == [with_prior.feature_names_[0], "posterior_logit"]
    features = with_prior.features_of(volume)
    np.testing.assert_array_equal(axes[1].images[0].get_array(), features[-1, 4])


def test_plot_features_errors(learned):
    classifier, image = learned["classifier"], learned["image"]
    with pytest.raises(ValueError, match="no feature 'laplace'.*intensity, gaussian"):
        plot_features(classifier, image, ["intensity", "laplace"])
    with pytest.raises(ValueError, match="plane must be an integer from 0 to 11"):
        plot_features(classifier, image, plane=12)
    with pytest.raises(ValueError, match="axes holds 2 Axes but 6 panels are drawn"):
        plot_features(classifier, image, axes=plt.subplots(1, 2)[1])
    with pytest.raises(NotFittedError):
        plot_features(NanoparticleClassifier(), image)
    with pytest.raises(TypeError, match="Expected a fitted NanoparticleClassifier; NanoparticleMixture has no"):
        plot_features(NanoparticleMixture(), image)


def test_plot_feature_importances_sorts_the_forests_importances(learned):
    classifier = learned["classifier"]
    importances = classifier.estimator_.feature_importances_
    order = np.argsort(-importances, kind="stable")
    n = classifier.n_features_
    assert n == len(classifier.feature_names_) > 5
    ax = plot_feature_importances(classifier, ax=new_axes())
    assert len(ax.patches) == n
    np.testing.assert_allclose([bar.get_width() for bar in ax.patches], importances[order])
    labels = [label.get_text() for label in ax.get_yticklabels()]
    assert labels == [classifier.feature_names_[i] for i in order]
    assert ax.yaxis_inverted()  # the most important at the top
    assert ax.get_title() == f"Feature importances ({n} features)"
    top = plot_feature_importances(classifier, max_features=5)
    assert len(top.patches) == 5
    assert [label.get_text() for label in top.get_yticklabels()] == labels[:5]
    assert top.get_title() == f"Feature importances (5 of {n} features)"


def test_plot_feature_importances_errors(learned):
    from sklearn.linear_model import LogisticRegression

    image, mask = make_phantom((48, 48), n_particles=5, random_state=0)
    linear = NanoparticleClassifier(classifier=LogisticRegression(), max_samples=1000, n_jobs=1).fit(image, mask)
    with pytest.raises(TypeError, match="LogisticRegression has no feature_importances_.*permutation_importance"):
        plot_feature_importances(linear)
    with pytest.raises(ValueError, match="max_features must be a positive integer"):
        plot_feature_importances(learned["classifier"], max_features=0)
    with pytest.raises(NotFittedError):
        plot_feature_importances(NanoparticleClassifier())


# ---------------------------------------------------------------------------
# plot_probability
# ---------------------------------------------------------------------------


def test_plot_probability_shows_image_probability_and_outlines(learned):
    image, probability, labels = learned["image"], learned["probability"], learned["labels"]
    busiest = int(np.argmax([np.count_nonzero(p) for p in labels]))
    axes = plot_probability(image, probability, labels)
    assert len(axes) == 3
    figure = axes[0].figure
    assert len(figure.axes) == 4  # and the colour bar
    assert [ax.get_title() for ax in axes[:2]] == [f"plane z = {busiest}", "particle probability"]
    n = np.unique(labels[busiest][labels[busiest] > 0]).size
    assert axes[2].get_title() == f"{n} particles"
    grey, shown, outlined = (ax.images[0].get_array() for ax in axes)
    assert grey.shape == image.shape[1:]
    np.testing.assert_allclose(grey, image[busiest] / 255.0)
    np.testing.assert_array_equal(shown, probability[busiest])
    assert axes[1].images[0].get_clim() == (0.0, 1.0)
    assert outlined.shape == (*image.shape[1:], 3)
    outline = find_boundaries(labels[busiest].astype(np.int32), mode="outer")
    assert outline.any()
    np.testing.assert_allclose(outlined[outline], np.tile([1.0, 1.0, 0.0], (outline.sum(), 1)))
    # Elsewhere, including inside the particles, the image itself.
    inside = ~outline
    np.testing.assert_allclose(outlined[inside][:, 0], image[busiest][inside] / 255.0)


def test_plot_probability_without_labels_picks_the_most_probable_plane(learned):
    image, probability = learned["image"], learned["probability"]
    counts = [np.count_nonzero(p >= 0.9) for p in probability]
    axes = plot_probability(image, probability, threshold=0.9, axes=plt.subplots(1, 2)[1])
    assert len(axes) == 2
    assert axes[0].get_title() == f"plane z = {int(np.argmax(counts))}"
    axes = plot_probability(image, probability, plane=3)
    np.testing.assert_array_equal(axes[1].images[0].get_array(), probability[3])


def test_plot_probability_reads_zarr_and_dask_and_images(learned):
    image, probability, labels = learned["image"], learned["probability"], learned["labels"]
    stored = zarr.create_array(store={}, shape=probability.shape, chunks=(2, 96, 96), dtype=probability.dtype)
    stored[...] = probability
    reference = [ax.images[0].get_array() for ax in plot_probability(image, probability, labels)]
    lazy = plot_probability(da.from_array(image, chunks=3), stored, da.from_array(labels, chunks=4))
    for ax, expected in zip(lazy, reference):
        np.testing.assert_array_equal(ax.images[0].get_array(), expected)
    flat = plot_probability(image[4], probability[4], labels[4] > 0)
    assert flat[0].get_title() == "image"
    assert flat[2].images[0].get_array().shape == (96, 96, 3)


def test_plot_probability_errors(learned):
    image, probability, labels = learned["image"], learned["probability"], learned["labels"]
    with pytest.raises(ValueError, match=r"image has shape \(12, 96, 96\) but probability has shape \(12, 96, 95\)"):
        plot_probability(image, probability[..., :95])
    with pytest.raises(ValueError, match=r"but labels has shape \(11, 96, 96\)"):
        plot_probability(image, probability, labels[:11])
    with pytest.raises(TypeError, match="probability must be a float"):
        plot_probability(image, labels)
    with pytest.raises(TypeError, match="integer labels or a boolean mask"):
        plot_probability(image, probability, probability)
    with pytest.raises(ValueError, match="plane must be an integer from 0 to 11"):
        plot_probability(image, probability, plane=-1)
    with pytest.raises(ValueError, match="axes holds 2 Axes but 3 panels are drawn"):
        plot_probability(image, probability, labels, axes=plt.subplots(1, 2)[1])


# ---------------------------------------------------------------------------
# write_report
# ---------------------------------------------------------------------------


def test_write_report_writes_figures_and_summary(fitted, tmp_path):
    mixture, table = fitted["mixture"], fitted["table"]
    index = write_report(
        tmp_path / "report", mixture=mixture, image=fitted["image"], labels=fitted["labels"],
        table=table, posterior=fitted["posterior"],
    )
    assert index == tmp_path / "report" / "index.html"
    # 96 x 96 planes are shown whole at full resolution: no detail window.
    written = [name for name in plotting.REPORT_FILES if name != "overlay_detail.png"]
    assert sorted(p.name for p in index.parent.iterdir()) == sorted(written)
    for name in written[1:]:
        assert imread(index.parent / name).ndim == 3
        assert f'src="{name}"' in index.read_text()
    text = index.read_text()
    assert f"<p>{len(table)} particles found.</p>" in text
    assert f"<td>{mixture.low_intensity_}</td>" in text and f"<td>{mixture.high_intensity_}</td>" in text
    weights = mixture.slice_weights(fitted["image"])
    assert f"{weights.min():.3g} to {weights.max():.3g}" in text
    median = np.percentile(table["equivalent_diameter"], 50)
    assert f"<td>{median:.4g}</td>" in text


def test_write_report_refuses_to_overwrite(fitted, tmp_path):
    common = {"mixture": fitted["mixture"], "image": fitted["image"], "labels": fitted["labels"], "table": fitted["table"]}
    write_report(tmp_path, posterior=fitted["posterior"][:2], **common)
    (tmp_path / "index.html").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_report(tmp_path, **common)
    assert (tmp_path / "index.html").read_text() == "old"
    write_report(tmp_path, overwrite=True, **common)
    assert "particles found" in (tmp_path / "index.html").read_text()
    # Without a posterior, the earlier sensitivity figure does not linger.
    assert not (tmp_path / "threshold_sensitivity.png").exists()


def test_write_report_titles_a_sampled_sensitivity_with_its_shape(fitted, tmp_path, monkeypatch):
    drawn = []
    original = plotting._draw_sensitivity

    def recording(posterior, labeler, sample_shape, ax):
        ax = original(posterior, labeler, sample_shape, ax)
        drawn.append(ax.get_title())
        return ax

    monkeypatch.setattr(plotting, "_draw_sensitivity", recording)
    common = {"mixture": fitted["mixture"], "image": fitted["image"], "labels": fitted["labels"], "table": fitted["table"]}
    write_report(tmp_path / "a", posterior=fitted["posterior"][1:3, 10:60], **common)
    write_report(tmp_path / "b", posterior=fitted["posterior"], **common)
    shape = fitted["posterior"][1:3, 10:60].shape
    assert drawn == [f"Threshold sensitivity (a 2 x 50 x {shape[2]} sample)", "Threshold sensitivity"]


def test_write_report_takes_the_slice_weights_a_fitted_lazy_posterior_hands_on(fitted, tmp_path, monkeypatch):
    image = da.from_array(fitted["image"], chunks=(3, 96, 96))
    mixture = NanoparticleMixture()
    posterior = mixture.fit_transform(image)
    expected = mixture.slice_weights(fitted["image"])
    # The weights the lazy posterior was made with: those slice_weights gives.
    np.testing.assert_array_equal(handoff.find(posterior, handoff.SLICE_WEIGHTS), expected)
    common = {"image": image, "labels": fitted["labels"], "table": fitted["table"]}

    def no_read(X):
        raise AssertionError("the image was read for its slice weights")

    monkeypatch.setattr(mixture, "slice_weights", no_read)
    whole = write_report(tmp_path / "whole", mixture=mixture, posterior=posterior, **common).read_text()
    sample = write_report(
        tmp_path / "sample", mixture=mixture, posterior=posterior[4:8], slice_weights=expected, **common
    ).read_text()
    assert f"{expected.min():.3g} to {expected.max():.3g}" in whole and whole == sample
    with pytest.raises(ValueError, match="slice_weights has 3 value"):
        write_report(tmp_path / "bad", mixture=mixture, slice_weights=expected[:3], **common)
    # A sample of the posterior hands nothing on: the weights are read then.
    with pytest.raises(AssertionError, match="was read"):
        write_report(tmp_path / "read", mixture=mixture, posterior=posterior[4:8], **common)


def test_write_report_with_no_particles(tmp_path, fitted):
    labels = np.zeros_like(fitted["labels"])
    index = write_report(
        tmp_path / "empty", mixture=fitted["mixture"], image=fitted["image"], labels=labels,
        table=particle_table(labels),
    )
    assert "<p>0 particles found.</p>" in index.read_text()


def test_plot_features_selects_columns_in_background_units_by_name_or_family(learned):
    classifier, image = learned["classifier"], learned["image"]
    names = classifier.feature_names_
    second = [n for n in names if n.endswith(":background")]
    assert second and all(name not in [ax.get_title() for ax in plot_features(classifier, image)] for name in second)
    titles = [ax.get_title() for ax in plot_features(classifier, image, names="gaussian:background")]
    assert titles == [n for n in second if n.startswith("gaussian@")]
    titles = [ax.get_title() for ax in plot_features(classifier, image, names=["gaussian", "intensity:background"])]
    assert titles == [n for n in names if n.startswith("gaussian@") and n not in second] + ["intensity:background"]


@pytest.mark.parametrize("background", [True, False])
def test_overlay_colours_equal_label2rgb(background):
    from skimage.color import label2rgb

    from nanoseg._plot_volume import colour_labels

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 25, (40, 50)) * (rng.random((40, 50)) < 0.4)
    ids[ids > 0] += 1000
    if not background:
        ids[ids == 0] = 1001
    shown = rng.random((40, 50))
    expected = label2rgb(ids, image=shown, bg_label=0, bg_color=None, alpha=0.3, image_alpha=1.0)
    np.testing.assert_allclose(colour_labels(ids, shown, 0.3), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["separate", "touching", "everywhere"])
def test_overlay_outlines_equal_find_boundaries(kind):
    from skimage.measure import label

    from nanoseg._plot_volume import outer_boundaries

    rng = np.random.default_rng(len(kind))
    for _ in range(60):
        shape = tuple(int(n) for n in rng.integers(1, 45, 2))
        if kind == "separate":
            ids = label(rng.random(shape) < rng.uniform(0.02, 0.5))
        elif kind == "touching":
            ids = rng.integers(0, int(rng.integers(2, 6)), shape)
        else:
            ids = rng.integers(1, 4, shape)  # no background at all
        expected = find_boundaries(ids.astype(np.int32), mode="outer")
        np.testing.assert_array_equal(outer_boundaries(ids.astype(np.int64)), expected)
        sparse = ids * (rng.random(shape) < 0.05)  # few labelled pixels: found around them
        np.testing.assert_array_equal(outer_boundaries(sparse), find_boundaries(sparse.astype(np.int32), mode="outer"))


def test_overlay_of_labels_stored_in_a_local_zarr(fitted, tmp_path):
    """Stored labels: the busiest plane is found from the stored chunks alone."""
    image, labels = fitted["image"], fitted["labels"]
    stored = zarr.create_array(store=str(tmp_path / "labels.zarr"), shape=labels.shape, chunks=(2, 16, 16),
                               dtype=labels.dtype, fill_value=0, config={"write_empty_chunks": False})
    stored[...] = labels
    expected = plot_overlay(image, labels).get_title()
    assert plot_overlay(image, stored).get_title() == expected


def test_write_report_adds_a_detail_window_for_large_planes(fitted, tmp_path, monkeypatch):
    monkeypatch.setattr(plotting, "REPORT_WINDOW", 40)
    image, labels = fitted["image"], fitted["labels"]
    index = write_report(tmp_path / "report", mixture=fitted["mixture"], image=image, labels=labels, table=fitted["table"])
    detail = imread(index.parent / "overlay_detail.png")
    assert detail.ndim == 3 and 'src="overlay_detail.png"' in index.read_text()
    # Replaced by a report of small planes, the detail figure does not linger.
    monkeypatch.setattr(plotting, "REPORT_WINDOW", 256)
    write_report(tmp_path / "report", mixture=fitted["mixture"], image=image, labels=labels, table=fitted["table"],
                 overwrite=True)
    assert not (index.parent / "overlay_detail.png").exists()
