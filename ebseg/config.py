"""Typed configs for every EBSeg component and the named presets.

A preset is a plain function returning an :class:`EBSegConfig`; ``PRESETS`` maps names to them. A config
describes the architecture only: where initial weights come from (open_clip tags, SAM files) is the
business of ``ebseg.pretrained``, and trained weights live in checkpoints (``ebseg.checkpoint``).
``base`` and ``large`` reproduce the reference architecture of EBSeg-B and EBSeg-L exactly (an official
checkpoint converts onto them with no missing or unexpected key); ``tiny`` keeps every code path at a size
that runs a 256x256 forward on CPU in about a second, for tests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ClipConfig:
    """The CLIP tower (vision and text) and where EBSeg cuts the vision tower in two."""

    model_name: str = "ViT-B-16"  # open_clip architecture, used to look up pretrained tags
    embed_dim: int = 512  # joint image-text dimension D
    width: int = 768  # vision width C
    layers: int = 12
    heads: int = 12
    patch_size: int = 16
    image_size: int = 224  # pretraining resolution: the positional embedding's grid is image_size // patch
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12
    context_length: int = 77
    vocab_size: int = 49408
    # Blocks [0, rec_head_start) are the feature extractor, the rest the recognition head (9 for B, 18 for L).
    rec_head_start: int = 9
    # Outputs of these 1-based blocks are fused into SAM's res3 / res4 / res5.
    fusion_layers: tuple[int, int, int] = (3, 6, 9)
    # CLIP sees the padded canvas scaled by this factor (scale_factor semantics, floors the size).
    input_scale: float = 0.5

    @property
    def surgery_start(self) -> int:
        """First block (0-based) that runs the dual surgery path at inference: layers // 6."""
        return self.layers // 6


@dataclass(frozen=True)
class SamConfig:
    """SAM's image encoder (``segment_anything.modeling.ImageEncoderViT``), used frozen without its neck."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    global_attn_indexes: tuple[int, int, int, int] = (2, 5, 8, 11)  # tapped for res2..res5
    window_size: int = 14
    patch_size: int = 16
    img_size: int = 1024  # sets the stored pos_embed grid (64x64); it is resized to the real input


@dataclass(frozen=True)
class PixelDecoderConfig:
    """Mask2Former's multi-scale deformable-attention pixel decoder."""

    conv_dim: int = 256
    mask_dim: int = 256
    num_layers: int = 6
    num_heads: int = 8
    num_points: int = 4
    ffn_dim: int = 1024  # hard-coded in the reference, independent of the transformer decoder's
    num_groups: int = 32  # GroupNorm groups


@dataclass(frozen=True)
class DecoderConfig:
    """The AdaB (masked-attention) transformer decoder and its prediction heads."""

    hidden_dim: int = 256
    num_queries: int = 100
    num_heads: int = 8
    ffn_dim: int = 2048
    num_layers: int = 9  # predictions: one before the first layer and one after each, so layers + 1


@dataclass(frozen=True)
class BalanceConfig:
    """Exponents of the adaptive balancing at inference (paper Eq. 6/7).

    Seen classes weigh (A, D, B) by (1 - alpha - gamma, alpha, gamma), unseen ones by
    (1 - beta - gamma, beta, gamma).
    """

    alpha: float = 0.09
    beta: float = 0.3
    gamma: float = 0.7


# (part, field): weight sources older configs held; checkpoints saved with them still load.
_LEGACY_SOURCES = {("clip", "pretrained"), ("sam", "checkpoint")}


