"""The per-worker training loop run by Ray Train's ``TorchTrainer`` (see :mod:`pipeline.train.run`).

Every worker builds the same model (same seed), applies the trainable policy, encodes the training
vocabulary once (the class embeddings and the SSC text affinity), restores the newest checkpoint when Ray
Train hands one over, wraps the model in DDP and trains on its share of every epoch
(:mod:`pipeline.train.feed`). Rank 0 writes checkpoints, metrics, validation and ``final.pt``; every rank
calls ``ray.train.report`` at the same steps (it is a barrier).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from ebseg import checkpoint as ebseg_checkpoint
from ebseg.build import build_ebseg
from ebseg.config import PRESETS
from ebseg.data import semantic_targets
from ebseg.losses import Targets, build_criterion, count_masks, text_affinity, total_loss
from ebseg.precision import autocast_dtype
from ebseg.pretrained import load_clip_pretrained, load_sam_checkpoint
from ebseg.vocab import Vocabulary
from ebseg.zoo import load_model
from pipeline import storage
from pipeline.train.faults import FailureInjection, maybe_fail_checkpoint, maybe_fail_step
from pipeline.train.feed import FeedBatch, WorkerFeed
from pipeline.train.job import TrainJob
from pipeline.train.optim import (
    build_optimizer,
    build_scheduler,
    clip_gradients,
    optimizer_params,
    set_trainable,
)
from pipeline.train.state import (
    MODEL_FILE,
    MetricsLog,
    Position,
    load_train_checkpoint,
    save_train_checkpoint,
)


def build_model(job: TrainJob) -> torch.nn.Module:
    """The model a run starts from: a preset (random weights, plus CLIP/SAM initial weights when named),
    the shipped demo model, or an existing checkpoint."""
    if job.model in PRESETS:
        model = build_ebseg(job.model)
        if job.clip_pretrained is not None:
            load_clip_pretrained(model, job.clip_pretrained)
        if job.sam_checkpoint is not None:
            load_sam_checkpoint(model, job.sam_checkpoint)
        return model
    if job.clip_pretrained is not None or job.sam_checkpoint is not None:
        raise ValueError(
            "clip_pretrained / sam_checkpoint apply to a preset, not to a checkpoint to start from"
        )
    return load_model(job.model)  # demo, or a checkpoint path / URI


def step_generator(job: TrainJob, step: int, rank: int, micro: int) -> torch.Generator:
    """The criterion's point-sampling randomness of one micro-batch: fixed by (seed, step, rank, micro)."""
    seed = int(np.random.SeedSequence([job.seed, step, rank, micro]).generate_state(1)[0])
    return torch.Generator().manual_seed(seed)


