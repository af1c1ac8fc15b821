"""The model stage of the labelling graph: decoded images in, label maps at the original size out.

``SegmentImages`` is a callable class for ``Dataset.map_batches`` on an actor pool: each actor loads the
model and builds its ``Segmenter`` once, then maps numpy batches of decoded rows (``pipeline.decode``) to
prediction rows. It runs without Ray too (call it on a hand-made batch). ``describe_model`` answers, on the
driver and without building the model, what the decode stage and the records need: the model's inference
scale and a stable id.
"""

from __future__ import annotations

import hashlib
import io
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch

from ebseg.checkpoint import DEMO_WEIGHTS, FORMAT, HF_FILES, RANDOM_PRESETS, RandomWeightsWarning, load_model
from ebseg.config import EBSegConfig, get_config
from ebseg.official import infer_official_preset, unwrap_state_dict
from ebseg.predictor import Segmenter
from ebseg.vocab import Vocabulary
from pipeline.records import Provenance, encode_batch, label_dtype, to_storage
from pipeline.storage import is_local

AMP_DTYPES = {None: None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Random-weight presets are built under this seed, so every actor (and every resumed run) has the same model.
RANDOM_SEED = 0
MAX_LONG_SIDE = 2560  # Segmenter's default cap on the resized long side


@dataclass(frozen=True)
class ModelInfo:
    """What the driver needs to know about a ``--model`` value.

    model_id: stable id written into every record: ``tiny:random-seed0``, ``base:official`` (the released
    EBSeg-B), or ``<preset>:sha256-<16 hex of the checkpoint file>`` for demo and checkpoint paths.
    short_side / max_long_side: the resize the decode stage applies (``Segmenter.input_shape``).
    """

    spec: str
    model_id: str
    preset: str
    short_side: int | None
    max_long_side: int = MAX_LONG_SIDE


def _checkpoint_config(uri: str) -> tuple[EBSegConfig, str]:
    """The config a checkpoint file holds (ebseg or official format) and the sha256 of its bytes."""
    digest = hashlib.sha256()
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"model: no checkpoint at {uri!r} (give tiny, demo, base, large or a path)")
    if is_local(fs):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        # mmap: reading the config does not page the weights in.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    else:
        data = fs.cat_file(path)
        digest.update(data)
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        config = EBSegConfig.from_dict(obj["config"])
    else:
        config = get_config(infer_official_preset(unwrap_state_dict(obj)))
    return config, digest.hexdigest()


def describe_model(spec: str) -> ModelInfo:
    """The id and inference scale of the model ``spec`` names (``ebseg.checkpoint.load_model`` values).

    Presets are described from their config; demo and checkpoint files are hashed and their config read
    (memory-mapped for local files), so the driver never builds the model.
    """
    if spec in RANDOM_PRESETS:
        warnings.warn(
            f"model {spec!r} has random weights: its labels are meaningless (tests and mechanics only)",
            RandomWeightsWarning,
            stacklevel=2,
        )
        return ModelInfo(spec, f"{spec}:random-seed{RANDOM_SEED}", spec, get_config(spec).short_side)
    if spec in HF_FILES:
        return ModelInfo(spec, f"{spec}:official", spec, get_config(spec).short_side)
    config, sha = _checkpoint_config(DEMO_WEIGHTS if spec == "demo" else spec)
    return ModelInfo(spec, f"{config.name}:sha256-{sha[:16]}", config.name, config.short_side)


def _object_column(values: list) -> np.ndarray:
    """A 1-D object array of arrays (never broadcast into one N-D array, even when shapes agree)."""
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        out[i] = value
    return out


