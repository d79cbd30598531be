"""Quality-control figures for a fitted pipeline, and an HTML report.

Every function draws on the Axes given as `ax` (or on a new figure when it
is None) and returns that Axes, so figures can be composed freely; the two
that draw several panels, :func:`plot_features` and
:func:`plot_probability`, take a sequence of Axes as `axes` and return
them as an array. matplotlib is an optional dependency: install it with
``pip install "nanoseg[plot]"``.

==================================  =================================================
:func:`plot_mixture`                stack, background and particle intensity PMFs
:func:`plot_slice_weights`          per-slice particle fraction along Z (drift)
:func:`plot_threshold_sensitivity`  particle count and volume vs threshold
:func:`plot_size_distribution`      histogram of a particle-table column
:func:`plot_overlay`                one plane with the particles outlined
:func:`plot_features`               a classifier's feature maps of one plane
:func:`plot_probability`            image, probability map and particles side by side
:func:`plot_feature_importances`    which features a classifier's forest relies on
:func:`write_report`                the mixture's figures as PNGs plus ``index.html``
==================================  =================================================
"""

from __future__ import annotations

import html
import numbers
from pathlib import Path

import numpy as np
from sklearn.base import clone
from sklearn.utils.validation import check_is_fitted

from ._volume import as_volume, is_dask_array, is_volume_list

__all__ = [
    "plot_feature_importances",
    "plot_features",
    "plot_mixture",
    "plot_overlay",
    "plot_probability",
    "plot_size_distribution",
    "plot_slice_weights",
    "plot_threshold_sensitivity",
    "write_report",
]

_MIXTURE_ATTRIBUTES = (
    "stack_pmf_", "background_pmf_", "particle_pmf_", "background_weight_",
    "low_intensity_", "high_intensity_", "stack_histogram_",
)

#: Thresholds tried by :func:`plot_threshold_sensitivity` by default (plus the
#: labeler's own).
DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)

#: Files :func:`write_report` writes into its directory.
REPORT_FILES = (
    "index.html", "mixture.png", "slice_weights.png", "size_distribution.png",
    "overlay.png", "threshold_sensitivity.png",
)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise ImportError(
            'nanoseg.plotting needs matplotlib: install it with pip install "nanoseg[plot]" '
            "(or pip install matplotlib)."
        ) from error


def _new_axes(ax):
    """`ax`, or the Axes of a new pyplot figure."""
    _require_matplotlib()
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.subplots()[1]


def _check_mixture(mixture):
    check_is_fitted(mixture)
    missing = [name for name in _MIXTURE_ATTRIBUTES if not hasattr(mixture, name)]
    if missing:
        raise TypeError(
            f"Expected a fitted NanoparticleMixture; {type(mixture).__name__} has no "
            f"{', '.join(missing)}."
        )


# ---------------------------------------------------------------------------
# the intensity model
# ---------------------------------------------------------------------------


def plot_mixture(mixture, ax=None):
    """Plot a fitted mixture's intensity PMFs on a log scale.

    Draws the stack PMF, the background PMF scaled by its weight and the
    particle PMF scaled by the complementary weight (so that the two sum to
    the model of the stack), and marks the seed intensity
    (``low_intensity_``) and the background-exclusion intensity
    (``high_intensity_``) with vertical lines.

    Parameters
    ----------
    mixture : NanoparticleMixture
        A fitted mixture.
    ax : matplotlib.axes.Axes, optional
        Where to draw; a new figure when None.

    Returns
    -------
    ax : matplotlib.axes.Axes
        Its lines are, in order: stack, background, particles, then the two
        thresholds.

    See Also
    --------
    nanoseg.NanoparticleMixture : The model whose fit this shows.

    Examples
    --------
    >>> from nanoseg import NanoparticleMixture
    >>> from nanoseg.datasets import make_phantom
    >>> from nanoseg.plotting import plot_mixture
    >>> image, _ = make_phantom((12, 96, 96), n_particles=15, random_state=1)
    >>> ax = plot_mixture(NanoparticleMixture().fit(image))
    >>> ax.get_yscale(), len(ax.lines)
    ('log', 5)
    """
    _check_mixture(mixture)
    ax = _new_axes(ax)
    intensities = np.arange(mixture.stack_pmf_.size)
    weight = float(mixture.background_weight_)
    ax.plot(intensities, mixture.stack_pmf_, color="0.2", label="stack")
    ax.plot(intensities, weight * mixture.background_pmf_, color="C0", label=f"background (weight {weight:.4f})")
    ax.plot(
        intensities, (1.0 - weight) * mixture.particle_pmf_, color="C3",
        label=f"particles (weight {1.0 - weight:.2g})",
    )
    low, high = int(mixture.low_intensity_), int(mixture.high_intensity_)
    ax.axvline(low, color="C2", linestyle="--", label=f"seed intensity {low}")
    ax.axvline(high, color="C1", linestyle=":", label=f"never background from {high}")
    ax.set_yscale("log")
    # PMF bins are floored at `eps`; show down to one voxel's share instead.
    n_voxels = max(1, int(np.sum(mixture.stack_histogram_)))
    ax.set_ylim(0.5 / n_voxels, 2.0 * float(np.max(mixture.stack_pmf_)))
    ax.set_xlim(0, intensities[-1])
    ax.set_xlabel("intensity (grey level)")
    ax.set_ylabel("probability")
    ax.set_title("Intensity mixture")
    ax.legend(fontsize="small")
    return ax


