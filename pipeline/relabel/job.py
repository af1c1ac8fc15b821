"""``RelabelJob``: a relabelling run's fields, defaults, help and checks (``ebseg relabel`` spells them)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.jobmodel import JobModel, NonNegInt, PosFloat, PosInt, StorageOptions, Text, VocabularyValue


class RelabelJob(JobModel):
    """A labelling output stored with proposals (``ebseg label --proposals``) labelled again with another
    vocabulary. ``storage_options`` apply to source and output (never stored)."""

    KIND = "relabel"

    source: Text = Field(description="a labelling output stored with --proposals (path or URI)")
    output: Text = Field(description="the new output directory or URI")
    vocabulary: VocabularyValue = Field(
        description="benchmark (ade150, coco171, voc20, pc59, pc459, ade847), a file, or 'cat,dog,tree'"
    )
    resolution: Literal["original", "grid"] = Field(
        "original",
        description="original: label maps computed at the original size, as labelling does; grid: computed "
        "on the model's stride-4 grid and enlarged (nearest), much cheaper on large images",
    )
    model: Text | None = Field(
        None,
        description="where to load the source's model from (default: the --model the source run used); "
        "refused unless it is the same model",
    )
    actors: PosInt = Field(1, description="relabelling actors (CPU), each loading the model once")
    cpus_per_actor: PosFloat = Field(1.0, description="CPUs per actor (also its torch threads)")
    storage_options: StorageOptions = Field(
        None, repr=False, description="fsspec option (repeatable); never credentials: use AWS_* variables"
    )
    run_id: Text | None = Field(None, description="default: derived from the job (a resume keeps it)")
    max_restarts: NonNegInt = Field(
        3, description="restarts of a dead actor (and retries of its shard) before the run fails"
    )
    progress: bool = Field(True, description="print a progress line while relabelling")
