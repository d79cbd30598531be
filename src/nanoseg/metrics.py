"""Score a segmentation against annotated ground truth.

Two families of scores are provided:

* voxel scores (:func:`voxel_scores`, :func:`voxel_confusion_matrix`), which
  binarise both arrays (``> 0``) and count voxels;
* object scores (:func:`match_objects`), which match predicted instances to
  true instances by their intersection over union (IoU).

Every function takes ``prediction, truth``: two arrays of the same 2D
``(Y, X)`` or 3D ``(Z, Y, X)`` shape, or two lists of the same length of such
arrays (annotated crops). A prediction is usually a ``uint32`` label image
(0 is background) or a boolean mask; the truth is a boolean mask or an
instance label image.

Lists are **pooled**: the counts (voxels, or matched / unmatched objects and
matched IoUs) are summed over the crops, and the ratios are taken once from
the sums. A crop with few particles therefore weighs less than one with
many, unlike averaging per-crop scores.

The scorers (:data:`dice_scorer`, :data:`iou_scorer`,
:data:`object_f1_scorer`, :data:`panoptic_quality_scorer` and the factory
:func:`make_object_scorer`) follow scikit-learn's ``scorer(estimator, X, y)``
protocol, so that they can be given as ``scoring`` to
:class:`sklearn.model_selection.GridSearchCV`. They call
``estimator.transform(X)`` and score the result against ``y``.
"""

from __future__ import annotations

import numbers

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components
from skimage.measure import label as _label_components

__all__ = [
    "voxel_scores",
    "voxel_confusion_matrix",
    "match_objects",
    "make_object_scorer",
    "dice_scorer",
    "iou_scorer",
    "object_f1_scorer",
    "panoptic_quality_scorer",
]


# ---------------------------------------------------------------------------
# input checking
# ---------------------------------------------------------------------------


def _as_array(a, name, index=None):
    """Return `a` as a NumPy array, checking it is 2D or 3D."""
    arr = np.asarray(a)
    where = name if index is None else f"{name}[{index}]"
    if arr.ndim not in (2, 3):
        raise ValueError(
            f"{where} must be a 2D (Y, X) or 3D (Z, Y, X) array, got {arr.ndim}D array of shape {arr.shape}"
        )
    return arr


def _pairs(prediction, truth):
    """Return a list of ``(prediction, truth)`` NumPy array pairs (the crops)."""
    pred_is_list = isinstance(prediction, list | tuple)
    true_is_list = isinstance(truth, list | tuple)
    if pred_is_list != true_is_list:
        kinds = {True: "a list", False: "an array"}
        raise ValueError(
            f"prediction and truth must both be arrays or both be lists of arrays, "
            f"got {kinds[pred_is_list]} and {kinds[true_is_list]}"
        )
    if not pred_is_list:
        prediction, truth = [prediction], [truth]
        indices = [None]
    else:
        if len(prediction) != len(truth):
            raise ValueError(
                f"prediction and truth must have the same length, "
                f"got {len(prediction)} prediction crops and {len(truth)} truth crops"
            )
        if len(prediction) == 0:
            raise ValueError("prediction and truth must hold at least one crop, got empty lists")
        indices = range(len(prediction))
    pairs = []
    for i, p, t in zip(indices, prediction, truth):
        p = _as_array(p, "prediction", i)
        t = _as_array(t, "truth", i)
        if p.shape != t.shape:
            where = "" if i is None else f" (crop {i})"
            raise ValueError(
                f"prediction and truth must have the same shape{where}, "
                f"got prediction shape {p.shape} and truth shape {t.shape}"
            )
        pairs.append((p, t))
    return pairs


def _ratio(num, den, *, empty):
    """``num / den``, or `empty` when ``den`` is 0."""
    return float(num) / float(den) if den > 0 else float(empty)


# ---------------------------------------------------------------------------
# voxel scores
# ---------------------------------------------------------------------------


def _voxel_counts(prediction, truth):
    """Pooled ``(tn, fp, fn, tp)`` voxel counts, as Python ints."""
    tp = fp = fn = tn = 0
    for p, t in _pairs(prediction, truth):
        p = p > 0
        t = t > 0
        n_tp = int(np.count_nonzero(p & t))
        n_pred = int(np.count_nonzero(p))
        n_true = int(np.count_nonzero(t))
        tp += n_tp
        fp += n_pred - n_tp
        fn += n_true - n_tp
        tn += p.size - n_pred - n_true + n_tp
    return tn, fp, fn, tp


