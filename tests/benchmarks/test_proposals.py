"""benchmarks/proposals.py still runs: bytes and agreement per encoding, and relabel vs label speed (small
runs; the lossless rows must agree exactly, no speed figure is asserted)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

SCRIPT = str(REPO / "benchmarks" / "proposals.py")


def run(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_bytes_and_agreement_per_encoding_with_random_weights():
    out = run("--model", "tiny", "--random-weights", "--count", "2", "--short-side", "64")
    encodings = ("float32", "float16", "float8", "uint8")
    rows = [cells for cells in map(str.split, out.splitlines()) if cells and cells[0] in encodings]
    assert len(rows) == 8  # every (masks, embeddings) pair
    lossless = next(r for r in rows if r[:2] == ["float32", "float32"])
    assert float(lossless[4]) == 1.0 and float(lossless[5]) == 1.0  # mean and min agreement
    default = next(r for r in rows if r[:2] == ["float8", "float16"])
    assert float(default[2]) < float(lossless[2])  # KB/image


def test_speed_compares_label_and_relabel():
    out = run("--speed", "--model", "tiny", "--photo-size", "64x96", "--repeats", "1")
    assert "label" in out and "relabel on the grid" in out and "x;" in out
