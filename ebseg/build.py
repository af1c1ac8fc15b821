"""``build_ebseg``: the one place that wires EBSeg's parts together and applies the freezing policy.

It builds the architecture only; weights are loaded afterwards, by ``ebseg.pretrained`` (initial CLIP and SAM
weights) or ``ebseg.checkpoint`` (trained models), so no weight file is ever read while building.
"""

from __future__ import annotations

from types import SimpleNamespace

import open_clip
import torch
from torch import nn

from ebseg.config import ClipConfig, EBSegConfig, get_config
from ebseg.model import EBSeg, FusionLayer
from ebseg.modeling.adab_decoder import AdaBDecoder
from ebseg.modeling.clip_encoder import ClipVisual
from ebseg.modeling.pixel_decoder import build_pixel_decoder
from ebseg.modeling.sam_encoder import build_sam_encoder
from ebseg.modeling.text_classifier import TextClassifier

# Parameters that train besides the decoder head (fusion, pixel decoder, AdaB decoder): the two
# positional embeddings of the frozen encoders and the background text row.
TRAINABLE_ENCODER_PARAMS = ("clip.positional_embedding", "sam.pos_embed", "text.bg_embed")
TRAINABLE_MODULES = ("fusion.", "pixel_decoder.", "decoder.")


def build_open_clip(config: ClipConfig) -> nn.Module:
    """An open_clip ``CLIP`` with EBSeg's architecture and random weights.

    QuickGELU always: the OpenAI weights were trained with it, and open_clip >= 2.2x builds nn.GELU for
    "ViT-B-16" unless told otherwise, which silently changes every feature.
    """
    vision = open_clip.model.CLIPVisionCfg(
        layers=config.layers,
        width=config.width,
        head_width=config.width // config.heads,
        patch_size=config.patch_size,
        image_size=config.image_size,
    )
    text = open_clip.model.CLIPTextCfg(
        context_length=config.context_length,
        vocab_size=config.vocab_size,
        width=config.text_width,
        heads=config.text_heads,
        layers=config.text_layers,
    )
    return open_clip.CLIP(embed_dim=config.embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=True)


def build_text_classifier(config: ClipConfig) -> TextClassifier:
    """The text tower alone (random weights), with the same parameter names as ``EBSeg.text``: loading it
    from a checkpoint's ``text.*`` entries encodes names without building (or reading) the image towers."""
    text_cfg = open_clip.model.CLIPTextCfg(
        context_length=config.context_length,
        vocab_size=config.vocab_size,
        width=config.text_width,
        heads=config.text_heads,
        layers=config.text_layers,
    )
    tower = open_clip.model._build_text_tower(config.embed_dim, text_cfg, quick_gelu=True)
    # TextClassifier takes CLIP's text attributes; a text tower has all of them but the temperature,
    # which the checkpoint's ``text.logit_scale`` overwrites.
    parts = SimpleNamespace(
        token_embedding=tower.token_embedding,
        positional_embedding=tower.positional_embedding,
        transformer=tower.transformer,
        ln_final=tower.ln_final,
        text_projection=tower.text_projection,
        logit_scale=nn.Parameter(torch.zeros(())),
        attn_mask=tower.attn_mask,
    )
    return TextClassifier(parts)


def apply_freezing(model: EBSeg) -> None:
    """Freeze CLIP and SAM except their positional embeddings; the text tower except ``bg_embed``."""
    for name, param in model.named_parameters():
        param.requires_grad = name in TRAINABLE_ENCODER_PARAMS or name.startswith(TRAINABLE_MODULES)


def build_ebseg(config: str | EBSegConfig = "base") -> EBSeg:
    """Build EBSeg from a preset name ("tiny", "base", "large") or a config.

    Weights are random: ``ebseg.pretrained`` loads CLIP / SAM initial weights into the built model,
    ``ebseg.checkpoint.load`` builds and fills a model from a trained checkpoint.
    """
    config = get_config(config)
    if config.pixel_decoder.conv_dim != config.decoder.hidden_dim:
        raise ValueError("pixel_decoder.conv_dim must equal decoder.hidden_dim (no input projection)")
    clip_model = build_open_clip(config.clip)
    clip = ClipVisual(
        clip_model.visual, rec_head_start=config.clip.rec_head_start, surgery_start=config.clip.surgery_start
    )
    text = TextClassifier(clip_model)
    sam = build_sam_encoder(config.sam)
    fusion = nn.ModuleList(FusionLayer(config.clip.width, config.sam.embed_dim) for _ in range(3))
    pixel_decoder = build_pixel_decoder(config.pixel_decoder, in_channels=config.sam.embed_dim)
    dc = config.decoder
    decoder = AdaBDecoder(
        hidden_dim=dc.hidden_dim,
        mask_dim=config.pixel_decoder.mask_dim,
        num_queries=dc.num_queries,
        num_heads=dc.num_heads,
        ffn_dim=dc.ffn_dim,
        num_layers=dc.num_layers,
        embed_dim=config.clip.embed_dim,
        clip_heads=config.clip.heads,
    )
    model = EBSeg(
        config=config,
        clip=clip,
        text=text,
        sam=sam,
        fusion=fusion,
        pixel_decoder=pixel_decoder,
        decoder=decoder,
    )
    apply_freezing(model)
    return model
