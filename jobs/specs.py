"""Job specs: the validated, user-facing form of a labelling, training or evaluation run.

A spec is a YAML or JSON mapping with a ``kind`` (``label`` / ``train`` / ``eval``) and the fields of that
kind; unknown keys are refused. CLI flags build the same models (``spec_from_flags``), so a flag and a spec
key are two spellings of one value. ``Spec.to_job()`` turns a spec into the pipeline's own job config. Every
problem in a spec is reported at once, in one ``SpecError`` naming each field by its dotted path, before any
work starts.

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
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

if TYPE_CHECKING:  # the pipeline (torch, Ray) is imported by to_job only: validating a spec stays fast
    from pipeline.evaluate import EvalJob
    from pipeline.label import LabelJob
    from pipeline.train import TrainJob

KINDS = ("label", "train", "eval")
MAX_PIXELS = 8192 * 8192  # pipeline.decode.DEFAULT_MAX_PIXELS (a test keeps them equal)

# Keys that name a secret; s3fs spells its credentials key / secret / token.
_CREDENTIAL_WORDS = ("secret", "password", "passwd", "token", "credential", "access_key", "private_key",
                     "api_key", "apikey")  # fmt: skip
_CREDENTIAL_KEYS = frozenset({"key", "aws_access_key_id", "aws_secret_access_key", "aws_session_token"})
CREDENTIAL_HINT = (
    "specs never hold credentials; set them in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
    "AWS_SESSION_TOKEN, and AWS_ENDPOINT_URL for S3-compatible stores)"
)


class SpecError(ValueError):
    """A spec that cannot run; ``problems`` holds one ``"dotted.path: what is wrong"`` line per fault."""

    def __init__(self, problems: Sequence[str], *, source: str | None = None) -> None:
        self.problems = list(problems)
        head = f"{source}: invalid job spec" if source else "invalid job spec"
        super().__init__(head + "\n" + "\n".join(f"  {p}" for p in self.problems))


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


# ------------------------------------------------------------------------------------------ field types


def _no_bool(value: Any) -> Any:
    # pydantic's lax mode reads True as 1; a boolean where a number belongs is a mistake in a spec.
    if isinstance(value, bool):
        raise PydanticCustomError("bool_not_number", "must be a number, not a boolean")
    return value


def _actors(value: Any) -> Any:
    """A count (4, "4") or a (min, max) range ("1-4", [1, 4]) -> int or (min, max)."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", value)
        value = value if m is None else int(m[1]) if m[2] is None else [int(m[1]), int(m[2])]
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(a, int) and not isinstance(a, bool) for a in value)
        and 1 <= value[0] <= value[1]
    ):
        return tuple(value)
    raise PydanticCustomError("actors", "must be a count >= 1 or a range MIN-MAX with 1 <= MIN <= MAX (1-4)")


def _vocabulary(value: Any) -> Any:
    # A YAML list of names is the same vocabulary as "a,b,c" (Vocabulary.parse needs a comma for one name).
    if isinstance(value, list | tuple):
        names = [str(n).strip() for n in value]
        if not names or not all(names) or any("," in n for n in names):
            raise PydanticCustomError("vocabulary", "a list of names must be non-empty, names without ','")
        return ",".join(names) + ("," if len(names) == 1 else "")
    return value


def _storage_options(value: Any) -> Any:
    # The CLI's repeated --storage-option KEY=VALUE; values are read as YAML scalars (true, 3, text).
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        return value
    out: dict[str, Any] = {}
    for i, item in enumerate(value):
        key, sep, text = str(item).partition("=")
        if not sep or not key.strip():  # the item is not echoed: it may hold a secret
            raise PydanticCustomError("storage_option", "item {i} is not KEY=VALUE", {"i": i})
        out[key.strip()] = yaml.safe_load(text) if text else ""
    paths = credential_paths(out)  # the model's own check has seen only a list of strings
    if paths:
        raise PydanticCustomError("credential_field", "looks like a credential", {"paths": paths})
    return out


PosInt = Annotated[int, BeforeValidator(_no_bool), Field(ge=1)]
NonNegInt = Annotated[int, BeforeValidator(_no_bool), Field(ge=0)]
PosFloat = Annotated[float, BeforeValidator(_no_bool), Field(gt=0)]
NonNegFloat = Annotated[float, BeforeValidator(_no_bool), Field(ge=0)]
Text = Annotated[str, Field(min_length=1)]
Actors = Annotated[int | tuple[int, int], BeforeValidator(_actors), Field()]
VocabularyValue = Annotated[Text, BeforeValidator(_vocabulary)]
StorageOptions = Annotated[dict[str, Any] | None, BeforeValidator(_storage_options)]
# The pipeline's enumerations, spelled as Literals so an error lists them (tests keep them in step).
AmpDtype = Literal["bf16", "fp16", "fp32"]
TrainAmp = Literal["bf16", "fp16"]
Trainable = Literal["reference", "all"]
LossPreset = Literal["reference", "tiny"]
AugmentPreset = Literal["reference", "small"]


