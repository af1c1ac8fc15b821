"""bf16 autocast (the labelling default on GPU) labels real photos as float32 does, to a stated tolerance.

Run on CPU with CPU autocast, which casts the same operators to bf16 as CUDA autocast does. The parts
that stay float32 under autocast: the pixel decoder and its deformable sampling, SAM's relative-position
terms (computed in float32, cast for the attention kernel), the attention softmax (accumulated in float32
inside the fused kernels) and the class balancing (the Segmenter upcasts the logits first).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data

from ebseg.data.shapes import shapes_vocabulary
from ebseg.predictor import Segmenter
from ebseg.zoo import load_model

# Measured with the demo model on these photos: 0.9987-0.9994 of pixels agree (2026-12-02).
MIN_AGREEMENT = 0.99


@pytest.fixture(scope="module")
def demo():
    return load_model("demo")


@pytest.mark.parametrize("photo", ["astronaut", "coffee"])
def test_bf16_autocast_agrees_with_fp32_on_photos(demo, photo):
    image = np.ascontiguousarray(getattr(data, photo)()[..., :3])
    vocabulary = shapes_vocabulary()
    fp32 = Segmenter(demo, vocabulary, device="cpu").predict([image])[0]
    bf16 = Segmenter(demo, vocabulary, device="cpu", amp_dtype=torch.bfloat16).predict([image])[0]
    assert len(np.unique(fp32.label_map)) > 1  # a photo that exercises more than one class
    assert (bf16.label_map == fp32.label_map).mean() >= MIN_AGREEMENT
