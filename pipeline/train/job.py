"""``TrainJob``: a training run's fields, defaults, help and checks (``ebseg train`` spells them).

Defaults are the paper's recipe (EBSeg-B: lr 1e-4, weight decay 0.05, poly 0.9, full-model clipping at 0.01,
120k steps, 16 images per step as 4 workers x 4, fp16 AMP on GPU).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from ebseg.data.transforms import AUGMENT_PRESETS, AugmentConfig, augment_config
from ebseg.losses.config import PRESETS as LOSS_PRESETS
from ebseg.precision import AutocastName
from pipeline import storage
from pipeline.jobmodel import (
    JobModel,
    NonNegFloat,
    NonNegInt,
    PosFloat,
    PosInt,
    StorageOptions,
    Text,
    VocabularyValue,
)

# "reference": CLIP and SAM frozen but their positional embeddings (the paper); "all": everything but the
# text encoder trains (for models from random weights, such as the demo).
TRAINABLE_POLICIES = ("reference", "all")
RunName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


class TrainJob(JobModel):
    """One training run: ``STORAGE/NAME`` holds its checkpoints, metrics, job.json and final.pt."""

    KIND = "train"

    name: RunName = Field(description="run name under --storage; rerunning a name resumes it")
    storage: Text = Field(description="where runs and checkpoints live (path or URI)")
    data: Text = Field(description="image/annotation pairs: folder layout (images/, annotations/) or Parquet")
    val_data: Text | None = Field(None, description="held-out pairs for periodic mIoU")
    vocabulary: VocabularyValue | None = Field(None, description="class names; default: DATA/vocabulary.json")
    model: Text = Field(
        "base", description="a preset to start from (random weights) or an ebseg / official checkpoint"
    )
    clip_pretrained: Text | None = Field(
        None, description="CLIP initial weights for a preset: open_clip tag (openai) or a path/URI"
    )
    sam_checkpoint: Text | None = Field(
        None, description="SAM initial weights for a preset: sam_vit_b_01ec64.pth path or URI"
    )
    trainable: Literal[TRAINABLE_POLICIES] = Field(  # type: ignore[valid-type]
        "reference", description="reference: the paper's frozen encoders; all: all but the text encoder"
    )
    steps: PosInt = Field(120_000, description="optimiser steps")
    batch_size: PosInt = Field(4, description="images per worker per micro-batch")
    workers: PosInt = Field(4, description="Ray Train workers (the data position counts batches per worker)")
    use_gpu: bool = Field(False, description="one GPU per worker, NCCL")
    cpus_per_worker: PosFloat = Field(
        1.0, description="CPUs per worker; leave some to the data tasks on small machines (0.5 on 2 cores)"
    )
    lr: PosFloat = Field(1e-4, description="AdamW learning rate")
    weight_decay: NonNegFloat = Field(0.05, description="AdamW weight decay (not on norms and embeddings)")
    poly_power: NonNegFloat = Field(0.9, description="poly learning-rate decay exponent")
    clip_grad_norm: PosFloat | None = Field(0.01, description="joint L2 norm of the gradients; none: off")
    grad_accumulation: PosInt = Field(1, description="micro-batches per optimiser step")
    amp: AutocastName | None = Field(
        "fp16", description="autocast on GPU (fp16 with a gradient scaler); CPU: off"
    )
    loss: Literal[tuple(LOSS_PRESETS)] = Field("reference", description="loss preset")  # type: ignore[valid-type]
    augment: Literal[tuple(AUGMENT_PRESETS)] = Field(  # type: ignore[valid-type]
        "reference", description="augmentation preset"
    )
    crop_size: PosInt | None = Field(None, description="the augmentation preset rescaled to this crop size")
    checkpoint_every: PosInt = Field(10_000, description="steps between checkpoints")
    keep_checkpoints: PosInt | None = Field(2, description="newest checkpoints kept; none keeps all")
    val_every: PosInt = Field(10_000, description="steps between validations")
    val_images: PosInt | None = Field(None, description="validate on the first N held-out images only")
    log_every: PosInt = Field(20, description="steps between reports to Ray (checkpoints report too)")
    seed: NonNegInt = Field(0, description="weights, data order and augmentation seed")
    max_failures: NonNegInt = Field(0, description="worker-group restarts from the newest checkpoint")
    storage_options: StorageOptions = Field(
        None, repr=False, description="fsspec option (repeatable); never credentials: use AWS_* variables"
    )

    @property
    def run_uri(self) -> str:
        return storage.join(self.storage, self.name)

    @property
    def images_per_step(self) -> int:
        return self.batch_size * self.grad_accumulation * self.workers

    def augment_config(self) -> AugmentConfig:
        config = augment_config(self.augment)
        return config if self.crop_size is None else config.with_crop_size(self.crop_size)

    def to_dict(self) -> dict[str, Any]:
        """The job as ``job.json`` stores it (JSON types): never the storage options, which may carry
        credentials (from Python nothing refuses them), and no URL's ``user:password@``."""
        fields = self.model_dump(mode="json", exclude={"storage_options"})
        return {k: storage.redact(v) if isinstance(v, str) else v for k, v in fields.items()}
