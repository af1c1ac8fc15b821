"""Records of the ``proposals`` table: an image's vocabulary-free model outputs (``ebseg.proposals``) per row.

A labelling run with ``proposals: true`` writes, beside each ``images`` part, a part of this table under
``OUT/proposals/<shard_id>/`` with the same file name, committed by the same manifest
(``pipeline.layout``). Only images labelled without error have a row. ``OUT/proposals.json``
(``ProposalsInfo``) says once per output how the rows are encoded and which model made them: with that
model's text tower, ``Segmenter.label(read_proposals(...))`` labels the images with any vocabulary.

A relabelled output (``pipeline.relabel``) stores no proposals of its own: they are its source's, to the bit.
Its ``proposals.json`` is the source's with ``stored_in`` naming the labelling output whose ``proposals/``
holds the files; ``stored_proposals`` follows that pointer, so a relabelled output is searched and relabelled
again like the output it came from, while the source keeps them.

Columns (``docs/schema.md``): ``masks`` holds the [Q, grid_height, grid_width] mask logits on the model's
stride-4 grid as the raw bytes (C order) of ``mask_encoding``; ``emb_a`` / ``emb_b`` / ``emb_d`` hold the
three [Q, D] embeddings as lists of D-lists of ``embedding_encoding`` floats; ``input_height`` /
``input_width`` are the model input size before padding (the grid covers the padded input, 4x its size):
crop the upsampled masks to it, then resize to ``height`` x ``width``, the original size.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ebseg.proposals import (
    DEFAULT_ENCODING,
    LOSSLESS_ENCODING,
    Proposals,
    decode_embeddings,
    decode_masks,
    encode_embeddings,
    encode_masks,
)
from pipeline import storage
from pipeline.layout import (
    JOB_FILE,
    METADATA_KEY,
    PROPOSALS_FILE,
    SCHEMA_VERSION,
    manifest_files,
    manifest_paths,
    manifest_shard_id,
)

EncodingName = Literal["default", "lossless"]
# ``proposals_encoding`` of a job -> (mask encoding, embedding encoding) of ``ebseg.proposals``.
ENCODINGS: dict[str, tuple[str, str]] = {"default": DEFAULT_ENCODING, "lossless": LOSSLESS_ENCODING}
BRANCHES = ("emb_a", "emb_b", "emb_d")  # the order of ``Proposals.embeddings``
_FLOAT_TYPES = {"float16": pa.float16(), "float32": pa.float32()}


def proposals_schema(embedding_encoding: str) -> pa.Schema:
    """The table's schema; the embedding columns' float type is the embedding encoding's."""
    vectors = pa.list_(pa.list_(_FLOAT_TYPES[embedding_encoding]))  # [Q][D]
    return pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("shard_id", pa.string(), nullable=False),
            pa.field("mask_encoding", pa.string(), nullable=False),  # float32 | float16 | float8 | uint8
            pa.field("embedding_encoding", pa.string(), nullable=False),  # float32 | float16
            pa.field("queries", pa.int32(), nullable=False),  # Q
            pa.field("dim", pa.int32(), nullable=False),  # D
            pa.field("grid_height", pa.int32(), nullable=False),  # mask grid: padded input / 4
            pa.field("grid_width", pa.int32(), nullable=False),
            pa.field("input_height", pa.int32(), nullable=False),  # model input before padding
            pa.field("input_width", pa.int32(), nullable=False),
            pa.field("height", pa.int32(), nullable=False),  # original size (the label maps' size)
            pa.field("width", pa.int32(), nullable=False),
            pa.field("masks", pa.binary(), nullable=False),
            # Per query, from the stored (decoded) masks: the region's fraction of the grid and its box
            # [x, y, w, h] at the original size (``Proposals.region_stats``), for SQL without decoding.
            pa.field("areas", pa.list_(pa.float32()), nullable=False),
            pa.field("boxes", pa.list_(pa.list_(pa.int32())), nullable=False),
            *(pa.field(name, vectors, nullable=False) for name in BRANCHES),
        ],
        metadata={METADATA_KEY: str(SCHEMA_VERSION).encode()},
    )


PROPOSALS_SCHEMA = proposals_schema(DEFAULT_ENCODING[1])


