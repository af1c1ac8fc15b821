"""Ray Train runs of the tiny model on small shapes sets: the loss falls, checkpoints land in storage (local
and S3), a rerun resumes from the newest checkpoint at the same step, LR and data, and a worker killed
mid-run is restarted from the newest checkpoint."""

from __future__ import annotations

import json
import re

import pytest
import ray.train
import torch

from ebseg import checkpoint
from ebseg.build import build_ebseg
from ebseg.config import get_config
from ebseg.data.shapes import write_shapes
from jobs.cli import build_parser
from jobs.flags import spec_from_args
from pipeline import storage
from pipeline.train.faults import FailureInjection
from pipeline.train.job import TrainJob
from pipeline.train.optim import poly_lr
from pipeline.train.run import check_job_file, run
from pipeline.train.state import read_metrics

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
        augment="small",
        crop_size=SIZE,
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
    check_job_file(job.model_copy(update=dict(max_failures=2, checkpoint_every=5)))  # how it runs may change
    with pytest.raises(ValueError, match=r"lr: 0\.001 -> 0\.002"):
        check_job_file(job.model_copy(update=dict(lr=2e-3)))
    with pytest.raises(ValueError, match="workers: 2 -> 4"):  # the data position counts batches per worker
        check_job_file(job.model_copy(update=dict(workers=4)))

    # What the old module CLI could say, as spec fields: crop_size rescales the augmentation preset.
    args = build_parser().parse_args(
        ["train", "--data", "d", "--storage", "s", "--name", "n", "--model", "tiny", "--steps", "7",
         "--crop-size", "128", "--amp", "none", "--clip-grad-norm", "none", "--storage-option", "anon=true"]
    )  # fmt: skip
    parsed = spec_from_args(args, "train").to_job()
    assert (parsed.steps, parsed.amp, parsed.clip_grad_norm) == (7, None, None)
    assert parsed.augment_config().crop_size == 128 and parsed.storage_options == {"anon": True}


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
    )
    fault = FailureInjection(step=10, marker=str(marker), rank=0, mode="raise")
    with pytest.raises(ray.train.TrainingFailedError):  # max_failures=0: it ends after step 8's checkpoint
        run(job, inject_failure=fault)
    crash = json.loads(marker.read_text())
    assert crash["step"] == 10
    assert checkpoint_names(job.run_uri) == ["checkpoint_00000004", "checkpoint_00000008"]

    result = run(job, inject_failure=fault)  # the same run again (the marker disarms it): resumes at step 8
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
    )
    fault = FailureInjection(step=4, marker=str(marker), rank=1, mode="exit")
    result = run(
        job, inject_failure=fault
    )  # rank 1 exits at step 4; Ray Train restarts the group from the step-2 checkpoint
    assert marker.exists() and json.loads(marker.read_text())["step"] == 4
    assert result.step == 6 and result.checkpoint_uri == f"s3://{bucket}/runs/kill/checkpoint_00000006"
    assert checkpoint_names(job.run_uri) == ["checkpoint_00000004", "checkpoint_00000006"]
    records = read_metrics(job.run_uri)
    assert [r["step"] for r in records] == list(range(1, 7))
    assert [(r["epoch"], r["batch"]) for r in records] == [(0, 2), (0, 4), (0, 6), (1, 2), (1, 4), (1, 6)]
    assert records[-1]["lr"] == pytest.approx(poly_lr(1e-3, 5, max_steps=6))
    model = checkpoint.load(result.final_model_uri)
    assert model.config.name == "tiny"
