"""benchmarks/search.py still runs and reports every class and method (a small run; no figure asserted)."""

from __future__ import annotations

import subprocess
import sys

from ebseg.data.shapes import SHAPES_CLASSES
from tests.conftest import REPO


def test_search_benchmark_reports_precision_per_class_and_method():
    cmd = [sys.executable, str(REPO / "benchmarks" / "search.py"), "--count", "6", "--size", "64"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "P@5" not in line]
    assert len(rows) == 3 * (len(SHAPES_CLASSES) - 1)
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] in SHAPES_CLASSES and cells[3] in ("balanced", "background only", "cosine D")
        assert all(0.0 <= float(cells[i]) <= 1.0 for i in (4, 5, 6))  # P@5, P@10, AP
    assert "mean balanced: P@5" in result.stdout


def test_search_stored_benchmark_times_both_paths(searchable):
    from benchmarks.search_stored import main

    out, _, _ = searchable
    result = main([out, "--text", "yellow star", "--repeats", "1"])
    assert result["images"] > 0 and result["decoded_ms_per_image"] > 0 and result["search_ms_per_image"] > 0
