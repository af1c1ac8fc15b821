"""Loss weights, matching costs and point sampling: one frozen config and its named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class LossConfig:
    """Defaults are the reference's values (EBSeg-B and -L share them).

    The reference matches with class cost 2 but weighs the cross-entropy terms by 2 * 0.75 = 1.5.
    """

    ce_weight: float = 1.5  # each of the two cross-entropy terms (branch A and branch B)
    mask_weight: float = 5.0  # point-sampled sigmoid BCE
    dice_weight: float = 5.0
    ssc_weight: float = 10.0  # semantic structure consistency (last layer, branch A)
    no_object_weight: float = 0.1  # cross-entropy weight of the background (no-object) class
    class_cost: float = 2.0  # matching costs
    mask_cost: float = 5.0
    dice_cost: float = 5.0
    num_points: int = 12544  # 112^2 points per mask, for the matcher and for the losses
    oversample_ratio: float = 3.0  # importance sampling draws num_points * this candidates ...
    importance_sample_ratio: float = 0.75  # ... and keeps this share of num_points by uncertainty
    # "random": uniform points for matching, importance-sampled points for the losses (training);
    # "all_pixels": every pixel centre of the target grid for both (deterministic, heavy at 640 px).
    points: Literal["random", "all_pixels"] = "random"

    def __post_init__(self) -> None:
        if self.points not in ("random", "all_pixels"):
            raise ValueError(f"LossConfig.points must be 'random' or 'all_pixels', got {self.points!r}")
        if self.num_points < 1:
            raise ValueError(f"LossConfig.num_points must be >= 1, got {self.num_points}")
        if self.class_cost == 0 and self.mask_cost == 0 and self.dice_cost == 0:
            raise ValueError("LossConfig: the matching costs cannot all be 0")

    def replace(self, **changes) -> LossConfig:
        return dataclasses.replace(self, **changes)


def reference() -> LossConfig:
    """The paper's training objective."""
    return LossConfig()


def tiny() -> LossConfig:
    """Same weights, fewer points: for CPU tests and small crops."""
    return LossConfig(num_points=1024)


PRESETS = {"reference": reference, "tiny": tiny}
