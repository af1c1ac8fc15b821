"""The labelling job under faults: bad inputs, a model that fails on some images, lost rows, a killed driver,
a killed actor, and reruns that must be refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import storage
from pipeline.label.job import LabelJob
from pipeline.label.plan import OutputMismatchError
from pipeline.label.run import IncompleteRunError, run
from pipeline.label.segment import SegmentImages
from tests.conftest import REPO
from tests.pipeline.label.test_run import (
    VOCAB,
    check_manifests,
    check_output,
    encode,
    small_photos,
    tar_bytes,
)
from tests.pipeline.label.test_segment import save_tiny


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("faults") / "tiny64.pt")


def write_photos(directory: Path, images) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    expected = {}
    for i, image in enumerate(images):
        path = directory / f"p{i:02d}.jpg"
        path.write_bytes(encode(image, "JPEG"))
        expected[(str(path), None)] = image.shape[:2]
    return expected


# ------------------------------------------------------------------------------------- stage subclasses
# Ray workers import these by module path (the checkout is on their path, as for the driver).


class FailsOnNarrowImages(SegmentImages):
    """The model raises on images at least 20x taller than wide, as a model that cannot take a size."""

    def _predict(self, images, sizes):
        real = self.segmenter.predict

        def predict(batch, **kwargs):
            if any(im.shape[0] >= 20 * im.shape[1] for im in batch):
                raise RuntimeError("cannot segment this aspect ratio")
            return real(batch, **kwargs)

        self.segmenter.predict = predict
        try:
            return super()._predict(images, sizes)
        finally:
            self.segmenter.predict = real


class DropsRows(SegmentImages):
    """Loses the rows of images whose file name starts with "lost" (a bug that must not commit a shard)."""

    def __call__(self, batch):
        out = super().__call__(batch)
        keep = np.array(["/lost" not in str(uri) for uri in out["source_uri"]])
        return {k: v[keep] for k, v in out.items()}


class SlowSegmentImages(SegmentImages):
    """Takes a second per batch, so a test can kill the run between two shard commits."""

    def __call__(self, batch):
        time.sleep(1.0)
        return super().__call__(batch)


class DiesOnce(SegmentImages):
    """Kills its own process on its first batch, once per input directory (a marker file beside it)."""

    def __call__(self, batch):
        marker = Path(str(batch["source_uri"][0])).parent.parent / "actor-died.marker"
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)
        return super().__call__(batch)


class DiesAfterWriting(SegmentImages):
    """Writes its block's part files (``encode_in_actor``), then dies, once per input directory: the retried
    block writes the same rows again under new names."""

    def __call__(self, batch):
        parts = super().__call__(batch)
        marker = Path(str(batch["source_uri"][0])).parent.parent / "wrote-then-died.marker"
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)
        return parts


# ------------------------------------------------------------------------------------------------- tests


def test_corrupt_and_odd_inputs_become_error_rows(ray_local, tiny_ckpt, photos, tmp_path):
    src = tmp_path / "in"
    good = small_photos(photos, 2)
    expected = write_photos(src, good)
    jpeg = encode(good[0], "JPEG")
    gray16 = np.linspace(0, 65535, 40 * 30, dtype=np.uint16).reshape(40, 30)
    rgba = np.dstack([good[0], np.full(good[0].shape[:2], 128, np.uint8)])
    # name -> (bytes, status, original (height, width))
    cases = {
        "truncated.jpg": (jpeg[: len(jpeg) // 3], "error", None),
        "random.png": (os.urandom(300), "error", None),
        "zero.png": (b"", "error", None),
        "huge.png": (encode(np.zeros((150, 150, 3), np.uint8), "PNG"), "error", None),  # over max_pixels
        "gray16.png": (encode(gray16, "PNG"), "ok", (40, 30)),
        "rgba.png": (encode(rgba, "PNG"), "ok", good[0].shape[:2]),
        "dot.png": (encode(np.full((1, 1, 3), 200, np.uint8), "PNG"), "ok", (1, 1)),
        "narrow.png": (encode(np.full((200, 4, 3), 90, np.uint8), "PNG"), "error", None),  # the model fails
    }
    status = {}
    for name, (body, want, size) in cases.items():
        (src / name).write_bytes(body)
        expected[(str(src / name), None)] = size
        status[(str(src / name), None)] = want
    broken_tar = tar_bytes({"000.jpg": encode(good[1], "JPEG"), "001.jpg": encode(good[0], "JPEG")})
    first = 512 + -(-len(encode(good[1], "JPEG")) // 512) * 512  # header + data padded to 512-byte blocks
    (src / "broken.tar").write_bytes(broken_tar[: first + 512 + 100])  # cut inside the second member
    out = str(tmp_path / "out")
    job = LabelJob(
        input=str(src), output=out, model=tiny_ckpt, vocabulary=VOCAB, max_pixels=120 * 120, files_per_shard=4
    )
    summary = run(job, model_stage_cls=FailsOnNarrowImages)

    rows = {(r["source_uri"], r["member"]): r for r in check_output_rows(out)}
    tar_rows = [r for key, r in rows.items() if key[0].endswith("broken.tar")]
    assert [r["status"] for r in tar_rows if r["member"] == "000.jpg"] == ["ok"]
    damaged = [r for r in tar_rows if r["member"] != "000.jpg"]
    assert damaged and all(r["status"] == "error" for r in damaged)
    assert {r["error"].split(":")[0] for r in damaged} <= {"read", "decode"}
    rest = {key: r for key, r in rows.items() if not key[0].endswith("broken.tar")}
    assert set(rest) == set(expected)
    reasons = {
        Path(key[0]).name: r["error"].split(":")[0] for key, r in rest.items() if r["status"] == "error"
    }
    assert reasons == {
        "truncated.jpg": "decode",
        "random.png": "decode",
        "zero.png": "empty",
        "huge.png": "too_large",
        "narrow.png": "model",
    }
    assert (
        rest[(str(src / "narrow.png"), None)]["error"]
        == "model: RuntimeError: cannot segment this aspect ratio"
    )
    for key, r in rest.items():
        if status.get(key, "ok") == "ok":
            assert r["status"] == "ok" and (r["height"], r["width"]) == expected[key]
        else:
            assert r["label_map"] is None and r["segments"] is None
    n_errors = len(reasons) + sum(r["status"] == "error" for r in tar_rows)
    assert summary["errors"] == n_errors and summary["ok"] == len(rows) - n_errors
    assert summary["errors_by_reason"]["decode"] == 2 and summary["errors_by_reason"]["model"] == 1


def check_output_rows(out: str) -> list[dict]:
    from tests.pipeline.label.test_run import read_images

    rows = read_images(out).to_pylist()
    assert len({r["image_id"] for r in rows}) == len(rows)
    return rows


def test_lost_rows_leave_their_shard_uncommitted_until_a_rerun(ray_local, tiny_ckpt, photos, tmp_path):
    images = small_photos(photos, 3)
    expected = write_photos(tmp_path / "in", images)
    (tmp_path / "in" / "lost.jpg").write_bytes(encode(images[0], "JPEG"))
    expected[(str(tmp_path / "in" / "lost.jpg"), None)] = images[0].shape[:2]
    out = str(tmp_path / "out")
    job = LabelJob(
        input=str(tmp_path / "in"), output=out, model=tiny_ckpt, vocabulary=VOCAB, files_per_shard=2
    )
    with pytest.raises(IncompleteRunError, match=r"1 shard\(s\)"):
        run(job, model_stage_cls=DropsRows)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["shards_written"] == 1 and list(summary["shards_incomplete"].values()) == [[1, 2]]
    assert len(list((tmp_path / "out" / "_manifest").iterdir())) == 1

    again = run(job)  # the uncommitted shard is done again, the committed one skipped
    assert (again["shards_skipped"], again["shards_written"], again["images"]) == (1, 1, 2)
    check_output(out, expected)


def test_a_rerun_with_another_vocabulary_or_model_is_refused(ray_local, tiny_ckpt, photos, tmp_path):
    write_photos(tmp_path / "in", small_photos(photos, 1))
    out = str(tmp_path / "out")
    job = LabelJob(input=str(tmp_path / "in"), output=out, model=tiny_ckpt, vocabulary=VOCAB, progress=False)
    run(job)
    before = (tmp_path / "out" / "job.json").read_text()
    with pytest.raises(OutputMismatchError, match="vocabulary_id") as refused:
        run(LabelJob(input=job.input, output=out, model=tiny_ckpt, vocabulary="cat,dog"))
    assert "new output" in str(refused.value)
    other = save_tiny(tmp_path / "other.pt", seed=7)
    with pytest.raises(OutputMismatchError, match="model_id"):
        run(LabelJob(input=job.input, output=out, model=other, vocabulary=VOCAB))
    with pytest.raises(OutputMismatchError, match="run_id"):
        run(LabelJob(input=job.input, output=out, model=tiny_ckpt, vocabulary=VOCAB, run_id="mine"))
    assert (tmp_path / "out" / "job.json").read_text() == before
    # Another spelling of the same input and output resumes (here: nothing left to do).
    same = LabelJob(input=job.input + "/", output=f"file://{out}/", model=tiny_ckpt, vocabulary=VOCAB)
    assert run(same)["shards_skipped"] == 1


DRIVER = """
import json, sys
import ray
ray.init(address=sys.argv[1])
from pipeline.label.job import LabelJob
from pipeline.label.run import run
from tests.pipeline.label.test_faults import SlowSegmentImages
run(LabelJob(**json.loads(sys.argv[2])), model_stage_cls=SlowSegmentImages)
"""


def test_a_killed_run_refuses_a_second_run_then_resumes_with_every_image_exactly_once(
    ray_local, s3_server, tiny_ckpt, photos, tmp_path, capsys
):
    """One driver in another process, a second at a second a batch: while it holds the output, a second
    run (the CLI) is refused, naming it; killed part-way (a crash: its lease stays behind, unexpired), the
    rerun takes the output over at once and labels only the shards not committed."""
    from jobs.cli import main

    expected = write_photos(tmp_path / "in", small_photos(photos, 8))
    bucket = s3_server.bucket("resume")
    out = f"s3://{bucket}/out"
    spec = {
        "input": str(tmp_path / "in"),
        "output": out,
        "model": tiny_ckpt,
        "vocabulary": VOCAB,
        "files_per_shard": 1,
        "batch_size": 1,
        "rows_per_block": 1,  # one shard per block, so the run can be cut between two commits
        "progress": False,
    }
    address = ray_local.get_runtime_context().gcs_address
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, address, json.dumps(spec)],
        cwd=REPO,
        start_new_session=True,  # its own process group, killed whole below
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    fs = s3_server.filesystem()
    try:
        deadline = time.monotonic() + 240
        while not listed(fs, f"{bucket}/out/_lease"):
            assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the first run never took the lease"
            time.sleep(0.2)
        argv = [
            "label",
            spec["input"],
            out,
            "--model",
            tiny_ckpt,
            "--vocabulary",
            VOCAB,
            "--files-per-shard",
            "1",
        ]
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ebseg: error: ")
        assert f"pid {driver.pid}" in err[0] and "label run run-" in err[0] and "expires in" in err[0]
        while len(manifests(fs, bucket)) < 2:
            assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no shard was committed in time"
            time.sleep(0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        driver.stderr.close()
    committed = manifests(fs, bucket)
    assert 2 <= len(committed) < 8, "the run must be cut off part-way"
    assert listed(fs, f"{bucket}/out/_lease"), "the killed run's lease stays behind"
    etags = {p: fs.info(p)["ETag"] for p in fs.find(f"{bucket}/out/images") if p.endswith("parquet")}

    # The holder's process is dead on this machine: its lease is taken over at once.
    summary = run(LabelJob(**spec))
    assert summary["shards_skipped"] == len(committed) and summary["shards_written"] == 8 - len(committed)
    assert summary["images"] == 8 - len(committed)
    check_manifests(out, check_output(out, expected))  # every image exactly once, no orphan left
    fs = s3_server.filesystem()
    for path, etag in etags.items():
        if path.split("/")[-2] in committed:
            assert fs.info(path)["ETag"] == etag  # committed shards' parts are not written again
    assert not listed(fs, f"{bucket}/out/_lease")  # released


def listed(fs, directory: str) -> list[str]:
    fs.invalidate_cache()
    try:
        return fs.ls(directory, detail=False)
    except FileNotFoundError:
        return []


def manifests(fs, bucket: str) -> set[str]:
    return {n.rsplit("/", 1)[-1][: -len(".json")] for n in listed(fs, f"{bucket}/out/_manifest")}


def test_a_killed_actor_is_restarted_and_no_image_is_lost(ray_local, tiny_ckpt, photos, tmp_path):
    expected = write_photos(tmp_path / "data" / "in", small_photos(photos, 6))
    out = str(tmp_path / "out")
    job = LabelJob(
        input=str(tmp_path / "data" / "in"),
        output=out,
        model=tiny_ckpt,
        vocabulary=VOCAB,
        files_per_shard=2,
        batch_size=2,
        max_restarts=2,
    )
    summary = run(job, model_stage_cls=DiesOnce)
    assert (tmp_path / "data" / "actor-died.marker").exists()  # the actor really died once
    assert (summary["images"], summary["ok"], summary["shards_written"]) == (6, 6, 3)
    check_output(out, expected)
    manifest_files = list((tmp_path / "out" / "_manifest").iterdir())
    assert len(manifest_files) == 3
    assert storage.read_json(*storage.url_to_fs(str(manifest_files[0])))["rows"] == 2


def test_parts_written_by_a_task_that_then_died_are_never_read_and_are_deleted(
    ray_local, tiny_ckpt, photos, tmp_path
):
    expected = write_photos(tmp_path / "data" / "in", small_photos(photos, 4))
    out = str(tmp_path / "out")
    job = LabelJob(
        input=str(tmp_path / "data" / "in"),
        output=out,
        model=tiny_ckpt,
        vocabulary=VOCAB,
        files_per_shard=4,
        batch_size=2,
        encode_in_actor=True,
        max_restarts=2,
        progress=False,
    )
    summary = run(job, model_stage_cls=DiesAfterWriting)
    assert (tmp_path / "data" / "wrote-then-died.marker").exists()  # parts were written, then the actor died
    assert (summary["images"], summary["ok"], summary["shards_written"]) == (4, 4, 1)
    assert summary["orphans_deleted"] >= 1  # the dead attempt's parts: left out of the manifest, deleted
    check_manifests(out, check_output(out, expected))  # every image once; no file beside the listed ones


# ---------------------------------------------------------------------------------------------- a full disk


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_disk_filling_mid_run_leaves_whole_shards_and_the_rerun_finishes(
    where, ray_local, s3_server, tiny_ckpt, photos, tmp_path, monkeypatch
):
    from pipeline import lease

    expected = write_photos(tmp_path / "in", small_photos(photos, 4))
    out = str(tmp_path / "out") if where == "local" else f"s3://{s3_server.bucket('full')}/out"
    job = LabelJob(
        input=str(tmp_path / "in"), output=out, model=tiny_ckpt, vocabulary=VOCAB, files_per_shard=1,
        batch_size=1, rows_per_block=1, progress=False,
    )  # fmt: skip
    monkeypatch.setattr(lease, "LEASE_TTL_S", 600.0)  # no heartbeat write among the counted ones
    # The driver's writes: the preflight's probe, vocabulary.json, job.json, the lease, then one manifest per
    # shard. After the sixth the disk is full: two shards commit, the other two cannot.
    storage.reset_write_count()
    monkeypatch.setenv(storage.FAIL_WRITES_AFTER_ENV, "6")
    with pytest.raises(OSError, match="No space left on device"):
        run(job)
    monkeypatch.delenv(storage.FAIL_WRITES_AFTER_ENV)
    fs, root = storage.url_to_fs(out)
    fs.invalidate_cache()
    committed = fs.ls(storage.join(root, "_manifest"), detail=False)
    assert 1 <= len(committed) < 4, committed
    partial = check_manifests(out, check_output_rows_table(out))  # committed shards are whole and readable
    assert len(partial) == len(committed)
    assert not fs.exists(storage.join(root, "summary.json"))

    again = run(job)
    assert (again["shards_skipped"], again["shards_written"]) == (len(committed), 4 - len(committed))
    check_manifests(out, check_output(out, expected))  # every image once, no orphan left


def check_output_rows_table(out: str):
    from tests.pipeline.label.test_run import read_images

    table = read_images(out)
    assert len(set(table.column("image_id").to_pylist())) == table.num_rows  # no image twice
    return table
