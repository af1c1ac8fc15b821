"""Numpy batches as Ray Data's ``map_batches`` stages exchange them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def object_column(values: Sequence[Any]) -> np.ndarray:
    """A 1-D object array of ``values`` (arrays, bytes, None), never stacked into one N-D array, even when
    the arrays' shapes agree (Ray would then hand the next stage one tensor instead of a column)."""
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        out[i] = value
    return out
