"""Helpers shared by the weight-loading tests: official-layout state dicts from the reference key lists,
small stand-in models, and an offline Hugging Face Hub."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from torch import nn

from tests.conftest import require_reference

PRESET_FILES = {"base": "keys_ebseg_b", "large": "keys_ebseg_l"}
REC_START = {"base": 9, "large": 18}  # R: CLIP blocks held by the official extractor


def reference_file(stem: str) -> Path:
    return require_reference() / f"{stem}.json"


def official_state(preset: str) -> dict[str, torch.Tensor]:
    """A state dict in the official layout with the true names and shapes. Entry i holds the value i as a
    zero-stride view (no memory), so every tensor is its own object; aliases share their canonical tensor."""
    stem = PRESET_FILES[preset]
    entries = json.loads(reference_file(stem).read_text())
    aliases = json.loads(reference_file(f"{stem}_aliases").read_text())["aliases"]
    state = {
        e["name"]: torch.tensor(float(i)).expand(e["shape"])
        for i, e in enumerate(entries)
        if e["name"] not in aliases
    }
    for alias, canonical in aliases.items():
        state[alias] = state[canonical]
    return {e["name"]: state[e["name"]] for e in entries}  # keep the file's order


def sam_file_state() -> dict[str, torch.Tensor]:
    return {
        "image_encoder.patch_embed.proj.weight": torch.randn(8, 3, 16, 16),
        "image_encoder.patch_embed.proj.bias": torch.randn(8),
        "image_encoder.pos_embed": torch.randn(1, 4, 4, 8),
        "image_encoder.blocks.0.norm1.weight": torch.randn(8),
        "image_encoder.blocks.0.attn.qkv.weight": torch.randn(24, 8),
        "image_encoder.blocks.0.attn.rel_pos_h": torch.randn(7, 4),
        "image_encoder.neck.0.weight": torch.randn(4, 8, 1, 1),
        "image_encoder.neck.1.weight": torch.randn(4),
        "prompt_encoder.no_mask_embed.weight": torch.randn(1, 4),
        "mask_decoder.iou_token.weight": torch.randn(1, 4),
        "pixel_mean": torch.randn(3, 1, 1),
        "pixel_std": torch.randn(3, 1, 1),
    }


def tiny_open_clip(**kwargs) -> open_clip.CLIP:
    return open_clip.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.model.CLIPVisionCfg(
            image_size=32, patch_size=16, width=64, layers=2, head_width=32
        ),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=16, vocab_size=100, width=64, heads=2, layers=2),
        quick_gelu=True,
        **kwargs,
    )


class Toy(nn.Module):
    """A model-like module: a ``config`` attribute, parameters, a buffer and a non-persistent buffer."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.clip = nn.Linear(3, 4)
        self.text = nn.LayerNorm(4)
        self.register_buffer("scale", torch.rand(2))
        self.register_buffer("cache", torch.zeros(1), persistent=False)


def module_with(shapes: dict[str, tuple[int, ...]], config=None) -> nn.Module:
    """A module tree whose state dict has exactly these names (zero-filled parameters)."""
    root = nn.Module()
    for name, shape in shapes.items():
        *path, leaf = name.split(".")
        node = root
        for part in path:
            if part not in node._modules:
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, nn.Parameter(torch.zeros(shape)))
    root.config = config
    return root


def assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def assert_actionable(error: BaseException, *needles: str):
    assert error.__cause__ is None and error.__suppress_context__  # no chain the user cannot act on
    for needle in needles:
        assert needle in str(error)
