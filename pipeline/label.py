"""Labelling at scale: a directory, bucket prefix, tar set or Parquet set of images -> the ``images`` table.

One streaming Ray Data graph per run::

    shards (driver) -> ReadShard (flat_map tasks) -> DecodeImages (CPU tasks)
        -> SegmentImages (actor pool, GPU when gpus_per_actor > 0) -> encode_batch (CPU tasks)
        -> ShardSink (driver: one Parquet file + manifest per input shard)

``run(job)`` writes under ``job.output``: ``images/<shard_id>.parquet``, ``_manifest/<shard_id>.json``,
``job.json``, ``vocabulary.json`` and ``summary.json`` (see ``docs/schema.md``). Committed shards (those with
a manifest) are skipped by a rerun; a rerun with another model, vocabulary or input into the same output is
refused (``OutputMismatchError``).

``run_id``: unless the job names one, it is derived from the job's content (input, output, model id,
vocabulary id and the settings that decide shards and results), so a resumed run carries the same run id
as the attempt it continues, and the id never depends on when a run started.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import ray
from ray.data import ActorPoolStrategy
from ray.util.annotations import RayDeprecationWarning

import ebseg
from ebseg.checkpoint import RandomWeightsWarning
from ebseg.vocab import Vocabulary
from pipeline import storage
from pipeline.cluster import ensure_ray
from pipeline.decode import DEFAULT_MAX_PIXELS, DecodeImages
from pipeline.model_stage import AMP_DTYPES, ModelInfo, SegmentImages, describe_model
from pipeline.progress import Progress
from pipeline.records import SCHEMA_VERSION, Provenance, encode_batch
from pipeline.sink import ShardSink, SinkReport, committed_shards
from pipeline.sources import ReadShard, Shard, list_shards

WAVE_SHARDS = 1024  # shards listed, then labelled, per streaming execution (see run)
# Job fields that decide which shards exist and what a record holds: a rerun must agree on all of them.
IDENTITY_FIELDS = ("input", "model_id", "vocabulary_id", "files_per_shard", "image_column", "max_pixels")


class OutputMismatchError(ValueError):
    """The output already holds a run of a different job (model, vocabulary, input or shard settings)."""


class IncompleteRunError(RuntimeError):
    """Some shards did not receive all their rows; they were not committed, and a rerun redoes them."""


@dataclass(frozen=True)
class LabelJob:
    """Everything a labelling run needs. ``storage_options`` apply to input and output (never stored).

    model: an ``ebseg.checkpoint.load_model`` value: tiny / demo / base / large / checkpoint path or URI.
    vocabulary: a ``Vocabulary.parse`` value (benchmark name, file, "cat,dog,tree") or a Vocabulary.
    actors: model actors: a fixed pool size, or a (min, max) range Ray Data autoscales within.
    gpus_per_actor: GPUs per model actor, fractions allowed (0.5: two actors share a GPU); 0 runs on CPU.
    device: the actors' torch device; default "cuda" when gpus_per_actor > 0, else "cpu".
    amp_dtype: autocast dtype on GPU ("bf16", "fp16", or None / "fp32"); ignored on CPU.
    encode_in_actor: encode records inside the model actor instead of a separate CPU stage.
    max_restarts: restarts of a dead model actor and retries of its batch before the run fails.
    """

    input: str
    output: str
    vocabulary: str | Vocabulary
    model: str = "demo"
    batch_size: int = 4
    actors: int | tuple[int, int] = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    files_per_shard: int = 256
    image_column: str = "image"
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False)
    run_id: str | None = None
    amp_dtype: str | None = "bf16"
    device: str | None = None
    encode_in_actor: bool = False
    max_restarts: int = 3
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "files_per_shard", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LabelJob.{name} must be a positive integer, got {value!r}")
        actors = (self.actors, self.actors) if isinstance(self.actors, int) else tuple(self.actors)
        if (
            len(actors) != 2
            or not all(isinstance(a, int) and a >= 1 for a in actors)
            or actors[0] > actors[1]
        ):
            raise ValueError(
                f"LabelJob.actors must be a count >= 1 or a (min, max) range, got {self.actors!r}"
            )
        if self.gpus_per_actor < 0 or self.cpus_per_actor <= 0:
            raise ValueError(
                f"LabelJob.gpus_per_actor must be >= 0 and cpus_per_actor > 0, got "
                f"{self.gpus_per_actor!r} and {self.cpus_per_actor!r}"
            )
        if self.amp_dtype not in AMP_DTYPES:
            raise ValueError(f"LabelJob.amp_dtype must be one of {sorted(map(str, AMP_DTYPES))}")
        if self.max_restarts < 0:
            raise ValueError(f"LabelJob.max_restarts must be >= 0, got {self.max_restarts!r}")


@dataclass(frozen=True)
class LabelPlan:
    """What a job resolves to before anything runs."""

    vocabulary: Vocabulary
    model: ModelInfo
    run_id: str
    device: str


def _vocabulary(value: str | Vocabulary) -> Vocabulary:
    return value if isinstance(value, Vocabulary) else Vocabulary.parse(value)


def canonical_uri(uri: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """``uri`` spelled one way: absolute local paths, ``s3://bucket/key`` without a trailing slash."""
    fs, path = storage.url_to_fs(uri, storage_options)
    return storage.full_uri(fs, path)


