"""What a training run keeps in storage: checkpoints (model + optimiser state + data position) and metrics.

A checkpoint directory holds ``model.pt``, an ebseg checkpoint that ``ebseg.checkpoint.load`` reads on its
own (config, weights, step, vocabulary), and ``train_state.pt`` with everything else a resumed run needs.
Both are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from ebseg import checkpoint as ebseg_checkpoint
from ebseg.config import EBSegConfig
from pipeline import storage

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"


@dataclass(frozen=True)
class Position:
    """Where a run stands: optimiser steps done, and the data position of every worker (each consumed
    ``batch`` micro-batches of epoch ``epoch``; the next one is ``batch``).

    Bad pairs are skipped, so ``batch`` alone does not say how far into its pairs a worker read:
    ``offsets[rank]`` does (pairs of the epoch read by each worker, folder layout; empty in checkpoints from
    before it, where ``batch`` x batch size is exact). ``tally``: the epoch's pairs seen so far by all
    workers, good and bad by reason (``pipeline.train.bad_pairs``), so a resumed epoch still counts them all.
    """

    step: int = 0
    epoch: int = 0
    batch: int = 0
    offsets: tuple[int, ...] = ()
    tally: dict[str, int] = field(default_factory=dict)


def save_train_checkpoint(
    directory: str,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    position: Position,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write ``model.pt`` and ``train_state.pt`` into a local ``directory``."""
    info = {"step": position.step, **dict(extra or {})}
    ebseg_checkpoint.save(model, os.path.join(directory, MODEL_FILE), extra=info)
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "position": dataclasses.asdict(position),
    }
    torch.save(state, os.path.join(directory, STATE_FILE))


def load_train_checkpoint(
    checkpoint,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
) -> Position:
    """Restore a ``ray.train.Checkpoint`` (or a local directory) written by :func:`save_train_checkpoint`
    into the given objects; returns the position to continue from. The weights must fit exactly."""
    context = checkpoint.as_directory() if hasattr(checkpoint, "as_directory") else nullcontext(checkpoint)
    with context as directory:
        model_file, state_file = os.path.join(directory, MODEL_FILE), os.path.join(directory, STATE_FILE)
        stored = ebseg_checkpoint.read_object(model_file, map_location="cpu")
        state = ebseg_checkpoint.read_object(state_file, map_location="cpu")
    _check_same_model(stored, model, model_file)
    weights = stored["state_dict"]
    if not isinstance(state, Mapping) or not {"optimizer", "scheduler", "position"} <= state.keys():
        raise ebseg_checkpoint.CheckpointError(f"{state_file} is not a training state file of ebseg")
    ebseg_checkpoint.load_into(model, weights)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"] and scaler.is_enabled():  # empty when saved without fp16 AMP
        scaler.load_state_dict(state["scaler"])
    position = dict(state["position"])
    position["offsets"] = tuple(position.get("offsets", ()))
    return Position(**position)


def _check_same_model(stored: Any, model: torch.nn.Module, file: str) -> None:
    """Refuse a model file of another format or architecture before its weights meet the model."""
    if not isinstance(stored, Mapping) or stored.get("format") != ebseg_checkpoint.FORMAT:
        raise ebseg_checkpoint.CheckpointError(f"{file} is not an ebseg checkpoint (no 'format': 'ebseg')")
    try:  # through the config class, so an older checkpoint's spelling of the same model compares equal
        theirs = EBSegConfig.from_dict(stored.get("config") or {}).to_dict()
    except (TypeError, ValueError, KeyError) as e:
        raise ebseg_checkpoint.CheckpointError(f"{file} holds no readable model config ({e})") from None
    ours = model.config.to_dict()
    changed = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    if changed:
        details = ", ".join(f"{k}: {theirs.get(k)!r} (this run: {ours.get(k)!r})" for k in changed[:5])
        raise ebseg_checkpoint.CheckpointError(
            f"{file} was written by another model ({details}); "
            "a run resumes only from its own checkpoints: start a new run under another name"
        )


class MetricsLog:
    """Step records of a run, buffered and written as ``RUN/metrics/<first>-<last>.jsonl`` chunks (one object
    per chunk: no appends, which object stores lack). Steps redone after a restart get written again."""

    def __init__(self, run_uri: str, storage_options: Mapping[str, Any] | None = None):
        self.fs, path = storage.url_to_fs(run_uri, storage_options)
        self.folder = storage.join(path, "metrics")
        self.pending: list[dict] = []

    def append(self, record: dict) -> None:
        self.pending.append(record)

    def flush(self) -> None:
        if not self.pending:
            return
        first, last = self.pending[0]["step"], self.pending[-1]["step"]
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.pending)
        storage.write_bytes_atomic(
            self.fs, storage.join(self.folder, f"{first:08d}-{last:08d}.jsonl"), lines.encode()
        )
        self.pending = []


def read_metrics(run_uri: str, *, storage_options: Mapping[str, Any] | None = None) -> list[dict]:
    """Every step record of a run, in step order of the chunks."""
    fs, path = storage.url_to_fs(run_uri, storage_options)
    folder = storage.join(path, "metrics")
    if not fs.exists(folder):
        return []
    records = []
    for file in sorted(fs.ls(folder, detail=False)):
        if file.endswith(".jsonl"):
            records += [json.loads(line) for line in fs.cat_file(file).decode().splitlines() if line]
    return records
