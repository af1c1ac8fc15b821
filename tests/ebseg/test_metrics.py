"""Confusion-matrix metrics on hand-made maps whose IoUs are worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ebseg.metrics import SegmentationMetric, confusion_matrix, harmonic_mean


def maps():
    """4x4 maps, 4 classes, one ignored pixel.

    label:      pred:
    0 0 1 1     0 0 1 1
    0 0 1 1     0 1 1 1
    2 2 1 -1    2 3 1 0
    2 2 1 1     2 3 1 1
    Class 0: gt 4, pred 4 (one on the ignored pixel, not counted), tp 3 -> IoU 3 / (4 + 3 - 3) = 3/4.
    Class 1: gt 7, pred 8, tp 7 -> 7/8. Class 2: gt 4, pred 2, tp 2 -> 2/4. Class 3: no ground truth.
    """
    label = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 1, -1], [2, 2, 1, 1]], dtype=np.int32)
    pred = np.array([[0, 0, 1, 1], [0, 1, 1, 1], [2, 3, 1, 0], [2, 3, 1, 1]], dtype=np.int32)
    return pred, label


def test_ious_accuracies_and_means_by_hand():
    pred, label = maps()
    metric = SegmentationMetric(4)
    metric.update(pred, label)
    r = metric.compute()
    assert r["per_class_iou"][:3] == pytest.approx([3 / 4, 7 / 8, 2 / 4])
    assert math.isnan(r["per_class_iou"][3])  # predicted but absent from the labels: no IoU, not in the mean
    assert r["mIoU"] == pytest.approx((3 / 4 + 7 / 8 + 2 / 4) / 3)
    assert r["per_class_accuracy"][:3] == pytest.approx([3 / 4, 7 / 7, 2 / 4])
    assert r["mean_accuracy"] == pytest.approx((3 / 4 + 1 + 2 / 4) / 3)
    assert r["pixel_accuracy"] == pytest.approx(12 / 15)
    assert r["fwIoU"] == pytest.approx((4 * 3 / 4 + 7 * 7 / 8 + 4 * 2 / 4) / 15)
    assert r["gt_pixels"] == [4, 7, 4, 0] and r["pred_pixels"] == [3, 8, 2, 2]
    assert r["pixels"] == 15 and r["images"] == 1 and r["classes_evaluated"] == 3


def test_confusion_rows_are_ground_truth_and_ignore_is_skipped():
    pred, label = maps()
    conf = confusion_matrix(pred, label, 4)
    assert conf.sum() == 15
    assert conf[0].tolist() == [3, 1, 0, 0]  # one class-0 pixel predicted as 1
    assert conf[2].tolist() == [0, 0, 2, 2]
    assert conf[:, 3].sum() == 2


def test_accumulation_equals_one_big_image_and_torch_inputs_work():
    rng = np.random.default_rng(0)
    a = SegmentationMetric(5)
    b = SegmentationMetric(5)
    preds = [rng.integers(0, 5, (8, 9)) for _ in range(3)]
    labels = [rng.integers(-1, 5, (8, 9)) for _ in range(3)]
    for p, lab in zip(preds, labels):
        a.update(torch.from_numpy(p), torch.from_numpy(lab))
    b.update(np.concatenate(preds), np.concatenate(labels))
    assert np.array_equal(a.confusion, b.confusion)
    merged = SegmentationMetric(5)
    merged.merge(a)
    merged.add_confusion(b.confusion, images=1)
    assert np.array_equal(merged.confusion, 2 * b.confusion) and merged.images == 4


def test_seen_unseen_split_and_harmonic_mean():
    pred, label = maps()
    metric = SegmentationMetric(4)
    metric.update(pred, label)
    r = metric.compute(seen=[True, True, False, False])
    assert r["seen_mIoU"] == pytest.approx((3 / 4 + 7 / 8) / 2)
    assert r["unseen_mIoU"] == pytest.approx(2 / 4)  # class 3 has no ground truth: left out
    s, u = (3 / 4 + 7 / 8) / 2, 1 / 2
    assert r["hIoU"] == pytest.approx(2 * s * u / (s + u))
    r = metric.compute(seen=[True, True, True, False])
    assert math.isnan(r["unseen_mIoU"]) and math.isnan(r["hIoU"])
    assert harmonic_mean(0.0, 0.0) == 0.0


def test_perfect_and_empty():
    label = np.array([[1, 1], [0, -1]])
    metric = SegmentationMetric(3)
    metric.update(label.clip(0), label)
    r = metric.compute()
    assert r["mIoU"] == 1.0 and r["pixel_accuracy"] == 1.0 and math.isnan(r["per_class_iou"][2])
    empty = SegmentationMetric(3).compute()
    assert math.isnan(empty["mIoU"]) and math.isnan(empty["pixel_accuracy"]) and empty["pixels"] == 0


def test_bad_inputs_are_named():
    metric = SegmentationMetric(3)
    with pytest.raises(ValueError, match="same shape"):
        metric.update(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="label holds class id 5"):
        metric.update(np.zeros((2, 2), int), np.full((2, 2), 5))
    with pytest.raises(ValueError, match="pred holds class id -1"):
        metric.update(np.full((2, 2), -1), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="integer"):
        metric.update(np.zeros((2, 2)), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="3 flags"):
        metric.compute(seen=[True])
