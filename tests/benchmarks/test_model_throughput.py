"""The benchmark script still runs (a smoke run on tiny; no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def test_model_throughput_script_reports_json():
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "model_throughput.py"),
        "--preset",
        "tiny",
        "--size",
        "64",
    ]
    cmd += ["--iters", "1", "--warmup", "0", "--mode", "predict", "--vocabulary", "cat,dog,", "--json"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["preset"] == "tiny" and report["mode"] == "predict" and report["images_per_s"] > 0