def voxel_confusion_matrix(prediction, truth):
    """Count foreground / background voxel agreement.

    Both arrays are binarised with ``> 0`` (labels and booleans alike).

    Parameters
    ----------
    prediction : array or list of arrays
        Predicted labels or mask, 2D ``(Y, X)`` or 3D ``(Z, Y, X)``, or a list
        of such arrays (crops).
    truth : array or list of arrays
        Ground-truth mask or labels, of the same shape as `prediction` (or a
        list of the same length with matching shapes).

    Returns
    -------
    matrix : ndarray of shape (2, 2), int64
        ``[[tn, fp], [fn, tp]]``: rows are the truth (background, foreground)
        and columns the prediction, the order of
        :func:`sklearn.metrics.confusion_matrix`. For a list the counts are
        summed over the crops.

    Raises
    ------
    ValueError
        If the shapes or the list lengths differ, or an array is not 2D or 3D.

    See Also
    --------
    voxel_scores : Ratios computed from these counts.

    Examples
    --------
    >>> import numpy as np
    >>> from nanoseg.metrics import voxel_confusion_matrix
    >>> prediction = np.array([[1, 1, 0],
    ...                        [0, 0, 0]], dtype=np.uint32)
    >>> truth = np.array([[0, 1, 1],
    ...                   [0, 0, 0]], dtype=bool)
    >>> voxel_confusion_matrix(prediction, truth)
    array([[3, 1],
           [1, 1]])
    """
    tn, fp, fn, tp = _voxel_counts(prediction, truth)
    return np.array([[tn, fp], [fn, tp]], dtype=np.int64)


def voxel_scores(prediction, truth):
    """Voxel-wise precision, recall, Dice and IoU of a segmentation.

    Both arrays are binarised with ``> 0`` and compared voxel by voxel.

    Parameters
    ----------
    prediction : array or list of arrays
        Predicted labels or mask, 2D ``(Y, X)`` or 3D ``(Z, Y, X)``, or a list
        of such arrays (crops).
    truth : array or list of arrays
        Ground-truth mask or labels, of the same shape as `prediction` (or a
        list of the same length with matching shapes).

    Returns
    -------
    scores : dict
        ``"precision"`` (``tp / (tp + fp)``), ``"recall"``
        (``tp / (tp + fn)``), ``"dice"`` (``2 tp / (2 tp + fp + fn)``) and
        ``"iou"`` (``tp / (tp + fp + fn)``) as floats, and the counts
        ``"tp"``, ``"fp"``, ``"fn"``, ``"tn"`` as ints. For a list the counts
        are summed over the crops before the ratios are taken (pooling).

    Raises
    ------
    ValueError
        If the shapes or the list lengths differ, or an array is not 2D or 3D.

    See Also
    --------
    voxel_confusion_matrix : The same counts as a matrix.
    match_objects : Object-level scores.

    Notes
    -----
    A ratio whose denominator is 0 is 1.0 when both the prediction and the
    truth are empty (nothing to find, and nothing found), and 0.0 otherwise.
    So when both are empty every score is 1.0, and when only one of them is
    empty every score is 0.0.

    Examples
    --------
    >>> import numpy as np
    >>> from nanoseg.metrics import voxel_scores
    >>> prediction = np.zeros((4, 4), dtype=np.uint32)
    >>> prediction[0:2, 0:2] = 1
    >>> truth = np.zeros((4, 4), dtype=bool)
    >>> truth[0:2, 1:3] = True
    >>> scores = voxel_scores(prediction, truth)
    >>> scores["tp"], scores["fp"], scores["fn"], scores["tn"]
    (2, 2, 2, 10)
    >>> scores["dice"], round(scores["iou"], 4)
    (0.5, 0.3333)
    >>> voxel_scores(np.zeros((2, 2)), np.zeros((2, 2)))["dice"]
    1.0
    """
    tn, fp, fn, tp = _voxel_counts(prediction, truth)
    both_empty = tp + fp + fn == 0
    empty = 1.0 if both_empty else 0.0
    return {
        "precision": _ratio(tp, tp + fp, empty=empty),
        "recall": _ratio(tp, tp + fn, empty=empty),
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, empty=empty),
        "iou": _ratio(tp, tp + fp + fn, empty=empty),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }


# ---------------------------------------------------------------------------
# object matching
# ---------------------------------------------------------------------------


