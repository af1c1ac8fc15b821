"""Reading one input shard (``pipeline.label.listing.Shard``) into raw image rows: bytes or a per-row error.

Image files are fetched ``READ_CHUNK`` at a time (concurrent requests on object stores); a tar is streamed
member by member (local files directly, remote ones through a temporary copy); a Parquet file is read
``PARQUET_BATCH_ROWS`` rows at a time from its image column. Every failure becomes a row, never an exception.
"""

from __future__ import annotations

import contextlib
import os
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.label.listing import Shard, image_column_problem, image_id, input_kind
from pipeline.storage import is_local, url_to_fs

# Files fetched at once when reading a files shard: concurrent requests on object stores, bounded memory.
READ_CHUNK = 32
# Rows decoded at once from a Parquet image column.
PARQUET_BATCH_ROWS = 64


def _row(
    shard: Shard, size: int, index: int, source_uri: str, member: str | None, data, error
) -> dict[str, Any]:
    return {
        "image_id": image_id(source_uri, member),
        "source_uri": source_uri,
        "member": member,
        "shard_id": shard.shard_id,
        "shard_size": size,
        "row_index": index,
        "data": data,
        "error": error,
    }


def _reason(exc: BaseException) -> str:
    return f"read: {type(exc).__name__}: {exc}"


def read_shard(
    shard: Shard, *, storage_options: Mapping[str, Any] | None = None, image_column: str = "image"
) -> Iterator[dict[str, Any]]:
    """Raw rows of ``shard``, one per image, failures included, in a deterministic order.

    Row: ``image_id`` str (see ``image_id``), ``source_uri`` str (the file, tar or Parquet file),
    ``member`` str | None (None for image files, the tar member name, or the Parquet row index),
    ``shard_id`` str, ``shard_size`` int (rows this shard yields), ``row_index`` int (0 .. shard_size - 1,
    each once: how the commit knows a shard is whole), ``data`` bytes | None,
    ``error`` str | None ("read: ..." when the bytes could not be read, "empty: ..." for a null cell).
    A tar or Parquet file that cannot be opened at all yields one error row with ``member`` None; a tar
    cut short yields its images before the damage and one such row for the rest. A tar without image
    members or an empty Parquet file yields no rows.
    """
    if shard.kind == "files":
        yield from _read_files(shard, storage_options)
    elif shard.kind == "tar":
        yield from _read_tar(shard, storage_options)
    elif shard.kind == "parquet":
        yield from _read_parquet(shard, storage_options, image_column)
    else:
        raise ValueError(f"shard {shard.shard_id}: unknown kind {shard.kind!r}")


def _read_files(shard: Shard, storage_options) -> Iterator[dict[str, Any]]:
    size = len(shard.uris)
    fs, _ = url_to_fs(shard.uris[0], storage_options)
    for start in range(0, size, READ_CHUNK):
        uris = list(shard.uris[start : start + READ_CHUNK])
        paths = [url_to_fs(u, storage_options)[1] for u in uris]
        # cat_ranges runs the requests concurrently on async stores and, unlike cat, never glob-expands
        # names with "[" or "*" in them.
        contents = fs.cat_ranges(paths, None, None, on_error="return")
        for index, (uri, data) in enumerate(zip(uris, contents, strict=True), start):
            if isinstance(data, BaseException):
                yield _row(shard, size, index, uri, None, None, _reason(data))
            else:
                yield _row(shard, size, index, uri, None, bytes(data), None)


