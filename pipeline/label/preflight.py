"""The checks a labelling job passes before it takes the output's lease or starts any Ray worker.

A job that cannot finish should say so in one line before a cluster spins up its actors, and leave nothing
in the output that a rerun would have to trust. ``preflight`` checks, in order:

- the model: its description (``ebseg.zoo.describe_model``: for a checkpoint, its config, read once and
  handed on to the plan) and the vocabulary it labels with;
- the vocabulary: every class name fits the text tower's context (77 tokens for CLIP) in every prompt,
  since the tokenizer would cut a longer one silently;
- the input: its listing yields at least one shard, and the first item of that shard can be read;
- the output: a probe object is written and deleted under it. On object stores nothing is created on the
  way (``pipeline.storage`` never creates a bucket), so a missing bucket is an error, as are permission
  denied and a full disk.
"""

from __future__ import annotations

import uuid

from ebseg.modeling.text_classifier import overlong_names
from ebseg.zoo import describe_model
from pipeline import storage
from pipeline.label.job import LabelJob
from pipeline.label.listing import list_shards
from pipeline.label.plan import LabelPlan, make_plan

PROBE_PREFIX = ".ebseg-write-probe-"


class PreflightError(RuntimeError):
    """The job cannot run as given; the message says which check failed, in one line."""


def _why(e: BaseException) -> str:
    return storage.redact(f"{type(e).__name__}: {e}".replace("\n", " "))


def preflight(job: LabelJob) -> LabelPlan:
    """Check ``job`` can run (see the module docstring); return its plan, or raise PreflightError."""
    try:
        model = describe_model(job.model)
    except Exception as e:  # a missing file, a foreign or damaged checkpoint: all end the job here
        raise PreflightError(f"model {job.model!r} cannot be used: {_why(e)}") from e
    try:
        plan = make_plan(job, model=model)
    except Exception as e:  # not a benchmark, file or list; none given to a model that carries none
        raise PreflightError(f"vocabulary: {_why(e)}") from e
    check_vocabulary(plan)
    check_input(job)
    check_output(job)
    return plan


def check_vocabulary(plan: LabelPlan) -> None:
    context = plan.model.context_length
    overlong = overlong_names(plan.vocabulary.names, context_length=context)
    if overlong:
        shown = ", ".join(repr(n[:60] + ("..." if len(n) > 60 else "")) for n in overlong[:3])
        more = f" and {len(overlong) - 3} more" if len(overlong) > 3 else ""
        raise PreflightError(
            f"vocabulary: {len(overlong)} class name(s) do not fit the text encoder's {context} tokens in "
            f"its prompts: {shown}{more}; shorten them"
        )


def check_input(job: LabelJob) -> None:
    """The listing yields a shard and the shard's first file opens and gives bytes."""
    try:
        first = next(
            iter(
                list_shards(
                    job.input,
                    storage_options=job.storage_options,
                    files_per_shard=job.files_per_shard,
                    image_column=job.image_column,
                )
            )
        )
    except Exception as e:  # list_shards raises FileNotFoundError on an input with nothing to label
        raise PreflightError(f"input {job.input!r} cannot be listed: {_why(e)}") from e
    uri = first.uris[0]
    try:
        fs, path = storage.url_to_fs(uri, job.storage_options)
        with fs.open(path, "rb") as f:
            f.read(1)
    except Exception as e:
        raise PreflightError(f"input: the first file, {uri}, cannot be read: {_why(e)}") from e


def check_output(job: LabelJob) -> None:
    """Write and delete a probe object under the output (local directories are created as needed)."""
    try:
        fs, root = storage.url_to_fs(job.output, job.storage_options)
        probe = storage.join(root, f"{PROBE_PREFIX}{uuid.uuid4().hex}")
        storage.write_bytes_atomic(fs, probe, b"ebseg\n")
        fs.rm_file(probe)
    except Exception as e:
        raise PreflightError(f"output {job.output!r} is not writable: {_why(e)}") from e
