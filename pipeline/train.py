"""Training EBSeg on Ray Train: the job description, the trainer around the per-worker loop, the entry point.

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

    python -m pipeline.train --data DATA_URI --storage STORAGE_URI --name NAME [--model tiny] [...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ebseg.config import PRESETS
from ebseg.data.transforms import AUGMENT_PRESETS, AugmentConfig, augment_config
from ebseg.losses.config import PRESETS as LOSS_PRESETS
from ebseg.vocab import Vocabulary
from pipeline import storage
from pipeline.cluster import ensure_ray
from pipeline.optim import TRAINABLE_POLICIES
from pipeline.train_state import read_metrics

__all__ = ["FailureInjection", "TrainJob", "TrainResult", "read_metrics", "run"]

AMP_DTYPES = ("bf16", "fp16")
# Fields that may differ when a run is resumed: they change how it is run and watched, not what it learns
# (the worker count is not one of them: the data position counts batches per worker).
RESUMABLE_CHANGES = frozenset(
    {"use_gpu", "cpus_per_worker", "checkpoint_every", "keep_checkpoints", "val_every", "val_images",
     "log_every", "max_failures", "storage_options", "inject_failure"}
)  # fmt: skip


@dataclass(frozen=True)
class FailureInjection:
    """For tests and drills: worker ``rank`` fails once when it starts step ``step`` (1-based), after writing
    ``marker`` (a local path: JSON with the step and the image ids of the batch it had drawn); a marker that
    exists already disarms it, so the restarted run passes. ``mode``: "raise" or "exit" (``os._exit``)."""

    step: int
    marker: str
    rank: int = 0
    mode: str = "raise"


@dataclass(frozen=True)
class TrainJob:
    """One training run. Defaults are the paper's recipe (EBSeg-B: lr 1e-4, weight decay 0.05, poly 0.9,
    full-model clipping at 0.01, 120k steps, 16 images per step as 4 workers x 4, fp16 AMP on GPU)."""

    name: str  # run name: STORAGE/NAME holds the checkpoints, metrics and final.pt
    storage: str  # local path or fsspec URI (s3://bucket/prefix)
    data: str  # training pairs: detectron2 folder layout or Parquet (pipeline.train_data)
    val_data: str | None = None  # held-out pairs for periodic mIoU
    vocabulary: str | None = None  # Vocabulary.parse spec; None: DATA/vocabulary.json
    # A preset name (random weights, plus clip_pretrained / sam_checkpoint) or an ebseg / official
    # checkpoint path or URI to start from.
    model: str = "base"
    clip_pretrained: str | None = None  # open_clip tag ("openai") or a path; the paper starts from it
    sam_checkpoint: str | None = None  # sam_vit_b_01ec64.pth path or URI; the paper starts from it
    # "reference": CLIP and SAM frozen but their positional embeddings (the paper); "all": everything but
    # the text encoder trains (for models from random weights, such as the demo).
    trainable: str = "reference"
    steps: int = 120_000
    batch_size: int = 4  # images per worker per micro-batch
    workers: int = 4
    use_gpu: bool = False
    # CPUs Ray reserves per worker; the Ray Data reading and augmentation tasks need CPUs left over (on a
    # small machine give workers a fraction, e.g. 0.5 each for 2 workers on 2 cores).
    cpus_per_worker: float = 1.0
    lr: float = 1e-4
    weight_decay: float = 0.05
    poly_power: float = 0.9
    clip_grad_norm: float | None = 0.01  # joint L2 norm of all trainable gradients; None: no clipping
    grad_accumulation: int = 1  # micro-batches per optimiser step
    amp: str | None = "fp16"  # autocast dtype on GPU ("bf16", "fp16" with a GradScaler, None); CPU: off
    loss: str = "reference"  # ebseg.losses preset
    augment: str | AugmentConfig = "reference"  # ebseg.data.transforms preset or config
    checkpoint_every: int = 10_000
    keep_checkpoints: int | None = 2  # newest checkpoints kept in storage; None keeps all
    val_every: int = 10_000
    val_images: int | None = None  # use only the first N held-out images
    log_every: int = 20  # steps between reports to Ray (checkpoints report too)
    seed: int = 0
    max_failures: int = 0  # worker-group restarts from the newest checkpoint within one run
    storage_options: Mapping[str, Any] = field(default_factory=dict)  # fsspec options for every URI
    inject_failure: FailureInjection | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ValueError(f"TrainJob.name must be letters, digits, '.', '_' or '-', got {self.name!r}")
        for key in ("steps", "batch_size", "workers", "grad_accumulation", "checkpoint_every", "val_every",
                    "log_every"):  # fmt: skip
            if int(getattr(self, key)) < 1:
                raise ValueError(f"TrainJob.{key} must be >= 1, got {getattr(self, key)!r}")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ValueError(f"TrainJob.keep_checkpoints must be >= 1 or None, got {self.keep_checkpoints}")
        if self.trainable not in TRAINABLE_POLICIES:
            raise ValueError(
                f"TrainJob.trainable must be one of {TRAINABLE_POLICIES}, got {self.trainable!r}"
            )
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise ValueError(f"TrainJob.amp must be one of {AMP_DTYPES} or None, got {self.amp!r}")
        if self.loss not in LOSS_PRESETS:
            raise ValueError(f"TrainJob.loss must be one of {sorted(LOSS_PRESETS)}, got {self.loss!r}")
        if isinstance(self.augment, str) and self.augment not in AUGMENT_PRESETS:
            raise ValueError(
                f"TrainJob.augment must be one of {sorted(AUGMENT_PRESETS)}, got {self.augment!r}"
            )
        if self.lr <= 0 or self.cpus_per_worker <= 0:
            raise ValueError(f"TrainJob: lr, cpus_per_worker must be > 0 ({self.lr}, {self.cpus_per_worker})")
        if self.weight_decay < 0 or self.poly_power < 0 or self.max_failures < 0:
            raise ValueError("TrainJob: weight_decay, poly_power and max_failures must be >= 0")

    @property
    def run_uri(self) -> str:
        return storage.join(self.storage, self.name)

    @property
    def images_per_step(self) -> int:
        return self.batch_size * self.grad_accumulation * self.workers

    def augment_config(self) -> AugmentConfig:
        return augment_config(self.augment)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["storage_options"] = dict(self.storage_options)
        return out


@dataclass(frozen=True)
class TrainResult:
    step: int  # optimiser steps done
    metrics: dict  # the last record reported
    run_uri: str
    checkpoint_uri: str | None  # the newest checkpoint directory
    final_model_uri: str  # final.pt


def resolve_vocabulary(job: TrainJob) -> Vocabulary:
    """The training vocabulary: ``job.vocabulary`` or the data's ``vocabulary.json``."""
    if job.vocabulary is not None:
        return Vocabulary.parse(job.vocabulary)
    fs, path = storage.url_to_fs(job.data, job.storage_options)
    file = storage.join(path, "vocabulary.json")
    if not fs.exists(file):
        raise FileNotFoundError(
            f"no vocabulary: {storage.join(job.data, 'vocabulary.json')} does not exist; pass "
            "TrainJob.vocabulary (--vocabulary) with the names of the classes the label maps index"
        )
    return Vocabulary.from_dict(storage.read_json(fs, file))


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


