"""End-to-end labelling throughput of ``pipeline.label.run`` against the model alone, and peak memory.

Usage::

    python benchmarks/pipeline_throughput.py --preset tiny --images 48 --size 480x640 --batch-size 4 \\
        --actors 1,2 [--vocabulary ade150] [--encode stage|actor] [--json]
    python benchmarks/pipeline_throughput.py --preset base --images 6 --batch-size 1 --actors 1,2

Writes ``--images`` JPEG photos (``skimage.data`` astronaut, coffee, chelsea, rocket, resized to --size) to a
temporary directory and labels them with ``pipeline.label.run`` on a local Ray, once per actor count, each
into a fresh output. Then times the model alone: ``Segmenter.predict`` in this process on the same decoded
images (``DecodeImages`` output, so the same resize), same preset, batch size and vocabulary, with
``--threads`` torch threads (default: every core), after one warm-up batch, the vocabulary encoded
beforehand. Weights are random (speed does not depend on them): ``tiny`` is the ``tiny`` model spec, ``base``
and ``large`` are saved to a temporary checkpoint the actors load.

Figures per actor count:

- ``run_images_per_s``: images / wall time of ``run()``: listing, actor start, model load, vocabulary
  encoding, every stage and every write included: what a user waits for;
- ``steady_images_per_s``: the model stage's completion rate inside the pipeline once every actor has
  finished its first batch (sampled in the actors), i.e. throughput with start-up excluded;
- ``ratio_run`` / ``ratio_steady``: those divided by the model-only images/s: the pipeline's efficiency;
- ``driver_peak_rss_bytes``: peak RSS of this process while ``run()`` ran (sampled every 50 ms; imports of
  torch and Ray included); ``actor_peak_rss_bytes``: the largest ``VmHWM`` (peak RSS) of any model actor.

Each model actor gets ``max(1, cores // actors)`` CPUs and as many torch threads; Ray is started with
``--ray-cpus`` logical CPUs (default 2 x cores) so decode and encode tasks run beside the actors.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import ray

from ebseg import checkpoint
from ebseg.build import build_ebseg
from ebseg.predictor import Segmenter
from ebseg.vocab import Vocabulary
from ebseg.zoo import RandomWeightsWarning, describe_model, load_model
from pipeline.label.decode import DecodeImages
from pipeline.label.job import LabelJob
from pipeline.label.run import run
from pipeline.label.segment import SegmentImages

STATS_ENV = "EBSEG_BENCH_STATS"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def proc_status(field: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class MeasuredSegmentImages(SegmentImages):
    """The model stage, recording each batch's wall-clock span and the actor's memory to a JSONL file.

    The file is named by the run tag the driver wrote to ``$EBSEG_BENCH_STATS/current`` and the actor's pid.
    (Defined in the script, so Ray ships the class by value.)
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        directory = Path(os.environ[STATS_ENV])
        tag = (directory / "current").read_text().strip()
        self.log = directory / f"{tag}-{os.getpid()}.jsonl"

    def __call__(self, batch):
        start = time.time()
        out = super().__call__(batch)
        record = {
            "start": start,
            "end": time.time(),
            "images": len(batch["image_id"]),  # raw rows in: decoding happens inside the stage
            "rss": proc_status("VmRSS"),
            "peak_rss": proc_status("VmHWM"),
        }
        with open(self.log, "a") as f:
            f.write(json.dumps(record) + "\n")
        return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=["tiny", "base", "large"])
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--size", default="480x640", help="input photo size HxW (or N for square)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--actors", default="1,2", help="comma-separated actor counts, one run each")
    p.add_argument("--files-per-shard", type=int, default=8)
    p.add_argument("--vocabulary", default="ade150", help="benchmark name, file, or 'cat,dog,' list")
    p.add_argument("--encode", default="stage", choices=["stage", "actor"], help="where records are encoded")
    p.add_argument("--threads", type=int, default=None, help="model-only torch threads (default: cores)")
    p.add_argument(
        "--ray-cpus", type=int, default=None, help="logical CPUs of the local Ray (default 2 x cores)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a text summary")
    args = p.parse_args(argv)
    h, sep, w = args.size.lower().partition("x")
    if not (h.isdigit() and (w.isdigit() if sep else True)):
        p.error(f"--size must be N or HxW, got {args.size!r}")
    args.height, args.width = int(h), int(w or h)
    try:
        args.actor_counts = [int(a) for a in args.actors.split(",")]
    except ValueError:
        p.error(f"--actors must be comma-separated integers, got {args.actors!r}")
    if min(args.images, args.batch_size, args.files_per_shard, *args.actor_counts) < 1:
        p.error("--images, --batch-size, --files-per-shard and --actors must be >= 1")
    args.cores = len(os.sched_getaffinity(0))
    args.threads = args.threads or args.cores
    args.ray_cpus = args.ray_cpus or 2 * args.cores
    return args


