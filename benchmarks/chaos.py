"""A chaos run: labelling that must give every image exactly once while processes die and S3 misbehaves.

Usage::

    python benchmarks/chaos.py --rounds 20 --images 200 [--seed 0] [--fault-rate 0.05] [--kill-within 1] \\
        [--driver-death signal|hook] [--json]

Writes ``--images`` shapes images (64x64 PNGs, ``ebseg.data.shapes``) to a temporary folder, starts a
local Ray (``pipeline.cluster``'s local mode, with its dashboard for the state API) and a moto S3 server
behind the fault proxy (``tests/fault_proxy.py``: 503 SlowDown, 500 InternalError, connections dropped
before forwarding and after the request was applied, each at ``--fault-rate / 4`` of requests). Then, per
round, into a fresh ``s3://chaos/round-NN`` output, the labelling job (``pipeline.label.run.run``, the
``demo`` model, 2 model actors) runs as a driver subprocess while a loop kills, with SIGKILL:

- the driver, once its first shard is committed (then it is run again); with ``--driver-death hook`` it
  dies by itself right after creating its first manifest (``pipeline.label.diehook``'s ``after-manifest``,
  ``os._exit``), so its rerun always has all the other shards to do;
- a model actor (a ``MapWorker(...)`` from ``ray.util.state.list_actors``) and a task worker (a worker process
  from ``list_workers`` that is neither an actor nor a driver), at random times of the next run (the
  driver is paused, SIGSTOP, while the target is looked up and killed).

The driver is rerun until it exits 0 (a run that fails after too many deaths counts as a rerun too). Then
the committed output (the files the manifests list, ``pipeline.layout.committed_files``, read past the
proxy) is compared with the input: images lost (an input file with no record) and duplicated (records
beyond one per image id). Reports rounds, kills by kind, S3 faults injected by kind, driver runs, lost,
duplicated and wall time (``--json``: one line).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from pipeline.label.diehook import DIE_AT_ENV, DIE_EXIT_CODE  # noqa: E402
from tests.fault_proxy import FaultProxy  # noqa: E402

KINDS = ("driver", "actor", "worker")
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "chaos",
    "AWS_SECRET_ACCESS_KEY": "chaos",
    "AWS_DEFAULT_REGION": "us-east-1",
}
BUCKET = "chaos"
MAX_DRIVER_RUNS = 12  # per round; more means the job cannot finish under these faults: an error

DRIVER = """
import json, sys
import ray
ray.init(address=sys.argv[1], runtime_env={"env_vars": json.loads(sys.argv[3])}, log_to_driver=False)
from pipeline.label.job import LabelJob
from pipeline.label.run import run
run(LabelJob(**json.loads(sys.argv[2])))
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fault-rate", type=float, default=0.05, help="share of S3 requests given a fault")
    p.add_argument("--files-per-shard", type=int, default=10)
    p.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    p.add_argument(
        "--kill-within",
        type=float,
        default=1.0,
        help="seconds: a model actor or task worker is killed at a random time up to this long after one "
        "exists (the driver up to half of it after its first commit); a short round on a fast machine can "
        "end before a long delay is over, so its kills never happen",
    )
    p.add_argument(
        "--driver-death",
        choices=("signal", "hook"),
        default="signal",
        help="signal: SIGKILL from outside up to --kill-within/2 after its first commit is seen (a short "
        "job may have committed every shard by then); hook: it dies right after its first manifest",
    )
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a text summary")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.images < 1 or not 0 <= args.fault_rate <= 1 or args.kill_within < 0:
        p.error("need --rounds >= 1, --images >= 1, 0 <= --fault-rate <= 1 and --kill-within >= 0")
    return args


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """This process's local Ray, seen through the state API: the pids a kill can choose from."""

    def __init__(self, cpus: int, env: dict[str, str]):
        import ray

        from pipeline.cluster import ensure_ray

        ensure_ray(
            num_cpus=cpus,
            include_dashboard=True,
            dashboard_port=free_port(),
            log_to_driver=False,
            runtime_env={"env_vars": env},
        )
        # The state API finds the dashboard (started here for it) from the cluster's address.
        self.address = ray.get_runtime_context().gcs_address

    def _actors(self) -> list:
        from ray.util.state import list_actors

        return list_actors(
            address=self.address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False
        )

    def actor_pids(self) -> list[int]:
        """Model actors: Ray Data's actor-pool workers, ``MapWorker(<operator>)`` (not its other actors)."""
        return [a.pid for a in self._actors() if a.class_name.startswith("MapWorker(") and a.pid]

    def worker_pids(self) -> list[int]:
        """Task workers: worker processes that hold no actor (idle ones included)."""
        from ray.util.state import list_workers

        alive = list_workers(
            address=self.address, filters=[("is_alive", "=", "True")], raise_on_missing_output=False
        )
        actors = {a.pid for a in self._actors()}
        return [w.pid for w in alive if w.worker_type == "WORKER" and w.pid and w.pid not in actors]


