"""A labelling job that cannot finish is refused in one line before the lease and before Ray: an output that
cannot be written (a file in the way, permission denied, a missing bucket, a full disk), an empty or
unreadable input, a class name too long for the text encoder, a missing model. Nothing is written."""

from __future__ import annotations

import os

import boto3
import pytest

from pipeline import storage
from pipeline.label.job import LabelJob
from pipeline.label.preflight import PreflightError, preflight
from pipeline.label.run import run

LONG_NAME = " ".join(["very"] * 70) + " long name"


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """(input prefix, output root) on local disk or on the moto S3 server; the input holds one image."""
    if request.param == "local":
        (tmp_path / "in").mkdir()
        (tmp_path / "in" / "a.png").write_bytes(b"not even an image: the run would make it an error row")
        return str(tmp_path / "in"), str(tmp_path / "out")
    s3 = request.getfixturevalue("s3_server")
    bucket = s3.bucket("pre")
    boto3.client("s3").put_object(Bucket=bucket, Key="in/a.png", Body=b"bytes")
    return f"s3://{bucket}/in", f"s3://{bucket}/out"


def refused(job: LabelJob, match: str) -> str:
    """Run ``job``, expect a PreflightError matching ``match`` before Ray was asked for; its message."""
    asked = []
    with pytest.raises(PreflightError, match=match) as error:
        run(job, connect=lambda: asked.append("ray"))
    assert not asked
    message = str(error.value)
    assert "\n" not in message
    return message


def nothing_under(uri: str) -> bool:
    fs, root = storage.url_to_fs(uri)
    fs.invalidate_cache()
    return not fs.exists(root) or not fs.find(root)


def test_a_job_that_can_run_passes_and_returns_its_plan(where):
    src, out = where
    plan = preflight(LabelJob(input=src, output=out, model="tiny", vocabulary="cat,dog"))
    assert plan.vocabulary.names == ("cat", "dog") and plan.model.context_length == 77
    assert nothing_under(out)  # the probe is gone


def test_a_class_name_too_long_for_the_text_encoder(where):
    src, out = where
    job = LabelJob(input=src, output=out, model="tiny", vocabulary=f"cat,{LONG_NAME}")
    message = refused(job, "1 class name")
    assert "77 tokens" in message and "'very very" in message
    assert nothing_under(out)


def test_an_empty_input(where, tmp_path):
    src, out = where
    fs, path = storage.url_to_fs(src)
    fs.rm(path, recursive=True)
    if storage.is_local(fs):
        os.mkdir(path)  # there, but empty
    refused(LabelJob(input=src, output=out, model="tiny", vocabulary="cat,"), "input .* cannot be listed")
    assert nothing_under(out)


def test_a_full_disk(where, monkeypatch):
    src, out = where
    monkeypatch.setenv(storage.FAIL_WRITES_AFTER_ENV, "0")
    message = refused(LabelJob(input=src, output=out, model="tiny", vocabulary="cat,"), "is not writable")
    assert "No space left on device" in message
    assert nothing_under(out)


def test_a_missing_bucket_is_an_error_not_created(s3_server):
    bucket = s3_server.bucket("pre")
    boto3.client("s3").put_object(Bucket=bucket, Key="in/a.png", Body=b"bytes")
    job = LabelJob(
        input=f"s3://{bucket}/in", output="s3://no-such-bucket-ebseg/out", model="tiny", vocabulary="c,"
    )
    refused(job, r"output 's3://no-such-bucket-ebseg/out' is not writable: FileNotFoundError")
    names = [b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]]
    assert "no-such-bucket-ebseg" not in names


def test_an_unreadable_first_input_file(s3_server, tmp_path):
    bucket = s3_server.bucket("pre")
    client = boto3.client("s3")
    # Archived objects are listed but cannot be read until restored.
    client.put_object(Bucket=bucket, Key="in/a.png", Body=b"bytes", StorageClass="GLACIER")
    client.put_object(Bucket=bucket, Key="in/b.png", Body=b"bytes")
    job = LabelJob(input=f"s3://{bucket}/in", output=str(tmp_path / "out"), model="tiny", vocabulary="c,")
    refused(job, rf"the first file, s3://{bucket}/in/a.png, cannot be read: PermissionError")
    assert nothing_under(str(tmp_path / "out"))


def test_an_output_under_a_file(tmp_path, where):
    src, _ = where
    (tmp_path / "taken").write_text("a file where the output's parent directory should be")
    job = LabelJob(input=src, output=str(tmp_path / "taken" / "out"), model="tiny", vocabulary="cat,")
    refused(job, "is not writable: (NotADirectoryError|FileExistsError)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_permission_denied(tmp_path, where):
    src, _ = where
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    job = LabelJob(input=src, output=str(locked / "out"), model="tiny", vocabulary="cat,")
    refused(job, "is not writable: PermissionError")


def test_a_missing_model(where, tmp_path):
    src, out = where
    job = LabelJob(input=src, output=out, model=str(tmp_path / "nope.pt"), vocabulary="cat,")
    refused(job, "model .* cannot be used: FileNotFoundError")
    assert nothing_under(out)


def test_the_cli_refuses_in_one_line_and_starts_no_ray(where, capsys, monkeypatch):
    from jobs.cli import main

    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # what main() would set before a local Ray; restored after
    src, out = where
    assert main(["label", src, out, "--model", "tiny", "--vocabulary", f"cat,{LONG_NAME}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ebseg: error: vocabulary: 1 class name(s) do not fit")
    assert not any("Ray" in line for line in err)  # neither "started an embedded local Ray" nor Ray's lines
    assert nothing_under(out)
