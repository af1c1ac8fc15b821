"""Evaluation at scale: mIoU of a model over an (image, label map) set at any URI, on Ray Data.

    read_pairs (driver lists, tasks read bytes) -> decode_pairs (CPU tasks)
        -> ScoreBatch (actor pool: the model; one sparse confusion matrix per batch)
        -> driver: sums the matrices, computes the metrics, writes ``<output>/metrics.json``

The data is a training-style set (``pipeline.train_data``: ``images/`` + ``annotations/`` folders, or
Parquet with image and label bytes). Predictions are made at the model's inference scale and compared at
each label map's own size, as the reference's evaluator does (``ebseg.evaluation`` holds the rules).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy

import ebseg
from ebseg.checkpoint import RandomWeightsWarning
from ebseg.data import IGNORE_INDEX
from ebseg.evaluation import SegmentationMetric, confusion_matrix
from ebseg.vocab import Vocabulary
from pipeline import storage
from pipeline.cluster import ensure_ray
from pipeline.model_stage import AMP_DTYPES, describe_model, load_segmenter
from pipeline.train_data import decode_pair, read_pairs

DECODE_BATCH_SIZE = 8
METRICS_FILE = "metrics.json"
VOCABULARY_FILE = "vocabulary.json"  # written at a data root by ebseg.data.shapes.write_shapes


@dataclass(frozen=True)
class EvalJob:
    """An evaluation run. ``storage_options`` apply to data and output (never written out).

    data: a training-style set (folder or Parquet layout, see ``pipeline.train_data``).
    output: a folder URI; the run writes ``<output>/metrics.json``.
    model: an ``ebseg.checkpoint.load_model`` value: tiny / demo / base / large / checkpoint path or URI.
    vocabulary: a ``Vocabulary.parse`` value or a Vocabulary; None takes ``<data>/vocabulary.json``. Label
        value i is class i of the vocabulary.
    limit: evaluate only the first ``limit`` pairs by image id.
    device: the actors' torch device; default "cuda" when gpus_per_actor > 0, else "cpu".
    amp_dtype: autocast dtype on GPU ("bf16", "fp16"); None / "fp32" (default) evaluates in float32.
    """

    data: str
    output: str
    model: str = "demo"
    vocabulary: str | Vocabulary | None = None
    batch_size: int = 4
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    device: str | None = None
    amp_dtype: str | None = None
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False)
    limit: int | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "actors"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EvalJob.{name} must be a positive integer, got {value!r}")
        if self.limit is not None and (
            isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1
        ):
            raise ValueError(f"EvalJob.limit must be a positive integer or None, got {self.limit!r}")
        if self.gpus_per_actor < 0 or self.cpus_per_actor <= 0:
            raise ValueError(
                f"EvalJob.gpus_per_actor must be >= 0 and cpus_per_actor > 0, got "
                f"{self.gpus_per_actor!r} and {self.cpus_per_actor!r}"
            )
        if self.amp_dtype not in AMP_DTYPES:
            raise ValueError(f"EvalJob.amp_dtype must be one of {sorted(map(str, AMP_DTYPES))}")


def resolve_vocabulary(job: EvalJob) -> Vocabulary:
    """The job's vocabulary, or the one stored beside the data; a clear error when there is neither."""
    if isinstance(job.vocabulary, Vocabulary):
        return job.vocabulary
    if job.vocabulary is not None:
        return Vocabulary.parse(job.vocabulary)
    fs, root = storage.url_to_fs(job.data, job.storage_options)
    path = storage.join(root, VOCABULARY_FILE)
    if not fs.exists(path):
        raise ValueError(
            f"EvalJob.vocabulary is not set and {storage.full_uri(fs, path)} does not exist: name the "
            "vocabulary whose class i is label value i (a benchmark, a file or 'cat,dog,...')"
        )
    try:
        return Vocabulary.from_dict(storage.read_json(fs, path))
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{storage.full_uri(fs, path)}: not a vocabulary file ({e})") from e


def _object_column(values: list) -> np.ndarray:
    """A 1-D object array of arrays (never stacked into one N-D array, even when shapes agree)."""
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        out[i] = value
    return out


def decode_pairs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """map_batches: rows {image_id, image, label (encoded bytes)} -> {image_id, image uint8 [H, W, 3],
    label int32 [H, W] (-1 = ignore)}. A file that does not decode fails the run, naming its image id."""
    ids = [str(i) for i in batch["image_id"]]
    pairs = [decode_pair(im, lab, image_id=i) for i, im, lab in zip(ids, batch["image"], batch["label"])]
    return {
        "image_id": np.asarray(ids, dtype=object),
        "image": _object_column([p[0] for p in pairs]),
        "label": _object_column([p[1] for p in pairs]),
    }


class ScoreBatch:
    """map_batches callable for an actor pool: loads the model once, then maps decoded pairs to one row
    per batch, {images: int, image_ids: [str], cells: [int64] flat indices gt * K + pred, counts: [int64]}:
    the batch's confusion matrix, sparse (a batch touches few of the K^2 cells). Runs without Ray too."""

    def __init__(
        self,
        *,
        model: str,
        vocabulary: Vocabulary,
        batch_size: int = 4,
        device: str = "cpu",
        amp_dtype: str | None = None,
        num_threads: int | None = None,
    ):
        self.segmenter = load_segmenter(
            model,
            vocabulary,
            batch_size=batch_size,
            device=device,
            amp_dtype=amp_dtype,
            num_threads=num_threads,
        )
        self.num_classes = len(vocabulary)
        self.segmenter.class_embeddings()  # encode the vocabulary once, before the first batch

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
        fn_constructor_kwargs={
            "model": job.model,
            "vocabulary": vocabulary,
            "batch_size": job.batch_size,
            "device": device,
            "amp_dtype": job.amp_dtype,
            "num_threads": max(1, int(job.cpus_per_actor)),
        },
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
    vocabulary = resolve_vocabulary(job)
    model = describe_model(job.model)
    device = job.device or ("cuda" if job.gpus_per_actor > 0 else "cpu")
    fs, root = storage.url_to_fs(job.output, job.storage_options)  # fail on a bad output before the work
    ensure_ray()
    metric = SegmentationMetric(len(vocabulary), ignore_index=IGNORE_INDEX)
    flat = metric.confusion.reshape(-1)  # a view: adding into it fills the matrix
    seen_ids: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)  # describe_model warned once already
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
