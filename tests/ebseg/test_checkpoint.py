"""Checkpoints: the official-EBSeg, SAM and open_clip key maps, the fsspec IO helpers, strict loading,
download failures, and (once ``ebseg.build`` imports) the real models."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
import types
from pathlib import Path

import fsspec
import open_clip
import pytest
import torch
from torch import nn

from ebseg import checkpoint
from ebseg.build import build_ebseg
from ebseg.checkpoint import (
    CheckpointMismatchError,
    LoadReport,
    WeightsUnavailableError,
    convert_official_state_dict,
    load,
    load_clip_pretrained,
    load_into,
    load_official,
    load_sam_checkpoint,
    read_state,
    save,
)
from ebseg.config import get_config
from ebseg.official import (
    clip_state_from_open_clip,
    infer_official_preset,
    sam_state_from_official_sam,
)
from tests.conftest import require_reference

PRESET_FILES = {"base": "keys_ebseg_b", "large": "keys_ebseg_l"}
REC_START = {"base": 9, "large": 18}  # R: CLIP blocks held by the official extractor

# The layout ebseg's model has, written out independently of ebseg.official.
BLOCK = (
    r"(ln_1|ln_2)\.(weight|bias)|attn\.in_proj_(weight|bias)|attn\.out_proj\.(weight|bias)"
    r"|mlp\.(c_fc|c_proj)\.(weight|bias)"
)
LAYOUT = [
    r"clip\.(conv1\.weight|class_embedding|positional_embedding|ln_pre\.(weight|bias)|ln_post\.(weight|bias)|proj)",
    rf"clip\.resblocks\.\d+\.({BLOCK})",
    r"text\.(token_embedding\.weight|positional_embedding|text_projection|logit_scale|bg_embed|ln_final\.(weight|bias))",
    rf"text\.transformer\.resblocks\.\d+\.({BLOCK})",
    r"sam\.(patch_embed\.proj\.(weight|bias)|pos_embed)",
    r"sam\.blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.lin1|mlp\.lin2)\.(weight|bias)",
    r"sam\.blocks\.\d+\.attn\.rel_pos_[hw]",
    r"fusion\.[012]\.(norm|proj)\.(weight|bias)",
    r"pixel_decoder\..+",
    r"decoder\..+",
]
DROPPED = {"criterion.empty_weight", "ov_classifier.attn_mask"}
SHARED = {"clip_rec_head.proj", "clip_rec_head.ln_post.weight", "clip_rec_head.ln_post.bias"}


def in_layout(name: str) -> bool:
    return any(re.fullmatch(pattern, name) for pattern in LAYOUT)


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


# ----------------------------------------------------------------------------------------------------------
# Official EBSeg -> ebseg


@pytest.mark.parametrize("preset", ["base", "large"])
def test_official_conversion_covers_the_layout(preset):
    official = official_state(preset)
    out = convert_official_state_dict(official)
    config = get_config(preset)

    assert [name for name in out if not in_layout(name)] == []
    # One CLIP tower: blocks 0..layers-1, twelve entries each; twelve text blocks likewise.
    for prefix, layers in (("clip.resblocks", config.clip.layers), ("text.transformer.resblocks", 12)):
        found = [re.fullmatch(rf"{prefix}\.(\d+)\..+", name) for name in out]
        counts = {}
        for m in filter(None, found):
            counts[int(m[1])] = counts.get(int(m[1]), 0) + 1
        assert counts == dict.fromkeys(range(layers), 12)
    # Nothing lost: every official tensor but the two drops and the three duplicates comes out, unchanged.
    kept = {name for name in official if name not in DROPPED | SHARED}
    assert len(out) == len(official) - 5 == len(kept)
    assert {id(t) for t in out.values()} == {id(official[name]) for name in kept}
    for name in kept:
        for old, new in (
            ("sem_seg_head.pixel_decoder.", "pixel_decoder."),
            ("sem_seg_head.predictor.", "decoder."),
        ):
            if name.startswith(old):
                assert out[new + name.removeprefix(old)] is official[name]
        if name.startswith("ov_classifier."):
            assert out["text." + name.removeprefix("ov_classifier.")] is official[name]
        if name.startswith("backbone."):
            assert out["sam." + name.removeprefix("backbone.")] is official[name]


@pytest.mark.parametrize("preset", ["base", "large"])
def test_official_renames(preset):
    official = official_state(preset)
    out = convert_official_state_dict(official)
    r = REC_START[preset]
    last_extractor = r - 1
    expected = {
        "clip_visual_extractor.conv1.weight": "clip.conv1.weight",
        "clip_visual_extractor.positional_embedding": "clip.positional_embedding",
        "clip_visual_extractor.ln_post.bias": "clip.ln_post.bias",
        "clip_visual_extractor.proj": "clip.proj",
        # plain block: names already open_clip's
        "clip_visual_extractor.resblocks.0.attn.in_proj_weight": "clip.resblocks.0.attn.in_proj_weight",
        "clip_visual_extractor.resblocks.1.attn.out_proj.bias": "clip.resblocks.1.attn.out_proj.bias",
        # surgery blocks of the extractor
        f"clip_visual_extractor.resblocks.{last_extractor}.attn.qkv.weight": (
            f"clip.resblocks.{last_extractor}.attn.in_proj_weight"
        ),
        f"clip_visual_extractor.resblocks.{last_extractor}.attn.proj.bias": (
            f"clip.resblocks.{last_extractor}.attn.out_proj.bias"
        ),
        f"clip_visual_extractor.resblocks.{last_extractor}.mlp.c_fc.weight": (
            f"clip.resblocks.{last_extractor}.mlp.c_fc.weight"
        ),
        # rec head blocks continue the tower at R
        "clip_rec_head.resblocks.0.attn.qkv.bias": f"clip.resblocks.{r}.attn.in_proj_bias",
        "clip_rec_head.resblocks.0.attn.proj.weight": f"clip.resblocks.{r}.attn.out_proj.weight",
        "clip_rec_head.resblocks.2.ln_2.weight": f"clip.resblocks.{r + 2}.ln_2.weight",
        "ov_classifier.bg_embed": "text.bg_embed",
        "ov_classifier.logit_scale": "text.logit_scale",
        "ov_classifier.transformer.resblocks.11.mlp.c_proj.weight": (
            "text.transformer.resblocks.11.mlp.c_proj.weight"
        ),
        "backbone.pos_embed": "sam.pos_embed",
        "backbone.blocks.11.attn.rel_pos_h": "sam.blocks.11.attn.rel_pos_h",
        "sem_seg_head.clip_fusion_layers.0.0.weight": "fusion.0.norm.weight",
        "sem_seg_head.clip_fusion_layers.2.1.bias": "fusion.2.proj.bias",
        "sem_seg_head.pixel_decoder.input_proj.0.0.weight": "pixel_decoder.input_proj.0.0.weight",
        "sem_seg_head.predictor.bias_scaling.weight": "decoder.bias_scaling.weight",
    }
    for old, new in expected.items():
        assert out[new] is official[old], (old, new)
    assert not any("attn.qkv" in name or "attn.proj." in name for name in out if name.startswith("clip."))
    assert not any(name.startswith(("criterion", "text.attn_mask")) for name in out)


def test_infer_official_preset():
    base, large = official_state("base"), official_state("large")
    assert infer_official_preset(base) == "base"
    assert infer_official_preset({"model": large}) == "large"
    assert infer_official_preset(convert_official_state_dict(large)) == "large"
    with pytest.raises(ValueError, match="no released EBSeg model"):
        infer_official_preset({"clip.conv1.weight": torch.zeros(64, 3, 16, 16)})
    with pytest.raises(ValueError, match="conv1"):
        infer_official_preset({"backbone.pos_embed": torch.zeros(1)})


def test_official_wrapping_accepted():
    official = official_state("base")
    plain = convert_official_state_dict(official)
    wrapped = {"model": {"module." + k: v for k, v in official.items()}, "iteration": 5, "optimizer": {}}
    converted = convert_official_state_dict(wrapped)
    assert converted.keys() == plain.keys()
    assert all(converted[k] is plain[k] for k in plain)


def test_official_shared_tensors_checked():
    official = official_state("base")
    official["clip_rec_head.proj"] = official["clip_visual_extractor.proj"] + 1
    with pytest.raises(ValueError, match=r"clip_rec_head\.proj differs"):
        convert_official_state_dict(official)

    official = official_state("base")
    del official["clip_visual_extractor.ln_post.bias"]
    with pytest.raises(ValueError, match=r"clip_visual_extractor\.ln_post\.bias"):
        convert_official_state_dict(official)

    # An equal copy (not the same object, as after torch.load of a file that stored both) is fine.
    official = official_state("base")
    official["clip_rec_head.proj"] = official["clip_visual_extractor.proj"].clone()
    assert "clip.proj" in convert_official_state_dict(official)


@pytest.mark.parametrize(
    "extra_key",
    [
        "sem_seg_head.foo.weight",
        "backbone.neck.0.weight",  # SAM's neck is not part of EBSeg
        "clip_visual_extractor.resblocks.0.ls_1.gamma",
        "clip_visual_extractor.attn_pool.weight",
        "pixel_mean",
    ],
)
def test_official_unknown_key_raises(extra_key):
    official = official_state("base")
    official[extra_key] = torch.zeros(1)
    with pytest.raises(ValueError, match=re.escape(extra_key)):
        convert_official_state_dict(official)


def test_official_unknown_keys_listed_with_count():
    official = official_state("base")
    for i in range(13):
        official[f"mystery.{i}"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"13 unknown key\(s\).*mystery\.0.*\(and 3 more\)"):
        convert_official_state_dict(official)


# ----------------------------------------------------------------------------------------------------------
# SAM and open_clip -> ebseg


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


def test_sam_file_mapping():
    sd = sam_file_state()
    out = sam_state_from_official_sam(sd)
    assert set(out) == {
        "sam.patch_embed.proj.weight",
        "sam.patch_embed.proj.bias",
        "sam.pos_embed",
        "sam.blocks.0.norm1.weight",
        "sam.blocks.0.attn.qkv.weight",
        "sam.blocks.0.attn.rel_pos_h",
    }
    assert out["sam.blocks.0.attn.qkv.weight"] is sd["image_encoder.blocks.0.attn.qkv.weight"]
    assert all(in_layout(name) for name in out)
    with pytest.raises(ValueError, match="something_else"):
        sam_state_from_official_sam({**sd, "something_else": torch.zeros(1)})


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


def test_open_clip_mapping():
    sd = tiny_open_clip(init_logit_bias=-10.0).state_dict()
    assert "logit_bias" in sd
    sd["attn_mask"] = torch.zeros(16, 16)  # older open_clip releases saved the causal mask
    out = clip_state_from_open_clip(sd)
    assert [name for name in out if not in_layout(name)] == []
    assert len(out) == len(sd) - 2
    assert out["clip.conv1.weight"] is sd["visual.conv1.weight"]
    assert out["clip.proj"] is sd["visual.proj"]
    assert (
        out["clip.resblocks.1.attn.in_proj_weight"]
        is sd["visual.transformer.resblocks.1.attn.in_proj_weight"]
    )
    assert out["text.token_embedding.weight"] is sd["token_embedding.weight"]
    assert out["text.transformer.resblocks.1.mlp.c_fc.bias"] is sd["transformer.resblocks.1.mlp.c_fc.bias"]
    assert out["text.logit_scale"] is sd["logit_scale"]
    assert "text.bg_embed" not in out
    with pytest.raises(ValueError, match=r"visual\.transformer\.resblocks\.0\.ls_1\.gamma"):
        clip_state_from_open_clip({**sd, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(64)})


# ----------------------------------------------------------------------------------------------------------
# IO helpers and strict loading, on small stand-in models


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


@pytest.mark.parametrize("where", ["local", "file", "memory"])
def test_save_read_round_trip(where, tmp_path):
    uri = {
        "local": str(tmp_path / "sub" / "toy.pt"),
        "file": (tmp_path / "toy.pt").as_uri(),
        "memory": f"memory://ckpt-test/{tmp_path.name}/toy.pt",
    }[where]
    model = Toy(get_config("tiny"))
    save(model, uri, extra={"step": 7, "metrics": {"miou": 0.5}})

    with fsspec.open(uri, "rb") as f:
        raw = torch.load(f, weights_only=True)
    assert raw["format"] == "ebseg" and raw["version"] == 1
    assert raw["config"] == get_config("tiny").to_dict()
    assert raw["step"] == 7 and raw["metrics"] == {"miou": 0.5}
    assert "cache" not in raw["state_dict"]

    fresh = Toy(get_config("tiny"))
    report = load_into(fresh, read_state(uri))
    assert report.ok and report.loaded == 5  # clip.{weight,bias}, text.{weight,bias}, scale
    assert_same_state(model, fresh)
    if where == "local":
        assert os.listdir(tmp_path / "sub") == ["toy.pt"]  # no temporary file left behind


def test_save_refuses_extra_overriding_entries(tmp_path):
    with pytest.raises(ValueError, match="config"):
        save(Toy(get_config("tiny")), str(tmp_path / "x.pt"), extra={"config": {}})


def test_load_into_strict_lists_problems():
    model = Toy(get_config("tiny"))
    state = dict(model.state_dict())
    del state["clip.bias"]
    state["clip.weight"] = torch.zeros(5, 3)
    state["extra.thing"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as info:
        load_into(model, state)
    message = str(info.value)
    assert "1 missing: ['clip.bias']" in message
    assert "1 unexpected: ['extra.thing']" in message
    assert "('clip.weight', (4, 3), (5, 3))" in message


def test_load_into_non_strict_loads_what_matches():
    model = Toy(get_config("tiny"))
    target = Toy(get_config("tiny"))
    state = dict(model.state_dict())
    del state["clip.bias"]
    state["text.weight"] = torch.zeros(7)
    state["extra.thing"] = torch.zeros(1)
    before = target.clip.bias.detach().clone()
    report = load_into(target, state, strict=False)
    assert isinstance(report, LoadReport) and not report.ok
    assert report.missing == ["clip.bias"]
    assert report.unexpected == ["extra.thing"]
    assert report.mismatched == [("text.weight", (4,), (7,))]
    assert torch.equal(target.clip.weight, model.clip.weight)
    assert torch.equal(target.clip.bias, before)


def test_long_lists_are_cut_with_a_count():
    model = module_with({f"p{i}": (1,) for i in range(25)})
    with pytest.raises(CheckpointMismatchError, match=r"25 missing: \[.*\] \(and 15 more\)"):
        load_into(model, {})


@pytest.fixture
def fake_builder(monkeypatch):
    """Stands in for ebseg.build so that ``load`` can be tested on Toy models; records the configs."""
    built = []

    def build_ebseg(config):
        built.append(config)
        return Toy(config)

    monkeypatch.setitem(sys.modules, "ebseg.build", types.SimpleNamespace(build_ebseg=build_ebseg))
    return built


def test_load_rebuilds_from_the_stored_config(fake_builder, tmp_path):
    config = get_config("tiny")
    config = config.replace(clip=dataclasses.replace(config.clip, pretrained="openai"))
    model = Toy(config)
    uri = f"memory://ckpt-test/{tmp_path.name}/toy.pt"
    save(model, uri)
    loaded = load(uri)
    assert isinstance(loaded, Toy)
    assert_same_state(model, loaded)
    assert loaded.config == config  # the config as saved ...
    assert fake_builder[0].clip.pretrained is None  # ... but no initial weights fetched for a full checkpoint


def test_load_refuses_other_files(fake_builder, tmp_path):
    path = tmp_path / "bare.pt"
    torch.save(Toy(get_config("tiny")).state_dict(), path)
    with pytest.raises(ValueError, match="carries no config"):
        load(str(path))
    torch.save({"format": "ebseg", "version": 99, "config": {}, "state_dict": {}}, path)
    with pytest.raises(ValueError, match="version 99"):
        load(str(path))
    assert fake_builder == []


class NotATensor:
    pass


def test_read_state_refuses_pickled_objects(tmp_path):
    path = tmp_path / "d2.pth"
    torch.save({"model": {"a": torch.zeros(1)}, "scheduler": NotATensor()}, path)
    with pytest.raises(ValueError, match=r"weights_only=True.*\['model'\]") as info:
        read_state(str(path))
    assert info.value.__cause__ is None


def test_read_state_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_state(str(tmp_path / "nope.pt"))


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


# ----------------------------------------------------------------------------------------------------------
# Downloads without a network


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; open_clip downloads through it.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def assert_actionable(error: BaseException, *needles: str):
    assert error.__cause__ is None and error.__suppress_context__  # no chain the user cannot act on
    for needle in needles:
        assert needle in str(error)


def test_load_official_offline_fails_fast_with_a_fix(offline_hub):
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        load_official(preset="large")
    assert time.monotonic() - start < 10
    assert_actionable(
        info.value, "EBSeg_large.pth", "load_official('/path/to/EBSeg_large.pth')", "HF_ENDPOINT"
    )


def test_load_clip_pretrained_offline_fails_fast_with_a_fix(offline_hub):
    model = Toy(get_config("base"))
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        load_clip_pretrained(model, "openai")
    assert time.monotonic() - start < 10
    assert_actionable(info.value, "'openai'", "ViT-B-16", "HF_HUB_CACHE")


def test_load_official_rejects_unreleased_presets():
    with pytest.raises(ValueError, match="tiny"):
        load_official(preset="tiny")


# ----------------------------------------------------------------------------------------------------------
# The real models


@pytest.mark.parametrize("preset", ["base", "large"])
def test_official_checkpoint_fits_the_model(preset):
    official = official_state(preset)
    model = build_ebseg(get_config(preset))
    report = load_into(model, convert_official_state_dict(official))
    assert report.ok, report.describe()
    state = model.state_dict()
    r = REC_START[preset]
    assert torch.all(
        state[f"clip.resblocks.{r}.attn.in_proj_bias"] == official["clip_rec_head.resblocks.0.attn.qkv.bias"]
    )
    assert torch.all(state["fusion.1.proj.weight"] == official["sem_seg_head.clip_fusion_layers.1.1.weight"])


def test_load_reads_an_official_file():
    official = official_state("base")
    uri = "memory://ckpt-test/official/EBSeg_base.pth"
    with fsspec.open(uri, "wb") as f:  # zero-stride tensors keep this file small
        torch.save({"model": official, "iteration": 80000}, f)
    model = load(uri)
    assert model.config.name == "base"
    assert torch.all(
        model.state_dict()["decoder.bias_scaling.weight"]
        == official["sem_seg_head.predictor.bias_scaling.weight"]
    )
    with pytest.raises(ValueError, match="EBSeg-base"):
        load_official(uri, preset="large")


def test_tiny_round_trip(tmp_path):
    model = build_ebseg(get_config("tiny"))
    path = str(tmp_path / "tiny.pt")
    save(model, path, extra={"step": 1})
    loaded = load(path)
    assert type(loaded) is type(model)
    assert loaded.config == model.config
    assert_same_state(model, loaded)


def test_checkpoint_reexports_the_converter():
    assert checkpoint.convert_official_state_dict is convert_official_state_dict


def test_load_model_names_every_kind_of_weights(tmp_path, monkeypatch):
    with pytest.warns(checkpoint.RandomWeightsWarning, match="random weights"):
        tiny = checkpoint.load_model("tiny")
    assert tiny.config.name == "tiny"
    path = str(tmp_path / "m.pt")
    checkpoint.save(tiny, path)
    assert checkpoint.load_model(path).config == tiny.config
    monkeypatch.setattr(checkpoint, "DEMO_WEIGHTS", str(tmp_path / "absent.pt"))
    with pytest.raises(checkpoint.WeightsUnavailableError, match="demo weights are missing"):
        checkpoint.load_model("demo")
    monkeypatch.setattr(checkpoint, "DEMO_WEIGHTS", path)
    assert checkpoint.load_model("demo").config == tiny.config
