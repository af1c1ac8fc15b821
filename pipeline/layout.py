"""The layout of a labelling output, shared by its writers (``pipeline.label``) and readers (query, export).

Schema version 3 (written now)::

    OUT/images/<shard_id>/<part>.parquet     part files of one input shard, written by the workers
    OUT/proposals/<shard_id>/<part>.parquet  with ``proposals: true``: the same images' proposals
                                             (``pipeline.label.proposal_records``), same part name
    OUT/_manifest/<shard_id>.json            the commit mark of the shard: lists its part files (``files``,
                                             each with its ``proposals`` part when there is one)
    OUT/job.json  OUT/vocabulary.json  OUT/summary.json  OUT/proposals.json (with proposals)
    OUT/_lease/<generation>.json             while a run holds the output (``pipeline.lease``; not data)

Schema version 2 (still read): version 3 without proposals; the images table is the same.

Schema version 1 (still read)::

    OUT/images/<shard_id>.parquet          every record of one input shard
    OUT/_manifest/<shard_id>.json          names that one file (``file``)

``docs/schema.md`` is the reader's guide. Readers use only the files a manifest names: a retried task or an
interrupted run can leave complete part files that no manifest lists (orphans, deleted by the next run).
``SCHEMA_VERSION`` changes whenever a column or the layout changes and is stored in every Parquet file's
key-value metadata under ``ebseg.schema_version``.

Label maps are PNGs at the original size: 8-bit when the vocabulary has at most 255 classes (255 = no
class), 16-bit otherwise (65535 = no class), the project's on-disk label convention
(``ebseg.data.labels``); in memory they are int32 with -1 = no class.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
from pycocotools import mask as mask_utils

from ebseg.data.labels import decode_label
from pipeline import storage

IMAGES_DIR = "images"
PROPOSALS_DIR = "proposals"
PROPOSALS_FILE = "proposals.json"
MANIFEST_DIR = "_manifest"
JOB_FILE = "job.json"
VOCABULARY_FILE = "vocabulary.json"
SUMMARY_FILE = "summary.json"

SCHEMA_VERSION = 3
METADATA_KEY = b"ebseg.schema_version"

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


def schema_version(metadata: Mapping[bytes, bytes] | None) -> int | None:
    """The ``SCHEMA_VERSION`` in a Parquet file's key-value metadata (``pq.read_schema(f).metadata``)."""
    value = (metadata or {}).get(METADATA_KEY)
    return None if value is None else int(value)


def manifest_paths(fs, root: str) -> list[str]:
    """Paths (on ``fs``) of the manifests under ``root``, sorted: one listing of ``_manifest/``."""
    directory = storage.join(root, MANIFEST_DIR)
    fs.invalidate_cache(directory)  # another process (a run, an interrupted run) may have written since
    try:
        names = fs.ls(directory, detail=False)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.endswith(".json"))


def committed_shards(fs, root: str) -> set[str]:
    """Ids of the shards committed under ``root`` (no manifest is read)."""
    return {manifest_shard_id(path) for path in manifest_paths(fs, root)}


def manifest_shard_id(path: str) -> str:
    """The shard id a manifest path names: ``.../_manifest/<shard_id>.json``."""
    return path.rsplit("/", 1)[-1][: -len(".json")]


def manifest_files(
    manifest: Mapping[str, Any], *, where: str = "manifest", proposals: bool = False
) -> list[str]:
    """The data files (relative to the output root) a manifest commits: ``files`` (v2, v3) or ``file`` (v1).

    proposals: the proposals parts instead (v3 entries' ``proposals``; none in outputs without them).
    """
    if isinstance(manifest, Mapping) and isinstance(manifest.get("files"), list):
        entries = manifest["files"]
        if proposals:
            entries = [f.get("proposals") for f in entries if isinstance(f, Mapping) and f.get("proposals")]
        names = [f.get("file") if isinstance(f, Mapping) else None for f in entries]
        if all(isinstance(n, str) for n in names):
            return names
    elif proposals and isinstance(manifest, Mapping) and isinstance(manifest.get("file"), str):
        return []
    elif isinstance(manifest, Mapping) and isinstance(manifest.get("file"), str):
        return [manifest["file"]]
    raise ValueError(f"{where} names no data file ('files' list of {{'file': ...}}, or 'file')")


def committed_parts(fs, root: str) -> tuple[list[str], list[str]]:
    """Paths (on ``fs``) of the committed shards' images parts and proposals parts, sorted by shard,
    reading each manifest once."""
    images, proposals = [], []
    for path in manifest_paths(fs, root):
        manifest = storage.read_json(fs, path)
        where = f"manifest {storage.full_uri(fs, path)}"
        images.extend(storage.join(root, name) for name in manifest_files(manifest, where=where))
        names = manifest_files(manifest, where=where, proposals=True)
        proposals.extend(storage.join(root, name) for name in names)
    return images, proposals


def committed_files(fs, root: str, *, proposals: bool = False) -> list[str]:
    """Paths (on ``fs``) of the Parquet files of the committed shards under ``root``, sorted by shard.

    proposals: the proposals parts instead of the images parts.
    """
    return committed_parts(fs, root)[1 if proposals else 0]


def decode_label_map(data: bytes) -> np.ndarray:
    """A record's ``label_map`` PNG -> int32 [H, W] class ids, -1 where no class."""
    return decode_label(data, name="label_map")


def rle_to_mask(counts: str, height: int, width: int) -> np.ndarray:
    """A segment's ``rle`` -> bool [height, width] mask (pycocotools decode)."""
    rle = {"size": [int(height), int(width)], "counts": counts.encode("ascii")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools' numpy 2 copy-keyword notice
        return mask_utils.decode(rle).astype(bool)
