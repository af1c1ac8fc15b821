"""The AdaB decoder: Mask2Former's masked-attention transformer decoder with EBSeg's heads.

Per prediction (one before the first layer and one after each) it gives mask logits, the fully
supervised embeddings A (mask-pooled pixel features plus the query, projected into CLIP's joint space
with a learnable, clamped scale) and the query vectors from which the per-head attention bias for the CLIP
recognition head is computed (``attn_bias``). The bias is left to the caller because inference needs it
for the last prediction only, and it is large ([B, heads, Q, H/4, W/4]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ebseg.modeling.layers import MLP, mask_pool, sine_position_embedding
from ebseg.modeling.rec_head import AttnBias


def _xavier_matrices(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class CrossAttentionLayer(nn.Module):
    """Masked cross-attention from queries to one feature level, post-norm."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        _xavier_matrices(self)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        *,
        mask: torch.Tensor,
        pos: torch.Tensor,
        query_pos: torch.Tensor,
    ) -> torch.Tensor:
        """x: [B, Q, C]; memory, pos: [B, HW, C]; mask: [B * heads, Q, HW] bool, True = blocked."""
        out = self.multihead_attn(x + query_pos, memory + pos, memory, attn_mask=mask, need_weights=False)[0]
        return self.norm(x + out)


class SelfAttentionLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        _xavier_matrices(self)

    def forward(self, x: torch.Tensor, *, query_pos: torch.Tensor) -> torch.Tensor:
        q = x + query_pos
        return self.norm(x + self.self_attn(q, q, x, need_weights=False)[0])


class FFNLayer(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)
        _xavier_matrices(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.linear2(F.relu(self.linear1(x))))


@dataclass
class DecoderOutput:
    """Lists hold one entry per prediction (num_layers + 1), the last is the final one.

    pred_masks: [B, Q, H/4, W/4] mask logits; embeddings: [B, Q, D] embeddings A (norm = clamped scale);
    mask_embeds: [B, Q, mask_dim] the vectors behind both the masks and the attention bias;
    attn_hidden: [B, H/4, W/4, mask_dim] per-pixel hidden features of ``attn_proj`` before its last layer,
    from which ``AdaBDecoder.attn_bias`` computes the bias.
    """

    pred_masks: list[torch.Tensor]
    embeddings: list[torch.Tensor]
    mask_embeds: list[torch.Tensor]
    attn_hidden: torch.Tensor