def _identity(job: LabelJob, model: ModelInfo, vocabulary: Vocabulary) -> dict[str, Any]:
    return {
        "input": canonical_uri(job.input, job.storage_options),
        "model_id": model.model_id,
        "vocabulary_id": vocabulary.id,
        "files_per_shard": job.files_per_shard,
        "image_column": job.image_column,
        "max_pixels": job.max_pixels,
    }


def make_plan(job: LabelJob) -> LabelPlan:
    """Resolve the vocabulary, describe the model (without building it) and fix the run id."""
    vocabulary = _vocabulary(job.vocabulary)
    model = describe_model(job.model)
    run_id = job.run_id
    if run_id is None:
        output = canonical_uri(job.output, job.storage_options)
        content = {**_identity(job, model, vocabulary), "output": output}
        run_id = "run-" + hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
    device = job.device or ("cuda" if job.gpus_per_actor > 0 else "cpu")
    return LabelPlan(vocabulary=vocabulary, model=model, run_id=run_id, device=device)


def job_record(job: LabelJob, plan: LabelPlan) -> dict[str, Any]:
    """``OUT/job.json``: the job without storage options, resolved ids, versions."""
    return {
        "kind": "label",
        **_identity(job, plan.model, plan.vocabulary),
        "output": canonical_uri(job.output, job.storage_options),
        "model": job.model,
        "vocabulary": plan.vocabulary.name or ",".join(plan.vocabulary.names[:20]),
        "num_classes": len(plan.vocabulary),
        "run_id": plan.run_id,
        "batch_size": job.batch_size,
        "actors": list(job.actors) if isinstance(job.actors, tuple) else job.actors,
        "gpus_per_actor": job.gpus_per_actor,
        "cpus_per_actor": job.cpus_per_actor,
        "device": plan.device,
        "amp_dtype": job.amp_dtype,
        "encode_in_actor": job.encode_in_actor,
        "schema_version": SCHEMA_VERSION,
        "ebseg_version": ebseg.__version__,
        "ray_version": ray.__version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def claim_output(fs, root: str, record: Mapping[str, Any], plan: LabelPlan, *, explicit_run_id: bool) -> bool:
    """Write ``job.json`` and ``vocabulary.json``, or check an existing ``job.json`` agrees with this job.

    Returns True when the output already held this job (a resume). Raises OutputMismatchError naming every
    field that differs.
    """
    path = storage.join(root, "job.json")
    if not fs.exists(path):
        storage.write_json_atomic(fs, storage.join(root, "vocabulary.json"), plan.vocabulary.to_dict())
        storage.write_json_atomic(fs, path, dict(record))
        return False
    previous = storage.read_json(fs, path)
    fields = [*IDENTITY_FIELDS, "schema_version"] + (["run_id"] if explicit_run_id else [])
    differences = [
        f"{name}: output has {previous.get(name)!r}, this job {record[name]!r}"
        for name in fields
        if previous.get(name) != record[name]
    ]
    if differences:
        raise OutputMismatchError(
            f"{storage.full_uri(fs, root)} already holds labels of another job ({'; '.join(differences)}). "
            "Write to a new output, or rerun with the same model, vocabulary and input to resume."
        )
    return True


def build_label_dataset(
    job: LabelJob,
    shards: Sequence[Shard],
    *,
    plan: LabelPlan | None = None,
    model_stage_cls: type[SegmentImages] = SegmentImages,
) -> ray.data.Dataset:
    """The lazy record dataset of ``shards``: rows are ``IMAGES_SCHEMA`` records plus the sink's ``_``
    columns (``_shard_size``, ``_decode_ms``, ``_model_ms``, ``_encode_ms``). Nothing runs until consumed."""
    plan = plan or make_plan(job)
    provenance = Provenance(plan.model.model_id, plan.vocabulary.id, plan.run_id)
    ds = ray.data.from_items([s.to_row() for s in shards], override_num_blocks=max(1, len(shards)))
    ds = ds.flat_map(ReadShard(storage_options=job.storage_options, image_column=job.image_column))
    decode = DecodeImages(plan.model.short_side, plan.model.max_long_side, job.max_pixels)
    ds = ds.map_batches(decode, batch_size=job.batch_size, batch_format="numpy")
    # One model batch per block: the actor pool hands out whole blocks, and a block of many images (a
    # task's outputs are merged up to 128 MiB) would keep every actor but one idle. Fused with decode.
    ds = ds.repartition(target_num_rows_per_block=job.batch_size)
    lo, hi = (job.actors, job.actors) if isinstance(job.actors, int) else job.actors
    pool = ActorPoolStrategy(size=lo) if lo == hi else ActorPoolStrategy(min_size=lo, max_size=hi)
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for actor restarts yet and warns on every extra remote argument.
        warnings.simplefilter("ignore", RayDeprecationWarning)
        ds = ds.map_batches(
            model_stage_cls,
            batch_size=job.batch_size,
            batch_format="numpy",
            fn_constructor_kwargs={
                "model": job.model,
                "vocabulary": plan.vocabulary,
                "batch_size": job.batch_size,
                "device": plan.device,
                "amp_dtype": job.amp_dtype,
                "num_threads": max(1, int(job.cpus_per_actor)),
                "encode_with": provenance if job.encode_in_actor else None,
            },
            compute=pool,
            num_cpus=job.cpus_per_actor,
            num_gpus=job.gpus_per_actor or None,
            # A dead actor is restarted and its batch retried, a bounded number of times (Ray Data's
            # default is forever, which would loop on an image that kills the process every time).
            max_restarts=job.max_restarts,
            max_task_retries=job.max_restarts,
        )
    if not job.encode_in_actor:
        ds = ds.map_batches(
            encode_batch,
            batch_format="numpy",
            fn_kwargs={"names": plan.vocabulary.names, "provenance": provenance},
        )
    return ds


@contextlib.contextmanager
def _quiet_ray_data(enabled: bool):
    """Turn Ray Data's own progress bars off while our progress line runs (restored afterwards)."""
    context = ray.data.DataContext.get_current()
    before = context.enable_progress_bars
    context.enable_progress_bars = before and not enabled
    try:
        yield
    finally:
        context.enable_progress_bars = before


def _summarize(
    *, record: Mapping[str, Any], shards: int, skipped: int, report: SinkReport, seconds: Mapping[str, float]
) -> dict[str, Any]:
    manifests = report.manifests
    errors: dict[str, int] = {}
    for m in manifests:
        for code, count in m["errors_by_reason"].items():
            errors[code] = errors.get(code, 0) + count
    images = sum(m["rows"] for m in manifests)
    stage = {
        k: round(sum(m["timings_s"][k] for m in manifests), 3) for k in ("decode", "model", "encode", "write")
    }
    return {
        "run_id": record["run_id"],
        "model_id": record["model_id"],
        "vocabulary_id": record["vocabulary_id"],
        "shards_total": shards,
        "shards_skipped": skipped,
        "shards_written": len(manifests),
        "shards_incomplete": {k: list(v) for k, v in sorted(report.incomplete.items())},
        "images": images,
        "ok": images - sum(errors.values()),
        "errors": sum(errors.values()),
        "errors_by_reason": dict(sorted(errors.items())),
        "duplicate_rows_dropped": report.duplicate_rows,
        "images_per_s": round(images / seconds["label"], 4) if seconds["label"] > 0 else None,
        "wall_s": {k: round(v, 3) for k, v in seconds.items()},
        "stage_busy_s": stage,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _waves(shards: Iterable[Shard], size: int) -> Iterator[list[Shard]]:
    wave: list[Shard] = []
    for shard in shards:
        wave.append(shard)
        if len(wave) == size:
            yield wave
            wave = []
    if wave:
        yield wave


def run(job: LabelJob, *, model_stage_cls: type[SegmentImages] = SegmentImages) -> dict[str, Any]:
    """Label every image of ``job.input`` not yet committed under ``job.output``; return the summary.

    Uses the connected Ray, else ``$RAY_ADDRESS``, else a new local Ray (``pipeline.cluster``).
    model_stage_cls: the model stage's class (tests pass subclasses that fail on purpose).
    """
    start = time.monotonic()
    plan = make_plan(job)
    fs, root = storage.url_to_fs(job.output, job.storage_options)
    record = job_record(job, plan)
    claim_output(fs, root, record, plan, explicit_run_id=job.run_id is not None)
    done = committed_shards(fs, root)
    ready = time.monotonic()
    listing = list_shards(
        job.input,
        storage_options=job.storage_options,
        files_per_shard=job.files_per_shard,
        image_column=job.image_column,
    )
    progress = Progress(total_shards=0, enabled=job.progress)
    fields = {"run_id": plan.run_id, "model_id": plan.model.model_id, "vocabulary_id": plan.vocabulary.id}
    shards = skipped = 0
    with _quiet_ray_data(job.progress), warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)  # make_plan warned once already
        with ShardSink(
            root,
            fs=fs,
            expected_shards=(),
            manifest_fields=fields,
            on_commit=lambda manifest: progress.update(shards=1),
        ) as sink:
            # Shards are scheduled in waves as the listing streams, so the driver holds at most one wave's
            # member URIs, never a whole bucket's listing; a wave is one streaming Ray Data execution.
            for wave in _waves(listing, WAVE_SHARDS):
                todo = [s for s in wave if s.shard_id not in done]
                shards += len(wave)
                skipped += len(wave) - len(todo)
                progress.total_shards, progress.skipped_shards = shards, skipped
                if not todo:
                    continue
                ensure_ray()
                sink.expect(s.shard_id for s in todo)
                ds = build_label_dataset(job, todo, plan=plan, model_stage_cls=model_stage_cls)
                for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    progress.update(images=sink.add(batch))
            report = sink.close()
    progress.close()
    end = time.monotonic()
    # The listing streams alongside the labelling, so "label" covers both; "setup" is model description,
    # output checks and the manifest listing.
    seconds = {"total": end - start, "setup": ready - start, "label": end - ready}
    summary = _summarize(record=record, shards=shards, skipped=skipped, report=report, seconds=seconds)
    storage.write_json_atomic(fs, storage.join(root, "summary.json"), summary)
    if report.incomplete:
        raise IncompleteRunError(
            f"{len(report.incomplete)} shard(s) did not receive all their rows and were not committed "
            f"(received, expected): {summary['shards_incomplete']}; rerun the job to label them"
        )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.label INPUT OUTPUT --vocabulary V``: the library entry without the CLI."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.label", description=__doc__.splitlines()[0])
    parser.add_argument("input", help="images, .tar shards or Parquet files: a path, prefix, glob or URI")
    parser.add_argument("output", help="output directory or URI")
    parser.add_argument("--vocabulary", required=True, help="benchmark name, vocabulary file, or 'cat,dog,'")
    parser.add_argument("--model", default="demo", help="demo | tiny | base | large | checkpoint path/URI")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--gpus-per-actor", type=float, default=0.0)
    args = parser.parse_args(argv)
    job = LabelJob(
        input=args.input,
        output=args.output,
        vocabulary=args.vocabulary,
        model=args.model,
        batch_size=args.batch_size,
        actors=args.actors,
        gpus_per_actor=args.gpus_per_actor,
    )
    print(json.dumps(run(job), indent=2))
    return 0


__all__ = [
    "IncompleteRunError",
    "LabelJob",
    "LabelPlan",
    "OutputMismatchError",
    "build_label_dataset",
    "claim_output",
    "job_record",
    "make_plan",
    "run",
]

if __name__ == "__main__":
    raise SystemExit(main())
