"""The training objective on hand-made cases whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ebseg.build import build_ebseg
from ebseg.losses import (
    REFERENCE_NAMES,
    HungarianMatcher,
    LossConfig,
    Targets,
    build_criterion,
    pixel_centres,
    point_sample,
    reference_name,
    text_affinity,
    total_loss,
    uncertain_points,
    uniform_points,
)
from ebseg.model import EBSegOutput

K = 3  # classes; logits have K + 1 columns, background last
Q = 5
S = 16  # canvas side; predictions at the same resolution so that all-pixel sampling is exact
BIG = 30.0
ALL_PIXELS = LossConfig(points="all_pixels")


def halves() -> Targets:
    """Left half class 2, right half class 0 (labels ascending, as from a label map)."""
    left = torch.zeros(S, S, dtype=torch.bool)
    left[:, : S // 2] = True
    return Targets(torch.tensor([0, 2]), torch.stack([~left, left]))


def predictions(targets: Targets, query_of_target: dict[int, int], layers: int = 2) -> EBSegOutput:
    """Confident predictions: query q = query_of_target[t] predicts target t's mask and class; the other
    queries predict an empty mask and no-object. One image, ``layers`` identical predictions."""
    masks = torch.full((1, Q, S, S), -BIG)
    logits = torch.full((1, Q, K + 1), -BIG)
    logits[0, :, K] = BIG
    for t, q in query_of_target.items():
        masks[0, q] = torch.where(targets.masks[t], BIG, -BIG)
        logits[0, q] = -BIG
        logits[0, q, targets.labels[t]] = BIG
    emb = torch.randn(1, Q, 8, generator=torch.Generator().manual_seed(0))
    return EBSegOutput(
        pred_masks=[masks.clone().requires_grad_() for _ in range(layers)],
        logits_a=[logits.clone().requires_grad_() for _ in range(layers)],
        logits_b=[logits.clone().requires_grad_() for _ in range(layers)],
        embeddings_a=[emb.clone().requires_grad_() for _ in range(layers)],
    )


def random_outputs(batch: int, *, seed: int = 0, layers: int = 3, dim: int = 8) -> EBSegOutput:
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).requires_grad_()

    return EBSegOutput(
        pred_masks=[leaf(batch, Q, S // 4, S // 4, scale=3.0) for _ in range(layers)],
        logits_a=[leaf(batch, Q, K + 1) for _ in range(layers)],
        logits_b=[leaf(batch, Q, K + 1) for _ in range(layers)],
        embeddings_a=[leaf(batch, Q, dim) for _ in range(layers)],
    )


def manual_ce(logits: torch.Tensor, classes: torch.Tensor, no_object_weight: float) -> torch.Tensor:
    """Weighted-mean cross-entropy written out: sum_i w_i * nll_i / sum_i w_i."""
    nll = -logits.log_softmax(-1).gather(-1, classes[..., None])[..., 0]
    w = torch.where(classes == logits.shape[-1] - 1, no_object_weight, 1.0)
    return (w * nll).sum() / w.sum()


# --- matcher


def test_matcher_finds_the_obvious_permutation_and_a_swapped_pair():
    targets = halves()
    points = [pixel_centres(S, S)]
    matcher = HungarianMatcher()
    for assignment in ({0: 3, 1: 1}, {0: 1, 1: 3}, {0: 0, 1: 4}):
        out = predictions(targets, assignment)
        [(queries, target_ids)] = matcher(out.logits_a[-1], out.pred_masks[-1], [targets], points)
        assert queries.tolist() == sorted(assignment.values())  # queries ascending
        assert {int(q): int(t) for q, t in zip(queries, target_ids)} == {q: t for t, q in assignment.items()}


def test_matcher_cost_terms_follow_the_weights():
    targets = halves()
    out = predictions(targets, {0: 3, 1: 1})
    points = pixel_centres(S, S)
    only_class = HungarianMatcher(class_cost=1.0, mask_cost=0.0, dice_cost=0.0)
    cost = only_class.cost_matrix(out.logits_a[-1][0], out.pred_masks[-1][0], targets, points)
    expected = -out.logits_a[-1][0].softmax(-1)[:, targets.labels]
    torch.testing.assert_close(cost, expected.detach())
    only_dice = HungarianMatcher(class_cost=0.0, mask_cost=0.0, dice_cost=1.0)
    cost = only_dice.cost_matrix(out.logits_a[-1][0], out.pred_masks[-1][0], targets, points)
    assert cost[3, 0] < 1e-6 and cost[1, 1] < 1e-6  # perfect masks
    assert cost[3, 1] > 0.99  # disjoint halves: dice ~ 1 - 1 / (2 * 128 + 1)


def test_matcher_handles_an_image_without_targets():
    empty = Targets(torch.zeros(0, dtype=torch.long), torch.zeros(0, S, S, dtype=torch.bool))
    out = random_outputs(1)
    [(queries, target_ids)] = HungarianMatcher()(
        out.logits_a[-1], out.pred_masks[-1], [empty], [pixel_centres(S, S)]
    )
    assert queries.numel() == 0 and target_ids.numel() == 0


# --- criterion terms


def test_perfect_predictions_give_zero_mask_losses_and_small_ce():
    targets = halves()
    out = predictions(targets, {0: 3, 1: 1})
    result = build_criterion(ALL_PIXELS).compute(out, [targets])
    for name in ("loss_mask", "loss_dice", "loss_mask_0", "loss_dice_0"):
        assert result.terms[name].item() < 1e-6, name
    assert result.terms["loss_ce_a"].item() < 1e-6
    assert result.indices[-1][0][0].tolist() == [1, 3]


def test_term_names_are_complete_and_map_to_the_reference_keys():
    targets = halves()
    out = predictions(targets, {0: 3, 1: 1}, layers=10)
    affinity = text_affinity(torch.randn(K, 8))
    terms = build_criterion(ALL_PIXELS)(out, [targets], affinity)
    reference_keys = {
        f"{k}{s}"
        for k in ("loss_ce", "1_loss_ce", "loss_mask", "loss_dice")
        for s in ["", *(f"_{i}" for i in range(9))]
    } | {"mse_ssc_loss_1"}
    assert {reference_name(n) for n in terms} == reference_keys
    assert reference_name("loss_ce_b_3") == "1_loss_ce_3" and REFERENCE_NAMES["loss_ssc"] == "mse_ssc_loss_1"
    with pytest.raises(KeyError):
        reference_name("loss_ssc_2")


def test_ce_weights_no_object_and_ignores_nothing():
    targets = halves()
    out = random_outputs(1, layers=1)
    for weight in (0.1, 1.0, 0.0):
        cfg = ALL_PIXELS.replace(no_object_weight=weight, ce_weight=1.0)
        result = build_criterion(cfg).compute(out, [targets])
        classes = torch.full((1, Q), K)
        queries, target_ids = result.indices[-1][0]
        classes[0, queries] = targets.labels[target_ids]
        expected = manual_ce(out.logits_a[-1], classes, weight)
        torch.testing.assert_close(result.terms["loss_ce_a"], expected)
        if weight == 1.0:  # every query counts, none is ignored: the plain mean over all Q
            plain = -out.logits_a[-1].log_softmax(-1)[0, torch.arange(Q), classes[0]].mean()
            torch.testing.assert_close(result.terms["loss_ce_a"], plain)


def test_branch_b_reuses_branch_a_matching():
    targets = halves()
    out = predictions(targets, {0: 3, 1: 1}, layers=1)
    # Queries 0 and 4 repeat the perfect masks of 3 and 1, so only the class logits decide the matching:
    # A's say (3, 1), B's confidently say (0, 4). B's loss must still use A's assignment.
    masks = out.pred_masks[-1].detach().clone()
    masks[0, 0], masks[0, 4] = masks[0, 3], masks[0, 1]
    out.pred_masks[-1] = masks
    b = out.logits_b[-1].detach().clone()
    b[0] = torch.randn(Q, K + 1, generator=torch.Generator().manual_seed(1))
    b[0, 0, 0] = b[0, 4, 2] = BIG
    out.logits_b[-1] = b
    cfg = ALL_PIXELS.replace(ce_weight=1.0)
    result = build_criterion(cfg).compute(out, [targets])
    classes = torch.full((1, Q), K)
    classes[0, 3], classes[0, 1] = 0, 2
    assert result.indices[-1][0][0].tolist() == [1, 3]
    torch.testing.assert_close(result.terms["loss_ce_b"], manual_ce(b, classes, 0.1))
    assert result.terms["loss_ce_b"] > 1.0  # B is wrong about those queries


def test_mask_terms_match_hand_computation_and_scale_with_num_masks():
    targets = halves()
    out = random_outputs(1, layers=1)
    pred = F.interpolate(out.pred_masks[-1].detach(), size=(S, S), mode="nearest")
    out.pred_masks[-1] = pred
    cfg = ALL_PIXELS.replace(mask_weight=1.0, dice_weight=1.0)
    result = build_criterion(cfg).compute(out, [targets])
    queries, target_ids = result.indices[-1][0]
    logits = pred[0, queries].flatten(1)
    labels = targets.masks[target_ids].flatten(1).float()
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1).sum() / 2
    p = logits.sigmoid()
    dice = (1 - (2 * (p * labels).sum(1) + 1) / (p.sum(1) + labels.sum(1) + 1)).sum() / 2
    torch.testing.assert_close(result.terms["loss_mask"], bce)
    torch.testing.assert_close(result.terms["loss_dice"], dice)
    # The data-parallel normaliser overrides the batch count (2 masks here).
    scaled = build_criterion(cfg).compute(out, [targets], num_masks=8.0)
    torch.testing.assert_close(scaled.terms["loss_mask"], bce * 2 / 8)
    weighted = build_criterion(cfg.replace(mask_weight=5.0)).compute(out, [targets])
    torch.testing.assert_close(weighted.terms["loss_mask"], 5 * bce)


# --- SSC


def test_ssc_is_zero_when_embeddings_reproduce_the_text_affinity():
    targets = halves()
    out = predictions(targets, {0: 3, 1: 1}, layers=1)
    class_embeddings = F.normalize(torch.randn(K, 8, generator=torch.Generator().manual_seed(2)), dim=-1)
    emb = torch.randn(1, Q, 8)
    emb[0, 3] = class_embeddings[0]  # query 3 <-> class 0, query 1 <-> class 2
    emb[0, 1] = class_embeddings[2]
    out.embeddings_a[-1] = emb.requires_grad_()
    criterion = build_criterion(ALL_PIXELS)
    affinity = text_affinity(class_embeddings * 3.0)  # the affinity is of unit vectors
    assert criterion(out, [targets], affinity)["loss_ssc"].abs().item() < 1e-6
    # Twice as long embeddings: E E^T = 4 A on the matched pairs, so the MSE is mean((3 A)^2) * weight.
    out.embeddings_a[-1] = (2 * emb).detach().requires_grad_()
    ssc = criterion(out, [targets], affinity)["loss_ssc"]
    sub = affinity[[0, 2]][:, [0, 2]]
    torch.testing.assert_close(ssc, 10.0 * (3 * sub).pow(2).mean())
    ssc.backward()
    assert out.embeddings_a[-1].grad[0, [1, 3]].abs().sum() > 0
    assert out.embeddings_a[-1].grad[0, [0, 2, 4]].abs().sum() == 0  # unmatched queries are left alone


def test_text_affinity_is_a_detached_cosine_matrix():
    emb = torch.randn(4, 6, requires_grad=True)
    a = text_affinity(emb)
    assert not a.requires_grad and a.dtype == torch.float32
    torch.testing.assert_close(a.diagonal(), torch.ones(4))
    torch.testing.assert_close(a, F.cosine_similarity(emb[:, None], emb[None], dim=-1).detach())


# --- empty images, reproducibility, numerics


def test_an_image_without_targets_gives_finite_losses_and_a_working_backward():
    empty = Targets(torch.zeros(0, dtype=torch.long), torch.zeros(0, S, S, dtype=torch.bool))
    affinity = text_affinity(torch.randn(K, 8))
    criterion = build_criterion("tiny")
    out = random_outputs(2)
    # Same generator seed below: image 0's final-layer matching points are the first draw in both calls.
    terms = criterion(out, [halves(), empty], affinity, generator=torch.Generator().manual_seed(0))
    loss = total_loss(terms)
    assert torch.isfinite(loss) and terms["loss_ssc"] > 0  # the other image still has an SSC term
    # SSC is the mean over images with targets: the empty image neither adds nor dilutes.
    first = EBSegOutput(
        *[[t[:1] for t in part] for part in (out.pred_masks, out.logits_a, out.logits_b, out.embeddings_a)]
    )
    alone = criterion(first, [halves()], affinity, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(terms["loss_ssc"], alone["loss_ssc"])
    loss.backward()
    assert out.pred_masks[-1].grad[0].abs().sum() > 0
    # No targets anywhere: CE still trains towards no-object, mask terms and SSC are 0, backward works.
    out = random_outputs(2, seed=1)
    terms = criterion(out, [empty, empty], affinity)
    assert terms["loss_mask"] == 0 and terms["loss_dice"] == 0 and terms["loss_ssc"] == 0
    total_loss(terms).backward()
    assert out.logits_a[-1].grad.abs().sum() > 0


def test_tiny_model_trains_through_the_criterion():
    torch.manual_seed(0)
    model = build_ebseg("tiny").train()
    names = ["red square", "blue circle", "green triangle"]
    with torch.no_grad():
        class_embeddings = model.text.encode_names(names)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    label = torch.zeros(64, 64, dtype=torch.long)
    label[:, 32:] = 2
    targets = [
        Targets(torch.tensor([0, 2]), torch.stack([label == 0, label == 2])),
        Targets(torch.zeros(0, dtype=torch.long), torch.zeros(0, 64, 64, dtype=torch.bool)),
    ]
    out = model(images, class_embeddings)
    terms = build_criterion("tiny")(out, targets, text_affinity(class_embeddings))
    assert len(terms) == 4 * len(out.pred_masks) + 1
    total_loss(terms).backward()
    grads = [p.grad for p in model.decoder.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_fixed_points_make_random_mode_reproducible():
    out = random_outputs(2)
    targets = [halves(), halves()]
    criterion = build_criterion("tiny")

    def run(seed):
        terms = criterion(out, targets, generator=torch.Generator().manual_seed(seed))
        return torch.stack([terms[n] for n in sorted(terms)])

    torch.testing.assert_close(run(3), run(3), rtol=0, atol=0)
    assert not torch.equal(run(3), run(4))


def test_losses_are_float32_under_autocast():
    out32 = random_outputs(1)
    out16 = EBSegOutput(
        *[
            [t.detach().bfloat16() for t in part]
            for part in (out32.pred_masks, out32.logits_a, out32.logits_b, out32.embeddings_a)
        ]
    )
    back = EBSegOutput(
        *[
            [t.float() for t in part]
            for part in (out16.pred_masks, out16.logits_a, out16.logits_b, out16.embeddings_a)
        ]
    )
    affinity = text_affinity(torch.randn(K, 8))
    criterion = build_criterion("tiny")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = criterion(out16, [halves()], affinity, generator=torch.Generator().manual_seed(0))
    expected = criterion(back, [halves()], affinity, generator=torch.Generator().manual_seed(0))
    for name, value in terms.items():
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)


# --- point sampling


def test_pixel_centres_read_a_map_exactly():
    values = torch.randn(2, 6, 10)
    coords = pixel_centres(6, 10).expand(2, -1, -1)
    torch.testing.assert_close(point_sample(values, coords), values.flatten(1))


def test_uniform_points_follow_the_generator():
    a = uniform_points(2, 50, generator=torch.Generator().manual_seed(0))
    b = uniform_points(2, 50, generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 50, 2) and torch.equal(a, b) and a.min() >= 0 and a.max() <= 1


def test_importance_sampling_picks_uncertain_points():
    # Confident everywhere except a vertical band of zero logits in the middle (x in [0.375, 0.625)).
    logits = torch.full((1, 16, 16), 8.0)
    logits[:, :, 6:10] = 0.0
    g = torch.Generator().manual_seed(0)
    points = uncertain_points(logits, 400, oversample_ratio=3.0, importance_sample_ratio=0.75, generator=g)
    assert points.shape == (1, 400, 2)
    in_band = ((points[0, :, 0] > 0.34) & (points[0, :, 0] < 0.66)).float()
    # 300 chosen by uncertainty (the band, with its bilinear ramps, holds ~380 of the 1200 candidates),
    # then 100 uniform ones, of which ~32% fall in the band.
    assert in_band[:300].mean() > 0.9
    assert math.isclose(in_band[300:].mean().item(), 0.32, abs_tol=0.15)
    assert in_band.mean() > 0.6  # uniform sampling would give ~0.32


# --- errors


def test_bad_inputs_are_named():
    targets = halves()
    out = predictions(targets, {0: 3, 1: 1}, layers=2)
    criterion = build_criterion(ALL_PIXELS)
    eval_like = EBSegOutput(out.pred_masks, out.logits_a, out.logits_b[-1:], out.embeddings_a)
    with pytest.raises(ValueError, match="training-mode"):
        criterion(eval_like, [targets])
    with pytest.raises(ValueError, match="labels must lie"):
        criterion(out, [Targets(torch.tensor([0, K]), targets.masks)])
    with pytest.raises(ValueError, match="2 targets for a batch of 1"):
        criterion(out, [targets, targets])
    with pytest.raises(ValueError, match="pair up"):
        Targets(torch.tensor([0]), targets.masks)
    with pytest.raises(ValueError, match="unknown loss preset"):
        build_criterion("huge")
    with pytest.raises(ValueError, match="points"):
        LossConfig(points="some")