def _instances(a, name):
    """Return an integer instance label array for `a` (labels or a mask)."""
    if a.dtype == bool:
        # Full connectivity: 8 neighbours in 2D, 26 in 3D.
        return _label_components(a, connectivity=a.ndim)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be a boolean mask or integer labels for object matching, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.signedinteger) and a.size and a.min() < 0:
        raise ValueError(f"{name} labels must be non-negative, got minimum {a.min()}")
    return a


def _instance_sizes(labels):
    """Sorted nonzero instance ids of `labels` and their sizes in voxels."""
    flat = labels.ravel()
    top = int(flat.max()) if flat.size else 0
    if top <= 2 * flat.size + 1024:
        # Ids dense enough for a table: one linear pass, no sort.
        counts = np.bincount(flat.astype(np.intp, copy=False), minlength=top + 1)
        counts[0] = 0
        ids = np.flatnonzero(counts)
        return ids, counts[ids]
    return np.unique(flat[flat != 0], return_counts=True)


def _pair_ious(pred_labels, true_labels):
    """IoUs of all overlapping (prediction, truth) instance pairs.

    Returns the number of predicted instances, the number of true instances,
    and, for each overlapping pair, the compact indices of its predicted and
    true instances and its IoU, pairs sorted by (prediction, truth).
    """
    p_ids, p_sizes = _instance_sizes(pred_labels)
    t_ids, t_sizes = _instance_sizes(true_labels)
    n_pred, n_true = p_ids.size, t_ids.size
    # Only voxels inside both a predicted and a true instance make pairs:
    # usually far fewer than the foreground, and the only ones sorted.
    both = (pred_labels != 0) & (true_labels != 0)
    pi = np.searchsorted(p_ids, pred_labels[both]).astype(np.int64)
    ti = np.searchsorted(t_ids, true_labels[both]).astype(np.int64)
    keys, inter = np.unique(pi * max(n_true, 1) + ti, return_counts=True)
    pi = keys // max(n_true, 1)
    ti = keys % max(n_true, 1)
    union = p_sizes[pi] + t_sizes[ti] - inter
    iou = inter / union
    return n_pred, n_true, pi, ti, iou


def _assign(n_pred, n_true, pi, ti, iou):
    """Maximum total IoU one-to-one matching of the candidate pairs; matched IoUs."""
    if pi.size == 0:
        return iou[:0]
    # Pairs whose two instances have no other candidate are matched directly.
    p_deg = np.bincount(pi, minlength=n_pred)
    t_deg = np.bincount(ti, minlength=n_true)
    simple = (p_deg[pi] == 1) & (t_deg[ti] == 1)
    matched = [iou[simple]]
    pi, ti, iou = pi[~simple], ti[~simple], iou[~simple]
    if pi.size:
        # Solve each connected component of the bipartite candidate graph
        # separately: small dense problems instead of one huge one.
        graph = sparse.coo_matrix((np.ones(pi.size), (pi, n_pred + ti)), shape=(n_pred + n_true,) * 2)
        _, comp = connected_components(graph, directed=False)
        edge_comp = comp[pi]
        order = np.argsort(edge_comp, kind="stable")
        bounds = np.flatnonzero(np.diff(edge_comp[order])) + 1
        for edges in np.split(order, bounds):
            rows, r_inv = np.unique(pi[edges], return_inverse=True)
            cols, c_inv = np.unique(ti[edges], return_inverse=True)
            cost = np.zeros((rows.size, cols.size))
            cost[r_inv, c_inv] = -iou[edges]
            r, c = linear_sum_assignment(cost)
            picked = -cost[r, c]
            matched.append(picked[picked > 0])
    return np.concatenate(matched)


def _match_counts(pred, true, iou_threshold):
    """Object ``(tp, fp, fn, sum of matched IoUs)`` of one crop."""
    pred = _instances(pred, "prediction")
    true = _instances(true, "truth")
    n_pred, n_true, pi, ti, iou = _pair_ious(pred, true)
    keep = iou > iou_threshold
    pi, ti, iou = pi[keep], ti[keep], iou[keep]
    if iou_threshold >= 0.5:
        # IoU > 0.5 with two instances is impossible for one object, so the
        # pairs are one-to-one already.
        matched = iou
    else:
        matched = _assign(n_pred, n_true, pi, ti, iou)
    tp = int(matched.size)
    return tp, n_pred - tp, n_true - tp, float(matched.sum())


def _check_threshold(iou_threshold):
    if (
        isinstance(iou_threshold, bool | np.bool_)
        or not isinstance(iou_threshold, numbers.Real)
        or not 0.0 <= float(iou_threshold) < 1.0
    ):
        raise ValueError(f"iou_threshold must be a real number in [0, 1), got {iou_threshold!r}")
    return float(iou_threshold)


