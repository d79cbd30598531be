"""Tests for nanoseg.metrics: voxel and object scores, and grid-search scorers."""

import itertools
import pickle
import re

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.pipeline import Pipeline

import nanoseg.metrics as metrics
from nanoseg import NanoparticleLabeler, NanoparticleMixture
from nanoseg.datasets import make_crops
from nanoseg.metrics import (
    dice_scorer,
    iou_scorer,
    make_object_scorer,
    match_objects,
    object_f1_scorer,
    panoptic_quality_scorer,
    voxel_confusion_matrix,
    voxel_scores,
)


class Identity:
    """Stand-in estimator whose transform returns its input."""

    def transform(self, X):
        return X


def squares_2d():
    """Two 4 x 4 squares in a 6 x 8 image, overlapping over 4 rows x 2 columns.

    prediction: rows 1-4, cols 0-3 (16 voxels, label 7)
    truth:      rows 1-4, cols 2-5 (16 voxels)
    overlap:    rows 1-4, cols 2-3 = 8 voxels
    tp = 8, fp = 16 - 8 = 8, fn = 16 - 8 = 8, tn = 48 - 24 = 24
    IoU = 8 / 24 = 1/3, Dice = 16 / 32 = 1/2.
    """
    prediction = np.zeros((6, 8), dtype=np.uint32)
    prediction[1:5, 0:4] = 7
    truth = np.zeros((6, 8), dtype=bool)
    truth[1:5, 2:6] = True
    return prediction, truth


def cubes_3d():
    """Two 2 x 2 x 2 cubes in a (3, 4, 4) volume, shifted by one plane.

    prediction: z 1-2, y 0-1, x 0-1 (8 voxels); truth: z 0-1, same y, x.
    overlap: z = 1 plane, 4 voxels.
    tp = 4, fp = 4, fn = 4, tn = 48 - 12 = 36; IoU = 4 / 12, Dice = 8 / 16.
    """
    prediction = np.zeros((3, 4, 4), dtype=np.uint32)
    prediction[1:3, 0:2, 0:2] = 1
    truth = np.zeros((3, 4, 4), dtype=np.uint16)
    truth[0:2, 0:2, 0:2] = 5
    return prediction, truth


# ---------------------------------------------------------------------------
# voxel scores
# ---------------------------------------------------------------------------


def test_voxel_scores_two_squares_2d():
    prediction, truth = squares_2d()
    s = voxel_scores(prediction, truth)
    assert (s["tp"], s["fp"], s["fn"], s["tn"]) == (8, 8, 8, 24)
    assert s["precision"] == pytest.approx(0.5)
    assert s["recall"] == pytest.approx(0.5)
    assert s["dice"] == pytest.approx(0.5)
    assert s["iou"] == pytest.approx(1 / 3)
    assert all(isinstance(s[k], int) for k in ("tp", "fp", "fn", "tn"))
    assert all(isinstance(s[k], float) for k in ("precision", "recall", "dice", "iou"))


def test_voxel_scores_cubes_3d_and_label_values_ignored():
    prediction, truth = cubes_3d()
    s = voxel_scores(prediction, truth)
    assert (s["tp"], s["fp"], s["fn"], s["tn"]) == (4, 4, 4, 36)
    assert s["dice"] == pytest.approx(0.5)
    assert s["iou"] == pytest.approx(1 / 3)
    # Label values do not matter, only > 0.
    s2 = voxel_scores(prediction.astype(bool), truth * 3)
    assert s2 == s


def test_voxel_scores_asymmetric_precision_recall():
    # Prediction: whole 4 x 4 image (16 voxels); truth: top-left 2 x 2 (4).
    # tp = 4, fp = 12, fn = 0, tn = 0.
    prediction = np.ones((4, 4), dtype=np.uint32)
    truth = np.zeros((4, 4), dtype=bool)
    truth[:2, :2] = True
    s = voxel_scores(prediction, truth)
    assert (s["tp"], s["fp"], s["fn"], s["tn"]) == (4, 12, 0, 0)
    assert s["precision"] == pytest.approx(4 / 16)
    assert s["recall"] == pytest.approx(1.0)
    assert s["dice"] == pytest.approx(8 / 20)
    assert s["iou"] == pytest.approx(4 / 16)


def test_voxel_confusion_matrix_hand_computed():
    prediction, truth = squares_2d()
    cm = voxel_confusion_matrix(prediction, truth)
    assert cm.dtype == np.int64
    assert cm.shape == (2, 2)
    # [[tn, fp], [fn, tp]]
    np.testing.assert_array_equal(cm, [[24, 8], [8, 8]])
    np.testing.assert_array_equal(voxel_confusion_matrix(*cubes_3d()), [[36, 4], [4, 4]])


