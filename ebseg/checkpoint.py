"""Reading and writing EBSeg weights: ebseg checkpoints, the official release, CLIP and SAM initial weights.

Every path is an fsspec URI (a local path, ``file://``, ``s3://``, ``memory://``, ...) and every file is read
with ``torch.load(..., weights_only=True)``. An ebseg checkpoint carries the config it was built from::

    {"format": "ebseg", "version": 1, "config": EBSegConfig.to_dict(), "state_dict": {...}, **extra}

so ``load(uri)`` needs nothing else. Loading compares names and shapes first and, by default, refuses a
checkpoint with missing, unexpected or mis-shaped entries, listing them.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import uuid
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from torch import Tensor, nn

from ebseg.config import EBSegConfig, get_config
from ebseg.official import (
    clip_state_from_open_clip,
    convert_official_state_dict,
    infer_official_preset,
    is_official_state_dict,
    sam_state_from_official_sam,
    unwrap_state_dict,
)

__all__ = [
    "CheckpointMismatchError",
    "LoadReport",
    "RandomWeightsWarning",
    "WeightsUnavailableError",
    "convert_official_state_dict",
    "load",
    "load_clip_pretrained",
    "load_into",
    "load_model",
    "load_official",
    "load_sam_checkpoint",
    "read_state",
    "save",
]

FORMAT = "ebseg"
VERSION = 1
HF_REPO = "slonetime/EBSeg"
HF_FILES = {"base": "EBSeg_base.pth", "large": "EBSeg_large.pth"}
_SHOWN = 10  # names listed per kind in an error message
# The project's own small model, trained on the synthetic shapes set and shipped with the package.
DEMO_WEIGHTS = os.path.join(os.path.dirname(__file__), "weights", "demo.pt")
RANDOM_PRESETS = ("tiny",)  # presets whose only weights are random: mechanics and tests


class CheckpointMismatchError(RuntimeError):
    """A state dict does not fit the model: missing, unexpected or mis-shaped entries."""


class RandomWeightsWarning(UserWarning):
    """A model with random weights was asked for: its labels are meaningless."""


class WeightsUnavailableError(RuntimeError):
    """Weights that had to be downloaded could not be had (offline, blocked, no cache)."""


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)  # in the model, not in the state dict
    unexpected: list[str] = field(default_factory=list)  # in the state dict, not in the model
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(
        default_factory=list
    )  # (name, model shape, checkpoint shape); not loaded
    loaded: int = 0  # entries copied into the model

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        parts = []
        for label, items in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("shape mismatch (name, model, checkpoint)", self.mismatched),
        ):
            if items:
                more = f" (and {len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
                parts.append(f"{len(items)} {label}: {items[:_SHOWN]}{more}")
        return "; ".join(parts) if parts else "all entries match"


# ----------------------------------------------------------------------------------------------------------
# Files


def _read_object(uri: str, map_location=None) -> object:
    try:
        with fsspec.open(uri, "rb") as f:
            return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{uri} holds objects other than tensors and plain containers, which "
            f"torch.load(weights_only=True) refuses ({first}). A detectron2 file may carry optimizer or "
            "scheduler objects: if you trust it, re-save only its weights: "
            "torch.save(torch.load(path, weights_only=False)['model'], new_path)."
        ) from None


def read_state(uri: str, *, map_location="cpu") -> dict[str, Tensor]:
    """The state dict in a file: the ``state_dict`` of an ebseg checkpoint, ``model`` of a detectron2 one,
    or the file itself when it is a bare state dict. Names are returned as stored."""
    obj = _read_object(uri, map_location)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        return dict(obj["state_dict"])
    return dict(unwrap_state_dict(obj))


def save(model: nn.Module, uri: str, *, extra: dict | None = None) -> None:
    """Write ``model`` (with its ``.config``) as an ebseg checkpoint.

    ``extra`` entries (step, metrics, ...) are stored next to the weights and must be weights_only-loadable
    (tensors, numbers, strings, lists, dicts). Local files are written under a temporary name and renamed,
    so a crash never leaves a truncated checkpoint; elsewhere the file is written in one piece.
    """
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": model.config.to_dict(),
        "state_dict": model.state_dict(),
    }
    clash = sorted(payload.keys() & (extra or {}).keys())
    if clash:
        raise ValueError(f"extra may not override the checkpoint's own entries {clash}")
    payload.update(extra or {})

    fs, path = fsspec.core.url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(tmp, "wb") as f:
                torch.save(payload, f)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        # Object stores upload on close; serialising first means a failure leaves no partial object.
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        with fs.open(path, "wb") as f:
            f.write(buffer.getbuffer())


# ----------------------------------------------------------------------------------------------------------
# Loading into a model


def _compare(expected: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> LoadReport:
    return LoadReport(
        missing=[name for name in expected if name not in state],
        unexpected=[name for name in state if name not in expected],
        mismatched=[
            (name, tuple(expected[name].shape), tuple(tensor.shape))
            for name, tensor in state.items()
            if name in expected and expected[name].shape != tensor.shape
        ],
    )


def _load_checked(
    model: nn.Module, state: Mapping[str, Tensor], expected: Mapping[str, Tensor], *, strict: bool, what: str
) -> LoadReport:
    report = _compare(expected, state)
    if strict and not report.ok:
        raise CheckpointMismatchError(f"{what} does not fit {type(model).__name__}: {report.describe()}")
    skip = set(report.unexpected) | {name for name, _, _ in report.mismatched}
    loadable = {name: tensor for name, tensor in state.items() if name not in skip}
    model.load_state_dict(loadable, strict=False)
    report.loaded = len(loadable)
    return report


def load_into(model: nn.Module, state: Mapping[str, Tensor], *, strict: bool = True) -> LoadReport:
    """Copy ``state`` (ebseg names) into ``model``.

    strict: raise ``CheckpointMismatchError`` listing missing, unexpected and mis-shaped entries. Otherwise
    load every entry that matches by name and shape and return the report of the rest.
    """
    return _load_checked(model, state, model.state_dict(), strict=strict, what="the state dict")


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
    return _load_checked(model, state, expected, strict=strict, what=what)


def _build(config: EBSegConfig) -> nn.Module:
    # Looked up at call time: ebseg.build imports this module lazily, and tests stand in a builder.
    from ebseg.build import build_ebseg

    return build_ebseg(config)


def _model_for_weights(config: EBSegConfig) -> nn.Module:
    """The model for a full checkpoint: built without its initial-weight sources (the checkpoint replaces
    them, and fetching CLIP/SAM weights would be wasted or fail offline), then given the config it was
    saved with, so that save(load(x)) writes the same config."""
    bare = dataclasses.replace(
        config,
        clip=dataclasses.replace(config.clip, pretrained=None),
        sam=dataclasses.replace(config.sam, checkpoint=None),
    )
    model = _build(bare)
    model.config = config
    return model


def _to_device(model: nn.Module, map_location) -> nn.Module:
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model


def _model_from_official(
    state: Mapping[str, Tensor], preset: str | None, *, strict: bool, uri: str
) -> nn.Module:
    inferred = infer_official_preset(state)
    if preset is not None and preset != inferred:
        raise ValueError(f"{uri} is an official EBSeg-{inferred} checkpoint, but preset={preset!r} was asked")
    model = _model_for_weights(get_config(inferred))
    _load_checked(model, convert_official_state_dict(state), model.state_dict(), strict=strict, what=uri)
    return model


def load(uri: str, *, map_location="cpu", strict: bool = True) -> nn.Module:
    """Build the model a checkpoint describes and load its weights.

    Reads ebseg checkpoints and official EBSeg ones (converted, preset from the CLIP patch size). The model
    is moved to ``map_location`` when that names a device.
    """
    obj = _read_object(uri, map_location)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        if obj.get("version") != VERSION:
            raise ValueError(
                f"{uri} is ebseg checkpoint version {obj.get('version')!r}; "
                f"this ebseg reads version {VERSION}"
            )
        model = _model_for_weights(EBSegConfig.from_dict(obj["config"]))
        _load_checked(model, obj["state_dict"], model.state_dict(), strict=strict, what=uri)
        return _to_device(model, map_location)
    state = unwrap_state_dict(obj)
    if not is_official_state_dict(state):
        raise ValueError(
            f"{uri} is neither an ebseg checkpoint (no 'format': 'ebseg' entry) nor an official EBSeg one; "
            "a bare state dict carries no config: build the model yourself and call load_into(model, state)"
        )
    model = _model_from_official(state, None, strict=strict, uri=uri)
    return _to_device(model, map_location)


# ----------------------------------------------------------------------------------------------------------
# Downloads


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as the environment says now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return constants.HF_HUB_OFFLINE or env in {"1", "ON", "YES", "TRUE"}


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def _download_official(preset: str) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    filename = HF_FILES[preset]
    try:
        return hf_hub_download(
            HF_REPO,
            filename,
            endpoint=os.environ.get("HF_ENDPOINT") or None,
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
            local_files_only=_hub_offline(),
        )
    except (OSError, EntryNotFoundError) as e:
        raise WeightsUnavailableError(
            f"could not get {filename} from the Hugging Face Hub ({HF_REPO}): {_short(e)}\n"
            f"Fix: download https://huggingface.co/{HF_REPO}/resolve/main/{filename} where you have "
            f"access and pass its path or URI: load_official('/path/to/{filename}') (s3://... and other "
            "fsspec URIs work too); or point HF_HUB_CACHE at a Hugging Face cache that holds it, or "
            "HF_ENDPOINT at a reachable mirror; HF_HUB_OFFLINE=1 forbids downloading: unset it to download."
        ) from None


def load_official(
    uri: str | None = None, *, preset: str | None = None, map_location="cpu", strict: bool = True
) -> nn.Module:
    """An EBSeg model with the released weights.

    uri: an official ``EBSeg_base.pth`` / ``EBSeg_large.pth`` (path or fsspec URI); without one the file for
    ``preset`` (default ``"base"``) comes from the Hugging Face Hub (``slonetime/EBSeg``, cached by the hub).
    With a uri the preset is read from the file; a ``preset`` that disagrees raises.
    """
    if preset is not None and preset not in HF_FILES:
        raise ValueError(f"official EBSeg weights exist for presets {sorted(HF_FILES)}, not {preset!r}")
    if uri is None:
        uri = _download_official(preset or "base")
    obj = _read_object(uri, map_location)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        raise ValueError(f"{uri} is an ebseg checkpoint, not an official one: use ebseg.checkpoint.load")
    state = unwrap_state_dict(obj)
    if not is_official_state_dict(state):
        raise ValueError(f"{uri} is not an official EBSeg checkpoint (no sem_seg_head.* / clip_* keys)")
    model = _model_from_official(state, preset, strict=strict, uri=uri)
    return _to_device(model, map_location)


def _open_clip_state(model_name: str, tag: str) -> Mapping[str, Tensor]:
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
            "as `pretrained`; or point HF_HUB_CACHE at a Hugging Face cache that holds them, or "
            "HF_ENDPOINT at a reachable mirror; HF_HUB_OFFLINE=1 forbids downloading: unset it to download."
        ) from None
    # QuickGELU: the OpenAI weights need it, and open_clip >= 2.2x builds nn.GELU for these names otherwise.
    # Only the weights are used here, but the model open_clip builds must be the one the weights belong to.
    clip_model = open_clip.create_model(
        model_name, pretrained=tag, force_quick_gelu=True, cache_dir=cache_dir
    )
    return clip_model.state_dict()


def load_clip_pretrained(model: nn.Module, pretrained: str, *, strict: bool = True) -> LoadReport:
    """Initialise ``clip.*`` and ``text.*`` from CLIP weights; ``text.bg_embed`` keeps its value.

    pretrained: an open_clip tag for ``model.config.clip.model_name`` ("openai"), or the path/URI of an
    open_clip-format state dict. Strict within ``clip.*``/``text.*`` unless ``strict=False``.
    """
    import open_clip

    model_name = model.config.clip.model_name
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained in tags:
        source = _open_clip_state(model_name, pretrained)
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


# ----------------------------------------------------------------------------------------------------------
# One name for every kind of weights (the CLI's --model)


def load_model(spec: str, *, map_location="cpu") -> nn.Module:
    """The model a ``--model`` value names.

    ``"tiny"``: the tiny preset with random weights (warns with RandomWeightsWarning); ``"demo"``: the small
    model shipped with the package; ``"base"`` / ``"large"``: the official EBSeg-B / EBSeg-L release (Hugging
    Face Hub, cached); anything else: an ebseg or official checkpoint at that path or fsspec URI.
    """
    if spec in RANDOM_PRESETS:
        warnings.warn(
            f"model {spec!r} has random weights: its labels are meaningless (use it for tests and "
            "mechanics). Use --model demo for the bundled model, or base / large / a checkpoint path.",
            RandomWeightsWarning,
            stacklevel=2,
        )
        return _to_device(_build(get_config(spec)), map_location)
    if spec == "demo":
        if not os.path.exists(DEMO_WEIGHTS):
            raise WeightsUnavailableError(
                f"the demo weights are missing from this installation ({DEMO_WEIGHTS}); reinstall ebseg, "
                "or pass --model tiny (random weights), base, large or a checkpoint path"
            )
        return load(DEMO_WEIGHTS, map_location=map_location)
    if spec in HF_FILES:
        return load_official(preset=spec, map_location=map_location)
    return load(spec, map_location=map_location)
