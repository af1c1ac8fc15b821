"""Small blocks shared by several EBSeg components."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """Linear layers with ReLU between them (none after the last). Applies to the last dim."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel dim of an NCHW tensor (eps 1e-6, as the reference's fusion layers)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] -> [B, C, H, W]"""
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def sine_position_embedding(
    x: torch.Tensor, num_feats: int, temperature: float = 10000.0, scale: float = 2 * math.pi
) -> torch.Tensor:
    """DETR's normalised sine positional encoding for a feature map without padding.

    x: [B, C, H, W] (only its shape, device and dtype are read) -> [B, 2 * num_feats, H, W]
    """
    b, _, h, w = x.shape
    ones = torch.ones((b, h, w), device=x.device, dtype=torch.float32)
    y_embed = ones.cumsum(1)
    x_embed = ones.cumsum(2)
    eps = 1e-6
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=x.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(x.dtype)


def mask_pool(
    features: torch.Tensor, mask_logits: torch.Tensor, threshold_on_logits: bool = True
) -> torch.Tensor:
    """Average ``features`` inside each binarised mask; an empty mask pools to zeros.

    features: [B, C, H, W]; mask_logits: [B, Q, H, W] -> [B, Q, C]. The mask is detached: pooling passes no
    gradient to the mask. ``threshold_on_logits`` keeps ``logit > 0`` (the decoder's rule); otherwise
    ``sigmoid(logit) > 0.5`` (the inference rule for branch D), which differs only by float rounding at 0.
    """
    mask_logits = mask_logits.detach()
    binary = (mask_logits > 0) if threshold_on_logits else (mask_logits.sigmoid() > 0.5)
    binary = binary.to(features.dtype)
    weights = binary / (binary.sum(dim=(-1, -2), keepdim=True) + 1e-8)
    return torch.einsum("bchw,bqhw->bqc", features, weights)
