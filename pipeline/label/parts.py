"""Part files: the workers write encoded records straight to the output; the driver gets one small row each.

``PartWriter`` is the last stage of the labelling graph (a CPU task after the model stage, or inside the
model actor with ``encode_in_actor``): model-stage rows -> records (``pipeline.label.records``) -> one
Parquet file per input shard present in the block, at ``OUT/images/<shard_id>/<first>-<last>-<uuid>.parquet``
-> one metadata row per file (``PART_SCHEMA``). Record bytes never pass through the driver. With
proposals, each images part has a proposals part of the same name under ``OUT/proposals/<shard_id>/``
(``pipeline.label.proposal_records``), written first and named in the same metadata row, so the manifest
that commits the one commits the other.

Every attempt of a task writes under new names (the uuid), so a retried task never overwrites a file that
a committed manifest lists; files that no manifest lists are orphans, which readers never open and the
commit deletes (``pipeline.label.commit``).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.label import diehook, proposal_records
from pipeline.label.records import Provenance, encode_batch, parquet_bytes
from pipeline.layout import IMAGES_DIR, PROPOSALS_DIR

# One row per part file: all the driver learns about the records it holds.
PART_SCHEMA = pa.schema(
    [
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("shard_size", pa.int64(), nullable=False),  # rows the whole shard has
        pa.field("file", pa.string(), nullable=False),  # relative to the output root
        pa.field("rows", pa.int64(), nullable=False),
        pa.field("ranges", pa.list_(pa.int64()), nullable=False),  # row indices: [start, stop, start, ...]
        pa.field("bytes", pa.int64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("errors", pa.string(), nullable=False),  # JSON {reason: count}
        pa.field("decode_ms", pa.float64(), nullable=False),  # busy times summed over the rows
        pa.field("model_ms", pa.float64(), nullable=False),
        pa.field("encode_ms", pa.float64(), nullable=False),
        pa.field("write_ms", pa.float64(), nullable=False),
        pa.field("model_images", pa.int64(), nullable=False),  # rows that went through a forward pass
        pa.field("forwards", pa.float64(), nullable=False),  # forward passes those rows took (shares)
        pa.field("proposals_file", pa.string()),  # the proposals part; null without proposals
        pa.field("proposals_rows", pa.int64()),
        pa.field("proposals_bytes", pa.int64()),
        pa.field("proposals_sha256", pa.string()),
    ]
)


def reason(error: str | None) -> str:
    """The reason code of an error message ("decode: cannot identify image" -> "decode")."""
    head, sep, _ = (error or "").partition(":")
    return head.strip() if sep and head.strip() and " " not in head.strip() else "unknown"


def to_ranges(indices: Sequence[int] | np.ndarray) -> list[int]:
    """Sorted distinct row indices -> ``[start, stop, start, stop, ...]`` half-open runs."""
    values = np.asarray(indices, dtype=np.int64)
    if values.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(values) != 1) + 1
    starts = values[np.concatenate([[0], breaks])]
    stops = values[np.concatenate([breaks - 1, [values.size - 1]])] + 1
    return np.column_stack([starts, stops]).ravel().tolist()


def part_name(shard_id: str, indices: np.ndarray) -> str:
    """A new part file's path relative to the output root: unique per attempt, ordered by first row."""
    first, last = int(indices.min()), int(indices.max())
    return f"{IMAGES_DIR}/{shard_id}/{first:07d}-{last:07d}-{uuid.uuid4().hex[:16]}.parquet"


