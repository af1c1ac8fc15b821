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

The datasets are built here, per epoch, rather than handed to ``TorchTrainer(datasets=...)``: a dataset
given to the trainer re-executes identically every epoch, so it cannot carry a per-epoch order that a
resumed run rebuilds. Augmentation runs as tasks, not an actor pool: a pool starts fresh processes at every
epoch's execution (about 12 s each on a 2-core machine); tasks reuse Ray's idle workers.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import ray
import ray.data
import ray.train
import ray.train.collective

from pipeline.pairs import PairListing, list_pairs, read_folder_batch, read_parquet_file
from pipeline.train.augment import AugmentBatch, epoch_seed

READ_BATCH = 32  # pairs read per task


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


def _augment(ds, job, epoch: int):
    # An instance, not the class: Ray Data runs a callable object as tasks.
    augment = AugmentBatch(job.augment_config(), job.seed, epoch=epoch)
    ds = ds.map_batches(augment, batch_size=job.batch_size)
    ds.context.execution_options.preserve_order = True  # a deterministic order (and split)
    ds.context.enable_progress_bars = False  # one bar per worker and epoch would flood the job's log
    return ds


def _batches_of(data, batch_size: int) -> Iterator[dict]:
    """Whole numpy batches of a Dataset or DataIterator, in order."""
    return data.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True, prefetch_batches=2)


def _folder_batches(job, listing: PairListing, epoch: int, skip: int) -> Iterator[dict]:
    context = ray.train.get_context()
    pairs = worker_pairs(
        listing,
        seed=job.seed,
        epoch=epoch,
        rank=context.get_world_rank(),
        world=context.get_world_size(),
        batch_size=job.batch_size,
    )[skip * job.batch_size :]
    if not pairs:
        return
    rows = [{"image_id": i, "image_uri": a, "label_uri": b} for i, a, b in pairs]
    options = {"storage_options": dict(job.storage_options or {})}
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // READ_BATCH, 1000)))
    ds = _augment(ds.map_batches(read_folder_batch, batch_size=READ_BATCH, fn_kwargs=options), job, epoch)
    yield from ds.iter_batches(
        batch_size=job.batch_size, batch_format="numpy", drop_last=True, prefetch_batches=2
    )


def _parquet_batches(job, listing: PairListing, epoch: int, skip: int) -> Iterator[dict]:
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    ref = None
    if rank == 0:
        items = [{"file": f} for f in listing.files]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(
            read_parquet_file, batch_size=1, fn_kwargs={"storage_options": dict(job.storage_options or {})}
        )
        ds = _augment(ds.random_shuffle(seed=epoch_seed(job.seed, epoch)), job, epoch)
        ref = ray.put(ds.streaming_split(world, equal=True) if world > 1 else [ds.iterator()])
    if world > 1:
        ref = ray.train.collective.broadcast_from_rank_zero([ref])[0]
    shard = ray.get(ref)[rank]
    stream = shard.iter_batches(
        batch_size=job.batch_size, batch_format="numpy", drop_last=True, prefetch_batches=2
    )
    for index, batch in enumerate(stream):
        if index >= skip:
            yield batch


def train_batches(job, *, epoch: int, batch: int) -> Iterator[tuple[int, int, dict]]:
    """(epoch, index in the epoch, numpy batch) from position (epoch, batch) on, epoch after epoch, forever.

    Batches: {"image_id": [B] str, "epoch": [B] int64, "image": [B, 3, S, S] uint8, "label": [B, S, S] int32}.
    """
    listing = list_pairs(job.data, storage_options=dict(job.storage_options or {}))  # once per run
    feed = _folder_batches if listing.layout == "folder" else _parquet_batches
    skip = batch
    while True:
        produced = 0
        for index, data in enumerate(feed(job, listing, epoch, skip), start=skip):
            produced += 1
            yield epoch, index, data
        if produced == 0 and skip == 0:
            raise RuntimeError(f"epoch {epoch} of {job.data} gave this worker no batch of {job.batch_size}")
        epoch, skip = epoch + 1, 0