def write_inputs(directory: Path, count: int, height: int, width: int) -> None:
    from skimage import data

    directory.mkdir(parents=True)
    photos = [np.asarray(Image.fromarray(getattr(data, n)()).resize((width, height))) for n in PHOTOS]
    for i in range(count):
        Image.fromarray(photos[i % len(photos)]).save(directory / f"{i:05d}.jpg", quality=90)


def model_spec(preset: str, directory: Path) -> str:
    """A --model value with random weights: "tiny" itself, or a saved checkpoint of a larger preset."""
    if preset == "tiny":
        return "tiny"
    torch.manual_seed(0)
    path = directory / f"{preset}-random.pt"
    checkpoint.save(build_ebseg(preset), str(path))
    return str(path)


class RssSampler:
    """Peak current RSS of this process while active (ru_maxrss is a lifetime peak: useless per phase)."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, proc_status("VmRSS"))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def steady_rate(records: list[dict]) -> float | None:
    """Images/s the model stage completed after every actor's first batch (straddling batches pro rata)."""
    by_actor: dict[str, list[dict]] = {}
    for r in records:
        by_actor.setdefault(r["actor"], []).append(r)
    t0 = max(min(r["end"] for r in rs) for rs in by_actor.values())
    last = max(r["end"] for r in records)
    if last <= t0:
        return None
    done = sum(
        r["images"] * (r["end"] - max(r["start"], t0)) / max(r["end"] - r["start"], 1e-9)
        for r in records
        if r["end"] > t0
    )
    return done / (last - t0)


