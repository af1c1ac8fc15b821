"""The pipeline benchmark script still runs (a smoke run on tiny; no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def test_pipeline_throughput_script_reports_json():
    cmd = [sys.executable, str(REPO / "benchmarks" / "pipeline_throughput.py"), "--preset", "tiny"]
    cmd += ["--images", "4", "--size", "48x64", "--batch-size", "2", "--files-per-shard", "2"]
    cmd += ["--actors", "1", "--vocabulary", "cat,dog,", "--json"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["preset"] == "tiny" and report["images"] == 4
    assert report["model_only"]["images_per_s"] > 0
    [run] = report["runs"]
    assert run["actors"] == 1 and run["run_images_per_s"] > 0 and run["ratio_run"] > 0
    assert run["model_blocks"] >= 1 and run["forward_passes"] == 2 and run["effective_batch_size"] == 2
    assert run["actor_peak_rss_bytes"] > 0 and run["driver_peak_rss_bytes"] > 0
