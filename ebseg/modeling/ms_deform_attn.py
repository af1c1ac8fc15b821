"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch.

Each query attends to a few sampled points per head and per feature level instead of to every key. The
points are bilinearly interpolated with ``F.grid_sample`` (zeros outside the map, ``align_corners=False``),
which is the same sampling rule as the CUDA kernel of the reference, so no compiled op is needed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of bilinear samples of multi-level value maps.

    value: [B, Lv, heads, hd], the levels' maps flattened row-major and concatenated, Lv = sum(H_l * W_l)
    spatial_shapes: [L, 2] long, (H_l, W_l) per level
    sampling_locations: [B, Lq, heads, L, P, 2], (x, y) normalised to [0, 1] over each level's map
        (0 and 1 are the outer edges of the border pixels); points outside read zeros
    attention_weights: [B, Lq, heads, L, P], typically a softmax over L * P per head
    returns: [B, Lq, heads * hd] in the dtype of ``value``; the arithmetic is float32 whatever autocast says,
    since bilinear weights and the sum over many points lose too much in half precision.
    """
    b, lv, heads, hd = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    if sum(h * w for h, w in shapes) != lv:
        raise ValueError(
            f"value has {lv} positions but spatial_shapes {shapes} describe {sum(h * w for h, w in shapes)}"
        )

    out_dtype = value.dtype
    with torch.autocast(device_type=value.device.type, enabled=False):
        value = value.float()
        # grid_sample addresses [-1, 1]; with align_corners=False that maps to the same pixel edges as [0, 1].
        grids = 2.0 * sampling_locations.float() - 1.0
        samples = []
        for level, value_l in enumerate(value.split([h * w for h, w in shapes], dim=1)):
            h, w = shapes[level]
            # [B, HW, heads, hd] -> [B * heads, hd, H, W]: every head samples its own slice of channels.
            value_l = value_l.permute(0, 2, 3, 1).reshape(b * heads, hd, h, w)
            # [B, Lq, heads, P, 2] -> [B * heads, Lq, P, 2]
            grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
            samples.append(
                F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
            )
        # [B * heads, hd, Lq, L * P], the points ordered level-major like the weights below.
        sampled = torch.cat(samples, dim=-1)
        weights = attention_weights.float().transpose(1, 2).reshape(b * heads, 1, lq, num_levels * num_points)
        out = (sampled * weights).sum(-1)  # [B * heads, hd, Lq]
        out = out.view(b, heads * hd, lq).transpose(1, 2)
    return out.to(out_dtype)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with 2-d reference points (no reference boxes, no padding mask)."""

    def __init__(self, *, dim: int, num_levels: int, num_heads: int, num_points: int):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_levels = num_levels
        self.num_heads = num_heads
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: at the start every head looks along its own direction, with its k-th point
        k pixels away, and all points of a head weigh the same."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
        # Scale so the larger component is 1: the first point lands on a neighbouring pixel (incl. diagonals).
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        grid = directions[:, None, None, :].repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value_input: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
    ) -> torch.Tensor:
        """query: [B, Lq, C] (content + positional); reference_points: [B, Lq, L, 2] (x, y) in [0, 1];
        value_input: [B, Lv, C], the levels flattened and concatenated; spatial_shapes: [L, 2] long (H, W);
        level_start_index: [L] long, offset of each level in Lv (kept for the reference interface; the
        offsets follow from ``spatial_shapes``) -> [B, Lq, C]

        Offsets are predicted in pixels of each level, so they are divided by (W_l, H_l) before being added
        to the normalised reference point.
        """
        b, lq, _ = query.shape
        lv = value_input.shape[1]
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value_input).view(b, lv, heads, self.dim // heads)
        offsets = self.sampling_offsets(query).view(b, lq, heads, levels, points, 2)
        weights = self.attention_weights(query).view(b, lq, heads, levels * points)
        weights = weights.softmax(-1).view(b, lq, heads, levels, points)
        normaliser = spatial_shapes.flip(-1).to(offsets.dtype)  # (W_l, H_l) to match (x, y)
        locations = (
            reference_points[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
        )
        out = ms_deform_attn(value, spatial_shapes, locations, weights)
        return self.output_proj(out)
