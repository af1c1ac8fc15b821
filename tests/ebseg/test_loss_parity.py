"""Parity of the training objective with the original EBSeg-B.

``../shared/reference/reference_losses_b.pt`` holds the original's weighted loss terms and matcher
indices for the reference run's pseudo-random weights, two 320x320 photos in training mode, COCO-Stuff-171
classes and half/half synthetic targets. ``losses_all_pixels`` replaced every random point draw (matcher
and losses) by the 320x320 pixel centres; ``losses_random_points`` kept the random draws after
``torch.manual_seed(0)`` before the forward. The criterion draws its points in the reference's order and
shapes (final prediction first; per image a [1, P, 2] matching draw, then the importance sampling draws),
so seeding right before our criterion replays that run too (evidently the reference's training forward
draws no random numbers: the replay matches).

Tolerance: relative 1e-4 per term. The terms are float32 sums over up to 10^5 points after ~30 layers of
float32 arithmetic; the measured worst cases are 3.1e-6 (all pixels, loss_ce) and 1.3e-5 (random points,
loss_dice_3: there one mask's 9408th and 9409th most uncertain candidates differ by 1.1e-8 in |logit|, so
float32 rounding of the mask logits decides which of the two points is kept). The decoder's attention
masks threshold sigmoid(mask) at 0.5 with margins down to 1e-8 under these weights; a flip would move whole
queries and show up as a larger difference, which this tolerance does not excuse. Matcher indices must be
equal.
"""

from __future__ import annotations

import pytest
import torch

from ebseg.build import build_ebseg
from ebseg.checkpoint import convert_official_state_dict
from ebseg.losses import LossConfig, Targets, build_criterion, reference_name, text_affinity
from ebseg.vocab import Vocabulary
from tests.ebseg.reference_support import official_state

RTOL = 1e-4


@pytest.fixture(scope="module")
def reference(reference_dir):
    return torch.load(reference_dir / "reference_losses_b.pt", weights_only=True)


@pytest.fixture(scope="module")
def forward(reference_dir, reference):
    """The base preset with the reference weights, run in training mode on the two images."""
    model = build_ebseg("base")
    state = convert_official_state_dict(official_state(reference_dir, "b"))
    model.load_state_dict(state, strict=True)
    model.train()
    vocab = Vocabulary.from_benchmark("coco171")
    assert list(vocab.names) == reference["class_names"]
    class_embeddings = model.text.encode_names(vocab.names)
    with torch.no_grad():
        outputs = model(reference["images"].permute(0, 3, 1, 2), class_embeddings)
    return outputs, class_embeddings


def targets_from(label_maps: torch.Tensor) -> list[Targets]:
    """The reference's targets: one boolean mask per class present, classes ascending (no ignore here)."""
    targets = []
    for label in label_maps.long():
        classes = torch.unique(label)
        targets.append(Targets(classes, torch.stack([label == c for c in classes])))
    return targets


def compare(terms: dict[str, torch.Tensor], expected: dict[str, float]) -> None:
    ours = {reference_name(name): value.item() for name, value in terms.items()}
    assert set(ours) == set(expected), f"terms differ: {sorted(set(ours) ^ set(expected))}"
    off = {key: (ours[key], ref) for key, ref in expected.items() if abs(ours[key] - ref) > RTOL * abs(ref)}
    assert not off, f"terms off by more than {RTOL:.0e} relative (ours, reference): {off}"


def as_lists(indices) -> list[list[tuple[list[int], list[int]]]]:
    return [[(q.tolist(), t.tolist()) for q, t in layer] for layer in indices]


def test_weights_match_the_reference_weight_dict(reference):
    config = LossConfig()
    weights = reference["weight_dict"]
    assert weights["loss_ce"] == weights["1_loss_ce"] == config.ce_weight
    assert weights["loss_mask"] == config.mask_weight and weights["loss_dice"] == config.dice_weight
    assert weights["mse_ssc_loss_1"] == config.ssc_weight


def test_all_pixel_losses_and_matching_match_reference(forward, reference):
    assert "pixel centres" in reference["meta"]["note"]
    outputs, class_embeddings = forward
    criterion = build_criterion(LossConfig(points="all_pixels"))
    targets = targets_from(reference["targets_sem_seg"])
    result = criterion.compute(outputs, targets, text_affinity(class_embeddings))
    assert as_lists(result.indices) == [
        [(list(q), list(t)) for q, t in layer] for layer in reference["matcher_indices_all_pixels"]
    ]
    compare(result.terms, reference["losses_all_pixels"])


def test_random_point_losses_replay_the_reference_draws(forward, reference):
    outputs, class_embeddings = forward
    criterion = build_criterion("reference")
    targets = targets_from(reference["targets_sem_seg"])
    affinity = text_affinity(class_embeddings)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        result = criterion.compute(outputs, targets, affinity)
    finally:
        torch.random.set_rng_state(state)
    assert as_lists(result.indices) == [
        [(list(q), list(t)) for q, t in layer] for layer in reference["matcher_indices_random_points"]
    ]
    compare(result.terms, reference["losses_random_points"])