@dataclass(frozen=True)
class EBSegConfig:
    name: str = "base"
    clip: ClipConfig = field(default_factory=ClipConfig)
    sam: SamConfig = field(default_factory=SamConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    size_divisibility: int = 32  # each image is padded to a multiple of this
    # Inference resizes an image so its short side has this length (the paper's 640); a model trained at
    # another scale (the demo) records its own here, so Segmenter picks the right size by default.
    short_side: int = 640

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EBSegConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError`` naming them.

        Checkpoints written before weight sources left the configs (the shipped demo among them) carry
        ``clip.pretrained`` and ``sam.checkpoint``; their weights are in the checkpoint, so both are dropped.
        """
        parts = {
            "clip": ClipConfig,
            "sam": SamConfig,
            "pixel_decoder": PixelDecoderConfig,
            "decoder": DecoderConfig,
            "balance": BalanceConfig,
        }
        kwargs = dict(data)
        for key, part in parts.items():
            if key in kwargs:
                values = {k: v for k, v in dict(kwargs[key]).items() if (key, k) not in _LEGACY_SOURCES}
                for name, value in values.items():
                    if isinstance(value, list):  # JSON turns tuples into lists
                        values[name] = tuple(value)
                kwargs[key] = part(**values)
        return cls(**kwargs)

    def replace(self, **changes) -> EBSegConfig:
        return dataclasses.replace(self, **changes)


def base() -> EBSegConfig:
    """EBSeg-B: OpenAI CLIP ViT-B/16 + SAM ViT-B."""
    return EBSegConfig(name="base")


def large() -> EBSegConfig:
    """EBSeg-L: OpenAI CLIP ViT-L/14@336px + SAM ViT-B (the reference keeps vit_b for L as well)."""
    return EBSegConfig(
        name="large",
        clip=ClipConfig(
            model_name="ViT-L-14-336",
            embed_dim=768,
            width=1024,
            layers=24,
            heads=16,
            patch_size=14,
            image_size=336,
            text_width=768,
            text_heads=12,
            text_layers=12,
            rec_head_start=18,
            fusion_layers=(6, 12, 18),
            input_scale=0.7,
        ),
        balance=BalanceConfig(alpha=0.12, beta=0.4, gamma=0.6),
    )


def tiny() -> EBSegConfig:
    """Random-init toy with every code path of ``base`` (windowed and global SAM blocks, surgery blocks,
    deformable attention, masked attention); for tests and mechanics only."""
    return EBSegConfig(
        name="tiny",
        clip=ClipConfig(
            model_name="tiny",
            embed_dim=32,
            width=64,
            layers=6,
            heads=2,
            patch_size=16,
            image_size=112,
            text_width=64,
            text_heads=2,
            text_layers=2,
            rec_head_start=4,
            fusion_layers=(2, 3, 4),
            input_scale=0.5,
        ),
        sam=SamConfig(
            embed_dim=64,
            depth=5,
            num_heads=2,
            global_attn_indexes=(1, 2, 3, 4),
            window_size=4,
            patch_size=16,
            img_size=256,
        ),
        pixel_decoder=PixelDecoderConfig(
            conv_dim=64, mask_dim=64, num_layers=2, num_heads=4, num_points=2, ffn_dim=128, num_groups=8
        ),
        decoder=DecoderConfig(hidden_dim=64, num_queries=16, num_heads=4, ffn_dim=128, num_layers=3),
    )


def demo() -> EBSegConfig:
    """The architecture of the demo model shipped as ``ebseg/weights/demo.pt``: ``tiny`` trained from random
    weights on the synthetic shapes set at 128 px (every part but the text encoder trained, which the paper
    never does), so it runs at that scale."""
    return dataclasses.replace(tiny(), name="demo", short_side=128)


PRESETS = {"tiny": tiny, "demo": demo, "base": base, "large": large}


def get_config(name_or_config: str | EBSegConfig) -> EBSegConfig:
    if isinstance(name_or_config, EBSegConfig):
        return name_or_config
    try:
        return PRESETS[name_or_config]()
    except KeyError:
        raise ValueError(
            f"unknown EBSeg preset {name_or_config!r}; choose one of {sorted(PRESETS)} or pass an EBSegConfig"
        ) from None
