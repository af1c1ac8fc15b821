"""Ray Train runs of the tiny model on small shapes sets: the loss falls, checkpoints land in storage (local
and S3), a rerun resumes from the newest checkpoint at the same step, LR and data, and a worker killed
mid-run is restarted from the newest checkpoint."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import ray.train
import torch

from ebseg import checkpoint
from ebseg.build import build_ebseg
from ebseg.config import get_config
from ebseg.data.shapes import write_shapes
from ebseg.data.transforms import augment_config
from pipeline import storage
from pipeline.optim import poly_lr
from pipeline.train import (
    FailureInjection,
    TrainJob,
    check_job_file,
    job_from_args,
    read_metrics,
    run,
    scale_augment,
)

SIZE = 64  # shapes images and crops
COUNT = 24  # 2 workers x batch 2: 6 steps per epoch


@pytest.fixture(scope="module")
def start_model(tmp_path_factory) -> str:
    """The tiny architecture with a 64 px inference scale, as a checkpoint to start from."""
    path = tmp_path_factory.mktemp("init") / "tiny64.pt"
    torch.manual_seed(0)
    checkpoint.save(build_ebseg(get_config("tiny").replace(short_side=SIZE)), str(path))
    return str(path)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("shapes")
    write_shapes(str(root / "train"), count=COUNT, seed=0, size=SIZE)
    write_shapes(str(root / "val"), count=4, seed=1, size=SIZE)
    return {"train": str(root / "train"), "val": str(root / "val")}


def small_job(**changes) -> TrainJob:
    base = dict(
        model="tiny",
        trainable="all",
        workers=2,
        batch_size=2,
        lr=1e-3,
        loss="tiny",
        augment=scale_augment(augment_config("small"), SIZE),
        log_every=100,
        keep_checkpoints=2,
    )
    return TrainJob(**{**base, **changes})


def checkpoint_names(uri: str) -> list[str]:
    fs, path = storage.url_to_fs(uri)
    names = (p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    return sorted(n for n in names if re.fullmatch(r"checkpoint_\d+", n))


def test_job_is_validated_and_a_changed_rerun_is_refused(tmp_path):
    with pytest.raises(ValueError, match="name"):
        small_job(name="a/b", storage=str(tmp_path), data="x")
    with pytest.raises(ValueError, match="trainable"):
        small_job(name="a", storage=str(tmp_path), data="x", trainable="encoders")
    job = small_job(name="run", storage=str(tmp_path), data="x", steps=10)
    check_job_file(job)
    check_job_file(dataclasses.replace(job, max_failures=2, checkpoint_every=5))  # how it runs may change
    with pytest.raises(ValueError, match=r"lr: 0\.001 -> 0\.002"):
        check_job_file(dataclasses.replace(job, lr=2e-3))
    with pytest.raises(ValueError, match="workers: 2 -> 4"):  # the data position counts batches per worker
        check_job_file(dataclasses.replace(job, workers=4))

    parsed, address = job_from_args(
        ["--data", "d", "--storage", "s", "--name", "n", "--model", "tiny", "--steps", "7",
         "--crop-size", "128", "--amp", "none", "--clip-grad-norm", "0", "--storage-option", "anon=true"]
    )  # fmt: skip
    assert address is None
    assert (parsed.steps, parsed.amp, parsed.clip_grad_norm) == (7, None, None)
    assert parsed.augment.crop_size == 128 and parsed.storage_options == {"anon": "true"}


def test_crash_then_rerun_resumes_at_the_newest_checkpoint(ray_local, tmp_path, shapes_dir, start_model):
    marker = tmp_path / "crashed.json"
    job = small_job(
        name="resume",
        storage=str(tmp_path / "runs"),
        data=shapes_dir["train"],
        val_data=shapes_dir["val"],
        model=start_model,
        steps=12,
        checkpoint_every=4,
        val_every=6,
        inject_failure=FailureInjection(step=10, marker=str(marker), rank=0, mode="raise"),
    )
    with pytest.raises(ray.train.TrainingFailedError):
        run(job)  # max_failures=0: the injected error ends the run after the checkpoint at step 8
    crash = json.loads(marker.read_text())
    assert crash["step"] == 10
    assert checkpoint_names(job.run_uri) == ["checkpoint_00000004", "checkpoint_00000008"]

    result = run(job)  # the same run again: resumes at step 8
    assert result.step == 12
    assert checkpoint_names(job.run_uri) == ["checkpoint_00000008", "checkpoint_00000012"]  # keep 2
    records = read_metrics(job.run_uri)
    by_step = {r["step"]: r for r in records}
    assert [r["step"] for r in records] == list(range(1, 13))  # 9..12 once: from the rerun
    # The rerun drew the batch the crashed run had drawn for step 10: same epoch order, same position.
    assert by_step[10]["first_image_id"] == crash["image_ids"][0]
    # 24 pairs / 2 workers / batch 2 = 6 batches an epoch; step 9 continues epoch 1 at its 3rd batch.
    assert [(by_step[s]["epoch"], by_step[s]["batch"]) for s in (6, 7, 8, 9, 12)] == [
        (0, 6), (1, 1), (1, 2), (1, 3), (1, 6)
    ]  # fmt: skip
    for step, record in by_step.items():
        assert record["lr"] == pytest.approx(poly_lr(1e-3, step - 1, max_steps=12))
    first = sum(by_step[s]["loss"] for s in (1, 2, 3)) / 3
    last = sum(by_step[s]["loss"] for s in (10, 11, 12)) / 3
    assert last < 0.9 * first, (first, last)
    assert {"loss_ce_a", "loss_ce_b", "loss_mask", "loss_dice", "loss_ssc", "loss_ce_a_0"} <= set(by_step[1])
    assert by_step[1]["images_per_s"] > 0
    assert 0.0 <= by_step[12]["val_miou"] <= 1.0 and "val_miou" in by_step[6] and "val_miou" not in by_step[7]

    final = checkpoint.load(result.final_model_uri)
    assert final.config.short_side == SIZE
    stored = torch.load(result.final_model_uri, weights_only=True)
    assert stored["step"] == 12 and stored["vocabulary"]["classes"][1]["name"] == "red circle"
    newest = checkpoint.load(storage.join(result.checkpoint_uri, "model.pt"))
    for (name, a), b in zip(final.state_dict().items(), newest.state_dict().values()):
        assert torch.equal(a, b), name


def test_killed_worker_restarts_from_checkpoint_on_s3_with_parquet(ray_local, s3_server, tmp_path):
    bucket = s3_server.bucket("train")
    data = f"s3://{bucket}/shapes"
    write_shapes(data, count=COUNT, seed=0, size=SIZE, layout="parquet")
    marker = tmp_path / "killed.json"
    job = small_job(
        name="kill",
        storage=f"s3://{bucket}/runs",
        data=data,
        steps=6,
        grad_accumulation=2,  # two micro-batches a step: 3 steps an epoch
        checkpoint_every=2,
        max_failures=1,
        inject_failure=FailureInjection(step=4, marker=str(marker), rank=1, mode="exit"),
    )
    result = run(job)  # rank 1 exits at step 4; Ray Train restarts the group from the step-2 checkpoint
    assert marker.exists() and json.loads(marker.read_text())["step"] == 4
    assert result.step == 6 and result.checkpoint_uri == f"s3://{bucket}/runs/kill/checkpoint_00000006"
    assert checkpoint_names(job.run_uri) == ["checkpoint_00000004", "checkpoint_00000006"]
    records = read_metrics(job.run_uri)
    assert [r["step"] for r in records] == list(range(1, 7))
    assert [(r["epoch"], r["batch"]) for r in records] == [(0, 2), (0, 4), (0, 6), (1, 2), (1, 4), (1, 6)]
    assert records[-1]["lr"] == pytest.approx(poly_lr(1e-3, 5, max_steps=6))
    model = checkpoint.load(result.final_model_uri)
    assert model.config.name == "tiny"
