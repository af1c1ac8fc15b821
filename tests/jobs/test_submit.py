"""``ebseg submit / status / logs`` against a real Ray head started for this module with ``ray start --head``.

The head listens on loopback only, with token authentication on (a token file made for the test, so the
user's ``~/.ray`` is neither read nor written), and is stopped afterwards. The client finds the token the way
a user's would (``RAY_AUTH_TOKEN_PATH``); without it the cluster refuses the client.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ebseg.data.shapes import write_shapes

BIN = Path(sys.executable).parent
EBSEG = BIN / "ebseg"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the head's `python` is this venv's
    env["OMP_NUM_THREADS"] = "1"
    return {**env, **extra}


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A single-node Ray cluster on loopback: yields (dashboard URL, client environment)."""
    tmp = tmp_path_factory.mktemp("head")
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    port, dashboard = free_port(), free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=4",
           "--disable-usage-stats"]  # fmt: skip
    # Every other Ray on this machine (the session's local one) already holds the agents' default ports:
    # a head given the defaults never gets a job agent ("No available agent to submit job").
    for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                 "runtime-env-agent-port"):  # fmt: skip
        cmd.append(f"--{flag}={free_port()}")
    log = open(tmp / "head.log", "w")  # noqa: SIM115 (closed in teardown)
    # Its own process group: stopping the group stops exactly this head (not `ray stop`, which would stop
    # every Ray on the machine, the test session's own included).
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
        except urllib.error.HTTPError:
            break  # 401: the dashboard is up and wants the token
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"ray head did not start: {(tmp / 'head.log').read_text()[-2000:]}"
                ) from None
            time.sleep(0.5)
        else:
            break
    client_env = _env(RAY_AUTH_TOKEN_PATH=str(token))  # RAY_AUTH_MODE left unset: the CLI turns token mode on
    yield url, client_env
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever the node's drain left running
    proc.wait()
    log.close()
    # `ray start` records its head for later `ray.init()` calls on this machine; that head is gone now.
    current = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
    if current.is_file() and current.read_text().strip().endswith(f":{port}"):
        current.unlink()


def ebseg(*args: str, env: dict[str, str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(EBSEG), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )


def test_submit_wait_runs_a_label_job_on_the_cluster(head, tmp_path):
    url, env = head
    write_shapes(str(tmp_path / "shapes"), count=6, seed=3, size=128)
    # Relative paths, as a user writes them: submit makes them absolute and ships the vocabulary file.
    (tmp_path / "label.yaml").write_text(
        "kind: label\ninput: shapes/images\noutput: out\nvocabulary: shapes/vocabulary.json\nmodel: demo\n"
    )
    result = ebseg("submit", "label.yaml", "--address", url, "--wait", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    job_id = result.stdout.splitlines()[0]
    assert job_id.startswith("raysubmit_")
    assert "labelled 6 images" in result.stdout  # the driver's log, streamed
    assert f"job {job_id} succeeded" in result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["ok"] == 6 and summary["errors"] == 0

    status = ebseg("status", job_id, "--address", url, env=env, cwd=tmp_path)
    assert status.returncode == 0 and "status: SUCCEEDED" in status.stdout
    assert "entrypoint: python -m jobs label --spec spec.yaml" in status.stdout
    logs = ebseg("logs", job_id, "--address", url, env=env, cwd=tmp_path)
    assert logs.returncode == 0 and "labelled 6 images" in logs.stdout

    query = ebseg(
        "query", "out", "SELECT count(*) AS n FROM images", "--format", "json", env=env, cwd=tmp_path
    )
    assert json.loads(query.stdout) == [{"n": 6}]


def test_a_failing_job_exits_non_zero(head, tmp_path):
    url, env = head
    (tmp_path / "bad.yaml").write_text(
        f"kind: label\ninput: {tmp_path / 'missing'}\noutput: {tmp_path / 'out'}\nvocabulary: 'cat,dog'\n"
    )
    result = ebseg("submit", "bad.yaml", "--address", url, "--wait", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert "not found" in result.stdout  # the driver's own error, streamed from the job's log
    assert "failed" in result.stderr


def test_the_cluster_refuses_a_client_without_its_token(head, tmp_path):
    url, env = head
    wrong = tmp_path / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    for client_env in ({**env, "RAY_AUTH_TOKEN_PATH": str(wrong)}, {**env, "RAY_AUTH_MODE": "disabled"}):
        result = ebseg("status", "raysubmit_x", "--address", url, env=client_env, cwd=tmp_path, timeout=60)
        assert result.returncode == 1
        assert "cannot use the Ray Jobs API" in result.stderr


def test_unknown_job_and_missing_address(head, tmp_path):
    url, env = head
    result = ebseg("status", "raysubmit_nope", "--address", url, env=env, cwd=tmp_path, timeout=60)
    assert result.returncode == 1 and "no job 'raysubmit_nope'" in result.stderr
    (tmp_path / "s.yaml").write_text("kind: label\ninput: a\noutput: b\nvocabulary: x,\n")
    result = ebseg("submit", "s.yaml", env=env, cwd=tmp_path, timeout=60)
    assert result.returncode == 1 and "pass --address" in result.stderr
