"""The ``ebseg segment`` entry point, run as a user would (a subprocess of the installed script)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from PIL import Image


def test_segment_command_writes_label_maps(tmp_path, photos):
    image = tmp_path / "coffee.jpg"
    Image.fromarray(photos[1]).save(image)
    out = tmp_path / "maps"
    cmd = [
        sys.executable,
        "-m",
        "ebseg",
        "segment",
        str(image),
        "--model",
        "tiny",
        "--vocabulary",
        "cup,table,",
    ]
    result = subprocess.run(
        [*cmd, "--short-side", "96", "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "random weights" in result.stderr
    assert "coffee.jpg 600x400:" in result.stdout
    label_map = np.asarray(Image.open(out / "coffee.png"))
    assert label_map.shape == (400, 600) and label_map.max() < 2


def test_bad_vocabulary_fails_with_a_message(tmp_path):
    cmd = [sys.executable, "-m", "ebseg", "segment", "--model", "tiny", "--vocabulary", "no-such-benchmark"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "no-such-benchmark" in result.stderr
