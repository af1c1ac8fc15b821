"""pipeline.results.overlay: draw_overlay on hand-made arrays; render_overlay over real labelling outputs."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
from PIL import Image

from ebseg.data.shapes import write_shapes
from pipeline.label.decode import decode_image
from pipeline.label.job import LabelJob
from pipeline.label.run import run
from pipeline.results.overlay import PAD, SWATCH, boundary, class_color, draw_overlay, render_overlay
from pipeline.results.query import open_output

NAMES = ["sky", "grass", "road", "unused"]


def _scene() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(64, 80, 3), dtype=np.uint8)
    labels = np.full((64, 80), -1, dtype=np.int32)
    labels[:, 40:] = 0  # sky: 64 * 40 pixels, the largest
    labels[30:60, 5:35] = 1  # grass: 900 pixels
    labels[40:50, 45:55] = 2  # road: 100 pixels, inside sky
    return image, labels


def _blend(pixel: np.ndarray, color: tuple[int, int, int], alpha: float) -> np.ndarray:
    return np.rint((1 - alpha) * pixel.astype(np.float64) + alpha * np.array(color)).astype(np.uint8)


def _legend_box(out: np.ndarray) -> tuple[int, int]:
    """(height, width) of the legend: its black background runs down column 0 and along row 0."""
    black = np.all(out == 0, axis=-1)
    return int(np.argmin(black[:, 0])), int(np.argmin(black[0, :]))


def test_draw_overlay_blends_outlines_and_keeps_size():
    image, labels = _scene()
    out = draw_overlay(image, labels, NAMES, alpha=0.4)
    assert out.shape == image.shape and out.dtype == np.uint8
    height, width = _legend_box(out)
    assert 3 * SWATCH < height < 60 and SWATCH < width < 80
    edge = boundary(labels)
    for y, x in [(20, 70), (57, 30), (44, 49), (62, 78)]:  # interior pixels away from the legend
        assert not edge[y, x] and (y >= height or x >= width)
        assert np.array_equal(out[y, x], _blend(image[y, x], class_color(int(labels[y, x])), 0.4))
    # Unlabelled pixels outside the legend and away from the outlines are untouched.
    assert np.array_equal(out[62, 2], image[62, 2]) and np.array_equal(out[62, 38], image[62, 38])
    # Outlines: the class colour as is (road's square border, grass's lower edge).
    for y, x in [(40, 45), (49, 54), (59, 20), (58, 34)]:
        assert edge[y, x] and (y >= height or x >= width)
        assert tuple(out[y, x]) == class_color(int(labels[y, x]))
    assert np.array_equal(out, draw_overlay(image, labels, NAMES, alpha=0.4))


def test_draw_overlay_legend_lists_present_classes_by_area():
    image, labels = _scene()
    out = draw_overlay(image, labels, NAMES)
    row_swatches = []
    height, width = _legend_box(out)
    legend = out[:height, :width]
    for color in (class_color(0), class_color(1), class_color(2)):
        hits = np.argwhere(np.all(legend == color, axis=-1))
        assert len(hits) >= SWATCH * SWATCH, color
        row_swatches.append(hits[:, 0].min())
    assert row_swatches == sorted(row_swatches)  # sky, grass, road: largest area first
    assert row_swatches[0] == PAD
    assert not np.all(out == class_color(3), axis=-1).any()  # "unused" is not drawn
    # no_class: id 2 is left alone, so its swatch and its blend disappear.
    skipped = draw_overlay(image, labels, NAMES, no_class=2)
    assert not np.all(skipped == class_color(2), axis=-1).any()
    assert np.array_equal(skipped[44, 49], image[44, 49])


def test_draw_overlay_without_classes_and_bad_input():
    image, _ = _scene()
    empty = np.full(image.shape[:2], -1, dtype=np.int32)
    assert np.array_equal(draw_overlay(image, empty, NAMES), image)
    with pytest.raises(ValueError, match="label_map shape"):
        draw_overlay(image, empty[:10], NAMES)
    with pytest.raises(ValueError, match="alpha"):
        draw_overlay(image, empty, NAMES, alpha=2.0)


def _label(root, source: str) -> str:
    out = root / f"out-{source.rsplit('/', 1)[-1]}"
    summary = run(
        LabelJob(
            input=source,
            output=str(out),
            model="demo",
            vocabulary=str(root / "data" / "vocabulary.json"),
            files_per_shard=2,
            progress=False,
        )
    )
    assert (summary["ok"], summary["errors"]) == (3, 1)
    return str(out)


@pytest.fixture(scope="module")
def outputs(ray_local, tmp_path_factory):
    """Two finished outputs of the same 3 shapes images and one corrupt PNG: read as files, and from a tar."""
    root = tmp_path_factory.mktemp("overlay")
    write_shapes(str(root / "data"), count=3, seed=3, size=128)
    images = root / "data" / "images"
    (images / "zz-broken.png").write_bytes(b"not a png")
    with tarfile.open(root / "shapes.tar", "w") as tar:
        for path in sorted(images.iterdir()):
            tar.add(path, arcname=f"shapes/{path.name}")
    return {"files": _label(root, str(images)), "tar": _label(root, str(root / "shapes.tar"))}


@pytest.mark.parametrize("kind", ["files", "tar"])
def test_render_overlay_end_to_end(outputs, kind, tmp_path):
    with open_output(outputs[kind]) as out:
        rows = out.sql(
            "SELECT image_id, source_uri, member FROM images WHERE status = 'ok' ORDER BY image_id"
        ).to_pylist()
        assert len(rows) == 3
        row = rows[0]
        labels = out.label_map(row["image_id"])
        names = list(out.vocabulary.names)
    assert (row["member"] is None) == (kind == "files")
    if kind == "files":
        with open(row["source_uri"], "rb") as f:
            plain = decode_image(f.read())
    else:
        with tarfile.open(row["source_uri"]) as tar:
            plain = decode_image(tar.extractfile(row["member"]).read())
    dest = tmp_path / "overlay" / "x.png"
    info = render_overlay(outputs[kind], row["image_id"], str(dest), alpha=0.5)
    written = np.asarray(Image.open(dest).convert("RGB"))
    assert written.shape == plain.shape and (info["height"], info["width"]) == plain.shape[:2]
    assert np.array_equal(written, draw_overlay(plain, labels, names, alpha=0.5))
    present = {names[c] for c in np.unique(labels[labels >= 0])}
    assert set(info["classes"]) == present and present
    changed = np.any(written != plain, axis=-1)
    # Only labelled pixels and the legend corner change; every labelled pixel outside the legend does
    # (or would, unless its colour already equals the blend: count those as allowed).
    legend_rows, legend_cols = np.nonzero(changed & (labels < 0))
    assert legend_rows.max(initial=-1) < PAD + 20 * len(present) and legend_cols.max(initial=-1) < 128
    assert changed[labels >= 0].mean() > 0.95
    assert not list(tmp_path.glob("overlay/*.tmp-*"))  # written atomically, no temporary left


def test_render_overlay_unknown_id_and_error_image(outputs, tmp_path):
    with pytest.raises(KeyError, match="no image 'nope'"):
        render_overlay(outputs["files"], "nope", str(tmp_path / "x.png"))
    with open_output(outputs["tar"]) as out:
        (broken,) = out.sql("SELECT image_id FROM images WHERE status = 'error'").column(0).to_pylist()
    with pytest.raises(ValueError, match=f"image '{broken}' .* has no labels: decode"):
        render_overlay(outputs["tar"], broken, str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()