def test_voxel_confusion_matrix_matches_sklearn_order():
    rng = np.random.default_rng(0)
    prediction = rng.integers(0, 4, size=(5, 7, 6)).astype(np.uint32)
    truth = rng.random((5, 7, 6)) > 0.6
    expected = confusion_matrix(truth.ravel(), prediction.ravel() > 0, labels=[False, True])
    np.testing.assert_array_equal(voxel_confusion_matrix(prediction, truth), expected)


def test_voxel_pooling_differs_from_averaging():
    # Crop A: a single true voxel, predicted exactly: tp=1 -> Dice 1.
    # Crop B: nine true voxels, nothing predicted: fn=9 -> Dice 0.
    # Mean of per-crop Dice = 0.5; pooled: tp=1, fn=9 -> 2 / (2 + 9).
    truth_a = np.zeros((3, 3), dtype=bool)
    truth_a[1, 1] = True
    pred_a = truth_a.astype(np.uint32)
    truth_b = np.ones((3, 3), dtype=bool)
    pred_b = np.zeros((3, 3), dtype=np.uint32)

    per_crop = [voxel_scores(pred_a, truth_a)["dice"], voxel_scores(pred_b, truth_b)["dice"]]
    assert per_crop == [1.0, 0.0]
    pooled = voxel_scores([pred_a, pred_b], [truth_a, truth_b])
    assert pooled["dice"] == pytest.approx(2 / 11)
    assert pooled["dice"] != pytest.approx(np.mean(per_crop))
    assert (pooled["tp"], pooled["fp"], pooled["fn"], pooled["tn"]) == (1, 0, 9, 8)


def test_voxel_pooling_equals_summed_counts_mixed_2d_3d():
    # Crops may differ in shape and dimension; counts simply add up.
    crops = [squares_2d(), cubes_3d()]
    pooled = voxel_scores([c[0] for c in crops], [c[1] for c in crops])
    singles = [voxel_scores(p, t) for p, t in crops]
    for key in ("tp", "fp", "fn", "tn"):
        assert pooled[key] == sum(s[key] for s in singles)
    # tp = 8 + 4, fp = 8 + 4, fn = 8 + 4 -> Dice 24 / 48, IoU 12 / 36.
    assert pooled["dice"] == pytest.approx(0.5)
    assert pooled["iou"] == pytest.approx(1 / 3)
    cm = voxel_confusion_matrix([c[0] for c in crops], [c[1] for c in crops])
    np.testing.assert_array_equal(cm, [[24 + 36, 12], [12, 12]])
    # Tuples are lists of crops too.
    assert voxel_scores(tuple(c[0] for c in crops), tuple(c[1] for c in crops)) == pooled


def test_voxel_empty_conventions():
    empty = np.zeros((4, 4), dtype=bool)
    full = np.ones((4, 4), dtype=bool)
    both = voxel_scores(empty, empty)
    assert {both[k] for k in ("precision", "recall", "dice", "iou")} == {1.0}
    assert (both["tp"], both["fp"], both["fn"], both["tn"]) == (0, 0, 0, 16)
    # Only the truth empty: every voxel is a false positive.
    only_truth = voxel_scores(full, empty)
    assert {only_truth[k] for k in ("precision", "recall", "dice", "iou")} == {0.0}
    # Only the prediction empty: every voxel is a false negative.
    only_pred = voxel_scores(empty, full)
    assert {only_pred[k] for k in ("precision", "recall", "dice", "iou")} == {0.0}
    # An empty crop pooled with a perfect one does not lower the score.
    assert voxel_scores([empty, full], [empty, full])["dice"] == 1.0


# ---------------------------------------------------------------------------
# object matching
# ---------------------------------------------------------------------------


def test_match_objects_two_squares_below_threshold():
    # IoU = 1/3 (see squares_2d): no match at 0.5.
    s = match_objects(*squares_2d())
    assert (s["tp"], s["fp"], s["fn"]) == (0, 1, 1)
    assert s["precision"] == s["recall"] == s["f1"] == 0.0
    assert s["panoptic_quality"] == 0.0
    assert s["mean_matched_iou"] == 0.0


