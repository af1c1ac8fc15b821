"""Feeding training workers: each worker's batches of each epoch, reproducible from (seed, epoch).

Data position = (epoch, micro-batches consumed in it); every worker consumes the same number of batches
per epoch, so the workers stay in step and one position describes them all. Rows are the augmented rows of
``pipeline.train.augment.AugmentBatch`` (augmentation keyed by (seed, epoch, image id)), produced by Ray Data
tasks on CPU.

- Folder layout: the epoch's order is a permutation of the sorted pairs drawn from ``epoch_seed(seed,
  epoch)`` (as ``build_train_dataset`` does); worker ``r`` of ``W`` takes every W-th pair from ``r``, cut to
  the same whole number of batches on every worker. Each worker builds its own small dataset of its pairs,
  so resuming drops the consumed pairs before anything is read.
- Parquet layout: pairs cannot be fetched one by one, so worker 0 builds the epoch's dataset (Ray's seeded
  shuffle) and splits it with ``streaming_split(equal=True)`` under ``preserve_order``, which makes the
  split deterministic; the iterators go to the other workers through Ray Train's broadcast. Resuming
  re-reads the epoch and drops the consumed batches.

Bad pairs (``pipeline.train.bad_pairs``) leave the stream after augmentation: each worker re-batches its
good rows, and before every batch the workers agree (a min all-reduce) that all of them have one, so an
epoch ends for all at once however the bad pairs fell. A folder-layout worker records how many of its pairs
it read (``Position.offsets``), so resuming reads none of the consumed pairs again.

The datasets are built here, per epoch, rather than handed to ``TorchTrainer(datasets=...)``: a dataset
given to the trainer re-executes identically every epoch, so it cannot carry a per-epoch order that a
resumed run rebuilds. Augmentation runs as tasks, not an actor pool: a pool starts fresh processes at every
epoch's execution (about 12 s each on a 2-core machine); tasks reuse Ray's idle workers.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import ray
import ray.data
import ray.train
import ray.train.collective
import torch
import torch.distributed as dist

from pipeline.pairs import PairListing, list_pairs, read_folder_batch, read_parquet_file
from pipeline.train.augment import AugmentBatch, epoch_seed
from pipeline.train.bad_pairs import TALLY_KEYS, EpochTally, rebatch
from pipeline.train.state import Position

READ_BATCH = 32  # pairs read per task
logger = logging.getLogger(__name__)


def worker_pairs(listing: PairListing, *, seed: int, epoch: int, rank: int, world: int, batch_size: int):
    """Folder layout: the (image_id, image URI, label URI) of worker ``rank`` in ``epoch``, in order."""
    order = np.random.default_rng(epoch_seed(seed, epoch)).permutation(listing.count)
    per_worker = listing.count // world // batch_size * batch_size
    if per_worker == 0:
        raise ValueError(
            f"{listing.uri}: {listing.count} pairs cannot give each of {world} workers "
            f"a batch of {batch_size}"
        )
    return [listing.pairs[k] for k in order[rank::world][:per_worker]]


@dataclass(frozen=True)
class FeedBatch:
    epoch: int
    index: int  # micro-batch index in the epoch
    data: dict  # {"image_id": [B] str, "epoch": [B] int64, "image": [B, 3, S, S] uint8, "label": [B, S, S]}


def _augment(ds, job, epoch: int, num_classes: int):
    # An instance, not the class: Ray Data runs a callable object as tasks.
    augment = AugmentBatch(job.augment_config(), job.seed, epoch=epoch, num_classes=num_classes)
    ds = ds.map_batches(augment, batch_size=job.batch_size)
    ds.context.execution_options.preserve_order = True  # a deterministic order (and split)
    ds.context.enable_progress_bars = False  # one bar per worker and epoch would flood the job's log
    return ds


def _chunks(data, batch_size: int) -> Iterator[dict]:
    """Numpy chunks of a Dataset or DataIterator, in order (the last one may be short)."""
    return data.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2)


def _sum_over_workers(values: list[int], *, op=None) -> list[int]:
    """All-reduce (sum, or ``op``) of small integer vectors across the workers (identity on one)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.int64, device=ray.train.torch.get_device())
    dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return [int(v) for v in tensor.tolist()]


