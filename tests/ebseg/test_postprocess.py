"""Semantic inference that computes only the classes that can win gives the full computation's results.

The reference below is the straightforward computation (every class, every pixel), kept here and not in
the package. Inputs are real model outputs: EBSeg-B's on the parity images (from the reference file, no
forward pass) and the tiny and demo models' on real photos at K=150 and K=847.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ebseg import postprocess
from ebseg.balance import balance_class_probs, class_weights
from ebseg.config import get_config
from ebseg.postprocess import bilinear_taps, semantic_labels, semantic_probabilities
from ebseg.predictor import Segmenter
from ebseg.vocab import Vocabulary
from ebseg.zoo import load_model


def reference_labels(weights: torch.Tensor, masks: torch.Tensor, size: tuple[int, int]):
    """Every class at every pixel, 32 rows at a time: (label map, scores, areas)."""
    height, width = size
    rows, cols = bilinear_taps(masks.shape[1], height, "cpu"), bilinear_taps(masks.shape[2], width, "cpu")
    labels = torch.empty(height, width, dtype=torch.long)
    score_sum = torch.zeros(weights.shape[1], dtype=torch.float64)
    for r0 in range(0, height, 32):
        if tuple(masks.shape[1:]) == size:
            band = masks[:, r0 : r0 + 32]
        else:
            lo, hi, w_lo, w_hi = (t[r0 : r0 + 32] for t in rows)
            band = masks[:, lo] * w_lo[:, None] + masks[:, hi] * w_hi[:, None]
            band = band[:, :, cols[0]] * cols[2] + band[:, :, cols[1]] * cols[3]
        top, arg = torch.einsum("qk,qhw->khw", weights, band.sigmoid()).max(dim=0)
        labels[r0 : r0 + 32] = arg
        score_sum.index_add_(0, arg.flatten(), top.flatten().double())
    areas = torch.bincount(labels.flatten(), minlength=weights.shape[1])
    return labels.numpy(), (score_sum / areas.clamp(min=1)).float().numpy(), areas.numpy()


def assert_same_result(weights, masks, size):
    labels, scores, areas = semantic_labels(weights, masks, size)
    ref_labels, ref_scores, ref_areas = reference_labels(weights, masks, size)
    np.testing.assert_array_equal(labels.numpy(), ref_labels)
    np.testing.assert_array_equal(areas.numpy(), ref_areas)
    # Scores are sums in float64 over pixels taken in another order: equal to float32 rounding.
    np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=1e-6, atol=0)
    return labels


# ----------------------------------------------------------------------------- EBSeg-B on the parity images


def parity_inputs(reference: dict, balance) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weights [Q, K], masks [Q, H, W] logits at the image size) per image, as ``Segmenter`` makes them."""
    probs = balance_class_probs(
        reference["mask_logits"], reference["mask_logits_clip"], reference["pooled_logits"],
        reference["dataset_overlap_map"], balance,
    )  # fmt: skip
    size = tuple(reference["images"].shape[1:3])
    masks = torch.nn.functional.interpolate(reference["pred_masks"], size=size, mode="bilinear")
    return list(zip(class_weights(probs), masks))


@pytest.fixture(scope="module")
def reference(reference_dir):
    return torch.load(reference_dir / "reference_outputs_b.pt", weights_only=True)


@pytest.mark.parametrize(
    ("run_name", "size"),
    [
        ("voc", None),
        ("pcontext_standard", None),
        ("pcontext_stress_bias_scaling_400", None),
        ("voc", (203, 150)),
    ],
)
def test_parity_outputs_give_the_full_computation_labels(reference, run_name, size):
    """EBSeg-B's outputs (Q=100) on the parity images, at their size and resized to another one."""
    # The extra runs store class logits only; their masks are the voc run's (the same images and weights).
    outputs = reference if run_name == "voc" else {**reference, **reference["extra"][run_name]}
    for weights, masks in parity_inputs(outputs, get_config("base").balance):
        assert_same_result(weights, masks, size or tuple(masks.shape[1:]))


# ------------------------------------------------------------------------- tiny and demo on real photos


def model_outputs(spec: str, vocabulary: str, images: list[np.ndarray], monkeypatch):
    """The (weights, masks, size) ``Segmenter`` hands to its post-processing for each image (the model's
    input 128 px on its short side: the masks are upsampled to the photo's size)."""
    torch.manual_seed(0)
    model = load_model(spec)
    # One prompt template instead of the ensemble's 14: encoding ADE-847 fully costs ~15 s of CPU here.
    monkeypatch.setattr(model.text, "templates", model.text.templates[:1])
    segmenter = Segmenter(model, Vocabulary.from_benchmark(vocabulary), short_side=128, device="cpu")
    captured = []
    monkeypatch.setattr(
        segmenter.labeller,
        "_postprocess",
        lambda w, m, size, *_: captured.append((w, m.rows(0, m.shape[1]), size)),
    )
    segmenter.predict(images)
    return captured


@pytest.mark.parametrize("spec", ["tiny", "demo"])
@pytest.mark.parametrize("vocabulary", ["ade150", "ade847"])
def test_real_photos_give_the_full_computation_labels(spec, vocabulary, photos, monkeypatch):
    classes = set()
    images = [photos[0][::2, ::2].copy(), photos[1][::2, ::2].copy()]  # astronaut 256x256, coffee 200x300
    for weights, masks, size in model_outputs(spec, vocabulary, images, monkeypatch):
        classes |= set(np.unique(assert_same_result(weights, masks, size)).tolist())
    if spec == "demo":  # the random tiny model may give one class everywhere (it does at K=847)
        assert len(classes) > 1