def test_match_objects_two_squares_low_threshold():
    # IoU = 1/3 > 0.3: one match; PQ = (1/3) / (1 + 0 + 0).
    s = match_objects(*squares_2d(), iou_threshold=0.3)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 0, 0)
    assert s["f1"] == 1.0
    assert s["panoptic_quality"] == pytest.approx(1 / 3)
    assert s["mean_matched_iou"] == pytest.approx(1 / 3)


def test_match_objects_3d_hand_computed():
    # Three true cubes in (4, 8, 8):
    #   T1: z 0-1, y 0-1, x 0-1 (8 voxels)    T2: z 0-1, y 4-5, x 4-5 (8)
    #   T3: z 2-3, y 0-1, x 5-6 (8)
    # Predictions:
    #   P1 = T1 exactly (IoU 1)
    #   P2 = T2 plus the z=2 plane below it (12 voxels): IoU 8 / 12 = 2/3
    #   P3: z 3, y 6-7, x 0-1 (4 voxels), touches nothing -> false positive
    # T3 is missed -> false negative.
    # tp = 2, fp = 1, fn = 1; PQ = (1 + 2/3) / (2 + 0.5 + 0.5).
    truth = np.zeros((4, 8, 8), dtype=np.uint32)
    truth[0:2, 0:2, 0:2] = 1
    truth[0:2, 4:6, 4:6] = 2
    truth[2:4, 0:2, 5:7] = 3
    prediction = np.zeros((4, 8, 8), dtype=np.uint32)
    prediction[0:2, 0:2, 0:2] = 10
    prediction[0:3, 4:6, 4:6] = 20
    prediction[3, 6:8, 0:2] = 30
    s = match_objects(prediction, truth)
    assert (s["tp"], s["fp"], s["fn"]) == (2, 1, 1)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(4 / 6)
    assert s["panoptic_quality"] == pytest.approx((1 + 2 / 3) / 3)
    assert s["mean_matched_iou"] == pytest.approx((1 + 2 / 3) / 2)
    # At 0.7, P2/T2 (IoU 2/3) no longer counts: tp = 1, fp = 2, fn = 2.
    s = match_objects(prediction, truth, iou_threshold=0.7)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 2, 2)
    assert s["panoptic_quality"] == pytest.approx(1 / (1 + 1 + 1))


def test_iou_exactly_half_is_not_a_match():
    # Truth: 4 x 4 square (16 voxels); prediction: its left half (8 voxels).
    # IoU = 8 / 16 = 0.5 exactly: not > 0.5, so no match at the default.
    truth = np.zeros((4, 4), dtype=bool)
    truth[:, :] = True
    prediction = np.zeros((4, 4), dtype=np.uint32)
    prediction[:, :2] = 1
    s = match_objects(prediction, truth, iou_threshold=0.5)
    assert (s["tp"], s["fp"], s["fn"]) == (0, 1, 1)
    # Just below, it matches with IoU 0.5.
    s = match_objects(prediction, truth, iou_threshold=0.49)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 0, 0)
    assert s["panoptic_quality"] == pytest.approx(0.5)


def test_boolean_truth_touching_objects_merge():
    # Truth mask: two 2 x 2 squares touching at a corner (diagonal
    # neighbours). With full (8-) connectivity they are ONE object of 8
    # voxels. The prediction labels them separately as 1 and 2.
    mask = np.zeros((4, 4), dtype=bool)
    mask[0:2, 0:2] = True
    mask[2:4, 2:4] = True
    labels = np.zeros((4, 4), dtype=np.uint32)
    labels[0:2, 0:2] = 1
    labels[2:4, 2:4] = 2

    # Bool truth: one object; each predicted square has IoU 4 / 8 = 0.5,
    # which is not > 0.5: tp = 0, fp = 2, fn = 1.
    s = match_objects(labels, mask)
    assert (s["tp"], s["fp"], s["fn"]) == (0, 2, 1)
    # With a lower threshold only one of the two can be matched (one-to-one).
    s = match_objects(labels, mask, iou_threshold=0.25)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 1, 0)
    assert s["panoptic_quality"] == pytest.approx(0.5 / (1 + 0.5))
    # Label truth: two objects, both matched exactly.
    s = match_objects(labels, labels)
    assert (s["tp"], s["fp"], s["fn"]) == (2, 0, 0)
    assert s["panoptic_quality"] == 1.0
    # Bool prediction: one object too, equal to the bool truth.
    s = match_objects(labels > 0, mask)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 0, 0)
    # Bool prediction against label truth: IoU 0.5 with each true square.
    s = match_objects(labels > 0, labels)
    assert (s["tp"], s["fp"], s["fn"]) == (0, 1, 2)


