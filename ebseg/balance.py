"""Adaptive balancing of the three class distributions at inference (semantic inference: ``postprocess``).

Each mask query gets a K-way class distribution from embeddings A (decoder), B (CLIP recognition head)
and D (mask-pooled frozen CLIP-Surgery features). They are mixed geometrically with exponents that differ
for classes seen in training and unseen ones (paper Eq. 6/7); the background probability comes from A
alone.
"""

from __future__ import annotations

import torch

from ebseg.config import BalanceConfig

EPS = 1e-8


def balance_class_probs(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    logits_d: torch.Tensor,
    seen: torch.Tensor,
    config: BalanceConfig,
) -> torch.Tensor:
    """Fuse the three branches into per-query class probabilities.

    logits_*: [B, Q, K + 1] raw logits, background last; seen: [K] bool (or 0/1).
    Returns [B, Q, K + 1]: the fused K-way distribution scaled by 1 - p(background), then p(background).
    """
    p_a = logits_a[..., :-1].softmax(-1)
    p_b = logits_b[..., :-1].softmax(-1)
    p_d = logits_d[..., :-1].softmax(-1)
    alpha, beta, gamma = config.alpha, config.beta, config.gamma
    # The exponents are evaluated as the reference does (1 - beta - gamma is exactly 0.0 for both
    # presets, so A drops out for unseen classes) and the products are taken in the same order.
    fused_seen = torch.log(EPS + (p_a ** (1 - alpha - gamma) * p_d**alpha) * p_b**gamma)
    fused_unseen = torch.log(EPS + p_a ** (1 - beta - gamma) * p_d**beta * p_b**gamma)
    seen = seen.to(device=fused_seen.device, dtype=torch.long)
    fused = fused_seen * seen + fused_unseen * (1 - seen)
    p_void = logits_a.softmax(-1)[..., -1:]
    return torch.cat([fused.softmax(-1) * (1 - p_void), p_void], dim=-1)


def class_weights(class_probs: torch.Tensor) -> torch.Tensor:
    """[..., Q, K + 1] fused probabilities -> [..., Q, K] weights for semantic inference.

    The reference takes the log (plus 1e-8) and a softmax again before dropping the background column;
    kept because it shifts the weights slightly.
    """
    return torch.log(class_probs + EPS).softmax(-1)[..., :-1]
