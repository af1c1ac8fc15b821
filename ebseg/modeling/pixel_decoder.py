"""Mask2Former's multi-scale deformable-attention pixel decoder, as EBSeg uses it.

The stride 8/16/32 maps (res3..res5) are projected to ``conv_dim`` and refined jointly by a deformable
transformer encoder; the stride-4 map (res2) joins afterwards through one FPN step. Module and parameter
names follow the reference so an official checkpoint loads by prefix alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ebseg.config import PixelDecoderConfig
from ebseg.modeling.layers import sine_position_embedding
from ebseg.modeling.ms_deform_attn import MSDeformAttn

# Encoder levels, coarsest first: the order of input_proj, level_embed and the returned multi-scale list.
ENCODER_LEVELS = ("res5", "res4", "res3")
# res2 arrives at stride 16 (SAM's tapped block as it is) and joins at stride 4: upsampled by this factor
# after the 1x1 adapter (``ConvNorm.upsampled``) instead of before it.
RES2_UPSAMPLING = 4
# Memory layout of the stride-4 maps (lateral, top-down, the 3x3 conv, the mask features). Channels-last: the
# encoder's memory is [B, N, C] already, the 3x3 conv is faster on it on CPU, and the decoder's consumers of
# the mask features (resizing to each level, the per-pixel MLP on [B, H, W, C]) read it without the copies
# that NCHW costs them (PyTorch's bilinear resize converts an NCHW input to channels-last first).
STRIDE4_LAYOUT = torch.channels_last


class ConvNorm(nn.Conv2d):
    """Conv2d followed by a norm and an optional activation, stored as ``<conv>.weight`` / ``<conv>.norm.*``
    (detectron2's layout, which the reference checkpoints use)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        norm: nn.Module,
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = norm
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, Cin, H, W] -> [B, Cout, H, W]"""
        return self._finish(super().forward(x))

    def upsampled(self, x: torch.Tensor, scale: int) -> torch.Tensor:
        """``self(bilinear_upsample(x, scale))`` at a fraction of its cost, for a 1x1 conv.

        x: [B, Cin, H, W] -> [B, Cout, scale * H, scale * W]. A bias-free 1x1 conv mixes channels per pixel
        and bilinear upsampling mixes pixels per channel with weights summing to 1, so the two commute (up to
        float rounding) and the conv runs on scale^2 fewer pixels, with Cout instead of Cin channels to
        upsample. The norm does not commute (GroupNorm's statistics span the whole map): it runs after.
        """
        if self.kernel_size != (1, 1):
            raise ValueError(f"only a 1x1 conv commutes with upsampling, not {self.kernel_size}")
        x = F.interpolate(super().forward(x), scale_factor=scale, mode="bilinear")
        return self._finish(x)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return x if self.activation is None else self.activation(x)


def c2_xavier_fill(conv: nn.Conv2d) -> None:
    """Caffe2's "XavierFill" as detectron2 names it: kaiming-uniform with a=1, bias 0."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class MSDeformAttnEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention, then a ReLU FFN (the reference's dropout is 0)."""

    def __init__(self, *, dim: int, ffn_dim: int, num_levels: int, num_heads: int, num_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(
            dim=dim, num_levels=num_levels, num_heads=num_heads, num_points=num_points
        )
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        # The reference xavier-fills every matrix of the transformer; biases keep nn.Linear's default.
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        """src, pos: [B, N, C]; reference_points: [B, N, L, 2]; spatial_shapes: (H_l, W_l) -> [B, N, C]"""
        # Positions steer where to sample (the query) but are not part of what is sampled (the value).
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes)
        src = self.norm1(src + attn)
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class MSDeformAttnEncoder(nn.Module):
    """A stack of encoder layers sharing one set of reference points."""

    def __init__(
        self, *, num_layers: int, dim: int, ffn_dim: int, num_levels: int, num_heads: int, num_points: int
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            MSDeformAttnEncoderLayer(
                dim=dim, ffn_dim=ffn_dim, num_levels=num_levels, num_heads=num_heads, num_points=num_points
            )
            for _ in range(num_layers)
        )

    @staticmethod
    def reference_points(spatial_shapes: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
        """Pixel centres of every level, normalised by that level's size: [1, N, L, 2] (x, y).

        Deformable DETR divides by the valid (unpadded) extent; with no padding mask that is the whole map,
        and every level gets the same normalised point.
        """
        points = []
        for h, w in spatial_shapes:
            y = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
            x = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
            grid_y, grid_x = torch.meshgrid(y, x, indexing="ij")
            points.append(torch.stack((grid_x.flatten(), grid_y.flatten()), dim=-1))
        return torch.cat(points, dim=0)[None, :, None, :].expand(-1, -1, len(spatial_shapes), -1)

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        """src, pos: [B, N, C], N = sum over levels of H_l * W_l -> [B, N, C]"""
        reference_points = self.reference_points(spatial_shapes, src.device).expand(src.shape[0], -1, -1, -1)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes)
        return src


class MSDeformAttnTransformer(nn.Module):
    """Flattens the levels into one sequence, adds a learnt per-level embedding to the positions, and runs
    the encoder (the reference's ``MSDeformAttnTransformerEncoderOnly``)."""

    def __init__(
        self, *, dim: int, ffn_dim: int, num_layers: int, num_levels: int, num_heads: int, num_points: int
    ):
        super().__init__()
        self.encoder = MSDeformAttnEncoder(
            num_layers=num_layers,
            dim=dim,
            ffn_dim=ffn_dim,
            num_levels=num_levels,
            num_heads=num_heads,
            num_points=num_points,
        )
        self.level_embed = nn.Parameter(torch.empty(num_levels, dim))
        nn.init.normal_(self.level_embed)

    def forward(
        self, srcs: list[torch.Tensor], pos: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """srcs, pos: per level [B, C, H_l, W_l] -> (memory [B, N, C], [(H_l, W_l)] per level)"""
        shapes = [(src.shape[-2], src.shape[-1]) for src in srcs]
        src_flat = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], dim=1)
        pos_flat = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[i].view(1, 1, -1) for i, p in enumerate(pos)],
            dim=1,
        )
        return self.encoder(src_flat, pos_flat, shapes), shapes


