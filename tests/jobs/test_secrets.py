"""No credential value in anything the project writes or says: a labelling run on moto S3 with credentials in
its storage options (the Python API, where nothing refuses them), ``ebseg train`` on local disk with
credentials in the environment, and commands given URLs that carry ``user:password@``; then every
byte of every file written (job.json, manifests, records, summary, report, metrics, checkpoints, Ray Train's
own files), every Parquet value, the captured stdout/stderr and the error messages are searched."""

from __future__ import annotations

import contextlib
import io
import os
import traceback

import numpy as np
import pyarrow.parquet as pq
import pytest

from ebseg.data import write_shapes
from jobs import cli
from pipeline import storage
from pipeline.label.job import LabelJob
from pipeline.label.run import run as run_label
from tests.pipeline.label.test_segment import save_tiny
from tests.pipeline.pairs_support import encode_image

KEY_ID = "AKIAEBSEGLEAKTEST01"
SECRET = "ebseg-secret-7c1f9e2d4b"
URL_PASSWORD = "url-pass-31415926"
SECRETS = (KEY_ID, SECRET, URL_PASSWORD)


def leaks_in_bytes(data: bytes) -> list[str]:
    return [s for s in SECRETS if s.encode() in data]


def leaks_in_files(fs, root: str) -> dict[str, list[str]]:
    """{file: secrets found} over every file under ``root``: raw bytes, and Parquet values decoded (a
    compressed column could hide a string from a byte search)."""
    found = {}
    files = [p for p in fs.find(root)]
    assert files, f"nothing written under {root}"
    for path in files:
        data = fs.cat_file(path)
        leaks = leaks_in_bytes(data)
        if path.endswith(".parquet"):
            leaks += leaks_in_bytes(repr(pq.read_table(io.BytesIO(data)).to_pylist()).encode())
        if leaks:
            found[path] = sorted(set(leaks))
    return found


def cli_run(argv: list[str]) -> tuple[int | str, str]:
    """(exit status, all it printed); an exception that escapes counts with the traceback Python prints."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = e.code
        except Exception:
            code, _ = "raised", err.write(traceback.format_exc())
    return code, out.getvalue() + err.getvalue()


def write_photos(fs, root: str, count: int = 3) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        image = rng.integers(0, 256, size=(40 + 8 * i, 56, 3), dtype=np.uint8)
        fs.pipe_file(f"{root}/img{i}.png", encode_image(image, "PNG"))


def test_redact_hides_user_and_password_of_every_url():
    text = f"cannot read ftp://bob:{URL_PASSWORD}@host:21/a and s3://{KEY_ID}:{SECRET}@bucket/k, s3://b/x@y"
    assert storage.redact(text) == "cannot read ftp://***@host:21/a and s3://***@bucket/k, s3://b/x@y"
    assert storage.redact("http://h?q=a@b https://h#x@y") == "http://h?q=a@b https://h#x@y"  # not userinfo


def test_label_on_s3_with_credentials_in_storage_options_writes_none(ray_local, s3_server, tmp_path, capfd):
    bucket = s3_server.bucket("secrets")
    fs = s3_server.filesystem()
    write_photos(fs, f"{bucket}/in")
    job = LabelJob(
        input=f"s3://{bucket}/in",
        output=f"s3://{bucket}/out",
        vocabulary="cat,dog",
        model=save_tiny(tmp_path / "tiny.pt"),
        storage_options={"key": KEY_ID, "secret": SECRET},  # moto accepts any credentials
    )
    summary = run_label(job)
    assert summary["ok"] == 3
    assert leaks_in_files(s3_server.filesystem(), f"{bucket}/out") == {}
    assert leaks_in_bytes(repr(summary).encode() + capfd.readouterr().out.encode()) == []
    assert KEY_ID not in repr(job) and SECRET not in repr(job)


def test_cli_train_with_credentials_in_the_environment_writes_none(ray_local, tmp_path, monkeypatch):
    """``ebseg train --model demo`` for 2 steps on the shapes set, as the README's users would run it."""
    for name, value in (("AWS_ACCESS_KEY_ID", KEY_ID), ("AWS_SECRET_ACCESS_KEY", SECRET)):
        monkeypatch.setenv(name, value)  # this process only: the workers keep the test server's
    data = tmp_path / "pairs"
    write_shapes(str(data), count=4, seed=0, size=64)
    code, said = cli_run(
        ["train", "--name", "r", "--storage", str(tmp_path / "runs"), "--data", str(data), "--model", "demo",
         "--steps", "2", "--workers", "1", "--batch-size", "2", "--checkpoint-every", "1", "--loss", "tiny",
         "--augment", "small", "--crop-size", "64", "--trainable", "all", "--cpus-per-worker", "0.5"]
    )  # fmt: skip
    assert code == 0, said
    assert "trained r to step 2" in said
    assert leaks_in_files(storage.url_to_fs(str(tmp_path))[0], str(tmp_path / "runs")) == {}
    assert os.path.exists(tmp_path / "runs" / "r" / "checkpoint_00000002" / "model.pt")
    assert leaks_in_bytes(said.encode()) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["label", f"ftp://user:{URL_PASSWORD}@127.0.0.1:9/in", "out", "--vocabulary", "a,b"],
        ["label", "in", f"s3://{KEY_ID}:{SECRET}@bucket/out", "--vocabulary", "a,b", "--batch-size", "0"],
        ["train", "--name", f"https://u:{URL_PASSWORD}@h/x", "--storage", "s", "--data", "d"],
        ["train", "--name", "r", "--storage", "s", "--data", "d", "--storage-option", f"secret={SECRET}"],
        ["eval", "--data", "d", "--output", "o", "--storage-option", f"endpoint_url=http://u:{URL_PASSWORD}@h",
         "--batch-size", "-1"],
    ],
)  # fmt: skip
def test_refusals_and_errors_never_quote_a_credential(ray_local, argv):
    code, said = cli_run(argv)
    assert code in (1, 2) and "Traceback" not in said, said
    assert leaks_in_bytes(said.encode()) == [], said
