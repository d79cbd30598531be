"""Figures of a fitted pixel classifier, for :mod:`nanoseg.plotting`.

The feature maps it computes for one plane, chosen by name or by family,
and the importances its fitted trees give those features.
"""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.utils.validation import check_is_fitted

from ._engine.classify import SECOND_UNIT_SUFFIX
from ._plot_common import check_plane, new_axes, panels, require_matplotlib
from ._volume import as_volume


def check_classifier(classifier):
    """Raise unless `classifier` is a fitted NanoparticleClassifier (or looks like one)."""
    if not hasattr(classifier, "features_of"):
        raise TypeError(
            f"Expected a fitted NanoparticleClassifier; {type(classifier).__name__} has no features_of."
        )
    check_is_fitted(classifier, "estimator_")


def _split_unit(name):
    """A column name and the suffix of its intensity unit ("" for the first unit)."""
    if name.endswith(SECOND_UNIT_SUFFIX):
        return name[: -len(SECOND_UNIT_SUFFIX)], SECOND_UNIT_SUFFIX
    return name, ""


def _key(name):
    """Column name without its scale: ``gaussian@0x2x2`` -> ``gaussian``,
    ``gaussian@0x2x2:background`` -> ``gaussian:background``."""
    base, unit = _split_unit(name)
    return base.split("@")[0] + unit


def _family(name):
    """Feature family of a column name: ``gaussian@0x2x2`` -> ``gaussian``, ``hessian_1@0x1x1`` -> ``hessian``."""
    base, unit = _split_unit(name)
    key = base.split("@")[0]
    return ("hessian" if key.startswith("hessian_") else key) + unit


def default_features(names):
    """One column per family: its middle scale (the first Hessian eigenvalue).

    Columns in a second intensity unit are left out: they are their twins'
    pictures again, up to the colour scale.
    """
    chosen = []
    for family in dict.fromkeys(_family(name) for name in names):
        if family.endswith(SECOND_UNIT_SUFFIX):
            continue
        columns = [n for n in names if _family(n) == family]
        if family == "hessian":
            first = columns[0].split("@")[0]
            columns = [n for n in columns if n.split("@")[0] == first]
        chosen.append(columns[len(columns) // 2])
    return chosen


def select_features(selection, names):
    """The columns of `names` that `selection` (names or families) stands for, in its order."""
    if isinstance(selection, str):
        selection = [selection]
    chosen = []
    for entry in selection:
        if entry in names:
            matches = [entry]
        else:
            matches = [n for n in names if entry in (_family(n), _key(n))]
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


def draw_features(classifier, image, names, plane, axes, ncols):
    """Draw the chosen feature maps of one plane; see ``plot_features``."""
    require_matplotlib()
    check_classifier(classifier)
    feature_names = list(classifier.feature_names_)
    shown = default_features(feature_names) if names is None else select_features(names, feature_names)
    volume = as_volume(image, name="image")
    plane = check_plane(plane, volume, lambda: volume.shape[0] // 2)
    features = np.asarray(classifier.features_of(image))
    if not volume.is_2d:
        features = features[:, plane]
    title = "Features of the image" if volume.is_2d else f"Features of plane z = {plane}"
    axes = panels(axes, len(shown), ncols, title=title)
    for ax, name in zip(axes, shown):
        values = features[feature_names.index(name)]
        finite = values[np.isfinite(values)]
        low, high = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
        ax.imshow(values, cmap="magma", vmin=low, vmax=high, interpolation="nearest")
        ax.set_title(name, fontsize="medium")
        ax.set_xticks([])
        ax.set_yticks([])
    return axes


def draw_feature_importances(classifier, ax, max_features):
    """Draw the fitted estimator's feature importances as bars; see ``plot_feature_importances``."""
    check_classifier(classifier)
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
    ax = new_axes(ax)
    positions = np.arange(order.size)
    ax.barh(positions, importances[order], color="C0")
    ax.set_yticks(positions, [names[i] for i in order], fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("importance (mean decrease in impurity)")
    shown = f"{order.size} of {importances.size}" if order.size < importances.size else f"{importances.size}"
    ax.set_title(f"Feature importances ({shown} features)")
    return ax
