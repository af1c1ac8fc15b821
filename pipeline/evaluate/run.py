"""Evaluation at scale: mIoU of a model over an (image, label map) set at any URI, on Ray Data.

    read_pairs (driver lists, tasks read bytes) -> decode_pairs (CPU tasks)
        -> ScoreBatch (actor pool: the model; one sparse confusion matrix per batch)
        -> driver: sums the matrices, computes the metrics, writes ``<output>/metrics.json``

The data is a pair set (``pipeline.pairs``: ``images/`` + ``annotations/`` folders, or
Parquet with image and label bytes). Predictions are made at the model's inference scale and compared at
each label map's own size, as the reference's evaluator does (``ebseg.metrics`` holds the rules).
"""

from __future__ import annotations

import math
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy

import ebseg
from ebseg.data import IGNORE_INDEX
from ebseg.metrics import SegmentationMetric, confusion_matrix
from ebseg.vocab import Vocabulary
from ebseg.zoo import SegmenterSettings, describe_model
from pipeline import storage
from pipeline.batches import object_column
from pipeline.cluster import ensure_ray
from pipeline.evaluate.job import EvalJob
from pipeline.pairs import decode_pair, pairs_vocabulary, read_pairs

DECODE_BATCH_SIZE = 8
METRICS_FILE = "metrics.json"


def decode_pairs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """map_batches: rows {image_id, image, label (encoded bytes)} -> {image_id, image uint8 [H, W, 3],
    label int32 [H, W] (-1 = ignore)}. A file that does not decode fails the run, naming its image id."""
    ids = [str(i) for i in batch["image_id"]]
    pairs = [decode_pair(im, lab, image_id=i) for i, im, lab in zip(ids, batch["image"], batch["label"])]
    return {
        "image_id": np.asarray(ids, dtype=object),
        "image": object_column([p[0] for p in pairs]),
        "label": object_column([p[1] for p in pairs]),
    }


class ScoreBatch:
    """map_batches callable for an actor pool: loads the model once, then maps decoded pairs to one row
    per batch, {images: int, image_ids: [str], cells: [int64] flat indices gt * K + pred, counts: [int64]}:
    the batch's confusion matrix, sparse (a batch touches few of the K^2 cells). Runs without Ray too."""

    def __init__(self, settings: SegmenterSettings):
        self.segmenter = settings.load()
        self.num_classes = len(settings.vocabulary)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ids = [str(i) for i in batch["image_id"]]
        images, labels = list(batch["image"]), list(batch["label"])
        confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        for image_id, label, prediction in zip(ids, labels, self.segmenter.predict(images)):
            try:
                confusion += confusion_matrix(prediction.label_map, label, self.num_classes)
            except ValueError as e:
                raise ValueError(f"{image_id}: {e} (the vocabulary has {self.num_classes} classes)") from e
        cells = np.flatnonzero(confusion)
        return pa.table(
            {
                "images": pa.array([len(ids)], pa.int64()),
                "image_ids": pa.array([ids], pa.list_(pa.string())),
                "cells": pa.array([cells], pa.list_(pa.int64())),
                "counts": pa.array([confusion.ravel()[cells]], pa.list_(pa.int64())),
            }
        )


def build_eval_dataset(job: EvalJob, vocabulary: Vocabulary, device: str) -> ray.data.Dataset:
    """The lazy dataset of per-batch sparse confusion rows (see :class:`ScoreBatch`)."""
    ds = read_pairs(job.data, storage_options=job.storage_options)
    if job.limit is not None:
        ds = ds.limit(job.limit)
    ds = ds.map_batches(decode_pairs, batch_size=DECODE_BATCH_SIZE, batch_format="numpy")
    return ds.map_batches(
        ScoreBatch,
        batch_size=job.batch_size,
        batch_format="numpy",
        fn_constructor_args=(
            SegmenterSettings(
                job.model,
                vocabulary,
                batch_size=job.batch_size,
                device=device,
                amp_dtype=job.amp_dtype,
                num_threads=max(1, int(job.cpus_per_actor)),
            ),
        ),
        compute=ActorPoolStrategy(size=job.actors),
        num_cpus=job.cpus_per_actor,
        num_gpus=job.gpus_per_actor or None,
    )


def _finite(value: float) -> float | None:
    """JSON has no NaN: an undefined metric is written as null."""
    return None if value is None or math.isnan(value) else float(value)


def metrics_record(metric: SegmentationMetric, vocabulary: Vocabulary) -> dict[str, Any]:
    """The metrics part of ``metrics.json``: JSON-ready, nulls for undefined values."""
    r = metric.compute(seen=vocabulary.seen)
    per_class = [
        {
            "id": i,
            "name": name,
            "seen": bool(vocabulary.seen[i]),
            "iou": _finite(r["per_class_iou"][i]),
            "accuracy": _finite(r["per_class_accuracy"][i]),
            "gt_pixels": r["gt_pixels"][i],
            "pred_pixels": r["pred_pixels"][i],
        }
        for i, name in enumerate(vocabulary.names)
    ]
    keys = ("mIoU", "mean_accuracy", "pixel_accuracy", "fwIoU", "seen_mIoU", "unseen_mIoU", "hIoU")
    return {
        **{k: _finite(r[k]) for k in keys},
        "images": r["images"],
        "pixels": r["pixels"],
        "classes_evaluated": r["classes_evaluated"],
        "per_class": per_class,
    }


def run(job: EvalJob) -> dict[str, Any]:
    """Evaluate ``job.model`` on ``job.data``; writes and returns the ``metrics.json`` content.

    Uses the connected Ray, else ``$RAY_ADDRESS``, else a new local Ray (``pipeline.cluster``).
    """
    start = time.monotonic()
    vocabulary = pairs_vocabulary(job.data, job.vocabulary, job.storage_options)
    model = describe_model(job.model)
    device = job.device or ("cuda" if job.gpus_per_actor > 0 else "cpu")
    fs, root = storage.url_to_fs(job.output, job.storage_options)  # fail on a bad output before the work
    ensure_ray()
    metric = SegmentationMetric(len(vocabulary), ignore_index=IGNORE_INDEX)
    flat = metric.confusion.reshape(-1)  # a view: adding into it fills the matrix
    seen_ids: set[str] = set()
    for row in build_eval_dataset(job, vocabulary, device).iter_rows():
        np.add.at(flat, np.asarray(row["cells"], dtype=np.int64), np.asarray(row["counts"], np.int64))
        metric.images += int(row["images"])
        seen_ids.update(str(i) for i in row["image_ids"])
    if len(seen_ids) != metric.images:
        raise RuntimeError(
            f"{metric.images} images scored but {len(seen_ids)} distinct ids: rows were repeated"
        )
    record = {
        "kind": "eval",
        "data": job.data,
        "model": job.model,
        "model_id": model.model_id,
        "vocabulary": vocabulary.name or ",".join(vocabulary.names[:20]),
        "vocabulary_id": vocabulary.id,
        "num_classes": len(vocabulary),
        "limit": job.limit,
        **metrics_record(metric, vocabulary),
        "ebseg_version": ebseg.__version__,
        "ray_version": ray.__version__,
        "elapsed_s": round(time.monotonic() - start, 3),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    storage.write_json_atomic(fs, storage.join(root, METRICS_FILE), record)
    return record
