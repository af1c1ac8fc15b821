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
from dataclasses import dataclass
from typing import Any

import torch

from ebseg import checkpoint as ebseg_checkpoint
from pipeline import storage

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"


@dataclass(frozen=True)
class Position:
    """Where a run stands: optimiser steps done, and the data position of every worker (each consumed
    ``batch`` micro-batches of epoch ``epoch``; the next one is ``batch``)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


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
        weights = ebseg_checkpoint.read_state(os.path.join(directory, MODEL_FILE))
        state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
    ebseg_checkpoint.load_into(model, weights)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"] and scaler.is_enabled():  # empty when saved without fp16 AMP
        scaler.load_state_dict(state["scaler"])
    return Position(**state["position"])


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