def run(job: TrainJob) -> TrainResult:
    """Train (or resume) ``job`` on the current Ray cluster (a local one is started when none is)."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.train_loop import train_loop_per_worker

    vocabulary = resolve_vocabulary(job)
    check_job_file(job)
    ensure_ray()
    storage_path, storage_fs = ray_storage(job.storage, job.storage_options)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job, "vocabulary": vocabulary.to_dict()},
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
    result = trainer.fit()
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


def _parser() -> argparse.ArgumentParser:
    defaults = TrainJob(name="x", storage="x", data="x")
    p = argparse.ArgumentParser(prog="python -m pipeline.train", description="Train EBSeg on Ray Train.")
    p.add_argument("--data", required=True, help="training pairs URI (folder layout or Parquet)")
    p.add_argument("--storage", required=True, help="where runs live (local path or s3://...)")
    p.add_argument("--name", required=True, help="run name; rerunning a name resumes it")
    p.add_argument("--val-data", help="held-out pairs URI for periodic mIoU")
    p.add_argument("--vocabulary", help="class names spec (default: DATA/vocabulary.json)")
    p.add_argument(
        "--model", default=defaults.model, help=f"preset {sorted(PRESETS)} or checkpoint to start from"
    )
    p.add_argument("--clip-pretrained", help="CLIP initial weights: open_clip tag or path")
    p.add_argument("--sam-checkpoint", help="SAM initial weights (sam_vit_b_01ec64.pth)")
    p.add_argument("--trainable", choices=TRAINABLE_POLICIES, default=defaults.trainable)
    p.add_argument("--augment", choices=sorted(AUGMENT_PRESETS), default=defaults.augment)
    p.add_argument("--crop-size", type=int, help="rescale the augment preset to this crop size")
    p.add_argument("--loss", choices=sorted(LOSS_PRESETS), default=defaults.loss)
    p.add_argument("--amp", choices=[*AMP_DTYPES, "none"], default=defaults.amp)
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL")
    p.add_argument("--clip-grad-norm", type=float, default=defaults.clip_grad_norm, help="<= 0: off")
    for name in ("steps", "batch_size", "workers", "grad_accumulation", "checkpoint_every", "val_every",
                 "log_every", "seed", "max_failures"):  # fmt: skip
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("lr", "weight_decay", "poly_power", "cpus_per_worker"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    p.add_argument("--keep-checkpoints", type=int, default=defaults.keep_checkpoints, help="0 keeps all")
    p.add_argument("--val-images", type=int)
    p.add_argument("--address", help="Ray address (default: a local Ray)")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    return p


def scale_augment(config: AugmentConfig, crop_size: int) -> AugmentConfig:
    """The same recipe at another crop size: short sides and the long-side cap scale with it."""
    ratio = crop_size / config.crop_size
    return dataclasses.replace(
        config,
        crop_size=crop_size,
        short_sides=tuple(max(1, round(s * ratio)) for s in config.short_sides),
        max_size=max(crop_size, round(config.max_size * ratio)),
    )


def job_from_args(argv: Sequence[str] | None = None) -> tuple[TrainJob, str | None]:
    args = _parser().parse_args(argv)
    options = {}
    for item in args.storage_option:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--storage-option must be KEY=VALUE, got {item!r}")
        options[key] = value
    augment: str | AugmentConfig = args.augment
    if args.crop_size:
        augment = scale_augment(augment_config(args.augment), args.crop_size)
    job = TrainJob(
        name=args.name, storage=args.storage, data=args.data, val_data=args.val_data,
        vocabulary=args.vocabulary, model=args.model, clip_pretrained=args.clip_pretrained,
        sam_checkpoint=args.sam_checkpoint, trainable=args.trainable, steps=args.steps,
        batch_size=args.batch_size, workers=args.workers, use_gpu=args.gpu,
        cpus_per_worker=args.cpus_per_worker, lr=args.lr,
        weight_decay=args.weight_decay, poly_power=args.poly_power,
        clip_grad_norm=args.clip_grad_norm if args.clip_grad_norm > 0 else None,
        grad_accumulation=args.grad_accumulation, amp=None if args.amp == "none" else args.amp,
        loss=args.loss, augment=augment, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints or None, val_every=args.val_every, val_images=args.val_images,
        log_every=args.log_every, seed=args.seed, max_failures=args.max_failures, storage_options=options,
    )  # fmt: skip
    return job, args.address


def main(argv: Sequence[str] | None = None) -> int:
    job, address = job_from_args(argv)
    ensure_ray(address)
    result = run(job)
    print(json.dumps(dataclasses.asdict(result), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
