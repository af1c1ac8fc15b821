"""EBSeg: images and class embeddings in, per-layer mask and class predictions out.

The module is pure: no IO, no caching, no resizing of outputs. The predictor (``ebseg.predictor``) turns
its outputs into label maps; the training job (``pipeline/``) applies DDP and autocast around it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ebseg.config import EBSegConfig
from ebseg.modeling.adab_decoder import AdaBDecoder
from ebseg.modeling.clip_encoder import ClipVisual
from ebseg.modeling.layers import ChannelLayerNorm, mask_pool
from ebseg.modeling.pixel_decoder import MSDeformAttnPixelDecoder
from ebseg.modeling.sam_encoder import SamEncoder
from ebseg.modeling.text_classifier import TextClassifier

# CLIP (OpenAI) and SAM normalisations, in 0..255 pixel units.
CLIP_MEAN = (122.770938, 116.746013, 104.093736)
CLIP_STD = (68.500533, 66.632158, 70.323163)
SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)


class FusionLayer(nn.Sequential):
    """CLIP feature map -> SAM width: channel LayerNorm then a 1x1 conv."""

    def __init__(self, clip_width: int, sam_width: int):
        super().__init__()
        self.norm = ChannelLayerNorm(clip_width)
        self.proj = nn.Conv2d(clip_width, sam_width, kernel_size=1)


@dataclass
class EBSegOutput:
    """Predictions; lists run over the decoder's predictions (the final one alone with
    ``EBSeg.forward(..., final_only=True)``), the last entry is the final one.

    pred_masks: [B, Q, H/4, W/4] mask logits. logits_a / logits_b: [B, Q, K + 1] class logits of
    embeddings A (decoder) and B (CLIP recognition head), background last. In eval mode the
    recognition head runs once, so ``logits_b`` holds the final prediction only, and ``logits_d``
    ([B, Q, K + 1], from mask-pooled CLIP-Surgery features, branch D) is set; in training it is None.
    embeddings_a: [B, Q, D] the (scaled) A embeddings, for the SSC loss.
    embeddings_b / embeddings_d: [B, Q, D] the embeddings behind ``logits_b`` and ``logits_d`` (eval mode
    only). With the final mask logits and ``embeddings_a[-1]`` they are everything the image contributes:
    the vocabulary enters only through the dot products with ``text.classifier`` (``ebseg.proposals``).
    """

    pred_masks: list[torch.Tensor]
    logits_a: list[torch.Tensor]
    logits_b: list[torch.Tensor]
    embeddings_a: list[torch.Tensor]
    logits_d: torch.Tensor | None = None
    embeddings_b: torch.Tensor | None = None
    embeddings_d: torch.Tensor | None = None


class EBSeg(nn.Module):
    def __init__(
        self,
        *,
        config: EBSegConfig,
        clip: ClipVisual,
        text: TextClassifier,
        sam: SamEncoder,
        fusion: nn.ModuleList,
        pixel_decoder: MSDeformAttnPixelDecoder,
        decoder: AdaBDecoder,
    ):
        super().__init__()
        self.config = config
        self.clip = clip
        self.text = text
        self.sam = sam
        self.fusion = fusion
        self.pixel_decoder = pixel_decoder
        self.decoder = decoder
        for name, values in (
            ("clip_mean", CLIP_MEAN),
            ("clip_std", CLIP_STD),
            ("sam_mean", SAM_MEAN),
            ("sam_std", SAM_STD),
        ):
            self.register_buffer(name, torch.tensor(values).view(1, 3, 1, 1), persistent=False)

    def _normalise(self, images: torch.Tensor, image_sizes: list[tuple[int, int]] | None):
        """Both normalisations; padding beyond ``image_sizes`` becomes 0 in each normalised space
        (the reference pads after normalising)."""
        images = images.float()
        clip_in = (images - self.clip_mean) / self.clip_std
        sam_in = (images - self.sam_mean) / self.sam_std
        if image_sizes is not None:
            h, w = images.shape[-2:]
            valid = torch.zeros(images.shape[0], 1, h, w, dtype=torch.bool, device=images.device)
            for i, (ih, iw) in enumerate(image_sizes):
                valid[i, :, :ih, :iw] = True
            clip_in = clip_in * valid
            sam_in = sam_in * valid
        return clip_in, sam_in

    def forward(
        self,
        images: torch.Tensor,
        class_embeddings: torch.Tensor,
        image_sizes: list[tuple[int, int]] | None = None,
        *,
        final_only: bool = False,
    ) -> EBSegOutput:
        """images: [B, 3, H, W] RGB in 0..255 (any float or uint8 dtype), H and W multiples of 32;
        class_embeddings: [K, D] unit text embeddings (``text.encode_names``); image_sizes: the valid
        (h, w) of each padded image, or None when nothing is padded (or padding is real pixels, as in
        training); final_only: the lists hold the final prediction alone (``AdaBDecoder.forward``: the
        decoder then skips the intermediate predictions' heads, which only the losses read)."""
        clip_in, sam_in = self._normalise(images, image_sizes)
        dual = not self.training
        # scale_factor (not size) floors the CLIP input size exactly as the reference does.
        clip_in = F.interpolate(clip_in, scale_factor=self.config.clip.input_scale, mode="bilinear")
        clip_features = self.clip.extract(clip_in, dual=dual)
        sam_features = self.sam(sam_in)

        for level, layer, index in zip(("res3", "res4", "res5"), self.fusion, self.config.clip.fusion_layers):
            res = sam_features[level]
            fused = F.interpolate(
                layer(clip_features.maps[index]), size=res.shape[-2:], mode="bilinear", align_corners=False
            )
            sam_features[level] = res + fused
        mask_features, multi_scale = self.pixel_decoder(sam_features)
        dec = self.decoder(multi_scale, mask_features, final_only=final_only)

        classifier = self.text.classifier(class_embeddings)  # [K + 1, D], scaled
        logits_a = [torch.einsum("bqc,nc->bqn", e, classifier) for e in dec.embeddings]
        num_sos = self.decoder.num_queries
        if self.training:
            logits_b = []
            for mask_embed in dec.mask_embeds:
                bias = self.decoder.attn_bias(mask_embed, dec.attn_hidden)
                emb_b, _ = self.clip.recognize(clip_features, bias, num_sos=num_sos)
                logits_b.append(torch.einsum("bqc,nc->bqn", emb_b, classifier))
            return EBSegOutput(dec.pred_masks, logits_a, logits_b, dec.embeddings)

        # Inference: only the last prediction is used, so the recognition head runs once.
        bias = self.decoder.attn_bias(dec.mask_embeds[-1], dec.attn_hidden)
        emb_b, dense = self.clip.recognize(clip_features, bias, num_sos=num_sos)
        masks = F.interpolate(dec.pred_masks[-1], size=dense.shape[-2:], mode="bilinear")
        pooled = mask_pool(dense, masks, threshold_on_logits=False)  # not renormalised: empty -> 0
        logits_d = torch.einsum("bqc,nc->bqn", pooled, classifier)
        logits_b = [torch.einsum("bqc,nc->bqn", emb_b, classifier)]
        return EBSegOutput(dec.pred_masks, logits_a, logits_b, dec.embeddings, logits_d, emb_b, pooled)
