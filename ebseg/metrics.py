"""Semantic segmentation metrics from a confusion matrix, with detectron2's ``SemSegEvaluator`` rules.

Pixels whose label is the ignore value are left out entirely (predictions there count nowhere). A class
with no ground-truth pixel has no IoU (NaN) and is left out of every mean, even when it was predicted;
its false positives still lower the IoU of the classes whose pixels they took. All values are fractions
in [0, 1] (the paper's tables print 100x these).

Open-vocabulary split: ``compute(seen=...)`` adds the mIoU over seen and over unseen classes (each over
the classes of that group that have ground truth) and their harmonic mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def _as_numpy(array: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold integer class ids, got dtype {array.dtype}")
    return array


def confusion_matrix(
    pred: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    num_classes: int,
    *,
    ignore_index: int = -1,
) -> np.ndarray:
    """[K, K] int64 pixel counts, rows = ground-truth class, columns = predicted class.

    pred, label: [H, W] integer class ids (numpy or torch); label pixels equal to ``ignore_index`` are
    skipped. Ids outside [0, K) raise ``ValueError`` (a prediction must never be "ignore").
    """
    pred = _as_numpy(pred, "pred")
    label = _as_numpy(label, "label")
    if pred.shape != label.shape:
        raise ValueError(f"pred {pred.shape} and label {label.shape} must have the same shape")
    valid = label != ignore_index
    gt = label[valid].astype(np.int64)
    pr = pred[valid].astype(np.int64)
    for name, ids in (("label", gt), ("pred", pr)):
        if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
            bad = ids[(ids < 0) | (ids >= num_classes)][0]
            raise ValueError(
                f"{name} holds class id {bad}, outside [0, {num_classes})"
                + (f" and not the ignore value {ignore_index}" if name == "label" else "")
            )
    counts = np.bincount(gt * num_classes + pr, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


class SegmentationMetric:
    """Accumulates a confusion matrix over images; :meth:`compute` turns it into metrics.

    ``confusion``: [K, K] int64, rows = ground truth, columns = prediction. Matrices from elsewhere (other
    workers, other batches) add in with :meth:`add_confusion` or :meth:`merge`.
    """

    def __init__(self, num_classes: int, ignore_index: int = -1):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.images = 0

    def update(self, pred: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor) -> None:
        """pred, label: [H, W] integer class ids of one image (label may hold ``ignore_index``)."""
        self.confusion += confusion_matrix(pred, label, self.num_classes, ignore_index=self.ignore_index)
        self.images += 1

    def add_confusion(self, confusion: np.ndarray, images: int = 0) -> None:
        confusion = np.asarray(confusion)
        if confusion.shape != self.confusion.shape:
            raise ValueError(f"confusion matrix {confusion.shape} does not match {self.confusion.shape}")
        self.confusion += confusion.astype(np.int64)
        self.images += images

    def merge(self, other: SegmentationMetric) -> None:
        self.add_confusion(other.confusion, other.images)

    def compute(self, seen: Sequence[bool] | None = None) -> dict:
        """Metrics of everything accumulated so far.

        Returns {"mIoU", "mean_accuracy", "pixel_accuracy", "fwIoU": float; "per_class_iou",
        "per_class_accuracy": [K] floats (NaN for classes without ground truth); "gt_pixels",
        "pred_pixels": [K] ints (predictions on ignored pixels excluded); "classes_evaluated", "pixels",
        "images": int}, and with ``seen`` ([K] bools): "seen_mIoU", "unseen_mIoU" and their harmonic mean
        "hIoU". An undefined mean (no class with ground truth in the group) is NaN.
        """
        conf = self.confusion.astype(np.float64)
        tp = np.diag(conf)
        gt_pixels = conf.sum(axis=1)
        pred_pixels = conf.sum(axis=0)
        has_gt = gt_pixels > 0
        union = gt_pixels + pred_pixels - tp
        iou = np.full(self.num_classes, np.nan)
        accuracy = np.full(self.num_classes, np.nan)
        iou[has_gt] = tp[has_gt] / union[has_gt]  # union >= gt pixels > 0
        accuracy[has_gt] = tp[has_gt] / gt_pixels[has_gt]
        total = gt_pixels.sum()
        result = {
            "mIoU": _nanmean(iou),
            "mean_accuracy": _nanmean(accuracy),
            "pixel_accuracy": float(tp.sum() / total) if total else math.nan,
            "fwIoU": float((iou[has_gt] * gt_pixels[has_gt]).sum() / total) if total else math.nan,
            "per_class_iou": iou.tolist(),
            "per_class_accuracy": accuracy.tolist(),
            "gt_pixels": [int(v) for v in self.confusion.sum(axis=1)],
            "pred_pixels": [int(v) for v in self.confusion.sum(axis=0)],
            "classes_evaluated": int(has_gt.sum()),
            "pixels": int(self.confusion.sum()),
            "images": self.images,
        }
        if seen is not None:
            flags = np.asarray(seen, dtype=bool)
            if flags.shape != (self.num_classes,):
                raise ValueError(f"seen must hold {self.num_classes} flags, got shape {flags.shape}")
            seen_miou, unseen_miou = _nanmean(iou[flags]), _nanmean(iou[~flags])
            result["seen_mIoU"] = seen_miou
            result["unseen_mIoU"] = unseen_miou
            result["hIoU"] = harmonic_mean(seen_miou, unseen_miou)
        return result


def harmonic_mean(a: float, b: float) -> float:
    """2ab / (a + b); NaN when either is NaN, 0 when both are 0."""
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)