def match_objects(prediction, truth, *, iou_threshold=0.5):
    """Match predicted particles to true particles and score the matching.

    Instances are the nonzero labels of an integer array; a boolean array is
    first split into connected components with full connectivity (8
    neighbours in 2D, 26 in 3D), so touching particles in a boolean mask
    count as one object.

    Parameters
    ----------
    prediction : array or list of arrays
        Predicted instance labels (0 is background) or mask, 2D ``(Y, X)`` or
        3D ``(Z, Y, X)``, or a list of such arrays (crops).
    truth : array or list of arrays
        Ground-truth instance labels or mask, of the same shape as
        `prediction` (or a list of the same length with matching shapes).
    iou_threshold : float, optional
        A predicted and a true instance can be matched only if their IoU is
        strictly greater than this, in ``[0, 1)``.

    Returns
    -------
    scores : dict
        ``"tp"`` (matched pairs), ``"fp"`` (unmatched predicted instances) and
        ``"fn"`` (unmatched true instances) as ints; ``"precision"``
        (``tp / (tp + fp)``), ``"recall"`` (``tp / (tp + fn)``), ``"f1"``
        (``2 tp / (2 tp + fp + fn)``), ``"panoptic_quality"`` (sum of the
        matched IoUs over ``tp + fp / 2 + fn / 2``) and
        ``"mean_matched_iou"`` (sum of the matched IoUs over ``tp``) as
        floats. For a list, ``tp``, ``fp``, ``fn`` and the sum of matched IoUs
        are summed over the crops before the ratios are taken (pooling);
        instances are never matched across crops.

    Raises
    ------
    ValueError
        If the shapes or the list lengths differ, an array is not 2D or 3D,
        an array is neither boolean nor integer, labels are negative, or
        `iou_threshold` is not in ``[0, 1)``.

    See Also
    --------
    voxel_scores : Voxel-level scores.
    make_object_scorer : Use these scores in a grid search.

    Notes
    -----
    The IoU of every overlapping pair comes from one joint histogram of the
    (prediction, truth) label pairs over the voxels where either is nonzero.

    A pair is a candidate match when its IoU is **strictly greater** than
    `iou_threshold` (so at the default 0.5, a pair with IoU exactly 0.5 is not
    a match). For ``iou_threshold >= 0.5`` an instance can have at most one
    candidate (two disjoint objects cannot each overlap it by more than half
    of their union), and all candidates are matched. For ``iou_threshold <
    0.5`` the candidates are matched one-to-one by an optimal assignment
    (:func:`scipy.optimize.linear_sum_assignment`) maximising the sum of the
    matched IoUs.

    A ratio whose denominator is 0 is 1.0 when there are no objects in the
    prediction nor in the truth, and 0.0 otherwise. In particular, when both
    are empty every score is 1.0, and ``mean_matched_iou`` is 0.0 when there
    are objects but no match.

    Examples
    --------
    Two 4 x 4 squares overlapping over 4 x 2 voxels: IoU = 8 / 24 = 1/3.

    >>> import numpy as np
    >>> from nanoseg.metrics import match_objects
    >>> prediction = np.zeros((6, 8), dtype=np.uint32)
    >>> prediction[1:5, 0:4] = 1
    >>> truth = np.zeros((6, 8), dtype=bool)
    >>> truth[1:5, 2:6] = True
    >>> scores = match_objects(prediction, truth)
    >>> scores["tp"], scores["fp"], scores["fn"], scores["f1"]
    (0, 1, 1, 0.0)
    >>> scores = match_objects(prediction, truth, iou_threshold=0.3)
    >>> scores["tp"], scores["f1"], round(scores["panoptic_quality"], 4)
    (1, 1.0, 0.3333)
    """
    iou_threshold = _check_threshold(iou_threshold)
    tp = fp = fn = 0
    iou_sum = 0.0
    for p, t in _pairs(prediction, truth):
        c_tp, c_fp, c_fn, c_sum = _match_counts(p, t, iou_threshold)
        tp += c_tp
        fp += c_fp
        fn += c_fn
        iou_sum += c_sum
    empty = 1.0 if tp + fp + fn == 0 else 0.0
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": _ratio(tp, tp + fp, empty=empty),
        "recall": _ratio(tp, tp + fn, empty=empty),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn, empty=empty),
        "panoptic_quality": _ratio(iou_sum, tp + 0.5 * fp + 0.5 * fn, empty=empty),
        "mean_matched_iou": _ratio(iou_sum, tp, empty=empty),
    }