def _image_problem(image: Any) -> str | None:
    """Why ``image`` cannot go to the model, found before it can fail a whole batch (None when fine)."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        return f"expected an (H, W, 3) uint8 image, got {desc}"
    if min(image.shape[:2]) < 1:
        return f"empty image {image.shape}"
    return None


def load_segmenter(
    model: str,
    vocabulary: Vocabulary,
    *,
    batch_size: int = 4,
    device: str = "cpu",
    amp_dtype: str | None = None,
    num_threads: int | None = None,
) -> Segmenter:
    """A Segmenter for an actor: the model from a ``load_model`` spec, autocast only on CUDA.

    Random-weight presets are built under a fixed seed: every actor (and every resume) has the same weights.
    """
    if num_threads:
        torch.set_num_threads(num_threads)
    torch.manual_seed(RANDOM_SEED)  # only random-weight presets depend on it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)  # the driver warned once already
        network = load_model(model, map_location=device)
    amp = AMP_DTYPES[amp_dtype] if torch.device(device).type == "cuda" else None
    return Segmenter(network, vocabulary, batch_size=batch_size, device=device, amp_dtype=amp)


class SegmentImages:
    """``map_batches`` callable: decoded rows -> prediction rows.

    In: numpy batch of decoded rows {image_id, source_uri, shard_id, member, shard_size, width, height,
    status, error, image (uint8 [h, w, 3] already at ``Segmenter.input_shape(height, width)``)}.
    Out: the same columns without ``image``, plus ``labels`` (uint8 [height, width] class ids, 255 = none,
    or uint16 / 65535 for vocabularies over 255 classes; (0, 0) on error), ``scores`` (float32 [K] mean
    probability per class over its pixels) and ``model_ms`` (this row's share of the batch's model time).

    Error rows pass through untouched. An image the model fails on becomes an error row "model: ..."
    (the batch is retried image by image to find it), so one bad image never fails a batch.
    encode_with: when given, the actor also encodes the records (``pipeline.records.encode_batch``) and
    returns a records table instead, with no separate encode stage.
    """

    def __init__(
        self,
        *,
        model: str,
        vocabulary: Vocabulary,
        batch_size: int = 4,
        device: str = "cpu",
        amp_dtype: str | None = None,
        num_threads: int | None = None,
        encode_with: Provenance | None = None,
    ):
        self.segmenter = load_segmenter(
            model,
            vocabulary,
            batch_size=batch_size,
            device=device,
            amp_dtype=amp_dtype,
            num_threads=num_threads,
        )
        self.vocabulary = vocabulary
        self.dtype = label_dtype(len(vocabulary))
        self.encode_with = encode_with
        self.segmenter.class_embeddings()  # encode the vocabulary now, not inside the first batch's time

    def _predict(self, images: list[np.ndarray], sizes: list[tuple[int, int]]) -> list[Any]:
        """Predictions, or an exception per image that failed on its own."""
        try:
            return self.segmenter.predict(images, output_sizes=sizes)
        except Exception:
            if len(images) == 1:
                raise
        results: list[Any] = []
        for image, size in zip(images, sizes):
            try:
                [prediction] = self.segmenter.predict([image], output_sizes=[size])
                results.append(prediction)
            except Exception as e:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                results.append(e)
        return results

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray] | Any:
        n = len(batch["image_id"])
        out = {k: np.asarray(v) for k, v in batch.items() if k != "image"}
        status = [str(s) for s in batch["status"]]
        errors = [None if status[i] == "ok" else batch["error"][i] for i in range(n)]
        ok = [i for i in range(n) if status[i] == "ok"]
        num_classes = len(self.vocabulary)
        labels = [np.zeros((0, 0), dtype=self.dtype)] * n
        scores = np.zeros((n, num_classes), dtype=np.float32)
        model_ms = np.zeros(n, dtype=np.float64)

        for i in ok:
            problem = _image_problem(batch["image"][i])
            if problem:
                status[i], errors[i] = "error", f"model: {problem}"
        ok = [i for i in ok if status[i] == "ok"]

        start = time.perf_counter()
        images = [batch["image"][i] for i in ok]
        sizes = [(int(batch["height"][i]), int(batch["width"][i])) for i in ok]
        try:
            results = self._predict(images, sizes) if ok else []
        except Exception as e:  # a batch of one that failed
            results = [e]
        elapsed_ms = (time.perf_counter() - start) * 1000
        done = [i for i, r in zip(ok, results) if not isinstance(r, BaseException)]
        for i, result in zip(ok, results):
            if isinstance(result, BaseException):
                status[i] = "error"
                errors[i] = f"model: {type(result).__name__}: {result}"
                continue
            labels[i] = to_storage(result.label_map, num_classes)
            scores[i] = result.scores
            model_ms[i] = elapsed_ms / max(1, len(done))

        out["status"] = np.array(status, dtype=object)
        out["error"] = np.array(errors, dtype=object)
        out["labels"] = _object_column(labels)
        out["scores"] = scores
        out["model_ms"] = model_ms
        if self.encode_with is not None:
            return encode_batch(out, names=self.vocabulary.names, provenance=self.encode_with)
        return out
