"""The ``images`` table: one record per input image, its explicit Arrow schema and how a result becomes one.

A record holds the image's identity (``image_id``, ``source_uri``, ``shard_id``, ``member``), its original
size, ``status`` / ``error``, the label map as a PNG at the original size, one segment per class present
(area, score, bounding box, COCO RLE mask) and its provenance (``model_id``, ``vocabulary_id``, ``run_id``).
``docs/schema.md`` is the reader's guide; ``SCHEMA_VERSION`` changes whenever a column changes meaning or type
and is stored in every Parquet file's key-value metadata under ``ebseg.schema_version``.

The label map PNG is 8-bit when the vocabulary has at most 255 classes (value 255 = no class) and 16-bit
otherwise (65535 = no class), as the project's on-disk label convention. In memory label maps are int32 with
-1 = no class (``ebseg.data.IGNORE_INDEX``).
"""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pycocotools import mask as mask_utils

SCHEMA_VERSION = 1
METADATA_KEY = b"ebseg.schema_version"
NO_CLASS_8BIT = 255
NO_CLASS_16BIT = 65535
# The PNG compression level of label maps: 1 is ~3x faster than zlib's default 6 on label maps and within
# ~10-20 % of its size (they are mostly long runs of one value).
PNG_COMPRESS_LEVEL = 1

SEGMENT_TYPE = pa.struct(
    [
        pa.field("class_id", pa.int32(), nullable=False),  # index into the run's vocabulary
        pa.field("label", pa.string(), nullable=False),  # the class's name in the vocabulary
        pa.field("area", pa.int64(), nullable=False),  # pixels at the original size
        pa.field("area_fraction", pa.float32(), nullable=False),  # area / (width * height)
        pa.field("score", pa.float32(), nullable=False),  # mean class probability over the segment
        pa.field("bbox", pa.list_(pa.int32()), nullable=False),  # [x, y, w, h], pixels, inclusive extent
        pa.field("rle", pa.string(), nullable=False),  # COCO compressed RLE counts; size is [height, width]
    ]
)

IMAGES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string()),
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("member", pa.string()),  # tar member name, Parquet row index, or file name
        pa.field("width", pa.int32()),  # original size; null when the image could not be read
        pa.field("height", pa.int32()),
        pa.field("status", pa.string(), nullable=False),  # "ok" | "error"
        pa.field("error", pa.string()),  # "<reason>: message"; null when ok
        pa.field("label_map", pa.binary()),  # PNG, null on error
        pa.field("segments", pa.list_(SEGMENT_TYPE)),  # classes present, ascending class_id; null on error
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("vocabulary_id", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("elapsed_ms", pa.float32()),  # decode + this image's share of its model batch + encode
    ],
    metadata={METADATA_KEY: str(SCHEMA_VERSION).encode()},
)

# Columns the encode stage adds for the sink, dropped before writing.
SINK_COLUMNS = ("_shard_size", "_decode_ms", "_model_ms", "_encode_ms")


@dataclass(frozen=True)
class Provenance:
    """What produced a record: written into every row."""

    model_id: str
    vocabulary_id: str
    run_id: str


# ----------------------------------------------------------------------------------------------- label maps


def label_dtype(num_classes: int) -> np.dtype:
    """The storage dtype of label maps for a vocabulary of ``num_classes``: uint8 up to 255, else uint16."""
    if num_classes > NO_CLASS_16BIT:
        raise ValueError(f"{num_classes} classes do not fit a 16-bit label map (at most {NO_CLASS_16BIT})")
    return np.dtype(np.uint8) if num_classes <= NO_CLASS_8BIT else np.dtype(np.uint16)


def to_storage(label_map: np.ndarray, num_classes: int) -> np.ndarray:
    """int [H, W] class ids (-1 = no class) -> uint8/uint16 [H, W] with 255/65535 = no class."""
    dtype = label_dtype(num_classes)
    out = label_map.astype(dtype)
    out[label_map < 0] = np.iinfo(dtype).max
    return out


def encode_label_map(labels: np.ndarray) -> bytes:
    """uint8 or uint16 [H, W] (storage values) -> PNG bytes (8-bit or 16-bit grayscale)."""
    if labels.ndim != 2 or labels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected a uint8/uint16 [H, W] label map, got {labels.dtype} {labels.shape}")
    buffer = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(labels))
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def decode_label_map(data: bytes) -> np.ndarray:
    """PNG bytes of a ``label_map`` -> int32 [H, W] class ids, -1 where no class (255 / 65535)."""
    with Image.open(io.BytesIO(data)) as image:
        raw = np.asarray(image)
    no_class = NO_CLASS_8BIT if raw.dtype == np.uint8 else NO_CLASS_16BIT
    out = raw.astype(np.int32)
    out[raw == no_class] = -1
    return out


# ----------------------------------------------------------------------------------------------- segments


