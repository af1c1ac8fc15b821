"""Deaths at every step of the commit (``pipeline.label.diehook``): each followed by a rerun gives every
image exactly once, and no part file beside the ones the manifests list (an orphan a reader or a run could
count)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from pipeline import storage
from pipeline.label import diehook
from pipeline.label.commit import ShardCommitter
from pipeline.label.job import LabelJob
from pipeline.label.listing import list_shards
from pipeline.label.run import run
from tests.conftest import REPO
from tests.pipeline.label.test_faults import write_photos
from tests.pipeline.label.test_run import (
    VOCAB,
    check_manifests,
    check_output,
    model_rows,
    small_photos,
    writer_for,
)
from tests.pipeline.label.test_segment import save_tiny

IMAGES = 6


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("diehook") / "tiny64.pt")


def output_uri(store: str, tmp_path, s3_server) -> str:
    return f"s3://{s3_server.bucket('die')}/out" if store == "s3" else str(tmp_path / "out")


def job_spec(tmp_path, photos, out: str, tiny_ckpt: str) -> tuple[dict, dict]:
    expected = write_photos(tmp_path / "in", small_photos(photos, IMAGES))
    spec = {
        "input": str(tmp_path / "in"),
        "output": out,
        "model": tiny_ckpt,
        "vocabulary": VOCAB,
        "files_per_shard": 2,
        "batch_size": 2,
        "rows_per_block": 2,
        "max_restarts": 2,
        "progress": False,
    }
    return spec, expected


def check_once(out: str, expected: dict) -> None:
    """Every image once in the committed output; each shard's folder holds only its manifest's parts."""
    check_manifests(out, check_output(out, expected))


def test_parse_names_a_step_and_a_count():
    assert diehook.parse("after-manifest") == ("after-manifest", 1)
    assert diehook.parse("mid-cleanup,3") == ("mid-cleanup", 3)
    with pytest.raises(ValueError, match="one of before-part-write"):
        diehook.parse("after-manifests")
    with pytest.raises(ValueError, match="counts from 1"):
        diehook.parse("mid-cleanup,0")


def test_the_hook_dies_the_nth_time_only(tmp_path):
    code = (
        "from pipeline.label import diehook\n"
        "for i in range(3):\n"
        "    print(i, flush=True)\n"
        "    diehook.reached('after-manifest')\n"
    )
    env = {"PYTHONPATH": str(REPO), diehook.DIE_AT_ENV: "after-manifest,2"}
    died = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert (died.returncode, died.stdout.split()) == (diehook.DIE_EXIT_CODE, ["0", "1"])
    env[diehook.DIE_ONCE_ENV] = str(tmp_path / "died")
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert (first.returncode, second.returncode, second.stdout.split()) == (87, 0, ["0", "1", "2"])


def test_a_manifest_whose_create_response_was_lost_is_our_commit(tmp_path, monkeypatch):
    """S3 applied our manifest PUT, the response was lost, the retry found the key taken: not a lost race."""
    real = storage.create_exclusive

    def applied_then_lost(fs, path, data):
        assert real(fs, path, data)
        return False

    monkeypatch.setattr(storage, "create_exclusive", applied_then_lost)
    out = str(tmp_path / "out")
    fs, root = storage.url_to_fs(out)
    parts = writer_for(out)(model_rows("s0", [0, 1], 2))
    with ShardCommitter(root, fs=fs, expected_shards=["s0"]) as committer:
        committer.add(parts)
        report = committer.close()
    assert report.lost_races == [] and [m["shard_id"] for m in report.manifests] == ["s0"]
    # Another run's manifest (other bytes) is still a lost race.
    monkeypatch.setattr(storage, "create_exclusive", real)
    parts = writer_for(out)(model_rows("s0", [0, 1], 2))
    with ShardCommitter(root, fs=fs, expected_shards=["s0"], manifest_fields={"run_id": "x"}) as other:
        other.add(parts)
        assert other.close().lost_races == ["s0"]


@pytest.mark.parametrize(("step", "store"), [("before-part-write", "local"), ("after-part-write", "s3")])
def test_a_worker_dying_at_a_part_write_is_retried(
    ray_local, s3_server, tiny_ckpt, photos, tmp_path, monkeypatch, step, store
):
    out = output_uri(store, tmp_path, s3_server)
    spec, expected = job_spec(tmp_path, photos, out, tiny_ckpt)
    died = tmp_path / "died"
    monkeypatch.setenv(diehook.DIE_AT_ENV, step)  # the first writer there dies, once (DIE_ONCE)
    monkeypatch.setenv(diehook.DIE_ONCE_ENV, str(died))
    summary = run(LabelJob(**spec))
    assert died.exists(), "no writer died: the test did not kill anything"
    assert summary["images"] == IMAGES
    if step == "after-part-write":
        assert summary["orphans_deleted"] >= 1  # the dead attempt's part, never reported, deleted
    monkeypatch.delenv(diehook.DIE_AT_ENV)
    assert run(LabelJob(**spec))["shards_skipped"] == IMAGES // 2
    check_once(out, expected)


DRIVER = """
import json, sys
import ray
ray.init(address=sys.argv[1], log_to_driver=False)
from pipeline.label.job import LabelJob
from pipeline.label.run import run
run(LabelJob(**json.loads(sys.argv[2])))
"""


def plant_orphans(spec: dict, count: int) -> list[str]:
    """Part files that no manifest will list in the first shard's folder, as a dead attempt leaves."""
    shard = next(iter(list_shards(spec["input"], files_per_shard=spec["files_per_shard"])))
    fs, root = storage.url_to_fs(spec["output"])
    paths = [storage.join(root, "images", shard.shard_id, f"0000000-0000001-{uuid.uuid4().hex[:16]}.parquet")
             for _ in range(count)]  # fmt: skip
    for path in paths:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, b"PAR1 an attempt that died PAR1")
    return paths


