"""The output's lease (``pipeline.lease``), on local disk and on the moto S3 server: one run at a time, a
live holder named in the refusal, an expired or dead holder taken over, a lost lease that stops commits."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from pipeline import lease, storage
from pipeline.label.commit import ShardCommitter
from pipeline.lease import LeaseHeldError, LeaseLostError, acquire
from tests.pipeline.label.test_run import model_rows, writer_for


@pytest.fixture(params=["local", "s3"])
def out_root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    return f"s3://{request.getfixturevalue('s3_server').bucket('lease')}/out"


def lease_names(fs, root: str) -> list[str]:
    fs.invalidate_cache()
    try:
        return sorted(n.rsplit("/", 1)[-1] for n in fs.ls(storage.join(root, lease.LEASE_DIR), detail=False))
    except FileNotFoundError:
        return []


def plant(fs, root: str, generation: int, **fields) -> None:
    """A lease object as another run (another machine, or a process now dead) left it."""
    now = time.time()
    record = {
        "run_id": "run-other",
        "host": "other-host",
        "pid": 4242,
        "kind": "label",
        "token": "t-other",
        "started": now - 100,
        "expires": now + 60,
        **fields,
    }
    path = storage.join(root, lease.LEASE_DIR, f"{generation:08d}.json")
    storage.write_bytes_atomic(fs, path, json.dumps(record).encode())


def test_acquire_writes_the_holder_and_release_deletes_it(out_root):
    fs, root = storage.url_to_fs(out_root)
    with acquire(fs, root, run_id="run-a", kind="label") as held:
        assert lease_names(fs, root) == ["00000001.json"]
        record = json.loads(fs.cat_file(held.path))
        assert (record["run_id"], record["host"]) == ("run-a", socket.gethostname())
        assert record["pid"] == os.getpid()
        assert record["expires"] - record["started"] == pytest.approx(lease.LEASE_TTL_S)
        held.check()
    assert lease_names(fs, root) == []
    with acquire(fs, root, run_id="run-b", kind="label"):  # a released output is free at once
        assert len(lease_names(fs, root)) == 1


def test_a_live_holder_is_named_in_the_refusal(out_root):
    fs, root = storage.url_to_fs(out_root)
    with acquire(fs, root, run_id="run-a", kind="label") as held:
        with pytest.raises(LeaseHeldError) as refused:
            acquire(fs, root, run_id="run-b", kind="label")
        message = str(refused.value)
        assert "label run run-a" in message and socket.gethostname() in message
        assert f"pid {os.getpid()}" in message and "expires in" in message and "since" in message
        held.check()  # the refused run changed nothing
    fs, root = storage.url_to_fs(out_root)
    plant(fs, root, 1)  # a live run on another machine
    with pytest.raises(LeaseHeldError, match=r"run-other \(host other-host, pid 4242"):
        acquire(fs, root, run_id="run-b", kind="label")


def test_the_heartbeat_keeps_a_short_lease_alive(out_root, monkeypatch):
    monkeypatch.setattr(lease, "LEASE_TTL_S", 0.8)
    fs, root = storage.url_to_fs(out_root)
    with acquire(fs, root, run_id="run-a", kind="label") as held:
        first = json.loads(fs.cat_file(held.path))["expires"]
        time.sleep(2.0)  # 2.5 TTLs: only the heartbeat keeps it
        held.check()
        assert json.loads(fs.cat_file(held.path))["expires"] > first + 1.0
        with pytest.raises(LeaseHeldError):
            acquire(fs, root, run_id="run-b", kind="label")


def test_an_expired_lease_is_taken_over(out_root):
    fs, root = storage.url_to_fs(out_root)
    plant(fs, root, 3, expires=time.time() - 1)  # a run on another machine that stopped beating
    with acquire(fs, root, run_id="run-b", kind="label") as held:
        assert held.generation == 4 and lease_names(fs, root) == ["00000004.json"]  # the dead one dropped
    assert lease_names(fs, root) == []


def test_a_dead_process_on_this_machine_is_taken_over_at_once(out_root):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    pid = int(dead.stdout)
    fs, root = storage.url_to_fs(out_root)
    plant(fs, root, 1, host=socket.gethostname(), pid=pid)  # unexpired, but its process is gone
    with acquire(fs, root, run_id="run-b", kind="label") as held:
        assert held.generation == 2


def test_two_runs_taking_over_at_once_one_wins(out_root):
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    fs, root = storage.url_to_fs(out_root)
    plant(fs, root, 1, expires=time.time() - 1)
    start = Barrier(4)

    def take(run_id: str):
        start.wait()
        try:
            return acquire(storage.url_to_fs(out_root)[0], root, run_id=run_id, kind="label")
        except LeaseHeldError as e:
            return e

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(take, [f"run-{i}" for i in range(4)]))
    won = [r for r in results if not isinstance(r, LeaseHeldError)]
    assert len(won) == 1 and won[0].generation == 2
    for refused in results:
        if isinstance(refused, LeaseHeldError):
            assert "was taken by another run" in str(refused) or won[0].holder.run_id in str(refused)
    won[0].release()


def test_a_lost_lease_stops_commits(out_root):
    write = writer_for(out_root)
    fs, root = storage.url_to_fs(out_root)
    held = acquire(fs, root, run_id="run-a", kind="label")
    # Another run took the output over (this one was paused past its expiry, say).
    plant(fs, root, 2, run_id="run-b")
    with pytest.raises(LeaseLostError, match="run-b"):
        held.check()
    with (
        pytest.raises(LeaseLostError, match="lost its lease"),
        ShardCommitter(root, fs=fs, expected_shards=["s-a"], guard=held.check) as committer,
    ):
        committer.add(write(model_rows("s-a", [0, 1], 2)))
        committer.close()
    fs, root = storage.url_to_fs(out_root)
    fs.invalidate_cache()
    assert not fs.exists(storage.join(root, "_manifest", "s-a.json"))
    held.release()  # leaves the new holder's object alone
    assert lease_names(fs, root) == ["00000001.json", "00000002.json"]


def test_a_lease_not_renewed_within_its_ttl_is_lost(out_root, monkeypatch):
    monkeypatch.setattr(lease, "LEASE_TTL_S", 0.6)
    fs, root = storage.url_to_fs(out_root)
    with acquire(fs, root, run_id="run-a", kind="label") as held:
        # The store refuses every write from now on (a full disk): the heartbeat cannot renew.
        monkeypatch.setenv(storage.FAIL_WRITES_AFTER_ENV, "0")
        time.sleep(1.0)
        with pytest.raises(LeaseLostError, match=r"not renewed for 0\.6 s"):
            held.check()
