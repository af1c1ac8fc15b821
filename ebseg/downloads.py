"""Downloads of published weights: the official EBSeg release (Hugging Face Hub) and open_clip's CLIP weights.

Both go through the Hugging Face cache (``HF_HUB_CACHE``, ``HF_ENDPOINT`` for a mirror, ``HF_HUB_OFFLINE=1``
to forbid the network). A download that cannot happen raises ``WeightsUnavailableError`` at once, with the
fix in its message, before any model is built.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from torch import Tensor

HF_REPO = "slonetime/EBSeg"
HF_FILES = {"base": "EBSeg_base.pth", "large": "EBSeg_large.pth"}
_CACHE_FIX = (
    "or point HF_HUB_CACHE at a Hugging Face cache that holds it, or HF_ENDPOINT at a reachable mirror; "
    "HF_HUB_OFFLINE=1 forbids downloading: unset it to download."
)


class WeightsUnavailableError(RuntimeError):
    """Weights that had to be downloaded could not be had (offline, blocked, no cache)."""


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as the environment says now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return constants.HF_HUB_OFFLINE or env in {"1", "ON", "YES", "TRUE"}


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def official_file(preset: str) -> str:
    """The local path of the official ``base`` / ``large`` checkpoint, downloaded when not cached."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    filename = HF_FILES[preset]
    try:
        return hf_hub_download(
            HF_REPO,
            filename,
            endpoint=os.environ.get("HF_ENDPOINT") or None,
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
            local_files_only=hub_offline(),
        )
    except (OSError, EntryNotFoundError) as e:
        raise WeightsUnavailableError(
            f"could not get {filename} from the Hugging Face Hub ({HF_REPO}): {_short(e)}\n"
            f"Fix: download https://huggingface.co/{HF_REPO}/resolve/main/{filename} where you have "
            f"access and pass its path or URI: load_official('/path/to/{filename}') (s3://... and other "
            f"fsspec URIs work too); {_CACHE_FIX}"
        ) from None


def open_clip_state(model_name: str, tag: str) -> Mapping[str, Tensor]:
    """The state dict (open_clip names) of open_clip's pretrained weights ``tag`` for ``model_name``."""
    import open_clip

    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    try:
        # Fetch first, so that an offline machine fails here and not after building the model.
        open_clip.download_pretrained(open_clip.get_pretrained_cfg(model_name, tag), cache_dir=cache_dir)
    except OSError as e:
        raise WeightsUnavailableError(
            f"could not get the open_clip weights {tag!r} for {model_name}: {_short(e)}\n"
            f"Fix: where you have access, save them with torch.save(open_clip.create_model({model_name!r}, "
            f"pretrained={tag!r}, force_quick_gelu=True).state_dict(), 'clip.pt') and pass that path or URI "
            f"as `pretrained`; {_CACHE_FIX}"
        ) from None
    # QuickGELU: the OpenAI weights need it, and open_clip >= 2.2x builds nn.GELU for these names otherwise.
    # Only the weights are used here, but the model open_clip builds must be the one the weights belong to.
    clip_model = open_clip.create_model(
        model_name, pretrained=tag, force_quick_gelu=True, cache_dir=cache_dir
    )
    return clip_model.state_dict()