class PartWriter:
    """Model-stage rows (numpy batch, see ``SegmentImages``) -> part files written + ``PART_SCHEMA`` rows.

    The rows must carry ``row_index`` (from ``pipeline.label.reading``); ``forward_share`` (from the model
    stage) counts forward passes. Picklable: the filesystem is made again in each worker.
    proposals_encoding: (mask, embedding) encoding of the rows' ``proposal_*`` columns, which are then
    written as proposals parts; None: no proposals.
    """

    def __init__(
        self,
        output: str,
        *,
        names: Sequence[str],
        provenance: Provenance,
        storage_options: Mapping[str, Any] | None = None,
        proposals_encoding: tuple[str, str] | None = None,
    ):
        self.output = output
        self.proposals_encoding = proposals_encoding
        self.names = list(names)
        self.provenance = provenance
        self.storage_options = dict(storage_options or {})
        self._fs = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None}

    def _filesystem(self):
        if self._fs is None:
            self._fs, self._root = storage.url_to_fs(self.output, self.storage_options)
        return self._fs, self._root

    def __call__(self, batch: Mapping[str, np.ndarray]) -> pa.Table:
        records = encode_batch(batch, names=self.names, provenance=self.provenance)
        n = records.num_rows
        records = records.append_column("_row_index", pa.array(np.asarray(batch["row_index"], np.int64)))
        share = batch.get("forward_share")
        share = np.zeros(n) if share is None else np.asarray(share, np.float64)
        records = records.append_column("_forward_share", pa.array(share))
        proposals = None
        if self.proposals_encoding is not None:
            proposals = proposal_records.proposal_rows(batch, self.proposals_encoding)
        return self.write(records, proposals=proposals)

    def write(self, records: pa.Table, *, proposals: pa.Table | None = None) -> pa.Table:
        """Records (``IMAGES_SCHEMA`` + ``_shard_size``, ``_row_index``, timing columns) -> metadata rows.

        proposals: the records' proposals table (``proposal_records``), written beside them.
        """
        fs, root = self._filesystem()
        shards = records.column("shard_id").to_numpy(zero_copy_only=False)
        by_shard = None if proposals is None else proposals.column("shard_id").to_numpy(zero_copy_only=False)
        rows = []
        for shard in sorted(set(shards.tolist())):
            props = None if proposals is None else proposals.filter(pa.array(by_shard == shard))
            rows.append(self._write_one(fs, root, shard, records.filter(pa.array(shards == shard)), props))
        return pa.Table.from_pylist(rows, schema=PART_SCHEMA)

    def _write_one(
        self, fs, root: str, shard: str, table: pa.Table, proposals: pa.Table | None
    ) -> dict[str, Any]:
        start = time.perf_counter()
        table = table.sort_by("_row_index")
        indices = table.column("_row_index").to_numpy()
        if len(np.unique(indices)) != len(indices):
            raise ValueError(f"shard {shard}: a block holds one row index twice")
        name = part_name(shard, indices)
        diehook.reached("before-part-write")
        extra: dict[str, Any] = {}
        if proposals is not None:
            # Written before the images part: a metadata row never names a part that is not there yet.
            props = proposal_records.parquet_bytes(proposals)
            props_name = PROPOSALS_DIR + name[len(IMAGES_DIR) :]
            storage.write_bytes_atomic(fs, storage.join(root, props_name), props)
            extra = {
                "proposals_file": props_name,
                "proposals_rows": proposals.num_rows,
                "proposals_bytes": len(props),
                "proposals_sha256": hashlib.sha256(props).hexdigest(),
            }
        data = parquet_bytes(table)
        storage.write_bytes_atomic(fs, storage.join(root, name), data)
        diehook.reached("after-part-write")
        statuses, messages = table["status"].to_pylist(), table["error"].to_pylist()
        errors = Counter(reason(e) for s, e in zip(statuses, messages) if s != "ok")
        share = table.column("_forward_share")
        return {
            "shard_id": shard,
            "shard_size": int(table.column("_shard_size")[0].as_py()),
            "file": name,
            "rows": table.num_rows,
            "ranges": to_ranges(indices),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "errors": json.dumps(dict(sorted(errors.items()))),
            "decode_ms": pc.sum(table["_decode_ms"]).as_py() or 0.0,
            "model_ms": pc.sum(table["_model_ms"]).as_py() or 0.0,
            "encode_ms": pc.sum(table["_encode_ms"]).as_py() or 0.0,
            "write_ms": (time.perf_counter() - start) * 1000,
            "model_images": int(pc.sum(pc.greater(share, 0)).as_py() or 0),
            "forwards": pc.sum(share).as_py() or 0.0,
            **extra,
        }
