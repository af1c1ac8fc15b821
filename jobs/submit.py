"""``ebseg submit / status / logs``: run a spec on a Ray cluster through the Ray Jobs API.

A submitted job's driver runs ``python -m jobs <kind> --spec spec.yaml`` on the head node, in a runtime
environment whose working directory holds the spec (and a local vocabulary file it names) and, unless the
cluster image already has the right version (``--no-package``), this checkout's ``ebseg``, ``pipeline`` and
``jobs`` packages as ``py_modules``: the cluster runs the code the user validated against. Dependencies
(torch, Ray, ...) come from the cluster's image.

Nothing secret travels: the runtime environment carries no environment variables, and specs refuse
credentials; the cluster's nodes take S3 settings from their own environment (a Kubernetes Secret, an
instance role). Ray 2.60 heads require a token: when ``RAY_AUTH_MODE`` is unset and a token is available
(``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) the client turns token mode on.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from jobs.specs import dump_spec, parse_spec

# Fields that name local files or directories the cluster's driver must find (made absolute when local).
PATH_FIELDS = ("input", "output", "source", "data", "val_data", "storage", "model")
PACKAGES = ("ebseg", "pipeline", "jobs")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_S = 60.0  # how long a submission waits for a new head's job agent


class SubmitError(RuntimeError):
    """The job could not be submitted or followed (no address, cluster unreachable, unknown job id)."""


def enable_token_auth() -> bool:
    """Turn Ray's token mode on for this process when the user has a token and said nothing else."""
    if "RAY_AUTH_MODE" in os.environ:
        return os.environ["RAY_AUTH_MODE"].lower() == "token"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or Path(path).is_file():
        os.environ["RAY_AUTH_MODE"] = "token"
        return True
    return False


def client(address: str | None):
    """A ``JobSubmissionClient`` for ``address`` (default ``$RAY_ADDRESS``)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    enable_token_auth()
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # connection refused, wrong token, not a Jobs API: Ray raises several kinds
        raise SubmitError(f"cannot use the Ray Jobs API at {address}: {type(e).__name__}: {e}") from e


def _is_local(value: str) -> bool:
    return "://" not in value or value.startswith("file://")


@dataclass(frozen=True)
class Bundle:
    """What travels with a job: the rewritten spec in a working directory, and notes for the user."""

    spec: Any
    working_dir: Path
    notes: tuple[str, ...]


def bundle_spec(spec, workdir: Path) -> Bundle:
    """Write ``spec`` into ``workdir`` as the cluster will read it.

    Relative local paths are made absolute (the driver's working directory is a temporary copy, not the
    user's), and a local vocabulary file is copied in, since it is needed to name the classes.
    """
    data = spec.model_dump(mode="json", exclude_unset=True)
    notes: list[str] = []
    for name in PATH_FIELDS:
        value = data.get(name)
        if not isinstance(value, str) or not _is_local(value):
            continue
        path = value.removeprefix("file://")
        if name == "model" and not Path(path).exists():
            continue  # a preset name (tiny, demo, base, large)
        if not os.path.isabs(path):
            data[name] = os.path.abspath(path)
        notes.append(f"{spec.kind}.{name}: local path {data[name]} must exist on the cluster's nodes")
    vocabulary = data.get("vocabulary")
    if isinstance(vocabulary, str) and Path(vocabulary).is_file():
        target = workdir / ("vocabulary" + (Path(vocabulary).suffix or ".json"))
        shutil.copyfile(vocabulary, target)
        data["vocabulary"] = target.name
    rewritten = parse_spec({**data, "kind": spec.kind}, source="submitted spec")
    (workdir / "spec.yaml").write_text(dump_spec(rewritten), encoding="utf-8")
    return Bundle(spec=rewritten, working_dir=workdir, notes=tuple(notes))


def runtime_env(workdir: Path, *, carry_package: bool) -> dict[str, Any]:
    env: dict[str, Any] = {"working_dir": str(workdir)}
    if carry_package:
        import importlib

        env["py_modules"] = [str(Path(importlib.import_module(p).__file__).parent) for p in PACKAGES]
        env["excludes"] = ["__pycache__", "*.pyc"]
    return env


def submit(
    spec,
    *,
    address: str | None,
    carry_package: bool = True,
    job_id: str | None = None,
    out: TextIO = sys.stderr,
) -> tuple[Any, str]:
    """Submit ``spec``; return (client, job id)."""
    jobs_client = client(address)
    with tempfile.TemporaryDirectory(prefix="ebseg-submit-") as tmp:
        bundle = bundle_spec(spec, Path(tmp))
        for note in bundle.notes:
            print(f"ebseg: note: {note}", file=out)
        entrypoint = f"python -m jobs {spec.kind} --spec spec.yaml"
        env = runtime_env(Path(tmp), carry_package=carry_package)
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                submitted = jobs_client.submit_job(
                    entrypoint=entrypoint,
                    submission_id=job_id,
                    runtime_env=env,
                    metadata={"ebseg_kind": spec.kind},
                )
                break
            except (RuntimeError, ValueError) as e:
                # A head that has just started answers HTTP before its job agent has registered.
                if "No available agent" in str(e) and time.monotonic() < deadline:
                    time.sleep(2.0)
                    continue
                raise SubmitError(f"the cluster refused the job: {e}") from e
    return jobs_client, submitted


def stream_logs(jobs_client, job_id: str, out: TextIO = sys.stdout) -> None:
    """Print the job's log as it grows, until the job ends."""

    async def tail() -> None:
        async for lines in jobs_client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())


def wait(jobs_client, job_id: str, *, poll_s: float = 1.0) -> str:
    """Block until the job reaches a terminal status; return it."""
    while True:
        status = str(jobs_client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def describe(jobs_client, job_id: str) -> dict[str, Any]:
    try:
        info = jobs_client.get_job_info(job_id)
    except RuntimeError as e:
        raise SubmitError(f"no job {job_id!r} on this cluster ({e})") from e
    return {
        "job_id": job_id,
        "status": str(info.status.value),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "kind": (info.metadata or {}).get("ebseg_kind"),
    }


__all__ = ["SubmitError", "bundle_spec", "client", "describe", "stream_logs", "submit", "wait"]
