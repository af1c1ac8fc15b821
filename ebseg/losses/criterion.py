"""EBSeg's training objective: matching, cross-entropy on branches A and B, point-sampled mask BCE and
dice on every decoder prediction (deep supervision), and SSC on the last one.

Term names (weighted values; aux predictions carry the suffix ``_<i>``, i = 0 for the prediction
before the first decoder layer, and the final prediction has no suffix):

    loss_ce_a   cross-entropy of branch A (decoder embeddings)        reference key ``loss_ce``
    loss_ce_b   cross-entropy of branch B (CLIP recognition head)     reference key ``1_loss_ce``
    loss_mask   point-sampled sigmoid BCE of the matched masks        reference key ``loss_mask``
    loss_dice   point-sampled dice of the matched masks               reference key ``loss_dice``
    loss_ssc    semantic structure consistency (final layer only)     reference key ``mse_ssc_loss_1``

:func:`reference_name` maps one to the other. Normalisation: the mask terms are summed over matched
masks and divided by ``num_masks``, the batch's target count clamped to >= 1. Under data parallelism the
reference uses the count averaged over workers (all-reduced sum / world size); the trainer passes that
as ``num_masks=`` (see :func:`count_masks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ebseg.losses.config import PRESETS, LossConfig
from ebseg.losses.matcher import HungarianMatcher, Indices
from ebseg.losses.points import pixel_centres, point_sample, uncertain_points, uniform_points
from ebseg.losses.ssc import ssc_loss
from ebseg.losses.targets import Targets, count_masks
from ebseg.model import EBSegOutput

REFERENCE_NAMES = {
    "loss_ce_a": "loss_ce",
    "loss_ce_b": "1_loss_ce",
    "loss_mask": "loss_mask",
    "loss_dice": "loss_dice",
    "loss_ssc": "mse_ssc_loss_1",
}


def reference_name(name: str) -> str:
    """Our term name -> the reference's loss key (``loss_ce_b_3`` -> ``1_loss_ce_3``)."""
    if name in REFERENCE_NAMES:
        return REFERENCE_NAMES[name]
    base, _, layer = name.rpartition("_")
    if base in REFERENCE_NAMES and layer.isdigit() and base != "loss_ssc":
        return f"{REFERENCE_NAMES[base]}_{layer}"
    raise KeyError(f"not a loss term name: {name!r}")


@dataclass(frozen=True)
class LossResult:
    """terms: weighted scalar float32 losses by name; indices: the matching of every prediction, in the
    order of ``EBSegOutput.pred_masks`` (the last entry is the final prediction's)."""

    terms: dict[str, torch.Tensor]
    indices: list[Indices]


def class_loss(logits: torch.Tensor, targets: Sequence[Targets], indices: Indices, weight: torch.Tensor):
    """logits [B, Q, K + 1]: matched queries learn their target's class, all others the no-object class K;
    weighted-mean cross-entropy (``weight`` [K + 1])."""
    num_classes = logits.shape[-1] - 1
    classes = torch.full(logits.shape[:2], num_classes, dtype=torch.int64, device=logits.device)
    for b, (queries, target_ids) in enumerate(indices):
        classes[b, queries.to(logits.device)] = targets[b].labels[target_ids.to(logits.device)]
    return F.cross_entropy(logits.transpose(1, 2), classes, weight)


