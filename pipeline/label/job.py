"""``LabelJob``: a labelling run's fields, defaults, help and checks (``ebseg label`` spells them)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ebseg.precision import AmpName
from pipeline.jobmodel import (
    Actors,
    JobModel,
    NonNegFloat,
    NonNegInt,
    PosFloat,
    PosInt,
    StorageOptions,
    Text,
    VocabularyValue,
)
from pipeline.label.decode import DEFAULT_MAX_PIXELS


class LabelJob(JobModel):
    """Everything a labelling run needs. ``storage_options`` apply to input and output (never stored)."""

    KIND = "label"

    input: Text = Field(description="images, .tar shards or Parquet files: a path, prefix, glob or URI")
    output: Text = Field(description="output directory or URI")
    vocabulary: VocabularyValue | None = Field(
        None,
        description="benchmark (ade150, coco171, voc20, pc59, pc459, ade847), a file, or 'cat,dog,tree'; "
        "default: the vocabulary the model was trained on (demo and `ebseg train` checkpoints carry it)",
    )
    model: Text = Field("demo", description="demo | tiny (random weights) | base | large | checkpoint path")
    batch_size: PosInt = Field(4, description="images per model batch")
    rows_per_block: PosInt = Field(
        128, description="images per Ray Data block (the driver's per-block cost is spread over them)"
    )
    actors: Actors = Field(1, description="model actors: a count, or MIN-MAX for an autoscaling pool")
    gpus_per_actor: NonNegFloat = Field(
        0.0, description="GPUs per model actor (fractions share a GPU; 0 runs on CPU)"
    )
    cpus_per_actor: PosFloat = Field(1.0, description="CPUs per model actor (also its torch threads)")
    max_pixels: PosInt = Field(
        DEFAULT_MAX_PIXELS, description="larger images become error rows, refused from their header"
    )
    files_per_shard: PosInt = Field(256, description="image files per shard, the unit of work and resume")
    image_column: Text = Field("image", description="the image-bytes column of Parquet inputs")
    storage_options: StorageOptions = Field(
        None, repr=False, description="fsspec option (repeatable); never credentials: use AWS_* variables"
    )
    run_id: Text | None = Field(None, description="default: derived from the job (a resume keeps it)")
    amp_dtype: AmpName | None = Field("bf16", description="autocast dtype on GPU; ignored on CPU")
    device: Text | None = Field(None, description="actors' torch device; default: cuda with GPUs, else cpu")
    compile: bool = Field(
        False, description="torch.compile the model in each actor (slow first batch, faster after; opt-in)"
    )
    encode_in_actor: bool = Field(
        False, description="encode records inside the model actor instead of a separate CPU stage"
    )
    proposals: bool = Field(
        False,
        description="also store each image's vocabulary-free proposals, so `ebseg relabel` can apply "
        "another vocabulary later on CPU (about 0.1-0.7 MB per image)",
    )
    proposals_encoding: Literal["default", "lossless"] = Field(
        "default",
        description="default: float8 masks + float16 embeddings (labels agree with a fresh run on >= 99.9 "
        "percent of each image's pixels); lossless: float32 (identical labels, ~4x the bytes)",
    )
    max_restarts: NonNegInt = Field(
        3, description="restarts of a dead model actor (and retries of its batch) before the run fails"
    )
    progress: bool = Field(True, description="print a progress line while labelling")

    @property
    def actor_range(self) -> tuple[int, int]:
        """``actors`` as (min, max)."""
        return (self.actors, self.actors) if isinstance(self.actors, int) else self.actors
