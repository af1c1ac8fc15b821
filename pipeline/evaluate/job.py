"""``EvalJob``: an evaluation run's fields, defaults, help and checks (``ebseg eval`` spells them)."""

from __future__ import annotations

from pydantic import Field

from ebseg.precision import AmpName
from pipeline.jobmodel import JobModel, NonNegFloat, PosFloat, PosInt, StorageOptions, Text, VocabularyValue


class EvalJob(JobModel):
    """An evaluation run: mIoU of ``model`` on the pair set ``data``, written to ``<output>/metrics.json``."""

    KIND = "eval"

    data: Text = Field(description="image/annotation pairs: folder layout (images/, annotations/) or Parquet")
    output: Text = Field(description="a folder URI; the run writes <output>/metrics.json")
    model: Text = Field("demo", description="demo | tiny (random weights) | base | large | checkpoint path")
    vocabulary: VocabularyValue | None = Field(
        None, description="class i = label value i; default: DATA/vocabulary.json"
    )
    batch_size: PosInt = Field(4, description="images per model batch")
    actors: PosInt = Field(1, description="model actors")
    gpus_per_actor: NonNegFloat = Field(0.0, description="GPUs per model actor (0 runs on CPU)")
    cpus_per_actor: PosFloat = Field(1.0, description="CPUs per model actor (also its torch threads)")
    device: Text | None = Field(None, description="actors' torch device; default: cuda with GPUs, else cpu")
    amp_dtype: AmpName | None = Field(None, description="autocast dtype on GPU; default fp32")
    storage_options: StorageOptions = Field(
        None, repr=False, description="fsspec option (repeatable); never credentials: use AWS_* variables"
    )
    limit: PosInt | None = Field(None, description="evaluate only the first N images by id")
