"""Relabelling stored proposals against fresh labelling runs: same labels, left-out classes found, refusals,
exactly-once under a killed driver, and the outputs readable by query / show / export unchanged."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

from ebseg.data.shapes import write_shapes
from ebseg.vocab import Vocabulary
from pipeline import layout, storage
from pipeline.label.job import LabelJob
from pipeline.label.plan import OutputMismatchError
from pipeline.label.proposal_records import NoProposalsError
from pipeline.label.run import run as label
from pipeline.lease import LeaseHeldError, acquire
from pipeline.relabel.job import RelabelJob
from pipeline.relabel.plan import ModelMismatchError
from pipeline.relabel.run import run as relabel
from pipeline.relabel.stage import RelabelShards, enlarge
from pipeline.results.export import export_coco
from pipeline.results.query import open_output
from pipeline.results.show import render_overlay
from tests.conftest import REPO
from tests.pipeline.label.test_faults import write_photos
from tests.pipeline.label.test_run import read_images, small_photos
from tests.pipeline.label.test_segment import save_tiny

PHOTO_NAMES = ["person", "coffee cup", "grass", "sky", "tree", "road"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Six shapes images and their vocabulary (the demo model's classes)."""
    root = tmp_path_factory.mktemp("shapes")
    write_shapes(str(root), count=6, seed=11, size=128)
    names = Vocabulary.from_dict(json.loads((root / "vocabulary.json").read_text())).names
    return root / "images", list(names)


@pytest.fixture(scope="module")
def tiny128(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("relabel") / "tiny128.pt", short_side=128)


@pytest.fixture(scope="module")
def photo_runs(ray_local, tiny128, photos, tmp_path_factory):
    """Six photos labelled by tiny128 once for the module, one shard per image: ``fresh`` (all of
    PHOTO_NAMES, no proposals), ``sources`` by encoding (``"person,grass"`` with proposals) and those
    relabelled to PHOTO_NAMES (``relabelled``). Tests only read these, or copy them before writing."""
    root = tmp_path_factory.mktemp("photo_runs")
    write_photos(root / "in", small_photos(photos, 6))
    common = {"input": str(root / "in"), "model": tiny128, "files_per_shard": 1, "progress": False}
    fresh = str(root / "fresh")
    label(LabelJob(**common, output=fresh, vocabulary=",".join(PHOTO_NAMES)))
    sources, relabelled = {}, {}
    for encoding in ("lossless", "default"):
        sources[encoding] = str(root / f"source-{encoding}")
        label(
            LabelJob(
                **common,
                output=sources[encoding],
                vocabulary="person,grass",
                proposals=True,
                proposals_encoding=encoding,
            )
        )
        relabelled[encoding] = str(root / f"new-{encoding}")
        relabel(
            RelabelJob(
                source=sources[encoding],
                output=relabelled[encoding],
                vocabulary=",".join(PHOTO_NAMES),
                progress=False,
            )
        )
    return SimpleNamespace(common=common, fresh=fresh, sources=sources, relabelled=relabelled)


def label_maps(uri: str) -> dict[str, np.ndarray]:
    return {r["image_id"]: layout.decode_label_map(r["label_map"]) for r in read_images(uri).to_pylist()}


def compare(relabelled: str, fresh: str, *, lossless: bool) -> list[float]:
    """Per image agreement of two outputs' label maps; identical rows (ids, sizes, class names) asserted."""
    a, b = label_maps(relabelled), label_maps(fresh)
    assert sorted(a) == sorted(b) and a
    agreement = [float((a[k] == b[k]).mean()) for k in sorted(a)]
    if lossless:
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    else:
        assert min(agreement) >= 0.999, agreement
    return agreement


def labelled_classes(uri: str) -> set[str]:
    return {s["label"] for r in read_images(uri).to_pylist() for s in r["segments"] or []}