class MSDeformAttnPixelDecoder(nn.Module):
    """res2..res5 -> (mask features at stride 4, [stride 32, 16, 8] maps for the transformer decoder)."""

    def __init__(
        self,
        *,
        in_channels: int,
        conv_dim: int,
        mask_dim: int,
        num_layers: int,
        num_heads: int,
        num_points: int,
        ffn_dim: int,
        num_groups: int,
    ):
        super().__init__()
        self.conv_dim = conv_dim
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels, conv_dim, kernel_size=1), nn.GroupNorm(num_groups, conv_dim))
            for _ in ENCODER_LEVELS
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        self.transformer = MSDeformAttnTransformer(
            dim=conv_dim,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
            num_levels=len(ENCODER_LEVELS),
            num_heads=num_heads,
            num_points=num_points,
        )
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        # One FPN step: stride 8 (the finest encoder level) down to the common stride 4.
        self.adapter_1 = ConvNorm(in_channels, conv_dim, 1, norm=nn.GroupNorm(num_groups, conv_dim))
        self.layer_1 = ConvNorm(
            conv_dim, conv_dim, 3, norm=nn.GroupNorm(num_groups, conv_dim), activation=F.relu
        )
        for conv in (self.mask_features, self.adapter_1, self.layer_1):
            c2_xavier_fill(conv)

    def forward(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """features: res2..res5, [B, in_channels, H/s, W/s] for s = 16, 8, 16, 32 (res2 comes at stride 16,
        see ``RES2_UPSAMPLING``), any float dtype.

        Returns float32 ``mask_features`` [B, mask_dim, H/4, W/4] and ``multi_scale_features`` =
        [stride 32, stride 16, stride 8], each [B, conv_dim, H/s, W/s], all in channels-last memory layout.
        Runs in float32 with autocast off, as the reference does: sampling locations (offsets over map
        sizes) are too coarse in half precision.
        """
        device_type = features["res2"].device.type
        with torch.autocast(device_type=device_type, enabled=False):
            srcs, pos = [], []
            for proj, name in zip(self.input_proj, ENCODER_LEVELS):
                x = features[name].float()
                srcs.append(proj(x))
                pos.append(sine_position_embedding(x, self.conv_dim // 2))
            memory, shapes = self.transformer(srcs, pos)

            # The levels are views of the encoder's [B, N, C] memory, channels-last [B, C, h, w] (no copy).
            out = [
                level.unflatten(1, (h, w)).permute(0, 3, 1, 2)
                for level, (h, w) in zip(memory.split([h * w for h, w in shapes], dim=1), shapes)
            ]
            # The stride-4 path runs channels-last (``STRIDE4_LAYOUT``).
            res2 = features["res2"].float().contiguous(memory_format=STRIDE4_LAYOUT)
            lateral = self.adapter_1.upsampled(res2, RES2_UPSAMPLING)
            top_down = F.interpolate(out[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            finest = self.layer_1(lateral + top_down)
            return self.mask_features(finest), out


def build_pixel_decoder(config: PixelDecoderConfig, *, in_channels: int) -> MSDeformAttnPixelDecoder:
    """The pixel decoder for ``config`` on backbone features of ``in_channels`` channels."""
    return MSDeformAttnPixelDecoder(
        in_channels=in_channels,
        conv_dim=config.conv_dim,
        mask_dim=config.mask_dim,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        num_points=config.num_points,
        ffn_dim=config.ffn_dim,
        num_groups=config.num_groups,
    )
