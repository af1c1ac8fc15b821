"""pipeline.results.query over a labelling output (shapes images, demo model, local Ray), local and on S3."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from ebseg.data.shapes import write_shapes
from pipeline import layout
from pipeline.label.job import LabelJob
from pipeline.label.run import run
from pipeline.results.query import LIGHT_COLUMNS, SEGMENT_COLUMNS, open_output

COUNT = 6


@pytest.fixture(scope="module")
def labelled(ray_local, tmp_path_factory):
    """A finished output of 6 shapes images (3 shards), its rows as the test reads them, and a stray file."""
    root = tmp_path_factory.mktemp("query")
    write_shapes(str(root / "data"), count=COUNT, seed=11, size=128)
    out = root / "out"
    job = LabelJob(
        input=str(root / "data" / "images"),
        output=str(out),
        vocabulary=str(root / "data" / "vocabulary.json"),
        model="demo",
        files_per_shard=2,
        progress=False,
    )
    summary = run(job)
    assert (summary["images"], summary["ok"], summary["shards_written"]) == (COUNT, COUNT, 3)
    rows = pads.dataset(str(out / "images"), format="parquet").to_table().to_pylist()
    truth = {r["image_id"]: (r, layout.decode_label_map(r["label_map"])) for r in rows}
    # An interrupted run's leftover: a complete Parquet file whose shard has no manifest.
    first = sorted((out / "images").rglob("*.parquet"))[0]
    stray = pq.read_table(first)
    ids = pa.array([f"stray-{i}" for i in stray.column("image_id").to_pylist()])
    pq.write_table(stray.set_column(0, "image_id", ids), out / "images" / "files-999999-stray.parquet")
    return out, truth


@pytest.fixture(scope="module")
def s3_copy(labelled, s3_server):
    out, _ = labelled
    uri = f"s3://{s3_server.bucket('query')}/out"
    s3_server.filesystem().put(str(out), uri, recursive=True)
    return uri


@pytest.fixture(params=["local", "s3"])
def output_uri(request, labelled):
    return str(labelled[0]) if request.param == "local" else request.getfixturevalue("s3_copy")


def test_images_view_reads_only_committed_shards(output_uri, labelled):
    _, truth = labelled
    with open_output(output_uri) as out:
        table = out.sql("SELECT * FROM images ORDER BY image_id")
        assert table.column_names == [*LIGHT_COLUMNS, "num_segments"]
        assert table.column("image_id").to_pylist() == sorted(truth)  # the stray file's rows are not there
        for row in table.to_pylist():
            want, _ = truth[row["image_id"]]
            assert {k: row[k] for k in LIGHT_COLUMNS if k != "elapsed_ms"} == {
                k: want[k] for k in LIGHT_COLUMNS if k != "elapsed_ms"
            }
            assert row["num_segments"] == len(want["segments"])
        assert out.sql("SELECT * FROM segments LIMIT 0").column_names == ["image_id", *SEGMENT_COLUMNS]
        assert [c["name"] for c in out.vocabulary.to_dict()["classes"]] == list(out.vocabulary.names)
        assert out.vocabulary.id == table.column("vocabulary_id")[0].as_py()
    # The stray file is a real, readable Parquet file with rows, next to the committed ones.
    stray = labelled[0] / "images" / "files-999999-stray.parquet"
    assert pq.read_metadata(stray).num_rows > 0
    assert len(out.files) == 3 and not any(f.endswith(stray.name) for f in out.files)
    with open_output(output_uri, heavy=True) as out:
        row = out.sql(
            "SELECT image_id, label_map, segments FROM images ORDER BY image_id LIMIT 1"
        ).to_pylist()[0]
        want, label_map = truth[row["image_id"]]
        assert np.array_equal(layout.decode_label_map(row["label_map"]), label_map)
        assert row["segments"] == want["segments"]


def test_images_with_matches_decoded_label_maps(output_uri, labelled):
    _, truth = labelled
    with open_output(output_uri) as out:
        for class_id, name in enumerate(out.vocabulary.names):
            fractions = {i: float((lm == class_id).mean()) for i, (_, lm) in truth.items()}
            present = sorted(i for i, f in fractions.items() if f > 0)
            assert out.images_with(name) == present
            levels = sorted(set(fractions.values()))
            if len(levels) < 3:
                continue
            # A threshold between two observed fractions (float32 storage cannot tip the comparison).
            threshold = (levels[len(levels) // 2 - 1] + levels[len(levels) // 2]) / 2
            expected = sorted(i for i, f in fractions.items() if f >= threshold)
            assert out.images_with(name, min_area_fraction=threshold) == expected
            pixels = {i: int((lm == class_id).sum()) for i, (_, lm) in truth.items()}
            cut = sorted(pixels.values())[-2]
            assert out.images_with(name, min_area=cut) == sorted(i for i, p in pixels.items() if p >= cut)
        assert out.images_with("red circle", min_area_fraction=1.01) == []


def test_class_histogram_and_sql_match_python_counts(output_uri, labelled):
    _, truth = labelled
    images, pixels = Counter(), Counter()
    with open_output(output_uri) as out:
        names = out.vocabulary.names
        for _, label_map in truth.values():
            ids, counts = np.unique(label_map, return_counts=True)
            for class_id, count in zip(ids.tolist(), counts.tolist(), strict=True):
                images[names[class_id]] += 1
                pixels[names[class_id]] += count
        histogram = out.class_histogram()
        assert {label: (n, p) for label, n, p in histogram} == {k: (images[k], pixels[k]) for k in images}
        assert [p for _, _, p in histogram] == sorted((p for _, _, p in histogram), reverse=True)
        background = out.con.execute("SELECT count(*) FROM segments WHERE label = 'background'").fetchall()
        assert background == [(images["background"],)]
        total = out.sql("SELECT sum(area) AS a FROM segments")
        assert total.column("a")[0].as_py() == sum(lm.size for _, lm in truth.values())
        assert out.sql("SELECT count(*) AS n FROM images WHERE status = 'error'").column("n")[0].as_py() == 0


def test_mask_and_label_map_decode_the_records(output_uri, labelled):
    _, truth = labelled
    with open_output(output_uri) as out:
        for image_id, (row, label_map) in truth.items():
            assert np.array_equal(out.label_map(image_id), label_map)
            present = {s["label"]: s for s in row["segments"]}
            for class_id, name in enumerate(out.vocabulary.names):
                mask = out.mask(image_id, name)
                assert mask.dtype == bool and mask.shape == (row["height"], row["width"])
                assert np.array_equal(mask, label_map == class_id)
                assert mask.sum() == (present[name]["area"] if name in present else 0)


def test_errors_name_the_label_image_and_output(labelled, tmp_path):
    out_dir, _ = labelled
    with open_output(str(out_dir)) as out:
        with pytest.raises(ValueError, match=r"'zebra'.*'red circle'"):
            out.images_with("zebra")
        with pytest.raises(ValueError, match="zebra"):
            out.mask(next(iter(out.images_with("background"))), "zebra")
        with pytest.raises(KeyError, match="no-such-image"):
            out.label_map("no-such-image")
        with pytest.raises(KeyError, match="no-such-image"):
            out.mask("no-such-image", "red circle")
    with pytest.raises(FileNotFoundError, match=r"job\.json"):
        open_output(str(tmp_path / "nothing"))


def test_output_without_committed_shards_has_empty_views(labelled, tmp_path):
    out_dir, _ = labelled
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    for name in ("job.json", "vocabulary.json"):
        shutil.copy(out_dir / name, empty / name)
    shutil.copy(next((out_dir / "images").rglob("*.parquet")), empty / "images" / "uncommitted.parquet")
    assert json.loads((empty / "job.json").read_text())["kind"] == "label"
    with open_output(str(empty), heavy=True) as out:
        assert out.files == []
        images = out.sql("SELECT * FROM images")
        assert images.num_rows == 0
        assert images.column_names == [*LIGHT_COLUMNS, "label_map", "segments", "num_segments"]
        segments = out.sql("SELECT * FROM segments")
        assert segments.num_rows == 0 and segments.column_names == ["image_id", *SEGMENT_COLUMNS]
        assert out.class_histogram() == [] and out.images_with("red circle") == []


def test_python_api_returns_frames_and_tables(output_uri, labelled):
    import pandas as pd

    _, truth = labelled
    with open_output(output_uri) as out:
        frame = out.images()
        assert isinstance(frame, pd.DataFrame) and sorted(frame["image_id"]) == sorted(truth)
        assert list(frame["image_id"]) == sorted(truth)  # ordered by image_id
        names = out.vocabulary.names
        red = names.index("red circle")
        expected = sorted(
            i for i, (_, lm) in truth.items() if (lm == red).mean() > 0.05
        )  # from the decoded label maps, not from the view
        table = out.segments("label = $1 AND area_fraction > $2", ["red circle", 0.05], format="arrow")
        assert isinstance(table, pa.Table) and table.column("image_id").to_pylist() == expected
        few = out.images("num_segments >= $1", [1], columns=["image_id", "width"], limit=2)
        assert list(few.columns) == ["image_id", "width"] and len(few) == 2
        assert out.job["model"] == "demo" and out.summary["images"] == len(truth)
        with pytest.raises(ValueError, match="format must be"):
            out.images(format="polars")
