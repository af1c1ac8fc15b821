"""pipeline.results.export over a labelling output (shapes + one corrupt file, demo model, local Ray)."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from ebseg.data.shapes import write_shapes
from pipeline.label.decode import decode_image
from pipeline.label.job import LabelJob
from pipeline.label.run import run
from pipeline.results.export import export_coco, export_png, safe_name
from pipeline.results.hf import export_hf
from pipeline.results.query import open_output


@pytest.fixture(scope="module")
def labelled(ray_local, tmp_path_factory):
    """A finished output of 4 shapes images and one corrupt file; (uri, ok ids, error id, class names)."""
    root = tmp_path_factory.mktemp("export")
    write_shapes(str(root / "data"), count=4, seed=5, size=128)
    rng = np.random.default_rng(0)
    (root / "data" / "images" / "zz-corrupt.png").write_bytes(rng.integers(0, 256, 500, np.uint8).tobytes())
    out = root / "out"
    summary = run(
        LabelJob(
            input=str(root / "data" / "images"),
            output=str(out),
            vocabulary=str(root / "data" / "vocabulary.json"),
            model="demo",
            files_per_shard=2,
            progress=False,
        )
    )
    assert (summary["images"], summary["ok"], summary["errors"]) == (5, 4, 1)
    with open_output(str(out)) as o:
        rows = o.sql("SELECT image_id, status FROM images").to_pylist()
        names = list(o.vocabulary.names)
    ok = sorted(r["image_id"] for r in rows if r["status"] == "ok")
    (bad,) = [r["image_id"] for r in rows if r["status"] != "ok"]
    return str(out), ok, bad, names


def test_coco_round_trips_through_pycocotools(labelled, tmp_path):
    uri, ok, bad, names = labelled
    summary = export_coco(uri, str(tmp_path / "coco"))
    path = tmp_path / "coco" / "annotations.json"
    assert summary["path"] == str(path) and summary["images"] == len(ok)
    coco = COCO(str(path))
    assert [(c["id"], c["name"]) for c in coco.loadCats(coco.getCatIds())] == [
        (i + 1, n) for i, n in enumerate(names)
    ]
    images = coco.loadImgs(coco.getImgIds())
    exported = [i["ebseg_image_id"] for i in images]
    assert sorted(exported) == ok and bad not in exported
    checked = 0
    with open_output(uri) as out:
        for image in images:
            image_id = image["ebseg_image_id"]
            labels = out.label_map(image_id)
            assert (image["height"], image["width"]) == labels.shape
            assert image["file_name"].endswith(".png")
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
            assert sorted(a["category_id"] - 1 for a in anns) == sorted(np.unique(labels).tolist())
            for ann in anns:
                name = names[ann["category_id"] - 1]
                mask = coco.annToMask(ann).astype(bool)
                np.testing.assert_array_equal(mask, out.mask(image_id, name))
                assert ann["area"] == int(mask.sum()) and ann["iscrowd"] == 0
                checked += 1
    assert checked == summary["annotations"] > len(ok)
    # A .json destination is the file itself.
    assert export_coco(uri, str(tmp_path / "x" / "named.json"))["path"] == str(tmp_path / "x" / "named.json")
    assert json.loads((tmp_path / "x" / "named.json").read_text()) == json.loads(path.read_text())


def _check_pngs(read, uri, ok, names):
    """``read(relative name) -> bytes`` of an export_png destination; checks it against the output."""
    assert json.loads(read("id2label.json")) == {str(i): n for i, n in enumerate(names)}
    index = list(csv.DictReader(io.StringIO(read("images.csv").decode())))
    assert sorted(r["image_id"] for r in index) == ok
    with open_output(uri) as out:
        for row in index:
            assert row["png"] == f"{safe_name(row['image_id'])}.png" and row["source_uri"].endswith(".png")
            with Image.open(io.BytesIO(read(row["png"]))) as image:
                raw = np.asarray(image)
            assert raw.dtype == np.uint8  # a handful of classes: 8-bit
            np.testing.assert_array_equal(raw.astype(np.int32), out.label_map(row["image_id"]))


def test_png_export_matches_label_maps(labelled, tmp_path):
    uri, ok, _, names = labelled
    summary = export_png(uri, str(tmp_path / "png"))
    assert summary == {"dest": str(tmp_path / "png"), "images": len(ok), "classes": len(names)}
    assert len(list((tmp_path / "png").glob("*.png"))) == len(ok)
    _check_pngs(lambda name: (tmp_path / "png" / name).read_bytes(), uri, ok, names)


def test_exports_to_s3(labelled, s3_server):
    uri, ok, _, names = labelled
    dest = f"s3://{s3_server.bucket('export')}/hf"
    assert export_png(uri, dest)["dest"] == dest
    fs = s3_server.filesystem()
    _check_pngs(lambda name: fs.cat_file(f"{dest}/{name}"), uri, ok, names)
    summary = export_coco(uri, f"{dest}/coco.json")
    assert summary["path"] == f"{dest}/coco.json" and summary["images"] == len(ok)
    assert len(json.loads(fs.cat_file(f"{dest}/coco.json"))["annotations"]) == summary["annotations"]


def test_safe_name():
    assert safe_name("0123abcdef") == "0123abcdef"
    assert safe_name("a/b c") == "a_b_c"
    with pytest.raises(ValueError, match="image_id"):
        safe_name("..")


def test_hf_export_round_trips_through_datasets(labelled, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")  # the dev extra; CI installs it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a local folder: nothing may be fetched
    uri, ok, bad, names = labelled
    dest = tmp_path / "hf"
    summary = export_hf(uri, str(dest))
    assert summary["images"] == len(ok) and summary["classes"] == len(names)
    loaded = datasets.load_dataset(str(dest), split="train", cache_dir=str(tmp_path / "cache"))
    assert isinstance(loaded.features["image"], datasets.Image)
    assert isinstance(loaded.features["label"], datasets.Image)
    id2label = json.loads((dest / "id2label.json").read_text())
    assert id2label == {str(i): n for i, n in enumerate(names)}
    assert sorted(loaded["image_id"]) == ok and bad not in loaded["image_id"]
    with open_output(uri) as out:
        for row in loaded:
            label = np.asarray(row["label"]).astype(np.int32)
            expected = out.label_map(row["image_id"])
            assert np.array_equal(
                np.where(label == 255, -1, label), expected
            )  # label maps equal the output's
            with open(row["source_uri"], "rb") as f:
                assert np.array_equal(np.asarray(row["image"].convert("RGB")), decode_image(f.read()))
    # The plain Parquet loader reads the same features from the files' own metadata.
    files = sorted(str(p) for p in (dest / "data").glob("*.parquet"))
    plain = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "c2"))
    assert plain.features == loaded.features and len(plain) == len(ok)
