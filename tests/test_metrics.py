import pytest

from clf.metrics import compute


def test_against_hand_computation():
    # 3 classes, 8 images.
    labels = [0, 0, 0, 1, 1, 2, 2, 2]
    preds = [0, 0, 1, 1, 2, 2, 2, 0]
    m = compute(labels, preds, num_classes=3)
    # correct: positions 0, 1, 3, 5, 6 -> 5 of 8
    assert m.accuracy == pytest.approx(5 / 8)
    # precision = TP / predicted as class: class 0: 2/3, class 1: 1/2, class 2: 2/3
    assert m.precision == pytest.approx([2 / 3, 1 / 2, 2 / 3])
    # recall = TP / truly class: class 0: 2/3, class 1: 1/2, class 2: 2/3
    assert m.recall == pytest.approx([2 / 3, 1 / 2, 2 / 3])
    assert m.confusion == [[2, 1, 0], [0, 1, 1], [1, 0, 2]]
    assert m.count == 8


def test_asymmetric_precision_and_recall():
    labels = [0, 0, 0, 0, 1]
    preds = [0, 0, 1, 1, 1]
    m = compute(labels, preds, num_classes=2)
    assert m.precision == pytest.approx([1.0, 1 / 3])
    assert m.recall == pytest.approx([0.5, 1.0])
    assert m.accuracy == pytest.approx(3 / 5)


def test_class_never_predicted_has_zero_precision():
    m = compute([0, 1, 2], [0, 1, 1], num_classes=3)
    assert m.precision[2] == 0.0 and m.recall[2] == 0.0
    assert len(m.precision) == len(m.recall) == 3


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError):
        compute([0, 1], [0], num_classes=2)
