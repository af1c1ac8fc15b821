"""Training under faults: bad pairs are skipped and counted per epoch (refused when they are most of it), a
worker killed while writing a checkpoint resumes from the last complete one, and a truncated or foreign
checkpoint file is refused with an error naming it."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ebseg import checkpoint
from ebseg.build import build_ebseg
from ebseg.config import get_config
from ebseg.data import IGNORE_INDEX, encode_label, generate, write_shapes
from pipeline.pairs import PAIR_PROBLEMS, list_pairs
from pipeline.train.augment import AugmentBatch
from pipeline.train.bad_pairs import BadPairsError, EpochTally, rebatch
from pipeline.train.faults import FailureInjection
from pipeline.train.feed import worker_pairs
from pipeline.train.optim import build_optimizer, build_scheduler
from pipeline.train.run import run
from pipeline.train.state import (
    MODEL_FILE,
    STATE_FILE,
    Position,
    load_train_checkpoint,
    read_metrics,
    save_train_checkpoint,
)
from tests.pipeline.pairs_support import encode_image
from tests.pipeline.train.test_run import SIZE, checkpoint_names, small_job

NUM_CLASSES = 7  # the shapes vocabulary


def bad_files(kind: str, seed: int) -> tuple[bytes, bytes]:
    """(image bytes, label bytes) of a pair that cannot train, for each reason."""
    image, label = generate(seed, seed=9, size=SIZE)
    if kind == "unreadable":
        return b"not an image at all", encode_label(label)
    if kind == "size_mismatch":
        return encode_image(image, "PNG"), encode_label(label[: SIZE // 2])
    if kind == "class_out_of_range":
        return encode_image(image, "PNG"), encode_label(np.full_like(label, 200))
    assert kind == "all_ignore"
    return encode_image(image, "PNG"), encode_label(np.full_like(label, IGNORE_INDEX))


def test_bad_pairs_are_marked_rebatched_and_counted_without_ray():
    good = [generate(i, seed=1, size=SIZE) for i in range(5)]
    rows = [(f"g{i}", encode_image(im, "PNG"), encode_label(lab)) for i, (im, lab) in enumerate(good)]
    rows += [(f"b-{kind}", *bad_files(kind, 0)) for kind in PAIR_PROBLEMS]
    order = [0, 5, 1, 6, 2, 7, 3, 8, 4]  # bad pairs between the good ones
    batch = {
        "image_id": np.array([rows[k][0] for k in order], dtype=object),
        "image": np.array([rows[k][1] for k in order], dtype=object),
        "label": np.array([rows[k][2] for k in order], dtype=object),
    }
    out = AugmentBatch("small", seed=0, epoch=0, num_classes=NUM_CLASSES)(batch)
    assert dict(zip(out["image_id"], out["problem"])) == {
        **{f"g{i}": "" for i in range(5)},
        **{f"b-{kind}": kind for kind in PAIR_PROBLEMS},
    }
    # Without a vocabulary size only the pair itself is checked (evaluation-style reading).
    unchecked = AugmentBatch("small", seed=0, epoch=0)(batch)["problem"]
    assert sorted(p for p in unchecked if p) == ["size_mismatch", "unreadable"]

    chunks = [{k: v[:4] for k, v in out.items()}, {k: v[4:] for k, v in out.items()}]
    tally = EpochTally()
    batches = list(rebatch(chunks, 2, tally))
    assert [list(b["image_id"]) for b, _ in batches] == [["g0", "g1"], ["g2", "g3"]]  # g4 left: drop_last
    assert [read for _, read in batches] == [3, 7]  # rows read up to each batch's last row
    assert batches[0][0]["image"].shape == (2, 3, 256, 256) and batches[0][0]["label"].dtype == np.int32
    assert tally.bad == 4 and tally.counts["good"] == 5
    assert tally.as_record(0) == {
        "bad_pairs_epoch": 0, "bad_pairs": 4, **{f"bad_pairs/{k}": 1 for k in PAIR_PROBLEMS}
    }  # fmt: skip
    tally.check(0, "data")  # 4 bad of 9: trains on
    # Resuming after one batch: its rows are not counted again, the batch is not yielded again.
    resumed = EpochTally()
    again = list(rebatch(chunks, 2, resumed, skip=1))
    assert [list(b["image_id"]) for b, _ in again] == [["g2", "g3"]]
    assert (resumed.bad, resumed.counts["good"]) == (3, 3)  # the rows after g1: b-size .. g4
    assert next(iter(rebatch(chunks, 2, EpochTally(), start=10)))[1] == 13  # counted from a resume point
    with pytest.raises(BadPairsError, match=r"data: epoch 3: 5 of 9 pairs cannot train .*unreadable: 5"):
        EpochTally.from_counts({"good": 4, "unreadable": 5}).check(3, "data")


def _objects(model):
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.0)
    return optimizer, build_scheduler(optimizer, max_steps=10, power=0.9), torch.amp.GradScaler(enabled=False)


def test_truncated_or_foreign_checkpoints_are_refused_naming_the_file(tmp_path):
    torch.manual_seed(0)
    model = build_ebseg(get_config("tiny").replace(short_side=SIZE))
    position = Position(step=3, epoch=1, batch=2, offsets=(5, 6), tally={"good": 9, "all_ignore": 1})
    directory = tmp_path / "checkpoint_00000003"
    directory.mkdir()
    save_train_checkpoint(str(directory), model=model, **dict(zip(("optimizer", "scheduler", "scaler"),
                          _objects(model))), position=position)  # fmt: skip
    assert load_train_checkpoint(str(directory), model, *_objects(model)) == position  # round trip

    for name in (MODEL_FILE, STATE_FILE):
        broken = tmp_path / f"broken-{name}"
        broken.mkdir()
        for other in (MODEL_FILE, STATE_FILE):
            data = (directory / other).read_bytes()
            (broken / other).write_bytes(data[: len(data) // 2] if other == name else data)
        with pytest.raises(checkpoint.CheckpointError, match=rf"{broken / name} is truncated"):
            load_train_checkpoint(str(broken), model, *_objects(model))
    with pytest.raises(checkpoint.CheckpointError, match=rf"{tmp_path / 'broken-model.pt' / MODEL_FILE}"):
        checkpoint.load(str(tmp_path / "broken-model.pt" / MODEL_FILE))

    other = build_ebseg(get_config("tiny"))  # another inference scale: another model
    with pytest.raises(checkpoint.CheckpointError, match=rf"{directory / MODEL_FILE} was written by another"):
        load_train_checkpoint(str(directory), other, *_objects(other))
    (tmp_path / "foreign").mkdir()
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign" / MODEL_FILE)
    (tmp_path / "foreign" / STATE_FILE).write_bytes((directory / STATE_FILE).read_bytes())
    with pytest.raises(checkpoint.CheckpointError, match=r"foreign/model\.pt is not an ebseg checkpoint"):
        load_train_checkpoint(str(tmp_path / "foreign"), model, *_objects(model))


def test_bad_pairs_and_a_kill_mid_checkpoint_on_local_disk(ray_local, tmp_path):
    """28 pairs, 2 in each worker's epoch-0 share broken: 12 good each, 6 batches; the run is killed while
    its step-4 checkpoint is written, restarts from step 2, and still counts every bad pair of epoch 0."""
    data = tmp_path / "pairs"
    write_shapes(str(data), count=28, seed=0, size=SIZE)
    listing = list_pairs(str(data))
    shares = [worker_pairs(listing, seed=0, epoch=0, rank=r, world=2, batch_size=2) for r in (0, 1)]
    broken = {shares[0][1][0]: "unreadable", shares[0][5][0]: "size_mismatch",
              shares[1][0][0]: "class_out_of_range", shares[1][9][0]: "all_ignore"}  # fmt: skip
    for image_id, kind in broken.items():
        image, label = bad_files(kind, int(image_id))
        (data / "images" / f"{image_id}.png").write_bytes(image)
        (data / "annotations" / f"{image_id}.png").write_bytes(label)

    marker = tmp_path / "killed.json"
    job = small_job(
        name="faults", storage=str(tmp_path / "runs"), data=str(data), steps=8, checkpoint_every=2,
        max_failures=1,
    )  # fmt: skip
    fault = FailureInjection(step=4, marker=str(marker), rank=0, at="checkpoint")
    result = run(job, inject_failure=fault)

    killed = json.loads(marker.read_text())
    assert killed["at"] == "checkpoint" and killed["destination"].endswith("checkpoint_00000004/model.pt")
    assert result.step == 8
    assert checkpoint_names(job.run_uri) == ["checkpoint_00000006", "checkpoint_00000008"]
    records = {r["step"]: r for r in read_metrics(job.run_uri)}
    assert sorted(records) == list(range(1, 9))
    assert records[3]["resumed_from"] == 2  # not the half-written step-4 checkpoint
    assert [(records[s]["epoch"], records[s]["batch"]) for s in (6, 7)] == [(0, 6), (1, 1)]
    assert records[7]["bad_pairs_epoch"] == 0 and records[7]["bad_pairs"] == 4
    assert {k: records[7][f"bad_pairs/{k}"] for k in PAIR_PROBLEMS} == {k: 1 for k in PAIR_PROBLEMS}
    assert not any("bad_pairs" in records[s] for s in (1, 2, 3, 4, 5, 6, 8))
    seen = {i for r in records.values() for i in [r["first_image_id"]]}
    assert not seen & set(broken)
    model = checkpoint.load(os.path.join(job.run_uri, "checkpoint_00000008", MODEL_FILE))
    assert model.config.name == "tiny"


def test_mostly_bad_pairs_stop_the_run_on_s3(ray_local, s3_server):
    bucket = s3_server.bucket("badpairs")
    good = [generate(i, seed=2, size=SIZE) for i in range(3)]
    rows = [(f"g{i}", encode_image(im, "PNG"), encode_label(lab)) for i, (im, lab) in enumerate(good)]
    rows += [(f"b{i}", *bad_files("unreadable", i)) for i in range(4)]
    table = pa.table({k: [r[i] for r in rows] for i, k in enumerate(("image_id", "image", "label"))})
    with s3_server.filesystem().open(f"{bucket}/pairs/part-0.parquet", "wb") as f:
        pq.write_table(table, f)
    job = small_job(
        name="bad", storage=f"s3://{bucket}/runs", data=f"s3://{bucket}/pairs", vocabulary="a,b,c,d,e,f,g",
        workers=1, batch_size=1, steps=20, checkpoint_every=100,
    )  # fmt: skip
    with pytest.raises(BadPairsError, match=rf"s3://{bucket}/pairs: epoch 0: 4 of 7 pairs cannot train"):
        run(job)
