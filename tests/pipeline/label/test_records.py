"""Records of the images table: segments with COCO RLE, the Arrow schema and its Parquet version."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils

from pipeline import layout
from pipeline.label import records
from pipeline.label.records import Provenance
from pipeline.layout import IMAGES_SCHEMA, SCHEMA_VERSION
from tests.ebseg.test_data_labels import random_labels

PROVENANCE = Provenance("tiny:random-seed0", "custom-0123456789ab", "run-x")


def test_segments_match_the_label_map():
    rng = np.random.default_rng(0)
    names = ["sky", "tree", "road", "car", "unused"]
    labels = random_labels(rng, (40, 60), 4, with_none=True)
    stored = records.to_storage(labels, len(names))
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.0], np.float32)
    segs = records.segments(stored, scores, names)
    assert [s["class_id"] for s in segs] == sorted(np.unique(labels[labels >= 0]).tolist())
    for seg in segs:
        mask = labels == seg["class_id"]
        assert seg["label"] == names[seg["class_id"]]
        assert seg["area"] == mask.sum() and seg["area_fraction"] == pytest.approx(mask.sum() / mask.size)
        assert seg["score"] == pytest.approx(scores[seg["class_id"]])
        decoded = layout.rle_to_mask(seg["rle"], 40, 60)
        assert np.array_equal(decoded, mask)
        rle = {"size": [40, 60], "counts": seg["rle"].encode()}
        assert mask_utils.area(rle) == seg["area"]
        assert seg["bbox"] == mask_utils.toBbox(rle).astype(int).tolist()
        ys, xs = np.nonzero(mask)
        assert seg["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def model_row(labels, *, status="ok", error=None, num_classes=3):
    return {
        "image_id": "id-1",
        "source_uri": "s3://b/x.jpg",
        "shard_id": "files-000000-abc",
        "member": None,
        "shard_size": 2,
        "width": labels.shape[1] if status == "ok" else 0,
        "height": labels.shape[0] if status == "ok" else 0,
        "status": status,
        "error": error,
        "labels": labels,
        "scores": np.linspace(0.2, 0.9, num_classes, dtype=np.float32),
        "decode_ms": 1.5,
        "model_ms": 20.0,
    }


def test_record_ok_and_error_rows():
    labels = records.to_storage(np.array([[0, 0, 2], [2, 2, 2]], np.int32), 3)
    ok = records.record(model_row(labels), names=["a", "b", "c"], provenance=PROVENANCE)
    assert ok["status"] == "ok" and ok["error"] is None and (ok["width"], ok["height"]) == (3, 2)
    assert np.array_equal(layout.decode_label_map(ok["label_map"]), [[0, 0, 2], [2, 2, 2]])
    assert [(s["label"], s["area"]) for s in ok["segments"]] == [("a", 2), ("c", 4)]
    assert ok["elapsed_ms"] >= 21.5 and ok["_shard_size"] == 2
    assert (ok["model_id"], ok["vocabulary_id"], ok["run_id"]) == (
        PROVENANCE.model_id,
        PROVENANCE.vocabulary_id,
        PROVENANCE.run_id,
    )

    empty = np.zeros((0, 0), np.uint8)
    row = model_row(empty, status="error", error="decode: not an image")
    bad = records.record(row, names=["a", "b", "c"], provenance=PROVENANCE)
    assert bad["status"] == "error" and bad["error"] == "decode: not an image"
    assert bad["label_map"] is None and bad["segments"] is None and bad["width"] is None


def test_records_table_and_parquet_carry_the_schema_version():
    labels = records.to_storage(np.eye(4, dtype=np.int32), 3)
    rows = [
        records.record(model_row(labels), names=["a", "b", "c"], provenance=PROVENANCE),
        records.record(
            model_row(np.zeros((0, 0), np.uint8), status="error", error="too_large: 9 x 9"),
            names=["a", "b", "c"],
            provenance=PROVENANCE,
        ),
    ]
    table = records.records_table(rows, extra_columns=records.SINK_COLUMNS)
    assert table.schema.names[: len(IMAGES_SCHEMA)] == IMAGES_SCHEMA.names
    assert table.schema.field("segments").type == pa.list_(layout.SEGMENT_TYPE)
    data = records.parquet_bytes(table)
    parquet = pq.ParquetFile(io.BytesIO(data))
    assert layout.schema_version(parquet.schema_arrow.metadata) == SCHEMA_VERSION
    assert parquet.metadata.metadata[layout.METADATA_KEY] == str(SCHEMA_VERSION).encode()
    back = parquet.read()
    assert back.schema.names == IMAGES_SCHEMA.names  # the sink's columns are dropped
    assert back.column("status").to_pylist() == ["ok", "error"]
    seg = back.column("segments").to_pylist()[0][0]
    assert seg["bbox"] == [0, 0, 4, 4] and seg["label"] == "a"


def test_encode_batch_maps_a_numpy_batch():
    a = records.to_storage(np.zeros((5, 7), np.int32), 3)
    b = np.zeros((0, 0), np.uint8)
    labels = np.empty(2, dtype=object)
    labels[0], labels[1] = a, b
    batch = {k: np.array([v, v], dtype=object) for k, v in model_row(a).items() if k != "labels"}
    batch["labels"] = labels
    batch["status"] = np.array(["ok", "error"], dtype=object)
    batch["error"] = np.array([None, "read: gone"], dtype=object)
    batch["scores"] = np.zeros((2, 3), np.float32)
    table = records.encode_batch(batch, names=["a", "b", "c"], provenance=PROVENANCE)
    assert table.num_rows == 2 and table.column("_shard_size").to_pylist() == [2, 2]
    assert table.column("error").to_pylist() == [None, "read: gone"]