def test_demo_on_shapes_relabel_equals_a_fresh_run_and_finds_left_out_classes(ray_local, shapes, tmp_path):
    images, names = shapes
    kept, left_out = names[:3], names[3:]
    fresh = str(tmp_path / "fresh")
    label(LabelJob(input=str(images), output=fresh, vocabulary=",".join(names), progress=False))
    assert labelled_classes(fresh) & set(left_out), "the shapes set must hold some left-out classes"
    for encoding in ("lossless", "default"):
        source = str(tmp_path / f"source-{encoding}")
        job = LabelJob(
            input=str(images),
            output=source,
            vocabulary=",".join(kept),
            proposals=True,
            proposals_encoding=encoding,
            files_per_shard=4,
            progress=False,
        )
        label(job)
        assert not labelled_classes(source) & set(left_out)
        fs, root = storage.url_to_fs(source)
        assert len(layout.committed_files(fs, root, proposals=True)) == 2  # one proposals part per shard
        new = str(tmp_path / f"relabelled-{encoding}")
        summary = relabel(RelabelJob(source=source, output=new, vocabulary=",".join(names), progress=False))
        assert (summary["images"], summary["ok"], summary["shards_written"]) == (6, 6, 2)
        compare(new, fresh, lossless=encoding == "lossless")
        assert labelled_classes(new) & set(left_out) == labelled_classes(fresh) & set(left_out)
        record = json.loads((tmp_path / f"relabelled-{encoding}" / "job.json").read_text())
        source_record = json.loads((tmp_path / f"source-{encoding}" / "job.json").read_text())
        assert record["kind"] == "relabel" and record["source_run_id"] == source_record["run_id"]
        assert record["model_id"] == source_record["model_id"]

    # The relabelled output is an ordinary labelling output for the readers.
    with open_output(new) as output:
        counts = output.sql("SELECT count(*) FROM images WHERE status = 'ok'").column(0).to_pylist()
        assert counts == [6]
        some = output.sql("SELECT image_id FROM images ORDER BY image_id LIMIT 1").column(0).to_pylist()[0]
    shown = render_overlay(new, some, str(tmp_path / "shown.png"))
    assert shown["height"] == 128
    export_coco(new, str(tmp_path / "coco"))
    coco = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    assert len(coco["images"]) == 6 and {c["name"] for c in coco["categories"]} == set(names)

    # On the stride-4 grid: maps at the original size, close to the original-size ones.
    grid = str(tmp_path / "grid")
    relabel(RelabelJob(source=source, output=grid, vocabulary=",".join(names), resolution="grid"))
    full, coarse = label_maps(new), label_maps(grid)
    for key in full:
        assert coarse[key].shape == full[key].shape
        assert (coarse[key] == full[key]).mean() > 0.9


def test_tiny_on_photos_relabel_equals_a_fresh_run(photo_runs):
    for encoding, new in photo_runs.relabelled.items():
        agreement = compare(new, photo_runs.fresh, lossless=encoding == "lossless")
        print(f"tiny photos {encoding}: agreement {agreement}")


def test_relabel_is_refused_without_proposals_or_with_another_model(photo_runs, tmp_path):
    # Copies of the module's outputs (a copy elsewhere is the same job: the output path is no part of it).
    plain, stored = str(tmp_path / "plain"), str(tmp_path / "stored")
    shutil.copytree(photo_runs.fresh, plain)
    shutil.copytree(photo_runs.sources["default"], stored)
    common = {**photo_runs.common, "vocabulary": ",".join(PHOTO_NAMES)}
    with pytest.raises(NoProposalsError, match="--proposals"):
        relabel(RelabelJob(source=plain, output=str(tmp_path / "a"), vocabulary="sky"))
    with pytest.raises(NoProposalsError, match="not a labelling output"):
        relabel(RelabelJob(source=common["input"], output=str(tmp_path / "a"), vocabulary="sky"))
    # Proposals are part of a labelling job's identity: the same output cannot gain them on a rerun.
    with pytest.raises(OutputMismatchError, match="proposals"):
        label(LabelJob(**common, output=plain, proposals=True))
    other = save_tiny(tmp_path / "other.pt", seed=5, short_side=128)
    with pytest.raises(ModelMismatchError, match="Relabel with the model that labelled it"):
        relabel(RelabelJob(source=stored, output=str(tmp_path / "b"), vocabulary="sky", model=other))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    new = str(tmp_path / "new")
    relabel(RelabelJob(source=stored, output=new, vocabulary="sky,grass", progress=False))
    with pytest.raises(OutputMismatchError, match="vocabulary_id"):
        relabel(RelabelJob(source=stored, output=new, vocabulary="sky,tree"))
    with pytest.raises(OutputMismatchError, match="is the source"):
        relabel(RelabelJob(source=stored, output=stored, vocabulary="sky,tree"))
    # One run at a time per output, relabelling as labelling: a live lease refuses, naming its holder.
    fs, root = storage.url_to_fs(new)
    with (
        acquire(fs, root, run_id="run-elsewhere", kind="label"),
        pytest.raises(LeaseHeldError, match="run-elsewhere"),
    ):
        relabel(RelabelJob(source=stored, output=new, vocabulary="sky,grass", progress=False))
    again = relabel(RelabelJob(source=stored, output=new, vocabulary="sky,grass", progress=False))
    assert again["shards_skipped"] == again["shards_total"] and not fs.ls(storage.join(root, "_lease"))


