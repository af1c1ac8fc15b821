"""Segmenter end to end on real photos with the tiny preset and a custom vocabulary."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ebseg.build import build_ebseg
from ebseg.postprocess import bilinear_taps
from ebseg.predictor import Segmenter, resize_image, resized_shape
from ebseg.vocab import Vocabulary


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    vocab = Vocabulary(["person", "cup", "spaceship", "tree"])
    return Segmenter(build_ebseg("tiny"), vocab, short_side=160, device="cpu")


def test_custom_vocabulary_end_to_end(segmenter, photos):
    assert segmenter.vocabulary.seen == (True, True, False, True)
    preds = segmenter.predict(photos, return_probabilities=True)
    k = len(segmenter.vocabulary)
    for image, p in zip(photos, preds):
        h, w = image.shape[:2]
        assert p.label_map.shape == (h, w) and p.label_map.dtype == np.int32
        assert p.label_map.min() >= 0 and p.label_map.max() < k
        assert p.probabilities.shape == (k, h, w) and p.probabilities.dtype == np.float32
        np.testing.assert_array_equal(p.probabilities.argmax(0), p.label_map)
        assert p.areas.sum() == h * w
        np.testing.assert_array_equal(p.areas, np.bincount(p.label_map.ravel(), minlength=k))
        for c in np.flatnonzero(p.areas):
            expected = p.probabilities[c][p.label_map == c].mean()
            assert p.scores[c] == pytest.approx(expected, rel=1e-4)
        assert np.all(p.scores[p.areas == 0] == 0)


def test_result_does_not_depend_on_batch_neighbours(segmenter, photos):
    alone = segmenter.predict([photos[0]], return_probabilities=True)[0]
    # astronaut (512x512) and a copy of itself flipped share a padded size, so they share a batch.
    together = segmenter.predict([photos[2], photos[0][:, ::-1].copy(), photos[0]], return_probabilities=True)
    np.testing.assert_array_equal(alone.label_map, together[2].label_map)
    np.testing.assert_allclose(alone.probabilities, together[2].probabilities, rtol=1e-5, atol=1e-6)


def test_pre_resized_input_gives_the_original_result(segmenter, photos):
    """A decode stage may resize before the model; with output_sizes the result is the original's."""
    original = photos[1]  # coffee, 400x600
    h, w = original.shape[:2]
    small = resize_image(original, segmenter.input_shape(h, w))
    assert small.shape[:2] == (160, 240)
    direct = segmenter.predict([original], return_probabilities=True)[0]
    via_small = segmenter.predict([small], output_sizes=[(h, w)], return_probabilities=True)[0]
    assert via_small.label_map.shape == (h, w)
    np.testing.assert_array_equal(direct.label_map, via_small.label_map)
    np.testing.assert_array_equal(direct.probabilities, via_small.probabilities)
    with pytest.raises(ValueError, match="2 output sizes for 1 images"):
        segmenter.predict([small], output_sizes=[(h, w), (h, w)])


def test_text_embeddings_are_cached_per_vocabulary(segmenter):
    first = segmenter.class_embeddings()
    assert segmenter.class_embeddings() is first
    before = segmenter.vocabulary
    segmenter.vocabulary = ["cat", "dog"]
    try:
        assert segmenter.class_embeddings().shape[0] == 2
    finally:
        segmenter.vocabulary = before
    assert segmenter.class_embeddings() is first


BAD_IMAGES = [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3), np.float32), [1]]


@pytest.mark.parametrize("bad", BAD_IMAGES)
def test_bad_images_are_rejected(segmenter, bad):
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        segmenter.predict([bad])


def test_resize_rule_matches_detectron2():
    assert resized_shape(480, 640, 640, 2560) == (640, 853)
    assert resized_shape(100, 4000, 640, 2560) == (64, 2560)  # long side capped
    assert resized_shape(640, 640, 640, 2560) == (640, 640)


@pytest.mark.parametrize("n_in,n_out", [(80, 320), (37, 211), (211, 37), (50, 50)])
def test_band_resize_taps_match_interpolate(n_in, n_out):
    """The band-wise resize to the original size reproduces F.interpolate(bilinear, align_corners=False)."""
    x = torch.randn(3, n_in, 17)
    lo, hi, w_lo, w_hi = bilinear_taps(n_in, n_out, x.device)
    ours = x[:, lo] * w_lo[:, None] + x[:, hi] * w_hi[:, None]
    ref = F.interpolate(x[None], size=(n_out, 17), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_runs_and_returns_float32(photos):
    """Autocast (bf16 on GPU in production) must not break any stage; CPU autocast exercises the same
    casts. Outputs are float32 whatever the compute dtype."""
    torch.manual_seed(0)
    seg = Segmenter(
        build_ebseg("tiny"), ["person", "sky"], short_side=96, device="cpu", amp_dtype=torch.bfloat16
    )
    [p] = seg.predict([photos[0]], return_probabilities=True)
    assert p.label_map.shape == photos[0].shape[:2]
    assert p.probabilities.dtype == np.float32 and np.isfinite(p.probabilities).all()