def _draw_slice_weights(ax, weights, stack_weight):
    if isinstance(weights, list):
        for i, crop in enumerate(weights):
            ax.plot(np.arange(crop.size), crop, marker=".", label=f"crop {i}")
    else:
        ax.plot(np.arange(weights.size), weights, marker=".", color="C3", label="per slice (MAP)")
    ax.axhline(stack_weight, color="0.5", linestyle="--", label=f"whole stack (EM), {stack_weight:.2g}")
    ax.set_xlabel("slice (z)")
    ax.set_ylabel("particle fraction")
    ax.set_title("Particle fraction per slice")
    ax.legend(fontsize="small")
    return ax


def plot_slice_weights(mixture, X, ax=None):
    """Plot each slice's estimated particle fraction along Z.

    A slow trend or jumps reveal brightness drift between slices; isolated
    peaks are slices rich in particles (or artefacts).

    Parameters
    ----------
    mixture : NanoparticleMixture
        A fitted mixture.
    X : array or list of arrays
        The uint8 volume (or crops) to evaluate, as for
        :meth:`~nanoseg.NanoparticleMixture.slice_weights`; this reads it once.
    ax : matplotlib.axes.Axes, optional
        Where to draw; a new figure when None.

    Returns
    -------
    ax : matplotlib.axes.Axes
        One line per volume (per crop for a list), then a dashed horizontal
        line at the whole-stack particle weight ``1 - background_weight_``.

    Examples
    --------
    >>> from nanoseg import NanoparticleMixture
    >>> from nanoseg.datasets import make_phantom
    >>> from nanoseg.plotting import plot_slice_weights
    >>> image, _ = make_phantom((12, 96, 96), n_particles=15, random_state=1)
    >>> ax = plot_slice_weights(NanoparticleMixture().fit(image), image)
    >>> ax.lines[0].get_ydata().shape
    (12,)
    """
    _check_mixture(mixture)
    weights = mixture.slice_weights(X)
    return _draw_slice_weights(_new_axes(ax), weights, 1.0 - float(mixture.background_weight_))


# ---------------------------------------------------------------------------
# labelling
# ---------------------------------------------------------------------------


def _check_thresholds(thresholds, labeler, max_thresholds):
    if isinstance(max_thresholds, bool) or not isinstance(max_thresholds, numbers.Integral) or max_thresholds < 1:
        raise ValueError(f"max_thresholds must be a positive integer; got {max_thresholds!r}.")
    if thresholds is None:
        thresholds = (*DEFAULT_THRESHOLDS, float(labeler.threshold))
    values = np.unique(np.asarray(thresholds, dtype=np.float64).ravel())
    if values.size == 0 or not np.all((values >= 0) & (values <= 1)):
        raise ValueError(f"thresholds must be one or more numbers in [0, 1]; got {thresholds!r}.")
    if values.size > max_thresholds:
        # Keep the extremes and spread the rest evenly.
        keep = np.unique(np.round(np.linspace(0, values.size - 1, max_thresholds)).astype(int))
        values = values[keep]
    return values


def _particles_and_voxels(labels):
    """(number of particles, number of particle voxels) of labels 1..K."""
    if is_volume_list(labels):
        counts = [_particles_and_voxels(crop) for crop in labels]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)
    if is_dask_array(labels):
        import dask
        import dask.array as da

        highest, voxels = dask.compute(labels.max(), da.count_nonzero(labels))
        return int(highest), int(voxels)
    return int(labels.max()), int(np.count_nonzero(labels))


