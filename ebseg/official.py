"""Key maps from foreign checkpoints to ebseg's state-dict layout.

Three sources, each an explicit table below:

- the official EBSeg release (``EBSeg_base.pth`` / ``EBSeg_large.pth``, detectron2 files): the CLIP vision
  tower is split there between ``clip_visual_extractor`` (blocks ``0..R-1``) and ``clip_rec_head`` (the
  rest, numbered from 0), with "surgery" attention names (``attn.qkv`` / ``attn.proj``) for most blocks;
  ours keeps one tower ``clip.resblocks.0..layers-1`` with ``nn.MultiheadAttention`` names;
- an official SAM file (``sam_vit_b_01ec64.pth``): only the image encoder, without its neck;
- an open_clip CLIP state dict: the vision tower and the text tower.

Every function returns a new dict holding the *same* tensor objects (no copies) and raises ``ValueError``
naming the keys it does not know, so a renamed upstream module fails loudly instead of loading half a model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

# ----------------------------------------------------------------------------------------------------------
# Shared pieces

# open_clip's residual-block entries, as ours (and the official plain blocks and text tower) name them.
CLIP_BLOCK_SUFFIXES = frozenset(
    {
        "ln_1.weight",
        "ln_1.bias",
        "attn.in_proj_weight",
        "attn.in_proj_bias",
        "attn.out_proj.weight",
        "attn.out_proj.bias",
        "ln_2.weight",
        "ln_2.bias",
        "mlp.c_fc.weight",
        "mlp.c_fc.bias",
        "mlp.c_proj.weight",
        "mlp.c_proj.bias",
    }
)

# The vision tower's entries outside its blocks (``visual.*`` in open_clip, ``clip.*`` here).
CLIP_VISUAL_STEM = (
    "conv1.weight",
    "class_embedding",
    "positional_embedding",
    "ln_pre.weight",
    "ln_pre.bias",
    "ln_post.weight",
    "ln_post.bias",
    "proj",
)

# ----------------------------------------------------------------------------------------------------------
# Official EBSeg -> ebseg

# Entries that are not model state here, with the reason.
OFFICIAL_DROPPED = {
    "criterion.empty_weight": "the loss's no-object weight, a constant the criterion rebuilds",
    "ov_classifier.attn_mask": "the text tower's causal mask, rebuilt as a non-persistent buffer",
}

# The recognition head holds the extractor's ln_post and proj (the same tensors, saved twice): they must be
# equal, and only the extractor's copy is kept.
OFFICIAL_SHARED = {
    "clip_rec_head.ln_post.weight": "clip_visual_extractor.ln_post.weight",
    "clip_rec_head.ln_post.bias": "clip_visual_extractor.ln_post.bias",
    "clip_rec_head.proj": "clip_visual_extractor.proj",
}

# Surgery blocks hold a cloned attention as a plain qkv/proj pair; same tensors, open_clip's names.
SURGERY_RENAMES = {
    "attn.qkv.weight": "attn.in_proj_weight",
    "attn.qkv.bias": "attn.in_proj_bias",
    "attn.proj.weight": "attn.out_proj.weight",
    "attn.proj.bias": "attn.out_proj.bias",
}

OFFICIAL_EXTRACTOR = "clip_visual_extractor."
OFFICIAL_EXTRACTOR_BLOCK = re.compile(r"clip_visual_extractor\.resblocks\.(\d+)\.(.+)")
OFFICIAL_REC_BLOCK = re.compile(r"clip_rec_head\.resblocks\.(\d+)\.(.+)")
# clip_fusion_layers.{i} is nn.Sequential(channel LayerNorm, 1x1 conv).
OFFICIAL_FUSION = re.compile(r"sem_seg_head\.clip_fusion_layers\.(\d+)\.([01])\.(weight|bias)")
FUSION_PARTS = {"0": "norm", "1": "proj"}

# Whole subtrees that keep their suffix; first match wins.
OFFICIAL_PREFIXES = (
    ("ov_classifier.", "text."),
    ("backbone.", "sam."),
    ("sem_seg_head.pixel_decoder.", "pixel_decoder."),
    ("sem_seg_head.predictor.", "decoder."),
)
# SAM's neck is cut off in EBSeg; a checkpoint holding one is not an EBSeg checkpoint.
OFFICIAL_REFUSED_PREFIXES = ("backbone.neck.",)

# Keys that only an official EBSeg checkpoint has.
OFFICIAL_MARKERS = ("sem_seg_head.", "clip_visual_extractor.", "clip_rec_head.", "ov_classifier.")

# The CLIP patch embedding tells the two released models apart.
PRESET_BY_CONV1_SHAPE = {(768, 3, 16, 16): "base", (1024, 3, 14, 14): "large"}


def unwrap_state_dict(obj: Mapping) -> Mapping[str, Tensor]:
    """The state dict inside a checkpoint: ``obj["model"]`` for detectron2 files, else ``obj`` itself."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    model = obj.get("model")
    return model if isinstance(model, Mapping) else obj


