"""The README's main-job command, run as written (less the venv set-up this test already runs inside)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
BIN = Path(sys.executable).parent


def main_job_command() -> list[str]:
    """The steps of the first bash block after "## Two commands", split at ``&&``."""
    section = README.read_text(encoding="utf-8").split("## Two commands", 1)[1]
    block = re.search(r"```bash\n(.*?)\n```", section, re.S)
    assert block, "README: no bash block under '## Two commands'"
    return [step.strip() for step in block[1].split("&&")]


def test_readme_main_job_labels_queries_and_draws(tmp_path):
    steps = main_job_command()
    assert steps[0].startswith("python3 -m venv .venv") and "pip install -e '.[dev]'" in steps[1]
    runnable = [s.replace(".venv/bin/", f"{BIN}/") for s in steps[2:]]
    assert any(" label " in s for s in runnable) and any(" query " in s for s in runnable)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", " && ".join(runnable)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "labelled 8 images" in out and "8 ok, 0 failed" in out  # the summary
    assert ["label", "images", "mean_area"] in [
        line.split() for line in out.splitlines()
    ]  # the query's table
    assert "background" in out and "(7 rows)" in out  # every shapes class is found in eight images
    assert "wrote overlay.png (256x256 image; " in out
    assert (tmp_path / "overlay.png").stat().st_size > 1000
