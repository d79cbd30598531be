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

import functools

import numpy as np

from . import _plot_classifier, _plot_common, _plot_model, _plot_particles, _plot_report, _plot_volume
from ._volume import as_volume

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

#: Thresholds tried by :func:`plot_threshold_sensitivity` by default (plus the
#: labeler's own).
DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)

#: Files :func:`write_report` writes into its directory.
REPORT_FILES = (
    "index.html", "mixture.png", "slice_weights.png", "size_distribution.png",
    "overlay.png", "overlay_detail.png", "threshold_sensitivity.png",
)

#: Side, in pixels, of the report's full-resolution overlay window.
REPORT_WINDOW = 256


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
    _plot_model.check_mixture(mixture)
    return _plot_model.draw_mixture(mixture, ax)


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
    _plot_model.check_mixture(mixture)
    weights = mixture.slice_weights(X)
    ax = _plot_common.new_axes(ax)
    return _plot_model.draw_slice_weights(ax, weights, 1.0 - float(mixture.background_weight_))


# ---------------------------------------------------------------------------
# labelling
# ---------------------------------------------------------------------------


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
    representative sub-volume, e.g. ``posterior[:64]``. A lazy (dask)
    posterior of at most 512 MiB is computed once and then labelled from
    memory at each threshold (unless a ``dask.distributed`` client or
    dask's process pool computes it); a larger one is computed again for
    each threshold.

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
    return _plot_particles.draw_threshold_sensitivity(
        posterior, thresholds, labeler, max_thresholds, ax, DEFAULT_THRESHOLDS
    )


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
    return _plot_particles.draw_size_distribution(table, ax, column, bins)


# ---------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------


def plot_overlay(image, labels, *, plane=None, ax=None, alpha=0.3, window=None):
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
    window : int or (slice, slice), optional
        Show part of the plane at full resolution, where particles a few
        pixels across can be checked: an int shows the square of that many
        pixels (fewer where the plane is smaller) holding the most particle
        pixels of the plane; a pair of slices shows those rows and columns.
        The axes keep the plane's pixel coordinates. By default the whole
        plane; one of more than 2048 pixels a side is shown reduced by a
        whole factor, each block of pixels as one (its largest label, so
        that no particle vanishes, over its mean intensity; the title says
        by how much). Large planes are read in bands of rows, so memory
        stays bounded whatever the plane's size.

    Returns
    -------
    ax : matplotlib.axes.Axes
        Showing one RGB image; its title names the plane (and the window's
        rows and columns).

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
    >>> plot_overlay(image, labels, window=4).get_title()
    'plane z = 2: rows 1-4, columns 1-4, 1 particle'
    """
    return _plot_volume.draw_overlay(image, labels, plane, ax, alpha, window)


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

    Notes
    -----
    A plane of more than 2048 pixels a side is shown reduced by a whole
    factor, read in bands of rows: each block of pixels as its mean
    intensity, its largest probability and its largest label, so that no
    particle vanishes and memory stays bounded; the titles say so.

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
    return _plot_volume.draw_probability(image, probability, labels, plane, axes, threshold)


# ---------------------------------------------------------------------------
# the pixel classifier
# ---------------------------------------------------------------------------


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
    return _plot_classifier.draw_features(classifier, image, names, plane, axes, ncols)


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
    return _plot_classifier.draw_feature_importances(classifier, ax, max_features)


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def _report_weights(mixture, image, posterior, given):
    """The per-slice weights of `mixture` on `image` for the report: `given`,
    those `posterior` hands on, or read from `image`."""
    from . import _handoff

    n_slices = 1 if as_volume(image).is_2d else image.shape[0]
    if given is None and posterior is not None and tuple(posterior.shape) == tuple(image.shape):
        given = _handoff.find(posterior, _handoff.SLICE_WEIGHTS)
    if given is None:
        return mixture.slice_weights(image)
    weights = np.asarray(given, dtype=np.float64).reshape(-1)
    if weights.size != n_slices:
        raise ValueError(f"slice_weights has {weights.size} value(s); image has {n_slices} slice(s).")
    return weights


def _draw_sensitivity(posterior, labeler, sample_shape, ax):
    """The report's threshold-sensitivity figure; its title gives the shape
    of the sample when `posterior` is only part of the image."""
    ax = plot_threshold_sensitivity(posterior, labeler=labeler, ax=ax)
    if sample_shape is not None:
        ax.set_title(f"Threshold sensitivity (a {' x '.join(map(str, sample_shape))} sample)")
    return ax


def write_report(
    directory, *, mixture, image, labels, table, posterior=None, labeler=None, overwrite=False, slice_weights=None,
):
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
        cheap on large data: ``nanoseg segment --report`` passes a central
        block of at most 32 x 1024 x 1024 voxels). When its shape is not the
        image's, the figure's title gives it.
    labeler : NanoparticleLabeler, optional
        The labeler used, for the threshold-sensitivity plot.
    overwrite : bool, optional
        Replace an existing report in `directory`.
    slice_weights : array_like of shape (Z,), optional
        The mixture's per-slice weights on `image`
        (:meth:`~nanoseg.NanoparticleMixture.slice_weights`; one for a 2D
        image), when already known. Otherwise they come from `posterior`
        when it is the whole lazy output of the mixture's ``fit_transform``
        (which knows them), or else from reading `image` once more.

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
    ``slice_weights.png``, ``size_distribution.png``, ``overlay.png`` (the
    plane with the most particle voxels), ``overlay_detail.png`` (its
    256 x 256 pixel square with the most particle pixels, at full
    resolution; only for planes larger than that) and, with `posterior`,
    ``threshold_sensitivity.png``. The summary gives the particle count,
    quantiles of the particle sizes, the fitted intensities and background
    weight, and the range of the per-slice particle fraction.

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
    _plot_common.require_matplotlib()
    _plot_model.check_mixture(mixture)
    directory = _plot_report.prepare_directory(directory, REPORT_FILES, overwrite)
    weights = _report_weights(mixture, image, posterior, slice_weights)
    stack_weight = 1.0 - float(mixture.background_weight_)
    # Both overlays show the same plane, found once.
    label_volume = as_volume(labels, name="labels")
    plane = None if label_volume.is_2d else _plot_common.busiest_plane(label_volume)
    # Drawn through the public functions, so the report follows their defaults.
    drawings = {
        "mixture.png": lambda ax: plot_mixture(mixture, ax=ax),
        "slice_weights.png": lambda ax: _plot_model.draw_slice_weights(ax, weights, stack_weight),
        "size_distribution.png": lambda ax: plot_size_distribution(table, ax=ax),
        "overlay.png": lambda ax: plot_overlay(image, labels, plane=plane, ax=ax),
    }
    if max(label_volume.shape[-2:]) > REPORT_WINDOW:  # else the whole plane is already at full resolution
        drawings["overlay_detail.png"] = lambda ax: plot_overlay(
            image, labels, plane=plane, ax=ax, window=REPORT_WINDOW
        )
    if posterior is not None:
        drawings["threshold_sensitivity.png"] = functools.partial(
            _draw_sensitivity, posterior, labeler, None if tuple(posterior.shape) == tuple(image.shape) else posterior.shape
        )
    _plot_report.save_figures(directory, drawings, REPORT_FILES)
    index = directory / "index.html"
    index.write_text(_plot_report.summary_html(mixture, image, table, weights, list(drawings)), encoding="utf-8")
    return index