def test_every_path_is_taken_and_exact(monkeypatch):
    """Tiles kept whole and split in four, fewer classes than MIN_CLASSES, the fallback for negative
    weights."""
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(12, 40, generator=g) ** 8  # peaked per query, as trained models are
    yy, xx = torch.meshgrid(torch.arange(70.0), torch.arange(90.0), indexing="ij")
    centres = torch.rand(12, 2, generator=g) * torch.tensor([70.0, 90.0])
    dist = ((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2).sqrt()
    masks = (20.0 - dist) * 0.8  # sharp discs: tiles on their edges keep many classes
    calls = {"split": 0}  # a half tile (16 px; edge tiles here are 6-26 px otherwise)
    original = postprocess._label_tile

    def spy(weights_, probs, labels, score_sum, rows, cols, keep):
        calls["split"] += postprocess.TILE // 2 in (rows.stop - rows.start, cols.stop - cols.start)
        original(weights_, probs, labels, score_sum, rows, cols, keep)

    monkeypatch.setattr(postprocess, "_label_tile", spy)
    monkeypatch.setattr(postprocess, "SPLIT_WORK", 10_000)
    assert_same_result(weights, masks, (140, 180))
    assert_same_result(weights, masks, (70, 90))
    assert calls["split"] > 0
    assert_same_result(weights[:, :3], masks, (50, 60))  # K below MIN_CLASSES: every class, every tile
    assert_same_result(weights - 0.01, masks, (35, 45))  # bounds do not hold: computed in full


def test_probabilities_path_agrees(photos, monkeypatch):
    [(weights, masks, size)] = model_outputs("demo", "ade150", photos[2:], monkeypatch)
    labels, scores, areas = semantic_labels(weights, masks, size)
    full_labels, full_scores, full_areas, probabilities = semantic_probabilities(weights, masks, size)
    assert probabilities.shape == (150, *size)
    np.testing.assert_array_equal(labels.numpy(), full_labels.numpy())
    np.testing.assert_array_equal(labels.numpy(), probabilities.argmax(0).numpy())
    np.testing.assert_array_equal(areas.numpy(), full_areas.numpy())
    np.testing.assert_allclose(scores.numpy(), full_scores.numpy(), rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 2])
def test_flat_class_weights_keep_few_classes(seed, monkeypatch):
    """Weights nearly equal across queries, classes apart by a little more (a random model's: its class
    weights span 0.005-0.011 and one class wins everywhere), masks of small contrast. Each class's own
    range over a tile then overlaps every other's (bounding classes one by one keeps all 150), yet
    the bound on differences to the tile's leader keeps few, and the labels stay the full computation's."""
    g = torch.Generator().manual_seed(seed)
    num_queries, num_classes, size = 30, 150, (96, 128)
    weights = 1 + 0.2 * torch.rand(num_queries, num_classes, generator=g)
    weights = (weights + 0.3 * torch.rand(num_classes, generator=g)) / num_classes
    coarse = torch.randn(num_queries, 6, 8, generator=g) - 1
    masks = torch.nn.functional.interpolate(coarse[None], size=size, mode="bilinear")[0]
    computed = {"class_pixels": 0}
    original = postprocess.semantic_sums

    def counting(weights_, probs):
        computed["class_pixels"] += weights_.shape[1] * probs.shape[1] * probs.shape[2]
        return original(weights_, probs)

    monkeypatch.setattr(postprocess, "semantic_sums", counting)
    labels = assert_same_result(weights, masks, size)
    assert len(np.unique(labels)) > 1
    assert computed["class_pixels"] < 0.25 * num_classes * size[0] * size[1]


@pytest.mark.parametrize(
    ("grid", "input_size"), [((40, 54), (160, 213)), ((8, 8), (29, 32)), ((3, 5), (9, 17))]
)
def test_grid_logits_upsample_bands_bit_for_bit(grid, input_size):
    """Bands upsampled with their halo alone equal rows of the whole grid upsampled x4 and cropped (the
    reference's order), wherever the band starts; labels from them equal labels from the whole tensor."""
    g = torch.Generator().manual_seed(sum(grid))
    logits = torch.randn(6, *grid, generator=g) * 3
    whole = torch.nn.functional.interpolate(
        logits[None], size=(4 * grid[0], 4 * grid[1]), mode="bilinear", align_corners=False
    )[0][:, : input_size[0], : input_size[1]]
    source = postprocess.GridLogits(logits, input_size)
    assert source.shape == (6, *input_size)
    for r0 in range(0, input_size[0], 5):
        for r1 in {min(r0 + n, input_size[0]) for n in (1, 3, 7, 64)}:
            assert torch.equal(source.rows(r0, r1), whole[:, r0:r1]), (r0, r1)
    weights = torch.rand(6, 9, generator=g)
    for size in (input_size, (input_size[0] * 2 - 1, input_size[1] + 3), (7, 5)):
        for a, b in zip(semantic_labels(weights, source, size), semantic_labels(weights, whole, size)):
            assert torch.equal(a, b)
