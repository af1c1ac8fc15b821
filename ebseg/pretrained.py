"""Initial weights for training: CLIP from open_clip (a pretrained tag or a file), SAM's image encoder from an
official SAM file. The paper starts EBSeg from both.

A built model (``ebseg.build_ebseg``) is filled in place, strictly within the part each source provides::

    model = build_ebseg("base")
    load_clip_pretrained(model, "openai")
    load_sam_checkpoint(model, "s3://weights/sam_vit_b_01ec64.pth")
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import Tensor, nn

from ebseg.checkpoint import LoadReport, load_checked, read_state
from ebseg.downloads import open_clip_state
from ebseg.official import clip_state_from_open_clip, sam_state_from_official_sam


def _load_scoped(
    model: nn.Module,
    state: Mapping[str, Tensor],
    *,
    prefixes: tuple[str, ...],
    keep: Iterable[str] = (),
    strict: bool,
    what: str,
) -> LoadReport:
    """Load a partial state dict, strict within ``prefixes`` (minus ``keep``, entries it cannot provide)."""
    keep = set(keep)
    expected = {
        name: tensor
        for name, tensor in model.state_dict().items()
        if name.startswith(prefixes) and name not in keep
    }
    return load_checked(model, state, expected, strict=strict, what=what)


def load_clip_pretrained(model: nn.Module, pretrained: str, *, strict: bool = True) -> LoadReport:
    """Initialise ``clip.*`` and ``text.*`` from CLIP weights; ``text.bg_embed`` keeps its value.

    pretrained: an open_clip tag for ``model.config.clip.model_name`` ("openai"), or the path/URI of an
    open_clip-format state dict. Strict within ``clip.*``/``text.*`` unless ``strict=False``.
    """
    import open_clip

    model_name = model.config.clip.model_name
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained in tags:
        source = open_clip_state(model_name, pretrained)
    else:
        try:
            source = read_state(pretrained)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"CLIP weights {pretrained!r}: neither an open_clip tag for {model_name} (known: {tags}) "
                "nor an existing file"
            ) from None
    return _load_scoped(
        model,
        clip_state_from_open_clip(source),
        prefixes=("clip.", "text."),
        keep=("text.bg_embed",),
        strict=strict,
        what=f"CLIP weights {pretrained!r}",
    )


def load_sam_checkpoint(model: nn.Module, uri: str, *, strict: bool = True) -> LoadReport:
    """Initialise ``sam.*`` from an official SAM file (``sam_vit_b_01ec64.pth``); strict within ``sam.*``."""
    return _load_scoped(
        model,
        sam_state_from_official_sam(read_state(uri)),
        prefixes=("sam.",),
        strict=strict,
        what=f"SAM checkpoint {uri}",
    )