class _SpecBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _refuse_credentials(cls, data: Any) -> Any:
        paths = credential_paths(data)
        if paths:
            context = {"paths": paths, "hint": CREDENTIAL_HINT}
            raise PydanticCustomError("credential_field", "looks like a credential; {hint}", context)
        return data


class LabelSpec(_SpecBase):
    """``ebseg label``: see ``pipeline.label.LabelJob`` for the meaning of each field."""

    kind: Literal["label"] = "label"
    input: Text
    output: Text
    vocabulary: VocabularyValue
    model: Text = "demo"  # tiny / demo / base / large / a checkpoint path or URI
    batch_size: PosInt = 4
    actors: Actors = 1
    gpus_per_actor: NonNegFloat = 0.0
    cpus_per_actor: PosFloat = 1.0
    max_pixels: PosInt = MAX_PIXELS
    files_per_shard: PosInt = 256
    image_column: Text = "image"
    storage_options: StorageOptions = None
    run_id: Text | None = None
    amp_dtype: AmpDtype | None = "bf16"
    device: Text | None = None
    encode_in_actor: bool = False
    max_restarts: NonNegInt = 3
    progress: bool = True

    def to_job(self) -> LabelJob:
        from pipeline.label import LabelJob

        return LabelJob(**self.model_dump(exclude={"kind"}))


class TrainSpec(_SpecBase):
    """``ebseg train``: see ``pipeline.train.TrainJob`` (defaults are the paper's recipe)."""

    kind: Literal["train"] = "train"
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    storage: Text
    data: Text
    val_data: Text | None = None
    vocabulary: VocabularyValue | None = None
    model: Text = "base"
    clip_pretrained: Text | None = None
    sam_checkpoint: Text | None = None
    trainable: Trainable = "reference"
    steps: PosInt = 120_000
    batch_size: PosInt = 4
    workers: PosInt = 4
    use_gpu: bool = False
    cpus_per_worker: PosFloat = 1.0
    lr: PosFloat = 1e-4
    weight_decay: NonNegFloat = 0.05
    poly_power: NonNegFloat = 0.9
    clip_grad_norm: PosFloat | None = 0.01
    grad_accumulation: PosInt = 1
    amp: TrainAmp | None = "fp16"
    loss: LossPreset = "reference"
    augment: AugmentPreset = "reference"
    checkpoint_every: PosInt = 10_000
    keep_checkpoints: PosInt | None = 2
    val_every: PosInt = 10_000
    val_images: PosInt | None = None
    log_every: PosInt = 20
    seed: NonNegInt = 0
    max_failures: NonNegInt = 0
    storage_options: StorageOptions = None

    def to_job(self) -> TrainJob:
        from pipeline.train import TrainJob

        fields = self.model_dump(exclude={"kind"})
        fields["storage_options"] = fields["storage_options"] or {}
        return TrainJob(**fields)


class EvalSpec(_SpecBase):
    """``ebseg eval``: see ``pipeline.evaluate.EvalJob``."""

    kind: Literal["eval"] = "eval"
    data: Text
    output: Text
    model: Text = "demo"
    vocabulary: VocabularyValue | None = None
    batch_size: PosInt = 4
    actors: PosInt = 1
    gpus_per_actor: NonNegFloat = 0.0
    cpus_per_actor: PosFloat = 1.0
    device: Text | None = None
    amp_dtype: AmpDtype | None = None
    storage_options: StorageOptions = None
    limit: PosInt | None = None

    def to_job(self) -> EvalJob:
        from pipeline.evaluate import EvalJob

        return EvalJob(**self.model_dump(exclude={"kind"}))


Spec = Annotated[LabelSpec | TrainSpec | EvalSpec, Discriminator("kind")]
SPEC_TYPES: dict[str, type[_SpecBase]] = {"label": LabelSpec, "train": TrainSpec, "eval": EvalSpec}
_ADAPTER: TypeAdapter[LabelSpec | TrainSpec | EvalSpec] = TypeAdapter(Spec)


# ------------------------------------------------------------------------------------------ errors


_TYPE_MESSAGES = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "dict_type": "a mapping",
    "tuple_type": "a list",
}