@contextlib.contextmanager
def _local_copy(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[str]:
    """A local path with the file's bytes: the file itself, or a temporary download from a remote store.

    A tar is read twice (its member list first, for ``shard_size``); a local copy reads the store once
    and holds one tar on disk (in TMPDIR), not in memory.
    """
    if is_local(fs):
        yield path
        return
    fd, tmp = tempfile.mkstemp(suffix=".tar", prefix="ebseg-shard-")
    os.close(fd)
    try:
        fs.get_file(path, tmp)
        yield tmp
    finally:
        os.unlink(tmp)


def _read_tar(shard: Shard, storage_options) -> Iterator[dict[str, Any]]:
    (uri,) = shard.uris
    fs, path = url_to_fs(uri, storage_options)
    with contextlib.ExitStack() as stack:
        try:
            local = stack.enter_context(_local_copy(fs, path))
            tar = stack.enter_context(tarfile.open(local, mode="r:*"))
        except (tarfile.TarError, OSError, EOFError) as exc:  # missing, not a tar, no access
            yield _row(shard, 1, 0, uri, None, None, _reason(exc))
            return
        members, scan_error = [], None
        try:
            for info in tar:
                hidden = info.name.rsplit("/", 1)[-1].startswith(".")  # e.g. macOS "._x.jpg" forks
                if info.isfile() and not hidden and input_kind(info.name) == "files":
                    members.append(info)
        except (tarfile.TarError, OSError, EOFError) as exc:
            scan_error = exc  # a truncated tar: keep the members before the damage
        size = len(members) + (scan_error is not None)
        for index, info in enumerate(members):
            try:
                f = tar.extractfile(info)
                data = f.read() if f is not None else b""
                yield _row(shard, size, index, uri, info.name, data, None)
            except (tarfile.TarError, OSError, EOFError) as exc:
                yield _row(shard, size, index, uri, info.name, None, _reason(exc))
        if scan_error is not None:
            reason = f"tar unreadable after {len(members)} images: {type(scan_error).__name__}: {scan_error}"
            yield _row(shard, size, len(members), uri, None, None, f"read: {reason}")


def _image_bytes(column: pa.Array) -> list[bytes | None]:
    if pa.types.is_struct(column.type):
        column = column.field("bytes")
    return column.to_pylist()


def _read_parquet(shard: Shard, storage_options, image_column: str) -> Iterator[dict[str, Any]]:
    (uri,) = shard.uris
    fs, path = url_to_fs(uri, storage_options)
    try:
        f = fs.open(path, "rb")
    except Exception as exc:
        yield _row(shard, 1, 0, uri, None, None, _reason(exc))
        return
    with f:
        try:
            parquet = pq.ParquetFile(f)
            size = parquet.metadata.num_rows
            problem = image_column_problem(parquet.schema_arrow, image_column)
        except Exception as exc:
            yield _row(shard, 1, 0, uri, None, None, _reason(exc))
            return
        index = 0
        if problem is None:
            try:
                for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[image_column]):
                    for data in _image_bytes(batch.column(0)):
                        error = f"empty: null in column {image_column!r}" if data is None else None
                        yield _row(shard, size, index, uri, str(index), data, error)
                        index += 1
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"  # damaged row group: the rest become errors
        for rest in range(index, size):
            yield _row(shard, size, rest, uri, str(rest), None, f"read: {problem}")


# Columns of the raw rows ``read_shard`` yields, as the read step hands them to the model stage.
RAW_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source_uri", pa.string()),
        ("member", pa.string()),
        ("shard_id", pa.string()),
        ("shard_size", pa.int64()),
        ("row_index", pa.int64()),
        ("data", pa.binary()),
        ("error", pa.string()),
    ]
)


class ReadShards:
    """``Dataset.map_batches`` step: a block of shard rows (``Shard.to_row()`` columns) -> their raw rows.

    ``ds.map_batches(ReadShards(1024), batch_size=None)``: every shard of the block is read in turn and
    its rows leave as Arrow tables (``RAW_SCHEMA``) of at most ``rows`` rows, so a shard's bytes are never
    all held at once; Ray packs consecutive tables into blocks up to its target block size, which bounds
    a block of large originals by bytes. The rows carry encoded bytes: decoding happens in the model
    actor (``pipeline.label.segment``), so blocks stay ~10x smaller than decoded pixels and big enough to
    spread the driver's per-block cost over many images.
    """

    def __init__(
        self, rows: int, *, storage_options: Mapping[str, Any] | None = None, image_column: str = "image"
    ):
        self.rows = rows
        self.storage_options = dict(storage_options or {})
        self.image_column = image_column

    def __call__(self, batch: Mapping[str, Any]) -> Iterator[pa.Table]:
        pending: list[dict[str, Any]] = []
        for i in range(len(batch["shard_id"])):
            shard = Shard.from_row({key: batch[key][i] for key in ("shard_id", "kind", "uris")})
            rows = read_shard(shard, storage_options=self.storage_options, image_column=self.image_column)
            for row in rows:
                pending.append(row)
                if len(pending) == self.rows:
                    yield pa.Table.from_pylist(pending, schema=RAW_SCHEMA)
                    pending = []
        if pending:
            yield pa.Table.from_pylist(pending, schema=RAW_SCHEMA)
