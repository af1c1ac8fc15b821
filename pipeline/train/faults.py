"""Fault injection for tests and drills: never a job setting or a CLI flag (``run(inject_failure=...)``).

``FailureInjection`` makes worker ``rank`` fail once at optimiser step ``step``:

- ``at="step"``: when it starts the step, after writing ``marker`` (JSON: the step and the image ids of the
  batch it had drawn); ``mode`` "raise" raises, "exit" ends the process (``os._exit``).
- ``at="checkpoint"``: while the step's checkpoint is being written to storage: the process writes the first
  half of ``model.pt`` where the checkpoint goes, as an upload cut short leaves it, and ends (``os._exit``).

A marker that exists already disarms it, so the restarted or rerun job passes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pipeline import storage


@dataclass(frozen=True)
class FailureInjection:
    step: int
    marker: str
    rank: int = 0
    mode: Literal["raise", "exit"] = "raise"
    at: Literal["step", "checkpoint"] = "step"

    def armed(self, at: str, step: int, rank: int) -> bool:
        return self.at == at and self.step == step and self.rank == rank and not os.path.exists(self.marker)

    def mark(self, info: dict) -> None:
        with open(self.marker, "w") as f:
            json.dump({"step": self.step, "at": self.at, **info}, f)


def maybe_fail_step(fault: FailureInjection | None, step: int, rank: int, image_ids: list[str]) -> None:
    if fault is None or not fault.armed("step", step, rank):
        return
    fault.mark({"image_ids": image_ids})
    if fault.mode == "exit":
        os._exit(1)
    raise RuntimeError(f"injected failure at step {step} on rank {rank}")


def maybe_fail_checkpoint(
    fault: FailureInjection | None,
    step: int,
    rank: int,
    *,
    local_file: str,
    destination: str,
    storage_options: Mapping[str, Any] | None,
) -> None:
    """Write half of ``local_file`` to ``destination`` (a URI) and end the process, when armed."""
    if fault is None or not fault.armed("checkpoint", step, rank):
        return
    with open(local_file, "rb") as f:
        data = f.read()
    fs, path = storage.url_to_fs(destination, storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data[: len(data) // 2])
    fault.mark({"destination": destination, "bytes": len(data) // 2})
    os._exit(1)
