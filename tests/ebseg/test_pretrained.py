"""CLIP and SAM initial weights (``ebseg.pretrained``), from files, open_clip tags, and an offline hub."""

from __future__ import annotations

import time

import open_clip
import pytest
import torch
from torch import nn

from ebseg.checkpoint import (
    CheckpointMismatchError,
)
from ebseg.config import get_config
from ebseg.downloads import WeightsUnavailableError
from ebseg.official import (
    clip_state_from_open_clip,
    sam_state_from_official_sam,
)
from ebseg.pretrained import load_clip_pretrained, load_sam_checkpoint
from tests.ebseg.weights_support import (
    Toy,
    assert_actionable,
    module_with,
    sam_file_state,
    tiny_open_clip,
)

# ----------------------------------------------------------------------------------------------------------
# CLIP and SAM initial weights


def clip_model_like(clip_sd: dict[str, torch.Tensor], config=None) -> nn.Module:
    shapes = {name: tuple(t.shape) for name, t in clip_state_from_open_clip(clip_sd).items()}
    shapes["text.bg_embed"] = (1, 32)
    shapes["sam.pos_embed"] = (1, 2, 2, 8)
    return module_with(shapes, config or get_config("tiny"))


def test_load_clip_pretrained_from_a_file(tmp_path):
    clip_sd = tiny_open_clip().state_dict()
    path = tmp_path / "clip.pt"
    torch.save(clip_sd, path)
    model = clip_model_like(clip_sd)
    with torch.no_grad():
        model.text.bg_embed.fill_(3.0)
        model.sam.pos_embed.fill_(4.0)
    report = load_clip_pretrained(model, str(path))
    assert report.ok and report.loaded == len(clip_sd)
    state = model.state_dict()
    assert torch.equal(
        state["clip.resblocks.1.mlp.c_proj.weight"],
        clip_sd["visual.transformer.resblocks.1.mlp.c_proj.weight"],
    )
    assert torch.equal(state["text.positional_embedding"], clip_sd["positional_embedding"])
    assert torch.all(state["text.bg_embed"] == 3.0) and torch.all(state["sam.pos_embed"] == 4.0)

    del clip_sd["ln_final.bias"]
    torch.save(clip_sd, path)
    with pytest.raises(CheckpointMismatchError, match=r"text\.ln_final\.bias"):
        load_clip_pretrained(model, str(path))


def test_load_clip_pretrained_unknown_source(tmp_path):
    model = clip_model_like(tiny_open_clip().state_dict())
    with pytest.raises(FileNotFoundError, match="neither an open_clip tag"):
        load_clip_pretrained(model, str(tmp_path / "missing.pt"))


def test_load_clip_pretrained_tag_builds_quick_gelu(monkeypatch):
    # The tag path asks open_clip for the model with QuickGELU (OpenAI weights need it; open_clip >= 2.2x
    # builds GELU otherwise) and copies its weights.
    source = tiny_open_clip()
    calls = []

    def create_model(name, **kwargs):
        calls.append((name, kwargs))
        return source

    monkeypatch.setattr(open_clip, "list_pretrained_tags_by_model", lambda name: ["sometag"])
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda name, tag: {"hf_hub": "x/y/"})
    monkeypatch.setattr(open_clip, "download_pretrained", lambda cfg, **kwargs: "/cached/file")
    monkeypatch.setattr(open_clip, "create_model", create_model)
    model = clip_model_like(source.state_dict())
    assert load_clip_pretrained(model, "sometag").ok
    assert calls[0][0] == "tiny"
    assert calls[0][1]["pretrained"] == "sometag" and calls[0][1]["force_quick_gelu"] is True
    assert torch.equal(model.state_dict()["clip.class_embedding"], source.visual.class_embedding)


def test_load_sam_checkpoint(tmp_path):
    sd = sam_file_state()
    path = tmp_path / "sam_vit_b.pth"
    torch.save(sd, path)
    mapped = sam_state_from_official_sam(sd)
    shapes = {name: tuple(t.shape) for name, t in mapped.items()}
    model = module_with({**shapes, "clip.proj": (2, 2)})
    report = load_sam_checkpoint(model, str(path))
    assert report.ok and report.loaded == len(mapped)
    assert torch.equal(model.state_dict()["sam.pos_embed"], sd["image_encoder.pos_embed"])

    model = module_with({**shapes, "sam.blocks.0.norm1.bias": (8,)})
    with pytest.raises(CheckpointMismatchError, match=r"sam\.blocks\.0\.norm1\.bias"):
        load_sam_checkpoint(model, str(path))


def test_load_clip_pretrained_offline_fails_fast_with_a_fix(offline_hub):
    model = Toy(get_config("base"))
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        load_clip_pretrained(model, "openai")
    assert time.monotonic() - start < 10
    assert_actionable(info.value, "'openai'", "ViT-B-16", "HF_HUB_CACHE")
