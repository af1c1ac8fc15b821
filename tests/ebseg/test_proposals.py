"""Proposals: stored vocabulary-free outputs give any vocabulary's labels, exactly (float32) or nearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ebseg.build import build_ebseg
from ebseg.data.shapes import generate, shapes_vocabulary
from ebseg.predictor import Segmenter
from ebseg.proposals import (
    DEFAULT_ENCODING,
    LOSSLESS_ENCODING,
    Proposals,
    decode_embeddings,
    decode_masks,
    encode_embeddings,
    encode_masks,
)
from ebseg.vocab import Vocabulary
from ebseg.zoo import load_model


def _roundtrip(proposals: list[Proposals], masks: str, embeddings: str) -> list[Proposals]:
    return [
        Proposals(
            masks=decode_masks(encode_masks(p.masks, masks), masks),
            embeddings=decode_embeddings(encode_embeddings(p.embeddings, embeddings), embeddings),
            input_size=p.input_size,
        )
        for p in proposals
    ]


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a == b).mean())


@pytest.fixture(scope="module")
def demo_shapes():
    """The demo model, shapes images, and proposals stored while labelling with only three classes."""
    names = list(shapes_vocabulary().names)
    segmenter = Segmenter(load_model("demo"), names[:3], device="cpu")
    images = [generate(index, seed=7, size=(150, 190))[0] for index in range(4)]
    proposals = segmenter.propose(images)
    return segmenter, images, proposals, names


def test_relabelling_stored_proposals_equals_a_fresh_run(demo_shapes):
    segmenter, images, proposals, names = demo_shapes
    sizes = [im.shape[:2] for im in images]
    segmenter.vocabulary = names  # the full list, after the run that stored the proposals
    fresh = segmenter.predict(images)
    lossless = segmenter.label(_roundtrip(proposals, *LOSSLESS_ENCODING), sizes)
    for a, b in zip(fresh, lossless):
        np.testing.assert_array_equal(a.label_map, b.label_map)
        np.testing.assert_array_equal(a.scores, b.scores)
    # The left-out classes are found: the full vocabulary labels shapes the three-class run could not.
    assert any(np.any(p.label_map >= 3) for p in lossless)


def test_compact_encoding_agrees_with_a_fresh_run(demo_shapes, photos):
    segmenter, images, proposals, names = demo_shapes
    segmenter.vocabulary = names
    fresh = segmenter.predict(images)
    compact = segmenter.label(_roundtrip(proposals, *DEFAULT_ENCODING), [im.shape[:2] for im in images])
    for a, b in zip(fresh, compact):
        assert _agreement(a.label_map, b.label_map) >= 0.999

    torch.manual_seed(0)
    tiny = Segmenter(build_ebseg("tiny"), ["tree", "sky"], short_side=160, device="cpu")
    photos = photos[:3]
    stored = tiny.propose(photos)
    tiny.vocabulary = Vocabulary(["person", "cup", "spaceship", "tree", "grass"])
    fresh = tiny.predict(photos)
    sizes = [im.shape[:2] for im in photos]
    exact = tiny.label(_roundtrip(stored, *LOSSLESS_ENCODING), sizes)
    for a, b in zip(fresh, exact):
        np.testing.assert_array_equal(a.label_map, b.label_map)


def test_uint8_masks_keep_the_sigmoid_within_half_a_level():
    logits = torch.linspace(-30, 30, 2001).reshape(1, 1, -1)
    encoded = encode_masks(logits, "uint8")
    assert encoded.dtype == np.uint8 and encoded.shape == (1, 1, 2001)
    decoded = decode_masks(encoded, "uint8")
    assert torch.isfinite(decoded).all()
    assert (decoded.sigmoid() - logits.sigmoid()).abs().max() <= 1 / 512 + 1e-6


def test_float8_masks_keep_the_sign_and_a_sixteenth():
    logits = torch.linspace(-500, 500, 4001).reshape(1, 1, -1)
    encoded = encode_masks(logits, "float8")
    assert encoded.dtype == np.uint8
    decoded = decode_masks(encoded, "float8")
    assert torch.equal(decoded.sign(), logits.sign())
    inside = logits.abs() <= 448
    assert ((decoded - logits).abs() <= logits.abs() / 16 + 1e-3)[inside].all()


def test_unknown_encoding_is_refused():
    with pytest.raises(ValueError, match="unknown mask encoding 'int4'"):
        encode_masks(torch.zeros(1, 2, 2), "int4")
    with pytest.raises(ValueError, match="unknown embedding encoding 'uint8'"):
        encode_embeddings(torch.zeros(3, 1, 4), "uint8")