class AdaBDecoder(nn.Module):
    NUM_LEVELS = 3

    def __init__(
        self,
        *,
        hidden_dim: int,
        mask_dim: int,
        num_queries: int,
        num_heads: int,
        ffn_dim: int,
        num_layers: int,
        embed_dim: int,
        clip_heads: int,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.clip_heads = clip_heads
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, num_heads) for _ in range(num_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, num_heads) for _ in range(num_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(FFNLayer(hidden_dim, ffn_dim) for _ in range(num_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(self.NUM_LEVELS, hidden_dim)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.pool_proj = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, hidden_dim))
        self.mask_embed1 = MLP(hidden_dim, hidden_dim, embed_dim, 3)
        self.logit_scale = nn.Parameter(torch.ones([]))  # used clamped to <= 10, not exponentiated
        self.attn_proj = MLP(mask_dim, mask_dim, mask_dim * clip_heads, 3)
        self.bias_scaling = nn.Linear(1, 1)

    @property
    def num_queries(self) -> int:
        return self.query_feat.num_embeddings

    def _heads(
        self, output: torch.Tensor, mask_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Heads on the current queries [B, Q, C]: (mask_embed, pred_mask, embeddings A)."""
        q = self.decoder_norm(output)
        mask_embed = self.mask_embed(q)
        pred_mask = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        pooled = self.pool_proj(mask_pool(mask_features, pred_mask))
        embeddings = self.mask_embed1(pooled + q)
        embeddings = torch.clamp(self.logit_scale, max=10) * F.normalize(embeddings, dim=-1)
        return mask_embed, pred_mask, embeddings

    def _attn_mask(self, mask_embed: torch.Tensor, level_features: torch.Tensor) -> torch.Tensor:
        """The next layer's attention mask: the mask logits at that layer's level, thresholded.

        mask_embed: [B, Q, c]; level_features: [B, c, h, w], the mask features bilinearly resized to the
        level (``forward``) -> [B * heads, Q, h * w] bool, True = blocked. The mask logits are linear in the
        mask features (no bias), so the product with the resized features equals the resized
        [B, Q, H/4, W/4] logits (the reference's order) up to float rounding, at the cost of the level's
        pixels instead of the stride-4 map's (1/64 .. 1/4 of them).
        """
        logits = torch.einsum("bqc,bchw->bqhw", mask_embed.detach(), level_features)
        blocked = logits.sigmoid().flatten(2) < 0.5
        return blocked.unsqueeze(1).expand(-1, self.num_heads, -1, -1).flatten(0, 1)

    def forward(
        self,
        multi_scale_features: list[torch.Tensor],
        mask_features: torch.Tensor,
        *,
        final_only: bool = False,
    ) -> DecoderOutput:
        """multi_scale_features: 3 maps [B, C, h_l, w_l], coarsest (stride 32) first;
        mask_features: [B, mask_dim, H/4, W/4].

        final_only: the output's lists hold the final prediction alone, and the intermediate predictions'
        masks, embeddings A and mask pooling are skipped (inference reads only the final prediction; the
        losses read all). Each layer's attention mask comes from the previous prediction's mask embedding
        the same way in both cases, so the final prediction is the same.
        """
        if len(multi_scale_features) != self.NUM_LEVELS:
            raise ValueError(f"expected {self.NUM_LEVELS} feature levels, got {len(multi_scale_features)}")
        sizes, src, pos = [], [], []
        for i, feat in enumerate(multi_scale_features):
            sizes.append(tuple(feat.shape[-2:]))
            pos.append(sine_position_embedding(feat, feat.shape[1] // 2).flatten(2).transpose(1, 2))
            src.append(feat.flatten(2).transpose(1, 2) + self.level_embed.weight[i])
        # The mask features at each level's size, for the attention masks (``_attn_mask``). No gradient
        # flows through a thresholded mask.
        with torch.no_grad():
            level_features = [
                F.interpolate(mask_features, size=size, mode="bilinear", align_corners=False)
                for size in sizes
            ]

        b = mask_features.shape[0]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(b, -1, -1)
        output = self.query_feat.weight.unsqueeze(0).expand(b, -1, -1)

        # attn_proj up to its last layer; attn_bias applies the last one folded into the query side.
        hidden = mask_features.permute(0, 2, 3, 1)  # [B, H/4, W/4, mask_dim]
        for layer in self.attn_proj.layers[:-1]:
            hidden = F.relu(layer(hidden))

        result = DecoderOutput(pred_masks=[], embeddings=[], mask_embeds=[], attn_hidden=hidden)
        num_layers = len(self.transformer_cross_attention_layers)
        for i in range(num_layers + 1):
            if i == num_layers or not final_only:
                mask_embed, pred_mask, embeddings = self._heads(output, mask_features)
                result.mask_embeds.append(mask_embed)
                result.pred_masks.append(pred_mask)
                result.embeddings.append(embeddings)
            else:
                mask_embed = self.mask_embed(self.decoder_norm(output))
            if i == num_layers:
                break  # no layer follows the final prediction: no attention mask
            level = i % self.NUM_LEVELS
            attn_mask = self._attn_mask(mask_embed, level_features[level])
            # A query whose mask covers nothing at this level would attend to nothing: let it see all.
            attn_mask = attn_mask & ~attn_mask.all(dim=-1, keepdim=True)
            output = self.transformer_cross_attention_layers[i](
                output, src[level], mask=attn_mask, pos=pos[level], query_pos=query_pos
            )
            output = self.transformer_self_attention_layers[i](output, query_pos=query_pos)
            output = self.transformer_ffn_layers[i](output)
        return result

    def attn_bias(self, mask_embed: torch.Tensor, attn_hidden: torch.Tensor) -> AttnBias:
        """Per-head attention bias for the CLIP recognition head.

        mask_embed: [B, Q, c]; attn_hidden: [B, h, w, c] (``DecoderOutput.attn_hidden``)
        -> pixels [B, heads, Q, h, w] and offset [B, heads, Q] (``AttnBias``).

        The bias is ``bias_scaling(<mask_embed, attn_proj(pixel)[head]>)``. The last layer of ``attn_proj``
        (c -> heads * c) and the scalar ``bias_scaling`` are linear, so they are applied to the queries
        instead of to every pixel: per head ``(s * mask_embed @ W_head) @ hidden + (s * mask_embed @ b_head
        + t)``, the first term per pixel, the second the offset. The same sum in another order (float
        rounding apart), without the [B, HW, heads * c] per-pixel features (315 MB and 20 GFLOP for base at
        640x640).
        """
        b, q, c = mask_embed.shape
        heads = self.clip_heads
        last = self.attn_proj.layers[-1]
        scale, shift = self.bias_scaling.weight.reshape(()), self.bias_scaling.bias.reshape(())
        # Output channels of the last layer are head-major: channel = head * c + j.
        weight = last.weight.reshape(heads, c, -1)  # [heads, c (j), hidden]
        query_side = torch.einsum("bqj,njk->bnqk", mask_embed * scale, weight).reshape(b, heads * q, -1)
        offset = (mask_embed @ last.bias.reshape(heads, c).T).transpose(1, 2) * scale + shift  # [B, heads, Q]
        pixels = torch.bmm(query_side, attn_hidden.flatten(1, 2).transpose(1, 2))  # [B, heads * Q, h*w]
        return AttnBias(pixels.reshape(b, heads, q, *attn_hidden.shape[1:3]), offset)
