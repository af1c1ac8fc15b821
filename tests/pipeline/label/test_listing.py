"""Input listing and reading on local disk, memory:// and the S3 test server: files, tar and Parquet."""

from __future__ import annotations

import io
import tarfile
import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

from pipeline.label.listing import Shard, image_id, list_shards
from pipeline.label.reading import read_shard


def encode(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def pictures() -> list[bytes]:
    """Four small real photos, encoded (JPEG, PNG alternately)."""
    from skimage import data

    arrays = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    small = [np.asarray(Image.fromarray(a).resize((40, 32))) for a in arrays]
    return [encode(a, "JPEG" if i % 2 == 0 else "PNG") for i, a in enumerate(small)]


@pytest.fixture(params=["local", "memory", "s3"])
def store(request, tmp_path):
    """(root URI, fsspec filesystem, path of the root on it) on each kind of store."""
    if request.param == "local":
        root = str(tmp_path / "in")
        return root, fsspec.filesystem("file"), root
    if request.param == "memory":
        path = f"/h3-{uuid.uuid4().hex[:8]}/in"
        return f"memory://{path}", MemoryFileSystem(), path
    s3 = request.getfixturevalue("s3_server")
    bucket = s3.bucket("sources")
    return f"s3://{bucket}/in", s3.filesystem(), f"{bucket}/in"


def put(fs, path: str, data: bytes) -> None:
    if "/" in path:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data)


TREE = ["a/1.jpg", "a/2.png", "b/c/3.jpg", "b/4.png", "b/notes.txt", "b/.hidden.jpg", "z.JPG"]


def write_tree(fs, root: str, pictures: list[bytes]) -> dict[str, bytes]:
    """The files of TREE under root; returns the images a listing must find, by relative path."""
    images = {}
    for i, rel in enumerate(TREE):
        data = pictures[i % len(pictures)] if not rel.endswith(".txt") else b"text"
        put(fs, f"{root}/{rel}", data)
        if not rel.endswith(".txt") and "/." not in f"/{rel}":
            images[rel] = data
    return images


def relative(uri: str, root_uri: str) -> str:
    return uri.split(root_uri.split("://")[-1].rstrip("/") + "/", 1)[-1]


def test_prefix_lists_images_in_order_and_reads_them(store, pictures):
    root_uri, fs, root = store
    images = write_tree(fs, root, pictures)
    shards = list(list_shards(root_uri, files_per_shard=2))
    assert [s.kind for s in shards] == ["files"] * 3
    assert [[relative(u, root_uri) for u in s.uris] for s in shards] == [
        ["a/1.jpg", "a/2.png"],
        ["b/4.png", "b/c/3.jpg"],  # "b/4.png" < "b/c/": the order of the keys on an object store
        ["z.JPG"],
    ]
    assert [s.shard_id[:13] for s in shards] == ["files-000000-", "files-000001-", "files-000002-"]
    assert list(list_shards(root_uri, files_per_shard=2)) == shards  # a rerun forms the same shards

    rows = [row for shard in shards for row in read_shard(shard)]
    assert {relative(r["source_uri"], root_uri): r["data"] for r in rows} == images
    assert all(r["error"] is None and r["member"] is None for r in rows)
    assert [r["shard_size"] for r in rows] == [2, 2, 2, 2, 1]
    assert [r["row_index"] for r in rows] == [0, 1, 0, 1, 0]  # each row of a shard once: what commits it
    assert len({r["image_id"] for r in rows}) == len(rows)
    assert all(r["image_id"] == image_id(r["source_uri"], None) for r in rows)
    # Every source_uri names its file again on the same store.
    for r in rows[:2]:
        with fsspec.open(r["source_uri"], "rb") as f:
            assert f.read() == r["data"]