def test_boolean_full_connectivity_3d():
    # Two voxels touching only at a corner in 3D are one 26-connected object.
    mask = np.zeros((2, 2, 2), dtype=bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True
    s = match_objects(mask, mask)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 0, 0)
    labels = np.zeros((2, 2, 2), dtype=np.int32)
    labels[0, 0, 0], labels[1, 1, 1] = 1, 2
    # Each label voxel has IoU 1/2 with the single bool object.
    s = match_objects(labels, mask, iou_threshold=0.4)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 1, 0)


def test_low_threshold_uses_optimal_assignment():
    # True X: rows 0-1, cols 0-9 (20 voxels); true Y: rows 0-1, cols 10-19.
    # Pred A: row 0, cols 3-14 (12 voxels): A∩X = 7 -> IoU 7/25 = 0.28,
    #                                        A∩Y = 5 -> IoU 5/27 ~ 0.185.
    # Pred B: row 1, cols 0-4 (5 voxels):    B∩X = 5 -> IoU 5/20 = 0.25.
    # Greedy by highest IoU would take A-X and leave B and Y unmatched; the
    # assignment maximising the summed IoU takes A-Y and B-X (0.435 > 0.28).
    truth = np.zeros((2, 20), dtype=np.uint32)
    truth[:, 0:10] = 1
    truth[:, 10:20] = 2
    prediction = np.zeros((2, 20), dtype=np.uint32)
    prediction[0, 3:15] = 1
    prediction[1, 0:5] = 2
    s = match_objects(prediction, truth, iou_threshold=0.1)
    assert (s["tp"], s["fp"], s["fn"]) == (2, 0, 0)
    assert s["panoptic_quality"] == pytest.approx((5 / 27 + 5 / 20) / 2)
    # Above 0.185 the A-Y pair is no candidate; the optimum is then A-X alone
    # (0.28 > 0.25), leaving B and Y unmatched.
    s = match_objects(prediction, truth, iou_threshold=0.2)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 1, 1)
    assert s["mean_matched_iou"] == pytest.approx(7 / 25)
    # Threshold 0: any overlap is a candidate.
    s = match_objects(prediction, truth, iou_threshold=0.0)
    assert s["tp"] == 2


def test_match_objects_label_ids_irrelevant():
    # Relabelling with arbitrary, non-consecutive ids changes nothing.
    rng = np.random.default_rng(3)
    truth = np.zeros((20, 20), dtype=np.uint32)
    prediction = np.zeros((20, 20), dtype=np.uint32)
    for k in range(5):
        y, x = rng.integers(0, 16, size=2)
        truth[y : y + 4, x : x + 4] = k + 1
        prediction[y + 1 : y + 5, x : x + 4] = k + 1
    s = match_objects(prediction, truth)
    ids = np.array([0, 4_000_000_000, 17, 3, 99, 123_456], dtype=np.uint32)
    s2 = match_objects(ids[prediction], ids[truth].astype(np.int64))
    assert s2 == s


def _brute_force_matches(prediction, truth, threshold):
    """Count pairs with IoU > threshold (>= 0.5) by looping over all labels."""
    n = 0
    ious = []
    for p, t in itertools.product(np.unique(prediction[prediction > 0]), np.unique(truth[truth > 0])):
        a, b = prediction == p, truth == t
        iou = (a & b).sum() / (a | b).sum()
        if iou > threshold:
            n += 1
            ious.append(iou)
    return n, ious


@pytest.mark.parametrize("seed", range(5))
def test_match_objects_agrees_with_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = (3, 12, 12)
    truth = np.zeros(shape, dtype=np.uint32)
    prediction = np.zeros(shape, dtype=np.uint32)
    for k in range(8):
        z, y, x = rng.integers(0, 2), *rng.integers(0, 9, size=2)
        truth[z : z + 2, y : y + 3, x : x + 3] = k + 1
        dz, dy, dx = rng.integers(-1, 2, size=3)
        prediction[max(z + dz, 0) : z + dz + 2, max(y + dy, 0) : y + dy + 3, max(x + dx, 0) : x + dx + 3] = k + 1
    n_pred = np.unique(prediction[prediction > 0]).size
    n_true = np.unique(truth[truth > 0]).size
    tp, ious = _brute_force_matches(prediction, truth, 0.5)
    s = match_objects(prediction, truth)
    assert (s["tp"], s["fp"], s["fn"]) == (tp, n_pred - tp, n_true - tp)
    expected_pq = sum(ious) / (tp + (n_pred - tp) / 2 + (n_true - tp) / 2)
    assert s["panoptic_quality"] == pytest.approx(expected_pq)


