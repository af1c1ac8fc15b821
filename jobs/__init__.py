"""User-facing jobs: specs (``jobs.specs``: a pipeline job and its kind), flags, the ``ebseg`` command."""

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
