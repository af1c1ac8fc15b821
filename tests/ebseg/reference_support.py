"""The reference run's pseudo-random weights, rebuilt in the official key layout (see
``../shared/reference/README.md``)."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch


def ref_param_value(name: str, shape: list[int]) -> torch.Tensor:
    """The value every parameter of the reference run got: a function of its name and shape only."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    n = torch.randn(tuple(shape), generator=g, dtype=torch.float32)
    if len(shape) == 0:
        return torch.tensor(4.6052) if name.endswith("logit_scale") else 0.02 * n
    if len(shape) == 1 and name.endswith(".weight"):
        return 1.0 + 0.02 * n
    return 0.02 * n


def official_state(reference: Path, variant: str = "b") -> dict[str, torch.Tensor]:
    """A state dict in the official EBSeg layout with the reference run's weights.

    Parameters follow ``ref_param_value`` (aliases share their canonical tensor); buffers keep the
    defaults the reference had (the no-object weight, the causal text mask).
    """
    entries = json.loads((reference / f"keys_ebseg_{variant}.json").read_text())
    aliases = json.loads((reference / f"keys_ebseg_{variant}_aliases.json").read_text())["aliases"]
    state: dict[str, torch.Tensor] = {}
    for e in entries:
        name, shape = e["name"], e["shape"]
        if name in aliases:
            continue
        if e["is_param"]:
            state[name] = ref_param_value(name, shape)
        elif name == "criterion.empty_weight":
            state[name] = torch.ones(shape)
            state[name][-1] = 0.1
        elif name == "ov_classifier.attn_mask":
            state[name] = torch.full(shape, float("-inf")).triu_(1)
        else:
            raise ValueError(f"unexpected buffer {name}")
    for alias, canonical in aliases.items():
        state[alias] = state[canonical]
    return state
