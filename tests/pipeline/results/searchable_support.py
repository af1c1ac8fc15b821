"""The searchable set the search tests read (``tests/pipeline/results/test_query_proposals.py`` and
``tests/jobs/test_cli_search.py``): labelled once per session by the ``searchable`` fixture in
``tests/conftest.py``, since both modules only read it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ebseg.data.shapes import SHAPES_CLASSES, generate

NAMES = list(SHAPES_CLASSES)
LEFT_OUT = ("yellow star", "cyan cross")
COUNT = 20


def label_searchable(root: Path) -> tuple[str, str, dict[str, set[str]]]:
    """20 shapes images labelled by demo without LEFT_OUT, proposals stored (default encoding), and the
    same labelled without proposals; the ground truth: image file name -> classes present."""
    from pipeline.label.job import LabelJob
    from pipeline.label.run import run as label

    (root / "in").mkdir()
    truth = {}
    for i in range(COUNT):
        image, labels = generate(i, seed=5, size=(128, 112 + 8 * (i % 4)))
        Image.fromarray(image).save(root / "in" / f"{i:03d}.png")
        truth[f"{i:03d}.png"] = {NAMES[k] for k in np.unique(labels)}
    out = str(root / "out")
    kept = ",".join(n for n in NAMES if n not in LEFT_OUT)
    label(LabelJob(input=str(root / "in"), output=out, vocabulary=kept, proposals=True, progress=False))
    plain = str(root / "plain")
    label(LabelJob(input=str(root / "in"), output=plain, vocabulary=kept, progress=False))
    return out, plain, truth


def file_name(source_uri: str) -> str:
    return source_uri.rsplit("/", 1)[-1]