def test_glob_and_single_file(store, pictures):
    root_uri, fs, root = store
    write_tree(fs, root, pictures)
    [every_jpg] = list(list_shards(f"{root_uri}/**/*.jpg"))
    assert [relative(u, root_uri) for u in every_jpg.uris] == ["a/1.jpg", "b/c/3.jpg"]
    [one_level] = list(list_shards(f"{root_uri}/b/*"))
    assert [relative(u, root_uri) for u in one_level.uris] == ["b/4.png"]
    [single] = list(list_shards(f"{root_uri}/b/c/3.jpg"))
    assert [relative(u, root_uri) for u in single.uris] == ["b/c/3.jpg"]
    [row] = read_shard(single)
    assert row["data"] == pictures[2] and row["shard_size"] == 1


def test_bad_uris_are_named(store, pictures):
    root_uri, fs, root = store
    put(fs, f"{root}/x/readme.txt", b"text")
    with pytest.raises(FileNotFoundError, match="no image, tar or Parquet"):
        list(list_shards(root_uri))
    with pytest.raises(FileNotFoundError, match="missing"):
        list(list_shards(f"{root_uri}/missing"))
    with pytest.raises(ValueError, match="not an image"):
        list(list_shards(f"{root_uri}/x/readme.txt"))
    with pytest.raises(ValueError, match="files_per_shard"):
        list(list_shards(root_uri, files_per_shard=0))


def test_missing_file_is_a_read_error_row(tmp_path, pictures):
    (tmp_path / "a.jpg").write_bytes(pictures[0])
    (tmp_path / "b.jpg").write_bytes(pictures[1])
    [shard] = list(list_shards(str(tmp_path)))
    (tmp_path / "b.jpg").unlink()  # gone between listing and reading
    rows = list(read_shard(shard))
    assert [r["error"] is None for r in rows] == [True, False]
    assert rows[1]["error"].startswith("read: ") and rows[1]["data"] is None and rows[1]["shard_size"] == 2


def test_adding_a_later_file_keeps_earlier_shard_ids(tmp_path, pictures):
    for d in ("d1", "d2", "d3"):
        for i in range(3):
            (tmp_path / d).mkdir(exist_ok=True)
            (tmp_path / d / f"{i}.jpg").write_bytes(pictures[i])
    before = list(list_shards(str(tmp_path), files_per_shard=2))
    (tmp_path / "d3" / "9.jpg").write_bytes(pictures[3])
    after = list(list_shards(str(tmp_path), files_per_shard=2))
    # d3/0.jpg is the 7th file: the shards of files 1-6 keep their ids, the rest change.
    assert after[:3] == before[:3]
    assert [s.shard_id for s in after[3:]] != [s.shard_id for s in before[3:]]
    assert sum(len(s.uris) for s in after) == 10


def test_listing_streams_directory_by_directory(monkeypatch, pictures):
    fs = MemoryFileSystem()
    root = f"/h3-stream-{uuid.uuid4().hex[:8]}"
    for d in range(5):
        for i in range(2):
            put(fs, f"{root}/d{d}/{i}.jpg", pictures[i])
    listed = []
    real_ls = MemoryFileSystem.ls

    def counting_ls(self, path, detail=True, **kwargs):
        listed.append(path.rstrip("/").rsplit("/", 1)[-1])
        return real_ls(self, path, detail=detail, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "ls", counting_ls)
    shards = list_shards(f"memory://{root}", files_per_shard=2)
    first = next(shards)
    assert [u.rsplit("/", 2)[-2] for u in first.uris] == ["d0", "d0"]
    # Only the root and the first directory were listed to form the first shard.
    assert [name for name in listed if name.startswith("d")] == ["d0"]
    rest = list(shards)
    assert len(rest) == 4 and [name for name in listed if name.startswith("d")] == [f"d{i}" for i in range(5)]


