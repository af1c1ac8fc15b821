"""Periodic validation during training: mIoU of the current weights on held-out pairs, on one worker."""

from __future__ import annotations

import numpy as np
import torch

from ebseg.metrics import SegmentationMetric
from ebseg.predictor import Segmenter
from ebseg.vocab import Vocabulary
from pipeline.pairs import iter_pairs


class Validator:
    """Holds the held-out pairs (read once, at the first evaluation) and scores a model on them with the
    inference path users get (``Segmenter``: resize to the model's ``short_side``, balancing, full-size
    label maps). ``job.val_images`` caps how many pairs are used."""

    def __init__(self, job, vocabulary: Vocabulary, device: torch.device, amp_dtype: torch.dtype | None):
        self.job = job
        self.vocabulary = vocabulary
        self.device = device
        self.amp_dtype = amp_dtype
        self._pairs: list[tuple[np.ndarray, np.ndarray]] | None = None

    def pairs(self) -> list[tuple[np.ndarray, np.ndarray]]:
        if self._pairs is None:
            pairs = []
            for _, image, label in iter_pairs(self.job.val_data, storage_options=self.job.storage_options):
                pairs.append((image, label))
                if self.job.val_images is not None and len(pairs) >= self.job.val_images:
                    break
            self._pairs = pairs
        return self._pairs

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, *, batch_size: int = 4) -> dict[str, float]:
        """{"val_miou": float, "val_iou/<class>": float per class present, "val_pixel_acc": float}; leaves the
        model in eval mode (the caller switches back)."""
        segmenter = Segmenter(
            model, self.vocabulary, batch_size=batch_size, device=self.device, amp_dtype=self.amp_dtype
        )
        metric = SegmentationMetric(len(self.vocabulary))
        pairs = self.pairs()
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            for (_, label), prediction in zip(chunk, segmenter.predict([image for image, _ in chunk])):
                metric.update(prediction.label_map, label)
        result = metric.compute()
        out = {"val_miou": float(result["mIoU"]), "val_pixel_acc": float(result["pixel_accuracy"])}
        for name, iou in zip(self.vocabulary.names, result["per_class_iou"]):
            if iou is not None and not np.isnan(iou):
                out[f"val_iou/{name}"] = float(iou)
        return out