def rle_to_mask(counts: str, height: int, width: int) -> np.ndarray:
    """A segment's ``rle`` -> bool [height, width] mask (pycocotools decode)."""
    rle = {"size": [int(height), int(width)], "counts": counts.encode("ascii")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools' numpy 2 copy-keyword notice
        return mask_utils.decode(rle).astype(bool)


def segments(labels: np.ndarray, scores: np.ndarray, names: Sequence[str]) -> list[dict[str, Any]]:
    """One segment per class present in ``labels`` (uint8/uint16 [H, W] storage values), ascending class id.

    scores: [K] float mean probability of each class over its pixels (``Prediction.scores``).
    """
    height, width = labels.shape
    no_class = np.iinfo(labels.dtype).max
    counts = np.bincount(labels.ravel(), minlength=len(names))
    out = []
    for class_id in np.flatnonzero(counts):
        if class_id == no_class:
            continue
        mask = labels == class_id
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
        area = int(counts[class_id])
        x, y = int(cols[0]), int(rows[0])
        out.append(
            {
                "class_id": int(class_id),
                "label": names[class_id],
                "area": area,
                "area_fraction": area / (height * width),
                "score": float(scores[class_id]),
                "bbox": [x, y, int(cols[-1]) - x + 1, int(rows[-1]) - y + 1],
                "rle": rle["counts"].decode("ascii"),
            }
        )
    return out


# ----------------------------------------------------------------------------------------------- records


def _text(value: Any) -> str | None:
    """A string column's value; None for None and for NaN (Ray hands an all-null column over as float NaN)."""
    if value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)):
        return None
    return str(value)


def _size(value: Any) -> int | None:
    return int(value) if value is not None and int(value) > 0 else None


def record(row: Mapping[str, Any], *, names: Sequence[str], provenance: Provenance) -> dict[str, Any]:
    """A model-stage row -> an ``images`` record (plus the sink's ``_``-columns).

    row: {image_id, source_uri, shard_id, member, shard_size, width, height, status, error,
    labels (uint8/uint16 [H, W] at the original size; empty on error), scores [K] float32, decode_ms,
    model_ms}.
    """
    start = time.perf_counter()
    ok = row["status"] == "ok"
    labels = row["labels"] if ok else None
    out = {
        "image_id": str(row["image_id"]),
        "source_uri": _text(row.get("source_uri")),
        "shard_id": str(row["shard_id"]),
        "member": _text(row.get("member")),
        "width": _size(row.get("width")),
        "height": _size(row.get("height")),
        "status": "ok" if ok else "error",
        "error": None if ok else (_text(row.get("error")) or "unknown: no message"),
        "label_map": encode_label_map(labels) if ok else None,
        "segments": segments(labels, row["scores"], names) if ok else None,
        "model_id": provenance.model_id,
        "vocabulary_id": provenance.vocabulary_id,
        "run_id": provenance.run_id,
    }
    encode_ms = (time.perf_counter() - start) * 1000
    decode_ms = float(row.get("decode_ms") or 0.0)
    model_ms = float(row.get("model_ms") or 0.0)
    out["elapsed_ms"] = decode_ms + model_ms + encode_ms
    out["_shard_size"] = int(row["shard_size"])
    out["_decode_ms"] = decode_ms
    out["_model_ms"] = model_ms
    out["_encode_ms"] = encode_ms
    return out


def encode_batch(
    batch: Mapping[str, np.ndarray], *, names: Sequence[str], provenance: Provenance
) -> pa.Table:
    """The encode stage (a ``map_batches`` function): model-stage rows (numpy batch) -> records table."""
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    rows = [record({k: batch[k][i] for k in keys}, names=names, provenance=provenance) for i in range(n)]
    return records_table(rows, extra_columns=SINK_COLUMNS)


def records_table(rows: Sequence[Mapping[str, Any]], *, extra_columns: Sequence[str] = ()) -> pa.Table:
    """Records -> a table with ``IMAGES_SCHEMA`` (and the named extra columns, inferred, after it)."""
    columns = {f.name: pa.array([r[f.name] for r in rows], type=f.type) for f in IMAGES_SCHEMA}
    table = pa.table(columns, schema=IMAGES_SCHEMA)
    for name in extra_columns:
        table = table.append_column(name, pa.array([r[name] for r in rows]))
    return table


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` (``IMAGES_SCHEMA`` columns) as one Parquet file, schema version in its metadata."""
    table = table.select(IMAGES_SCHEMA.names).cast(IMAGES_SCHEMA)
    buffer = io.BytesIO()
    # label_map PNGs are compressed already; zstd still shrinks the RLE strings and ids.
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def schema_version(metadata: Mapping[bytes, bytes] | None) -> int | None:
    """The ``SCHEMA_VERSION`` in a Parquet file's key-value metadata (``pq.read_schema(f).metadata``)."""
    value = (metadata or {}).get(METADATA_KEY)
    return None if value is None else int(value)
