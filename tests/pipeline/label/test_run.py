"""The labelling job end to end (files, tar, Parquet inputs; local and S3 outputs), its commit, progress.

Fault tests (corrupt inputs, interruption, a dying actor, refusals) are in test_label_faults.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import layout, storage
from pipeline.label import records
from pipeline.label import run as label_run
from pipeline.label.commit import ShardCommitter, clean_after_interruption
from pipeline.label.job import LabelJob
from pipeline.label.parts import PART_SCHEMA, PartWriter, reason
from pipeline.label.progress import Progress
from pipeline.label.records import Provenance
from pipeline.label.run import run
from pipeline.layout import IMAGES_SCHEMA, SCHEMA_VERSION, committed_shards
from tests.pipeline.label.test_segment import save_tiny

VOCAB = "person,cat,coffee cup,grass,sky,building"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("label") / "tiny64.pt")


def encode(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def small_photos(photos, count: int) -> list[np.ndarray]:
    """``count`` real photos at 40-100 px, different sizes and aspect ratios."""
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        scale = 0.08 + 0.03 * i
        size = (max(8, int(photo.shape[1] * scale)), max(8, int(photo.shape[0] * scale)))
        out.append(np.asarray(Image.fromarray(photo).resize(size)))
    return out


def output_fs(uri: str):
    """A fresh filesystem (s3fs caches listings per instance) and the path inside it."""
    fs, path = storage.url_to_fs(uri)
    fs.invalidate_cache()
    return fs, path


def read_images(uri: str) -> pa.Table:
    """The committed records: only the part files a manifest lists (orphans are never read)."""
    fs, path = output_fs(uri)
    files = layout.committed_files(fs, path)
    if not files:
        return IMAGES_SCHEMA.empty_table()
    return pads.dataset(files, filesystem=fs, format="parquet").to_table()


def check_output(uri: str, expected_sources: dict[str, tuple[int, int]], *, status=None) -> pa.Table:
    """Every expected (source_uri, member) exactly once; label maps at the original size; RLE areas."""
    table = read_images(uri)
    rows = table.to_pylist()
    keys = [(r["source_uri"], r["member"]) for r in rows]
    assert len(keys) == len(set(keys)) and set(keys) == set(expected_sources)
    assert len({r["image_id"] for r in rows}) == len(rows)
    for r in rows:
        key = (r["source_uri"], r["member"])
        want = (status or {}).get(key, "ok")
        assert r["status"] == want, (key, r["error"])
        if want != "ok":
            continue
        height, width = expected_sources[key]
        assert (r["height"], r["width"]) == (height, width)
        label_map = layout.decode_label_map(r["label_map"])
        assert label_map.shape == (height, width)
        assert sum(s["area"] for s in r["segments"]) == height * width
        for seg in r["segments"]:
            mask = layout.rle_to_mask(seg["rle"], height, width)
            assert mask.sum() == seg["area"] == (label_map == seg["class_id"]).sum()
    return table


def check_manifests(uri: str, table: pa.Table) -> list[dict]:
    fs, path = output_fs(uri)
    committed = committed_shards(fs, path)
    assert set(table.column("shard_id").to_pylist()) <= committed  # (+ shards that held no image)
    manifests = []
    for shard in sorted(committed):
        manifest = storage.read_json(fs, storage.join(path, "_manifest", f"{shard}.json"))
        assert manifest["schema_version"] == SCHEMA_VERSION
        for part in manifest["files"]:
            assert part["file"].startswith(f"images/{shard}/")
            data = fs.cat_file(storage.join(path, part["file"]))
            assert part["sha256"] == hashlib.sha256(data).hexdigest() and part["bytes"] == len(data)
            parquet = pq.ParquetFile(io.BytesIO(data))
            assert layout.schema_version(parquet.schema_arrow.metadata) == SCHEMA_VERSION
            assert parquet.metadata.num_rows == part["rows"]
        assert sum(p["rows"] for p in manifest["files"]) == manifest["rows"]
        # No orphan is left beside the listed parts.
        on_disk = fs.ls(storage.join(path, "images", shard), detail=False) if manifest["files"] else []
        assert sorted(on_disk) == sorted(storage.join(path, p["file"]) for p in manifest["files"])
        manifests.append(manifest)
    return manifests


# -------------------------------------------------------------------------------------------- commit (no Ray)


def model_rows(shard: str, indices: list[int], size: int, *, status="ok") -> dict[str, np.ndarray]:
    """A model-stage batch (what ``SegmentImages`` returns) of rows ``indices`` of ``shard``."""
    labels = records.to_storage(np.zeros((3, 4), np.int32), 2)
    n = len(indices)
    column = np.empty(n, dtype=object)
    for j in range(n):
        column[j] = labels if status == "ok" else np.zeros((0, 0), np.uint8)
    return {
        "image_id": np.array([f"{shard}-{i}" for i in indices], dtype=object),
        "source_uri": np.array([f"/in/{shard}/{i}.png" for i in indices], dtype=object),
        "shard_id": np.array([shard] * n, dtype=object),
        "member": np.array([None] * n, dtype=object),
        "shard_size": np.full(n, size),
        "row_index": np.array(indices, np.int64),
        "width": np.full(n, 4, np.int32),
        "height": np.full(n, 3, np.int32),
        "status": np.array([status] * n, dtype=object),
        "error": np.array([None if status == "ok" else "decode: broken"] * n, dtype=object),
        "labels": column,
        "scores": np.ones((n, 2), np.float32),
        "decode_ms": np.ones(n),
        "model_ms": np.full(n, 5.0),
        "forward_share": np.full(n, 0.5 if status == "ok" else 0.0),
    }


def concat(*batches: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


@pytest.fixture(params=["local", "s3"])
def out_root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    return f"s3://{request.getfixturevalue('s3_server').bucket('sink')}/out"


def writer_for(uri: str) -> PartWriter:
    return PartWriter(uri, names=["a", "b"], provenance=Provenance("m", "v", "r"))


def parts_on_disk(fs, root: str, shard: str) -> list[str]:
    fs.invalidate_cache()
    try:
        return sorted(fs.ls(storage.join(root, "images", shard), detail=False))
    except FileNotFoundError:
        return []


def test_workers_write_parts_and_the_driver_commits_complete_shards(out_root):
    write = writer_for(out_root)
    fs, root = storage.url_to_fs(out_root)
    committed = []
    with ShardCommitter(
        root,
        fs=fs,
        expected_shards=["s-a", "s-b", "s-empty", "s-short"],
        manifest_fields={"run_id": "r"},
        on_commit=committed.append,
    ) as committer:
        first = write(concat(model_rows("s-a", [1, 0], 3), model_rows("s-b", [0], 2)))
        # One metadata row per part file: no record reaches the driver.
        assert first.schema.names == [f.name for f in PART_SCHEMA] and first.num_rows == 2
        assert sorted(first.column("ranges").to_pylist()) == [[0, 1], [0, 2]]
        assert committer.add(first) == 3
        assert not committed and not fs.exists(storage.join(root, "_manifest"))
        committer.add(write(concat(model_rows("s-a", [2], 3, status="error"), model_rows("s-short", [0], 2))))
        committer.add(write(model_rows("s-b", [1], 2)))
        report = committer.close()
    assert sorted(m["shard_id"] for m in committed) == ["s-a", "s-b", "s-empty"]
    assert report.incomplete == {"s-short": (1, 2)} and report.duplicate_parts == 0

    fs, root = output_fs(out_root)
    assert committed_shards(fs, root) == {"s-a", "s-b", "s-empty"}
    table = read_images(out_root)
    assert table.schema.names == IMAGES_SCHEMA.names
    assert sorted(table.column("image_id").to_pylist()) == ["s-a-0", "s-a-1", "s-a-2", "s-b-0", "s-b-1"]
    manifest = storage.read_json(fs, storage.join(root, "_manifest", "s-a.json"))
    assert (manifest["rows"], manifest["ok"], manifest["errors"]) == (3, 2, 1)
    assert manifest["errors_by_reason"] == {"decode": 1} and manifest["run_id"] == "r"
    assert manifest["timings_s"]["model"] == pytest.approx(0.015) and len(manifest["files"]) == 2
    assert (manifest["model_images"], manifest["forwards"]) == (2, 1.0)
    assert storage.read_json(fs, storage.join(root, "_manifest", "s-empty.json"))["files"] == []
    # The uncommitted shard's part stays for now (a rerun commits the shard, then deletes it as an orphan);
    # readers never see it.
    assert len(parts_on_disk(fs, root, "s-short")) == 1
    assert "s-short-0" not in table.column("image_id").to_pylist()


def test_a_retried_task_duplicate_part_is_left_out_and_deleted(out_root):
    write = writer_for(out_root)
    fs, root = storage.url_to_fs(out_root)
    with ShardCommitter(root, fs=fs, expected_shards=["s-a"]) as committer:
        committer.add(write(model_rows("s-a", [0, 1], 4)))
        # A retried task wrote rows 0-1 again, and its first attempt's metadata also arrived: both dropped.
        committer.add(write(model_rows("s-a", [0, 1], 4)))
        write(model_rows("s-a", [2, 3], 4))  # an attempt that died after writing: its metadata never came
        committer.add(write(model_rows("s-a", [2, 3], 4)))
        report = committer.close()
    assert report.duplicate_parts == 1 and report.orphans_deleted == 2 and not report.incomplete
    fs, root = output_fs(out_root)
    manifest = storage.read_json(fs, storage.join(root, "_manifest", "s-a.json"))
    listed = sorted(storage.join(root, p["file"]) for p in manifest["files"])
    assert manifest["rows"] == 4 and len(listed) == 2 and set(parts_on_disk(fs, root, "s-a")) == set(listed)
    # A part written after the commit (a late retry) is an orphan no reader sees.
    write(model_rows("s-a", [3], 4))
    on_disk = parts_on_disk(fs, root, "s-a")
    assert set(listed) <= set(on_disk) and len(on_disk) == 3
    ids = read_images(out_root).column("image_id").to_pylist()
    assert sorted(ids) == ["s-a-0", "s-a-1", "s-a-2", "s-a-3"]


def test_parts_cut_differently_by_a_retry_are_chosen_to_cover_each_row_once(tmp_path):
    write = writer_for(str(tmp_path))
    fs, root = storage.url_to_fs(str(tmp_path))
    with ShardCommitter(root, fs=fs, expected_shards=["s-a"]) as committer:
        committer.add(write(model_rows("s-a", [0, 1, 2], 5)))
        committer.add(write(model_rows("s-a", [2, 3], 5)))  # overlaps the first: not chosen yet
        committer.add(write(model_rows("s-a", [0, 1], 5)))  # overlaps too
        assert committer.add(write(model_rows("s-a", [4], 5))) >= 1  # {0,1} + {2,3} + {4} covers once
        report = committer.close()
    assert not report.incomplete and report.duplicate_parts == 1
    ids = read_images(str(tmp_path)).column("image_id").to_pylist()
    assert sorted(ids) == [f"s-a-{i}" for i in range(5)]


def test_a_shard_committed_by_another_run_is_not_committed_again(tmp_path):
    write = writer_for(str(tmp_path))
    fs, root = storage.url_to_fs(str(tmp_path))
    with ShardCommitter(root, fs=fs, expected_shards=["s-a"], manifest_fields={"run_id": "one"}) as first:
        first.add(write(model_rows("s-a", [0, 1], 2)))
        first.close()
    with ShardCommitter(root, fs=fs, expected_shards=["s-a"], manifest_fields={"run_id": "two"}) as second:
        second.add(write(model_rows("s-a", [0, 1], 2)))  # a second, concurrent run of the same job
        report = second.close()
    assert report.lost_races == ["s-a"] and not report.manifests and report.orphans_deleted == 1
    assert storage.read_json(fs, storage.join(root, "_manifest", "s-a.json"))["run_id"] == "one"
    assert len(read_images(str(tmp_path))) == 2 and len(parts_on_disk(fs, root, "s-a")) == 1


def test_orphans_of_an_interrupted_run_are_deleted_by_the_next(tmp_path):
    write = writer_for(str(tmp_path))
    fs, root = storage.url_to_fs(str(tmp_path))
    with ShardCommitter(root, fs=fs, expected_shards=["s-a"]) as committer:
        committer.add(write(model_rows("s-a", [0, 1], 2)))
        committer.close()
    orphan = write(model_rows("s-a", [0, 1], 2)).column("file")[0].as_py()  # as if the driver died here
    assert len(parts_on_disk(fs, root, "s-a")) == 2
    assert clean_after_interruption(fs, root) == 1
    assert not fs.exists(storage.join(root, orphan)) and len(parts_on_disk(fs, root, "s-a")) == 1
    # Once a run has finished (summary.json newer than the manifests) nothing is read again.
    storage.write_json_atomic(fs, storage.join(root, "summary.json"), {})
    write(model_rows("s-a", [0, 1], 2))
    assert clean_after_interruption(fs, root) == 0


def test_committer_refuses_parts_of_unscheduled_shards(tmp_path):
    write = writer_for(str(tmp_path))
    fs, root = storage.url_to_fs(str(tmp_path))
    with ShardCommitter(root, fs=fs, expected_shards=["s-a"]) as c, pytest.raises(ValueError, match="s-zzz"):
        c.add(write(model_rows("s-zzz", [0], 1)))
    with pytest.raises(ValueError, match="cannot be a file name"):
        ShardCommitter(root, fs=fs, expected_shards=["../escape"])


def test_reason_codes():
    assert reason("decode: cannot identify") == "decode"
    assert reason("too_large: 9 x 9") == "too_large"
    assert reason("model: RuntimeError: x") == "model"
    assert reason("something went wrong") == "unknown" and reason(None) == "unknown"


def test_progress_plain_lines_and_tty():
    plain = io.StringIO()
    progress = Progress(total_shards=4, skipped_shards=1, stream=plain, interval=3600)
    progress.update(images=5)  # the first update prints
    progress.update(shards=1, images=5)  # within the interval: silent
    progress.close()
    lines = plain.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in plain.getvalue()
    assert lines[-1].startswith("labelling: 2/4 shards (1 skipped), 10 images")

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    progress = Progress(total_shards=2, stream=tty)
    progress.update(shards=2, images=3)
    progress.close()
    assert tty.getvalue().startswith("\rlabelling: 2/2 shards, 3 images") and tty.getvalue().endswith("\n")


def test_job_validation_names_the_field():
    with pytest.raises(ValueError, match="batch_size"):
        LabelJob(input="in", output="out", vocabulary="cat,", batch_size=0)
    with pytest.raises(ValueError, match="actors"):
        LabelJob(input="in", output="out", vocabulary="cat,", actors=(3, 1))
    with pytest.raises(ValueError, match="amp_dtype"):
        LabelJob(input="in", output="out", vocabulary="cat,", amp_dtype="int8")
    assert "secret" not in repr(
        LabelJob(input="i", output="o", vocabulary="c,", storage_options={"key": "secret"})
    )


# ---------------------------------------------------------------------------------------------- end to end


def test_files_to_local_output_then_rerun_skips(ray_local, tiny_ckpt, photos, tmp_path, monkeypatch):
    # Shards are scheduled in waves as the listing streams: 3 shards in waves of 2 and 1.
    monkeypatch.setattr(label_run, "WAVE_SHARDS", 2)
    images = small_photos(photos, 5)
    expected = {}
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for i, image in enumerate(images):
        path = tmp_path / "in" / ("sub" if i % 2 else "") / f"p{i}.{'png' if i % 2 else 'jpg'}"
        path.write_bytes(encode(image, "PNG" if i % 2 else "JPEG"))
        expected[(str(path), None)] = image.shape[:2]
    out = str(tmp_path / "out")
    job = LabelJob(
        input=str(tmp_path / "in"),
        output=out,
        model=tiny_ckpt,
        vocabulary=VOCAB,
        files_per_shard=2,
        batch_size=2,
    )
    summary = run(job)
    assert (summary["shards_total"], summary["shards_written"], summary["shards_skipped"]) == (3, 3, 0)
    assert (summary["images"], summary["ok"], summary["errors"]) == (5, 5, 0)
    assert summary["images_per_s"] > 0 and summary["run_id"].startswith("run-")
    table = check_output(out, expected)
    manifests = check_manifests(out, table)
    assert sum(m["rows"] for m in manifests) == 5
    assert set(table.column("run_id").to_pylist()) == {summary["run_id"]}
    assert set(table.column("model_id").to_pylist()) == {summary["model_id"]}

    job_json = json.loads((tmp_path / "out" / "job.json").read_text())
    assert job_json["model_id"] == summary["model_id"] and job_json["ray_version"]
    assert job_json["vocabulary_id"] == table.column("vocabulary_id")[0].as_py()
    vocabulary = json.loads((tmp_path / "out" / "vocabulary.json").read_text())
    assert [c["name"] for c in vocabulary["classes"]] == VOCAB.split(",")
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary

    # DuckDB reads the output as a table, segments unnested.
    con = duckdb.connect()
    glob = f"{out}/images/*/*.parquet"
    assert con.execute(f"SELECT count(*) FROM read_parquet('{glob}')").fetchone() == (5,)
    area = con.execute(f"SELECT sum(s.area) FROM (SELECT unnest(segments) AS s FROM read_parquet('{glob}'))")
    assert area.fetchone()[0] == sum(h * w for h, w in expected.values())

    # A rerun reads no committed shard: nothing is written again.
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "images").iterdir()}
    again = run(job)
    assert (again["shards_skipped"], again["shards_written"], again["images"]) == (3, 0, 0)
    assert again["run_id"] == summary["run_id"]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "images").iterdir()} == before


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buffer.getvalue()


def test_tar_shards_to_s3_output(ray_local, s3_server, tiny_ckpt, photos):
    bucket = s3_server.bucket("tars")
    fs = s3_server.filesystem()
    images = small_photos(photos, 5)
    expected = {}
    for t, group in enumerate([images[:3], images[3:]]):
        members = {}
        for i, image in enumerate(group):
            members[f"{t}{i:04d}.jpg"] = encode(image, "JPEG")
            members[f"{t}{i:04d}.json"] = b'{"caption": "ignored"}'
            expected[(f"s3://{bucket}/in/shard-{t}.tar", f"{t}{i:04d}.jpg")] = image.shape[:2]
        fs.pipe_file(f"{bucket}/in/shard-{t}.tar", tar_bytes(members))
    fs.pipe_file(f"{bucket}/in/shard-9.tar", tar_bytes({"9.json": b"{}"}))  # no image: committed empty
    out = f"s3://{bucket}/labels"
    summary = run(
        LabelJob(input=f"s3://{bucket}/in", output=out, model=tiny_ckpt, vocabulary=VOCAB, actors=(1, 2))
    )
    assert (summary["shards_written"], summary["images"], summary["ok"]) == (3, 5, 5)
    table = check_output(out, expected)
    check_manifests(out, table)
    fs = s3_server.filesystem()
    [empty] = [p for p in fs.ls(f"{bucket}/labels/_manifest", detail=False) if "shard-9" in p]
    assert storage.read_json(fs, empty)["rows"] == 0

    con = duckdb.connect()
    con.register_filesystem(s3_server.filesystem())
    rows = con.execute(
        f"SELECT member, s.label, s.area FROM (SELECT member, unnest(segments) AS s "
        f"FROM read_parquet('{out}/images/*/*.parquet')) ORDER BY member, s.class_id"
    ).fetchall()
    assert {r[0] for r in rows} == {member for _, member in expected}
    assert {r[1] for r in rows} <= set(VOCAB.split(","))


def test_parquet_input_with_encoding_in_the_actor(ray_local, tiny_ckpt, photos, tmp_path):
    images = small_photos(photos, 4)
    (tmp_path / "in").mkdir()
    expected = {}
    for f, group in enumerate([images[:3], images[3:]]):
        path = tmp_path / "in" / f"part-{f}.parquet"
        cells = [{"bytes": encode(im, "PNG"), "path": None} for im in group]
        pq.write_table(pa.table({"picture": cells, "n": list(range(len(group)))}), path)
        expected.update({(str(path), str(i)): im.shape[:2] for i, im in enumerate(group)})
    out = str(tmp_path / "out")
    job = LabelJob(
        input=str(tmp_path / "in"),
        output=out,
        model=tiny_ckpt,
        vocabulary=VOCAB,
        image_column="picture",
        encode_in_actor=True,
        batch_size=3,
        progress=False,
    )
    summary = run(job)
    assert (summary["shards_written"], summary["images"]) == (2, 4)
    check_manifests(out, check_output(out, expected))


def test_must_show_real_photos_from_s3_to_s3_parquet(ray_local, s3_server, tiny_ckpt):
    """A prefix of real photos (skimage.data, JPEG and PNG) labelled into S3 Parquet."""
    from skimage import data

    bucket = s3_server.bucket("photos")
    fs = s3_server.filesystem()
    names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry"]
    expected = {}
    for i, name in enumerate(names):
        image = getattr(data, name)()
        image = np.stack([image] * 3, axis=-1) if image.ndim == 2 else image
        fmt = "PNG" if i % 2 else "JPEG"
        key = f"{bucket}/photos/{name}.{fmt.lower()}"
        fs.pipe_file(key, encode(image, fmt))
        expected[(f"s3://{key}", None)] = image.shape[:2]
    fs.pipe_file(f"{bucket}/photos/README.txt", b"not an image: not listed")
    out = f"s3://{bucket}/labels/run1"
    summary = run(
        LabelJob(
            input=f"s3://{bucket}/photos/", output=out, model=tiny_ckpt, vocabulary=VOCAB, files_per_shard=4
        )
    )
    assert (summary["images"], summary["ok"], summary["shards_written"]) == (6, 6, 2)
    table = check_output(out, expected)  # exactly once, label maps at each size, RLE areas
    assert sorted(table.column("width").to_pylist()) == sorted(w for _, w in expected.values())
    check_manifests(out, table)


def test_python_api_labels_shapes_with_the_demo_model(ray_local, tmp_path):
    """Shapes images labelled by the shipped demo model through the Python API (no CLI)."""
    from ebseg.data.labels import decode_label
    from ebseg.data.shapes import write_shapes

    data = tmp_path / "examples"
    write_shapes(str(data), count=3, seed=42, size=128)
    out = tmp_path / "out"
    job = LabelJob(input=str(data / "images"), output=str(out), vocabulary=str(data / "vocabulary.json"))
    summary = run(job)
    assert (summary["images"], summary["ok"]) == (3, 3) and summary["model_id"].startswith("demo:sha256-")
    table = read_images(str(out))
    agree = []
    for row in table.to_pylist():
        predicted = layout.decode_label_map(row["label_map"])
        stem = row["source_uri"].rsplit("/", 1)[-1].rsplit(".", 1)[0]
        truth = decode_label((data / "annotations" / f"{stem}.png").read_bytes(), name=stem)
        assert predicted.shape == truth.shape == (row["height"], row["width"])
        agree.append((predicted == truth).mean())
    assert min(agree) > 0.8, agree  # the demo model labels held-out shapes images (pixel accuracy ~0.96)
