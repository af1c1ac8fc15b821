"""Job specs: the validated, user-facing form of a labelling, training or evaluation run.

A spec is a YAML or JSON mapping with a ``kind`` (``label`` / ``train`` / ``eval`` / ``relabel``) and the
fields of that kind's job (``LabelJob``, ``TrainJob``, ``EvalJob``, ``RelabelJob`` in ``pipeline.label.job``,
``pipeline.train.job``, ``pipeline.evaluate.job``, ``pipeline.relabel.job`` define their fields, defaults,
help and checks, once); unknown keys are refused.
CLI flags build the same models (``jobs.flags``), so a flag and a spec key are two spellings of one value.
``Spec.to_job()`` gives the pipeline's job. Every problem in a spec is reported at once, in one
``SpecError`` naming each field by its dotted path, before any work starts.

Credentials never appear in specs: a key that looks like one (``secret``, ``token``, ``aws_access_key_id``,
...) is refused anywhere in a spec, ``storage_options`` included. They come from the environment (``AWS_*``
variables, ``AWS_ENDPOINT_URL`` for S3-compatible stores); ``storage_options`` keeps non-secret settings such
as ``endpoint_url``, ``anon`` or ``client_kwargs: {region_name: ...}``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import Discriminator, TypeAdapter, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from pipeline.evaluate.job import EvalJob
from pipeline.jobmodel import JobModel, SpecError, StorageOptions, spec_error
from pipeline.label.job import LabelJob
from pipeline.relabel.job import RelabelJob
from pipeline.train.job import TrainJob

# Keys that name a secret; s3fs spells its credentials key / secret / token.
_CREDENTIAL_WORDS = ("secret", "password", "passwd", "token", "credential", "access_key", "private_key",
                     "api_key", "apikey")  # fmt: skip
_CREDENTIAL_KEYS = frozenset({"key", "aws_access_key_id", "aws_secret_access_key", "aws_session_token"})
CREDENTIAL_HINT = (
    "specs never hold credentials; set them in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
    "AWS_SESSION_TOKEN, and AWS_ENDPOINT_URL for S3-compatible stores)"
)


def looks_like_credential(key: str) -> bool:
    k = re.sub(r"[^a-z0-9]+", "_", str(key).lower())
    return k in _CREDENTIAL_KEYS or any(word in k for word in _CREDENTIAL_WORDS)


def credential_paths(value: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every mapping key under ``value`` (at any depth) that looks like a credential."""
    found: list[str] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if looks_like_credential(key):
                found.append(path)
            found.extend(credential_paths(item, path))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found.extend(credential_paths(item, f"{prefix}[{i}]"))
    return found


class _SpecRules:
    """What a spec adds to its job: the ``kind`` (in each class), and the refusal of credential-like keys
    anywhere, checked before and after the flags' ``KEY=VALUE`` storage options are parsed."""

    JOB: ClassVar[type[JobModel]]

    @model_validator(mode="before")
    @classmethod
    def _refuse_credentials(cls, data: Any) -> Any:
        _refuse(credential_paths(data))
        return data

    @model_validator(mode="after")
    def _refuse_credential_options(self):
        _refuse([f"storage_options.{p}" for p in credential_paths(self.storage_options or {})])
        return self

    def to_job(self):
        """The pipeline's job these fields describe."""
        return self.JOB(**self.model_dump(exclude={"kind"}))


def _refuse(paths: list[str]) -> None:
    if paths:
        context = {"paths": paths, "hint": CREDENTIAL_HINT}
        raise PydanticCustomError("credential_field", "looks like a credential; {hint}", context)


class LabelSpec(_SpecRules, LabelJob):
    """``ebseg label``"""

    JOB: ClassVar[type[JobModel]] = LabelJob
    kind: Literal["label"] = "label"


class TrainSpec(_SpecRules, TrainJob):
    """``ebseg train``"""

    JOB: ClassVar[type[JobModel]] = TrainJob
    kind: Literal["train"] = "train"