def strip_module_prefix(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop the ``module.`` prefix that (Distributed)DataParallel puts on every name."""
    return {name.removeprefix("module."): tensor for name, tensor in state.items()}


def is_official_state_dict(state: Mapping[str, Tensor]) -> bool:
    return any(name.removeprefix("module.").startswith(OFFICIAL_MARKERS) for name in state)


def infer_official_preset(state: Mapping) -> str:
    """``"base"`` or ``"large"`` from the CLIP patch embedding (official or ebseg names, wrapped or not)."""
    state = strip_module_prefix(unwrap_state_dict(state))
    for name in (OFFICIAL_EXTRACTOR + "conv1.weight", "clip.conv1.weight"):
        if name in state:
            shape = tuple(state[name].shape)
            if shape in PRESET_BY_CONV1_SHAPE:
                return PRESET_BY_CONV1_SHAPE[shape]
            raise ValueError(
                f"{name} has shape {list(shape)}, which matches no released EBSeg model "
                f"({ {v: list(k) for k, v in PRESET_BY_CONV1_SHAPE.items()} })"
            )
    raise ValueError("cannot tell the EBSeg preset: the state dict has no CLIP conv1.weight")


def convert_official_state_dict(official: Mapping) -> dict[str, Tensor]:
    """Rename an official EBSeg state dict (bare, or a detectron2 ``{"model": ...}`` file) to ebseg's layout.

    Drops ``OFFICIAL_DROPPED`` and the rec head's duplicate ``ln_post``/``proj`` (after checking they equal
    the extractor's); every other key is renamed, and a key outside the tables raises ``ValueError``.
    """
    state = strip_module_prefix(unwrap_state_dict(official))
    _check_shared(state)
    rec_offset = _count_extractor_blocks(state)
    out: dict[str, Tensor] = {}
    unknown = []
    for name, tensor in state.items():
        if name in OFFICIAL_DROPPED or name in OFFICIAL_SHARED:
            continue
        new = _official_name(name, rec_offset)
        if new is None:
            unknown.append(name)
        elif new in out:
            raise ValueError(f"two official keys map to {new!r} (the second is {name!r})")
        else:
            out[new] = tensor
    if unknown:
        raise ValueError(unknown_keys_message(unknown, "official EBSeg checkpoint"))
    return out


def _official_name(name: str, rec_offset: int) -> str | None:
    if m := OFFICIAL_EXTRACTOR_BLOCK.fullmatch(name):
        return _clip_block_name(int(m[1]), m[2])
    if m := OFFICIAL_REC_BLOCK.fullmatch(name):
        return _clip_block_name(rec_offset + int(m[1]), m[2])
    if name.startswith(OFFICIAL_EXTRACTOR):
        rest = name.removeprefix(OFFICIAL_EXTRACTOR)
        return "clip." + rest if rest in CLIP_VISUAL_STEM else None
    if m := OFFICIAL_FUSION.fullmatch(name):
        return f"fusion.{m[1]}.{FUSION_PARTS[m[2]]}.{m[3]}"
    if name.startswith(OFFICIAL_REFUSED_PREFIXES):
        return None
    for old, new in OFFICIAL_PREFIXES:
        if name.startswith(old):
            return new + name.removeprefix(old)
    return None


def _clip_block_name(index: int, suffix: str) -> str | None:
    suffix = SURGERY_RENAMES.get(suffix, suffix)
    return f"clip.resblocks.{index}.{suffix}" if suffix in CLIP_BLOCK_SUFFIXES else None


def _count_extractor_blocks(state: Mapping[str, Tensor]) -> int:
    """R: the number of CLIP blocks the extractor holds; the rec head's block j is tower block R + j."""
    found = {int(m[1]) for name in state if (m := OFFICIAL_EXTRACTOR_BLOCK.fullmatch(name))}
    if found != set(range(len(found))):
        raise ValueError(f"clip_visual_extractor.resblocks are not numbered 0..n-1: {sorted(found)}")
    return len(found)


def _check_shared(state: Mapping[str, Tensor]) -> None:
    for alias, canonical in OFFICIAL_SHARED.items():
        if alias not in state:
            continue
        if canonical not in state:
            raise ValueError(f"{alias} is present but {canonical}, the tensor it duplicates, is not")
        a, b = state[alias], state[canonical]
        if a.shape != b.shape or not a.detach().cpu().equal(b.detach().cpu()):
            raise ValueError(
                f"{alias} differs from {canonical}; the official model shares one tensor between them, "
                "so this checkpoint was edited or is not an EBSeg checkpoint"
            )


# ----------------------------------------------------------------------------------------------------------
# Official SAM -> ebseg (sam.*)

SAM_PREFIX = "image_encoder."
SAM_SKIPPED_PREFIXES = ("image_encoder.neck.", "prompt_encoder.", "mask_decoder.")  # not used by EBSeg
SAM_SKIPPED_KEYS = ("pixel_mean", "pixel_std")  # SAM's normalisation constants, fixed in the model


def sam_state_from_official_sam(sd: Mapping) -> dict[str, Tensor]:
    """``image_encoder.*`` of a ``sam_vit_*.pth`` file -> ``sam.*``; the neck and the prompt and mask
    decoders are skipped; any other key raises ``ValueError``."""
    state = strip_module_prefix(unwrap_state_dict(sd))
    out: dict[str, Tensor] = {}
    unknown = []
    for name, tensor in state.items():
        if name.startswith(SAM_SKIPPED_PREFIXES) or name in SAM_SKIPPED_KEYS:
            continue
        if name.startswith(SAM_PREFIX):
            out["sam." + name.removeprefix(SAM_PREFIX)] = tensor
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(unknown_keys_message(unknown, "SAM checkpoint"))
    return out


# ----------------------------------------------------------------------------------------------------------
# open_clip CLIP -> ebseg (clip.*, text.*)

OPEN_CLIP_DROPPED = ("attn_mask", "logit_bias")  # causal mask (rebuilt); SigLIP's bias (unused)
OPEN_CLIP_TEXT = (
    "token_embedding.weight",
    "positional_embedding",
    "text_projection",
    "logit_scale",
    "ln_final.weight",
    "ln_final.bias",
)
OPEN_CLIP_VISUAL_BLOCK = re.compile(r"visual\.transformer\.resblocks\.(\d+)\.(.+)")
OPEN_CLIP_TEXT_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


def clip_state_from_open_clip(sd: Mapping) -> dict[str, Tensor]:
    """An open_clip ``CLIP`` state dict -> ``clip.*`` (vision tower) and ``text.*`` (text tower).

    ``text.bg_embed`` has no counterpart in CLIP and is not produced. Any key outside the tables (LayerScale,
    attention pooling, a custom text tower, ...) raises ``ValueError``: ebseg's towers have no place for it.
    """
    state = strip_module_prefix(unwrap_state_dict(sd))
    out: dict[str, Tensor] = {}
    unknown = []
    for name, tensor in state.items():
        if name in OPEN_CLIP_DROPPED:
            continue
        new = _open_clip_name(name)
        if new is None:
            unknown.append(name)
        else:
            out[new] = tensor
    if unknown:
        raise ValueError(unknown_keys_message(unknown, "open_clip state dict"))
    return out


def _open_clip_name(name: str) -> str | None:
    if m := OPEN_CLIP_VISUAL_BLOCK.fullmatch(name):
        return f"clip.resblocks.{m[1]}.{m[2]}" if m[2] in CLIP_BLOCK_SUFFIXES else None
    if m := OPEN_CLIP_TEXT_BLOCK.fullmatch(name):
        return f"text.transformer.resblocks.{m[1]}.{m[2]}" if m[2] in CLIP_BLOCK_SUFFIXES else None
    if name.startswith("visual."):
        rest = name.removeprefix("visual.")
        return "clip." + rest if rest in CLIP_VISUAL_STEM else None
    return "text." + name if name in OPEN_CLIP_TEXT else None


def unknown_keys_message(names: list[str], source: str, shown: int = 10) -> str:
    more = f" (and {len(names) - shown} more)" if len(names) > shown else ""
    return f"{len(names)} unknown key(s) in the {source}: {names[:shown]}{more}"
