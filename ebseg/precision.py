"""Autocast precisions by name, as jobs, specs and benchmarks spell them (no torch import until asked)."""

from __future__ import annotations

from typing import Literal

# bf16 / fp16: torch.autocast with that dtype (on CUDA; CPU runs stay in float32). fp32: no autocast.
AUTOCAST_NAMES = ("bf16", "fp16")
AMP_NAMES = (*AUTOCAST_NAMES, "fp32")
# The same names as types that pydantic validates and lists in its errors.
AmpName = Literal[AMP_NAMES]
AutocastName = Literal[AUTOCAST_NAMES]
_TORCH_NAMES = {"bf16": "bfloat16", "fp16": "float16"}


def autocast_dtype(name: str | None):
    """The torch dtype autocast runs under for ``name`` (None for "fp32" or None); ValueError otherwise."""
    if name is None or name == "fp32":
        return None
    if name not in _TORCH_NAMES:
        raise ValueError(f"unknown precision {name!r}; one of {', '.join(AMP_NAMES)}")
    import torch

    return getattr(torch, _TORCH_NAMES[name])
