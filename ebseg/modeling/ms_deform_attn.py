"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch.

Each query attends to a few sampled points per head and per feature level instead of to every key. The
points are read with bilinear interpolation (zeros outside the map, pixel centres at i + 0.5 over a
[0, 1] extent: ``grid_sample``'s rule with ``align_corners=False``, the same as the reference's CUDA
kernel), written as one weighted ``embedding_bag``: every sample becomes its four corner rows of the value
table with weight (bilinear weight x attention weight), and the bag of a (query, head) sums its
levels x points x 4 rows. That is one fused gather-and-sum on CPU and GPU, with no intermediate
[heads, head_dim, queries, points] tensor and no per-level loop (about 7x faster than ``grid_sample``
per level on CPU), and it is differentiable in the value, the locations and the weights.

The table holds each level's map inside a border of zeros (``BORDER``), so corners off the map are
clamped into the border instead of being tested and masked: the index arithmetic is a handful of
elementwise ops over whole rows of samples (~3x less time outside the gather than per-corner masks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Zeros around each level's map in the value table. A sample's two taps along an axis are its lower corner c
# and c + 1; with c clamped to [-2, size] (map coordinates) both taps of a sample that lies off the map land
# in this border and read zeros, and those of a sample on the map are unchanged: no in-map tests, no masks.
BORDER = 2


def bordered_table(value: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
    """value: [B, Lv, heads, hd], the levels flattened row-major and concatenated -> the same maps, each with
    ``BORDER`` zeros on all four sides, flattened the same way: [B, sum(H_l' * W_l'), heads, hd], with
    H_l' = H_l + 2 * BORDER and W_l' = W_l + 2 * BORDER."""
    b, _, heads, hd = value.shape
    levels = value.split([h * w for h, w in shapes], dim=1)
    padded = [
        F.pad(level.reshape(b, h, w, heads * hd), (0, 0, BORDER, BORDER, BORDER, BORDER)).flatten(1, 2)
        for level, (h, w) in zip(levels, shapes)
    ]
    return torch.cat(padded, dim=1).view(b, -1, heads, hd)


def per_sample(per_level: Sequence, num_points: int, device: torch.device) -> torch.Tensor:
    """A per-level constant repeated for each point: [L * P, ...] float32.

    Per-sample constants are laid out as whole [L * P] rows so that every broadcast in ``ms_deform_attn``
    runs along contiguous rows: broadcasting along the short trailing axes of [..., L, P, 2] (2 or 4
    elements) is several times slower per element on CPU.
    """
    rows = [entry for entry in per_level for _ in range(num_points)]
    return torch.tensor(rows, device=device, dtype=torch.float32)


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of bilinear samples of multi-level value maps.

    value: [B, Lv, heads, hd], the levels' maps flattened row-major and concatenated, Lv = sum(H_l * W_l)
    spatial_shapes: (H_l, W_l) per level, as Python ints (shapes, not data: no device sync, no graph break)
    sampling_locations: [B, Lq, heads, L, P, 2], (x, y) normalised to [0, 1] over each level's map
        (0 and 1 are the outer edges of the border pixels); points outside read zeros
    attention_weights: [B, Lq, heads, L, P], typically a softmax over L * P per head
    returns: [B, Lq, heads * hd] in the dtype of ``value``; the arithmetic is float32 whatever autocast says,
    since bilinear weights and the sum over many points lose too much in half precision.
    """
    b, lv, heads, hd = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    if sum(h * w for h, w in shapes) != lv:
        raise ValueError(
            f"value has {lv} positions but spatial_shapes {shapes} describe {sum(h * w for h, w in shapes)}"
        )

    out_dtype = value.dtype
    device = value.device
    samples = num_levels * num_points
    with torch.autocast(device_type=device.type, enabled=False):
        table = bordered_table(value.float(), shapes)
        padded = [(h + 2 * BORDER, w + 2 * BORDER) for h, w in shapes]
        total = b * table.shape[1] * heads

        size = per_sample([(w, h) for h, w in shapes], num_points, device)  # [L * P, 2] (x, y)
        locations = sampling_locations.float().reshape(b, lq, heads, samples, 2)
        # In pixels of the bordered map: pixel i has its centre at i + 0.5, and the border shifts it by 2.
        pixel = torch.addcmul(size.new_tensor(BORDER - 0.5), locations, size)
        corner = pixel.floor()
        frac = pixel - corner
        # Corner c in [0, size + 2] bordered, [-2, size] on the map: taps c and c + 1 stay in the table.
        corner = torch.minimum(corner.clamp_(min=0), size + (2 * BORDER - 2))
        fx, fy = frac.unbind(-1)
        weight = attention_weights.float().reshape(b, lq, heads, samples)
        upper = weight * fy  # the y + 1 row's share
        lower = weight - upper
        lower_right, upper_right = lower * fx, upper * fx
        # [B, Lq, heads, 4, L * P]: corners (y, x), (y, x + 1), (y + 1, x), (y + 1, x + 1), each a whole row.
        tap_weights = torch.stack(
            [lower - lower_right, lower_right, upper - upper_right, upper_right], dim=-2
        )

        # Row of (batch, position, head) in the table viewed as [B * Lp * heads, hd]:
        # ((b * Lp + start_l + y * Wp_l) * heads + head) + x * heads. Integer-valued, so exact in float32
        # below 2^24 rows (B <= 219 at 640x640), float64 beyond; int32 for the gather.
        index_dtype = torch.float32 if total < 2**24 else torch.float64
        cx, cy = corner.to(index_dtype).unbind(-1)
        starts = [0]
        for h, w in padded[:-1]:
            starts.append(starts[-1] + h * w)
        first = (
            torch.arange(b, device=device, dtype=index_dtype)[:, None, None, None] * table.shape[1]
            + per_sample(starts, num_points, device).to(index_dtype)
        ) * heads + torch.arange(heads, device=device, dtype=index_dtype)[:, None]  # [B, 1, heads, L * P]
        row_stride = per_sample([w * heads for _, w in padded], num_points, device).to(index_dtype)
        rows = torch.addcmul(first, cy, row_stride).add_(cx, alpha=heads).int()  # corner (y, x)
        corner_offsets = torch.tensor(
            [[0, heads, w * heads, (w + 1) * heads] for _, w in padded for _ in range(num_points)],
            device=device,
            dtype=torch.int32,
        ).T.contiguous()  # [4, L * P], in the order of tap_weights
        rows = rows.unsqueeze(-2) + corner_offsets
        # One bag per (batch, query, head): its 4 * L * P taps.
        per_bag = 4 * samples
        out = F.embedding_bag(
            rows.reshape(-1, per_bag),
            table.reshape(total, hd),
            per_sample_weights=tap_weights.reshape(-1, per_bag),
            mode="sum",
        )
    return out.view(b, lq, heads * hd).to(out_dtype)


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
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        """query: [B, Lq, C] (content + positional); reference_points: [B, Lq, L, 2] (x, y) in [0, 1];
        value_input: [B, Lv, C], the levels flattened and concatenated; spatial_shapes: (H_l, W_l) per
        level (the reference's level_start_index follows from them) -> [B, Lq, C]

        Offsets are predicted in pixels of each level, so they are divided by (W_l, H_l) before being added
        to the normalised reference point.
        """
        b, lq, _ = query.shape
        lv = value_input.shape[1]
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value_input).view(b, lv, heads, self.dim // heads)
        offsets = self.sampling_offsets(query).view(b, lq, heads, -1)  # (levels, points, 2) flattened
        weights = self.attention_weights(query).view(b, lq, heads, levels * points)
        weights = weights.softmax(-1).view(b, lq, heads, levels, points)
        # (W_l, H_l) to match (x, y), per (level, point) as one [L * P * 2] row, and the reference points
        # repeated over the points likewise: broadcasting along the trailing (P, 2) axes instead runs
        # 2-element inner loops (same values, several times slower on CPU).
        normaliser = per_sample([(w, h) for h, w in spatial_shapes], points, offsets.device).flatten()
        reference = reference_points[:, :, None, :, None, :].expand(-1, -1, 1, -1, points, -1)
        offsets = offsets / normaliser.to(offsets.dtype)
        locations = reference.reshape(b, lq, 1, -1) + offsets
        locations = locations.view(b, lq, heads, levels, points, 2)
        out = ms_deform_attn(value, spatial_shapes, locations, weights)
        return self.output_proj(out)
