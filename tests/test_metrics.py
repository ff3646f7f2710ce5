"""ConfusionMatrix and its scores (minifcn/metrics.py) against hand-computed examples."""
import math
import warnings
from fractions import Fraction as F

import numpy as np
import pytest

from minifcn.backend import to_device
from minifcn.metrics import ConfusionMatrix, count_bins, format_scores

# rows = truth, columns = prediction
MATRIX = np.array([[3, 1, 0],
                   [0, 2, 2],
                   [1, 0, 1]])


def pixels_from(matrix):
    """Label and prediction arrays whose confusion matrix is ``matrix``."""
    label, pred = [], []
    for i, j in np.ndindex(matrix.shape):
        label += [i] * matrix[i, j]
        pred += [j] * matrix[i, j]
    return np.array(pred), np.array(label)


def test_matrix_and_four_scores_by_hand(device):
    pred, label = pixels_from(MATRIX)
    cm = ConfusionMatrix(3)
    cm.update(to_device(pred.reshape(2, 5), device), to_device(label.reshape(2, 5), device))
    np.testing.assert_array_equal(cm.matrix, MATRIX)
    assert cm.matrix.dtype == np.int64
    s = cm.scores()
    # diag = 3, 2, 1; truth t = 4, 4, 2; predicted = 4, 3, 3; total 10
    assert s["pixel_acc"] == pytest.approx(float(F(6, 10)))
    assert s["per_class_acc"] == pytest.approx([3 / 4, 2 / 4, 1 / 2])
    assert s["mean_acc"] == pytest.approx(float((F(3, 4) + F(2, 4) + F(1, 2)) / 3))  # 7/12
    # IU = n_ii / (t_i + predicted_i - n_ii): 3/5, 2/5, 1/4
    assert s["per_class_iu"] == pytest.approx([3 / 5, 2 / 5, 1 / 4])
    assert s["mean_iu"] == pytest.approx(float((F(3, 5) + F(2, 5) + F(1, 4)) / 3))  # 5/12
    assert s["fwiu"] == pytest.approx(float(F(4, 10) * F(3, 5) + F(4, 10) * F(2, 5) + F(2, 10) * F(1, 4)))  # 9/20


def test_updates_accumulate_and_reset():
    pred, label = pixels_from(MATRIX)
    cm = ConfusionMatrix(3)
    cm.update(pred[:4], label[:4])
    cm.update(pred[4:], label[4:])
    np.testing.assert_array_equal(cm.matrix, MATRIX)
    cm.reset()
    assert cm.matrix.sum() == 0


def test_ignore_label_is_skipped(device):
    pred, label = pixels_from(MATRIX)
    cm = ConfusionMatrix(3)
    # ignored pixels may hold any prediction, even an out-of-range one
    cm.update(to_device(np.concatenate([pred, [0, 2, 7]]), device),
              to_device(np.concatenate([label, [255, 255, 255]]).astype(np.uint8), device))
    np.testing.assert_array_equal(cm.matrix, MATRIX)
    cm = ConfusionMatrix(3, ignore_index=None)
    with pytest.raises(ValueError, match="label value 255"):
        cm.update(to_device(np.array([0]), device), to_device(np.array([255]), device))


def test_an_all_ignored_batch_counts_nothing(device):
    """Every pixel goes to the spare bin (CuPy's bincount of an empty array raised before 14.2)."""
    cm = ConfusionMatrix(4)
    cm.update(to_device(np.array([[0, 3], [9, -1]]), device), to_device(np.full((2, 2), 255, np.uint8), device))
    assert cm.matrix.shape == (4, 4) and cm.matrix.sum() == 0
    cm.update(to_device(np.zeros((0, 5), np.int64), device), to_device(np.zeros((0, 5), np.int64), device))
    assert cm.matrix.sum() == 0
    pred, label = pixels_from(MATRIX)
    cm = ConfusionMatrix(3)
    cm.update(to_device(np.full(5, 2), device), to_device(np.full(5, 255), device))
    cm.update(to_device(pred, device), to_device(label, device))
    np.testing.assert_array_equal(cm.matrix, MATRIX)  # the spare bin never leaks into the matrix


def test_count_bins(device):
    index = to_device(np.array([0, 3, 3, 9, 0, 3]), device)
    np.testing.assert_array_equal(np.asarray(to_device(count_bins(index, 10), "cpu")), [2, 0, 0, 3, 0, 0, 0, 0, 0, 1])


def test_absent_class_is_nan_and_skipped_in_means():
    # 4 classes; class 3 never in truth nor prediction; class 2 predicted but never true
    matrix = np.array([[2, 0, 1, 0],
                       [0, 1, 0, 0],
                       [0, 0, 0, 0],
                       [0, 0, 0, 0]])
    cm = ConfusionMatrix(4)
    cm.update(*pixels_from(matrix))
    s = cm.scores()
    assert math.isnan(s["per_class_iu"][3]) and math.isnan(s["per_class_acc"][3])
    assert s["per_class_iu"][2] == 0.0 and math.isnan(s["per_class_acc"][2])
    # IU: 2/3, 1, 0 (class 3 skipped) -> (2/3 + 1 + 0) / 3; acc: 2/3, 1 -> (2/3 + 1) / 2
    assert s["mean_iu"] == pytest.approx(float((F(2, 3) + 1 + 0) / 3))
    assert s["mean_acc"] == pytest.approx(float((F(2, 3) + 1) / 2))
    assert s["fwiu"] == pytest.approx(float(F(3, 4) * F(2, 3) + F(1, 4) * 1))
    assert s["pixel_acc"] == pytest.approx(3 / 4)


def test_empty_matrix_all_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = ConfusionMatrix(3).scores()
    for key in ("pixel_acc", "mean_acc", "mean_iu", "fwiu"):
        assert math.isnan(s[key]), key
    assert all(math.isnan(v) for v in s["per_class_iu"])


def test_out_of_range_and_bad_inputs(device):
    cm = ConfusionMatrix(3)

    def on(*values):
        return to_device(np.array(values), device)

    with pytest.raises(ValueError, match="label value 3 is out of range for 3 classes"):
        cm.update(on(0, 1), on(0, 3))
    with pytest.raises(ValueError, match="label value -1"):
        cm.update(on(0, 1), on(0, -1))
    with pytest.raises(ValueError, match="prediction value 5 is out of range"):
        cm.update(on(5, 1), on(0, 1))
    with pytest.raises(ValueError, match="label value 7 is out of range"):  # a bad label is named before a bad prediction
        cm.update(on(1, 9, 0), on(1, 7, 255))
    with pytest.raises(ValueError, match="prediction value 9"):
        cm.update(on(1, 9, 4), on(1, 2, 255))
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 3), int), np.zeros((3, 2), int))
    with pytest.raises(ValueError, match="integer"):
        cm.update(np.zeros(3), np.zeros(3, int))
    assert cm.matrix.sum() == 0  # nothing counted by failed updates


def test_format_scores():
    cm = ConfusionMatrix(3)
    cm.update(*pixels_from(MATRIX))
    text = format_scores(cm.scores(), ["background", "disc", "box"])
    assert "mean IU 0.4167" in text and "pixel acc 0.6000" in text and "fw IU 0.4500" in text
    assert "disc" in text and "0.2500" in text
    assert len(text.splitlines()) == 2 + 3
    empty = format_scores(ConfusionMatrix(2).scores())
    assert "nan" not in empty.lower() and "-" in empty
