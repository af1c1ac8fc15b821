"""The demo-training recipe in benchmarks/README.md is an ``ebseg train`` command whose settings are those
the shipped ``demo.pt`` was trained with."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import torch

from ebseg.zoo import DEMO_WEIGHTS
from jobs.cli import build_parser
from jobs.flags import spec_from_args

README = Path(__file__).resolve().parents[2] / "benchmarks" / "README.md"


def train_command() -> list[str]:
    text = README.read_text(encoding="utf-8").replace("\\\n", " ")
    [line] = [m for m in re.findall(r"^ebseg train .*$", text, re.M)]
    return shlex.split(line)[1:]


def test_the_recipe_is_an_ebseg_train_command_with_the_demo_settings():
    args = build_parser().parse_args(train_command())
    job = spec_from_args(args, "train").to_job()
    demo = torch.load(DEMO_WEIGHTS, map_location="cpu", weights_only=True, mmap=True)
    assert (job.name, job.steps, job.model) == (demo["run"], demo["step"], demo["config"]["name"])
    augment = job.augment_config()  # the small preset at the demo's 128 px (it was trained at that scale)
    assert (augment.crop_size, augment.short_sides, augment.max_size) == (128, (96, 112, 128, 144, 160), 512)
    assert augment.crop_size == demo["config"]["short_side"]
    assert (job.trainable, job.loss, job.batch_size, job.workers, job.lr) == ("all", "tiny", 4, 2, 1e-3)