def kill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


def committed(fs, out: str) -> int:
    fs.invalidate_cache()
    try:
        return len(fs.ls(f"{out}/_manifest", detail=False))
    except FileNotFoundError:
        return 0


def one_round(
    index: int,
    *,
    cluster: Cluster,
    rng: random.Random,
    spec: dict,
    env: dict,
    fs,
    log,
    within: float = 1.0,
    driver_death: str = "signal",
) -> dict:
    """Run the job into a fresh output until it completes, killing as described; the kills done."""
    out = f"{BUCKET}/round-{index:02d}"
    spec = {**spec, "output": f"s3://{out}"}
    plan = ["driver", *rng.sample(["actor", "worker"], 2)]  # the driver first, the others in its rerun
    kills: Counter[str] = Counter()
    runs = 0
    while True:
        runs += 1
        if runs > MAX_DRIVER_RUNS:
            raise RuntimeError(
                f"round {index}: the job did not complete in {MAX_DRIVER_RUNS} runs (see {log})"
            )
        hooked = driver_death == "hook" and plan[:1] == ["driver"]
        with open(log, "a") as err:
            driver = subprocess.Popen(
                [sys.executable, "-c", DRIVER, cluster.address, json.dumps(spec), json.dumps(env)],
                cwd=REPO,
                env={**os.environ, **env, **({DIE_AT_ENV: "after-manifest"} if hooked else {})},
                start_new_session=True,  # its own process group: killed whole
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        while plan and driver.poll() is None:
            kind = plan[0]
            if kind == "driver" and hooked:  # it dies by itself, right after its first manifest
                if driver.wait() == DIE_EXIT_CODE:
                    kills["driver"] += 1
                plan.pop(0)
                break
            if kind == "driver":
                if committed(fs, out) == 0:  # wait for a first commit: the driver dies mid-run
                    time.sleep(0.2)
                    continue
                time.sleep(rng.uniform(0, within / 2))
                if driver.poll() is None:
                    os.killpg(driver.pid, signal.SIGKILL)
                    kills["driver"] += 1
                plan.pop(0)
                break
            time.sleep(rng.uniform(0, within))
            if driver.poll() is not None:
                break
            # The driver is paused while its target is looked up and killed: the state API's listing
            # takes long enough that a short rerun on a fast machine could otherwise end meanwhile, and
            # the round would have no kill of this kind. Its actors and tasks run on while it is paused.
            os.killpg(driver.pid, signal.SIGSTOP)
            try:
                pids = cluster.actor_pids() if kind == "actor" else cluster.worker_pids()
                if pids and kill(rng.choice(pids)):
                    kills[kind] += 1
            finally:
                os.killpg(driver.pid, signal.SIGCONT)
            if pids:
                plan.pop(0)
            else:
                time.sleep(0.2)
        if driver.wait() == 0:
            return {"kills": dict(kills), "driver_runs": runs, "output": f"s3://{out}"}


def count_output(fs, out: str, expected: set[str]) -> dict:
    """Lost and duplicated images in the committed output (only the files its manifests list)."""
    import pyarrow.parquet as pq

    from pipeline.layout import committed_files

    ids: Counter[str] = Counter()
    sources: set[str] = set()
    for path in committed_files(fs, out.removeprefix("s3://")):
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["image_id", "source_uri"])
        ids.update(table.column("image_id").to_pylist())
        sources.update(table.column("source_uri").to_pylist())
    return {
        "records": sum(ids.values()),
        "lost": len(expected - sources),
        "duplicated": sum(n - 1 for n in ids.values()),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    from ebseg.data.shapes import write_shapes

    started = time.monotonic()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request otherwise
    rng = random.Random(args.seed)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    moto.start()
    upstream = f"http://127.0.0.1:{moto._port}"
    report: dict = {"rounds": 0, "images": args.images, "seed": args.seed, "fault_rate": args.fault_rate}
    try:
        with (
            FaultProxy(upstream, rate=args.fault_rate, seed=args.seed) as proxy,
            tempfile.TemporaryDirectory(prefix="ebseg-chaos-") as tmp,
        ):
            os.environ.update(CREDENTIALS)
            boto3.client("s3", endpoint_url=upstream).create_bucket(Bucket=BUCKET)
            write_shapes(f"{tmp}/in", count=args.images, seed=args.seed, size=64)
            expected = {str(p) for p in Path(tmp, "in", "images").iterdir()}
            env = {
                **CREDENTIALS,
                "AWS_ENDPOINT_URL": proxy.url,
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(REPO),
            }
            cluster = Cluster(args.ray_cpus, env)
            direct = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=upstream)  # past the proxy
            spec = {
                "input": f"{tmp}/in/images",
                "model": "demo",
                "vocabulary": f"{tmp}/in/vocabulary.json",
                "files_per_shard": args.files_per_shard,
                "batch_size": 4,
                "rows_per_block": 10,
                "actors": 2,
                "max_restarts": 3,
                "progress": False,
            }
            kills: Counter[str] = Counter()
            rounds, lost, duplicated, runs = [], 0, 0, 0
            for index in range(args.rounds):
                t0 = time.monotonic()
                done = one_round(
                    index,
                    cluster=cluster,
                    rng=rng,
                    spec=spec,
                    env=env,
                    fs=direct,
                    log=f"{tmp}/driver.err",
                    within=args.kill_within,
                    driver_death=args.driver_death,
                )
                counts = count_output(direct, done["output"], expected)
                kills.update(done["kills"])
                lost, duplicated, runs = (
                    lost + counts["lost"],
                    duplicated + counts["duplicated"],
                    runs + done["driver_runs"],
                )
                rounds.append({**done, **counts, "wall_s": round(time.monotonic() - t0, 2)})
                report["rounds"] = index + 1
                # One line per round on stderr: a long run shows how it goes, and a stopped one what it did.
                print(f"chaos: {json.dumps(rounds[-1], default=str)}", file=sys.stderr, flush=True)
            report.update(
                kills={k: kills[k] for k in KINDS},
                s3_faults=proxy.faults(),
                s3_requests_forwarded=proxy.counts["forwarded"],
                driver_runs=runs,
                images_lost=lost,
                images_duplicated=duplicated,
                per_round=rounds,
            )
    finally:
        import ray

        ray.shutdown()
        moto.stop()
    report["wall_s"] = round(time.monotonic() - started, 1)
    report["load_avg_1min"] = round(os.getloadavg()[0], 2)
    report["cores"] = os.cpu_count()
    return report


if __name__ == "__main__":
    result = main(sys.argv[1:])
    if "--json" in sys.argv[1:]:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            if key != "per_round":
                print(f"{key}: {value}")
