"""Training EBSeg on Ray Train: ``run`` puts a ``TrainJob`` on a TorchTrainer around the per-worker loop.

A run lives at ``STORAGE/NAME`` (any fsspec URI; local paths and ``s3://`` tested)::

    checkpoint_<step>/model.pt         an ebseg checkpoint (``ebseg.checkpoint.load`` reads it)
    checkpoint_<step>/train_state.pt   optimiser, scheduler, grad scaler, step and data position
    metrics/<first>-<last>.jsonl       one JSON record per optimiser step (loss terms, lr, images/s, val)
    job.json                           the job, to refuse a rerun under the same name that trains differently
    final.pt                           the trained model (ebseg checkpoint, vocabulary and step inside)

Running the same job again (same storage and name) resumes from the newest checkpoint: Ray Train finds the
run's checkpoints in storage and hands the newest to every worker; the loop restores the weights, the
optimiser and LR state, and the data position (epoch and batches consumed; an epoch's order and
augmentation are a function of the seed and the epoch, so the rest of the epoch is the same data).
``max_failures`` restarts a failed worker group from the newest checkpoint within one ``run``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ebseg.checkpoint import CheckpointError
from pipeline import storage
from pipeline.cluster import ensure_ray
from pipeline.pairs import pairs_vocabulary
from pipeline.train.bad_pairs import BadPairsError
from pipeline.train.faults import FailureInjection
from pipeline.train.job import TrainJob
from pipeline.train.worker import train_loop_per_worker

# Fields that may differ when a run is resumed: they change how it is run and watched, not what it learns
# (the worker count is not one of them: the data position counts batches per worker).
RESUMABLE_CHANGES = frozenset(
    {"use_gpu", "cpus_per_worker", "checkpoint_every", "keep_checkpoints", "val_every", "val_images",
     "log_every", "max_failures", "storage_options"}
)  # fmt: skip


@dataclass(frozen=True)
class TrainResult:
    step: int  # optimiser steps done
    metrics: dict  # the last record reported
    run_uri: str
    checkpoint_uri: str | None  # the newest checkpoint directory
    final_model_uri: str  # final.pt


def check_job_file(job: TrainJob) -> None:
    """Write ``job.json`` for a new run; for an existing one, refuse a job that would train differently."""
    fs, path = storage.url_to_fs(job.run_uri, job.storage_options)
    file = storage.join(path, "job.json")
    current = json.loads(json.dumps(job.to_dict()))  # tuples -> lists, as stored
    if fs.exists(file):
        stored = storage.read_json(fs, file)
        keys = (current.keys() | stored.keys()) - RESUMABLE_CHANGES
        changed = sorted(k for k in keys if current.get(k) != stored.get(k))
        if changed:
            details = ", ".join(f"{k}: {stored.get(k)!r} -> {current.get(k)!r}" for k in changed)
            raise ValueError(
                f"run {job.run_uri} exists and was started with different settings ({details}); resume it "
                "with the same settings, or start a new run under another name"
            )
    storage.write_json_atomic(fs, file, current)


def ray_storage(uri: str, storage_options: Mapping[str, Any] | None = None):
    """(storage_path, storage_filesystem) for ``ray.train.RunConfig``: a local path as is; any other URI as
    its path on a pyarrow wrapper of the fsspec filesystem, so ``storage_options`` and the environment's S3
    settings (endpoint included) apply to Ray's checkpoint uploads as they do to ours."""
    import pyarrow.fs

    fs, path = storage.url_to_fs(uri, storage_options)
    if storage.is_local(fs):
        return path, None
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def _job_error(error: Exception) -> Exception:
    """A worker's own refusal (bad pairs, an unusable checkpoint: ValueErrors naming the data or file) in
    place of Ray Train's wrapper, so the user reads the reason; any other failure stays as Ray raised it."""
    for failure in (getattr(error, "worker_failures", None) or {}).values():
        for _ in range(8):  # down Ray's wrappers (``cause``) and Python's chain
            if failure is None:
                break
            ours = type(failure).__module__.split(".")[0] in ("pipeline", "ebseg")
            if ours and isinstance(failure, (BadPairsError, CheckpointError)):
                return failure
            failure = getattr(failure, "cause", None) or failure.__cause__
    return error


def run(job: TrainJob, *, inject_failure: FailureInjection | None = None) -> TrainResult:
    """Train (or resume) ``job`` on the current Ray cluster (a local one is started when none is).

    inject_failure: a test hook (``pipeline.train.faults.FailureInjection``), never a job setting.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    vocabulary = pairs_vocabulary(job.data, job.vocabulary, job.storage_options)
    check_job_file(job)
    ensure_ray()
    storage_path, storage_fs = ray_storage(job.storage, job.storage_options)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job, "vocabulary": vocabulary.to_dict(), "inject_failure": inject_failure},
        torch_config=TorchConfig(backend="nccl" if job.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.workers, use_gpu=job.use_gpu, resources_per_worker={"CPU": job.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=job.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=job.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.keep_checkpoints),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise _job_error(e) from e
    returned = result.return_value or {}
    checkpoint_uri = None
    if result.checkpoint is not None:
        checkpoint_uri = result.checkpoint.path
        if storage_fs is not None:
            fs, _ = storage.url_to_fs(job.storage, job.storage_options)
            checkpoint_uri = storage.full_uri(fs, checkpoint_uri)
    return TrainResult(
        step=int(returned.get("step", 0)),
        metrics=dict(returned.get("metrics") or result.metrics or {}),
        run_uri=job.run_uri,
        checkpoint_uri=checkpoint_uri,
        final_model_uri=storage.join(job.run_uri, "final.pt"),
    )
