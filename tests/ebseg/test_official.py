"""The official-EBSeg, SAM and open_clip key maps (``ebseg.official``) against the reference key lists."""

from __future__ import annotations

import re

import pytest
import torch

from ebseg.checkpoint import (
    convert_official_state_dict,
)
from ebseg.config import get_config
from ebseg.official import (
    clip_state_from_open_clip,
    infer_official_preset,
    sam_state_from_official_sam,
)
from tests.ebseg.weights_support import (
    REC_START,
    official_state,
    sam_file_state,
    tiny_open_clip,
)

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
