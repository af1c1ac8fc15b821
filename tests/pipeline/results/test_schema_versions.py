"""Outputs of schema version 1 (one Parquet file per shard, manifests with ``file``) stay readable by query,
show and export, beside version 2 outputs (part files listed by ``files``); orphans are never read."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ebseg.vocab import Vocabulary
from pipeline import layout, storage
from pipeline.label import proposal_records, records
from pipeline.label.proposal_records import PROPOSALS_SCHEMA
from pipeline.label.records import Provenance
from pipeline.results.export import export_coco
from pipeline.results.query import open_output
from pipeline.results.show import render_overlay

NAMES = ["sky", "grass"]


def _record(image_path, image: np.ndarray, shard: str) -> dict:
    height, width = image.shape[:2]
    labels = np.zeros((height, width), np.int32)
    labels[height // 2 :] = 1  # grass below the horizon
    row = {
        "image_id": f"id-{image_path.stem}",
        "source_uri": str(image_path),
        "shard_id": shard,
        "member": None,
        "shard_size": 1,
        "width": width,
        "height": height,
        "status": "ok",
        "error": None,
        "labels": records.to_storage(labels, len(NAMES)),
        "scores": np.array([0.9, 0.8], np.float32),
    }
    return records.record(row, names=NAMES, provenance=Provenance("m", "v", "r"))


def _parquet(rows: list[dict], version: int) -> bytes:
    table = records.records_table(rows).select(layout.IMAGES_SCHEMA.names)
    table = table.replace_schema_metadata({layout.METADATA_KEY: str(version).encode()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def write_output(root, photos, version: int):
    """A small output written by hand in the layout of ``version``: two shards, one photo each, and an
    orphan file no manifest lists."""
    fs, path = storage.url_to_fs(str(root / "out"))
    storage.write_json_atomic(fs, f"{path}/job.json", {"kind": "label", "schema_version": version})
    storage.write_json_atomic(fs, f"{path}/vocabulary.json", Vocabulary(NAMES).to_dict())
    ids = []
    for i, photo in enumerate(photos[:2]):
        shard = f"files-{i:06d}-abc"
        source = root / f"photo{i}.png"
        Image.fromarray(photo).save(source)
        rows = [_record(source, photo, shard)]
        ids.append(rows[0]["image_id"])
        if version == 1:
            name = f"images/{shard}.parquet"
            manifest = {"shard_id": shard, "file": name, "rows": 1, "schema_version": 1}
        else:
            name = f"images/{shard}/0000000-0000000-{i:016x}.parquet"
            files = [{"file": name, "rows": 1}]
            if version >= 3:  # an output with proposals: the readers of the images table skip them
                proposals = name.replace("images/", "proposals/", 1)
                files[0]["proposals"] = {"file": proposals, "rows": 0}
                storage.write_bytes_atomic(
                    fs, f"{path}/{proposals}", proposal_records.parquet_bytes(PROPOSALS_SCHEMA.empty_table())
                )
            manifest = {"shard_id": shard, "files": files, "rows": 1, "schema_version": version}
        storage.write_bytes_atomic(fs, f"{path}/{name}", _parquet(rows, version))
        storage.write_json_atomic(fs, f"{path}/_manifest/{shard}.json", manifest)
        orphan = _record(source, photo, shard) | {"image_id": f"orphan-{i}"}
        stray = f"images/{shard}-stray.parquet" if version == 1 else f"images/{shard}/stray.parquet"
        storage.write_bytes_atomic(fs, f"{path}/{stray}", _parquet([orphan], version))
    return str(root / "out"), ids


@pytest.mark.parametrize("version", [1, 2, layout.SCHEMA_VERSION])
def test_query_show_and_export_read_each_schema_version(version, photos, tmp_path):
    out, ids = write_output(tmp_path, photos, version)
    with open_output(out) as output:
        assert sorted(output.sql("SELECT image_id FROM images").column(0).to_pylist()) == sorted(ids)
        label_map = output.label_map(ids[0])
        assert label_map.shape == photos[0].shape[:2] and set(np.unique(label_map)) == {0, 1}
        assert output.images_with("grass", min_area_fraction=0.4) == sorted(ids)
        if version >= 3:
            assert (
                output.has_proposals
                and output.sql("SELECT count(*) FROM proposals").column(0)[0].as_py() == 0
            )
    shown = render_overlay(out, ids[1], str(tmp_path / "shown.png"))
    assert (shown["height"], shown["width"]) == photos[1].shape[:2]
    export_coco(out, str(tmp_path / "coco"))
    coco = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    assert sorted(im["ebseg_image_id"] for im in coco["images"]) == sorted(ids)
    assert len(coco["annotations"]) == 4  # two classes in each of the two images


def test_a_manifest_without_data_files_is_refused_by_name(tmp_path):
    fs, root = storage.url_to_fs(str(tmp_path))
    storage.write_json_atomic(fs, f"{root}/_manifest/s.json", {"shard_id": "s", "files": [{"rows": 1}]})
    with pytest.raises(ValueError, match=r"s\.json names no data file"):
        layout.committed_files(fs, root)
