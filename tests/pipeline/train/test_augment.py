"""The augmentation stage: deterministic per (seed, epoch, image id), whole-epoch datasets local and on S3."""

from __future__ import annotations

import numpy as np
import pytest

from ebseg.data import IGNORE_INDEX, encode_label, generate
from pipeline.train.augment import AugmentBatch, build_train_dataset, epoch_seed
from tests.pipeline.pairs_support import encode_image, wide_label_set


def by_key(rows) -> dict[tuple[int, str], dict]:
    return {(int(r["epoch"]), r["image_id"]): r for r in rows}


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
