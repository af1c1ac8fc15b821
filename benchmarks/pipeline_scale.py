"""How many images per second one labelling driver can feed: the real graph with a simulated accelerator.

Usage::

    python benchmarks/pipeline_scale.py --counts 1000,10000 --size 480x640 [--rows-per-block 128] \\
        [--actors 2] [--actor-ips 400] [--batch-size 8] [--input-side 640] [--json]
    python benchmarks/pipeline_scale.py --counts 100 --size 3000x4000 --rows-per-block 64

Writes ``max(--counts)`` JPEG photos (``skimage.data``, resized to --size: 480x640 or 3000x4000 originals)
to a temporary folder and labels the first N of them with ``pipeline.label.run.run`` (the same code path as
``ebseg label``: listing, reading, decoding, the actor pool, record encoding, part files, manifests) for each
N of --counts, each into a fresh output. Only the model stage is simulated: ``SimulatedSegmentImages``
sleeps as an accelerator running --actor-ips images/s per actor would, batching by padded shape as the real
stage does, and returns a realistic label map at the original size (several classes in blobs, from the
shapes set's drawing rule) and scores, so encoding and writing cost what they cost for real records.
``--input-side`` shrinks the simulated model's input (the actors decode and resize to it): the driver never
sees pixels, so it changes the actors' CPU per image, not the driver's, and lets a small box run fast enough
to load the driver.

Figures per N:

- ``images_per_s``: N / wall time of ``run()``;
- ``driver_cpu_s``: user + system CPU of this process (the driver: Ray Data's executor, the commit) over
  ``run()``; ``driver_us_per_image`` and ``driver_ms_per_block`` (blocks = N / rows per block);
- ``marginal_driver_us_per_image``: (CPU at the largest N - CPU at the smallest, medians over
  ``--repeats``) / (difference in N): the
  cost per image with start-up and the fixed cost of a run taken out (with ``--warmup N`` an unreported
  first run of N images starts Ray's workers, so the smallest run is not the only one paying for it);
- ``driver_split`` (with ``--slow-actor-ips``): the largest N is also labelled at lower simulated rates, so
  the same images take longer; a least-squares line of driver CPU against wall time over those runs splits
  it into ``driver_cpu_ms_per_wall_s`` (what Ray Data's executor spends per second whether or not images
  flow) and ``driver_us_per_image``, and projects the cost per image of a driver fed 25,000 images/s;
  ``--repeats`` runs every setting several times, interleaved;
- ``driver_peak_rss_bytes``: peak RSS of the driver during the run (sampled every 0.5 s);
- ``driver_cpu_ms_per_s_by_thread``: the driver's CPU split by thread (``benchmarks.thread_cpu``: Ray
  Data's ``StreamingExecutor`` loop, the consumer (``MainThread``, ``iter_threaded``), Ray's native
  core-worker threads, ...), in ms of CPU per second of the run's wall time;
- ``commit_only``: the driver's own commit work measured apart, without Ray (200 shards of --files-per-shard
  rows in parts of 128 rows: part rows in, manifests written to local disk), CPU per image and per part;
- ``stage_busy_ms_per_image``: busy time per image measured in the workers for each stage (decode,
  simulated model, encode, write), from ``summary.json`` (wall time inside the stage: CPU time when the
  machine is not oversubscribed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.model_throughput import cpu_model
from benchmarks.pipeline_throughput import RssSampler
from benchmarks.thread_cpu import ThreadCpu
from ebseg.predictor import Prediction
from ebseg.resize import resized_shape
from ebseg.zoo import RandomWeightsWarning
from pipeline.label.decode import DecodeImages
from pipeline.label.job import LabelJob
from pipeline.label.run import run
from pipeline.label.segment import SegmentImages

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
VOCABULARY = "sky,tree,grass,road,building,person,car,dog,water,mountain"


def blob_labels(height: int, width: int, classes: int, seed: int) -> np.ndarray:
    """int32 [height, width] class ids: a background class and a few ellipses and boxes of others."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((height, width), np.int32)
    yy, xx = np.ogrid[:height, :width]
    for k in range(1, min(classes, 7)):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(0.1, 0.3) * height, rng.uniform(0.1, 0.3) * width
        if k % 2:
            labels[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = k
        else:
            labels[int(max(0, cy - ry)) : int(cy + ry), int(max(0, cx - rx)) : int(cx + rx)] = k
    return labels


class SimulatedSegmenter:
    """Stands in for ``ebseg.predictor.Segmenter``: the same padded-shape rule, a sleep for the forward.

    input_side: the model input's short side (the real models' 640 by default; the long side at most 4x).
    """

    divisor = 32

    def __init__(self, classes: int, images_per_s: float, input_side: int = 640):
        self.classes, self.images_per_s = classes, images_per_s
        self.short_side, self.max_long_side = input_side, 4 * input_side
        self._maps: dict[tuple[int, int], np.ndarray] = {}

    def padded_shape(self, height: int, width: int) -> tuple[int, int]:
        h, w = resized_shape(height, width, self.short_side, self.max_long_side)
        return -(-h // self.divisor) * self.divisor, -(-w // self.divisor) * self.divisor

    def predict(self, images, *, output_sizes):
        time.sleep(len(images) / self.images_per_s)  # one forward pass of the batch on an accelerator
        out = []
        for size in output_sizes:
            if size not in self._maps:
                self._maps[size] = blob_labels(*size, self.classes, seed=len(self._maps))
            labels = self._maps[size]
            areas = np.bincount(labels.ravel(), minlength=self.classes)
            scores = np.where(areas > 0, 0.8, 0.0).astype(np.float32)
            out.append(Prediction(label_map=labels, scores=scores, areas=areas))
        return out


def simulated_stage(images_per_s: float, input_side: int | None = None) -> type[SegmentImages]:
    """The model stage with a simulated accelerator (a class made here, so Ray ships it by value).

    input_side: when given, the actor decodes and resizes every image to a model input of that short side
    instead of the model's own (640): the driver never sees pixels, so this changes only the actors' CPU
    work per image (resizing a 48x64 photo up to 640x853 is most of it), which lets a small box run fast
    enough to load the driver."""

    class SimulatedSegmentImages(SegmentImages):
        def __init__(self, settings, **kwargs):
            super().__init__(settings, **kwargs)
            if input_side is not None and self.decode is not None:
                d = self.decode
                self.decode = DecodeImages(input_side, self.segmenter.max_long_side, d.max_pixels)

        def load_segmenter(self, settings):  # no model is loaded
            side = 640 if input_side is None else input_side
            return SimulatedSegmenter(len(settings.vocabulary), images_per_s, side)

    return SimulatedSegmentImages


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--counts", default="1000,10000", help="comma-separated image counts, one run each")
    p.add_argument("--size", default="480x640", help="original photo size HxW")
    p.add_argument("--rows-per-block", type=int, default=None, help="default: LabelJob's")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--actor-ips", type=float, default=400.0, help="simulated images/s of one actor")
    p.add_argument("--files-per-shard", type=int, default=256)
    p.add_argument(
        "--input-side",
        type=int,
        default=None,
        help="short side of the simulated model's input (default: the model's 640); a small one takes the "
        "actors' resize work away so the run goes fast enough to load the driver",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="label this many images first, unreported, so that no reported run pays Ray's worker start-up "
        "(without it the smallest count's run does, which lowers the marginal figure)",
    )
    p.add_argument(
        "--slow-actor-ips",
        default="",
        help="comma-separated lower simulated rates: the largest count is also run at each; the same images "
        "over longer wall times split the driver's CPU into a per-wall-second term (Ray Data's polling) and "
        "a per-image term (a least-squares line through the runs)",
    )
    p.add_argument(
        "--repeats", type=int, default=1, help="run every count (and slow rate) this many times, interleaved"
    )
    p.add_argument("--encode", default="stage", choices=["stage", "actor"], help="where records are written")
    p.add_argument("--ray-cpus", type=int, default=None, help="logical CPUs of the local Ray (default 4x)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a text summary")
    args = p.parse_args(argv)
    try:
        args.count_list = sorted(int(c) for c in args.counts.split(","))
        args.slow_rates = [float(r) for r in args.slow_actor_ips.split(",") if r.strip()]
        args.height, args.width = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        p.error(f"--counts must be integers and --size HxW, got {args.counts!r}, {args.size!r}")
    sizes = (
        *args.count_list,
        args.batch_size,
        args.actors,
        args.files_per_shard,
        args.input_side or 1,
        args.warmup + 1,
        args.repeats,
    )
    if min(sizes) < 1 or args.actor_ips <= 0 or min(args.slow_rates, default=1) <= 0:
        p.error(
            "--counts, --batch-size, --actors, --files-per-shard, --input-side, --actor-ips, --repeats "
            "must be positive"
        )
    args.cores = len(os.sched_getaffinity(0))
    args.ray_cpus = args.ray_cpus or 4 * args.cores
    return args


def write_inputs(directory: Path, count: int, height: int, width: int) -> None:
    """``count`` JPEG files: four real photos at ``height`` x ``width``, the same bytes repeated."""
    from skimage import data

    directory.mkdir(parents=True)
    bodies = []
    for name in PHOTOS:
        path = directory / f"{name}.jpg.tmp"
        Image.fromarray(getattr(data, name)()).convert("RGB").resize((width, height)).save(path, "JPEG")
        bodies.append(path.read_bytes())
        path.unlink()
    for i in range(count):
        (directory / f"{i // 1000:03d}" / f"{i:07d}.jpg").parent.mkdir(exist_ok=True)
        (directory / f"{i // 1000:03d}" / f"{i:07d}.jpg").write_bytes(bodies[i % len(bodies)])


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def one_run(args, count: int, source: Path, out: Path, actor_ips: float | None = None) -> dict:
    inputs = out.parent / f"in-{out.name}"
    inputs.mkdir()
    for path in sorted(source.rglob("*.jpg"))[:count]:
        os.link(path, inputs / path.name)  # a hard link: the listing reads it as the file it is
    fields = {} if args.rows_per_block is None else {"rows_per_block": args.rows_per_block}
    job = LabelJob(
        input=str(inputs),
        output=str(out),
        model="tiny",
        vocabulary=VOCABULARY,
        batch_size=args.batch_size,
        actors=args.actors,
        files_per_shard=args.files_per_shard,
        encode_in_actor=args.encode == "actor",
        progress=True,  # as `ebseg label` runs: our progress line on stderr, Ray Data's own progress off
        **fields,
    )
    actor_ips = actor_ips or args.actor_ips
    stage = simulated_stage(actor_ips, args.input_side)
    cpu, start = self_cpu(), time.monotonic()
    # Sampled every 0.5 s: the sampler runs in the driver's process, and at 50 ms it cost ~5 ms of CPU
    # per second there, counted as driver CPU (the driver's own RSS moves slowly: no records reach it).
    with RssSampler(interval=0.5) as rss, ThreadCpu(interval=2.0) as threads:
        summary = run(job, model_stage_cls=stage)
    wall, cpu = time.monotonic() - start, self_cpu() - cpu
    blocks = -(-count // job.rows_per_block)
    busy = summary["stage_busy_s"]
    return {
        "images": summary["images"],
        "actor_ips": actor_ips,
        "rows_per_block": job.rows_per_block,
        "wall_s": round(wall, 2),
        "images_per_s": round(count / wall, 3),
        "driver_cpu_s": round(cpu, 3),
        "driver_us_per_image": round(cpu / count * 1e6, 1),
        "driver_ms_per_block": round(cpu / blocks * 1e3, 2),
        "driver_peak_rss_bytes": rss.peak,
        "driver_cpu_ms_per_s_by_thread": threads.per_second(wall),
        "stage_busy_ms_per_image": {k: round(v / count * 1000, 3) for k, v in busy.items()},
        "effective_batch_size": summary["effective_batch_size"],
        "shards": summary["shards_written"],
    }


def commit_cost(shards: int, rows_per_shard: int, rows_per_part: int, directory: Path) -> dict:
    """The driver's commit work alone, no Ray: part rows in, manifests out (local disk), CPU per image."""
    import pyarrow as pa

    from pipeline import storage
    from pipeline.label.commit import ShardCommitter
    from pipeline.label.parts import PART_SCHEMA

    parts = []
    for s in range(shards):
        for start in range(0, rows_per_shard, rows_per_part):
            stop = min(rows_per_shard, start + rows_per_part)
            parts.append(
                {
                    "shard_id": f"s-{s:06d}",
                    "shard_size": rows_per_shard,
                    "file": f"images/s-{s:06d}/{start}.parquet",
                    "rows": stop - start,
                    "ranges": [start, stop],
                    "bytes": 1,
                    "sha256": "0" * 64,
                    "errors": "{}",
                    "decode_ms": 1.0,
                    "model_ms": 1.0,
                    "encode_ms": 1.0,
                    "write_ms": 1.0,
                    "model_images": stop - start,
                    "forwards": (stop - start) / 8,
                }
            )
    tables = [pa.Table.from_pylist(parts[i : i + 1], schema=PART_SCHEMA) for i in range(len(parts))]
    fs, root = storage.url_to_fs(str(directory))
    cpu, start = self_cpu(), time.monotonic()
    with ShardCommitter(root, fs=fs, expected_shards=[f"s-{s:06d}" for s in range(shards)]) as committer:
        for table in tables:  # one metadata block per part, as the graph delivers them
            committer.add(table)
        report = committer.close()
    cpu = self_cpu() - cpu
    images = shards * rows_per_shard
    assert len(report.manifests) == shards
    return {
        "shards": shards,
        "parts": len(parts),
        "images": images,
        "cpu_s": round(cpu, 3),
        "us_per_image": round(cpu / images * 1e6, 2),
        "us_per_part": round(cpu / len(parts) * 1e6, 1),
        "wall_s": round(time.monotonic() - start, 3),
    }


def driver_split(runs: list[dict], rate: float = 25_000.0) -> dict | None:
    """Driver CPU = per_s x wall + per_image x images, from runs of the same images at different speeds.

    The per-second term is what Ray Data's executor spends whether or not images flow (its loop polls
    its operators ~10 times a second); the per-image term is listing, commit and per-block work. With
    the images fixed, it is a least-squares line of CPU against wall time: slope per_s, intercept
    per_image x images. The projection is what a driver fed ``rate`` images/s would spend per image.
    None when the runs hold different images or their walls are too close to tell the terms apart.
    """
    images = {r["images"] for r in runs}
    walls = [r["wall_s"] for r in runs]
    if len(runs) < 2 or len(images) != 1 or max(walls) - min(walls) < 0.25 * min(walls):
        return None
    cpus = [r["driver_cpu_s"] for r in runs]
    mean_wall, mean_cpu = sum(walls) / len(walls), sum(cpus) / len(cpus)
    per_s = sum((w - mean_wall) * (c - mean_cpu) for w, c in zip(walls, cpus)) / sum(
        (w - mean_wall) ** 2 for w in walls
    )
    per_image = (mean_cpu - per_s * mean_wall) / images.pop()
    worst = max(abs(c - per_s * w - per_image * r["images"]) for w, c, r in zip(walls, cpus, runs))
    return {
        "driver_cpu_ms_per_wall_s": round(per_s * 1e3, 1),
        "driver_us_per_image": round(per_image * 1e6, 1),
        "largest_residual_s": round(worst, 3),
        "projected_rate_images_per_s": rate,
        "projected_driver_us_per_image": round((per_image + per_s / rate) * 1e6, 1),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    import ray

    warnings.simplefilter("ignore", RandomWeightsWarning)
    started = not ray.is_initialized()  # a caller's Ray (the tests') is used as it is
    if started:
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    report = {
        "size": f"{args.height}x{args.width}",
        "batch_size": args.batch_size,
        "actors": args.actors,
        "actor_ips": args.actor_ips,
        "files_per_shard": args.files_per_shard,
        "input_side": args.input_side or 640,
        "encode": args.encode,
        "cpu": cpu_model(),
        "cores": args.cores,
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "runs": [],
    }
    try:
        with tempfile.TemporaryDirectory(prefix="ebseg-scale-") as tmp:
            root = Path(tmp)
            report["commit_only"] = commit_cost(200, args.files_per_shard, 128, root / "commit-only")
            write_inputs(root / "photos", max(*args.count_list, args.warmup), args.height, args.width)
            if args.warmup:  # not reported: the first run in a fresh Ray pays for starting its workers
                warm = one_run(args, args.warmup, root / "photos", root / "out-warmup")
                report["warmup"] = {k: warm[k] for k in ("images", "wall_s", "driver_cpu_s")}
            for rep in range(args.repeats):  # interleaved, so that every setting sees the same load
                for count in args.count_list:
                    out = root / f"out-{count}-{rep}"
                    report["runs"].append({"repeat": rep, **one_run(args, count, root / "photos", out)})
                for rate in args.slow_rates:
                    count, out = args.count_list[-1], root / f"out-{count}-at-{rate:g}-{rep}"
                    slow = {"repeat": rep, **one_run(args, count, root / "photos", out, rate)}
                    report.setdefault("slow_runs", []).append(slow)
            if args.slow_rates:
                largest = [r for r in report["runs"] if r["images"] == args.count_list[-1]]
                report["driver_split"] = driver_split([*largest, *report["slow_runs"]])
    finally:
        if started:
            ray.shutdown()
    runs = report["runs"]
    if runs[-1]["images"] > runs[0]["images"]:
        cpu = {
            n: statistics.median(r["driver_cpu_s"] for r in runs if r["images"] == n) for n in args.count_list
        }
        smallest, largest = args.count_list[0], args.count_list[-1]
        report["marginal_driver_us_per_image"] = round(
            (cpu[largest] - cpu[smallest]) / (largest - smallest) * 1e6, 1
        )
    report["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
    return report


if __name__ == "__main__":
    result = main()
    if "--json" in sys.argv:
        print(json.dumps(result))
    else:
        for r in result["runs"]:
            print(
                f"{r['images']:>6} images {result['size']}: {r['images_per_s']:>8.1f} images/s, driver "
                f"{r['driver_us_per_image']:.1f} us/image, {r['driver_ms_per_block']:.2f} ms/block "
                f"({r['rows_per_block']} rows), peak RSS {r['driver_peak_rss_bytes'] / 2**20:.0f} MiB, "
                f"stages {r['stage_busy_ms_per_image']} ms/image, effective batch {r['effective_batch_size']}"
            )
        if "marginal_driver_us_per_image" in result:
            print(f"marginal driver CPU: {result['marginal_driver_us_per_image']} us/image")
        if result.get("driver_split"):
            split = result["driver_split"]
            rates = ", ".join(f"{r['images_per_s']:.1f}" for r in result["slow_runs"])
            print(
                f"driver CPU split (the same images also at {rates} images/s): "
                f"{split['driver_cpu_ms_per_wall_s']} ms per wall s + "
                f"{split['driver_us_per_image']} us/image "
                f"(largest residual {split['largest_residual_s']} s); "
                f"at {split['projected_rate_images_per_s']:.0f} images/s "
                f"{split['projected_driver_us_per_image']} us/image"
            )
