"""The commit: part-file metadata in (``pipeline.label.parts``), one manifest per complete input shard out.

Layout under the output root ``OUT`` (``pipeline.layout``, schema version 3)::

    OUT/images/<shard_id>/<part>.parquet   written by the workers, any number per shard
    OUT/proposals/<shard_id>/<part>.parquet  each images part's proposals, when the job stores them
    OUT/_manifest/<shard_id>.json          created by the driver: the commit mark, listing the shard's parts

The driver receives one small row per part file (shard, file name, row ranges, counts, checksum), never a
record. A shard is committed once the parts received cover each of its ``shard_size`` row indices exactly
once: one part per row range is chosen when a retried task wrote a duplicate. The manifest is created
exclusively (``storage.create_exclusive``), so of two runs racing on a shard one commits and the other
learns it lost; then the parts of the shard that the manifest does not list (orphans of retried tasks or
of the losing run) are deleted. Readers open only the files a manifest lists.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.label import diehook
from pipeline.layout import (
    IMAGES_DIR,
    MANIFEST_DIR,
    PROPOSALS_DIR,
    SCHEMA_VERSION,
    SUMMARY_FILE,
    manifest_files,
)

# Shard ids become file names on every store: keep them to a portable alphabet.
_SHARD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,200}$")
# Parts of one shard tried at most when an exact cover needs a search (duplicates are rare and few).
MAX_SEARCH_PARTS = 64


def check_shard_id(shard_id: str) -> str:
    if not _SHARD_ID.match(shard_id):
        raise ValueError(f"shard id {shard_id!r} cannot be a file name (letters, digits and ._=+- only)")
    return shard_id


def _rows(ranges: list[int]) -> np.ndarray:
    return np.concatenate([np.arange(a, b) for a, b in zip(ranges[::2], ranges[1::2])] or [np.zeros(0, int)])


@dataclass
class _Shard:
    """The parts received for one shard, and the ones chosen so far (disjoint rows)."""

    size: int
    parts: list[dict[str, Any]] = field(default_factory=list)
    chosen: list[int] = field(default_factory=list)
    covered: np.ndarray | None = None
    first_part: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.covered = np.zeros(self.size, dtype=bool)

    def add(self, part: dict[str, Any]) -> bool:
        """Keep ``part``; True when the chosen parts now cover every row exactly once."""
        rows = _rows(part["ranges"])
        if rows.size and (rows.min() < 0 or rows.max() >= self.size):
            raise ValueError(f"part {part['file']} has rows outside 0..{self.size - 1}")
        self.parts.append(part)
        if not self.covered[rows].any():
            self.covered[rows] = True
            self.chosen.append(len(self.parts) - 1)
        if self.covered.all():
            return True
        # A retried task cut the rows differently: choose again from all the parts received.
        return len(self.chosen) < len(self.parts) and self._search()

    def _search(self) -> bool:
        """An exact cover of the rows by the parts received (depth first on the lowest uncovered row)."""
        candidates = [_rows(p["ranges"]) for p in self.parts[:MAX_SEARCH_PARTS]]
        union = np.zeros(self.size, dtype=bool)
        for rows in candidates:
            union[rows] = True
        if not union.all():
            return False

        def cover(covered: np.ndarray, chosen: list[int]) -> list[int] | None:
            if covered.all():
                return chosen
            low = int(np.argmin(covered))
            for i, rows in enumerate(candidates):
                if i not in chosen and low in rows and not covered[rows].any():
                    nxt = covered.copy()
                    nxt[rows] = True
                    found = cover(nxt, [*chosen, i])
                    if found is not None:
                        return found
            return None

        found = cover(np.zeros(self.size, dtype=bool), [])
        if found is None:
            return False
        self.chosen, self.covered = found, np.ones(self.size, dtype=bool)
        return True

    @property
    def received(self) -> int:
        return int(self.covered.sum())


@dataclass
class CommitReport:
    """What the commit did. ``incomplete``: shard id -> (rows received, rows expected), not committed."""

    manifests: list[dict[str, Any]] = field(default_factory=list)
    incomplete: dict[str, tuple[int, int]] = field(default_factory=dict)
    duplicate_parts: int = 0  # parts of retried tasks left out of a manifest
    lost_races: list[str] = field(default_factory=list)  # shards another run committed first
    orphans_deleted: int = 0


class ShardCommitter:
    """Collects part metadata per shard; commits a shard when its rows are all there. A context manager.

    expected_shards: the shard ids this run processes (more with :meth:`expect`). One that yields no row
    at all (an empty input) is committed with no part at :meth:`close`; one with missing rows is reported
    and left uncommitted, for a rerun.
    manifest_fields: written into every manifest (run_id, model_id, vocabulary_id).
    on_commit: called on the driver's thread with each manifest, for progress display.
    guard: called before each manifest is created; raises to stop the commit (``pipeline.lease``: a run
    that lost the output's lease must not commit another shard).
    """

    def __init__(
        self,
        root: str,
        *,
        fs,
        expected_shards: Iterable[str] = (),
        manifest_fields: Mapping[str, Any] | None = None,
        max_commits: int = 8,
        on_commit=None,
        guard=None,
    ):
        self.fs, self.root = fs, root
        self.expected = {check_shard_id(s) for s in expected_shards}
        self.manifest_fields = dict(manifest_fields or {})
        self.max_commits = max_commits
        self.on_commit = on_commit
        self.guard = guard
        self.report = CommitReport()
        self._shards: dict[str, _Shard] = {}
        self._committed: set[str] = set()
        self._executor = ThreadPoolExecutor(max_commits, thread_name_prefix="ebseg-commit")
        self._inflight: set[Future] = set()

    def expect(self, shard_ids: Iterable[str]) -> None:
        """Add shards to this run (a run schedules its shards in waves as the listing streams)."""
        self.expected.update(check_shard_id(s) for s in shard_ids)

    def __enter__(self) -> ShardCommitter:
        return self

    def __exit__(self, *exc) -> None:
        self._executor.shutdown(wait=True, cancel_futures=exc[0] is not None)

    def add(self, parts: pa.Table) -> int:
        """Take part rows (``PART_SCHEMA``); returns the rows they newly cover."""
        added = 0
        for part in parts.to_pylist():
            shard_id = part["shard_id"]
            if shard_id in self._committed:
                self.report.duplicate_parts += 1
                continue
            if shard_id not in self.expected:
                raise ValueError(
                    f"part {part['file']!r} names shard {shard_id!r}, which this run did not schedule"
                )
            shard = self._shards.get(shard_id)
            if shard is None:
                shard = self._shards[shard_id] = _Shard(size=int(part["shard_size"]))
            before = shard.received
            if shard.add(part):
                self._commit(shard_id, self._shards.pop(shard_id))
            added += shard.received - before
        self._collect(block=len(self._inflight) >= 2 * self.max_commits)
        return added

    def _commit(self, shard_id: str, shard: _Shard | None) -> None:
        self._committed.add(shard_id)
        parts = (
            [shard.parts[i] for i in sorted(shard.chosen, key=lambda i: shard.parts[i]["ranges"])]
            if shard
            else []
        )
        if shard:
            self.report.duplicate_parts += len(shard.parts) - len(parts)
        waited = time.monotonic() - shard.first_part if shard else 0.0
        self._inflight.add(self._executor.submit(self._write_manifest, shard_id, parts, waited))

    def _write_manifest(self, shard_id: str, parts: list[dict[str, Any]], waited: float) -> dict[str, Any]:
        errors: dict[str, int] = {}
        for part in parts:
            for code, count in json.loads(part["errors"]).items():
                errors[code] = errors.get(code, 0) + count
        rows = sum(p["rows"] for p in parts)
        manifest = {
            "shard_id": shard_id,
            "files": [_manifest_entry(p) for p in parts],
            "rows": rows,
            "ok": rows - sum(errors.values()),
            "errors": sum(errors.values()),
            "errors_by_reason": dict(sorted(errors.items())),
            "model_images": sum(p["model_images"] for p in parts),
            "forwards": round(sum(p["forwards"] for p in parts), 4),
            "schema_version": SCHEMA_VERSION,
            "committed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "timings_s": {
                "decode": round(sum(p["decode_ms"] for p in parts) / 1000, 4),
                "model": round(sum(p["model_ms"] for p in parts) / 1000, 4),
                "encode": round(sum(p["encode_ms"] for p in parts) / 1000, 4),
                "write": round(sum(p["write_ms"] for p in parts) / 1000, 4),
                "first_part_to_last_part": round(waited, 4),
            },
            **self.manifest_fields,
        }
        path = storage.join(self.root, MANIFEST_DIR, f"{shard_id}.json")
        data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        if self.guard is not None:
            self.guard()
        won = storage.create_exclusive(self.fs, path, data) or _ours_already(self.fs, path, data)
        if won:
            diehook.reached("after-manifest")
        else:  # another run committed this shard first: its manifest decides, ours is dropped
            manifest = storage.read_json(self.fs, path)
        deleted = delete_orphans(self.fs, self.root, shard_id, manifest)
        return {"manifest": manifest, "won": won, "deleted": deleted}

    def _collect(self, *, block: bool) -> None:
        """Record finished commits (raising the first failure); wait for one when ``block``."""
        if not self._inflight:
            return
        done, _ = wait(self._inflight, timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for future in done:
            self._inflight.discard(future)
            result = future.result()
            self.report.orphans_deleted += result["deleted"]
            if not result["won"]:
                self.report.lost_races.append(result["manifest"]["shard_id"])
                continue
            self.report.manifests.append(result["manifest"])
            if self.on_commit:
                self.on_commit(result["manifest"])

    def close(self) -> CommitReport:
        """Commit shards that produced no row, wait for every commit, report shards left incomplete."""
        for shard_id in sorted(self.expected - self._committed - self._shards.keys()):
            self._commit(shard_id, None)
        for shard_id, shard in sorted(self._shards.items()):
            self.report.incomplete[shard_id] = (shard.received, shard.size)
        self._shards.clear()
        while self._inflight:
            self._collect(block=True)
        return self.report


def _ours_already(fs, path: str, data: bytes) -> bool:
    """True when the manifest at ``path`` holds exactly ``data``: our own create, whose response was lost
    and which the S3 client retried (the retry then finds the key taken), not another run's commit. Our
    bytes carry this run's id and a timestamp to the second, so another run's manifest differs."""
    fs.invalidate_cache(path)
    try:
        return fs.cat_file(path) == data
    except FileNotFoundError:
        return False


def _manifest_entry(part: Mapping[str, Any]) -> dict[str, Any]:
    """A part's entry in its shard's manifest: the images part, and its proposals part when it has one."""
    entry = {k: part[k] for k in ("file", "rows", "bytes", "sha256")}
    if part.get("proposals_file"):
        entry["proposals"] = {k: part[f"proposals_{k}"] for k in ("file", "rows", "bytes", "sha256")}
    return entry


def delete_orphans(fs, root: str, shard_id: str, manifest: Mapping[str, Any]) -> int:
    """Delete the part files (images and proposals) of a committed shard that its manifest does not list;
    returns how many.

    Only ``.parquet`` names are touched (a writer's temporary file is left to finish or to fail).
    """
    listed = {
        storage.join(root, name)
        for proposals in (False, True)
        for name in manifest_files(manifest, proposals=proposals)
    }
    names = []
    for folder in (IMAGES_DIR, PROPOSALS_DIR):
        directory = storage.join(root, folder, shard_id)
        fs.invalidate_cache(directory)
        with contextlib.suppress(FileNotFoundError):
            names.extend(fs.ls(directory, detail=False))
    orphans = [n for n in names if n.endswith(".parquet") and n not in listed]
    for path in orphans:
        diehook.reached("mid-cleanup")
        with contextlib.suppress(FileNotFoundError):  # another run's cleanup got there first
            fs.rm_file(path)
    return len(orphans)


def _mtime(info: Mapping[str, Any]) -> float:
    value = info.get("mtime", info.get("LastModified", info.get("last_modified")))
    return value.timestamp() if isinstance(value, datetime) else float(value or 0.0)


def clean_after_interruption(fs, root: str) -> int:
    """Delete orphan parts that an interrupted run may have left behind committed shards; returns how many.

    A run deletes a shard's orphans right after committing it, so only shards committed after the last
    ``summary.json`` (written when a run finishes) can still have some: a driver killed between a commit
    and its cleanup. Those manifests are read again; every other committed shard is clean already.
    """
    directory = storage.join(root, MANIFEST_DIR)
    fs.invalidate_cache(directory)
    try:
        manifests = fs.ls(directory, detail=True)
    except FileNotFoundError:
        return 0
    try:
        finished = _mtime(fs.info(storage.join(root, SUMMARY_FILE)))
    except FileNotFoundError:
        finished = float("-inf")
    deleted = 0
    for info in manifests:
        if info["name"].endswith(".json") and _mtime(info) >= finished:
            manifest = storage.read_json(fs, info["name"])
            deleted += delete_orphans(fs, root, manifest["shard_id"], manifest)
    return deleted