# ---------------------------------------------------------------------------
# scorers
# ---------------------------------------------------------------------------


def _predict(estimator, X):
    """``estimator.transform(X)`` as NumPy arrays (lazy outputs computed)."""
    out = estimator.transform(X)
    if isinstance(out, list | tuple):
        return [np.asarray(o) for o in out]
    return np.asarray(out)


_VOXEL_METRICS = ("dice", "iou", "precision", "recall")

_OBJECT_METRICS = {
    "f1": "f1",
    "precision": "precision",
    "recall": "recall",
    "pq": "panoptic_quality",
    "panoptic_quality": "panoptic_quality",
    "mean_matched_iou": "mean_matched_iou",
}


class _VoxelScorer:
    """Scorer ``(estimator, X, y) -> float`` returning one of :func:`voxel_scores`."""

    def __init__(self, metric):
        if metric not in _VOXEL_METRICS:
            raise ValueError(f"metric must be one of {_VOXEL_METRICS}, got {metric!r}")
        self.metric = metric

    def __call__(self, estimator, X, y):
        return voxel_scores(_predict(estimator, X), y)[self.metric]

    def __repr__(self):
        return f"<voxel scorer: {self.metric}>"


class _ObjectScorer:
    """Scorer ``(estimator, X, y) -> float`` returning one of :func:`match_objects`."""

    def __init__(self, metric, iou_threshold):
        self.metric = metric
        self.iou_threshold = iou_threshold

    def __call__(self, estimator, X, y):
        scores = match_objects(_predict(estimator, X), y, iou_threshold=self.iou_threshold)
        return scores[_OBJECT_METRICS[self.metric]]

    def __repr__(self):
        return f"make_object_scorer(metric={self.metric!r}, iou_threshold={self.iou_threshold!r})"


def make_object_scorer(metric="f1", iou_threshold=0.5):
    """Make a grid-search scorer from an object-level score.

    Parameters
    ----------
    metric : {"f1", "precision", "recall", "pq", "panoptic_quality", "mean_matched_iou"}, optional
        Which score of :func:`match_objects` to return; ``"pq"`` is short
        for ``"panoptic_quality"``.
    iou_threshold : float, optional
        Passed on to :func:`match_objects`, in ``[0, 1)``.

    Returns
    -------
    scorer : callable
        ``scorer(estimator, X, y) -> float``: runs ``estimator.transform(X)``
        (lazy dask outputs are computed) and scores the labels against `y`,
        pooling over crops when `X` is a list. Greater is better. The scorer
        can be pickled, as :class:`sklearn.model_selection.GridSearchCV` does
        with ``n_jobs > 1``.

    Raises
    ------
    ValueError
        If `metric` is unknown or `iou_threshold` is not in ``[0, 1)``.

    See Also
    --------
    match_objects : The scores.
    object_f1_scorer, panoptic_quality_scorer : Ready-made scorers.

    Examples
    --------
    >>> import numpy as np
    >>> from nanoseg.metrics import make_object_scorer
    >>> class Identity:
    ...     def transform(self, X):
    ...         return X
    >>> truth = np.zeros((6, 8), dtype=bool)
    >>> truth[1:5, 2:6] = True
    >>> prediction = np.zeros((6, 8), dtype=np.uint32)
    >>> prediction[1:5, 0:4] = 1
    >>> scorer = make_object_scorer("pq", iou_threshold=0.3)
    >>> round(scorer(Identity(), prediction, truth), 4)
    0.3333
    """
    if metric not in _OBJECT_METRICS:
        raise ValueError(f"metric must be one of {tuple(_OBJECT_METRICS)}, got {metric!r}")
    return _ObjectScorer(metric, _check_threshold(iou_threshold))


#: Voxel Dice of ``estimator.transform(X)`` against ``y``, pooled over crops.
dice_scorer = _VoxelScorer("dice")

#: Voxel IoU (Jaccard index) of ``estimator.transform(X)`` against ``y``.
iou_scorer = _VoxelScorer("iou")

#: Object F1 at IoU > 0.5 of ``estimator.transform(X)`` against ``y``.
object_f1_scorer = make_object_scorer("f1", iou_threshold=0.5)

#: Panoptic quality at IoU > 0.5 of ``estimator.transform(X)`` against ``y``.
panoptic_quality_scorer = make_object_scorer("pq", iou_threshold=0.5)
