"""Class vocabularies: the names the text encoder sees, their synonyms, and the seen/unseen split.

EBSeg balances its three class-embedding sources differently for classes seen in training (COCO-Stuff-171)
and unseen ones, so a vocabulary carries one ``seen`` flag per class. The reference decides it with synonym
lists, not with the prompt names: a class is seen iff any of its synonyms equals any synonym of a
COCO-Stuff-171 class (``ebseg.seen``). The six benchmark vocabularies ship as package data
(``ebseg/vocabularies/*.json``, see the README there) with the reference's names, synonyms and flags byte
for byte.

Typical use::

    Vocabulary.from_benchmark("ade150")          # or "ade20k_sem_seg_val"
    Vocabulary(["cat", "dog", "spaceship"])      # seen flags derived: (True, True, False)
    Vocabulary.parse("classes.txt")              # a benchmark name, a file or URI, or "cat,dog,tree"
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec

from ebseg.seen import default_synonyms, seen_flags

FORMAT = "ebseg-vocabulary"
FORMAT_VERSION = 1

_DATA_DIR = Path(__file__).parent / "vocabularies"

# Short name -> the reference's detectron2 dataset key (the key its seen/unseen table is indexed by).
BENCHMARKS: dict[str, str] = {
    "coco171": "coco_2017_train_stuff_sem_seg",
    "ade150": "ade20k_sem_seg_val",
    "ade847": "ade20k_full_sem_seg_val",
    "pc59": "pcontext_sem_seg_val",
    "pc459": "pcontext_full_sem_seg_val",
    "voc20": "voc_sem_seg_val",
}

# Other spellings from_benchmark accepts: the reference's dataset keys (COCO's test split has the same 171
# classes as train) and the file names of the reference's vocabulary dump.
_ALIASES: dict[str, str] = {
    **{key: short for short, key in BENCHMARKS.items()},
    "coco_2017_test_stuff_sem_seg": "coco171",
    "coco_stuff_171": "coco171",
    "ade20k_150": "ade150",
    "ade20k_847": "ade847",
    "pascal_context_59": "pc59",
    "pascal_context_459": "pc459",
    "voc_20": "voc20",
}


# ---------------------------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True, repr=False)
class Vocabulary:
    """An ordered list of classes; class ``i`` is label value ``i`` in label maps and column ``i`` in logits.

    Only ``names`` is required. Lists are accepted and stored as tuples. Left empty, ``synonyms`` default to
    :func:`default_synonyms` of each name and ``seen`` to :func:`seen_flags` of the synonyms (normalised
    comparison); ``ignore_label=None`` picks 255, or 65535 when 255 would be a class id.
    """

    names: tuple[str, ...]  # prompt names, what the text encoder sees (stripped, unique)
    synonyms: tuple[tuple[str, ...], ...] = ()  # per class; only used to decide ``seen``; kept byte-exact
    seen: tuple[bool, ...] = ()
    name: str | None = None  # "ade150", a file stem, or None for an ad-hoc list
    ignore_label: int | None = None  # label value that marks unlabelled pixels in ground truth
    dataset: str | None = None  # the reference's dataset key, for benchmark vocabularies

    def __post_init__(self) -> None:
        names = _check_names(self.names)
        synonyms = _check_synonyms(self.synonyms, names)
        # len(), not truthiness, so numpy arrays work too.
        seen = _check_seen(self.seen, names) if len(self.seen) else seen_flags(synonyms, normalize=True)
        for field_name in ("name", "dataset"):
            value = getattr(self, field_name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{field_name} must be a string or None, got {value!r}")
        ignore_label = self.ignore_label
        if ignore_label is None:
            ignore_label = 255 if len(names) <= 255 else 65535
        if isinstance(ignore_label, bool) or not isinstance(ignore_label, int):
            raise ValueError(f"ignore_label must be an int, got {ignore_label!r}")
        if 0 <= ignore_label < len(names):
            raise ValueError(f"ignore_label {ignore_label} is the id of class {names[ignore_label]!r}")
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "synonyms", synonyms)
        object.__setattr__(self, "seen", seen)
        object.__setattr__(self, "ignore_label", ignore_label)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        # The default dataclass repr would print every synonym of 847 classes.
        return f"Vocabulary(name={self.name!r}, classes={len(self)}, seen={sum(self.seen)}, id={self.id!r})"

    @cached_property
    def id(self) -> str:
        """Stable content id, "<name or custom>-<12 hex of sha256 over names and seen flags>".

        Two vocabularies with the same id give the same model outputs; synonyms only matter through ``seen``.
        """
        payload = json.dumps(
            {"names": self.names, "seen": self.seen}, ensure_ascii=False, separators=(",", ":")
        )
        digest = hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]
        prefix = re.sub(r"[^A-Za-z0-9_.-]+", "-", self.name).strip("-") if self.name else ""
        return f"{prefix or 'custom'}-{digest}"

    # ------------------------------------------------------------------------------------ constructors

    @classmethod
    def from_benchmark(cls, name: str) -> Vocabulary:
        """One of the six shipped vocabularies, by short name ("ade150") or reference dataset key
        ("ade20k_sem_seg_val"), case-insensitive."""
        short = _benchmark_short_name(name)
        if short is None:
            raise ValueError(
                f"unknown benchmark {name!r}; valid names: {', '.join(BENCHMARKS)} "
                f"(or the dataset keys {', '.join(sorted(_ALIASES))})"
            )
        return _load_benchmark(short)

    @classmethod
    def from_file(cls, path: str | Path) -> Vocabulary:
        """Read a vocabulary from a local path or fsspec URI.

        ``.json``: this package's format (see :meth:`to_dict`) or a plain list of names. Anything else is
        text, one class per line, blank lines and lines starting with ``#`` skipped:

        - ``cat``: a prompt name, default synonyms;
        - ``sofa: couch, settee``: a prompt name and explicit synonyms (stripped; the name is added);
        - ``12:couch,settee``: the reference's ``class_names`` style, ids 0..K-1 in order, synonyms kept
          byte-exact, the first one is the prompt name. A file uses this style on all lines or on none.
        """
        path = str(path)
        with fsspec.open(path, "r", encoding="utf-8") as f:
            text = f.read()
        stem = PurePosixPath(path.split("::")[-1].split("?")[0]).stem or None
        if _suffix(path) == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from e
            if isinstance(data, list):
                return cls(data, name=stem)
            if not isinstance(data, dict):
                raise ValueError(
                    f"{path}: expected a JSON object or a list of names, got {type(data).__name__}"
                )
            vocab = cls.from_dict(data)
            return vocab if vocab.name else dataclasses.replace(vocab, name=stem)
        names, synonyms = _parse_text(text, source=path)
        return cls(names, synonyms=synonyms, name=stem)

    @classmethod
    def parse(cls, spec: str) -> Vocabulary:
        """A benchmark name, an existing file or URI, or a comma-separated list "cat,dog,tree".

        A list needs at least one comma ("cat," for a single class), so a mistyped benchmark or file name is
        an error instead of a one-class vocabulary.
        """
        spec = spec.strip()
        if _benchmark_short_name(spec) is not None:
            return cls.from_benchmark(spec)
        if "://" in spec or "::" in spec or _is_file(spec):
            return cls.from_file(spec)
        if "," not in spec:
            raise ValueError(
                f"{spec!r} is not a benchmark ({', '.join(BENCHMARKS)}), not an existing file, and not a "
                "comma-separated list of class names (write 'cat,' for a single class)"
            )
        return cls([n for n in (p.strip() for p in spec.split(",")) if n])

    # --------------------------------------------------------------------------------- serialisation

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict in the package's vocabulary format; :meth:`from_dict` inverts it."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "name": self.name,
            "dataset": self.dataset,
            "ignore_label": self.ignore_label,
            "classes": [
                {"name": n, "synonyms": list(s), "seen": f}
                for n, s, f in zip(self.names, self.synonyms, self.seen)
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Vocabulary:
        """Inverse of :meth:`to_dict`. ``synonyms`` and ``seen`` may be left out of the class entries
        (``seen`` from all of them or none) and are then derived; unknown keys are an error."""
        if data.get("format", FORMAT) != FORMAT:
            raise ValueError(f"not an {FORMAT} document (format={data.get('format')!r})")
        if data.get("version", FORMAT_VERSION) != FORMAT_VERSION:
            raise ValueError(
                f"unsupported {FORMAT} version {data.get('version')!r}; this is {FORMAT_VERSION}"
            )
        _check_keys(data, {"format", "version", "name", "dataset", "ignore_label", "classes"}, "vocabulary")
        classes = data.get("classes")
        if not isinstance(classes, list):
            raise ValueError("vocabulary needs a 'classes' list")
        for i, c in enumerate(classes):
            if not isinstance(c, Mapping) or "name" not in c:
                raise ValueError(f"class {i} must be an object with a 'name', got {c!r}")
            _check_keys(c, {"name", "synonyms", "seen"}, f"class {i} ({c['name']!r})")
        with_seen = [i for i, c in enumerate(classes) if "seen" in c]
        if with_seen and len(with_seen) != len(classes):
            missing = next(i for i, c in enumerate(classes) if "seen" not in c)
            raise ValueError(f"'seen' must be given for every class or none; class {missing} lacks it")
        names = [c["name"] for c in classes]
        return cls(
            names,
            synonyms=[c["synonyms"] if "synonyms" in c else _default_for(c["name"]) for c in classes],
            seen=[c["seen"] for c in classes] if with_seen else (),
            name=data.get("name"),
            ignore_label=data.get("ignore_label"),
            dataset=data.get("dataset"),
        )

    def to_json(self) -> str:
        """:meth:`to_dict` as text, one class per line (the layout of the shipped files)."""
        data = self.to_dict()
        classes = data.pop("classes")
        lines = [f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}," for k, v in data.items()]
        rows = [json.dumps(c, ensure_ascii=False) for c in classes]
        body = ",\n".join(f"    {r}" for r in rows)
        return "{\n" + "\n".join(lines) + '\n  "classes": [\n' + body + "\n  ]\n}\n"


# ------------------------------------------------------------------------------------------------ helpers


def _benchmark_short_name(name: str) -> str | None:
    key = name.strip().lower()
    return key if key in BENCHMARKS else _ALIASES.get(key)


@cache
def _load_benchmark(short: str) -> Vocabulary:
    # Cached: vocabularies are immutable, and ADE-847 is read on every predictor construction otherwise.
    data = json.loads((_DATA_DIR / f"{short}.json").read_text(encoding="utf-8"))
    return Vocabulary.from_dict(data)


def _default_for(name: Any) -> tuple[str, ...]:
    return default_synonyms(name.strip()) if isinstance(name, str) else ()


def _check_keys(data: Mapping[str, Any], allowed: set[str], what: str) -> None:
    extra = sorted(set(data) - allowed)
    if extra:
        raise ValueError(f"{what}: unknown keys {extra}; allowed: {sorted(allowed)}")


def _check_names(names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(names, str):
        raise TypeError(
            f"names must be a list of class names, not the string {names!r} (see Vocabulary.parse)"
        )
    out = []
    for i, n in enumerate(names):
        if not isinstance(n, str):
            raise ValueError(f"class {i}: name must be a string, got {n!r}")
        if not n.strip():
            raise ValueError(f"class {i}: empty class name {n!r}")
        out.append(n.strip())  # the reference strips its class strings before prompting
    if not out:
        raise ValueError("empty vocabulary: at least one class name is needed")
    first: dict[str, int] = {}
    for i, n in enumerate(out):
        if n in first:
            raise ValueError(f"duplicate class name {n!r} (classes {first[n]} and {i})")
        first[n] = i
    return tuple(out)


def _check_synonyms(synonyms: Sequence[Sequence[str]], names: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    if len(synonyms) == 0:
        return tuple(default_synonyms(n) for n in names)
    if len(synonyms) != len(names):
        raise ValueError(f"{len(synonyms)} synonym lists for {len(names)} classes")
    out = []
    for name, syns in zip(names, synonyms):
        if isinstance(syns, str) or not all(isinstance(s, str) for s in syns):
            raise ValueError(f"class {name!r}: synonyms must be a list of strings, got {syns!r}")
        if not syns:
            raise ValueError(f"class {name!r} has no synonyms")
        out.append(tuple(syns))  # no stripping: the seen rule compares exact strings
    return tuple(out)


def _check_seen(seen: Sequence[bool], names: tuple[str, ...]) -> tuple[bool, ...]:
    if len(seen) != len(names):
        raise ValueError(f"{len(seen)} seen flags for {len(names)} classes")
    for name, flag in zip(names, seen):
        if isinstance(flag, str) or flag not in (0, 1):
            raise ValueError(f"class {name!r}: seen flag must be a bool, got {flag!r}")
    return tuple(bool(f) for f in seen)


def _suffix(path: str) -> str:
    """Extension of the first "::"-chained part that has one ("zip://a.json::s3://b/c.zip" -> ".json")."""
    for part in path.split("::"):
        suffix = PurePosixPath(part.split("?")[0]).suffix
        if suffix:
            return suffix.lower()
    return ""


def _parse_text(text: str, *, source: str) -> tuple[list[str], list[tuple[str, ...]]]:
    """Names and synonyms from the text format described in :meth:`Vocabulary.from_file`."""
    names: list[str] = []
    synonyms: list[tuple[str, ...]] = []
    id_style: bool | None = None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        head, sep, tail = raw.partition(":")
        this_id_style = bool(sep) and head.strip().isdigit()
        if id_style is None:
            id_style = this_id_style
        elif id_style != this_id_style:
            raise ValueError(f"{source}:{lineno}: mixes 'id:synonyms' lines with other lines")
        if this_id_style:
            if int(head) != len(names):
                raise ValueError(
                    f"{source}:{lineno}: class id {int(head)}, expected {len(names)} (ids 0..K-1)"
                )
            # Byte-exact like the reference's class_names files (" wall wood"); only empty items dropped.
            syns = tuple(s for s in tail.rstrip("\r\n").split(",") if s)
            if not syns or not syns[0].strip():
                raise ValueError(f"{source}:{lineno}: no class name after {head.strip()}:")
            names.append(syns[0].strip())
            synonyms.append(syns)
        elif sep:
            name = head.strip()
            if not name:
                raise ValueError(f"{source}:{lineno}: empty class name before ':'")
            listed = [s.strip() for s in tail.split(",") if s.strip()]
            names.append(name)
            synonyms.append(tuple(dict.fromkeys([name, *listed])))
        else:
            names.append(line)
            synonyms.append(default_synonyms(line))
    return names, synonyms


def _is_file(spec: str) -> bool:
    """``Path.is_file``, False for a string too long to be a path (a long list of class names)."""
    try:
        return Path(spec).is_file()
    except OSError:  # ENAMETOOLONG
        return False
