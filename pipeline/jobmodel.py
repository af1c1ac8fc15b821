"""What every job definition shares: the base model, its field types, and errors that name each bad field.

A job (``LabelJob``, ``TrainJob``, ``EvalJob``) is a frozen pydantic model beside the code that runs it: its
fields, defaults, help texts and checks are written once, there. Constructing one from Python validates
everything at once and raises ``SpecError`` with one ``"kind.field: what is wrong (got ...)"`` line per
fault, the same lines ``ebseg`` prints for a spec file or flags (``jobs.specs`` composes these models into
the spec a file or a command line spells).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, ValidationError
from pydantic_core import PydanticCustomError

from ebseg.vocab import Vocabulary
from pipeline import storage


class SpecError(ValueError):
    """A job that cannot run; ``problems`` holds one ``"dotted.path: what is wrong"`` line per fault."""

    def __init__(self, problems: Sequence[str], *, source: str | None = None) -> None:
        self.problems = list(problems)
        head = f"{source}: invalid job spec" if source else "invalid job spec"
        super().__init__(head + "\n" + "\n".join(f"  {p}" for p in self.problems))


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
    """A ``Vocabulary`` (from Python) as it is; a ``Vocabulary.parse`` string; a YAML list of names, which is
    the same vocabulary as "a,b,c" (``Vocabulary.parse`` needs a comma for one name)."""
    if isinstance(value, Vocabulary):
        return value
    if isinstance(value, list | tuple):
        if not all(isinstance(n, str) for n in value):  # 1 or {a: b} in a list is a mistake, not a name
            raise PydanticCustomError("vocabulary", "a list of names must hold strings only")
        names = [n.strip() for n in value]
        if not names or not all(names) or any("," in n for n in names):
            raise PydanticCustomError("vocabulary", "a list of names must be non-empty, names without ','")
        return ",".join(names) + ("," if len(names) == 1 else "")
    if not isinstance(value, str):
        raise PydanticCustomError("string_type", "must be a string")
    if not value:
        raise PydanticCustomError("string_too_short", "must not be empty")
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
        try:
            out[key.strip()] = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:  # the value is not echoed either
            raise PydanticCustomError(
                "storage_option", "item {i}: the value after '=' is not a YAML scalar or list", {"i": i}
            ) from None
    return out


PosInt = Annotated[int, BeforeValidator(_no_bool), Field(ge=1)]
NonNegInt = Annotated[int, BeforeValidator(_no_bool), Field(ge=0)]
# inf and nan pass a bound check ("inf" > 0) yet mean nothing as a rate, a count or a size.
PosFloat = Annotated[float, BeforeValidator(_no_bool), Field(gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, BeforeValidator(_no_bool), Field(ge=0, allow_inf_nan=False)]
Text = Annotated[str, Field(min_length=1)]
Actors = Annotated[int | tuple[int, int], BeforeValidator(_actors), Field()]
# A Vocabulary.parse value: a benchmark name, a file, or "cat,dog,tree" (a YAML list is accepted too); from
# Python, a Vocabulary.
VocabularyValue = Annotated[str | Vocabulary, PlainValidator(_vocabulary)]
# fsspec options for every URI of a job, never stored in its outputs; KEY=VALUE strings are accepted.
StorageOptions = Annotated[dict[str, Any] | None, BeforeValidator(_storage_options)]


class JobModel(BaseModel):
    """Base of the job definitions: frozen, unknown fields refused, errors raised as ``SpecError``."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)
    KIND: ClassVar[str] = "job"  # the job's name in error lines and in specs ("label", "train", "eval")

    def __init__(self, **fields: Any) -> None:
        try:
            super().__init__(**fields)
        except ValidationError as e:
            raise spec_error(e, {self.KIND: type(self)}, kind=self.KIND) from None

    # Only a Python call goes through __init__: validation as part of a larger model (a spec union) keeps
    # pydantic's own errors, which the caller formats with every location intact.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------ errors


_TYPE_MESSAGES = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "finite_number": "a finite number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "dict_type": "a mapping",
    "tuple_type": "a list",
}
_BOUNDS = {"greater_than_equal": ">= {ge}", "greater_than": "> {gt}", "less_than_equal": "<= {le}"}


def dotted(loc: Sequence[Any]) -> str:
    """A pydantic error location as a path: ``("label", "actors", 0)`` -> ``label.actors[0]``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _Echo:
    """An input quoted in an error line: its repr with any URL's ``user:password@`` redacted."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return storage.redact(repr(self.value))


def _problem(err: Mapping[str, Any], models: Mapping[str, type[BaseModel]], kind: str | None) -> list[str]:
    """One pydantic error -> lines ``"kind.field: what is wrong (got ...)"``."""
    loc = list(err["loc"])
    if kind is not None and (not loc or loc[0] != kind):
        loc.insert(0, kind)  # a single model's errors (no union tag in the location)
    ctx = err.get("ctx") or {}
    kind = loc[0] if loc and loc[0] in models else kind
    path, etype, got = dotted(loc), err["type"], _Echo(err.get("input"))
    if etype == "credential_field":
        lines = [f"{dotted([*loc, p])}: looks like a credential" for p in ctx["paths"]]
        return [*lines, f"credentials: {ctx['hint']}"]
    if etype == "extra_forbidden":
        fields = models[kind].model_fields if kind in models else {}
        allowed = ", ".join(n for n in fields if n != "kind") or "?"
        return [f"{path}: unknown field; allowed: {allowed}"]
    if etype == "missing":
        return [f"{path}: required field is missing"]
    if etype == "model_attributes_type":
        return [f"{path or 'spec'}: must be a mapping of fields (got {got!r})"]
    if etype in ("union_tag_invalid", "union_tag_not_found"):
        got_kind = f" (got {ctx['tag']!r})" if "tag" in ctx else ""
        return [f"kind: must be one of {', '.join(models)}{got_kind}"]
    if etype == "literal_error":
        return [f"{path}: must be one of {ctx['expected']} (got {got!r})"]
    if etype in _BOUNDS:
        return [f"{path}: must be {_BOUNDS[etype].format(**ctx)} (got {got!r})"]
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


def spec_error(
    error: ValidationError,
    models: Mapping[str, type[BaseModel]],
    *,
    kind: str | None = None,
    source: str | None = None,
) -> SpecError:
    """pydantic's errors -> one ``SpecError`` naming every bad field.

    models: the job models by kind (for the fields an unknown key could have been); kind: the kind of a
    single model's errors, whose locations carry no union tag.
    """
    problems: list[str] = []
    for err in error.errors(include_url=False):
        for line in _problem(err, models, kind):
            if line not in problems:
                problems.append(line)
    return SpecError(problems, source=source)
