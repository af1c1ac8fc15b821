"""Training pairs from storage (folder and Parquet layouts, local and S3) and the Ray augmentation stage."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ebseg.data import IGNORE_INDEX, encode_label, generate, write_shapes
from pipeline.train_data import (
    AugmentBatch,
    build_train_dataset,
    decode_pair,
    epoch_seed,
    iter_pairs,
    list_pairs,
    read_pairs,
)


def encode_image(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shapes_sets(tmp_path_factory):
    """The same 6 shapes images as a folder set and a Parquet set on local disk."""
    root = tmp_path_factory.mktemp("train_data")
    write_shapes(str(root / "folder"), count=6, seed=3, size=64)
    write_shapes(str(root / "pq"), count=6, seed=3, size=64, layout="parquet", rows_per_file=4)
    return root


def wide_label_set(root) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """A folder set with 16-bit labels (ids up to 900), mixed image formats and nested ids."""
    rng = np.random.default_rng(0)
    pairs = []
    for i, (stem, fmt, ext) in enumerate(
        [("a", "PNG", "png"), ("b", "WEBP", "webp"), ("sub/c", "BMP", "bmp")]
    ):
        image = rng.integers(0, 256, size=(20 + i, 30, 3), dtype=np.uint8)
        label = rng.choice([0, 17, 256, 900, IGNORE_INDEX], size=(20 + i, 30)).astype(np.int32)
        for sub, data, suffix in [
            ("images", encode_image(image, fmt), ext),
            ("annotations", encode_label(label), "png"),
        ]:
            path = root / sub / f"{stem}.{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        pairs.append((stem, image, label))
    return pairs


def assert_same_pairs(got, expected) -> None:
    assert [g[0] for g in got] == [e[0] for e in expected]
    for (_, gi, gl), (_, ei, el) in zip(got, expected):
        assert gi.shape == ei.shape and (gi == ei).all() and (gl == el).all()


def expected_shapes(count: int, seed: int, size: int):
    return [(f"{i:06d}", *generate(i, seed=seed, size=size)) for i in range(count)]


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


def test_augment_batch_without_ray():
    ids = ["000000", "000001", "000002"]
    pairs = [generate(i, seed=1, size=64) for i in range(3)]
    batch = {
        "image_id": np.array(ids, dtype=object),
        "image": np.array([encode_image(p[0], "PNG") for p in pairs], dtype=object),
        "label": np.array([encode_label(p[1]) for p in pairs], dtype=object),
    }
    stage = AugmentBatch("small", seed=7, epoch=0)
    out = stage(batch)
    assert out["image"].shape == (3, 3, 256, 256) and out["image"].dtype == np.uint8
    assert out["label"].shape == (3, 256, 256) and out["label"].dtype == np.int32
    assert list(out["image_id"]) == ids and out["epoch"].tolist() == [0, 0, 0]
    # The same row gives the same output in any batch position; another epoch gives another augmentation.
    reversed_batch = {k: v[::-1] for k, v in batch.items()}
    again = stage(reversed_batch)
    assert (again["image"][::-1] == out["image"]).all() and (again["label"][::-1] == out["label"]).all()
    with_column = AugmentBatch("small", seed=7)({**batch, "epoch": np.array([0, 1, 0])})
    assert (with_column["image"][0] == out["image"][0]).all()
    assert not (with_column["image"][1] == out["image"][1]).all()
    with pytest.raises(ValueError, match="needs an 'epoch' column or an epoch argument"):
        AugmentBatch("small", seed=7)(batch)


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


def by_key(rows) -> dict[tuple[int, str], dict]:
    return {(int(r["epoch"]), r["image_id"]): r for r in rows}


def test_train_dataset_fixed_shapes_and_deterministic(ray_local, shapes_sets):
    def folder_rows():
        uri = str(shapes_sets / "folder")
        return build_train_dataset(uri, augment="small", seed=5, epoch=3, epochs=2).take_all()

    rows = folder_rows()
    folder = by_key(rows)
    assert set(folder) == {(e, f"{i:06d}") for e in (3, 4) for i in range(6)}
    order = [(int(r["epoch"]), r["image_id"]) for r in rows]
    assert [e for e, _ in order] == [3] * 6 + [4] * 6  # epochs follow one another
    assert [i for e, i in order if e == 3] != [i for e, i in order if e == 4]  # each shuffled its own way
    assert [(int(r["epoch"]), r["image_id"]) for r in folder_rows()] == order  # the same order every run
    for row in folder.values():
        assert row["image"].shape == (3, 256, 256) and row["image"].dtype == np.uint8
        assert row["label"].shape == (256, 256) and row["label"].dtype == np.int32
    # The Parquet copy of the same set, read in another order, augments every (epoch, image) identically:
    # a run resumed at epoch 4 sees exactly what it would have seen.
    parquet = by_key(
        build_train_dataset(str(shapes_sets / "pq"), augment="small", seed=5, epoch=4).take_all()
    )
    assert set(parquet) == {(4, f"{i:06d}") for i in range(6)}
    for key, row in parquet.items():
        assert (row["image"] == folder[key]["image"]).all() and (row["label"] == folder[key]["label"]).all()
    # Another epoch augments differently.
    assert any(not (folder[(3, i)]["image"] == folder[(4, i)]["image"]).all() for _, i in parquet)


def test_train_dataset_on_s3_with_wide_labels(ray_local, s3_server, tmp_path):
    wide = {stem: label for stem, _, label in wide_label_set(tmp_path)}
    fs = s3_server.filesystem()
    bucket = s3_server.bucket("wide")
    fs.put(str(tmp_path) + "/", f"{bucket}/set/", recursive=True)
    rows = build_train_dataset(
        f"s3://{bucket}/set", augment="small", seed=0, epoch=0, shuffle=False
    ).take_all()
    assert sorted(r["image_id"] for r in rows) == sorted(wide)
    for row in rows:
        values = set(np.unique(row["label"]).tolist())
        assert values <= set(np.unique(wide[row["image_id"]]).tolist()) | {IGNORE_INDEX}
        assert values & {256, 900}  # ids above 255 survive decoding, resizing and cropping


def test_epoch_shuffle_seed_is_reproducible():
    assert epoch_seed(1, 2) == epoch_seed(1, 2)
    assert len({epoch_seed(1, e) for e in range(20)}) == 20
    assert 0 <= epoch_seed(123, 456) < 2**32


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
