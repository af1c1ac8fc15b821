"""Storage I/O on any fsspec URI: local paths, ``file://``, ``s3://``, ``gs://``, ``memory://``.

S3-compatible stores are configured from the environment alone, as boto3 and the AWS CLI read it
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, ...),
or from explicit ``storage_options`` passed to fsspec. Credentials never travel in specs or outputs.
"""

from __future__ import annotations

import errno
import json
import os
import re
import threading
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

# ``scheme://user:password@`` (ftp, sftp, http basic auth, a MinIO endpoint): what precedes the ``@`` in a
# URL's authority is a credential, the user name included (for S3 it would be the access key id).
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s'\"]+@")


def redact(text: Any) -> str:
    """``text`` (str() of it) with the user and password of every ``scheme://user:password@host`` URL in it
    replaced by ``***``: the one helper for messages, logs and records that may quote a URI."""
    return _USERINFO.sub(r"\g<scheme>***@", str(text))


def url_to_fs(
    uri: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``uri`` and the path inside it (no protocol prefix for object stores)."""
    fs, path = fsspec.core.url_to_fs(str(uri), **dict(storage_options or {}))
    return fs, path.rstrip("/") if path not in ("/", "") else path


def join(uri: str, *parts: str) -> str:
    """``uri`` with ``parts`` appended with ``/`` (fsspec paths use ``/`` on every store)."""
    out = str(uri).rstrip("/")
    for part in parts:
        out = f"{out}/{str(part).strip('/')}"
    return out


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A URI that names ``path`` on ``fs`` again (``s3://bucket/key``; plain paths stay plain)."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


# Test hook, not a user setting: after this many successful writes in a process, every further write fails
# as a full disk does (OSError ENOSPC). Tests set it to show that a disk filling mid-run leaves only whole
# committed shards and that a rerun finishes the job.
FAIL_WRITES_AFTER_ENV = "EBSEG_TEST_FAIL_WRITES_AFTER"
_writes = 0
_writes_lock = threading.Lock()


def _count_write(path: str) -> None:
    """Count one write, or raise ENOSPC when the test hook says the disk is full."""
    global _writes
    limit = os.environ.get(FAIL_WRITES_AFTER_ENV)
    with _writes_lock:
        if limit is not None and _writes >= int(limit):
            raise OSError(errno.ENOSPC, f"No space left on device ({FAIL_WRITES_AFTER_ENV}={limit})", path)
        _writes += 1


def reset_write_count() -> None:
    """Start the test hook's count again (tests that set ``EBSEG_TEST_FAIL_WRITES_AFTER``)."""
    global _writes
    with _writes_lock:
        _writes = 0


def _make_parent(fs: fsspec.AbstractFileSystem, path: str) -> None:
    # Local files only: object stores have no directories, and s3fs's makedirs would create a missing
    # bucket, turning a mistyped bucket name into a new bucket instead of an error.
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent and is_local(fs):
        fs.makedirs(parent, exist_ok=True)


def _local_temp_copy(path: str, data: bytes) -> str:
    """``data`` written and synced to a new temporary file beside local ``path``; returns its name."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so a reader sees either no file or the whole file.

    Local files go to a temporary name in the same directory and are renamed (atomic on POSIX). On object
    stores a single PUT of the whole body is atomic already: the object appears only when complete.
    """
    _count_write(path)
    _make_parent(fs, path)
    if is_local(fs):
        os.replace(_local_temp_copy(path, data), path)
    else:
        fs.pipe_file(path, data)


def write_json_atomic(fs: fsspec.AbstractFileSystem, path: str, value: Any) -> None:
    write_bytes_atomic(fs, path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create ``path`` with ``data`` unless it exists; True when this call created it (all at once).

    Locally: a temporary file hard-linked to ``path`` (``os.link`` fails if the target exists, atomically).
    On S3: one PUT with ``If-None-Match: *`` (the store refuses it when the key exists). Elsewhere: an
    existence check then a write, which is exclusive only against writers that are not concurrent.
    """
    _count_write(path)
    _make_parent(fs, path)
    if is_local(fs):
        tmp = _local_temp_copy(path, data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "s3" in protocols:
        try:
            fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False
    if fs.exists(path):
        return False
    fs.pipe_file(path, data)
    return True