def test_a_relabelled_output_reads_its_sources_proposals(photo_runs, tmp_path):
    source, new = photo_runs.sources["lossless"], photo_runs.relabelled["lossless"]
    with open_output(source) as held, open_output(new) as pointing:
        # Nothing stored twice: the pointer names the source, and the proposals view shows its rows.
        assert pointing.has_proposals and not os.path.exists(os.path.join(new, layout.PROPOSALS_DIR))
        assert pointing.proposals_info.stored_in == storage.full_uri(*storage.url_to_fs(source))
        assert not any(layout.PROPOSALS_DIR in f for f in pointing.files)
        rows = "SELECT image_id, query, area, bbox, emb_a, emb_d FROM proposals ORDER BY image_id, query"
        assert pointing.sql(rows).equals(held.sql(rows)) and pointing.sql(rows).num_rows > 0
        # Search ranks against the relabelled output's own vocabulary (the text competes with its classes).
        assert list(pointing.text_scorer().vocabulary.names) == PHOTO_NAMES
        found = pointing.search("a tree", limit=None, format="arrow")
        assert found.num_rows == 6 and found.column("score").to_pylist() == sorted(
            found.column("score").to_pylist(), reverse=True
        )
        # Spread over Ray actors (one proposals part per call, six parts here): the same hits.
        assert len(pointing.proposal_files) == 6
        for limit, min_area in ((4, 0.0), (None, 0.01)):
            here = pointing.search("a tree", limit=limit, min_area=min_area, format="arrow")
            spread = pointing.search("a tree", limit=limit, min_area=min_area, format="arrow", actors=2)
            assert here.num_rows > 0
            # Same hits; scores to float32 rounding (an actor's thread count orders the sums differently).
            for name in ("image_id", "query", "area", "bbox", "source_uri"):
                assert spread.column(name).equals(here.column(name)), name
            np.testing.assert_allclose(spread.column("score"), here.column("score"), rtol=1e-5)
        image_id = found.column("image_id")[0].as_py()
        (mine, size), (theirs, their_size) = (
            pointing.image_proposals(image_id),
            held.image_proposals(image_id),
        )
        np.testing.assert_array_equal(mine.masks, theirs.masks)
        assert size == their_size
    # Relabelled again, back to the source's vocabulary: the source's labels, bit for bit (lossless), and
    # the pointer still names the output that holds the files, not the intermediate one.
    back = str(tmp_path / "back")
    relabel(RelabelJob(source=new, output=back, vocabulary="person,grass", progress=False))
    compare(back, source, lossless=True)
    assert json.loads((tmp_path / "back" / "proposals.json").read_text())["stored_in"] == (
        storage.full_uri(*storage.url_to_fs(source))
    )