def dice_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[M, P] logits and labels -> [M] dice loss with +1 smoothing."""
    probs = logits.sigmoid()
    numerator = 2 * (probs * labels).sum(-1)
    denominator = probs.sum(-1) + labels.sum(-1)
    return 1 - (numerator + 1) / (denominator + 1)


class Criterion:
    """Callable training objective; see the module docstring for the terms."""

    def __init__(self, config: LossConfig):
        self.config = config
        self.matcher = HungarianMatcher(config.class_cost, config.mask_cost, config.dice_cost)

    def __call__(
        self,
        outputs: EBSegOutput,
        targets: Sequence[Targets],
        text_affinity: torch.Tensor | None = None,
        *,
        num_masks: float | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Weighted terms; see :meth:`compute`."""
        return self.compute(outputs, targets, text_affinity, num_masks=num_masks, generator=generator).terms

    def compute(
        self,
        outputs: EBSegOutput,
        targets: Sequence[Targets],
        text_affinity: torch.Tensor | None = None,
        *,
        num_masks: float | None = None,
        generator: torch.Generator | None = None,
    ) -> LossResult:
        """outputs: a training-mode forward (every prediction has A and B logits); targets: one per image,
        masks over the padded input canvas; text_affinity: [K, K] from :func:`text_affinity` over the
        training vocabulary, or None to leave out SSC; num_masks: the normaliser (default: this batch's
        target count; pass the count averaged over data-parallel workers); generator: fixes the random
        points (random mode). All arithmetic is float32, also under autocast.
        """
        masks_last = outputs.pred_masks[-1]
        self._check(outputs, targets)
        device = masks_last.device
        targets = [t.to(device) for t in targets]
        norm = float(max(count_masks(targets) if num_masks is None else num_masks, 1.0))
        num_layers = len(outputs.pred_masks)
        terms: dict[str, torch.Tensor] = {}
        indices: list[Indices | None] = [None] * num_layers
        with torch.autocast(device_type=device.type, enabled=False):
            # Final prediction first, then the aux ones: the reference's order of random draws.
            for layer in [num_layers - 1, *range(num_layers - 1)]:
                suffix = "" if layer == num_layers - 1 else f"_{layer}"
                layer_terms, indices[layer] = self._layer_terms(outputs, layer, targets, norm, generator)
                terms.update({name + suffix: value for name, value in layer_terms.items()})
            if text_affinity is not None and self.config.ssc_weight != 0:
                labels = [t.labels for t in targets]
                ssc = ssc_loss(outputs.embeddings_a[-1], labels, indices[-1], text_affinity)
                terms["loss_ssc"] = self.config.ssc_weight * ssc
        return LossResult(terms, indices)

    def _check(self, outputs: EBSegOutput, targets: Sequence[Targets]) -> None:
        n = len(outputs.pred_masks)
        if len(outputs.logits_a) != n or len(outputs.logits_b) != n:
            raise ValueError(
                f"outputs have {n} mask predictions, {len(outputs.logits_a)} A and {len(outputs.logits_b)} B "
                "logits; the losses need a training-mode forward (model.train())"
            )
        batch, _, h, w = outputs.pred_masks[-1].shape
        if len(targets) != batch:
            raise ValueError(f"{len(targets)} targets for a batch of {batch} images")
        num_classes = outputs.logits_a[-1].shape[-1] - 1
        sizes = {tuple(t.masks.shape[-2:]) for t in targets}
        if len(sizes) > 1:
            raise ValueError(f"target masks must share the batch's padded canvas, got sizes {sorted(sizes)}")
        for i, t in enumerate(targets):
            if len(t) and (t.labels.min() < 0 or t.labels.max() >= num_classes):
                got = t.labels.tolist()
                raise ValueError(f"targets[{i}].labels must lie in [0, {num_classes}), got {got}")
            th, tw = t.masks.shape[-2:]
            if th * w != tw * h:
                raise ValueError(f"targets[{i}].masks {th}x{tw} do not cover the predictions' {h}x{w} canvas")

    def _points(self, count: int, canvas: tuple[int, int], device, generator) -> list[torch.Tensor]:
        """Matching points per image: [P, 2] each."""
        if self.config.points == "all_pixels":
            return [pixel_centres(*canvas, device=device)] * count
        num = self.config.num_points
        return [uniform_points(1, num, device=device, generator=generator)[0] for _ in range(count)]

    def _layer_terms(self, outputs: EBSegOutput, layer: int, targets, norm: float, generator):
        cfg = self.config
        masks = outputs.pred_masks[layer].float()
        logits_a = outputs.logits_a[layer].float()
        logits_b = outputs.logits_b[layer].float()
        canvas = tuple(targets[0].masks.shape[-2:])
        points = self._points(len(targets), canvas, masks.device, generator)
        indices = self.matcher(logits_a, masks, targets, points)

        weight = torch.ones(logits_a.shape[-1], device=masks.device)
        weight[-1] = cfg.no_object_weight
        bce, dice = self._mask_terms(masks, targets, indices, canvas, generator)
        terms = {
            "loss_ce_a": cfg.ce_weight * class_loss(logits_a, targets, indices, weight),
            # Branch B reuses A's assignment: the reference matches on A only.
            "loss_ce_b": cfg.ce_weight * class_loss(logits_b, targets, indices, weight),
            "loss_mask": cfg.mask_weight * bce / norm,
            "loss_dice": cfg.dice_weight * dice / norm,
        }
        return terms, indices

    def _mask_terms(self, masks: torch.Tensor, targets, indices: Indices, canvas, generator):
        """Summed (not yet normalised) BCE and dice over the matched masks."""
        pred = torch.cat([masks[b, q.to(masks.device)] for b, (q, _) in enumerate(indices)])  # [M, h, w]
        if pred.shape[0] == 0:
            zero = masks.sum() * 0.0  # keeps the graph: a batch without targets still backpropagates
            return zero, zero
        gt = torch.cat([t.masks[j.to(masks.device)] for t, (_, j) in zip(targets, indices)])  # [M, H, W]
        cfg = self.config
        if cfg.points == "all_pixels":
            coords = pixel_centres(*canvas, device=masks.device).expand(pred.shape[0], -1, -1)
        else:
            coords = uncertain_points(
                pred.detach(),
                cfg.num_points,
                oversample_ratio=cfg.oversample_ratio,
                importance_sample_ratio=cfg.importance_sample_ratio,
                generator=generator,
            )
        with torch.no_grad():
            labels = point_sample(gt, coords).float()
        logits = point_sample(pred, coords)
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1).sum()
        return bce, dice_loss(logits, labels).sum()


def build_criterion(config: LossConfig | str = "reference") -> Criterion:
    """A criterion from a config or a preset name ("reference", "tiny")."""
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown loss preset {config!r}; choose from {sorted(PRESETS)}")
        config = PRESETS[config]()
    return Criterion(config)


def total_loss(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training loss: the sum of the weighted terms."""
    if not terms:
        raise ValueError("no loss terms to sum")
    return torch.stack([value.reshape(()) for value in terms.values()]).sum()
