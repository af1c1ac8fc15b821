"""The chaos run, one short round: processes are killed, S3 faults are injected, and the committed output
still holds every image exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def test_one_chaos_round_loses_and_duplicates_nothing():
    env = {**os.environ, "RAY_agent_register_timeout_ms": "120000", "PYTHONPATH": str(REPO)}
    # The driver dies right after its first manifest (--driver-death hook), so its rerun has the other 9
    # shards to do while an actor and a worker are killed (within 0.2 s of one existing). With a kill from
    # outside, a quiet machine could commit every shard before it landed: no rerun work, nothing to kill.
    args = ["--rounds", "1", "--images", "80", "--files-per-shard", "8", "--fault-rate", "0.1", "--json"]
    args += ["--kill-within", "0.2", "--driver-death", "hook"]
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "chaos.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["rounds"] == 1 and report["per_round"][0]["records"] == 80
    assert (report["images_lost"], report["images_duplicated"]) == (0, 0)
    assert report["kills"]["driver"] == 1 and report["driver_runs"] >= 2  # killed once, then rerun
    assert report["kills"]["actor"] + report["kills"]["worker"] >= 1
    assert sum(report["s3_faults"].values()) >= 1