# A driver's death in the commit, on local disk and on S3: after a manifest (S3) and in the middle of the
# cleanup that follows one (local). The second leaves what the first leaves (a manifest whose shard's
# orphans are not all deleted) plus a cleanup cut short, so (after-manifest, local) would run no step
# those two do not.
@pytest.mark.parametrize(("step", "store"), [("after-manifest", "s3"), ("mid-cleanup", "local")])
def test_a_driver_dying_in_the_commit_then_a_rerun(
    ray_local, s3_server, tiny_ckpt, photos, tmp_path, step, store
):
    out = output_uri(store, tmp_path, s3_server)
    spec, expected = job_spec(tmp_path, photos, out, tiny_ckpt)
    # mid-cleanup: two orphans, the driver dies after deleting the first one.
    planted = plant_orphans(spec, 2) if step == "mid-cleanup" else []
    nth = 2 if step == "mid-cleanup" else 1
    address = ray_local.get_runtime_context().gcs_address
    env = {**os.environ, diehook.DIE_AT_ENV: f"{step},{nth}", "PYTHONPATH": str(REPO)}
    driver = subprocess.run(
        [sys.executable, "-c", DRIVER, address, json.dumps(spec)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert driver.returncode == diehook.DIE_EXIT_CODE, driver.stderr[-3000:]
    fs, root = storage.url_to_fs(out)
    fs.invalidate_cache()
    assert not fs.exists(storage.join(root, "summary.json"))  # it died before finishing
    if planted:
        assert [fs.exists(p) for p in planted].count(True) == 1  # cut in the middle of the cleanup

    summary = run(LabelJob(**spec))
    assert summary["shards_skipped"] >= 1 and summary["images"] == IMAGES - 2 * summary["shards_skipped"]
    if planted:
        assert summary["orphans_deleted"] >= 1
    check_once(out, expected)