def _dotted(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _problem(err: Mapping[str, Any], kind: str | None) -> list[str]:
    """One pydantic error -> lines ``"kind.field: what is wrong (got ...)"``."""
    loc = list(err["loc"])
    if kind is not None and (not loc or loc[0] != kind):
        loc.insert(0, kind)  # a single model's errors (no union tag in the location)
    ctx = err.get("ctx") or {}
    kind = loc[0] if loc and loc[0] in SPEC_TYPES else kind
    path, etype, got = _dotted(loc), err["type"], err.get("input")
    if etype == "credential_field":
        lines = [f"{_dotted([*loc, p])}: looks like a credential" for p in ctx["paths"]]
        return [*lines, f"credentials: {CREDENTIAL_HINT}"]
    if etype == "extra_forbidden":
        allowed = ", ".join(n for n in SPEC_TYPES[kind].model_fields if n != "kind") if kind else "?"
        return [f"{path}: unknown field; allowed: {allowed}"]
    if etype == "missing":
        return [f"{path}: required field is missing"]
    if etype in ("union_tag_invalid", "union_tag_not_found", "model_attributes_type"):
        if etype == "model_attributes_type":
            return [f"{path or 'spec'}: must be a mapping of fields (got {got!r})"]
        got_kind = f" (got {ctx['tag']!r})" if "tag" in ctx else ""
        return [f"kind: must be one of {', '.join(KINDS)}{got_kind}"]
    if etype == "literal_error":
        return [f"{path}: must be one of {ctx['expected']} (got {got!r})"]
    bounds = {"greater_than_equal": ">= {ge}", "greater_than": "> {gt}", "less_than_equal": "<= {le}"}
    if etype in bounds:
        return [f"{path}: must be {bounds[etype].format(**ctx)} (got {got!r})"]
    if etype == "string_pattern_mismatch":
        allowed = "letters, digits, '.', '_' or '-', starting with a letter or digit"
        return [f"{path}: must be {allowed} (got {got!r})"]
    if etype == "string_too_short":
        return [f"{path}: must not be empty"]
    if etype == "storage_option":  # never echo the input: it may hold a secret
        return [f"{path}: {err['msg']}"]
    if etype in _TYPE_MESSAGES:
        return [f"{path}: must be {_TYPE_MESSAGES[etype]} (got {got!r})"]
    message = err["msg"].removeprefix("Value error, ")
    message = message[:1].lower() + message[1:]
    return [f"{path}: {message} (got {got!r})"]


def spec_error(error: ValidationError, *, kind: str | None = None, source: str | None = None) -> SpecError:
    """pydantic's errors -> one ``SpecError`` naming every bad field."""
    problems: list[str] = []
    for err in error.errors(include_url=False):
        for line in _problem(err, kind):
            if line not in problems:
                problems.append(line)
    return SpecError(problems, source=source)


# ------------------------------------------------------------------------------------------ entry points


def parse_spec(data: Mapping[str, Any], *, source: str | None = None) -> LabelSpec | TrainSpec | EvalSpec:
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
        raise spec_error(e, source=source) from None


def spec_from_flags(kind: str, **flags: Any) -> LabelSpec | TrainSpec | EvalSpec:
    """The spec CLI flags spell: ``spec_from_flags("label", input=..., vocabulary="cat,dog", actors="1-4")``.

    Flags left at None (argparse's "not given") take the spec's default; values may be CLI strings ("4",
    "1-4", "cat,dog", ["endpoint_url=http://...", "anon=false"] for ``storage_options``).
    """
    return parse_spec({"kind": kind, **{k: v for k, v in flags.items() if v is not None}}, source="flags")


def storage_options_from_flags(items: Sequence[str]) -> dict[str, Any]:
    """Repeated ``--storage-option KEY=VALUE`` flags -> a mapping, with the spec's rules (no credentials)."""
    try:
        return TypeAdapter(StorageOptions).validate_python(list(items)) or {}
    except ValidationError as e:
        problems = [f"--storage-option: {err['msg']}" for err in e.errors(include_url=False)]
        raise SpecError(problems, source="flags") from None


def load_spec(path_or_text: str | os.PathLike[str]) -> LabelSpec | TrainSpec | EvalSpec:
    """A spec from a YAML or JSON file, or from the YAML / JSON text itself."""
    data, source = read_spec_data(path_or_text)
    return parse_spec(data, source=source)


def read_spec_data(path_or_text: str | os.PathLike[str]) -> tuple[Any, str | None]:
    """The raw mapping of a YAML / JSON spec file or text, unvalidated, and the file name (None for text)."""
    text, source = str(path_or_text), None
    if isinstance(path_or_text, os.PathLike) or ("\n" not in text and not text.lstrip().startswith("{")):
        path = Path(path_or_text)
        if not path.is_file():
            raise SpecError([f"{path}: no such spec file"])
        text, source = path.read_text(encoding="utf-8"), str(path)
    try:
        # JSON is read as JSON (exact errors); everything else as YAML (a superset of JSON).
        data = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise SpecError([f"not valid YAML or JSON: {e}"], source=source) from None
    return data, source


def dump_spec(spec: LabelSpec | TrainSpec | EvalSpec) -> str:
    """The spec as YAML that ``load_spec`` reads back to an equal spec."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
