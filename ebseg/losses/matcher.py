"""Hungarian matching of predicted masks to ground-truth masks (one image at a time).

The cost of pairing query q with target t is ``class_cost * (-p_q[label_t]) + mask_cost * BCE +
dice_cost * dice`` where p_q is the softmax over K + 1 classes of branch A's logits and the mask terms
are read at a shared set of points (the same points for every prediction and target of the image).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from ebseg.losses.points import point_sample
from ebseg.losses.targets import Targets

Indices = list[tuple[torch.Tensor, torch.Tensor]]  # per image: (query ids ascending, target ids), int64


def pairwise_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[Q, P] logits vs [N, P] binary labels -> [Q, N] mean sigmoid BCE over the points."""
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    cost = torch.einsum("qp,np->qn", pos, labels) + torch.einsum("qp,np->qn", neg, 1 - labels)
    return cost / logits.shape[1]


def pairwise_dice(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[Q, P] logits vs [N, P] binary labels -> [Q, N] dice loss with +1 smoothing."""
    probs = logits.sigmoid()
    numerator = 2 * torch.einsum("qp,np->qn", probs, labels)
    denominator = probs.sum(-1)[:, None] + labels.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


@dataclass(frozen=True)
class HungarianMatcher:
    class_cost: float = 2.0
    mask_cost: float = 5.0
    dice_cost: float = 5.0

    @torch.no_grad()
    def cost_matrix(
        self, logits: torch.Tensor, masks: torch.Tensor, targets: Targets, points: torch.Tensor
    ) -> torch.Tensor:
        """One image: logits [Q, K + 1], masks [Q, h, w] logits, points [P, 2] -> [Q, N] float32 cost."""
        logits = logits.float()
        class_term = -logits.softmax(-1)[:, targets.labels]
        pred = point_sample(masks.float(), points.expand(masks.shape[0], -1, -1))
        gt = point_sample(targets.masks.to(masks.device), points.expand(len(targets), -1, -1)).float()
        return (
            self.mask_cost * pairwise_bce(pred, gt)
            + self.class_cost * class_term
            + self.dice_cost * pairwise_dice(pred, gt)
        )

    @torch.no_grad()
    def __call__(
        self,
        logits: torch.Tensor,
        masks: torch.Tensor,
        targets: Sequence[Targets],
        points: Sequence[torch.Tensor],
    ) -> Indices:
        """logits: [B, Q, K + 1] branch-A class logits; masks: [B, Q, h, w] mask logits; points: per image
        [P, 2] normalised (x, y) -> per image (query ids, target ids), min(Q, N) pairs, queries ascending.
        """
        indices: Indices = []
        with torch.autocast(device_type=masks.device.type, enabled=False):
            for b, target in enumerate(targets):
                if len(target) == 0:
                    empty = torch.zeros(0, dtype=torch.int64)
                    indices.append((empty, empty.clone()))
                    continue
                cost = self.cost_matrix(logits[b], masks[b], target, points[b])
                if not torch.isfinite(cost).all():
                    raise FloatingPointError(f"matching cost of image {b} is not finite")
                rows, cols = linear_sum_assignment(cost.cpu().numpy())
                pair = (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
                indices.append(pair)
        return indices
