"""pipeline.results.report: the run's page from a real labelling output, checked in its numbers, in its
self-containment and bounded size, and rendered by a real browser (headless Chromium)."""

from __future__ import annotations

import html.parser
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from ebseg.data.shapes import write_shapes
from pipeline.label.job import LabelJob
from pipeline.label.run import run
from pipeline.results.palette import class_color
from pipeline.results.query import open_output
from pipeline.results.report import Limits, collect, write_report

BROWSER = "chromium-headless-shell"


@pytest.fixture(scope="module")
def output(ray_local, tmp_path_factory) -> str:
    """Six shapes images and one corrupt file, labelled by the demo model with its own vocabulary."""
    root = tmp_path_factory.mktemp("report")
    write_shapes(str(root / "data"), count=6, seed=5, size=128)
    (root / "data" / "images" / "zz-broken.png").write_bytes(b"not a png")
    out = str(root / "out")
    run(LabelJob(input=str(root / "data" / "images"), output=out, model="demo", progress=False))
    return out


def test_report_numbers_are_the_outputs(output):
    with open_output(output) as out:
        data = collect(out)
        per_class = {
            r["label"]: r["n"]
            for r in out.sql(
                "SELECT label, count(DISTINCT image_id) AS n FROM segments GROUP BY label"
            ).to_pylist()
        }
        ok = out.sql("SELECT count(*) AS n FROM images WHERE status = 'ok'").to_pylist()[0]["n"]
        segments = out.sql("SELECT count(*) AS n FROM segments").to_pylist()[0]["n"]
    assert data.counts["images"] == 7 and data.counts["ok"] == ok == 6 and data.counts["errors"] == 1
    assert {c["label"]: c["images"] for c in data.classes} == per_class
    assert [c["images"] for c in data.classes] == sorted((c["images"] for c in data.classes), reverse=True)
    assert sum(data.histogram) == data.counts["segments"] == segments > 0
    (error,) = data.errors
    assert error["count"] == 1 and "zz-broken.png" in error["examples"][0]["source"]
    assert data.summary["run_id"] == data.job["run_id"]
    # Every gallery class shows images that contain it, drawn from readable originals.
    for label, thumbs in data.gallery:
        assert thumbs and all(label in dict(t.classes) and t.data_uri for t in thumbs)


def test_report_is_self_contained_and_bounded(output, tmp_path):
    full = write_report(output, str(tmp_path / "full.html"))
    page = (tmp_path / "full.html").read_text()
    assert full.endswith("full.html") and page.startswith("<!doctype html>")
    references = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)|url\(([^)]*)\)""", page)
    assert references and all((a or b).startswith("data:") for a, b in references)  # no file, no network
    assert "<script" not in page
    small = write_report(output, str(tmp_path / "small.html"), limits=Limits(gallery_classes=2, per_class=1))
    assert small and page.count("<img ") > (tmp_path / "small.html").read_text().count("<img ") == 2
    # Class names are user data: they are escaped, never markup.
    assert "<script" not in (tmp_path / "small.html").read_text()


class _Dom(html.parser.HTMLParser):
    """The class table's (name, images) rows and the images of a page as a browser serialised it."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.images: list[str] = []
        self._cell: list[str] | None = None
        self._in_table = False

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "table" and "classes" in (attributes.get("class") or ""):
            self._in_table = True
        elif tag == "tr" and self._in_table:
            self.rows.append([])
        elif tag == "td" and self._in_table:
            self._cell = []
        elif tag == "img":
            self.images.append(attributes.get("src") or "")

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._in_table = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _browser(*args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr"]
    return subprocess.run([shutil.which(BROWSER), *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_renders_in_a_real_browser(output, tmp_path):
    if shutil.which(BROWSER) is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must have {BROWSER} (.ci/run installs it)")
        pytest.skip(f"{BROWSER} is not installed (apt-get install {BROWSER}; .ci/run installs it)")
    page = tmp_path / "report.html"
    write_report(output, str(page))
    with open_output(output) as out:
        expected = out.sql(
            "SELECT label, count(DISTINCT image_id) AS n FROM segments GROUP BY label ORDER BY n DESC, label"
        ).to_pylist()

    dumped = _browser("--dump-dom", page.as_uri())
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    assert [line for line in dumped.stderr.splitlines() if ":CONSOLE" in line] == []  # no console errors
    dom = _Dom()
    dom.feed(dumped.stdout)
    table = {row[0]: int(row[1]) for row in dom.rows if len(row) >= 2}
    assert table == {r["label"]: r["n"] for r in expected}  # class names and counts, in the DOM
    assert dom.images and all(src.startswith("data:image/jpeg;base64,") for src in dom.images)

    shot = tmp_path / "shot.png"
    taken = _browser("--window-size=1280,2600", f"--screenshot={shot}", page.as_uri())
    assert taken.returncode == 0 and shot.is_file(), taken.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500  # not blank: text, chart and thumbnails
    for label in table:  # the chart's bars, in each class's colour
        close = np.all(np.abs(pixels - np.array(class_color(label))) <= 3, axis=-1)
        assert close.sum() > 200, label