def pipeline_run(args, *, spec: str, actors: int, root: Path, stats: Path) -> dict:
    tag = f"actors{actors}"
    (stats / "current").write_text(tag)
    cpus = max(1, args.cores // actors)
    job = LabelJob(
        input=str(root / "in"),
        output=str(root / f"out-{tag}"),
        model=spec,
        vocabulary=args.vocabulary,
        batch_size=args.batch_size,
        actors=actors,
        cpus_per_actor=cpus,
        files_per_shard=args.files_per_shard,
        encode_in_actor=args.encode == "actor",
        progress=False,
    )
    start = time.perf_counter()
    with RssSampler() as sampler:
        summary = run(job, model_stage_cls=MeasuredSegmentImages)
    wall = time.perf_counter() - start
    records = []
    for path in stats.glob(f"{tag}-*.jsonl"):
        for line in path.read_text().splitlines():
            records.append({**json.loads(line), "actor": path.stem})
    assert summary["images"] == args.images and summary["ok"] == args.images, summary
    return {
        "actors": actors,
        "cpus_per_actor": cpus,
        "wall_s": round(wall, 3),
        "run_images_per_s": args.images / wall,
        "steady_images_per_s": steady_rate(records),
        "model_blocks": len(records),  # map_batches calls: blocks of rows_per_block rows
        "forward_passes": summary["forward_passes"],
        "effective_batch_size": summary["effective_batch_size"],
        "actors_used": len({r["actor"] for r in records}),
        "stage_busy_s": summary["stage_busy_s"],
        "driver_peak_rss_bytes": sampler.peak,
        "actor_peak_rss_bytes": max(r["peak_rss"] for r in records),
    }


def model_only(args, *, spec: str, root: Path) -> dict:
    """Segmenter.predict on the pipeline's own decoded inputs, in this process."""
    torch.set_num_threads(args.threads)
    info = describe_model(spec)
    decode = DecodeImages(info.short_side, info.max_long_side)
    files = sorted((root / "in").iterdir())
    decoded = [decode.decode_one(f.read_bytes()) for f in files]
    torch.manual_seed(0)
    seg = Segmenter(
        load_model(spec), Vocabulary.parse(args.vocabulary), batch_size=args.batch_size, device="cpu"
    )
    seg.class_embeddings()
    batches = [decoded[i : i + args.batch_size] for i in range(0, len(decoded), args.batch_size)]
    times = []
    for i, chunk in enumerate([batches[0], *batches]):  # the first batch again as warm-up
        start = time.perf_counter()
        seg.predict([d[0] for d in chunk], output_sizes=[(d[1], d[2]) for d in chunk])
        if i:
            times.append((time.perf_counter() - start, len(chunk)))
    total = sum(t for t, _ in times)
    per_image = [t / n for t, n in times]
    return {
        "threads": args.threads,
        "images_per_s": args.images / total,
        "s_per_image_median": statistics.median(per_image),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=RandomWeightsWarning)  # random weights on purpose: speed only
    with tempfile.TemporaryDirectory(prefix="ebseg-bench-") as tmp:
        root = Path(tmp)
        stats = root / "stats"
        stats.mkdir()
        write_inputs(root / "in", args.images, args.height, args.width)
        spec = model_spec(args.preset, root)
        ray.init(
            address="local",  # a fresh Ray, never one `ray start` left recorded on the machine
            num_cpus=args.ray_cpus,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {STATS_ENV: str(stats)}},
        )
        try:
            runs = [
                pipeline_run(args, spec=spec, actors=a, root=root, stats=stats) for a in args.actor_counts
            ]
        finally:
            ray.shutdown()
        driver_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the model-only load
        alone = model_only(args, spec=spec, root=root)
    for r in runs:
        r["ratio_run"] = r["run_images_per_s"] / alone["images_per_s"]
        r["ratio_steady"] = (r["steady_images_per_s"] or 0) / alone["images_per_s"]
    result = {
        **{k: getattr(args, k) for k in ("preset", "images", "height", "width", "batch_size", "vocabulary")},
        **{k: getattr(args, k) for k in ("files_per_shard", "encode", "cores", "ray_cpus")},
        "model_only": alone,
        "runs": runs,
        "driver_lifetime_peak_rss_bytes": driver_peak,
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "ray": ray.__version__,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print_summary(result)


def print_summary(r: dict) -> None:
    mib = 2**20
    alone = r["model_only"]
    print(
        f"{r['preset']} {r['images']} images {r['height']}x{r['width']} batch {r['batch_size']} "
        f"vocabulary {r['vocabulary']} encode={r['encode']} cores {r['cores']}"
    )
    print(f"  model only ({alone['threads']} threads): {alone['images_per_s']:.3f} images/s")
    for x in r["runs"]:
        steady = x["steady_images_per_s"] or float("nan")
        print(
            f"  {x['actors']} actor(s) x {x['cpus_per_actor']} CPU: run() {x['run_images_per_s']:.3f} "
            f"images/s (ratio {x['ratio_run']:.2f}, wall {x['wall_s']} s); steady {steady:.3f} images/s "
            f"(ratio {x['ratio_steady']:.2f}); peak RSS driver {x['driver_peak_rss_bytes'] / mib:.0f} MiB, "
            f"actor {x['actor_peak_rss_bytes'] / mib:.0f} MiB"
        )
    print(f"  1-min load average {r['load_avg_1min']}; torch {r['torch']}; ray {r['ray']}")


if __name__ == "__main__":
    main()
