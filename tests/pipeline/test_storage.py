"""Storage helpers on a local directory and on the S3 test server (configured from the environment only)."""

from __future__ import annotations

import pytest

from pipeline import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    s3 = request.getfixturevalue("s3_server")
    return f"s3://{s3.bucket('storage')}/out"


def test_atomic_write_and_read_back(root):
    fs, path = storage.url_to_fs(root)
    target = storage.join(path, "a", "b.json")
    storage.write_json_atomic(fs, target, {"x": 1})
    assert storage.read_json(fs, target) == {"x": 1}
    storage.write_bytes_atomic(fs, target, b"replaced")
    assert fs.cat_file(target) == b"replaced"
    # No temporary file is left beside the target.
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(storage.join(path, "a"), detail=False)] == ["b.json"]


def test_full_uri_names_the_same_object(root):
    fs, path = storage.url_to_fs(root)
    storage.write_bytes_atomic(fs, storage.join(path, "x.bin"), b"1")
    uri = storage.full_uri(fs, storage.join(path, "x.bin"))
    fs2, path2 = storage.url_to_fs(uri)
    assert fs2.cat_file(path2) == b"1"
    assert uri.startswith("s3://") == root.startswith("s3://")
