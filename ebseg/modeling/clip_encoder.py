"""The frozen CLIP vision tower, cut in two: a feature extractor and a SAN-style recognition head.

One tower holds every block once. ``extract`` runs blocks ``[0, rec_head_start)`` and returns the
per-layer features the decoder fuses; ``recognize`` runs the remaining blocks on SOS tokens steered by the
decoder's attention bias (embeddings B) and, at inference, returns the dense CLIP-Surgery features used
for branch D.

At inference both parts run two streams from block ``layers // 6`` on (CLIP Surgery): attention is
computed once on the original stream's ``ln_1`` output; the original stream takes the usual q-k
attention and MLP, the surgery stream takes v-v attention with the same projection and skips the MLP.
In training everything runs as plain CLIP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ebseg.modeling.rec_head import AttnBias, build_rec_attn_bias


@dataclass
class ClipFeatures:
    """What the extractor hands to the decoder and the recognition head.

    maps[i]: [B, C, h, w] output of the i-th block (1-based; 0 is after ln_pre), the raw residual stream
    of the original path. cls[i]: [B, C] the CLS token at the same point. surgery: [B, 1 + h*w, C] the
    surgery stream after the last extractor block (inference only, else None).
    """

    maps: dict[int, torch.Tensor]
    cls: dict[int, torch.Tensor]
    surgery: torch.Tensor | None


class ClipVisual(nn.Module):
    """CLIP ViT with the surgery feature path.

    Takes the parts of an open_clip ``VisionTransformer`` (so any open_clip weights load by name) and
    runs its own loops over them rather than the library's block ``forward``: the surgery path needs
    q, k and v separately, and open_clip's block layout changed across releases.
    """

    def __init__(self, visual: nn.Module, *, rec_head_start: int, surgery_start: int):
        super().__init__()
        self.conv1 = visual.conv1
        self.class_embedding = visual.class_embedding
        self.positional_embedding = visual.positional_embedding
        self.ln_pre = visual.ln_pre
        self.resblocks = visual.transformer.resblocks
        self.ln_post = visual.ln_post
        self.proj = visual.proj
        self.grid_size = tuple(visual.grid_size)
        self.num_heads = self.resblocks[0].attn.num_heads
        if not 0 < surgery_start < rec_head_start < len(self.resblocks):
            raise ValueError(
                f"need 0 < surgery_start ({surgery_start}) < rec_head_start ({rec_head_start}) "
                f"< layers ({len(self.resblocks)})"
            )
        self.rec_head_start = rec_head_start
        self.surgery_start = surgery_start

    def _positional_embedding(self, h: int, w: int) -> torch.Tensor:
        """The class position as is, the grid part resized bicubically to (h, w): [1 + h*w, C]."""
        pos = self.positional_embedding
        if (h, w) == self.grid_size:
            return pos
        gh, gw = self.grid_size
        grid = pos[1:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(h * w, -1)], dim=0)

    def _attention(
        self, block: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, surgery: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Multi-head attention of one block on already-normalised tokens.

        x: [B, T, C]; bias: [B, heads, T, T] added to the logits, or None. Returns the q-k output and,
        when ``surgery``, the v-v output (both [B, T, C], after the output projection).
        """
        attn = block.attn
        b, t, c = x.shape
        heads = self.num_heads
        qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.reshape(b, t, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        if bias is not None:
            bias = bias.to(q.dtype)  # the kernel wants the mask in the dtype autocast gave q

        def attend(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
            # softmax(q k^T / sqrt(hd) + bias) v in one fused kernel (the default scale is CLIP's).
            out = F.scaled_dot_product_attention(query, key, v, attn_mask=bias)
            return attn.out_proj(out.transpose(1, 2).reshape(b, t, c))

        return attend(q, k), (attend(v, v) if surgery else None)

    def _plain_block(
        self, block: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self._attention(block, block.ln_1(x), bias, surgery=False)[0]
        return x + block.mlp(block.ln_2(x))

    def _dual_block(
        self, block: nn.Module, x: torch.Tensor, x_surgery: torch.Tensor, bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One block on both streams: attention from the original stream, no MLP on the surgery one."""
        original, surgery = self._attention(block, block.ln_1(x), bias, surgery=True)
        x = x + original
        x = x + block.mlp(block.ln_2(x))
        return x, x_surgery + surgery

    def extract(self, images: torch.Tensor, *, dual: bool) -> ClipFeatures:
        """Run the extractor blocks.

        images: [B, 3, H, W] CLIP-normalised -> features on the (H // patch, W // patch) grid.
        ``dual`` turns on the surgery stream (inference).
        """
        x = self.conv1(images)
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(b, 1, c)
        x = torch.cat([cls, x], dim=1) + self._positional_embedding(h, w).to(x.dtype)
        x = self.ln_pre(x)

        maps: dict[int, torch.Tensor] = {}
        cls_tokens: dict[int, torch.Tensor] = {}

        def save(i: int, tokens: torch.Tensor) -> None:
            maps[i] = tokens[:, 1:].transpose(1, 2).reshape(b, c, h, w)
            cls_tokens[i] = tokens[:, 0]

        save(0, x)
        x_surgery = None
        for i in range(self.rec_head_start):
            block = self.resblocks[i]
            if dual and i >= self.surgery_start:
                if x_surgery is None:
                    x_surgery = x  # the surgery stream starts from this block's input
                x, x_surgery = self._dual_block(block, x, x_surgery)
            else:
                x = self._plain_block(block, x)
            save(i + 1, x)
        return ClipFeatures(maps=maps, cls=cls_tokens, surgery=x_surgery)

    def _project(self, tokens: torch.Tensor) -> torch.Tensor:
        """[..., C] -> unit [..., D] through ln_post and the joint projection."""
        return F.normalize(self.ln_post(tokens) @ self.proj, dim=-1)

    def recognize(
        self, features: ClipFeatures, attn_bias: AttnBias, *, num_sos: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the recognition head: SOS tokens read the image through the decoder's attention bias.

        attn_bias: from the decoder ([B, heads, Q, h4, w4], Q = num_sos), max-pooled here to the CLIP grid.
        Returns embeddings B [B, Q, D] (unit norm) and, when ``features`` carries a surgery stream
        (inference), the dense surgery features [B, D, h, w] (unit norm per pixel), else None.
        """
        start = self.rec_head_start
        pix = features.maps[start]
        b, c, h, w = pix.shape
        cls = features.cls[start][:, None]
        x = torch.cat([cls.expand(b, num_sos, c), cls, pix.flatten(2).transpose(1, 2)], dim=1)
        bias = build_rec_attn_bias(attn_bias, grid=(h, w), num_heads=self.num_heads).to(x.dtype)

        x_surgery = None
        if features.surgery is not None:
            surgery = features.surgery
            x_surgery = torch.cat([surgery[:, :1].expand(b, num_sos, c), surgery], dim=1)
        for block in self.resblocks[start:]:
            if x_surgery is None:
                x = self._plain_block(block, x, bias)
            else:
                # The reference's "plain" bias for the surgery stream aliases the biased one, so both
                # streams see the same bias; only SOS rows carry it, and the dense output reads none.
                x, x_surgery = self._dual_block(block, x, x_surgery, bias)

        embeddings = self._project(x[:, :num_sos])
        if x_surgery is None:
            return embeddings, None
        dense = self._project(x_surgery[:, num_sos + 1 :])
        return embeddings, dense.transpose(1, 2).reshape(b, -1, h, w)
