"""SAM's ViT image encoder as a frozen multi-scale backbone.

Built from ``segment_anything``'s ``ImageEncoderViT`` (its blocks, patch embedding and absolute position
embedding; the neck is dropped), so SAM weights load by name. The blocks run our own forward
(``sam_block``) rather than the library's: attention goes through ``scaled_dot_product_attention``, which
picks fused kernels on CPU and GPU. The position embedding is resized to the real patch grid, so any input
that is a multiple of the patch size works, and the outputs of the four global-attention blocks are
resampled to strides 8, 16 and 32 without any extra layer; res2 stays at stride 16, since the pixel
decoder's 1x1 adapter runs before its upsampling to stride 4 (``pixel_decoder.RES2_UPSAMPLING``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from torch import nn

from ebseg.config import SamConfig
from ebseg.modeling.sam_block import sam_block

LEVELS = ("res2", "res3", "res4", "res5")
# Resampling of the tapped (stride-16) blocks to strides 16 (res2, upsampled by the pixel decoder)/8/16/32.
SCALES = (1.0, 2.0, 1.0, 0.5)


class SamEncoder(nn.Module):
    """Frozen SAM ViT; only ``pos_embed`` trains."""

    def __init__(self, vit: ImageEncoderViT, *, taps: tuple[int, ...]):
        super().__init__()
        if len(taps) != len(LEVELS):
            raise ValueError(f"need {len(LEVELS)} tapped blocks, got {taps}")
        self.patch_embed = vit.patch_embed
        self.pos_embed = vit.pos_embed
        self.blocks = vit.blocks
        self.taps = tuple(taps)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: [B, 3, H, W] SAM-normalised, H and W multiples of the patch size (16).

        Returns res2..res5: [B, C, H/16, W/16], [B, C, H/8, W/8], [B, C, H/16, W/16], [B, C, H/32, W/32].
        """
        x = self.patch_embed(images)  # [B, h, w, C]
        h, w = x.shape[1:3]
        pos = F.interpolate(
            self.pos_embed.permute(0, 3, 1, 2), size=(h, w), mode="bicubic", align_corners=False
        )
        x = x + pos.permute(0, 2, 3, 1)
        taps = []
        for i, block in enumerate(self.blocks):
            x = sam_block(block, x)
            if i in self.taps:
                taps.append(x)
        out = {}
        for name, tap, scale in zip(LEVELS, taps, SCALES):
            tap = tap.permute(0, 3, 1, 2)
            out[name] = tap if scale == 1.0 else F.interpolate(tap, scale_factor=scale, mode="bilinear")
        return out


def build_sam_encoder(config: SamConfig) -> SamEncoder:
    vit = ImageEncoderViT(
        img_size=config.img_size,
        patch_size=config.patch_size,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=4.0,
        out_chans=256,
        qkv_bias=True,
        norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
        use_abs_pos=True,
        use_rel_pos=True,
        window_size=config.window_size,
        global_attn_indexes=config.global_attn_indexes,
    )
    return SamEncoder(vit, taps=config.global_attn_indexes)