def plot_threshold_sensitivity(posterior, thresholds=None, *, labeler=None, max_thresholds=8, ax=None):
    """Plot the particle count and particle volume against the threshold.

    A flat stretch means the segmentation hardly depends on the exact
    threshold; a steep one that many voxels have intermediate posteriors.

    Parameters
    ----------
    posterior : array or list of arrays
        Posterior map(s), as taken by :class:`~nanoseg.NanoparticleLabeler`.
    thresholds : sequence of float, optional
        Thresholds to try. By default 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99 and
        the labeler's own threshold.
    labeler : NanoparticleLabeler, optional
        Whose other parameters (radius, connectivity, min_size, memory) to
        use; a default :class:`~nanoseg.NanoparticleLabeler` when None. Its
        threshold is marked with a vertical line.
    max_thresholds : int, optional
        At most this many thresholds are tried, spread over the sorted list.
    ax : matplotlib.axes.Axes, optional
        Where to draw; a new figure when None.

    Returns
    -------
    ax : matplotlib.axes.Axes
        Its first line is the particle count. The particle volume, in voxels,
        is drawn on a twin y axis, the last Axes of ``ax.figure``.

    Notes
    -----
    The labeler runs once per threshold over the whole `posterior`, so this
    costs up to `max_thresholds` labellings. On a large volume pass a
    representative sub-volume, e.g. ``posterior[:64]``.

    Examples
    --------
    >>> import numpy as np
    >>> from nanoseg.plotting import plot_threshold_sensitivity
    >>> posterior = np.zeros((4, 16, 16), dtype=np.float32)
    >>> posterior[1:3, 2:6, 2:6] = 0.97
    >>> posterior[1:3, 9:13, 9:13] = 0.85
    >>> ax = plot_threshold_sensitivity(posterior, [0.8, 0.9, 0.99])
    >>> ax.lines[0].get_ydata().tolist()
    [2, 1, 0]
    """
    from .labeler import NanoparticleLabeler

    labeler = NanoparticleLabeler() if labeler is None else labeler
    values = _check_thresholds(thresholds, labeler, max_thresholds)
    ax = _new_axes(ax)
    counts, voxels = [], []
    for threshold in values:
        labels = clone(labeler).set_params(threshold=float(threshold)).transform(posterior)
        n_particles, n_voxels = _particles_and_voxels(labels)
        counts.append(n_particles)
        voxels.append(n_voxels)
    ax.plot(values, counts, marker="o", color="C0", label="particles")
    ax.set_xlabel("posterior threshold")
    ax.set_ylabel("particles", color="C0")
    ax.axvline(float(labeler.threshold), color="0.5", linestyle=":")
    ax.set_title("Threshold sensitivity")
    twin = ax.twinx()
    twin.plot(values, voxels, marker="s", linestyle="--", color="C1", label="particle voxels")
    twin.set_ylabel("particle voxels", color="C1")
    return ax


def plot_size_distribution(table, ax=None, *, column="equivalent_diameter", bins="auto"):
    """Plot a histogram of one column of a particle table.

    Parameters
    ----------
    table : pandas.DataFrame
        A table from :func:`nanoseg.measure.particle_table`.
    ax : matplotlib.axes.Axes, optional
        Where to draw; a new figure when None.
    column : str, optional
        The column to histogram, e.g. ``"volume"`` or ``"mean_intensity"``.
    bins : int, sequence or str, optional
        As for :func:`numpy.histogram`.

    Returns
    -------
    ax : matplotlib.axes.Axes
        The histogram bars, and a dashed vertical line at the median.

    Examples
    --------
    >>> import pandas as pd
    >>> from nanoseg.plotting import plot_size_distribution
    >>> table = pd.DataFrame({"equivalent_diameter": [20.0, 22.0, 24.0, 40.0]})
    >>> ax = plot_size_distribution(table, bins=4)
    >>> [int(bar.get_height()) for bar in ax.patches]
    [3, 0, 0, 1]
    """
    if column not in getattr(table, "columns", ()):
        available = ", ".join(map(str, getattr(table, "columns", [])))
        raise ValueError(f"table has no column {column!r}; its columns are: {available or 'none'}.")
    values = np.asarray(table[column], dtype=np.float64)
    values = values[np.isfinite(values)]
    ax = _new_axes(ax)
    ax.set_xlabel(column.replace("_", " "))
    ax.set_ylabel("particles")
    ax.set_title(f"{values.size} particle{'s' if values.size != 1 else ''}")
    if values.size == 0:
        ax.text(0.5, 0.5, "no particles", ha="center", va="center", transform=ax.transAxes)
        return ax
    ax.hist(values, bins=bins, color="C0", edgecolor="white")
    median = float(np.median(values))
    ax.axvline(median, color="C3", linestyle="--", label=f"median {median:.3g}")
    ax.legend(fontsize="small")
    return ax


# ---------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------


def _busiest_plane(volume, threshold=None):
    """Index of the plane with the most labelled voxels (the middle one if none).

    With `threshold`, voxels count when they are at least `threshold` (for a
    probability map) instead of when they are nonzero.
    """

    def count(block):
        block = block.reshape(len(block), -1)
        return np.count_nonzero(block if threshold is None else block >= threshold, axis=1)

    counts = np.concatenate([
        count(np.asarray(volume.read(int(g[0]), int(g[-1]) + 1)))
        for g in volume.slabs(volume.slab_depth(volume.dtype.itemsize))
    ])
    return int(np.argmax(counts)) if counts.any() else volume.shape[0] // 2


