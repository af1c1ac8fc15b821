"""Pair sets from storage: folder and Parquet layouts, local and S3, with and without Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ebseg.data import IGNORE_INDEX, encode_label, generate, write_shapes
from pipeline.pairs import decode_pair, iter_pairs, list_pairs, read_pairs
from pipeline.train.augment import build_train_dataset
from tests.pipeline.pairs_support import assert_same_pairs, encode_image, expected_shapes, wide_label_set

# ----------------------------------------------------------------------------------------- listing, no Ray


def test_iter_pairs_both_layouts_agree(shapes_sets):
    expected = expected_shapes(6, seed=3, size=64)
    assert_same_pairs(list(iter_pairs(str(shapes_sets / "folder"))), expected)
    assert_same_pairs(list(iter_pairs(str(shapes_sets / "pq"))), expected)
    listing = list_pairs(str(shapes_sets / "pq"))
    assert (listing.layout, listing.count, len(listing.files)) == ("parquet", 6, 2)


def test_sixteen_bit_labels_and_image_formats(tmp_path):
    pairs = wide_label_set(tmp_path)
    got = list(iter_pairs(str(tmp_path)))
    assert [g[0] for g in got] == ["a", "b", "sub/c"]
    for (_, image, label), (_, e_image, e_label) in zip(got, pairs):
        assert label.dtype == np.int32 and (label == e_label).all()
        assert image.shape == e_image.shape
        if image.shape[0] != 21:  # the WEBP one is lossy
            assert (image == e_image).all()
    assert {900, 256, IGNORE_INDEX} <= set(np.unique(got[0][2]).tolist())


def test_mismatched_layouts_name_the_file(tmp_path):
    write_shapes(str(tmp_path / "s"), count=3, seed=0, size=32)
    (tmp_path / "s" / "annotations" / "000001.png").unlink()
    with pytest.raises(ValueError, match=r"image without annotation: .*images/000001\.png"):
        list_pairs(str(tmp_path / "s"))
    (tmp_path / "s" / "images" / "000001.png").unlink()
    (tmp_path / "s" / "annotations" / "extra.png").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"annotation without image: .*annotations/extra\.png"):
        list_pairs(str(tmp_path / "s"))
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "images").mkdir()
    with pytest.raises(ValueError, match="found images/ but no annotations/"):
        list_pairs(str(tmp_path / "only"))
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "annotations").mkdir()
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty'}: empty training set"):
        list_pairs(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=f"{tmp_path / 'nothing'}: no training data found"):
        list_pairs(str(tmp_path / "nothing"))
    table = pa.table({"image_id": ["x"], "image": [b"1"]})
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet: Parquet file lacks column\(s\) \['label'\]"):
        list_pairs(str(tmp_path / "bad.parquet"))


def test_decode_pair_checks_sizes():
    image, label = generate(0, seed=0, size=32)
    with pytest.raises(ValueError, match="img9: image is 32x32 but its label is 31x32"):
        decode_pair(encode_image(image, "PNG"), encode_label(label[:31]), image_id="img9")
    with pytest.raises(ValueError, match="img9: cannot decode the image"):
        decode_pair(b"junk", encode_label(label), image_id="img9")


# ---------------------------------------------------------------------------------------------- with Ray


def decoded(rows) -> list[tuple[str, np.ndarray, np.ndarray]]:
    return [(r["image_id"], *decode_pair(r["image"], r["label"], image_id=r["image_id"])) for r in rows]


def test_read_pairs_local_both_layouts(ray_local, shapes_sets, tmp_path):
    expected = expected_shapes(6, seed=3, size=64)
    for layout in ("folder", "pq"):
        rows = read_pairs(str(shapes_sets / layout)).take_all()
        assert set(rows[0]) == {"image_id", "image", "label"} and isinstance(rows[0]["image"], bytes)
        assert_same_pairs(decoded(rows), expected)  # sorted by image_id, identical pixels
    wide = wide_label_set(tmp_path)
    got = decoded(read_pairs(str(tmp_path)).take_all())
    assert [g[0] for g in got] == ["a", "b", "sub/c"]
    assert all((g[2] == w[2]).all() for g, w in zip(got, wide))


def test_read_pairs_on_s3_match_local(ray_local, s3_server, shapes_sets):
    bucket = s3_server.bucket("train")
    write_shapes(f"s3://{bucket}/folder", count=6, seed=3, size=64)
    write_shapes(f"s3://{bucket}/pq", count=6, seed=3, size=64, layout="parquet", rows_per_file=4)
    local = decoded(read_pairs(str(shapes_sets / "folder")).take_all())
    for layout in ("folder", "pq"):
        assert list_pairs(f"s3://{bucket}/{layout}").count == 6
        assert_same_pairs(decoded(read_pairs(f"s3://{bucket}/{layout}").take_all()), local)


def test_errors_reach_the_driver_before_ray(tmp_path):
    with pytest.raises(ValueError, match="no training data found"):
        read_pairs(str(tmp_path))
    with pytest.raises(ValueError, match="no training data found"):
        build_train_dataset(str(tmp_path), augment="small", seed=0)
    with pytest.raises(ValueError, match="unknown augmentation preset"):
        build_train_dataset(str(tmp_path), augment="nope", seed=0)


def test_memory_store_is_read_by_the_driver(ray_local):
    uri = "memory://h2-train-data/shapes"
    write_shapes(uri, count=3, seed=2, size=40, layout="parquet")
    write_shapes(uri + "-folder", count=3, seed=2, size=40)
    expected = expected_shapes(3, seed=2, size=40)
    assert_same_pairs(decoded(read_pairs(uri).take_all()), expected)
    rows = build_train_dataset(uri + "-folder", augment="small", seed=0, epoch=0).take_all()
    assert sorted(r["image_id"] for r in rows) == [e[0] for e in expected]