def make_tar(members: list[tuple[str, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, body in members:
            info = tarfile.TarInfo(name)
            if body is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def test_tar_shards(store, pictures):
    root_uri, fs, root = store
    tar = make_tar([
        ("000001.jpg", pictures[0]), ("000001.json", b'{"a": 1}'), ("sub", None),
        ("sub/000002.png", pictures[1]), ("000003.jpg", b"\xff\xd8 corrupt"), ("000004.cls", b"3"),
        ("sub/._000002.png", b"macOS fork"),
    ])  # fmt: skip
    put(fs, f"{root}/shards/part-0.tar", tar)
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        info = t.getmember("sub/000002.png")
    put(fs, f"{root}/shards/part-1.tar", tar[: info.offset_data + info.size // 2])  # cut inside a member
    put(fs, f"{root}/shards/part-2.tar", b"this is not a tar archive at all" * 20)
    shards = list(list_shards(f"{root_uri}/shards"))
    assert [s.kind for s in shards] == ["tar"] * 3
    assert [s.shard_id.rsplit("-", 1)[0] for s in shards] == ["tar-part-0", "tar-part-1", "tar-part-2"]
    assert len({s.shard_id for s in shards}) == 3

    whole = list(read_shard(shards[0]))
    assert [r["member"] for r in whole] == ["000001.jpg", "sub/000002.png", "000003.jpg"]
    assert [r["data"] for r in whole] == [pictures[0], pictures[1], b"\xff\xd8 corrupt"]
    assert all(r["error"] is None and r["shard_size"] == 3 for r in whole)
    assert whole[0]["source_uri"] == shards[0].uris[0]
    assert len({r["image_id"] for r in whole}) == 3

    # The images before the damage are kept; the cut one and the rest of the tar are read errors.
    truncated = list(read_shard(shards[1]))
    assert [r["member"] for r in truncated] == ["000001.jpg", "sub/000002.png", None]
    assert truncated[0]["data"] == pictures[0] and truncated[0]["error"] is None
    assert all(r["error"].startswith("read: ") and r["data"] is None for r in truncated[1:])
    assert "after 2 images" in truncated[2]["error"]
    assert all(r["shard_size"] == 3 for r in truncated)
    assert [r["row_index"] for r in truncated] == [0, 1, 2]  # the damage row counts as the last row

    [broken] = read_shard(shards[2])
    assert broken["member"] is None and broken["shard_size"] == 1 and broken["error"].startswith("read: ")


def write_parquet(fs, path: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=2)
    put(fs, path, buf.getvalue())


def test_parquet_shards(store, pictures):
    root_uri, fs, root = store
    cells = [pictures[0], None, b"\x89PNG corrupt", pictures[1], pictures[2]]
    table = pa.table({"id": list(range(5)), "img": pa.array(cells, pa.binary())})
    write_parquet(fs, f"{root}/tables/t.parquet", table)
    [shard] = list(list_shards(root_uri, image_column="img"))
    assert shard.kind == "parquet" and shard.shard_id.startswith("parquet-t-")
    rows = list(read_shard(shard, image_column="img"))
    assert [r["member"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert [r["data"] for r in rows] == cells
    assert [r["error"] for r in rows] == [None, "empty: null in column 'img'", None, None, None]
    assert all(r["shard_size"] == 5 for r in rows) and [r["row_index"] for r in rows] == list(range(5))

    with pytest.raises(ValueError, match=r"no image column 'image' \(columns: id, img\)") as info:
        list(list_shards(root_uri))
    assert "t.parquet" in str(info.value)
    # A later file without the column: rows still appear, each with the reason.
    rows = list(read_shard(shard, image_column="image"))
    assert len(rows) == 5 and all(r["error"].startswith("read: no image column 'image'") for r in rows)
    assert [r["row_index"] for r in rows] == list(range(5))


def test_parquet_struct_column_and_damaged_file(tmp_path, pictures):
    # Hugging Face datasets store images as struct<bytes, path>.
    images = pa.array([{"bytes": pictures[0], "path": "a.jpg"}, {"bytes": pictures[1], "path": "b.png"}])
    pq.write_table(pa.table({"image": images}), tmp_path / "hf.parquet")
    [shard] = list(list_shards(str(tmp_path / "hf.parquet")))
    assert [r["data"] for r in read_shard(shard)] == pictures[:2]

    # A damaged file does not stop the listing (it sorts first: the column is checked on the next file).
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    shards = list(list_shards(str(tmp_path)))
    assert [s.uris[0].rsplit("/", 1)[-1] for s in shards] == ["bad.parquet", "hf.parquet"]
    [row] = read_shard(shards[0])
    assert row["error"].startswith("read: ") and row["shard_size"] == 1 and row["member"] is None
    with pytest.raises(ValueError, match="no image column 'img'"):
        list(list_shards(str(tmp_path), image_column="img"))


def test_mixed_kinds_under_one_prefix(tmp_path, pictures):
    (tmp_path / "a.tar").write_bytes(make_tar([("0.jpg", pictures[0])]))
    (tmp_path / "b.jpg").write_bytes(pictures[1])
    pq.write_table(pa.table({"image": [pictures[2]]}), tmp_path / "c.parquet")
    shards = list(list_shards(str(tmp_path)))
    assert sorted(s.kind for s in shards) == ["files", "parquet", "tar"]
    assert sum(len(list(read_shard(s))) for s in shards) == 3
    assert [Shard.from_row(s.to_row()) for s in shards] == shards


def test_file_uri_names_the_same_input_as_the_path(tmp_path, pictures):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "1.jpg").write_bytes(pictures[0])
    assert list(list_shards(f"file://{tmp_path}")) == list(list_shards(str(tmp_path)))
    [shard] = list(list_shards(f"file://{tmp_path}/d/1.jpg"))
    assert shard.uris == (str(tmp_path / "d" / "1.jpg"),)


def test_s3_bucket_root_with_explicit_storage_options(s3_server, monkeypatch, pictures):
    bucket = s3_server.bucket("options")
    s3_server.filesystem().pipe_file(f"{bucket}/p/1.jpg", pictures[0])
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only the options below can find the server now
    options = {"client_kwargs": {"endpoint_url": s3_server.endpoint_url}, "skip_instance_cache": True}
    [shard] = list(list_shards(f"s3://{bucket}", storage_options=options))
    assert shard.uris == (f"s3://{bucket}/p/1.jpg",)
    [row] = read_shard(shard, storage_options=options)
    assert row["data"] == pictures[0] and row["error"] is None


def test_local_listing_without_stat_matches_fsspecs_ls(tmp_path):
    """The local fast path (``os.scandir``) lists what fsspec's ``ls`` lists, links and odd entries too."""
    import os

    from pipeline.label.listing import _list_fs_dir, _list_local_dir

    root = tmp_path / "in"
    for rel in ["a/1.jpg", "b/c/3.jpg", "b/4.png", "b-x.jpg", "b.jpg", ".hidden.jpg", ".h/5.jpg", "z.JPG"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    os.symlink(root / "b", root / "link-to-dir")
    os.symlink(root / "b.jpg", root / "link-to-file.jpg")
    os.symlink(root / "gone.jpg", root / "broken.jpg")
    os.mkfifo(root / "pipe.jpg")
    fs = fsspec.filesystem("file")
    for directory in [str(root), f"{root}/", str(root / "b"), str(root / "b" / "c")]:
        fast = _list_local_dir(directory)
        assert fast == _list_fs_dir(fs, directory), directory
    listed = dict(_list_local_dir(str(root)))
    assert listed == {
        f"{root}/{name}": name in ("a", "b") for name in ["a", "b", "b-x.jpg", "b.jpg", "z.JPG"]
    }
    # "b/" sorts after "b-x.jpg" and "b.jpg", as a key prefix does on an object store.
    assert [p.rsplit("/", 1)[-1] for p, _ in _list_local_dir(str(root))][:4] == ["a", "b-x.jpg", "b.jpg", "b"]