def mean_over_workers(values: torch.Tensor) -> torch.Tensor:
    """All-reduce mean of a float tensor (identity on one worker)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


class Trainer:
    """One worker's state: model, optimiser, schedule, scaler, criterion, position."""

    def __init__(self, job: TrainJob, vocabulary: Vocabulary, fault: FailureInjection | None = None):
        self.job = job
        self.fault = fault
        self.vocabulary = vocabulary
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        torch.manual_seed(job.seed)  # the same initial weights on every worker (DDP also syncs them)
        self.model = build_model(job)
        set_trainable(self.model, job.trainable)
        self.model.to(self.device)
        self.optimizer = build_optimizer(self.model, lr=job.lr, weight_decay=job.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, max_steps=job.steps, power=job.poly_power)
        on_gpu = self.device.type == "cuda"
        self.amp_dtype = autocast_dtype(job.amp) if on_gpu else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.criterion = build_criterion(job.loss)
        self.position = Position()
        self.resumed_from: int | None = None  # the step of the checkpoint this worker restored
        restored = ray.train.get_checkpoint()
        if restored is not None:
            self.position = load_train_checkpoint(
                restored, self.model, self.optimizer, self.scheduler, self.scaler
            )
            self.resumed_from = self.position.step
        self.feed = WorkerFeed(job, num_classes=len(vocabulary), position=self.position)
        # After restoring: the embeddings come from the weights the run continues with. The text encoder
        # never trains, so encoding the vocabulary once is exact.
        self.class_embeddings = self.model.text.encode_names(vocabulary.names)  # [K, D]
        self.affinity = text_affinity(self.class_embeddings)  # [K, K] SSC target
        self.ddp = ray.train.torch.prepare_model(
            self.model, move_to_device=False, parallel_strategy_kwargs={"find_unused_parameters": False}
        )
        self.ddp.train()

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def micro_step(self, batch: dict, step: int, micro: int, sync: bool) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch; returns its weighted loss terms (detached)."""
        images = torch.from_numpy(np.ascontiguousarray(batch["image"])).to(self.device)  # [B, 3, S, S] uint8
        targets = [Targets(*semantic_targets(torch.from_numpy(label))) for label in batch["label"]]
        # The reference normalises the mask losses by the batch's target count averaged over workers.
        count = torch.tensor([float(count_masks(targets))], device=self.device)
        num_masks = max(float(mean_over_workers(count)), 1.0)
        no_sync = self.ddp.no_sync if (not sync and hasattr(self.ddp, "no_sync")) else contextlib.nullcontext
        with no_sync():
            with self.autocast():
                outputs = self.ddp(images, self.class_embeddings)
            terms = self.criterion(
                outputs,
                targets,
                self.affinity,
                num_masks=num_masks,
                generator=step_generator(self.job, step, self.rank, micro),
            )
            loss = total_loss(terms) / self.job.grad_accumulation
            self.scaler.scale(loss).backward()
        return {name: value.detach() for name, value in terms.items()}

    def step(self, data: Iterator[FeedBatch]) -> dict:
        """One optimiser step over ``grad_accumulation`` micro-batches; returns its log record."""
        job, step = self.job, self.position.step + 1
        start = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        first_id = None
        for micro in range(job.grad_accumulation):
            fed = next(data)
            ids = [str(i) for i in fed.data["image_id"]]
            first_id = first_id or ids[0]
            if micro == 0:
                maybe_fail_step(self.fault, step, self.rank, ids)
            terms = self.micro_step(fed.data, step, micro, sync=micro == job.grad_accumulation - 1)
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value / job.grad_accumulation
            self.position = Position(step=self.position.step, epoch=fed.epoch, batch=fed.index + 1)
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_gradients(optimizer_params(self.optimizer), job.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.position = Position(step=step, epoch=self.position.epoch, batch=self.position.batch)

        names = sorted(sums)
        reduced = mean_over_workers(torch.stack([sums[n].float().reshape(()) for n in names]).to(self.device))
        elapsed = time.perf_counter() - start
        record = {name: float(v) for name, v in zip(names, reduced.tolist())}
        record.update(
            step=step,
            epoch=self.position.epoch,
            batch=self.position.batch,
            loss=float(reduced.sum()),
            lr=lr,
            grad_norm=None if grad_norm is None else float(grad_norm),
            images_per_s=job.images_per_step / elapsed,
            step_time_s=elapsed,
            first_image_id=first_id,
            time=time.time(),
        )
        record.update(self.feed.pop_finished())  # bad pairs of the epochs that ended
        if self.resumed_from is not None:
            record["resumed_from"], self.resumed_from = self.resumed_from, None
        return record


def train_loop_per_worker(config: dict) -> dict:
    """Ray Train entry: ``config = {"job": TrainJob, "vocabulary": Vocabulary.to_dict(), "inject_failure":
    FailureInjection | None}``."""
    job: TrainJob = config["job"]
    vocabulary = Vocabulary.from_dict(config["vocabulary"])
    trainer = Trainer(job, vocabulary, config.get("inject_failure"))
    rank = trainer.rank
    log = MetricsLog(job.run_uri, job.storage_options) if rank == 0 else None
    validator = None
    if job.val_data:
        from pipeline.train.validation import Validator  # scoring needs ebseg.metrics, only when validating

        validator = Validator(job, vocabulary, trainer.device, trainer.amp_dtype)
    record: dict = {"step": trainer.position.step}
    data = iter(trainer.feed)
    while trainer.position.step < job.steps:
        record = trainer.step(data)
        step = record["step"]
        last = step == job.steps
        if validator is not None and rank == 0 and (step % job.val_every == 0 or last):
            record.update(validator.evaluate(trainer.model))
            trainer.ddp.train()
        if log is not None:
            log.append(record)
        if step % job.checkpoint_every == 0 or last:
            report_checkpoint(trainer, record, log)
        elif step % job.log_every == 0:
            ray.train.report(_scalars(record))
    if rank == 0:
        final = storage.join(job.run_uri, "final.pt")
        ebseg_checkpoint.save(
            trainer.model,
            final,
            extra={"step": trainer.position.step, "vocabulary": vocabulary.to_dict(), "run": job.name},
        )
        log.flush()
    return {"step": trainer.position.step, "metrics": _scalars(record)}


def _scalars(record: dict) -> dict:
    return {k: v for k, v in record.items() if isinstance(v, (int, float, str)) or v is None}


def report_checkpoint(trainer: Trainer, record: dict, log: MetricsLog | None) -> None:
    """Write the checkpoint on rank 0 and report it (every rank reports: it is a barrier), then wait until
    Ray Train has registered it: a worker that dies later must not take the newest checkpoint with it."""
    step = trainer.position.step
    name = f"checkpoint_{step:08d}"
    position = trainer.feed.restore(trainer.position)  # every rank: it gathers the workers' offsets
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if trainer.rank == 0:
            save_train_checkpoint(
                tmp,
                model=trainer.model,
                optimizer=trainer.optimizer,
                scheduler=trainer.scheduler,
                scaler=trainer.scaler,
                position=position,
                extra={"vocabulary": trainer.vocabulary.to_dict(), "run": trainer.job.name},
            )
            log.flush()  # the metrics up to this checkpoint are in storage before it counts
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        maybe_fail_checkpoint(
            trainer.fault,
            step,
            trainer.rank,
            local_file=os.path.join(tmp, MODEL_FILE),
            destination=storage.join(trainer.job.run_uri, name, MODEL_FILE),
            storage_options=trainer.job.storage_options,
        )
        ray.train.report(_scalars(record), checkpoint=checkpoint, checkpoint_dir_name=name)
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