class EvalSpec(_SpecRules, EvalJob):
    """``ebseg eval``"""

    JOB: ClassVar[type[JobModel]] = EvalJob
    kind: Literal["eval"] = "eval"


class RelabelSpec(_SpecRules, RelabelJob):
    """``ebseg relabel``"""

    JOB: ClassVar[type[JobModel]] = RelabelJob
    kind: Literal["relabel"] = "relabel"


AnySpec = LabelSpec | TrainSpec | EvalSpec | RelabelSpec
Spec = Annotated[AnySpec, Discriminator("kind")]
SPEC_TYPES: dict[str, type[JobModel]] = {
    "label": LabelSpec,
    "train": TrainSpec,
    "eval": EvalSpec,
    "relabel": RelabelSpec,
}
KINDS = tuple(SPEC_TYPES)
_ADAPTER: TypeAdapter[AnySpec] = TypeAdapter(Spec)


# ------------------------------------------------------------------------------------------ entry points


def parse_spec(data: Mapping[str, Any], *, source: str | None = None) -> AnySpec:
    """A spec from a mapping with a ``kind`` key; raises ``SpecError`` listing every problem."""
    if not isinstance(data, Mapping):
        got = type(data).__name__
        problem = f"spec: must be a mapping with a 'kind' ({', '.join(KINDS)}), got {got}"
        raise SpecError([problem], source=source)
    if "kind" not in data:
        raise SpecError([f"kind: required field is missing; one of {', '.join(KINDS)}"], source=source)
    try:
        return _ADAPTER.validate_python(dict(data))
    except ValidationError as e:
        raise spec_error(e, SPEC_TYPES, source=source) from None


def spec_from_flags(kind: str, **flags: Any) -> AnySpec:
    """The spec CLI flags spell: ``spec_from_flags("label", input=..., vocabulary="cat,dog", actors="1-4")``.

    Flags left at None (argparse's "not given") take the spec's default; values may be CLI strings ("4",
    "1-4", "cat,dog", ["endpoint_url=http://...", "anon=false"] for ``storage_options``).
    """
    return parse_spec({"kind": kind, **{k: v for k, v in flags.items() if v is not None}}, source="flags")


def storage_options_from_flags(items: Sequence[str]) -> dict[str, Any]:
    """Repeated ``--storage-option KEY=VALUE`` flags -> a mapping, with the spec's rules (no credentials)."""
    try:
        options = TypeAdapter(StorageOptions).validate_python(list(items)) or {}
    except ValidationError as e:
        problems = [f"--storage-option: {err['msg']}" for err in e.errors(include_url=False)]
        raise SpecError(problems, source="flags") from None
    paths = credential_paths(options)
    if paths:
        problems = [f"--storage-option {p}: looks like a credential" for p in paths]
        raise SpecError([*problems, f"credentials: {CREDENTIAL_HINT}"], source="flags")
    return options


def load_spec(path_or_text: str | os.PathLike[str]) -> AnySpec:
    """A spec from a YAML or JSON file, or from the YAML / JSON text itself."""
    data, source = read_spec_data(path_or_text)
    return parse_spec(data, source=source)


def read_spec_data(path_or_text: str | os.PathLike[str]) -> tuple[Any, str | None]:
    """The raw mapping of a YAML / JSON spec file or text, unvalidated, and the file name (None for text)."""
    text, source = str(path_or_text), None
    if isinstance(path_or_text, os.PathLike) or ("\n" not in text and not text.lstrip().startswith("{")):
        path = Path(path_or_text)
        if not path.is_file():
            raise SpecError([f"spec: no such spec file: {path}"])
        text, source = path.read_text(encoding="utf-8"), str(path)
    try:
        # JSON is read as JSON (exact errors); everything else as YAML (a superset of JSON).
        data = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise SpecError([f"not valid YAML or JSON: {e}"], source=source) from None
    return data, source


def dump_spec(spec: AnySpec) -> str:
    """The spec as YAML that ``load_spec`` reads back to an equal spec (``kind`` first)."""
    fields = spec.model_dump(mode="json")
    return yaml.safe_dump({"kind": fields.pop("kind"), **fields}, sort_keys=False)
