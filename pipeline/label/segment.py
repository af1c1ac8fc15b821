"""The model stage of the labelling graph: decoded images in, label maps at the original size out.

``SegmentImages`` is a callable class for ``Dataset.map_batches`` on an actor pool: each actor loads the
model and builds its ``Segmenter`` once (``ebseg.zoo.SegmenterSettings``), then maps numpy batches of decoded
rows (``pipeline.label.decode``) to prediction rows. It runs without Ray too (call it on a hand-made batch).

A Ray Data block holds many images (``LabelJob.rows_per_block``, so the driver's cost per block is spread
over them); the stage cuts it into model batches itself: images are grouped by padded input shape
(``Segmenter.padded_shape``) and each group is cut into batches of ``batch_size``, so photos of mixed
aspect ratios still run in full batches, and every image's result is the one it gets alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from ebseg.data.labels import label_bits
from ebseg.zoo import SegmenterSettings
from pipeline.batches import object_column
from pipeline.label.decode import DecodeImages
from pipeline.label.parts import PartWriter
from pipeline.label.proposal_records import empty_masks, encode_proposals
from pipeline.label.records import to_storage

# Rows decoded at a time inside the model actor: a few model batches, a bounded amount of pixels.
DECODE_ROWS = 64


def _image_problem(image: Any) -> str | None:
    """Why ``image`` cannot go to the model, found before it can fail a whole batch (None when fine)."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        return f"expected an (H, W, 3) uint8 image, got {desc}"
    if min(image.shape[:2]) < 1:
        return f"empty image {image.shape}"
    return None