def test_match_objects_pooling_differs_from_averaging():
    # Crop A: one true square, predicted exactly -> F1 = 1.
    # Crop B: three true squares, nothing predicted -> F1 = 0.
    # Mean F1 = 0.5; pooled tp = 1, fn = 3 -> F1 = 2 / (2 + 3) = 0.4.
    truth_a = np.zeros((8, 8), dtype=bool)
    truth_a[1:3, 1:3] = True
    pred_a = truth_a.astype(np.uint32)
    truth_b = np.zeros((8, 8), dtype=bool)
    truth_b[0:2, 0:2] = truth_b[4:6, 0:2] = truth_b[0:2, 4:6] = True
    pred_b = np.zeros((8, 8), dtype=np.uint32)

    singles = [match_objects(pred_a, truth_a), match_objects(pred_b, truth_b)]
    assert [s["f1"] for s in singles] == [1.0, 0.0]
    pooled = match_objects([pred_a, pred_b], [truth_a, truth_b])
    assert (pooled["tp"], pooled["fp"], pooled["fn"]) == (1, 0, 3)
    assert pooled["f1"] == pytest.approx(0.4)
    assert pooled["recall"] == pytest.approx(0.25)
    # PQ pooled: IoU sum 1 / (1 + 0 + 1.5) = 0.4, not the mean 0.5.
    assert pooled["panoptic_quality"] == pytest.approx(0.4)
    for key in ("tp", "fp", "fn"):
        assert pooled[key] == sum(s[key] for s in singles)


def test_match_objects_empty_conventions():
    empty = np.zeros((5, 5), dtype=np.uint32)
    one = empty.copy()
    one[1:3, 1:3] = 1
    keys = ("precision", "recall", "f1", "panoptic_quality", "mean_matched_iou")
    both = match_objects(empty, empty.astype(bool))
    assert (both["tp"], both["fp"], both["fn"]) == (0, 0, 0)
    assert {both[k] for k in keys} == {1.0}
    only_pred = match_objects(one, empty)
    assert (only_pred["tp"], only_pred["fp"], only_pred["fn"]) == (0, 1, 0)
    assert {only_pred[k] for k in keys} == {0.0}
    only_truth = match_objects(empty, one)
    assert (only_truth["tp"], only_truth["fp"], only_truth["fn"]) == (0, 0, 1)
    assert {only_truth[k] for k in keys} == {0.0}
    # Pooled, an empty crop adds nothing.
    assert match_objects([empty, one], [empty, one])["f1"] == 1.0


# ---------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------

FUNCTIONS = [voxel_scores, voxel_confusion_matrix, match_objects]


@pytest.mark.parametrize("func", FUNCTIONS)
def test_shape_mismatch_names_both_shapes(func):
    a = np.zeros((4, 4), dtype=np.uint32)
    b = np.zeros((4, 5), dtype=bool)
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(4, 5\)"):
        func(a, b)
    with pytest.raises(ValueError, match=r"crop 1.*\(4, 4\).*\(4, 5\)"):
        func([a, a], [a.astype(bool), b])


@pytest.mark.parametrize("func", FUNCTIONS)
def test_length_mismatch_names_both_lengths(func):
    a = np.zeros((4, 4), dtype=np.uint32)
    with pytest.raises(ValueError, match=r"2 prediction.*3 truth"):
        func([a, a], [a, a, a])


@pytest.mark.parametrize("func", FUNCTIONS)
@pytest.mark.parametrize("shape", [(2, 2, 2, 2), (5,)])
def test_wrong_dimension_raises(func, shape):
    a = np.zeros(shape, dtype=np.uint32)
    with pytest.raises(ValueError, match=re.escape(f"{len(shape)}D")):
        func(a, a)
    with pytest.raises(ValueError, match=re.escape(f"{len(shape)}D")):
        func([np.zeros((3, 3), np.uint32), a], [np.zeros((3, 3), np.uint32), a])


@pytest.mark.parametrize("func", FUNCTIONS)
def test_list_and_array_mixed_or_empty_raise(func):
    a = np.zeros((4, 4), dtype=np.uint32)
    with pytest.raises(ValueError, match="both"):
        func([a], a)
    with pytest.raises(ValueError, match="at least one"):
        func([], [])


