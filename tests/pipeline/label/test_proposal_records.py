"""Proposals records: a model's proposals survive the model stage's encoding, Parquet and reading back."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ebseg.data.shapes import generate, shapes_vocabulary
from ebseg.predictor import Segmenter, resize_image
from ebseg.proposals import Proposals
from ebseg.zoo import SegmenterSettings, load_model
from pipeline import layout, storage
from pipeline.batches import object_column
from pipeline.label import proposal_records
from pipeline.label.commit import ShardCommitter
from pipeline.label.parts import PartWriter
from pipeline.label.proposal_records import ENCODINGS, ProposalsInfo, proposal_rows, read_proposals
from pipeline.label.records import Provenance, to_storage
from pipeline.label.segment import SegmentImages
from tests.pipeline.label.test_run import model_rows


@pytest.fixture(scope="module")
def demo():
    names = list(shapes_vocabulary().names)
    segmenter = Segmenter(load_model("demo"), names, device="cpu")
    images = [generate(index, seed=3, size=(130, 170 + 10 * index))[0] for index in range(3)]
    return segmenter, images


def _batch(images, proposals, encoding, *, failed=()):
    n = len(images)
    encoded = [proposal_records.encode_proposals(p, encoding) for p in proposals]
    for i in failed:
        encoded[i] = {"masks": proposal_records.empty_masks(), "embeddings": None, "input_size": [0, 0]}
    return {
        "image_id": np.array([f"img{i}" for i in range(n)], dtype=object),
        "shard_id": np.array(["s0"] * n, dtype=object),
        "height": np.array([im.shape[0] for im in images]),
        "width": np.array([im.shape[1] for im in images]),
        "status": np.array(["error" if i in failed else "ok" for i in range(n)], dtype=object),
        "proposal_masks": [e["masks"] for e in encoded],
        "proposal_embeddings": [e["embeddings"] for e in encoded],
        "proposal_input_size": [e["input_size"] for e in encoded],
    }


@pytest.mark.parametrize("name", ["lossless", "default"])
def test_proposals_round_trip_through_parquet(demo, name):
    segmenter, images = demo
    encoding = ENCODINGS[name]
    proposals = segmenter.propose(images)
    table = proposal_rows(_batch(images, proposals, encoding, failed=(1,)), encoding)
    assert table.num_rows == 2  # the error row has no proposals
    data = proposal_records.parquet_bytes(table)
    parquet = pq.ParquetFile(io.BytesIO(data))
    assert layout.schema_version(parquet.schema_arrow.metadata) == layout.SCHEMA_VERSION
    back = read_proposals(parquet.read())
    assert sorted(back) == ["img0", "img2"]
    for i in (0, 2):
        stored, size = back[f"img{i}"]
        assert size == images[i].shape[:2]
        assert stored.input_size == proposals[i].input_size
        assert stored.masks.shape == proposals[i].masks.shape
        assert stored.embeddings.shape == proposals[i].embeddings.shape
        if name == "lossless":
            torch.testing.assert_close(stored.masks, proposals[i].masks, rtol=0, atol=0)
            torch.testing.assert_close(stored.embeddings, proposals[i].embeddings, rtol=0, atol=0)
        else:
            torch.testing.assert_close(stored.embeddings, proposals[i].embeddings, rtol=1e-3, atol=1e-3)
            assert torch.equal(stored.masks > 0, proposals[i].masks > 0)  # float8 keeps the sign
        fresh = segmenter.predict([images[i]])[0]
        relabelled = segmenter.label([stored], [size])[0]
        agreement = float((fresh.label_map == relabelled.label_map).mean())
        assert agreement == 1.0 if name == "lossless" else agreement >= 0.999


def test_model_stage_hands_encoded_proposals_from_the_same_forward(demo):
    segmenter, images = demo
    settings = SegmenterSettings("demo", segmenter.vocabulary, batch_size=2)
    stage = SegmentImages(settings, proposals_encoding=ENCODINGS["lossless"])
    n = len(images)
    inputs = np.empty(n, dtype=object)
    for i, image in enumerate(images):
        inputs[i] = resize_image(image, stage.segmenter.input_shape(*image.shape[:2]))
    batch = {
        "image_id": np.array([f"img{i}" for i in range(n)], dtype=object),
        "shard_id": np.array(["s0"] * n, dtype=object),
        "height": np.array([im.shape[0] for im in images]),
        "width": np.array([im.shape[1] for im in images]),
        "status": np.array(["ok", "error", "ok"], dtype=object),
        "error": np.array([None, "decode: broken", None], dtype=object),
        "image": inputs,
    }
    out = stage(batch)
    # Labels and proposals come from one forward per model batch, not two.
    assert stage.forwards == len(stage.batches([images[0].shape[:2], images[2].shape[:2]]))
    back = read_proposals(proposal_rows(out, ENCODINGS["lossless"]))
    assert sorted(back) == ["img0", "img2"]
    for i in (0, 2):
        relabelled = segmenter.label([back[f"img{i}"][0]], [images[i].shape[:2]])[0]
        np.testing.assert_array_equal(
            to_storage(relabelled.label_map, len(segmenter.vocabulary)), out["labels"][i]
        )


def test_proposals_info_round_trips():
    info = ProposalsInfo.for_run("default", model="demo", model_id="demo:sha256-x", run_id="run-1")
    assert (info.mask_encoding, info.embedding_encoding) == ENCODINGS["default"]
    assert ProposalsInfo.from_dict(info.to_dict()) == info


def with_proposals(rows: dict[str, np.ndarray], encoding: tuple[str, str]) -> dict[str, np.ndarray]:
    """``model_rows`` plus random encoded proposals (Q=2, a 2x2 grid, D=3) for its ok rows."""
    n, generator = len(rows["image_id"]), torch.Generator().manual_seed(0)
    found = []
    for status in rows["status"]:
        if status != "ok":
            found.append({"masks": proposal_records.empty_masks(), "embeddings": None, "input_size": [0, 0]})
            continue
        made = Proposals(
            torch.randn(2, 2, 2, generator=generator), torch.randn(3, 2, 3, generator=generator), (7, 6)
        )
        found.append(proposal_records.encode_proposals(made, encoding))
    return {
        **rows,
        "proposal_masks": object_column([p["masks"] for p in found]),
        "proposal_embeddings": object_column([p["embeddings"] for p in found]),
        "proposal_input_size": np.array([p["input_size"] for p in found], np.int32).reshape(n, 2),
    }


def test_proposals_parts_are_committed_and_cleaned_with_their_images_parts(tmp_path):
    encoding = ENCODINGS["default"]
    out = str(tmp_path / "out")
    write = PartWriter(
        out, names=["a", "b"], provenance=Provenance("m", "v", "r"), proposals_encoding=encoding
    )
    fs, root = storage.url_to_fs(out)
    with ShardCommitter(root, fs=fs, expected_shards=["s-a"]) as committer:
        committer.add(write(with_proposals(model_rows("s-a", [0, 1], 3), encoding)))
        write(with_proposals(model_rows("s-a", [2], 3), encoding))  # a task that died after writing
        committer.add(write(with_proposals(model_rows("s-a", [2], 3, status="error"), encoding)))
        report = committer.close()
    assert report.orphans_deleted == 2  # the dead task's images part and its proposals part
    manifest = storage.read_json(fs, storage.join(root, "_manifest", "s-a.json"))
    assert [f["proposals"]["rows"] for f in manifest["files"]] == [2, 0]  # error rows have no proposals
    images = layout.committed_files(fs, root)
    proposals = layout.committed_files(fs, root, proposals=True)
    assert [p.replace("/proposals/", "/images/") for p in proposals] == images
    on_disk = sorted(str(p) for p in (tmp_path / "out" / "proposals").rglob("*.parquet"))
    assert on_disk == sorted(proposals)
    stored = read_proposals(pq.read_table(proposals[0]))
    assert sorted(stored) == ["s-a-0", "s-a-1"] and stored["s-a-0"][0].input_size == (7, 6)
