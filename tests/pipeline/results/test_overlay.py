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
from pipeline.results.overlay import GAP, SWATCH, blend, boundary, draw_overlay, draw_region
from pipeline.results.palette import COLOR_WORDS, NEUTRAL, class_color, text_color
from pipeline.results.query import open_output
from pipeline.results.show import render_overlay

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


def test_blend_colours_by_name_outlines_and_keeps_size():
    image, labels = _scene()
    out = blend(image, labels, NAMES, alpha=0.4)
    assert out.shape == image.shape and out.dtype == np.uint8
    edge = boundary(labels)
    for y, x in [(20, 70), (57, 30), (44, 49), (62, 78), (2, 42)]:  # interior pixels, the corner included
        assert not edge[y, x]
        assert np.array_equal(out[y, x], _blend(image[y, x], class_color(NAMES[labels[y, x]]), 0.4))
    # Unlabelled pixels away from the outlines are untouched, the top-left corner too: no legend over it.
    for y, x in [(62, 2), (62, 38), (0, 0), (5, 5)]:
        assert np.array_equal(out[y, x], image[y, x])
    # Outlines: the class colour as is (road's square border, grass's lower edge).
    for y, x in [(40, 45), (49, 54), (59, 20), (58, 34)]:
        assert edge[y, x] and tuple(out[y, x]) == class_color(NAMES[labels[y, x]])
    # A colour follows the class name, not its id: the same names in another order draw the same picture.
    order = [2, 0, 1, 3]
    remapped = np.where(labels >= 0, np.argsort(order)[np.maximum(labels, 0)], -1)
    assert np.array_equal(blend(image, remapped, [NAMES[i] for i in order], alpha=0.4), out)


def test_draw_overlay_puts_the_legend_beside_the_picture():
    image, labels = _scene()
    height, width = labels.shape
    out = draw_overlay(image, labels, NAMES, side_by_side=True)
    assert np.array_equal(out[:height, :width], image)  # the original, untouched
    assert np.array_equal(out[:height, width + GAP : 2 * width + GAP], blend(image, labels, NAMES))
    legend = out[:, 2 * width + GAP :]
    assert legend.shape[1] > SWATCH and np.all(legend[:, -1] == 255)  # a white panel to the right
    rows = []
    for name in ("sky", "grass", "road"):  # present classes, largest area first
        hits = np.argwhere(np.all(legend == class_color(name), axis=-1))
        assert len(hits) >= (SWATCH - 2) ** 2, name
        rows.append(hits[:, 0].min())
    assert rows == sorted(rows) and rows[0] > 0
    assert not np.all(legend == class_color("unused"), axis=-1).any()  # absent classes are not listed
    alone = draw_overlay(image, labels, NAMES)
    assert np.array_equal(alone[:height, :width], blend(image, labels, NAMES))
    assert alone.shape[1] == out.shape[1] - width - GAP
    # no_class: id 2 is left alone, so its swatch and its blend disappear.
    skipped = draw_overlay(image, labels, NAMES, no_class=2)
    assert not np.all(skipped == class_color("road"), axis=-1).any()
    assert np.array_equal(skipped[44, 49], image[44, 49])


def test_colours_read_as_their_names_and_stay_apart():
    assert (
        class_color("red circle") == COLOR_WORDS["red"] and class_color("Blue  Square") == COLOR_WORDS["blue"]
    )
    assert class_color("background") == NEUTRAL
    names = ["cat", "dog", "tree", "car", "person", "road", "building", "sky"]
    colors = [class_color(n) for n in names]
    assert len(set(colors)) == len(names) and colors == [class_color(n) for n in names]  # stable
    assert all(text_color(c) in ((0, 0, 0), (255, 255, 255)) for c in colors)
    assert text_color((255, 255, 0)) == (0, 0, 0) and text_color((0, 0, 128)) == (255, 255, 255)


def test_draw_region_tints_and_outlines_the_region():
    image = np.full((20, 30, 3), 100, dtype=np.uint8)
    mask = np.zeros((20, 30), dtype=bool)
    mask[5:15, 10:20] = True
    out = draw_region(image, mask, "yellow star", alpha=0.5)
    color = class_color("yellow star")
    assert tuple(out[5, 10]) == color  # the outline takes the colour as is
    inside = np.rint(0.5 * 100 + 0.5 * np.array(color)).astype(np.uint8)
    np.testing.assert_array_equal(out[10, 15], inside)
    np.testing.assert_array_equal(out[0, 0], image[0, 0])  # outside: untouched
    assert out.shape[0] >= 20 and out.shape[1] > 30  # the legend panel beside it
    with pytest.raises(ValueError, match="bool"):
        draw_region(image, mask.astype(np.uint8), "x")


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
    assert (info["height"], info["width"]) == plain.shape[:2] and info["canvas"] == [
        written.shape[1],
        written.shape[0],
    ]
    assert np.array_equal(written, draw_overlay(plain, labels, names, alpha=0.5, side_by_side=True))
    present = {names[c] for c in np.unique(labels[labels >= 0])}
    assert set(info["classes"]) == present and present
    with open_output(outputs[kind]) as out:
        assert np.array_equal(np.asarray(out.overlay(row["image_id"])), written)  # the Python API's picture
    assert not list(tmp_path.glob("overlay/*.tmp-*"))  # written atomically, no temporary left


def test_render_overlay_unknown_id_and_error_image(outputs, tmp_path):
    with pytest.raises(KeyError, match="no image 'nope'"):
        render_overlay(outputs["files"], "nope", str(tmp_path / "x.png"))
    with open_output(outputs["tar"]) as out:
        (broken,) = out.sql("SELECT image_id FROM images WHERE status = 'error'").column(0).to_pylist()
    with pytest.raises(ValueError, match=f"image '{broken}' .* has no labels: decode"):
        render_overlay(outputs["tar"], broken, str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()