def _grey(plane):
    """Image plane scaled to [0, 1] for display."""
    plane = np.asarray(plane, dtype=np.float64) / (255.0 if plane.dtype == np.uint8 else 1.0)
    if plane.dtype == np.float64 and (plane.min() < 0 or plane.max() > 1):
        low, high = float(plane.min()), float(plane.max())
        plane = (plane - low) / (high - low) if high > low else np.zeros_like(plane)
    return plane


def plot_overlay(image, labels, *, plane=None, ax=None, alpha=0.3):
    """Show one plane of the image with its particles coloured and outlined.

    Parameters
    ----------
    image : (Z, Y, X) or (Y, X) array
        The image (NumPy, zarr or dask); only the plane shown is read.
    labels : array of int or bool
        Labels (or a mask) of the same shape.
    plane : int, optional
        Plane (z index) to show. By default the plane with the most particle
        voxels, found in one pass over `labels`. Ignored for 2D input.
    ax : matplotlib.axes.Axes, optional
        Where to draw; a new figure when None.
    alpha : float, optional
        Opacity of the particle colours.

    Returns
    -------
    ax : matplotlib.axes.Axes
        Showing one RGB image; its title names the plane.

    See Also
    --------
    skimage.color.label2rgb, skimage.segmentation.mark_boundaries

    Examples
    --------
    >>> import numpy as np
    >>> from nanoseg.plotting import plot_overlay
    >>> image = np.zeros((3, 8, 8), dtype=np.uint8)
    >>> labels = np.zeros((3, 8, 8), dtype=np.uint32)
    >>> labels[2, 2:5, 2:5] = 1
    >>> plot_overlay(image, labels).get_title()
    'plane z = 2: 1 particle'
    """
    from skimage.color import label2rgb
    from skimage.segmentation import mark_boundaries

    image_volume = as_volume(image, name="image")
    label_volume = as_volume(labels, name="labels")
    if tuple(image.shape) != tuple(labels.shape):
        raise ValueError(
            f"image has shape {tuple(image.shape)} but labels has shape {tuple(labels.shape)}; "
            "pass the labels computed from this image."
        )
    if label_volume.dtype.kind not in "biu":
        raise TypeError(f"labels must be integer labels or a boolean mask; got dtype {label_volume.dtype}.")
    n_planes = label_volume.shape[0]
    if label_volume.is_2d:
        plane = 0
    elif plane is None:
        plane = _busiest_plane(label_volume)
    elif isinstance(plane, bool) or not isinstance(plane, numbers.Integral) or not 0 <= plane < n_planes:
        raise ValueError(f"plane must be an integer from 0 to {n_planes - 1}; got {plane!r}.")
    plane = int(plane)
    ids = label_volume.read(plane, plane + 1)[0].astype(np.int64)
    grey = _grey(image_volume.read(plane, plane + 1)[0])
    rgb = label2rgb(ids, image=grey, bg_label=0, bg_color=None, alpha=alpha, image_alpha=1.0)
    rgb = mark_boundaries(rgb, ids, color=(1.0, 1.0, 0.0), mode="outer")
    ax = _new_axes(ax)
    ax.imshow(rgb, interpolation="nearest")
    n_particles = np.unique(ids[ids > 0]).size
    where = "image" if label_volume.is_2d else f"plane z = {plane}"
    ax.set_title(f"{where}: {n_particles} particle{'s' if n_particles != 1 else ''}")
    ax.set_xlabel("x (column)")
    ax.set_ylabel("y (row)")
    return ax


def _check_plane(plane, volume, default):
    """The plane (z index) to show: 0 for an image, `default()` when None."""
    if volume.is_2d:
        return 0
    if plane is None:
        return int(default())
    n_planes = volume.shape[0]
    if isinstance(plane, bool) or not isinstance(plane, numbers.Integral) or not 0 <= plane < n_planes:
        raise ValueError(f"plane must be an integer from 0 to {n_planes - 1}; got {plane!r}.")
    return int(plane)


