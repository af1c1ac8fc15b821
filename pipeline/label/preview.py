"""``ebseg label --dry-run``: what a labelling job would do, described without running or writing."""

from __future__ import annotations

from typing import Any

from ebseg.vocab import Vocabulary
from pipeline import storage
from pipeline.label.job import LabelJob
from pipeline.label.listing import list_shards
from pipeline.label.plan import make_plan
from pipeline.layout import committed_shards


def brief(vocabulary: Vocabulary) -> dict[str, Any]:
    """A vocabulary as a dry run shows it: id, name (None for a list of names) and names."""
    return {"id": vocabulary.id, "name": vocabulary.name, "names": list(vocabulary.names)}


def preview(job: LabelJob, *, shown: int = 10, max_shards: int = 100_000) -> dict[str, Any]:
    """What ``run(job)`` would do, without running or writing anything (``ebseg label --dry-run``).

    Lists the input (at most ``max_shards`` shards, then stops and says so), counts images where the
    listing knows them (file shards; a tar's or Parquet file's images are counted when read), and the shards
    already committed in the output. ``listed`` describes the first ``shown`` shards. (Whether the output
    would refuse the job is checked when it runs: ``claim_output``.)
    """
    plan = make_plan(job)
    fs, root = storage.url_to_fs(job.output, job.storage_options)
    done = committed_shards(fs, root)
    found = {"shards": 0, "images": 0, "uncounted_shards": 0, "committed": 0, "to_run": 0, "truncated": False}
    listed: list[dict[str, Any]] = []
    shards = list_shards(
        job.input,
        storage_options=job.storage_options,
        files_per_shard=job.files_per_shard,
        image_column=job.image_column,
    )
    for shard in shards:
        if found["shards"] == max_shards:
            found["truncated"] = True
            break
        found["shards"] += 1
        committed = shard.shard_id in done
        found["committed" if committed else "to_run"] += 1
        if shard.kind == "files":
            found["images"] += len(shard.uris)
        else:
            found["uncounted_shards"] += 1
        if len(listed) < shown:
            images = len(shard.uris) if shard.kind == "files" else None
            listed.append({"shard_id": shard.shard_id, "kind": shard.kind, "first": shard.uris[0],
                           "images": images, "committed": committed})  # fmt: skip
    return {
        "run_id": plan.run_id,
        "model_id": plan.model.model_id,
        "vocabulary": brief(plan.vocabulary),
        "device": plan.device,
        "output": storage.full_uri(fs, root),
        **found,
        "listed": listed,
    }
