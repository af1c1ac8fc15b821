"""The labelling sink: encoded records in, one committed Parquet file per input shard out.

Layout under the output root ``OUT`` (``pipeline.layout``)::

    OUT/images/<shard_id>.parquet     every record of one input shard (``IMAGES_SCHEMA``)
    OUT/_manifest/<shard_id>.json     written after its Parquet file: the commit mark of the shard

Ray Data writes files per block, and a block mixes rows of several shards, so the sink runs on the driver
instead: it consumes the record stream (``Dataset.iter_batches``), buffers rows per shard, and once all
``shard_size`` rows of a shard have arrived (deduplicated by ``image_id``, so a retried task cannot write an
image twice) it writes the shard's Parquet file atomically (``storage.write_bytes_atomic``: temporary name
and rename locally, one PUT on object stores) and then its manifest, on a small thread pool so uploads overlap
the stream. The driver sees only encoded records (PNG label maps, RLE strings: tens of KB per image), and
its memory is bounded by the shards in flight times their size.

A shard is committed iff its manifest exists; a rerun lists ``_manifest/`` and never reads committed shards.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.label.records import SINK_COLUMNS, parquet_bytes
from pipeline.layout import IMAGES_DIR, IMAGES_SCHEMA, MANIFEST_DIR, SCHEMA_VERSION

# Shard ids become file names on every store: keep them to a portable alphabet.
_SHARD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,200}$")


def check_shard_id(shard_id: str) -> str:
    if not _SHARD_ID.match(shard_id):
        raise ValueError(f"shard id {shard_id!r} cannot be a file name (letters, digits and ._=+- only)")
    return shard_id


def reason(error: str | None) -> str:
    """The reason code of an error message ("decode: cannot identify image" -> "decode")."""
    head, sep, _ = (error or "").partition(":")
    return head.strip() if sep and head.strip() and " " not in head.strip() else "unknown"


@dataclass
class _Buffer:
    expected: int
    tables: list[pa.Table] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    first_row: float = field(default_factory=time.monotonic)


@dataclass
class SinkReport:
    """What the sink wrote. ``incomplete``: shard id -> (rows received, rows expected), not committed."""

    manifests: list[dict[str, Any]] = field(default_factory=list)
    incomplete: dict[str, tuple[int, int]] = field(default_factory=dict)
    duplicate_rows: int = 0


class ShardSink:
    """Buffers records per shard; commits a shard when its last row arrives. Use as a context manager.

    expected_shards: the shard ids this run processes. One that yields no row at all (an empty input) is
    committed empty at :meth:`close`; one with missing rows is reported and left uncommitted, for a rerun.
    manifest_fields: written into every manifest (run_id, model_id, vocabulary_id).
    on_commit: called on the driver's thread with each manifest, for progress display.
    """

    def __init__(
        self,
        root: str,
        *,
        fs,
        expected_shards: Iterable[str],
        manifest_fields: Mapping[str, Any] | None = None,
        max_uploads: int = 4,
        on_commit=None,
    ):
        self.fs, self.root = fs, root
        self.expected = {check_shard_id(s) for s in expected_shards}
        self.manifest_fields = dict(manifest_fields or {})
        self.max_uploads = max_uploads
        self.on_commit = on_commit
        self.report = SinkReport()
        self._buffers: dict[str, _Buffer] = {}
        self._committed: set[str] = set()
        self._executor = ThreadPoolExecutor(max_uploads, thread_name_prefix="ebseg-sink")
        self._inflight: set[Future] = set()
        self._lock = threading.Lock()

    def expect(self, shard_ids: Iterable[str]) -> None:
        """Add shards to this run (a run schedules its shards in waves as the listing streams)."""
        self.expected.update(check_shard_id(s) for s in shard_ids)

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, *exc) -> None:
        self._executor.shutdown(wait=True, cancel_futures=exc[0] is not None)

    def add(self, table: pa.Table) -> int:
        """Take a batch of records (``IMAGES_SCHEMA`` + ``_shard_size``...); returns the new rows kept."""
        shard_ids = table.column("shard_id").to_pylist()
        image_ids = table.column("image_id").to_pylist()
        sizes = table.column("_shard_size").to_pylist()
        rows: dict[str, list[int]] = {}
        kept = 0
        for i, (shard, image) in enumerate(zip(shard_ids, image_ids)):
            buffer = self._buffers.get(shard)
            if shard in self._committed or (buffer is not None and image in buffer.ids):
                self.report.duplicate_rows += 1  # a retried task's rows
                continue
            if shard not in self.expected:
                raise ValueError(f"record {image!r} names shard {shard!r}, which this run did not schedule")
            if buffer is None:
                buffer = self._buffers[shard] = _Buffer(expected=int(sizes[i]))
            buffer.ids.add(image)
            rows.setdefault(shard, []).append(i)
            kept += 1
        for shard, indices in rows.items():
            buffer = self._buffers[shard]
            buffer.tables.append(table.take(indices))  # a copy: the batch's buffers are not kept alive
            if len(buffer.ids) >= buffer.expected:
                self._commit(shard, self._buffers.pop(shard))
        self._collect(block=len(self._inflight) >= 2 * self.max_uploads)
        return kept

    def _commit(self, shard: str, buffer: _Buffer | None) -> None:
        self._committed.add(shard)
        tables = buffer.tables if buffer else []
        table = pa.concat_tables(tables) if tables else IMAGES_SCHEMA.empty_table()
        waited = time.monotonic() - buffer.first_row if buffer else 0.0
        self._inflight.add(self._executor.submit(self._write, shard, table, waited))

    def _write(self, shard: str, table: pa.Table, waited: float) -> dict[str, Any]:
        start = time.monotonic()
        table = table.sort_by("image_id")
        data = parquet_bytes(table)
        path = storage.join(self.root, IMAGES_DIR, f"{shard}.parquet")
        storage.write_bytes_atomic(self.fs, path, data)
        statuses, messages = table["status"].to_pylist(), table["error"].to_pylist()
        errors = Counter(reason(e) for s, e in zip(statuses, messages) if s != "ok")
        sums = {n: pc.sum(table[n]).as_py() or 0.0 for n in SINK_COLUMNS[1:] if n in table.column_names}
        manifest = {
            "shard_id": shard,
            "file": f"{IMAGES_DIR}/{shard}.parquet",
            "rows": table.num_rows,
            "ok": table.num_rows - sum(errors.values()),
            "errors": sum(errors.values()),
            "errors_by_reason": dict(sorted(errors.items())),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "schema_version": SCHEMA_VERSION,
            "committed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "timings_s": {
                "decode": round(sums.get("_decode_ms", 0.0) / 1000, 4),
                "model": round(sums.get("_model_ms", 0.0) / 1000, 4),
                "encode": round(sums.get("_encode_ms", 0.0) / 1000, 4),
                "first_row_to_last_row": round(waited, 4),
                "write": round(time.monotonic() - start, 4),
            },
            **self.manifest_fields,
        }
        # The manifest is the commit mark: only after the data file is complete.
        storage.write_json_atomic(self.fs, storage.join(self.root, MANIFEST_DIR, f"{shard}.json"), manifest)
        return manifest

    def _collect(self, *, block: bool) -> None:
        """Record finished writes (raising the first failure); wait for one when ``block``."""
        if not self._inflight:
            return
        done, _ = wait(self._inflight, timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for future in done:
            self._inflight.discard(future)
            manifest = future.result()
            self.report.manifests.append(manifest)
            if self.on_commit:
                self.on_commit(manifest)

    def close(self) -> SinkReport:
        """Commit shards that produced no row, wait for every write, report shards left incomplete."""
        for shard in sorted(self.expected - self._committed - self._buffers.keys()):
            self._commit(shard, None)
        for shard, buffer in sorted(self._buffers.items()):
            self.report.incomplete[shard] = (len(buffer.ids), buffer.expected)
        self._buffers.clear()
        while self._inflight:
            self._collect(block=True)
        return self.report