def test_match_objects_rejects_bad_inputs():
    a = np.zeros((4, 4), dtype=np.uint32)
    with pytest.raises(ValueError, match="dtype"):
        match_objects(a.astype(np.float32), a)
    with pytest.raises(ValueError, match="non-negative"):
        match_objects(a, a.astype(np.int32) - 1)
    for bad in (-0.1, 1.0, 2, "0.5", None, True):
        with pytest.raises(ValueError, match="iou_threshold"):
            match_objects(a, a, iou_threshold=bad)


def test_make_object_scorer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="metric"):
        make_object_scorer("dice")
    with pytest.raises(ValueError, match="iou_threshold"):
        make_object_scorer("f1", iou_threshold=1.5)


# ---------------------------------------------------------------------------
# scorers
# ---------------------------------------------------------------------------


def test_scorers_on_identity_estimator():
    prediction, truth = squares_2d()
    est = Identity()
    assert dice_scorer(est, prediction, truth) == pytest.approx(0.5)
    assert iou_scorer(est, prediction, truth) == pytest.approx(1 / 3)
    assert object_f1_scorer(est, prediction, truth) == 0.0
    assert panoptic_quality_scorer(est, prediction, truth) == 0.0
    assert make_object_scorer("pq", iou_threshold=0.3)(est, prediction, truth) == pytest.approx(1 / 3)
    assert make_object_scorer("panoptic_quality", 0.3)(est, prediction, truth) == pytest.approx(1 / 3)
    assert make_object_scorer("f1", iou_threshold=0.3)(est, prediction, truth) == 1.0
    # Lists pool, as the functions do.
    crops = [squares_2d(), cubes_3d()]
    X, y = [c[0] for c in crops], [c[1] for c in crops]
    assert dice_scorer(est, X, y) == pytest.approx(voxel_scores(X, y)["dice"])
    assert isinstance(dice_scorer(est, X, y), float)


def test_scorers_compute_lazy_dask_outputs():
    da = pytest.importorskip("dask.array")
    prediction, truth = cubes_3d()

    class Lazy:
        def transform(self, X):
            return da.from_array(X, chunks=(1, 4, 4))

    assert dice_scorer(Lazy(), prediction, truth) == pytest.approx(0.5)
    assert make_object_scorer("mean_matched_iou", 0.3)(Lazy(), prediction, truth) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "scorer", [dice_scorer, iou_scorer, object_f1_scorer, panoptic_quality_scorer, make_object_scorer("recall", 0.2)]
)
def test_scorers_pickle(scorer):
    prediction, truth = squares_2d()
    clone = pickle.loads(pickle.dumps(scorer))
    assert clone(Identity(), prediction, truth) == scorer(Identity(), prediction, truth)


def _pipeline():
    return Pipeline(
        [("mixture", NanoparticleMixture(max_iter=100_000)), ("labeler", NanoparticleLabeler(min_size=3))]
    )


@pytest.fixture(scope="module")
def crops():
    return make_crops(4, (6, 64, 64), n_particles=12, random_state=0)


@pytest.mark.parametrize("scoring", [object_f1_scorer, make_object_scorer("pq", iou_threshold=0.3)])
def test_scorers_in_grid_search(crops, scoring):
    images, masks = crops
    search = GridSearchCV(
        _pipeline(),
        {"labeler__threshold": [0.5, 0.95]},
        scoring=scoring,
        cv=KFold(2),
        n_jobs=2,
        error_score="raise",
    )
    search.fit(images, masks)
    scores = np.concatenate([search.cv_results_[f"split{i}_test_score"] for i in range(2)])
    assert scores.shape == (4,)
    assert np.all((scores >= 0) & (scores <= 1))
    assert search.best_params_["labeler__threshold"] in (0.5, 0.95)
    # The split scores are the metric of the fitted pipeline on the held-out crops.
    # KFold(2) without shuffling: split 0 trains on crops 2, 3, tests on 0, 1.
    pipe = _pipeline().set_params(labeler__threshold=0.5).fit([images[i] for i in (2, 3)])
    expected = scoring(pipe, [images[i] for i in (0, 1)], [masks[i] for i in (0, 1)])
    assert search.cv_results_["split0_test_score"][0] == pytest.approx(expected)


def test_public_names():
    assert set(metrics.__all__) == {
        "voxel_scores",
        "voxel_confusion_matrix",
        "match_objects",
        "make_object_scorer",
        "dice_scorer",
        "iou_scorer",
        "object_f1_scorer",
        "panoptic_quality_scorer",
    }
    for name in metrics.__all__:
        assert hasattr(metrics, name)
