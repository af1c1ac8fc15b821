"""The relabelling stage: one committed source shard in, its records under the new vocabulary written out.

``RelabelShards`` is a callable class for ``Dataset.map_batches`` on a CPU actor pool: each actor loads the
source model's text tower alone and encodes the new vocabulary once (``SegmenterSettings.load_labeller``),
then for each source shard reads its images and proposals parts, labels every image from its proposals
(``Labeller.label``: dot products, balancing, semantic inference, the code a fresh labelling runs after
its forward pass; no image is read, no image tower is built) and writes the records with the labelling's
own encoder and writer (``pipeline.label.records``, ``PartWriter``). It returns the part metadata rows the
driver commits, exactly as the labelling's writer does. It runs without Ray too.

Error rows of the source stay error rows with their message; their ``row_index`` is their place in the
shard, so the new output has the source's rows, each once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ebseg.data.labels import label_bits
from ebseg.proposals import Proposals
from ebseg.zoo import SegmenterSettings
from pipeline import storage
from pipeline.label.parts import PART_SCHEMA, PartWriter
from pipeline.label.proposal_records import read_proposals
from pipeline.label.records import to_storage

# The source columns a new record keeps (identity, size, status).
KEPT = ("image_id", "source_uri", "shard_id", "member", "width", "height", "status", "error")


def enlarge(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[gh, gw] label map -> [H, W] by nearest neighbour (each output pixel takes its grid cell's label)."""
    height, width = size
    rows = (np.arange(height) * labels.shape[0]) // height
    cols = (np.arange(width) * labels.shape[1]) // width
    return labels[rows[:, None], cols[None, :]]


class RelabelShards:
    """``map_batches`` callable: rows {shard_id, rows, images, proposals} (``SourceShard.to_row``) ->
    ``PART_SCHEMA`` rows of the parts written under the new output.

    resolution: "original" labels at the original size (as labelling does); "grid" on the stride-4 grid of
    the model input, enlarged to the original size. proposals_in: the output whose ``proposals/`` holds the
    rows (``StoredProposals.uri``); the source itself when not given.
    """

    def __init__(
        self,
        settings: SegmenterSettings,
        *,
        source: str,
        proposals_in: str | None = None,
        writer: PartWriter,
        resolution: str = "original",
        storage_options: Mapping[str, Any] | None = None,
    ):
        self.labeller = settings.load_labeller()
        self.num_classes = len(settings.vocabulary)
        self.dtype = np.uint8 if label_bits(self.num_classes) == 8 else np.uint16
        self.source = source
        self.proposals_in = proposals_in or source
        self.writer = writer
        self.resolution = resolution
        self.storage_options = dict(storage_options or {})

    def __call__(self, batch: Mapping[str, Any]) -> pa.Table:
        n = len(batch["shard_id"])
        parts = [
            self.relabel(
                str(batch["shard_id"][i]),
                int(batch["rows"][i]),
                [str(f) for f in batch["images"][i]],
                [str(f) for f in batch["proposals"][i]],
            )
            for i in range(n)
        ]
        return pa.concat_tables(parts)

    def _read(self, fs, root: str, names: list[str], columns: list[str] | None = None) -> list[pa.Table]:
        return [pq.read_table(storage.join(root, name), filesystem=fs, columns=columns) for name in names]

    def label(self, proposals: Proposals, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """One image's (int32 [H, W] label map, [K] scores) at its original ``size``."""
        if self.resolution == "original":
            prediction = self.labeller.label([proposals], [size])[0]
            return prediction.label_map, prediction.scores
        h, w = proposals.input_size
        grid = (max(1, math.ceil(h / 4)), max(1, math.ceil(w / 4)))
        prediction = self.labeller.label([proposals], [grid])[0]
        return enlarge(prediction.label_map, size), prediction.scores

    def relabel(self, shard_id: str, rows: int, images: list[str], proposals: list[str]) -> pa.Table:
        """Relabel one source shard; returns the metadata rows of the parts written."""
        fs, root = storage.url_to_fs(self.source, self.storage_options)
        # The source's label maps and segments are not read: only identity, size and status carry over.
        records = pa.concat_tables(self._read(fs, root, images, list(KEPT)))
        if records.num_rows != rows:
            raise ValueError(
                f"source shard {shard_id}: manifest says {rows} rows, parts hold {records.num_rows}"
            )
        stored: dict[str, Any] = {}
        proposals_fs, proposals_root = storage.url_to_fs(self.proposals_in, self.storage_options)
        for table in self._read(proposals_fs, proposals_root, proposals):
            stored.update(read_proposals(table))
        out: dict[str, list[Any]] = {k: [] for k in (*KEPT, "labels", "scores", "model_ms", "row_index")}
        for index, row in enumerate(records.to_pylist()):
            start = time.perf_counter()
            labels, scores = np.zeros((0, 0), self.dtype), np.zeros(self.num_classes, np.float32)
            if row["status"] == "ok":
                if row["image_id"] in stored:
                    proposal, size = stored[row["image_id"]]
                    label_map, scores = self.label(proposal, size)
                    labels = to_storage(label_map, self.num_classes)
                else:  # a source written by a faulty writer: say so on the row, never invent labels
                    row["status"], row["error"] = "error", "relabel: the source stored no proposals for it"
            for key in KEPT:
                out[key].append(row[key])
            out["labels"].append(labels)
            out["scores"].append(scores)
            out["model_ms"].append((time.perf_counter() - start) * 1000)
            out["row_index"].append(index)
        batch = {k: np.asarray(v) if k in ("model_ms", "row_index") else v for k, v in out.items()}
        batch["shard_size"] = [rows] * records.num_rows
        if records.num_rows == 0:
            return PART_SCHEMA.empty_table()  # the committer commits a shard without rows at its close
        return self.writer(batch)
