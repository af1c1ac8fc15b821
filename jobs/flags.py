"""CLI flags generated from the spec models, so a flag and a spec key are one value under two spellings.

Every field of ``LabelSpec`` / ``TrainSpec`` / ``EvalSpec`` gets a flag named after it (``batch_size`` ->
``--batch-size``; booleans ``--use-gpu`` / ``--no-use-gpu``; ``storage_options`` -> repeated
``--storage-option KEY=VALUE``), with the field's own description as its help. Flags carry strings; pydantic
converts and checks them exactly as it checks a spec file, so both spellings fail with the same message. A
field added to a job model is a flag at once.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Mapping
from typing import Any

from jobs.specs import SPEC_TYPES, SpecError, parse_spec, read_spec_data

# Fields given as positional arguments (``ebseg label INPUT OUTPUT``) rather than flags.
POSITIONAL = {"label": ("input", "output"), "relabel": ("source", "output")}
# Values that set an optional field to None from a command line ("--amp-dtype none").
NONE_WORDS = ("none", "null")


def flag_name(field: str) -> str:
    return "--storage-option" if field == "storage_options" else "--" + field.replace("_", "-")


def _allows_none(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)


def _is_bool(annotation: Any) -> bool:
    return annotation is bool


def _choices(annotation: Any) -> list[str] | None:
    """The allowed values of a Literal (or Optional Literal) field, for help text."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return [str(a) for a in typing.get_args(annotation)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _choices(args[0])
    return None


def add_spec_flags(parser: argparse.ArgumentParser, kind: str) -> None:
    """Add one flag per field of ``kind``'s spec model (positional fields excepted) to ``parser``."""
    model = SPEC_TYPES[kind]
    group = parser.add_argument_group(f"{kind} spec fields (flags override the --spec file)")
    for name, info in model.model_fields.items():
        if name == "kind" or name in POSITIONAL.get(kind, ()):
            continue
        default = "required" if info.is_required() else f"default: {info.default!r}"
        parts = [info.description or "", default]
        choices = _choices(info.annotation)
        if choices:
            parts.insert(0, "one of " + ", ".join(choices))
        if _allows_none(info.annotation) and not info.is_required() and name != "storage_options":
            parts.append("'none' unsets")
        text = "; ".join(p for p in parts if p)
        if _is_bool(info.annotation):
            group.add_argument(flag_name(name), dest=name, action=argparse.BooleanOptionalAction, help=text)
        elif name == "storage_options":
            group.add_argument(flag_name(name), dest=name, action="append", metavar="KEY=VALUE", help=text)
        else:
            group.add_argument(flag_name(name), dest=name, metavar=name.upper(), help=text)


def given_fields(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    """The spec fields the command line set (argparse's None means "not given"); "none" -> None."""
    model = SPEC_TYPES[kind]
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        value = getattr(args, name, None)
        if name == "kind" or value is None:
            continue
        if isinstance(value, str) and value.lower() in NONE_WORDS and _allows_none(info.annotation):
            value = None
        out[name] = value
    return out


def spec_from_args(args: argparse.Namespace, kind: str):
    """The spec a command line spells: the ``--spec`` file (if any) with every given flag laid over it.

    The file and the flags are merged before validation, so a flag may supply a field the file lacks.
    """
    data: Any = {}
    source = "flags"
    if getattr(args, "spec", None):
        data, path = read_spec_data(args.spec)
        path = path or "spec text"  # --spec given the YAML / JSON itself
        if not isinstance(data, Mapping):
            raise SpecError([f"spec: must be a mapping of fields, got {type(data).__name__}"], source=path)
        if data.get("kind", kind) not in tuple(SPEC_TYPES):  # a tuple: a list or a mapping is no key
            choices = ", ".join(SPEC_TYPES)
            raise SpecError([f"kind: must be one of {choices} (got {data['kind']!r})"], source=path)
        if data.get("kind", kind) != kind:
            problem = f"kind: this is a {data['kind']!r} spec; run it with `ebseg {data['kind']}`"
            raise SpecError([problem], source=path)
        source = f"{path} + flags" if given_fields(args, kind) else str(path)
    try:
        return parse_spec({**data, **given_fields(args, kind), "kind": kind}, source=source)
    except SpecError as e:
        raise SpecError([_with_flag(p, kind) for p in e.problems], source=source) from None


def _with_flag(problem: str, kind: str) -> str:
    """``"label.vocabulary: required ..."`` -> ``"label.vocabulary (--vocabulary): required ..."``."""
    path, sep, rest = problem.partition(": ")
    head, _, field = path.partition(".")
    field = field.split(".")[0].split("[")[0]
    if not sep or head != kind or field not in SPEC_TYPES[kind].model_fields:
        return problem
    spelled = field.upper() if field in POSITIONAL.get(kind, ()) else flag_name(field)
    return f"{path} ({spelled}): {rest}"