def _panels(axes, n_panels, ncols, title=None):
    """`n_panels` Axes: the first of `axes`, or a new figure's grid of them."""
    _require_matplotlib()
    if axes is not None:
        flat = list(np.ravel(np.asarray(axes, dtype=object)))
        if len(flat) < n_panels:
            raise ValueError(f"axes holds {len(flat)} Axes but {n_panels} panels are drawn; pass at least {n_panels}.")
        out = np.empty(n_panels, dtype=object)
        out[:] = flat[:n_panels]
        return out
    import matplotlib.pyplot as plt

    ncols = max(1, min(int(ncols), n_panels))
    nrows = -(-n_panels // ncols)
    figure, grid = plt.subplots(
        nrows, ncols, figsize=(3.4 * ncols, 3.2 * nrows), squeeze=False, layout="constrained"
    )
    for unused in grid.ravel()[n_panels:]:
        unused.set_axis_off()
    if title:
        figure.suptitle(title)
    return grid.ravel()[:n_panels]


def _where(volume, plane):
    return "image" if volume.is_2d else f"plane z = {plane}"


# ---------------------------------------------------------------------------
# the pixel classifier
# ---------------------------------------------------------------------------


def _check_classifier(classifier):
    if not hasattr(classifier, "features_of"):
        raise TypeError(
            f"Expected a fitted NanoparticleClassifier; {type(classifier).__name__} has no features_of."
        )
    check_is_fitted(classifier, "estimator_")


def _family(name):
    """Feature family of a column name: ``gaussian@0x2x2`` -> ``gaussian``, ``hessian_1@0x1x1`` -> ``hessian``."""
    key = name.split("@")[0]
    return "hessian" if key.startswith("hessian_") else key


def _default_features(names):
    """One column per family: its middle scale (the first Hessian eigenvalue)."""
    chosen = []
    for family in dict.fromkeys(_family(name) for name in names):
        columns = [n for n in names if _family(n) == family]
        if family == "hessian":
            first = columns[0].split("@")[0]
            columns = [n for n in columns if n.split("@")[0] == first]
        chosen.append(columns[len(columns) // 2])
    return chosen


def _select_features(selection, names):
    if isinstance(selection, str):
        selection = [selection]
    chosen = []
    for entry in selection:
        if entry in names:
            matches = [entry]
        else:
            matches = [n for n in names if entry in (_family(n), n.split("@")[0])]
        if not matches:
            raise ValueError(
                f"The classifier has no feature {entry!r}; give names from its feature_names_ "
                f"({', '.join(names)}) or a family such as 'dog'."
            )
        chosen.extend(matches)
    chosen = list(dict.fromkeys(chosen))
    if not chosen:
        raise ValueError("names selects no feature; give at least one name from feature_names_.")
    return chosen


def plot_features(classifier, image, names=None, *, plane=None, axes=None, ncols=3):
    """Show some of the feature maps a fitted classifier computes, for one plane.

    Each panel is one column of :meth:`~nanoseg.NanoparticleClassifier.features_of`
    -- the smoothed intensity, a difference of Gaussians, a Hessian
    eigenvalue at one scale... -- titled with its name from
    ``feature_names_``. Each map has its own colour scale, from its 1st to
    its 99th percentile.

    Parameters
    ----------
    classifier : NanoparticleClassifier
        A fitted classifier.
    image : (Z, Y, X) or (Y, X) array
        One uint8 or uint16 image or volume in memory, as taken by
        :meth:`~nanoseg.NanoparticleClassifier.features_of`. The features
        of the whole input are computed (a float32 array of ``n_features_``
        times its size): for a large volume pass a sub-volume of some tens
        of planes, keeping in mind that it is normalised on its own.
    names : str or sequence of str, optional
        Features to show: names from ``feature_names_``, or families, which
        stand for all their columns (``"dog"``: every difference of
        Gaussians; ``"hessian"``: every Hessian eigenvalue at every scale,
        ``"hessian_0"``: the largest one at every scale). By default one column per family, at the middle scale
        (the largest Hessian eigenvalue), and the posterior of the `prior`
        when there is one.
    plane : int, optional
        Plane (z index) of a volume to show; the middle one by default.
        Ignored for 2D input.
    axes : sequence of matplotlib.axes.Axes, optional
        Where to draw, one Axes per feature shown (a grid from
        :func:`matplotlib.pyplot.subplots` is fine); a new figure when None.
    ncols : int, optional
        Columns of the grid of a new figure.

    Returns
    -------
    axes : ndarray of matplotlib.axes.Axes
        One per feature, in the order of `names`, each showing one image.

    Raises
    ------
    ValueError
        If a name is not one of the classifier's features, `plane` is out of
        range or `axes` holds too few Axes.
    TypeError
        If `classifier` is not a :class:`~nanoseg.NanoparticleClassifier`.

    See Also
    --------
    nanoseg.NanoparticleClassifier.features_of : The features themselves.
    plot_feature_importances : Which features the classifier relies on.
    plot_probability : What the classifier makes of them.

    Examples
    --------
    >>> from nanoseg import NanoparticleClassifier
    >>> from nanoseg.datasets import make_phantom
    >>> from nanoseg.plotting import plot_features
    >>> image, mask = make_phantom((96, 96), n_particles=12, random_state=0)
    >>> model = NanoparticleClassifier(random_state=0, n_jobs=1).fit(image, mask)
    >>> axes = plot_features(model, image, ["intensity", "gaussian"])
    >>> [ax.get_title() for ax in axes]
    ['intensity', 'gaussian@...', 'gaussian@...', 'gaussian@...']
    """
    _require_matplotlib()
    _check_classifier(classifier)
    feature_names = list(classifier.feature_names_)
    shown = _default_features(feature_names) if names is None else _select_features(names, feature_names)
    volume = as_volume(image, name="image")
    plane = _check_plane(plane, volume, lambda: volume.shape[0] // 2)
    features = np.asarray(classifier.features_of(image))
    if not volume.is_2d:
        features = features[:, plane]
    title = "Features of the image" if volume.is_2d else f"Features of plane z = {plane}"
    axes = _panels(axes, len(shown), ncols, title=title)
    for ax, name in zip(axes, shown):
        values = features[feature_names.index(name)]
        finite = values[np.isfinite(values)]
        low, high = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
        ax.imshow(values, cmap="magma", vmin=low, vmax=high, interpolation="nearest")
        ax.set_title(name, fontsize="medium")
        ax.set_xticks([])
        ax.set_yticks([])
    return axes


def plot_feature_importances(classifier, ax=None, *, max_features=None):
    """Plot which features a fitted classifier's trees rely on most.

    Draws the ``feature_importances_`` of the classifier's fitted estimator
    (the default random forest, gradient boosting...: the mean decrease in
    impurity that each feature brings, summing to 1) as horizontal bars,
    largest at the top.

    Parameters
    ----------
    classifier : NanoparticleClassifier
        A fitted classifier whose ``estimator_`` has
        ``feature_importances_``.
    ax : matplotlib.axes.Axes, optional
        Where to draw; a new figure when None.
    max_features : int, optional
        Show only this many features, the most important ones; all of them
        by default.

    Returns
    -------
    ax : matplotlib.axes.Axes
        One bar per feature shown, in decreasing order of importance; the
        tick labels are the names from ``feature_names_``.

    Raises
    ------
    TypeError
        If the estimator has no ``feature_importances_`` (a logistic
        regression, for example): use
        :func:`sklearn.inspection.permutation_importance` on rows of
        :meth:`~nanoseg.NanoparticleClassifier.features_of` instead.

    See Also
    --------
    plot_features : What the features look like.

    Notes
    -----
    Impurity-based importances are computed on the training voxels and
    favour features with many distinct values; correlated features (the
    same filter at neighbouring scales) share their importance. Read them
    as a rough guide to which scales and filters matter.

    Examples
    --------
    >>> from nanoseg import NanoparticleClassifier
    >>> from nanoseg.datasets import make_phantom
    >>> from nanoseg.plotting import plot_feature_importances
    >>> image, mask = make_phantom((96, 96), n_particles=12, random_state=0)
    >>> model = NanoparticleClassifier(random_state=0, n_jobs=1).fit(image, mask)
    >>> ax = plot_feature_importances(model, max_features=5)
    >>> len(ax.patches)
    5
    """
    _check_classifier(classifier)
    if max_features is not None and (
        isinstance(max_features, bool) or not isinstance(max_features, numbers.Integral) or max_features < 1
    ):
        raise ValueError(f"max_features must be a positive integer; got {max_features!r}.")
    estimator = classifier.estimator_
    if not hasattr(estimator, "feature_importances_"):
        raise TypeError(
            f"{type(estimator).__name__} has no feature_importances_; use "
            "sklearn.inspection.permutation_importance on the rows of features_of instead."
        )
    importances = np.asarray(estimator.feature_importances_, dtype=np.float64)
    names = list(classifier.feature_names_)
    order = np.argsort(-importances, kind="stable")[:max_features]
    ax = _new_axes(ax)
    positions = np.arange(order.size)
    ax.barh(positions, importances[order], color="C0")
    ax.set_yticks(positions, [names[i] for i in order], fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("importance (mean decrease in impurity)")
    shown = f"{order.size} of {importances.size}" if order.size < importances.size else f"{importances.size}"
    ax.set_title(f"Feature importances ({shown} features)")
    return ax


def plot_probability(image, probability, labels=None, *, plane=None, axes=None, threshold=0.5):
    """Show one plane of the image, its particle probability and the particles found.

    The first panel is the image in grey, the second the probability map
    (colour scale from 0 to 1, with a colour bar) and, with `labels`, the
    third is the image with every particle outlined in yellow, so that
    particles the labeler missed or merged stand out.

    Parameters
    ----------
    image : (Z, Y, X) or (Y, X) array
        The image (NumPy, zarr or dask); only the plane shown is read.
    probability : array of float
        A probability map of the same shape, such as
        :meth:`NanoparticleClassifier.predict_proba <nanoseg.NanoparticleClassifier.predict_proba>`
        or the mixture's posterior.
    labels : array of int or bool, optional
        Particle labels (or a mask) of the same shape, for instance from
        :class:`~nanoseg.NanoparticleLabeler`.
    plane : int, optional
        Plane (z index) to show. By default the plane with the most particle
        voxels in `labels` or, without labels, the most voxels of
        probability at least `threshold` (found in one pass over that
        array). Ignored for 2D input.
    axes : sequence of matplotlib.axes.Axes, optional
        Where to draw: two Axes, three with `labels`; a new figure when None.
    threshold : float, optional
        Only used to choose the plane when neither `plane` nor `labels` is
        given.

    Returns
    -------
    axes : ndarray of matplotlib.axes.Axes
        The image, the probability map and, with `labels`, the outlined
        particles. Each shows one image; the colour bar is an extra Axes of
        the figure.

    Raises
    ------
    ValueError
        If the shapes differ or `plane` is out of range.
    TypeError
        If `probability` is not a float (or boolean) array, or `labels` not
        integer labels or a mask.

    See Also
    --------
    plot_overlay : One plane with the particles coloured and outlined.
    plot_threshold_sensitivity : How the particles change with the threshold.

    Examples
    --------
    >>> import numpy as np
    >>> from nanoseg.plotting import plot_probability
    >>> image = np.zeros((3, 8, 8), dtype=np.uint8)
    >>> probability = np.zeros((3, 8, 8), dtype=np.float32)
    >>> probability[1, 2:5, 2:5] = 0.9
    >>> labels = (probability > 0.5).astype(np.uint32)
    >>> [ax.get_title() for ax in plot_probability(image, probability, labels)]
    ['plane z = 1', 'particle probability', '1 particle']
    """
    from skimage.segmentation import mark_boundaries

    _require_matplotlib()
    image_volume = as_volume(image, name="image")
    probability_volume = as_volume(probability, name="probability")
    arrays = {"probability": probability} if labels is None else {"probability": probability, "labels": labels}
    for name, array in arrays.items():
        if tuple(array.shape) != tuple(image.shape):
            raise ValueError(
                f"image has shape {tuple(image.shape)} but {name} has shape {tuple(array.shape)}; "
                f"pass the {name} computed from this image."
            )
    if probability_volume.dtype.kind not in "fb":
        raise TypeError(f"probability must be a float (or boolean) array; got dtype {probability_volume.dtype}.")
    label_volume = None if labels is None else as_volume(labels, name="labels")
    if label_volume is not None and label_volume.dtype.kind not in "biu":
        raise TypeError(f"labels must be integer labels or a boolean mask; got dtype {label_volume.dtype}.")
    if label_volume is not None:
        plane = _check_plane(plane, image_volume, lambda: _busiest_plane(label_volume))
    else:
        plane = _check_plane(plane, image_volume, lambda: _busiest_plane(probability_volume, threshold))
    axes = _panels(axes, 2 if labels is None else 3, 3)
    grey = _grey(np.asarray(image_volume.read(plane, plane + 1)[0]))
    axes[0].imshow(grey, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    axes[0].set_title(_where(image_volume, plane))
    values = np.asarray(probability_volume.read(plane, plane + 1)[0], dtype=np.float32)
    shown = axes[1].imshow(values, cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
    axes[1].set_title("particle probability")
    axes[1].figure.colorbar(shown, ax=axes[1], shrink=0.8)
    if label_volume is not None:
        ids = np.asarray(label_volume.read(plane, plane + 1)[0]).astype(np.int64)
        outlined = mark_boundaries(np.dstack([grey] * 3), ids, color=(1.0, 1.0, 0.0), mode="outer")
        axes[2].imshow(outlined, interpolation="nearest")
        n_particles = np.unique(ids[ids > 0]).size
        axes[2].set_title(f"{n_particles} particle{'s' if n_particles != 1 else ''}")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return axes


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def _save(draw, path):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    draw(figure.subplots())
    figure.savefig(path, dpi=100)


def _summary_html(mixture, image, table, weights, images):
    n_particles = len(table)
    rows = [
        ("Particles", f"{n_particles}"),
        ("Image shape", " x ".join(str(int(s)) for s in image.shape)),
        ("Seed intensity (low_intensity_)", f"{int(mixture.low_intensity_)}"),
        ("Never background from (high_intensity_)", f"{int(mixture.high_intensity_)}"),
        ("Background weight", f"{float(mixture.background_weight_):.6f}"),
        ("EM updates, converged", f"{getattr(mixture, 'n_iter_', '?')}, {getattr(mixture, 'converged_', '?')}"),
    ]
    flat = np.concatenate([np.atleast_1d(w) for w in weights]) if isinstance(weights, list) else weights
    rows.append(("Particle fraction per slice", f"{flat.min():.3g} to {flat.max():.3g}"))
    quantiles = (5, 25, 50, 75, 95)
    size_rows = ""
    for column in ("equivalent_diameter", "volume", "area"):
        if column in getattr(table, "columns", ()) and n_particles:
            values = np.percentile(np.asarray(table[column], dtype=np.float64), quantiles)
            cells = "".join(f"<td>{v:.4g}</td>" for v in values)
            size_rows += f"<tr><th>{html.escape(column.replace('_', ' '))}</th>{cells}</tr>\n"
    body = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    header = "".join(f"<th>{q} %</th>" for q in quantiles)
    sizes = (
        f"<h2>Particle sizes (quantiles, spacing units)</h2>\n<table>\n<tr><th></th>{header}</tr>\n{size_rows}</table>"
        if size_rows
        else "<p>No particle sizes to summarise.</p>"
    )
    figures = "\n".join(f'<figure><img src="{name}" alt="{html.escape(name)}"></figure>' for name in images)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>nanoseg report: {n_particles} particles</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }}
th, td {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }}
img {{ max-width: 48%; float: left; margin: 0 1% 1em 0; }}
</style>
</head>
<body>
<h1>nanoseg report</h1>
<p>{n_particles} particles found.</p>
<table>
{body}
</table>
{sizes}
{figures}
</body>
</html>
"""


def write_report(directory, *, mixture, image, labels, table, posterior=None, labeler=None, overwrite=False):
    """Write the quality-control figures and an HTML summary to a directory.

    Parameters
    ----------
    directory : str or path-like
        Where to write; created if needed.
    mixture : NanoparticleMixture
        The fitted mixture.
    image : array
        The uint8 image or volume the mixture was applied to (read once for
        the slice weights, plus one plane for the overlay).
    labels : array
        Its labels, e.g. from :class:`~nanoseg.NanoparticleLabeler` (read once
        to find the plane to show).
    table : pandas.DataFrame
        The particle table of `labels` (:func:`nanoseg.measure.particle_table`).
    posterior : array, optional
        The posterior; when given, the threshold sensitivity is plotted too,
        which labels it once per threshold (pass a sub-volume to keep that
        cheap on large data).
    labeler : NanoparticleLabeler, optional
        The labeler used, for the threshold-sensitivity plot.
    overwrite : bool, optional
        Replace an existing report in `directory`.

    Returns
    -------
    path : pathlib.Path
        The ``index.html`` written.

    Raises
    ------
    FileExistsError
        If `directory` already holds a report file (``index.html`` or one of
        the figures) and `overwrite` is False.

    Notes
    -----
    The directory receives ``index.html``, ``mixture.png``,
    ``slice_weights.png``, ``size_distribution.png``, ``overlay.png`` and,
    with `posterior`, ``threshold_sensitivity.png``. The summary gives the
    particle count, quantiles of the particle sizes, the fitted intensities
    and background weight, and the range of the per-slice particle fraction.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from nanoseg import NanoparticleLabeler, NanoparticleMixture
    >>> from nanoseg.datasets import make_phantom
    >>> from nanoseg.measure import particle_table
    >>> from nanoseg.plotting import write_report
    >>> image, _ = make_phantom((12, 96, 96), n_particles=15, random_state=1)
    >>> mixture = NanoparticleMixture().fit(image)
    >>> labels = NanoparticleLabeler().transform(mixture.transform(image))
    >>> table = particle_table(labels, spacing=(50.0, 10.0, 10.0))
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     index = write_report(pathlib.Path(folder) / "report", mixture=mixture,
    ...                          image=image, labels=labels, table=table)
    ...     sorted(p.name for p in index.parent.iterdir())
    ['index.html', 'mixture.png', 'overlay.png', 'size_distribution.png', 'slice_weights.png']
    """
    _require_matplotlib()
    _check_mixture(mixture)
    directory = Path(directory)
    existing = [name for name in REPORT_FILES if (directory / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{directory} already holds a report ({', '.join(existing)}); pass overwrite=True "
            "to replace it, or choose another directory."
        )
    directory.mkdir(parents=True, exist_ok=True)
    weights = mixture.slice_weights(image)
    stack_weight = 1.0 - float(mixture.background_weight_)
    drawings = {
        "mixture.png": lambda ax: plot_mixture(mixture, ax=ax),
        "slice_weights.png": lambda ax: _draw_slice_weights(ax, weights, stack_weight),
        "size_distribution.png": lambda ax: plot_size_distribution(table, ax=ax),
        "overlay.png": lambda ax: plot_overlay(image, labels, ax=ax),
    }
    if posterior is not None:
        drawings["threshold_sensitivity.png"] = lambda ax: plot_threshold_sensitivity(
            posterior, labeler=labeler, ax=ax
        )
    # A report replaced without a posterior must not keep the old sensitivity plot.
    stale = directory / "threshold_sensitivity.png"
    if posterior is None and stale.exists():
        stale.unlink()
    for name, draw in drawings.items():
        _save(draw, directory / name)
    index = directory / "index.html"
    index.write_text(_summary_html(mixture, image, table, weights, list(drawings)), encoding="utf-8")
    return index
