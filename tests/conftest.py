"""Shared fixtures: the reference folder beside the checkout and small real images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"


def require_reference() -> Path:
    """The reference folder, or a skip where it is absent (a user's clone). CI always has it."""
    if not REFERENCE.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"CI must see the reference folder at {REFERENCE}")
        pytest.skip(f"reference data not found at {REFERENCE} (it sits beside the checkout in CI)")
    return REFERENCE


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return require_reference()


@pytest.fixture(scope="session")
def photos() -> list[np.ndarray]:
    """Real photos of different sizes and aspect ratios (uint8 RGB)."""
    from skimage import data

    gray = data.camera()  # 512x512 grayscale
    return [data.astronaut(), data.coffee(), np.stack([gray] * 3, axis=-1)[:300, :200].copy()]
