"""Labelling at scale: a directory, bucket prefix, tar set or Parquet set of images -> the ``images`` table.

One streaming Ray Data graph per run::

    shards (driver, several per block) -> ReadShards (CPU tasks: encoded bytes)
        -> SegmentImages (actor pool, GPU when gpus_per_actor > 0: decode, then the model)
        -> PartWriter (CPU tasks: encode, write) -> part metadata rows
        -> ShardCommitter (driver: one manifest per complete input shard)

The driver schedules; workers read, compute and write. Record bytes go from the workers to storage; the
driver receives one small row per part file. Blocks hold about ``rows_per_block`` images and carry them
encoded (decoding happens inside the model actor), so they stay small enough to be large in rows: Ray
Data's cost per block on the driver (~7.5 ms per block and operator) is spread over many images, with no
repartition step; the model stage cuts a block into its own batches.

``run(job)`` checks the job first (``pipeline.label.preflight``), takes the output's lease
(``pipeline.lease``: one run at a time per output), then starts Ray. It writes under ``job.output``:
``images/<shard_id>/<part>.parquet``, ``_manifest/<shard_id>.json``, ``job.json``, ``vocabulary.json`` and
``summary.json`` (see ``docs/schema.md``); with ``job.proposals`` also ``proposals/<shard_id>/<part>.parquet``
and ``proposals.json``. Committed shards (those with a manifest) are skipped by a rerun; a rerun with another
model, vocabulary or input into the same output is refused (``OutputMismatchError``, see
``pipeline.label.plan``).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import ray
from ray.data import ActorPoolStrategy, TaskPoolStrategy
from ray.util.annotations import RayDeprecationWarning

from pipeline import storage
from pipeline.cluster import ray_on_demand
from pipeline.label import diehook
from pipeline.label.commit import CommitReport, ShardCommitter, clean_after_interruption
from pipeline.label.decode import DecodeImages
from pipeline.label.job import LabelJob
from pipeline.label.listing import Shard, list_shards
from pipeline.label.parts import PartWriter
from pipeline.label.plan import LabelPlan, claim_output, job_record, make_plan, proposals_info
from pipeline.label.preflight import preflight
from pipeline.label.progress import Progress
from pipeline.label.reading import ReadShards
from pipeline.label.records import Provenance
from pipeline.label.segment import SegmentImages
from pipeline.layout import SUMMARY_FILE, committed_shards
from pipeline.lease import Lease, acquire

WAVE_SHARDS = 1024  # shards listed, then labelled, per streaming execution (see run)


class IncompleteRunError(RuntimeError):
    """Some shards did not receive all their rows; they were not committed, and a rerun redoes them."""


def block_rows(job: LabelJob, shards: Sequence[Shard]) -> int:
    """Rows per block: ``job.rows_per_block``, fewer when the wave is too small to give every actor a
    block (tar and Parquet shards count as one block each, their size being unknown before reading)."""
    estimate = sum(len(s.uris) if s.kind == "files" else job.rows_per_block for s in shards)
    per_actor = math.ceil(estimate / job.actor_range[1])
    return max(1, min(job.rows_per_block, max(per_actor, job.batch_size)))


def build_label_dataset(
    job: LabelJob,
    shards: Sequence[Shard],
    *,
    plan: LabelPlan | None = None,
    model_stage_cls: type[SegmentImages] = SegmentImages,
) -> ray.data.Dataset:
    """The lazy dataset of ``shards``: rows are part metadata (``pipeline.label.parts.PART_SCHEMA``), one
    per part file the workers wrote under ``job.output``. Nothing runs until consumed."""
    plan = plan or make_plan(job)
    provenance = Provenance(plan.model.model_id, plan.vocabulary.id, plan.run_id)
    encoding = plan.proposals_encoding(job)
    writer = PartWriter(
        job.output,
        names=plan.vocabulary.names,
        provenance=provenance,
        storage_options=job.storage_options,
        proposals_encoding=encoding,
    )
    rows = block_rows(job, shards)
    # The test hook's variables reach the workers (see pipeline.label.diehook); nothing when unset.
    hook_env = {"runtime_env": {"env_vars": diehook.ray_env()}} if diehook.ray_env() else {}
    lo, hi = job.actor_range
    # One input block per ~`rows` images (several files shards each), read by one task into blocks of
    # `rows` encoded images: the actor pool hands out whole blocks, so these amortise the driver's
    # per-block cost, and block_rows keeps enough of them for every actor on a small input.
    estimate = sum(len(s.uris) if s.kind == "files" else rows for s in shards)
    blocks = max(1, min(len(shards), math.ceil(estimate / rows)))
    ds = ray.data.from_items([s.to_row() for s in shards], override_num_blocks=blocks)
    read = ReadShards(rows, storage_options=job.storage_options, image_column=job.image_column)
    # Two read tasks per actor in flight: enough read-ahead to keep the actors fed, bounded memory.
    tasks = TaskPoolStrategy(size=min(blocks, 2 * hi))
    ds = ds.map_batches(read, batch_size=None, batch_format="numpy", compute=tasks)
    decode = DecodeImages(plan.model.short_side, plan.model.max_long_side, job.max_pixels)
    pool = ActorPoolStrategy(size=lo) if lo == hi else ActorPoolStrategy(min_size=lo, max_size=hi)
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for actor restarts yet and warns on every extra remote argument.
        warnings.simplefilter("ignore", RayDeprecationWarning)
        ds = ds.map_batches(
            model_stage_cls,
            batch_size=rows,
            batch_format="numpy",
            fn_constructor_args=(plan.segmenter_settings(job),),
            fn_constructor_kwargs={
                "write_with": writer if job.encode_in_actor else None,
                "decode": decode,
                "proposals_encoding": encoding,
            },
            compute=pool,
            num_cpus=job.cpus_per_actor,
            num_gpus=job.gpus_per_actor or None,
            # A dead actor is restarted and its batch retried, a bounded number of times (Ray Data's
            # default is forever, which would loop on an image that kills the process every time).
            max_restarts=job.max_restarts,
            max_task_retries=job.max_restarts,
            **hook_env,
        )
        if not job.encode_in_actor:
            # A writer task whose process dies is retried a bounded number of times too (Ray's default
            # for a system failure retries a task that kills its worker for a very long time).
            ds = ds.map_batches(
                writer, batch_size=None, batch_format="numpy", max_retries=job.max_restarts, **hook_env
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


def summarize(
    *,
    record: Mapping[str, Any],
    shards: int,
    skipped: int,
    report: CommitReport,
    seconds: Mapping[str, float],
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
    forwards = sum(m["forwards"] for m in manifests)
    model_images = sum(m["model_images"] for m in manifests)
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
        "duplicate_parts_dropped": report.duplicate_parts,
        "orphans_deleted": report.orphans_deleted,
        "shards_committed_by_another_run": sorted(report.lost_races),
        "forward_passes": round(forwards, 3),
        # Mean images per forward pass of the model: how full the accelerator's batches were.
        "effective_batch_size": round(model_images / forwards, 3) if forwards else None,
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


def run(
    job: LabelJob,
    *,
    model_stage_cls: type[SegmentImages] = SegmentImages,
    connect: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> dict[str, Any]:
    """Label every image of ``job.input`` not yet committed under ``job.output``; return the summary.

    First the preflight (``pipeline.label.preflight``: PreflightError) and the output's lease
    (``pipeline.lease``: LeaseHeldError while another run holds it), then Ray, only once there is work:
    ``connect()`` is entered then (the CLI's Ray session), else ``pipeline.cluster.ensure_ray`` uses the
    connected Ray, ``$RAY_ADDRESS`` or a new local one.
    model_stage_cls: the model stage's class (tests pass subclasses that fail on purpose).
    """
    start = time.monotonic()
    plan = preflight(job)
    fs, root = storage.url_to_fs(job.output, job.storage_options)
    with acquire(fs, root, run_id=plan.run_id, kind="label") as held, ray_on_demand(connect) as start_ray:
        return _label(job, plan, fs, root, start=start, held=held, start_ray=start_ray, stage=model_stage_cls)


def _label(
    job: LabelJob,
    plan: LabelPlan,
    fs,
    root: str,
    *,
    start: float,
    held: Lease,
    start_ray: Callable[[], None],
    stage: type[SegmentImages],
) -> dict[str, Any]:
    """The run once the output is ours: claim it, skip committed shards, label the rest in waves."""
    record = job_record(job, plan)
    claim_output(
        fs,
        root,
        record,
        plan.vocabulary,
        explicit_run_id=job.run_id is not None,
        proposals=proposals_info(job, plan),
    )
    done = committed_shards(fs, root)
    orphans = clean_after_interruption(fs, root) if done else 0
    ready = time.monotonic()
    listing = list_shards(
        job.input,
        storage_options=job.storage_options,
        files_per_shard=job.files_per_shard,
        image_column=job.image_column,
    )
    progress = Progress(total_shards=0, enabled=job.progress, listing_complete=False)
    fields = {"run_id": plan.run_id, "model_id": plan.model.model_id, "vocabulary_id": plan.vocabulary.id}
    shards = skipped = 0
    with (
        _quiet_ray_data(job.progress),
        ShardCommitter(
            root,
            fs=fs,
            manifest_fields=fields,
            on_commit=lambda manifest: progress.update(shards=1),
            guard=held.check,  # a run that lost the output's lease commits nothing more
        ) as committer,
    ):
        # Shards are scheduled in waves as the listing streams, so the driver holds at most one wave's
        # member URIs, never a whole bucket's listing; a wave is one streaming Ray Data execution.
        for wave in _waves(listing, WAVE_SHARDS):
            todo = [s for s in wave if s.shard_id not in done]
            shards += len(wave)
            skipped += len(wave) - len(todo)
            progress.listed(shards, skipped, complete=len(wave) < WAVE_SHARDS)  # a short wave ends it
            if not todo:
                continue
            start_ray()
            committer.expect(s.shard_id for s in todo)
            ds = build_label_dataset(job, todo, plan=plan, model_stage_cls=stage)
            for parts in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                progress.update(images=committer.add(parts))
        report = committer.close()
    report.orphans_deleted += orphans
    progress.listed(shards, skipped, complete=True)
    progress.close()
    end = time.monotonic()
    # The listing streams alongside the labelling, so "label" covers both; "setup" is the preflight, the
    # lease, the output checks and the manifest listing.
    seconds = {"total": end - start, "setup": ready - start, "label": end - ready}
    summary = summarize(record=record, shards=shards, skipped=skipped, report=report, seconds=seconds)
    held.check()  # a summary marks the output clean (see clean_after_interruption): only its holder writes it
    storage.write_json_atomic(fs, storage.join(root, SUMMARY_FILE), summary)
    if report.incomplete:
        raise IncompleteRunError(
            f"{len(report.incomplete)} shard(s) did not receive all their rows and were not committed "
            f"(received, expected): {summary['shards_incomplete']}; rerun the job to label them"
        )
    return summary
