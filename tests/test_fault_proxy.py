"""The fault proxy (``tests/fault_proxy.py``) in front of the moto S3 server: it injects and counts every kind
of fault, the S3 client's retries get every object through, and a manifest PUT applied upstream whose answer
was dropped is the run's own commit, not a race it lost."""

from __future__ import annotations

import s3fs

from pipeline import storage
from pipeline.label.commit import ShardCommitter
from tests.fault_proxy import KINDS, FaultProxy
from tests.pipeline.label.test_run import model_rows, writer_for


def client(proxy: FaultProxy) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=proxy.url)


def test_every_fault_is_injected_and_counted_and_retries_get_through(s3_server):
    bucket = s3_server.bucket("proxy")
    with FaultProxy(s3_server.endpoint_url, rate=0.3, seed=1) as proxy:
        fs = client(proxy)
        blobs = {f"{bucket}/k/{i:02d}": bytes([i]) * (100 + i) for i in range(30)}
        for path, data in blobs.items():
            storage.write_bytes_atomic(fs, path, data)
        fs.invalidate_cache()
        assert sorted(fs.ls(f"{bucket}/k", detail=False)) == sorted(blobs)
        assert {p: fs.cat_file(p) for p in blobs} == blobs
        faults = proxy.faults()
    assert set(faults) == set(KINDS) and all(faults[k] > 0 for k in KINDS), faults
    assert proxy.counts["forwarded"] >= 61  # every write and every read reached the server in the end
    assert {p: s3_server.filesystem().cat_file(p) for p in blobs} == blobs  # the server holds what was sent


def test_a_manifest_applied_upstream_whose_answer_was_dropped_is_our_commit(s3_server):
    bucket = s3_server.bucket("dropped")
    out = f"s3://{bucket}/out"
    parts = writer_for(out)(model_rows("s0", [0, 1], 2))
    manifest_put = lambda method, path: method == "PUT" and "/_manifest/" in path  # noqa: E731
    with FaultProxy(
        s3_server.endpoint_url, rate=1.0, kinds=("drop_after",), only=manifest_put, limit=1
    ) as proxy:
        # The manifest's exclusive PUT is applied, its answer lost; the client's retry finds the key taken.
        fs = client(proxy)
        with ShardCommitter(f"{bucket}/out", fs=fs, expected_shards=["s0"]) as committer:
            committer.add(parts)
            report = committer.close()
    assert proxy.faults()["drop_after"] == 1
    assert report.lost_races == [] and [m["shard_id"] for m in report.manifests] == ["s0"]
