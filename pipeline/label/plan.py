"""What a labelling job resolves to before anything runs, and its claim on the output.

``make_plan`` resolves the vocabulary, describes the model (``ebseg.zoo.describe_model``, which warns once
when its weights are random) and fixes the run id. ``claim_output`` writes ``job.json`` and
``vocabulary.json`` into a new output, or checks that an existing one holds this same job (a resume).

``run_id``: unless the job names one, it is derived from the job's content (input, output, model id,
vocabulary id and the settings that decide shards and results), so a resumed run carries the same run id
as the attempt it continues, and the id never depends on when a run started.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from typing import Any

import ebseg
from ebseg.vocab import Vocabulary
from ebseg.zoo import ModelInfo, SegmenterSettings, describe_model
from pipeline import storage
from pipeline.label.job import LabelJob
from pipeline.label.proposal_records import ENCODINGS, ProposalsInfo
from pipeline.layout import JOB_FILE, PROPOSALS_FILE, SCHEMA_VERSION, VOCABULARY_FILE

# Job fields that decide which shards exist and what a record holds: a rerun must agree on all of them.
IDENTITY_FIELDS = (
    "input",
    "model_id",
    "vocabulary_id",
    "files_per_shard",
    "image_column",
    "max_pixels",
    "proposals",
)


class OutputMismatchError(ValueError):
    """The output already holds a run of a different job (model, vocabulary, input or shard settings)."""


@dataclass(frozen=True)
class LabelPlan:
    """What a job resolves to before anything runs."""

    vocabulary: Vocabulary
    model: ModelInfo
    run_id: str
    device: str

    def segmenter_settings(self, job: LabelJob) -> SegmenterSettings:
        """What each model actor builds its Segmenter from."""
        return SegmenterSettings(
            job.model,
            self.vocabulary,
            batch_size=job.batch_size,
            device=self.device,
            amp_dtype=job.amp_dtype,
            num_threads=max(1, int(job.cpus_per_actor)),
            compile=job.compile,
        )

    def proposals_encoding(self, job: LabelJob) -> tuple[str, str] | None:
        """(mask, embedding) encoding of the proposals the job stores; None when it stores none."""
        return ENCODINGS[job.proposals_encoding] if job.proposals else None


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
        # None without proposals: a run with and one without differ in what a committed shard holds.
        "proposals": job.proposals_encoding if job.proposals else None,
    }


def make_plan(job: LabelJob, *, model: ModelInfo | None = None) -> LabelPlan:
    """Resolve the vocabulary, describe the model (without building it) and fix the run id.

    model: ``job.model`` described already (the preflight reads the checkpoint's config once).
    """
    model = model or describe_model(job.model)
    vocabulary = model.resolve_vocabulary(job.vocabulary)  # omitted: the one the model was trained on
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
        "rows_per_block": job.rows_per_block,
        "actors": list(job.actors) if isinstance(job.actors, tuple) else job.actors,
        "gpus_per_actor": job.gpus_per_actor,
        "cpus_per_actor": job.cpus_per_actor,
        "device": plan.device,
        "amp_dtype": job.amp_dtype,
        "encode_in_actor": job.encode_in_actor,
        "schema_version": SCHEMA_VERSION,
        "ebseg_version": ebseg.__version__,
        "ray_version": version("ray"),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def proposals_info(job: LabelJob, plan: LabelPlan) -> ProposalsInfo | None:
    """``OUT/proposals.json`` of a job that stores proposals (None for one that does not)."""
    if not job.proposals:
        return None
    return ProposalsInfo.for_run(
        job.proposals_encoding, model=job.model, model_id=plan.model.model_id, run_id=plan.run_id
    )


def claim_output(
    fs,
    root: str,
    record: Mapping[str, Any],
    vocabulary: Vocabulary,
    *,
    explicit_run_id: bool,
    proposals: ProposalsInfo | None = None,
    identity: tuple[str, ...] = IDENTITY_FIELDS,
) -> bool:
    """Write ``job.json`` and ``vocabulary.json`` (and ``proposals.json``), or check an existing
    ``job.json`` agrees with this job.

    Returns True when the output already held this job (a resume). Raises OutputMismatchError naming every
    field of ``identity`` that differs (a relabelling passes its own).
    """
    path = storage.join(root, JOB_FILE)
    if not fs.exists(path):
        storage.write_json_atomic(fs, storage.join(root, VOCABULARY_FILE), vocabulary.to_dict())
        if proposals is not None:
            storage.write_json_atomic(fs, storage.join(root, PROPOSALS_FILE), proposals.to_dict())
        storage.write_json_atomic(fs, path, dict(record))  # last: its presence says the others are there
        return False
    previous = storage.read_json(fs, path)
    fields = [*identity, "schema_version"] + (["run_id"] if explicit_run_id else [])
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