class WorkerFeed:
    """One worker's batches from a position on, epoch after epoch, forever (iterate it)."""

    def __init__(self, job, *, num_classes: int, position: Position) -> None:
        context = ray.train.get_context()
        self.job, self.num_classes = job, num_classes
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.listing = list_pairs(job.data, storage_options=dict(job.storage_options or {}))  # once per run
        self.epoch, self.batch = position.epoch, position.batch
        legacy = position.batch * job.batch_size  # checkpoints without offsets: no pair was skipped
        self.offset = position.offsets[self.rank] if position.offsets else legacy
        # The tally so far is the sum over the workers: it resumes on rank 0 alone.
        self.tally = EpochTally.from_counts(position.tally if self.rank == 0 else {})
        self.finished: list[dict] = []  # metrics of epochs ended since the last call of pop_finished

    def state(self) -> dict:
        """Position fields of the data (offsets of every worker, the epoch's tally); all ranks call it."""
        one_hot = [0] * self.world
        one_hot[self.rank] = self.offset
        offsets = tuple(_sum_over_workers(one_hot))
        tally = dict(zip(TALLY_KEYS, _sum_over_workers(self.tally.vector())))
        return {"offsets": offsets, "tally": {k: v for k, v in tally.items() if v}}

    def restore(self, position: Position) -> Position:
        return dataclasses.replace(position, **self.state())

    def pop_finished(self) -> dict:
        """The metrics fields of the epochs that ended since the last call (the newest wins)."""
        out = {}
        for record in self.finished:
            out.update(record)
        self.finished = []
        return out

    def __iter__(self) -> Iterator[FeedBatch]:
        while True:
            stream = self._epoch_stream()
            produced = 0
            while True:
                item = next(stream, None)
                if _sum_over_workers([int(item is not None)], op=dist.ReduceOp.MIN)[0] == 0:
                    break  # some worker has no batch left: the epoch ends for all
                data, self.offset = item
                produced += 1
                index, self.batch = self.batch, self.batch + 1
                yield FeedBatch(self.epoch, index, data)
            stream.close()
            self._end_epoch(started_fresh=produced == 0 and self.batch == 0)

    def _end_epoch(self, *, started_fresh: bool) -> None:
        total = EpochTally.from_counts(dict(zip(TALLY_KEYS, _sum_over_workers(self.tally.vector()))))
        total.examples = self.tally.examples
        if total.bad and self.rank == 0:
            logger.warning(
                "epoch %d: skipped %d bad pairs of %d (%s)",
                self.epoch, total.bad, sum(total.counts.values()), ", ".join(total.examples),
            )  # fmt: skip
        total.check(self.epoch, self.job.data)
        if started_fresh:
            raise RuntimeError(
                f"epoch {self.epoch} of {self.job.data} gave a worker no batch of {self.job.batch_size}"
            )
        self.finished.append(total.as_record(self.epoch))
        self.epoch, self.batch, self.offset, self.tally = self.epoch + 1, 0, 0, EpochTally()

    def _epoch_stream(self) -> Iterator[tuple[dict, int]]:
        if self.listing.layout == "folder":
            return self._folder_stream()
        return self._parquet_stream()

    def _folder_stream(self) -> Iterator[tuple[dict, int]]:
        job = self.job
        pairs = worker_pairs(
            self.listing, seed=job.seed, epoch=self.epoch, rank=self.rank, world=self.world,
            batch_size=job.batch_size,
        )[self.offset :]  # fmt: skip
        if not pairs:
            return
        rows = [{"image_id": i, "image_uri": a, "label_uri": b} for i, a, b in pairs]
        options = {"storage_options": dict(job.storage_options or {})}
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // READ_BATCH, 1000)))
        ds = ds.map_batches(read_folder_batch, batch_size=READ_BATCH, fn_kwargs=options)
        ds = _augment(ds, job, self.epoch, self.num_classes)
        yield from rebatch(_chunks(ds, job.batch_size), job.batch_size, self.tally, start=self.offset)

    def _parquet_stream(self) -> Iterator[tuple[dict, int]]:
        job, rank, world = self.job, self.rank, self.world
        ref = None
        if rank == 0:
            items = [{"file": f} for f in self.listing.files]
            ds = ray.data.from_items(items, override_num_blocks=len(items))
            ds = ds.map_batches(
                read_parquet_file,
                batch_size=1,
                fn_kwargs={"storage_options": dict(job.storage_options or {})},
            )
            ds = _augment(
                ds.random_shuffle(seed=epoch_seed(job.seed, self.epoch)), job, self.epoch, self.num_classes
            )
            ref = ray.put(ds.streaming_split(world, equal=True) if world > 1 else [ds.iterator()])
        if world > 1:
            ref = ray.train.collective.broadcast_from_rank_zero([ref])[0]
        shard = ray.get(ref)[rank]
        # Pairs of a split cannot be fetched one by one: re-read the epoch and drop the consumed batches.
        yield from rebatch(_chunks(shard, job.batch_size), job.batch_size, self.tally, skip=self.batch)
