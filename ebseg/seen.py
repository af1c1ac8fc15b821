"""Which classes count as seen in training: the reference's COCO-Stuff-171 synonym rule.

EBSeg balances its three class-embedding sources differently for seen and unseen classes. The reference
decides with synonym lists, not prompt names: a class is seen iff any of its synonyms equals any synonym of
a COCO-Stuff-171 class (``ebseg/vocabularies/coco171.json`` holds them as the reference reads them).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import cache
from pathlib import Path

_COCO171 = Path(__file__).parent / "vocabularies" / "coco171.json"


@cache
def _train_synonyms() -> frozenset[str]:
    """The 328 synonyms of the COCO-Stuff-171 training classes, exactly as the reference reads them."""
    data = json.loads(_COCO171.read_text(encoding="utf-8"))
    return frozenset(s for c in data["classes"] for s in c["synonyms"])


@cache
def _train_synonyms_normalized() -> frozenset[str]:
    return frozenset(_normalize(s) for s in _train_synonyms())


def _normalize(text: str) -> str:
    return text.strip().lower()


def is_seen(synonyms: Iterable[str], *, normalize: bool = False) -> bool:
    """Whether a class with these synonyms counts as seen in training (COCO-Stuff-171).

    With ``normalize=False`` this is the reference's rule: exact string equality, no stripping (COCO's
    ``" wall wood"`` keeps its leading space). ``normalize=True`` compares stripped, lower-cased strings on
    both sides, so a user's "Cat " counts as seen; on the six benchmarks both give the same flags.
    """
    if isinstance(synonyms, str):
        raise TypeError(f"is_seen expects a list of synonyms, not the string {synonyms!r}")
    if normalize:
        return not _train_synonyms_normalized().isdisjoint(_normalize(s) for s in synonyms)
    return not _train_synonyms().isdisjoint(synonyms)


def seen_flags(synonym_lists: Iterable[Iterable[str]], *, normalize: bool = False) -> tuple[bool, ...]:
    """:func:`is_seen` for every class."""
    return tuple(is_seen(s, normalize=normalize) for s in synonym_lists)


def default_synonyms(name: str) -> tuple[str, ...]:
    """Synonyms of a class given only its prompt name: its comma-separated parts, then the name itself.

    "building, edifice" -> ("building", "edifice", "building, edifice"); "cat" -> ("cat",).
    """
    parts = [p.strip() for p in name.split(",") if p.strip()]
    return tuple(dict.fromkeys([*parts, name]))  # ordered de-duplication
