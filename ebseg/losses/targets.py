"""Per-image ground truth for the losses: one binary mask per class present."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Targets:
    """labels: [N] int64 class ids into the training vocabulary; masks: [N, H, W] bool (or 0/1 float)
    over the same padded canvas as the model input (pixels in no mask, ignore and padding included,
    count as negatives for every mask, as in the reference). N may be 0."""

    labels: torch.Tensor
    masks: torch.Tensor

    def __post_init__(self) -> None:
        if self.labels.dim() != 1:
            raise ValueError(f"Targets.labels must be [N], got shape {tuple(self.labels.shape)}")
        if self.masks.dim() != 3:
            raise ValueError(f"Targets.masks must be [N, H, W], got shape {tuple(self.masks.shape)}")
        if self.labels.shape[0] != self.masks.shape[0]:
            raise ValueError(
                f"Targets: {self.labels.shape[0]} labels but {self.masks.shape[0]} masks; they must pair up"
            )
        if self.labels.is_floating_point():
            raise ValueError(f"Targets.labels must be integer class ids, got {self.labels.dtype}")

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device | str) -> Targets:
        return Targets(self.labels.to(device, torch.int64), self.masks.to(device))


def count_masks(targets: list[Targets]) -> int:
    """Ground-truth masks in a batch: the per-worker count that data-parallel training sums over workers."""
    return sum(len(t) for t in targets)