class SegmentImages:
    """``map_batches`` callable: decoded rows -> prediction rows.

    In: numpy batch of decoded rows {image_id, source_uri, shard_id, member, shard_size, width, height,
    status, error, image (uint8 [h, w, 3] already at ``Segmenter.input_shape(height, width)``)}.
    Out: the same columns without ``image``, plus ``labels`` (uint8 [height, width] class ids, 255 = none,
    or uint16 / 65535 for vocabularies over 255 classes; (0, 0) on error), ``scores`` (float32 [K] mean
    probability per class over its pixels), ``model_ms`` (this row's share of its batch's model time) and
    ``forward_share`` (this row's share of the forward passes its batch took; 0 for rows not run).

    Error rows pass through untouched. An image the model fails on becomes an error row "model: ..."
    (the batch is retried image by image to find it), so one bad image never fails a batch.
    write_with: when given, the actor also encodes and writes the records (``PartWriter``) and returns its
    part metadata instead, with no separate write stage.
    decode: when given, the batch holds raw rows (``pipeline.label.reading``: encoded ``data``, no
    ``image``) and the actor decodes them itself (``DecodeImages``), ``DECODE_ROWS`` at a time on a
    thread that runs one chunk ahead of the model (PIL and torch release the GIL): Ray Data's blocks then
    carry encoded bytes, ~10x smaller than decoded pixels, so they can be large enough to spread the
    driver's per-block cost over a thousand images.
    proposals_encoding: (mask, embedding) encoding: each row also carries its image's encoded proposals
    (``proposal_masks``, ``proposal_embeddings``, ``proposal_input_size``, see
    ``pipeline.label.proposal_records``), from the same forward pass as its labels.
    """

    def __init__(
        self,
        settings: SegmenterSettings,
        *,
        write_with: PartWriter | None = None,
        decode: DecodeImages | None = None,
        proposals_encoding: tuple[str, str] | None = None,
    ):
        self.segmenter = self.load_segmenter(settings)
        self.proposals_encoding = proposals_encoding
        self.vocabulary = settings.vocabulary
        self.batch_size = settings.batch_size
        self.dtype = np.uint8 if label_bits(len(self.vocabulary)) == 8 else np.uint16
        self.write_with = write_with
        self.decode = decode
        self.forwards = 0  # forward passes run by _predict, counted for the effective batch size

    def load_segmenter(self, settings: SegmenterSettings):
        """The actor's ``Segmenter`` (a benchmark's subclass returns a simulated one instead)."""
        return settings.load()

    def batches(self, sizes: list[tuple[int, int]]) -> list[list[int]]:
        """Indices into ``sizes`` (original (height, width)) cut into model batches: equal padded shape,
        at most ``batch_size`` each, the fullest first."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(sizes):
            groups.setdefault(self.segmenter.padded_shape(*size), []).append(i)
        out = []
        for indices in groups.values():
            out.extend(indices[s : s + self.batch_size] for s in range(0, len(indices), self.batch_size))
        return sorted(out, key=len, reverse=True)

    def _run(self, images: list[np.ndarray], sizes: list[tuple[int, int]]) -> list[Any]:
        """One forward pass: Predictions, or (Prediction, encoded proposals) pairs when storing proposals."""
        self.forwards += 1
        if self.proposals_encoding is None:
            return self.segmenter.predict(images, output_sizes=sizes)
        proposals = self.segmenter.propose(images, output_sizes=sizes)
        predictions = self.segmenter.label(proposals, sizes)
        return [
            (prediction, encode_proposals(p, self.proposals_encoding))
            for prediction, p in zip(predictions, proposals)
        ]

    def _predict(self, images: list[np.ndarray], sizes: list[tuple[int, int]]) -> list[Any]:
        """Results of ``_run``, or an exception per image that failed on its own."""
        try:
            return self._run(images, sizes)
        except Exception:
            if len(images) == 1:
                raise
        results: list[Any] = []
        for image, size in zip(images, sizes):
            try:
                [prediction] = self._run([image], [size])
                results.append(prediction)
            except Exception as e:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                results.append(e)
        return results

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray] | Any:
        if self.decode is None or "data" not in batch:
            out = self._label(batch)
        else:
            out = _concat([self._label(chunk) for chunk in _decoded_chunks(self.decode, batch)])
        return self.write_with(out) if self.write_with is not None else out

    def _label(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image_id"])
        out = {k: np.asarray(v) for k, v in batch.items() if k != "image"}
        status = [str(s) for s in batch["status"]]
        errors = [None if status[i] == "ok" else batch["error"][i] for i in range(n)]
        ok = [i for i in range(n) if status[i] == "ok"]
        num_classes = len(self.vocabulary)
        labels = [np.zeros((0, 0), dtype=self.dtype)] * n
        scores = np.zeros((n, num_classes), dtype=np.float32)
        model_ms = np.zeros(n, dtype=np.float64)
        forward_share = np.zeros(n, dtype=np.float64)
        proposals: list[dict[str, Any] | None] = [None] * n

        for i in ok:
            problem = _image_problem(batch["image"][i])
            if problem:
                status[i], errors[i] = "error", f"model: {problem}"
        ok = [i for i in ok if status[i] == "ok"]

        sizes = [(int(batch["height"][i]), int(batch["width"][i])) for i in ok]
        for members in self.batches(sizes):
            rows = [ok[j] for j in members]
            start, forwards = time.perf_counter(), self.forwards
            try:
                results = self._predict([batch["image"][i] for i in rows], [sizes[j] for j in members])
            except Exception as e:  # a batch of one that failed
                results = [e]
            elapsed_ms = (time.perf_counter() - start) * 1000
            done = [i for i, r in zip(rows, results) if not isinstance(r, BaseException)]
            for i, result in zip(rows, results):
                forward_share[i] = (self.forwards - forwards) / len(rows)
                if isinstance(result, BaseException):
                    status[i] = "error"
                    errors[i] = f"model: {type(result).__name__}: {result}"
                    continue
                if self.proposals_encoding is not None:
                    result, proposals[i] = result
                labels[i] = to_storage(result.label_map, num_classes)
                scores[i] = result.scores
                model_ms[i] = elapsed_ms / max(1, len(done))

        out["status"] = np.array(status, dtype=object)
        out["error"] = np.array(errors, dtype=object)
        out["labels"] = object_column(labels)
        out["scores"] = scores
        out["model_ms"] = model_ms
        out["forward_share"] = forward_share
        if self.proposals_encoding is not None:
            none = {"masks": empty_masks(), "embeddings": empty_masks(), "input_size": np.zeros(2, np.int32)}
            found = [p or none for p in proposals]
            out["proposal_masks"] = object_column([p["masks"] for p in found])
            out["proposal_embeddings"] = object_column([p["embeddings"] for p in found])
            out["proposal_input_size"] = np.array([p["input_size"] for p in found], np.int32).reshape(n, 2)
        return out


def _slice(batch: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    return {key: values[start:stop] for key, values in batch.items()}


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def _decoded_chunks(decode: DecodeImages, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    """``batch`` decoded ``DECODE_ROWS`` rows at a time, the next chunk decoding while the caller runs
    the model on this one; at most two chunks of pixels are held at once."""
    n = len(batch["image_id"])
    starts = range(0, n, DECODE_ROWS)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
        ahead = pool.submit(decode, _slice(batch, 0, DECODE_ROWS))
        for start in starts:
            chunk = ahead.result()
            if start + DECODE_ROWS < n:
                ahead = pool.submit(decode, _slice(batch, start + DECODE_ROWS, start + 2 * DECODE_ROWS))
            yield chunk
