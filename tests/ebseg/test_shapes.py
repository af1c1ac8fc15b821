"""The synthetic shapes set: determinism, class coverage, labels that match the drawing, both layouts."""

from __future__ import annotations

import colorsys
import json
import subprocess
import sys

import numpy as np
import pytest

from ebseg.data import SHAPES_CLASSES, generate, shapes_vocabulary, write_shapes
from ebseg.data.shapes import _STYLES, scene, shape_mask
from ebseg.vocab import Vocabulary
from pipeline.pairs import iter_pairs, list_pairs


def test_deterministic_per_seed_and_index():
    a_image, a_label = generate(3, seed=11, size=96)
    b_image, b_label = generate(3, seed=11, size=96)
    assert (a_image == b_image).all() and (a_label == b_label).all()
    assert not (generate(3, seed=12, size=96)[0] == a_image).all()
    assert not (generate(4, seed=11, size=96)[0] == a_image).all()
    image, label = generate(0, seed=0, size=(80, 120))
    assert image.shape == (80, 120, 3) and image.dtype == np.uint8
    assert label.shape == (80, 120) and label.dtype == np.int32
    assert label.min() >= 0 and label.max() < len(SHAPES_CLASSES)  # every pixel labelled


def test_every_class_appears_in_a_modest_set():
    for seed in (0, 1):
        present = set()
        for index in range(12):
            present |= set(np.unique(generate(index, seed=seed, size=96)[1]).tolist())
        assert present == set(range(len(SHAPES_CLASSES))), seed


def test_label_map_matches_the_drawn_shapes():
    checked = 0
    for index in range(10):
        layout = scene(index, seed=5, size=128)
        image, label = generate(index, seed=5, size=128)
        masks = [shape_mask(spec, 128, 128) for spec in layout.shapes]
        covered = np.zeros((128, 128), dtype=bool)
        for spec, mask in reversed(list(zip(layout.shapes, masks))):  # top-most first
            visible = mask & ~covered
            covered |= mask
            assert (label[visible] == spec.class_id).all()
            if visible.sum() < 60:
                continue
            # The visible pixels carry the class's colour family (mean hue within the jitter plus noise).
            r, g, b = image[visible].astype(float).mean(axis=0) / 255
            hue = 360 * colorsys.rgb_to_hsv(r, g, b)[0]
            family = _STYLES[spec.class_id][1]
            assert min(abs(hue - family), 360 - abs(hue - family)) < 25, (index, spec.class_id, hue)
            checked += 1
        assert (label[~covered] == 0).all()  # everything else is background
        bg = image[~covered].astype(float) / 255
        if len(bg) > 200:
            saturation = [colorsys.rgb_to_hsv(*p)[1] for p in bg[:: max(1, len(bg) // 200)]]
            assert np.median(saturation) < 0.35  # the texture stays greyish, apart from the shapes
    assert checked >= 15


def test_occlusion_later_shapes_on_top():
    for index in range(40):
        layout = scene(index, seed=2, size=128)
        masks = [shape_mask(spec, 128, 128) for spec in layout.shapes]
        for i in range(len(masks)):
            for j in range(i + 1, len(masks)):
                overlap = masks[i] & masks[j]
                if overlap.sum() > 20 and layout.shapes[i].class_id != layout.shapes[j].class_id:
                    _, label = generate(index, seed=2, size=128)
                    later = np.zeros_like(overlap)
                    for k in range(j + 1, len(masks)):
                        later |= masks[k]
                    assert (label[overlap & ~later] == layout.shapes[j].class_id).all()
                    return
    pytest.fail("no overlapping shapes of different classes in 40 scenes")


def same_pairs(uri: str, *, count: int, seed: int, size: int, storage_options=None) -> None:
    pairs = list(iter_pairs(uri, storage_options=storage_options))
    assert [p[0] for p in pairs] == [f"{i:06d}" for i in range(count)]
    for index, (_, image, label) in enumerate(pairs):
        expected_image, expected_label = generate(index, seed=seed, size=size)
        assert (image == expected_image).all() and (label == expected_label).all()


def test_round_trip_folder_and_parquet_on_local_disk(tmp_path):
    folder = write_shapes(str(tmp_path / "folder"), count=5, seed=4, size=64)
    parquet = write_shapes(str(tmp_path / "pq"), count=5, seed=4, size=64, layout="parquet", rows_per_file=2)
    assert (folder["files"], parquet["files"]) == (10, 3)
    assert sorted(p.name for p in (tmp_path / "folder" / "images").iterdir())[0] == "000000.png"
    assert len(list((tmp_path / "pq").glob("part-*.parquet"))) == 3
    same_pairs(str(tmp_path / "folder"), count=5, seed=4, size=64)
    same_pairs(str(tmp_path / "pq"), count=5, seed=4, size=64)
    for root in ("folder", "pq"):
        vocab = Vocabulary.from_file(str(tmp_path / root / "vocabulary.json"))
        assert vocab.names == SHAPES_CLASSES and vocab.id == shapes_vocabulary().id


def test_round_trip_on_s3(s3_server):
    bucket = s3_server.bucket("shapes")
    for layout in ("folder", "parquet"):
        uri = f"s3://{bucket}/{layout}"
        write_shapes(uri, count=4, seed=9, size=48, layout=layout)
        same_pairs(uri, count=4, seed=9, size=48)
        assert list_pairs(uri).layout == layout
        with s3_server.filesystem().open(f"{bucket}/{layout}/vocabulary.json") as f:
            assert Vocabulary.from_dict(json.load(f)).names == SHAPES_CLASSES


def test_jpeg_images_and_appending_with_start(tmp_path):
    uri = str(tmp_path / "jpg")
    write_shapes(uri, count=2, seed=0, size=64, image_format="jpg")
    write_shapes(uri, count=2, seed=0, size=64, image_format="jpg", start=2)
    pairs = list(iter_pairs(uri))
    assert [p[0] for p in pairs] == ["000000", "000001", "000002", "000003"]
    image, label = generate(3, seed=0, size=64)
    assert (pairs[3][2] == label).all()  # labels stay exact PNGs
    # JPEG (4:2:0 chroma, pixel noise) is lossy but far closer to its own image than to another one.
    assert np.abs(pairs[3][1].astype(int) - image).mean() < 10
    assert np.abs(pairs[2][1].astype(int) - image).mean() > 20


def test_bad_arguments():
    with pytest.raises(ValueError, match="layout must be 'folder' or 'parquet'"):
        write_shapes("memory://x", count=1, layout="tar")
    with pytest.raises(ValueError, match="size must be at least 16"):
        generate(0, size=8)
    with pytest.raises(ValueError, match="non-negative"):
        generate(-1)


def test_command_line_entry_point(tmp_path):
    out = tmp_path / "cli"
    args = [str(out), "--count", "3", "--seed", "1", "--size", "32", "--layout", "parquet"]
    done = subprocess.run([sys.executable, "-m", "ebseg.data.shapes", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "RuntimeWarning" not in done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["count"] == 3 and summary["layout"] == "parquet"
    same_pairs(str(out), count=3, seed=1, size=32)
