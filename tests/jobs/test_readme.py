"""The README's main-job command, run as written (less the venv set-up this test already runs inside), then
its look-at-the-output command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
BIN = Path(sys.executable).parent


def readme_blocks() -> list[list[str]]:
    """The steps of the first two bash blocks after "## Two commands", each split at ``&&``."""
    section = README.read_text(encoding="utf-8").split("## Two commands", 1)[1]
    blocks = re.findall(r"```bash\n(.*?)\n```", section, re.S)
    assert len(blocks) >= 2, "README: no bash blocks under '## Two commands'"
    return [[step.strip() for step in block.split("&&")] for block in blocks[:2]]


def _run(steps: list[str], cwd: Path) -> subprocess.CompletedProcess:
    runnable = [s.replace(".venv/bin/", f"{BIN}/") for s in steps]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", " && ".join(runnable)],
        cwd=cwd, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip


def test_readme_main_job_labels_then_queries_and_draws(tmp_path):
    main_job, look = readme_blocks()
    assert main_job[0].startswith("python3 -m venv .venv") and "pip install -e '.[dev]'" in main_job[1]
    assert " label " in main_job[-1] and "--vocabulary" not in main_job[-1]  # the demo model's own classes
    result = _run(main_job[2:], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "labelled 8 images" in out and "8 ok, 0 failed" in out  # the summary
    assert out.splitlines()[-1].startswith("report: out/report.html")  # it ends pointing at the page
    assert (tmp_path / "out" / "report.html").stat().st_size > 10_000
    for line in result.stderr.splitlines():  # only our lines: no Ray log line, no C++ core line
        assert line.startswith(("ebseg: ", "labelling: ")), line

    assert any(" query " in s for s in look) and any(" show " in s for s in look)
    result = _run(look, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert ["label", "images", "mean_area"] in [line.split() for line in out.splitlines()]  # the table
    assert "background" in out and "(7 rows)" in out  # every shapes class is found in eight images
    assert "wrote overlay.png (256x256 image; " in out
    assert (tmp_path / "overlay.png").stat().st_size > 1000
