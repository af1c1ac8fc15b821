"""Per-image training targets from a semantic label map: one binary mask per class present."""

from __future__ import annotations

import numpy as np
import torch

from ebseg.data.labels import IGNORE_INDEX


def semantic_targets(label: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """label: int [H, W] class ids, ``IGNORE_INDEX`` on unlabelled pixels.

    Returns ``(classes, masks)``: classes long [N], ascending, one per class present (ignore excluded), and
    masks bool [N, H, W], ``masks[i] = label == classes[i]``. An all-ignore map gives N = 0.
    """
    label = torch.as_tensor(label)
    if label.ndim != 2 or label.dtype.is_floating_point or label.dtype == torch.bool:
        raise ValueError(f"label must be an integer [H, W] map, got {label.dtype} {tuple(label.shape)}")
    classes = torch.unique(label)  # sorted ascending
    classes = classes[classes != IGNORE_INDEX]
    if len(classes) and int(classes[0]) < 0:
        raise ValueError(f"label has negative class id {int(classes[0])} (only {IGNORE_INDEX} marks ignore)")
    masks = label.unsqueeze(0) == classes.view(-1, 1, 1)
    return classes.long(), masks
