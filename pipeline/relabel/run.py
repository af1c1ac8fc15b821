"""Relabelling at scale: a labelling output with proposals + a vocabulary -> a new labelling output, on CPU.

One streaming Ray Data graph per run::

    committed source shards (driver) -> RelabelShards (CPU actor pool: read proposals, label, write parts)
        -> part metadata rows -> ShardCommitter (driver: one manifest per shard)

The new output has the labelling's layout and ``images`` schema (``docs/schema.md``), so ``ebseg query`` /
``show`` / ``export`` read it as they read any labelling output; its ``job.json`` (kind ``relabel``) names
the source output, the source run and the model, and its ``proposals.json`` points at the source's
proposals (``ProposalsInfo.stored_in``), so the new output is searched and relabelled like its source.
Commits are the labelling's own: a shard is committed once, a rerun skips committed shards and deletes
orphans, and a rerun of another job into the output is refused (``OutputMismatchError``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from collections.abc import Callable
from typing import Any

import ray
from ray.data import ActorPoolStrategy
from ray.util.annotations import RayDeprecationWarning

from pipeline import storage
from pipeline.cluster import ray_on_demand
from pipeline.label.commit import ShardCommitter, clean_after_interruption
from pipeline.label.parts import PartWriter
from pipeline.label.plan import claim_output
from pipeline.label.progress import Progress
from pipeline.label.records import Provenance
from pipeline.label.run import IncompleteRunError, summarize
from pipeline.layout import SUMMARY_FILE, committed_shards
from pipeline.lease import Lease, acquire
from pipeline.relabel.job import RelabelJob
from pipeline.relabel.plan import (
    IDENTITY_FIELDS,
    RelabelPlan,
    SourceShard,
    job_record,
    make_plan,
    source_shards,
)
from pipeline.relabel.stage import RelabelShards


def build_relabel_dataset(
    job: RelabelJob,
    shards: list[SourceShard],
    plan: RelabelPlan,
    *,
    stage_cls: type[RelabelShards] = RelabelShards,
) -> ray.data.Dataset:
    """The lazy dataset of part metadata rows (``PART_SCHEMA``) of ``shards``; nothing runs until read."""
    writer = PartWriter(
        job.output,
        names=plan.vocabulary.names,
        provenance=Provenance(plan.model.model_id, plan.vocabulary.id, plan.run_id),
        storage_options=job.storage_options,
    )
    ds = ray.data.from_items([s.to_row() for s in shards], override_num_blocks=len(shards))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RayDeprecationWarning)  # max_restarts: see pipeline.label.run
        return ds.map_batches(
            stage_cls,
            batch_size=1,  # one shard per call: a shard's rows are written and committed together
            batch_format="numpy",
            fn_constructor_args=(plan.segmenter_settings(job),),
            fn_constructor_kwargs={
                "source": plan.source,
                "proposals_in": plan.stored.uri,
                "writer": writer,
                "resolution": job.resolution,
                "storage_options": job.storage_options,
            },
            compute=ActorPoolStrategy(size=job.actors),
            num_cpus=job.cpus_per_actor,
            max_restarts=job.max_restarts,
            max_task_retries=job.max_restarts,
        )


def run(
    job: RelabelJob,
    *,
    stage_cls: type[RelabelShards] = RelabelShards,
    connect: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> dict[str, Any]:
    """Relabel every committed shard of ``job.source`` not yet committed under ``job.output``; the summary.

    Raises NoProposalsError (``pipeline.label.proposal_records``) / ModelMismatchError
    (``pipeline.relabel.plan``) before anything is written, LeaseHeldError while another run holds the
    output (``pipeline.lease``, as labelling). Ray starts only once there is work: ``connect()`` (the
    CLI's Ray session) when given, else ``pipeline.cluster.ensure_ray``.
    stage_cls: the stage's class (tests pass subclasses that slow it down).
    """
    start = time.monotonic()
    plan = make_plan(job)
    fs, root = storage.url_to_fs(job.output, job.storage_options)
    with acquire(fs, root, run_id=plan.run_id, kind="relabel") as held, ray_on_demand(connect) as start_ray:
        return _relabel(job, plan, fs, root, start=start, held=held, start_ray=start_ray, stage_cls=stage_cls)


def _relabel(
    job: RelabelJob,
    plan,
    fs,
    root: str,
    *,
    start: float,
    held: Lease,
    start_ray: Callable[[], None],
    stage_cls: type[RelabelShards],
) -> dict[str, Any]:
    record = job_record(job, plan)
    claim_output(
        fs,
        root,
        record,
        plan.vocabulary,
        explicit_run_id=job.run_id is not None,
        # The new output's proposals are the source's: a pointer, so it is searched and relabelled alike.
        proposals=dataclasses.replace(plan.proposals, stored_in=plan.stored.uri),
        identity=IDENTITY_FIELDS,
    )
    done = committed_shards(fs, root)
    orphans = clean_after_interruption(fs, root) if done else 0
    shards = source_shards(job, plan)
    todo = [s for s in shards if s.shard_id not in done]
    ready = time.monotonic()
    progress = Progress(
        total_shards=len(shards),
        skipped_shards=len(shards) - len(todo),
        enabled=job.progress,
        verb="relabelling",
    )
    fields = {"run_id": plan.run_id, "model_id": plan.model.model_id, "vocabulary_id": plan.vocabulary.id}
    with ShardCommitter(
        root,
        fs=fs,
        expected_shards=[s.shard_id for s in todo],
        manifest_fields=fields,
        on_commit=lambda manifest: progress.update(shards=1),
        guard=held.check,  # a run that lost the output's lease commits nothing more
    ) as committer:
        if todo:
            start_ray()
            for parts in build_relabel_dataset(job, todo, plan, stage_cls=stage_cls).iter_batches(
                batch_size=None, batch_format="pyarrow"
            ):
                progress.update(images=committer.add(parts))
        report = committer.close()
    report.orphans_deleted += orphans
    progress.close()
    end = time.monotonic()
    seconds = {"total": end - start, "setup": ready - start, "label": end - ready}
    summary = summarize(
        record=record, shards=len(shards), skipped=len(shards) - len(todo), report=report, seconds=seconds
    )
    summary["source"], summary["source_run_id"] = plan.source, record["source_run_id"]
    held.check()  # only the lease's holder marks the output finished
    storage.write_json_atomic(fs, storage.join(root, SUMMARY_FILE), summary)
    if report.incomplete:
        raise IncompleteRunError(
            f"{len(report.incomplete)} shard(s) were not relabelled completely and were not committed: "
            f"{summary['shards_incomplete']}; rerun the job to finish them"
        )
    return summary