@dataclass(frozen=True)
class ProposalsInfo:
    """``OUT/proposals.json``: what every proposals row of an output shares.

    The text tower, background embedding, logit scale and balancing exponents that ``Segmenter.label``
    applies are those of the model ``model_id`` names (its weights fix them): a relabelling loads ``model``
    and refuses it when its id differs.
    """

    encoding: str  # the job's name for it: default | lossless
    mask_encoding: str
    embedding_encoding: str
    model: str  # the ``--model`` value the run loaded
    model_id: str
    run_id: str  # the labelling run that made the proposals
    schema_version: int = SCHEMA_VERSION
    # The labelling output whose ``proposals/`` holds the rows; None: this output itself. Set in relabelled
    # outputs (their images are the source's, so are their proposals: storing them twice would double the
    # largest part of an output for nothing).
    stored_in: str | None = None

    @classmethod
    def for_run(cls, encoding: str, *, model: str, model_id: str, run_id: str) -> ProposalsInfo:
        masks, embeddings = ENCODINGS[encoding]
        return cls(encoding, masks, embeddings, model=model, model_id=model_id, run_id=run_id)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProposalsInfo:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class NoProposalsError(ValueError):
    """The output holds no proposals (labelled without ``--proposals``, or not an output at all)."""


def read_proposals_info(fs, root: str) -> ProposalsInfo:
    """``OUT/proposals.json`` of a labelling output; NoProposalsError when there is none."""
    uri = storage.full_uri(fs, root)
    if not fs.exists(storage.join(root, JOB_FILE)):
        raise NoProposalsError(f"{uri} is not a labelling output: it has no {JOB_FILE}")
    path = storage.join(root, PROPOSALS_FILE)
    if not fs.exists(path):
        raise NoProposalsError(
            f"{uri} holds no proposals ({PROPOSALS_FILE} is missing): it was labelled without --proposals. "
            "Label it again with `ebseg label ... --proposals` to relabel or search it later, or label it "
            "with the new vocabulary directly."
        )
    return ProposalsInfo.from_dict(storage.read_json(fs, path))


@dataclass(frozen=True)
class StoredProposals:
    """Where an output's proposals are: ``info`` (its own ``proposals.json``) and the output holding the
    files, ``fs`` + ``root`` (the output itself, or the labelling output a relabelled one points at)."""

    info: ProposalsInfo
    fs: Any
    root: str

    @property
    def uri(self) -> str:
        return storage.full_uri(self.fs, self.root)

    def shard_parts(self, shards: set[str] | None = None) -> dict[str, list[str]]:
        """Shard id -> its committed proposals parts (relative to ``root``, manifest order); ``shards``
        keeps only those (a relabelled output reads its own committed shards' proposals, no others)."""
        parts = {}
        for path in manifest_paths(self.fs, self.root):
            shard_id = manifest_shard_id(path)
            if shards is None or shard_id in shards:
                manifest = storage.read_json(self.fs, path)
                where = f"manifest {storage.full_uri(self.fs, path)}"
                parts[shard_id] = manifest_files(manifest, where=where, proposals=True)
        return parts


def stored_proposals(fs, root: str, storage_options: Mapping[str, Any] | None = None) -> StoredProposals:
    """The proposals of the output at ``root``, following ``stored_in`` to the labelling output that holds
    them. NoProposalsError when there are none, or when that output no longer holds the same run's."""
    info = read_proposals_info(fs, root)
    if info.stored_in is None:
        return StoredProposals(info, fs, root)
    uri = storage.full_uri(fs, root)
    home_fs, home_root = storage.url_to_fs(info.stored_in, storage_options)
    try:
        home = read_proposals_info(home_fs, home_root)
    except NoProposalsError as e:
        raise NoProposalsError(
            f"{uri} was relabelled from {info.stored_in}, which holds its proposals, but: {e}"
        ) from e
    if home.run_id != info.run_id or home.stored_in is not None:
        raise NoProposalsError(
            f"{uri} reads its proposals from {info.stored_in} (run {info.run_id}), which now holds "
            f"run {home.run_id}'s: it was labelled again since. Relabel from it, or label the images again."
        )
    return StoredProposals(info, home_fs, home_root)


def encode_proposals(proposals: Proposals, encoding: tuple[str, str]) -> dict[str, Any]:
    """One image's proposals -> the encoded values a model stage hands to the writer (numpy, picklable)."""
    mask_encoding, embedding_encoding = encoding
    return {
        "masks": encode_masks(proposals.masks, mask_encoding),
        "embeddings": encode_embeddings(proposals.embeddings, embedding_encoding),
        "input_size": np.asarray(proposals.input_size, dtype=np.int32),
    }


