"""The shipped demo model labels held-out shapes images (a seed it was not trained on) well."""

from __future__ import annotations

import os

import torch

from ebseg.data.shapes import generate, shapes_vocabulary
from ebseg.metrics import SegmentationMetric
from ebseg.predictor import Segmenter
from ebseg.zoo import DEMO_WEIGHTS, load_model

HELD_OUT_SEED = 7  # the demo trained on seed 0 and was validated on seed 1


def test_demo_weights_are_small_and_label_held_out_shapes():
    assert os.path.getsize(DEMO_WEIGHTS) <= 20 * 2**20
    model = load_model("demo")
    assert model.config.name == "demo" and model.config.short_side == 128
    stored = torch.load(DEMO_WEIGHTS, weights_only=True, mmap=True)
    vocabulary = shapes_vocabulary()
    assert [c["name"] for c in stored["vocabulary"]["classes"]] == list(vocabulary.names)

    segmenter = Segmenter(model, vocabulary, device="cpu")
    metric = SegmentationMetric(len(vocabulary))
    pairs = [generate(index, seed=HELD_OUT_SEED, size=160) for index in range(3)]  # not the training size
    for (_, label), prediction in zip(pairs, segmenter.predict([image for image, _ in pairs])):
        assert prediction.label_map.shape == label.shape
        metric.update(prediction.label_map, label)
    result = metric.compute()
    assert result["pixel_accuracy"] > 0.8, result
    assert result["mIoU"] > 0.5, result