def test_a_relabelled_output_whose_source_lost_its_proposals_is_refused_with_the_reason(photo_runs, tmp_path):
    source, new = tmp_path / "source", str(tmp_path / "new")
    shutil.copytree(photo_runs.sources["default"], source)
    relabel(RelabelJob(source=str(source), output=new, vocabulary="sky,tree", progress=False))
    shutil.rmtree(source / "proposals")
    (source / "proposals.json").unlink()
    with open_output(new) as output:  # the labels stay readable; only the proposals are gone
        assert output.sql("SELECT count(*) FROM images").column(0).to_pylist() == [6]
        assert not output.has_proposals
        with pytest.raises(NoProposalsError, match=f"was relabelled from {source}"):
            output.search("a tree")
    with pytest.raises(NoProposalsError, match=f"was relabelled from {source}"):
        relabel(RelabelJob(source=new, output=str(tmp_path / "again"), vocabulary="sky"))
    assert not (tmp_path / "again").exists()


def test_relabel_on_s3_and_from_s3_into_a_local_output(shapes, s3_server, ray_local, tmp_path):
    images, names = shapes
    source = f"s3://{s3_server.bucket('relabel')}/source"
    kept = ",".join(names[:3])
    common = {"progress": False}
    label(LabelJob(input=str(images), output=source, vocabulary=kept, proposals=True, **common))
    on_s3, local = source.replace("/source", "/new"), str(tmp_path / "new")
    for out in (on_s3, local):
        relabel(RelabelJob(source=source, output=out, vocabulary=",".join(names), **common))
    compare(local, on_s3, lossless=True)
    for out in (on_s3, local):  # the local output's proposals view and search read S3 (DuckDB + s3fs)
        with open_output(out) as output:
            assert output.proposals_info.stored_in == source
            assert output.sql("SELECT count(DISTINCT image_id) FROM proposals").column(0).to_pylist() == [6]
            assert len(output.search(names[4], limit=3)) == 3
    back = str(tmp_path / "back")  # a local relabelling of it, proposals still on S3
    relabel(RelabelJob(source=local, output=back, vocabulary=kept, **common))
    compare(back, source, lossless=False)


def test_grid_labels_are_enlarged_by_nearest_neighbour():
    grid = np.array([[0, 1], [2, 3]])
    np.testing.assert_array_equal(enlarge(grid, (4, 3)), [[0, 0, 1], [0, 0, 1], [2, 2, 3], [2, 2, 3]])


class SlowRelabelShards(RelabelShards):
    """Takes a second per shard, so a test can kill the run between two shard commits."""

    def __call__(self, batch):
        time.sleep(1.0)
        return super().__call__(batch)


DRIVER = """
import json, sys
import ray
ray.init(address=sys.argv[1])
from pipeline.relabel.job import RelabelJob
from pipeline.relabel.run import run
from tests.pipeline.relabel.test_run import SlowRelabelShards
run(RelabelJob(**json.loads(sys.argv[2])), stage_cls=SlowRelabelShards)
"""


def test_a_killed_relabel_resumes_with_every_image_exactly_once(ray_local, photo_runs, tmp_path):
    # Six one-image shards at a second each (SlowRelabelShards): the kill lands between two commits.
    source, whole = photo_runs.sources["default"], photo_runs.relabelled["default"]
    out = tmp_path / "out"
    spec = {"source": source, "output": str(out), "vocabulary": ",".join(PHOTO_NAMES), "progress": False}
    address = ray_local.get_runtime_context().gcs_address
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, address, json.dumps(spec)],
        cwd=REPO,
        start_new_session=True,  # its own process group, killed whole below
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while len(list((out / "_manifest").glob("*.json")) if (out / "_manifest").exists() else []) < 2:
            assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no shard was committed in time"
            time.sleep(0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        driver.stderr.close()
    committed = {p.stem for p in (out / "_manifest").glob("*.json")}
    assert 2 <= len(committed) < 6, "the run must be cut off part-way"
    parts = {
        p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.parquet") if p.parent.name in committed
    }

    summary = relabel(RelabelJob(**spec))
    assert summary["shards_skipped"] == len(committed) and summary["shards_written"] == 6 - len(committed)
    rows = read_images(str(out)).to_pylist()
    assert len(rows) == 6 and len({r["image_id"] for r in rows}) == 6  # every image exactly once
    compare(str(out), whole, lossless=True)  # same labels as the uninterrupted relabelling
    for path, mtime in parts.items():
        assert path.exists() and path.stat().st_mtime_ns == mtime  # committed parts are not written again