def proposal_rows(batch: Mapping[str, Sequence[Any]], encoding: tuple[str, str]) -> pa.Table:
    """Model-stage rows -> a ``proposals_schema`` table of the ``ok`` rows that carry proposals.

    batch: columns image_id, shard_id, height, width, status, and ``proposal_masks`` /
    ``proposal_embeddings`` / ``proposal_input_size`` (``encode_proposals``'s values; empty for error rows).
    """
    mask_encoding, embedding_encoding = encoding
    schema = proposals_schema(embedding_encoding)
    rows = []
    for i in range(len(batch["image_id"])):
        masks = batch["proposal_masks"][i]
        if str(batch["status"][i]) != "ok" or masks is None or np.size(masks) == 0:
            continue
        embeddings = np.asarray(batch["proposal_embeddings"][i])
        q, gh, gw = masks.shape
        input_h, input_w = (int(v) for v in batch["proposal_input_size"][i])
        height, width = int(batch["height"][i]), int(batch["width"][i])
        decoded = Proposals(decode_masks(masks, mask_encoding), torch.zeros(0), (input_h, input_w))
        areas, boxes = decoded.region_stats(height, width)
        rows.append(
            {
                "image_id": str(batch["image_id"][i]),
                "shard_id": str(batch["shard_id"][i]),
                "mask_encoding": mask_encoding,
                "embedding_encoding": embedding_encoding,
                "queries": q,
                "dim": embeddings.shape[-1],
                "grid_height": gh,
                "grid_width": gw,
                "input_height": input_h,
                "input_width": input_w,
                "height": height,
                "width": width,
                "masks": np.ascontiguousarray(masks).tobytes(),
                "areas": areas.tolist(),
                "boxes": boxes.tolist(),
                **{name: list(embeddings[b]) for b, name in enumerate(BRANCHES)},
            }
        )
    return pa.Table.from_pylist(rows, schema=schema)


def parquet_bytes(table: pa.Table) -> bytes:
    """A proposals table as one Parquet file (zstd: saturated uint8 / float8 masks shrink several-fold)."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


_MASK_DTYPES = {"float32": np.float32, "float16": np.float16, "float8": np.uint8, "uint8": np.uint8}


def read_proposals(table: pa.Table) -> dict[str, tuple[Proposals, tuple[int, int]]]:
    """A proposals table (any part of one) -> image_id -> (Proposals, original (height, width))."""
    out = {}
    for row in table.to_pylist():
        shape = (row["queries"], row["grid_height"], row["grid_width"])
        raw = np.frombuffer(bytearray(row["masks"]), dtype=_MASK_DTYPES[row["mask_encoding"]]).reshape(shape)
        embeddings = np.stack([np.asarray(row[name], dtype=np.float32) for name in BRANCHES])
        proposals = Proposals(
            masks=decode_masks(raw, row["mask_encoding"]),
            embeddings=decode_embeddings(embeddings, row["embedding_encoding"]).reshape(
                len(BRANCHES), row["queries"], row["dim"]
            ),
            input_size=(row["input_height"], row["input_width"]),
        )
        out[row["image_id"]] = (proposals, (row["height"], row["width"]))
    return out


# What search reads of a proposals part: the embeddings and the stored per-query areas and boxes, not the
# masks (most of a part's bytes: ~0.73 of ~1 MB per base image at the default encoding).
SEARCH_COLUMNS = ("image_id", "embedding_encoding", "queries", "dim", "areas", "boxes", *BRANCHES)


def _flat(column: pa.ChunkedArray, depth: int) -> np.ndarray:
    for _ in range(depth):
        column = pc.list_flatten(column)
    return column.to_numpy()


def read_embeddings(table: pa.Table) -> list[tuple[str, torch.Tensor, torch.Tensor, list[list[int]]]]:
    """A proposals table read with ``SEARCH_COLUMNS`` only -> per image (image_id, embeddings float32
    [3, Q, D], areas float32 [Q], boxes [Q][4]), in row order. The lists are flattened column-wise (one
    numpy array per branch for the whole table, not a Python float per value)."""
    n = table.num_rows
    if n == 0:
        return []
    queries, dims = (table.column(name).to_numpy() for name in ("queries", "dim"))
    encodings = set(table.column("embedding_encoding").to_pylist())
    if len({*queries.tolist()}) != 1 or len({*dims.tolist()}) != 1 or len(encodings) != 1:
        raise ValueError("a proposals part mixes query counts, widths or encodings: one model writes a part")
    q, d, (encoding,) = int(queries[0]), int(dims[0]), encodings
    stacked = np.stack([_flat(table.column(name), 2).reshape(n, q, d) for name in BRANCHES], axis=1)
    embeddings = decode_embeddings(stacked, encoding)  # [n, 3, Q, D] float32
    areas = torch.from_numpy(_flat(table.column("areas"), 1).astype(np.float32).reshape(n, q))
    ids, boxes = table.column("image_id").to_pylist(), table.column("boxes").to_pylist()
    return [(ids[i], embeddings[i], areas[i], boxes[i]) for i in range(n)]


def empty_masks() -> np.ndarray:
    """The ``proposal_masks`` value of a row without proposals."""
    return np.zeros((0, 0, 0), dtype=np.uint8)
