"""What a relabelling resolves to before anything runs: the source's proposals, its model, the new vocabulary.

A source can be relabelled when it was labelled with ``proposals: true`` (``OUT/proposals.json``), or is
itself a relabelling of such an output (its proposals are then read where its source keeps them), and only
with the model that made its proposals: another model's text tower would put the class embeddings in a
space the stored embeddings were not made in, and give wrong labels without any error.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from typing import Any

import ebseg
from ebseg.vocab import Vocabulary
from ebseg.zoo import ModelInfo, SegmenterSettings, describe_model
from pipeline import storage
from pipeline.label.plan import OutputMismatchError, canonical_uri
from pipeline.label.preview import brief
from pipeline.label.proposal_records import NoProposalsError, ProposalsInfo, StoredProposals, stored_proposals
from pipeline.layout import JOB_FILE, SCHEMA_VERSION, committed_shards, manifest_files, manifest_paths
from pipeline.relabel.job import RelabelJob

# Job fields that decide what a record holds: a rerun into the same output must agree on all of them.
IDENTITY_FIELDS = ("source", "source_run_id", "model_id", "vocabulary_id", "resolution")


class ModelMismatchError(ValueError):
    """The model given to relabel is not the one that made the source's proposals."""


@dataclass(frozen=True)
class SourceShard:
    """One committed shard of the source: the unit of relabelling work and of the new output's commit."""

    shard_id: str
    rows: int
    images: list[str]  # the shard's images parts (relative to the source root), in manifest order
    proposals: list[str]  # its proposals parts (relative to the root of the output holding them)

    def to_row(self) -> dict[str, Any]:
        return {
            "shard_id": self.shard_id,
            "rows": self.rows,
            "images": self.images,
            "proposals": self.proposals,
        }


@dataclass(frozen=True)
class RelabelPlan:
    source: str  # canonical URI
    source_job: dict[str, Any]
    proposals: ProposalsInfo
    stored: StoredProposals  # where the proposals files are: the source, or the output it was relabelled from
    model: ModelInfo
    vocabulary: Vocabulary
    run_id: str

    def segmenter_settings(self, job: RelabelJob) -> SegmenterSettings:
        """What each actor builds its Segmenter from (CPU, the new vocabulary)."""
        return SegmenterSettings(
            job.model or self.proposals.model,
            self.vocabulary,
            device="cpu",
            num_threads=max(1, int(job.cpus_per_actor)),
        )


def make_plan(job: RelabelJob) -> RelabelPlan:
    """Read the source's job and proposals, check the model, resolve the vocabulary, fix the run id.

    Raises NoProposalsError, ModelMismatchError, and OutputMismatchError when the output is the source.
    """
    fs, root = storage.url_to_fs(job.source, job.storage_options)
    stored = stored_proposals(fs, root, job.storage_options)
    info = stored.info
    source_job = storage.read_json(fs, storage.join(root, JOB_FILE))
    model = describe_model(job.model or info.model)
    if model.model_id != info.model_id:
        raise ModelMismatchError(
            f"{storage.full_uri(fs, root)} holds proposals of model {info.model_id}; "
            f"{job.model or info.model} is {model.model_id}. Relabel with the model that labelled it."
        )
    vocabulary = model.resolve_vocabulary(job.vocabulary)
    source = storage.full_uri(fs, root)
    if canonical_uri(job.output, job.storage_options) == source:
        raise OutputMismatchError(f"{source} is the source: relabel into a new output")
    run_id = job.run_id
    if run_id is None:
        content = {
            **_identity(job, source, source_job, model, vocabulary),
            "output": canonical_uri(job.output, job.storage_options),
        }
        run_id = "relabel-" + hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
    return RelabelPlan(source, source_job, info, stored, model, vocabulary, run_id)


def _identity(job, source: str, source_job, model: ModelInfo, vocabulary: Vocabulary) -> dict[str, Any]:
    return {
        "source": source,
        "source_run_id": source_job.get("run_id"),
        "model_id": model.model_id,
        "vocabulary_id": vocabulary.id,
        "resolution": job.resolution,
    }


def job_record(job: RelabelJob, plan: RelabelPlan) -> dict[str, Any]:
    """``NEW_OUTPUT/job.json``: names the source run and the model, like a labelling output's."""
    return {
        "kind": "relabel",
        **_identity(job, plan.source, plan.source_job, plan.model, plan.vocabulary),
        "input": plan.source_job.get("input"),  # the images the source labelled
        "output": canonical_uri(job.output, job.storage_options),
        "model": plan.proposals.model,
        "vocabulary": plan.vocabulary.name or ",".join(plan.vocabulary.names[:20]),
        "num_classes": len(plan.vocabulary),
        "run_id": plan.run_id,
        "proposals_encoding": plan.proposals.encoding,
        "actors": job.actors,
        "cpus_per_actor": job.cpus_per_actor,
        "schema_version": SCHEMA_VERSION,
        "ebseg_version": ebseg.__version__,
        "ray_version": version("ray"),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def source_shards(job: RelabelJob, plan: RelabelPlan) -> list[SourceShard]:
    """The source's committed shards, each with its images parts and their proposals parts."""
    fs, root = storage.url_to_fs(job.source, job.storage_options)
    elsewhere = plan.stored.uri != storage.full_uri(fs, root)
    # A relabelled source: its shards' proposals are listed by the manifests of the output holding them.
    held = plan.stored.shard_parts() if elsewhere else {}
    shards = []
    for path in manifest_paths(fs, root):
        manifest = storage.read_json(fs, path)
        where = f"manifest {storage.full_uri(fs, path)}"
        images = manifest_files(manifest, where=where)
        if not elsewhere:
            proposals = manifest_files(manifest, where=where, proposals=True)
            if len(proposals) != len(images):
                raise NoProposalsError(
                    f"{where} lists {len(images)} images parts but {len(proposals)} proposals"
                )
        elif manifest["shard_id"] in held:
            proposals = held[manifest["shard_id"]]
        else:
            raise NoProposalsError(f"{plan.stored.uri} has no committed shard {manifest['shard_id']!r}")
        shards.append(SourceShard(manifest["shard_id"], int(manifest["rows"]), images, proposals))
    return shards


def preview(job: RelabelJob) -> dict[str, Any]:
    """What ``run(job)`` would do (``ebseg relabel --dry-run``), refusals included, writing nothing: the
    plan, where the proposals are read from, the source's committed shards and those already relabelled."""
    plan = make_plan(job)
    shards = source_shards(job, plan)
    fs, root = storage.url_to_fs(job.output, job.storage_options)
    done = committed_shards(fs, root)
    return {
        "run_id": plan.run_id,
        "model_id": plan.model.model_id,
        "vocabulary": brief(plan.vocabulary),
        "source": plan.source,
        "proposals_in": plan.stored.uri,
        "proposals_encoding": plan.proposals.encoding,
        "shards": len(shards),
        "images": sum(s.rows for s in shards),
        "output": storage.full_uri(fs, root),
        "committed": sum(s.shard_id in done for s in shards),
        "to_run": sum(s.shard_id not in done for s in shards),
    }
