"""Public names of a package loaded on first use (PEP 562), so a light module of the package (``ebseg.vocab``,
``ebseg.losses.config``, ``ebseg.data.labels``) can be imported by CPU-only workers and by job validation
without paying for torch, open_clip and segment_anything."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps each public name to the module holding it
    (a name equal to that module's last part is the module itself)."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(exports[name])
        value = module if module.__name__ == f"{package}.{name}" else getattr(module, name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
