"""Fixtures of the pipeline tests."""

from __future__ import annotations

import pytest

from ebseg.data import write_shapes


@pytest.fixture(scope="module")
def shapes_sets(tmp_path_factory):
    """The same 6 shapes images as a folder set and a Parquet set on local disk."""
    root = tmp_path_factory.mktemp("train_data")
    write_shapes(str(root / "folder"), count=6, seed=3, size=64)
    write_shapes(str(root / "pq"), count=6, seed=3, size=64, layout="parquet", rows_per_file=4)
    return root
