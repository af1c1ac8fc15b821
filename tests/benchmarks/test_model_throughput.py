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


def baseline_worktrees() -> set[str]:
    """Paths of the temporary worktrees the --baseline mode makes (other worktrees change under us)."""
    out = subprocess.run(
        ["git", "-C", str(REPO), "worktree", "list", "--porcelain"], capture_output=True, text=True
    )
    return {
        line for line in out.stdout.splitlines() if line.startswith("worktree ") and "ebseg-baseline-" in line
    }


def test_baseline_comparison_runs_both_code_states_and_cleans_up():
    """--baseline REF times a git worktree of REF against this checkout, interleaved; the worktree goes."""
    before = baseline_worktrees()
    cmd = [sys.executable, str(REPO / "benchmarks" / "model_throughput.py"), "--baseline", "HEAD"]
    cmd += [
        "--preset",
        "tiny",
        "--size",
        "64",
        "--iters",
        "2",
        "--warmup",
        "0",
        "--vocabulary",
        "cat,dog,",
        "--json",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["baseline_ref"] == "HEAD"
    for name in ("baseline", "current"):
        assert report[name]["iters"] == 2 and len(report[name]["batch_times_s"]) == 2
    assert report["speedup"] == report["baseline"]["s_per_image"] / report["current"]["s_per_image"]
    assert baseline_worktrees() == before
