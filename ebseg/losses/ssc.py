"""Semantic Structure Consistency (SSC): matched query embeddings should relate to each other as their
classes' text embeddings do.

For each image, E [M, D] are the final layer's branch-A embeddings of the matched queries (query order)
and y [M] their ground-truth classes; the loss is mean((E E^T - A[y][:, y])^2) with A the text cosine
affinity of the training vocabulary. E carries the decoder's clamped scale s, so E E^T = s^2 cos; the
reference does not renormalise, and neither do we (it pulls s toward 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ebseg.losses.matcher import Indices


@torch.no_grad()
def text_affinity(class_embeddings: torch.Tensor) -> torch.Tensor:
    """class_embeddings: [K, D] text embeddings of the training vocabulary (background excluded) ->
    [K, K] float32 cosine similarities, no gradient.

    Build it from the vocabulary the targets index into (COCO-Stuff-171 for the paper), not from
    whatever vocabulary the model saw first (the reference's quirk).
    """
    unit = F.normalize(class_embeddings.float(), dim=-1)
    return unit @ unit.T


def ssc_loss(
    embeddings: torch.Tensor,
    labels: Sequence[torch.Tensor],
    indices: Indices,
    affinity: torch.Tensor,
) -> torch.Tensor:
    """embeddings: [B, Q, D] last-layer branch-A embeddings; labels: per image [N] class ids; indices: the
    last layer's matching; affinity: [K, K] -> scalar float32, unweighted.

    The batch value is the mean over images with at least one target. The reference divides the sum by
    B and zeroes the whole batch when an image has no target (its per-image MSE is NaN then); with
    targets in every image both agree. With no target anywhere the result is 0 with a graph through
    ``embeddings``, so a backward still runs.
    """
    per_image = []
    affinity = affinity.to(embeddings.device, torch.float32)
    for b, (queries, target_ids) in enumerate(indices):
        if queries.numel() == 0:
            continue
        matched = embeddings[b].float()[queries.to(embeddings.device)]  # [M, D]
        classes = labels[b].to(embeddings.device)[target_ids.to(embeddings.device)]
        if classes.max() >= affinity.shape[0]:
            raise ValueError(
                f"image {b}: class id {int(classes.max())} is outside the text affinity "
                f"({affinity.shape[0]} classes)"
            )
        image_affinity = matched @ matched.T
        text = affinity[classes][:, classes]
        per_image.append(F.mse_loss(image_affinity, text))
    if not per_image:
        return embeddings.float().sum() * 0.0
    return torch.stack(per_image).mean()
