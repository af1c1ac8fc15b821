"""Records of the ``images`` table: a model-stage row (label map, class scores) -> one record per image.

A record holds the image's identity (``image_id``, ``source_uri``, ``shard_id``, ``member``), its original
size, ``status`` / ``error``, the label map as a PNG at the original size, one segment per class present
(area, score, bounding box, COCO RLE mask) and its provenance (``model_id``, ``vocabulary_id``, ``run_id``).
The schema and the output layout are ``pipeline.layout`` (writers and readers share them).
"""

from __future__ import annotations

import io
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ebseg.data.labels import encode_stored, label_bits, to_stored
from pipeline.label.rle import class_masks
from pipeline.layout import IMAGES_SCHEMA

# The PNG compression level of label maps: 1 is ~3x faster than zlib's default 6 on label maps and within
# ~10-20 % of its size (they are mostly long runs of one value).
PNG_COMPRESS_LEVEL = 1

# Columns the encode stage adds for the sink, dropped before writing.
SINK_COLUMNS = ("_shard_size", "_decode_ms", "_model_ms", "_encode_ms")


@dataclass(frozen=True)
class Provenance:
    """What produced a record: written into every row."""

    model_id: str
    vocabulary_id: str
    run_id: str


def to_storage(label_map: np.ndarray, num_classes: int) -> np.ndarray:
    """int [H, W] class ids (-1 = no class) -> uint8/uint16 [H, W] label-file values for ``num_classes``."""
    return to_stored(label_map, bits=label_bits(num_classes))


# ----------------------------------------------------------------------------------------------- segments


def segments(labels: np.ndarray, scores: np.ndarray, names: Sequence[str]) -> list[dict[str, Any]]:
    """One segment per class present in ``labels`` (uint8/uint16 [H, W] storage values), ascending class id.

    scores: [K] float mean probability of each class over its pixels (``Prediction.scores``).
    """
    height, width = labels.shape
    masks = class_masks(labels)
    return [
        {
            "class_id": int(class_id),
            "label": names[class_id],
            "area": int(area),
            "area_fraction": int(area) / (height * width),
            "score": float(scores[class_id]),
            "bbox": [int(v) for v in box],
            "rle": rle,
        }
        for class_id, area, box, rle in zip(masks.class_ids, masks.areas, masks.boxes, masks.rles)
    ]


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
        "label_map": encode_stored(labels, compress_level=PNG_COMPRESS_LEVEL) if ok else None,
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
