"""Labelling inputs: any fsspec URI listed as input shards (``pipeline.label.reading`` reads them).

Three kinds of input, told apart by file name (a URI may mix them):

- image files (extensions in ``IMAGE_EXTENSIONS``) under a prefix, matching a glob
  (``s3://b/photos/**/*.jpg``), or named one by one: grouped ``files_per_shard`` at a time in the
  lexicographic order of their paths;
- WebDataset-style tar shards (``.tar``, ``.tar.gz``, ``.tgz``): one shard each; members whose name ends in
  an image extension (``000123.jpg``) are the images, other members (``.json``, ``.cls``, ...) are skipped;
- Parquet files (``.parquet``, ``.pq``) with an image-bytes column: one shard each; the column holds encoded
  image bytes (binary or large_binary), or a struct with a ``bytes`` field (Hugging Face ``datasets`` Image).

Names starting with ``.`` (hidden files and directories, macOS ``._x.jpg`` forks) are skipped.

Listing streams: the prefix is walked directory by directory in sorted order (one ``ls`` per directory,
which lists one level on object stores: a delimiter listing), and a shard is yielded as soon as it is
formed. Memory holds the listings of the directory being walked and of its ancestors, so one directory
with millions of entries is held at once, but a bucket of many directories never is.

Shard ids are deterministic and safe as file names: a rerun over the same input forms the same shards.
Files shards are ``files-<ordinal>-<hash of the member list>``; adding or removing a file changes the
shards from that file's position on, never the ones before it. Tar and Parquet shards are
``tar-<stem>-<hash of the URI>`` and ``parquet-<stem>-<hash of the URI>``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import glob_translate

from pipeline.storage import full_uri, url_to_fs

logger = logging.getLogger(__name__)

# fmt: off
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp",
    ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm",
})
# fmt: on
TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
PARQUET_EXTENSIONS = (".parquet", ".pq")

Kind = Literal["files", "tar", "parquet"]


@dataclass(frozen=True)
class Shard:
    """The unit of work and of resume: one tar, one Parquet file, or a group of image files.

    uris: full URIs (``s3://bucket/key``, ``memory:///x``; absolute paths for local files), sorted for
    files shards, one URI for tar and Parquet shards.
    """

    shard_id: str
    kind: Kind
    uris: tuple[str, ...]

    def to_row(self) -> dict[str, Any]:
        """The shard as a dataset row (``uris`` as a list), e.g. for ``ray.data.from_items``."""
        return {"shard_id": self.shard_id, "kind": self.kind, "uris": list(self.uris)}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Shard:
        """The inverse of ``to_row``; ``uris`` may come back as a list or a numpy array."""
        return cls(shard_id=str(row["shard_id"]), kind=row["kind"], uris=tuple(str(u) for u in row["uris"]))


def image_id(source_uri: str, member: str | None) -> str:
    """Stable, unique id of one input image: 24 hex digits of SHA-256 over ``source_uri`` and ``member``.

    The same file (or tar member, or Parquet row) at the same URI always gets the same id; local files are
    named by their absolute path, so moving a local input directory changes its ids.
    """
    key = source_uri if member is None else f"{source_uri}\x00{member}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def _safe_stem(name: str) -> str:
    base = name.rstrip("/").rsplit("/", 1)[-1]
    for ext in (*TAR_EXTENSIONS, *PARQUET_EXTENSIONS):
        if base.lower().endswith(ext):
            base = base[: -len(ext)]
            break
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("._")[:48] or "x"


def input_kind(name: str) -> Kind | None:
    """ "files" for an image file name, "tar", "parquet", or None for anything else."""
    lower = name.lower()
    if lower.endswith(TAR_EXTENSIONS):
        return "tar"
    if lower.endswith(PARQUET_EXTENSIONS):
        return "parquet"
    if os.path.splitext(lower)[1] in IMAGE_EXTENSIONS:
        return "files"
    return None


# --- listing


def _walk_order(entry: tuple[str, bool]) -> str:
    """Sort key of a (path, is_directory) entry: a directory sorts as ``name/``, as its keys do on an object
    store, so a depth-first walk visits paths in lexicographic order."""
    path, is_dir = entry
    return path + "/" if is_dir else path


def _list_dir(fs: fsspec.AbstractFileSystem, directory: str) -> list[tuple[str, bool]]:
    """One level of ``directory``: (path, is_directory), in ``_walk_order``."""
    if isinstance(fs, LocalFileSystem):
        return _list_local_dir(directory)
    return _list_fs_dir(fs, directory)


def _list_fs_dir(fs: fsspec.AbstractFileSystem, directory: str) -> list[tuple[str, bool]]:
    """``_list_dir`` through fsspec's ``ls`` (object stores and any other file system)."""
    entries = fs.ls(directory, detail=True)
    # s3fs caches every listing on the instance; dropping it keeps a walk of a huge bucket from piling up.
    fs.invalidate_cache(directory)
    own = directory.rstrip("/")
    out = []
    for entry in entries:
        name = entry["name"].rstrip("/")
        if name == own or name.rsplit("/", 1)[-1].startswith("."):
            continue
        is_dir = entry.get("type") == "directory"
        if is_dir or entry.get("type") == "file":
            out.append((name, is_dir))
    out.sort(key=_walk_order)
    return out


def _list_local_dir(directory: str) -> list[tuple[str, bool]]:
    """``_list_dir`` on local disk without a ``stat`` per entry: fsspec's local ``ls`` stats every file
    (~60 % of the driver's listing CPU); ``DirEntry.is_dir`` and ``is_file`` answer from the directory
    entry's type. Symbolic links are skipped, as through fsspec (its ``ls`` types them "other"): a linked
    directory could loop the walk."""
    own = directory.rstrip("/") or "/"
    out = []
    with os.scandir(own) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            is_dir = entry.is_dir(follow_symlinks=False)
            if is_dir or entry.is_file(follow_symlinks=False):  # links, fifos, sockets: skipped
                out.append((os.path.join(own, entry.name), is_dir))
    out.sort(key=_walk_order)
    return out


def _walk(fs: fsspec.AbstractFileSystem, directory: str, depth_left: int | None) -> Iterator[str]:
    """File paths under ``directory`` in lexicographic order, listing each directory only when reached."""
    for path, is_dir in _list_dir(fs, directory):
        if not is_dir:
            yield path
        elif depth_left is None or depth_left > 0:
            yield from _walk(fs, path, None if depth_left is None else depth_left - 1)


def _has_magic(path: str) -> bool:
    return any(c in path for c in "*?[")


def _walk_glob(fs: fsspec.AbstractFileSystem, pattern: str, uri: str) -> Iterator[str]:
    """Files matching ``pattern`` (``**`` spans directories), walking only below its fixed prefix."""
    parts = pattern.split("/")
    fixed = next(i for i, part in enumerate(parts) if _has_magic(part))
    root = "/".join(parts[:fixed])
    if not root.strip("/"):
        raise ValueError(f"glob {uri!r} needs a fixed directory before its first wildcard")
    if not fs.isdir(root):
        raise FileNotFoundError(f"no directory {root!r} for the glob {uri!r}")
    # Without "**" nothing deeper than the pattern's own depth can match: do not list it.
    depth = None if "**" in parts else len(parts) - fixed - 1
    regex = re.compile(glob_translate(pattern))
    for path in _walk(fs, root, depth):
        if regex.match(path):
            yield path


def _check_parquet_column(fs: fsspec.AbstractFileSystem, path: str, image_column: str) -> bool:
    """Raise ValueError when the file lacks a usable ``image_column``; False when its schema is unreadable
    (a damaged file is the reader's to report, as error rows, not a reason to stop the listing)."""
    uri = full_uri(fs, path)
    try:
        with fs.open(path, "rb") as f:
            schema = pq.read_schema(f)
    except Exception as exc:
        logger.warning("%s: cannot read the Parquet schema (%s); checking the next file", uri, exc)
        return False
    problem = image_column_problem(schema, image_column)
    if problem:
        raise ValueError(f"{uri}: {problem}")
    return True


def image_column_problem(schema: pa.Schema, image_column: str) -> str | None:
    """Why ``image_column`` of ``schema`` cannot hold image bytes, or None when it can."""
    if image_column not in schema.names:
        return f"no image column {image_column!r} (columns: {', '.join(schema.names)})"
    kind = schema.field(image_column).type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return None
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        return None
    return f"image column {image_column!r} has type {kind}; expected binary or a struct with a 'bytes' field"


def list_shards(
    uri: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    files_per_shard: int = 256,
    image_column: str = "image",
) -> Iterator[Shard]:
    """The input shards at ``uri`` (a prefix, a glob, or one file), yielded while the listing goes on.

    Raises FileNotFoundError when ``uri`` names nothing or holds no input, ValueError for a glob without a
    fixed prefix or when the first Parquet file lacks ``image_column`` (checking every file would cost a
    request each on the driver; the others are checked when read, and give per-row errors).
    """
    if files_per_shard < 1:
        raise ValueError(f"files_per_shard must be >= 1, got {files_per_shard}")
    fs, path = url_to_fs(uri, storage_options)
    if _has_magic(path):
        paths = _walk_glob(fs, path, uri)
    elif fs.isfile(path):
        if input_kind(path) is None:
            raise ValueError(f"{uri} is not an image, tar or Parquet file (by its extension)")
        paths = iter([path])
    elif fs.isdir(path):
        paths = _walk(fs, path, None)
    else:
        raise FileNotFoundError(f"input {uri!r} not found")

    group: list[str] = []
    groups = count = skipped = 0
    checked_parquet = False
    for p in paths:
        kind = input_kind(p)
        if kind is None:
            skipped += 1
            continue
        if kind == "files":
            group.append(full_uri(fs, p))
            if len(group) == files_per_shard:
                yield _files_shard(groups, group)
                groups, group, count = groups + 1, [], count + 1
            continue
        if kind == "parquet" and not checked_parquet:
            checked_parquet = _check_parquet_column(fs, p, image_column)
        member_uri = full_uri(fs, p)
        count += 1
        yield Shard(f"{kind}-{_safe_stem(p)}-{_digest(member_uri)}", kind, (member_uri,))
    if group:
        yield _files_shard(groups, group)
        count += 1
    if count == 0:
        raise FileNotFoundError(f"no image, tar or Parquet files at {uri!r}")
    if skipped:
        logger.info("%s: skipped %d files that are not images, tar or Parquet", uri, skipped)


def _files_shard(ordinal: int, uris: Sequence[str]) -> Shard:
    return Shard(f"files-{ordinal:06d}-{_digest(*uris)}", "files", tuple(uris))
