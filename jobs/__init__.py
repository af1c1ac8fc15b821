"""User-facing jobs: validated specs (``jobs.specs``) that build the pipeline's job configs."""

from jobs.specs import (
    EvalSpec,
    LabelSpec,
    Spec,
    SpecError,
    TrainSpec,
    dump_spec,
    load_spec,
    parse_spec,
    spec_from_flags,
)

__all__ = [
    "EvalSpec",
    "LabelSpec",
    "Spec",
    "SpecError",
    "TrainSpec",
    "dump_spec",
    "load_spec",
    "parse_spec",
    "spec_from_flags",
]
