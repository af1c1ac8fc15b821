"""Checkpoint files: writing and reading ebseg checkpoints, and loading them (or official EBSeg files).

Every path is an fsspec URI (a local path, ``file://``, ``s3://``, ``memory://``, ...) and every file is read
with ``torch.load(..., weights_only=True)``. An ebseg checkpoint carries the config it was built from::

    {"format": "ebseg", "version": 1, "config": EBSegConfig.to_dict(), "state_dict": {...}, **extra}

so ``load(uri)`` needs nothing else. Loading compares names and shapes first and, by default, refuses a
checkpoint with missing, unexpected or mis-shaped entries, listing them.

Elsewhere: ``ebseg.pretrained`` (CLIP and SAM initial weights), ``ebseg.downloads`` (the Hugging Face Hub and
open_clip caches), ``ebseg.zoo`` (what a ``--model`` value names: tiny, demo, base, large or a file).
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import uuid
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from torch import Tensor, nn

from ebseg.build import build_ebseg
from ebseg.config import EBSegConfig, get_config
from ebseg.official import (
    convert_official_state_dict,
    infer_official_preset,
    is_official_state_dict,
    unwrap_state_dict,
)

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "LoadReport",
    "convert_official_state_dict",
    "load",
    "load_checked",
    "load_into",
    "model_from_official",
    "read_object",
    "read_state",
    "save",
]

FORMAT = "ebseg"
VERSION = 1
_SHOWN = 10  # names listed per kind in an error message


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: truncated or corrupt, of another format, or of another model.
    The message names the file."""


class CheckpointMismatchError(CheckpointError, RuntimeError):
    """A state dict does not fit the model: missing, unexpected or mis-shaped entries."""


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


def read_object(uri: str, map_location=None) -> object:
    """The object a weights file holds, read with ``torch.load(weights_only=True)``."""
    try:
        with fsspec.open(uri, "rb") as f:
            return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{uri} holds objects other than tensors and plain containers, which "
            f"torch.load(weights_only=True) refuses ({first}). A detectron2 file may carry optimizer or "
            "scheduler objects: if you trust it, re-save only its weights: "
            "torch.save(torch.load(path, weights_only=False)['model'], new_path)."
        ) from None
    except (RuntimeError, EOFError, KeyError, OSError, zipfile.BadZipFile) as e:
        # What torch.load raises for a file cut short (an interrupted write or upload) or for other bytes:
        # "PytorchStreamReader failed reading zip archive", EOFError, a KeyError of a stray opcode, EINVAL
        # from seeking to a zip directory before the start of a short file. Other I/O errors stay as they are.
        if isinstance(e, OSError) and e.errno != errno.EINVAL:
            raise
        text = str(e).strip()
        first = text.splitlines()[0] if text else type(e).__name__
        raise CheckpointError(
            f"{uri} is truncated or not a checkpoint ({type(e).__name__}: {first}); "
            "an interrupted write leaves such a file: use an earlier checkpoint or write it again"
        ) from None


def read_state(uri: str, *, map_location="cpu") -> dict[str, Tensor]:
    """The state dict in a file: the ``state_dict`` of an ebseg checkpoint, ``model`` of a detectron2 one,
    or the file itself when it is a bare state dict. Names are returned as stored."""
    obj = read_object(uri, map_location)
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


def load_checked(
    model: nn.Module, state: Mapping[str, Tensor], expected: Mapping[str, Tensor], *, strict: bool, what: str
) -> LoadReport:
    """Copy ``state`` into ``model`` after comparing it with ``expected`` (the entries it must provide).

    strict: raise ``CheckpointMismatchError`` (naming ``what``) on any missing, unexpected or mis-shaped
    entry; otherwise load what matches by name and shape and return the report of the rest.
    """
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
    return load_checked(model, state, model.state_dict(), strict=strict, what="the state dict")


def to_device(model: nn.Module, map_location) -> nn.Module:
    """``model`` moved to ``map_location`` when that names a device (torch.load's other forms are ignored)."""
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model


def model_from_official(
    state: Mapping[str, Tensor], preset: str | None = None, *, strict: bool = True, uri: str = "state dict"
) -> nn.Module:
    """The model of an official EBSeg state dict (preset read from its shapes), converted and loaded.

    preset: the preset the caller expects; a file of the other size raises, naming both.
    """
    inferred = infer_official_preset(state)
    if preset is not None and preset != inferred:
        raise ValueError(f"{uri} is an official EBSeg-{inferred} checkpoint, but preset={preset!r} was asked")
    model = build_ebseg(get_config(inferred))
    load_checked(model, convert_official_state_dict(state), model.state_dict(), strict=strict, what=uri)
    return model


def load(uri: str, *, map_location="cpu", strict: bool = True) -> nn.Module:
    """Build the model a checkpoint describes and load its weights.

    Reads ebseg checkpoints and official EBSeg ones (converted, preset from the CLIP patch size). The model
    is moved to ``map_location`` when that names a device.
    """
    obj = read_object(uri, map_location)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        if obj.get("version") != VERSION:
            raise CheckpointError(
                f"{uri} is ebseg checkpoint version {obj.get('version')!r}; "
                f"this ebseg reads version {VERSION}"
            )
        model = build_ebseg(EBSegConfig.from_dict(obj["config"]))
        load_checked(model, obj["state_dict"], model.state_dict(), strict=strict, what=uri)
        return to_device(model, map_location)
    state = unwrap_state_dict(obj)
    if not is_official_state_dict(state):
        raise CheckpointError(
            f"{uri} is neither an ebseg checkpoint (no 'format': 'ebseg' entry) nor an official EBSeg one; "
            "a bare state dict carries no config: build the model yourself and call load_into(model, state)"
        )
    return to_device(model_from_official(state, strict=strict, uri=uri), map_location)
