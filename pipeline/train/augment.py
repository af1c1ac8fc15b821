"""The augmentation stage of training: pairs -> crops of the recipe's size, deterministic per (seed, epoch,
image id), so a resumed run sees the same crops and colours whatever the order, batching or worker.

``AugmentBatch`` is the Ray Data ``map_batches`` callable; ``build_train_dataset`` is a whole-epochs dataset
of augmented rows (the workers' own per-epoch feed is ``pipeline.train.feed``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from ebseg.data.transforms import AugmentConfig, augment, augment_config
from pipeline.pairs import (
    PairError,
    PairListing,
    check_label,
    decode_pair,
    folder_dataset,
    list_pairs,
    parquet_dataset,
)


def pair_rng(seed: int, epoch: int, image_id: str) -> np.random.Generator:
    """The augmentation randomness of one pair in one epoch; independent of row order and of workers."""
    digest = hashlib.sha256(image_id.encode("utf-8")).digest()
    return np.random.default_rng([int(seed), int(epoch), int.from_bytes(digest[:8], "little")])


class AugmentBatch:
    """``map_batches`` callable: rows {image_id, image, label (bytes)[, epoch]} -> training rows
    {"image_id": str, "epoch": int64, "image": uint8 [3, S, S], "label": int32 [S, S], "problem": str},
    S = crop size.

    The epoch of a row is its ``epoch`` column when the batch has one, else the constructor's ``epoch``;
    each row is augmented with :func:`pair_rng` (seed, epoch, image_id), so the output does not depend on
    batching, order or worker, and a resumed run repeats it exactly.

    A pair that cannot train (``pipeline.pairs.PairError``: unreadable, sizes differ, and with
    ``num_classes`` a class id outside the vocabulary or an all-ignore label) is kept as a row whose
    ``problem`` names the reason (zeros for pixels), so the consumer counts what it skips; good rows have
    ``problem == ""``.
    """

    def __init__(
        self,
        config: AugmentConfig | str,
        seed: int,
        epoch: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        self.config = augment_config(config)
        self.seed = int(seed)
        self.epoch = epoch
        self.num_classes = num_classes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(i) for i in batch["image_id"]]
        if "epoch" in batch:
            epochs = [int(e) for e in batch["epoch"]]
        elif self.epoch is not None:
            epochs = [int(self.epoch)] * len(ids)
        else:
            raise ValueError("AugmentBatch needs an 'epoch' column or an epoch argument")
        size = self.config.crop_size
        images, labels, problems = [], [], []
        for image_id, epoch, image_bytes, label_bytes in zip(ids, epochs, batch["image"], batch["label"]):
            try:
                image, label = decode_pair(image_bytes, label_bytes, image_id=image_id)
                if self.num_classes is not None:
                    check_label(label, self.num_classes, image_id=image_id)
            except PairError as e:
                images.append(np.zeros((3, size, size), np.uint8))
                labels.append(np.zeros((size, size), np.int32))
                problems.append(e.reason)
                continue
            image, label = augment(image, label, self.config, pair_rng(self.seed, epoch, image_id))
            images.append(image)
            labels.append(label)
            problems.append("")
        return {
            "image_id": np.asarray(ids, dtype=object),
            "epoch": np.asarray(epochs, dtype=np.int64),
            "image": np.stack(images) if images else np.zeros((0, 3, size, size), np.uint8),
            "label": np.stack(labels) if labels else np.zeros((0, size, size), np.int32),
            "problem": np.asarray(problems, dtype=object),
        }


def good_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``map_batches``: the rows of :class:`AugmentBatch` output that can train."""
    keep = np.asarray([not p for p in batch["problem"]], dtype=bool)
    return {key: value[keep] for key, value in batch.items()}


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of one epoch (32 bits, as Ray wants)."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


def build_train_dataset(
    uri: str,
    *,
    augment: AugmentConfig | str,
    seed: int,
    epoch: int = 0,
    epochs: int = 1,
    storage_options: Mapping[str, Any] | None = None,
    shuffle: bool = True,
    ordered: bool = True,
    batch_size: int = 16,
    concurrency: int | tuple[int, int] | None = None,
):
    """The augmented training rows of epochs ``epoch .. epoch + epochs - 1``: :class:`AugmentBatch` rows
    {image_id, epoch, image uint8 [3, S, S], label int32 [S, S]}, every pair once per epoch.

    Each epoch is shuffled with :func:`epoch_seed` (seed, epoch): in the folder layout the driver permutes the
    file list (epochs follow one another); for Parquet each epoch's rows go through Ray's ``random_shuffle``
    with that seed and the epochs are unioned (their rows interleave). ``ordered=True`` sets the dataset's
    ``preserve_order``, so every run yields the same rows in the same order, at some cost in throughput;
    with False the order follows task completion. Augmentation never depends on the order (see
    :class:`AugmentBatch`). ``concurrency``: augmentation actors, a fixed count or (min, max); None lets Ray
    autoscale the pool.
    """
    import ray

    config = augment_config(augment)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    listing = list_pairs(uri, storage_options=storage_options)
    epoch_range = range(epoch, epoch + epochs)
    if listing.layout == "folder":
        ds = _folder_epochs(listing, epoch_range, seed=seed, shuffle=shuffle, storage_options=storage_options)
    else:
        parts = []
        for e in epoch_range:
            part = parquet_dataset(listing, storage_options)
            if shuffle:
                part = part.random_shuffle(seed=epoch_seed(seed, e))
            parts.append(part.map_batches(_with_epoch, fn_kwargs={"epoch": e}, batch_format="pyarrow"))
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    if concurrency is None:
        compute = None
    elif isinstance(concurrency, int):
        compute = ray.data.ActorPoolStrategy(size=concurrency)
    else:
        compute = ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1])
    ds = ds.map_batches(
        AugmentBatch,
        fn_constructor_kwargs={"config": config, "seed": seed},
        batch_size=batch_size,
        compute=compute,
    ).map_batches(good_rows, batch_format="numpy")
    ds.context.execution_options.preserve_order = ordered  # this dataset's own context copy
    return ds


def _folder_epochs(
    listing: PairListing,
    epochs: range,
    *,
    seed: int,
    shuffle: bool,
    storage_options: Mapping[str, Any] | None,
):
    rows = []
    for e in epochs:
        order = np.arange(listing.count)
        if shuffle:
            order = np.random.default_rng(epoch_seed(seed, e)).permutation(listing.count)
        pairs = (listing.pairs[k] for k in order)
        rows += [{"image_id": i, "image_uri": a, "label_uri": b, "epoch": e} for i, a, b in pairs]
    return folder_dataset(listing.uri, rows, storage_options)


def _with_epoch(batch: pa.Table, *, epoch: int) -> pa.Table:
    return batch.append_column("epoch", pa.array(np.full(batch.num_rows, epoch, np.int64)))
