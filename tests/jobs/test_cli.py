"""The ``ebseg`` command end to end: label, query, show and export through the installed entry point.

One labelling of a known set (eight synthetic shapes images with their ground-truth label maps) by the
shipped demo model, run as a user runs it (``ebseg label`` in a subprocess on an embedded local Ray), feeds
the query / show / export tests; answers are checked against the ground truth and against pycocotools.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ebseg.data.shapes import write_shapes
from jobs.cli import build_parser, main
from jobs.flags import spec_from_args
from pipeline.results.overlay import GAP
from pipeline.results.query import open_output

EBSEG = Path(sys.executable).with_name("ebseg")
SEED, COUNT, SIZE = 42, 8, (192, 256)  # non-square, so a transposed overlay would be caught


def ebseg(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [str(EBSEG), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
    )


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_shapes(str(root), count=COUNT, seed=SEED, size=SIZE)
    return root


@pytest.fixture(scope="module")
def labelled(shapes, tmp_path_factory):
    """``ebseg label IN OUT`` (demo model, its own vocabulary, embedded Ray) run once for the module."""
    out = tmp_path_factory.mktemp("cli") / "out"
    result = ebseg("label", str(shapes / "images"), str(out))
    return out, result


def ground_truth(shapes: Path) -> dict[tuple[str, str], float]:
    """(file name, class name) -> fraction of the image's pixels, from the generator's label maps."""
    names = [c["name"] for c in json.loads((shapes / "vocabulary.json").read_text())["classes"]]
    truth = {}
    for path in sorted((shapes / "annotations").glob("*.png")):
        label = np.asarray(Image.open(path))
        for class_id, name in enumerate(names):
            fraction = float((label == class_id).mean())
            if fraction > 0:
                truth[(path.name, name)] = fraction
    return truth


def test_label_command_labels_the_images_and_prints_a_summary(labelled, shapes):
    out, result = labelled
    assert result.returncode == 0, result.stderr
    assert f"labelled {COUNT} images" in result.stdout
    assert f"{COUNT} ok, 0 failed" in result.stdout
    assert f"output: {out}" in result.stdout
    assert "effective batch size" in result.stdout
    # The run's page is written with the output, and the summary ends pointing at it.
    assert result.stdout.splitlines()[-1].startswith(f"report: {out}/report.html")
    assert "red circle" in (out / "report.html").read_text()
    assert "started an embedded local Ray" in result.stderr
    assert "labelling: 1/1 shards" in result.stderr  # the progress line
    # Without --vocabulary the demo model labels with the vocabulary it was trained on.
    assert "vocabulary: the model's own (shapes): background, red circle" in result.stderr
    written, truth = (json.loads((p / "vocabulary.json").read_text())["classes"] for p in (out, shapes))
    assert [c["name"] for c in written] == [c["name"] for c in truth]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] == COUNT and summary["errors"] == 0
    assert len(list((out / "_manifest").glob("*.json"))) == 1


RAY_LINE = re.compile(
    r"^\[\d{4}-\d\d-\d\d [\d:,]+ [DIWEF] \d+ \d+\]|^\d{4}-\d\d-\d\d [\d:,]+\s+(INFO|WARNING|ERROR) "
)


def test_a_run_prints_only_its_own_lines(labelled):
    """Ray's C++ core (``[date E pid tid] core_worker.cc``) and Ray Data's warnings go to Ray's log files."""
    _, result = labelled
    lines = (result.stdout + result.stderr).splitlines()
    assert [
        line for line in lines if RAY_LINE.search(line) or ".cc:" in line or "Progress bars" in line
    ] == []
    for line in lines:
        assert line.startswith(
            ("ebseg: ", "labelling: ", "labelled ", "model: ", "output: ", "next: ", "report: ")
        ), line
    logs = re.search(r"Ray's own log lines: (\S+)", result.stderr)[1]
    (driver_log,) = Path(logs).glob("ebseg-driver-*.err")
    assert driver_log.is_file()  # where Ray's lines (the core worker's, Ray Data's warnings) went


def test_query_answers_match_the_known_content(labelled, shapes, capsys):
    # In this process: the entry point is run as a subprocess by the labelling above and the --help test.
    out, _ = labelled
    sql = (
        "SELECT i.source_uri, s.label, s.area_fraction FROM images i JOIN segments s USING (image_id) "
        "ORDER BY i.source_uri, s.class_id"
    )
    assert main(["query", str(out), sql, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    answered = {(Path(r["source_uri"]).name, r["label"]): r["area_fraction"] for r in rows}
    truth = ground_truth(shapes)
    assert {name for name, _ in answered} == {name for name, _ in truth}
    # The demo model is not perfect, but on this set every class's area is within 2 points of the truth,
    # and every class covering 1 % of an image is found.
    for key in answered.keys() | truth.keys():
        assert abs(answered.get(key, 0.0) - truth.get(key, 0.0)) <= 0.02, key
    assert {k for k, v in truth.items() if v >= 0.01} <= set(answered)

    # The common question, in SQL: which images show a red circle over a tenth of the picture?
    sql = (
        "SELECT DISTINCT i.source_uri FROM images i JOIN segments s USING (image_id) "
        "WHERE s.label = 'red circle' AND s.area_fraction > 0.1"
    )
    assert main(["query", str(out), sql, "--format", "csv"]) == 0
    found = {Path(row["source_uri"]).name for row in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    expected = {name for (name, label), v in truth.items() if label == "red circle" and v > 0.1}
    assert found == expected and found


def test_query_table_format_and_sql_errors(labelled, capsys):
    out, _ = labelled
    sql = "SELECT label, count(*) AS images FROM segments GROUP BY label ORDER BY label"
    assert main(["query", str(out), sql]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["label", "images"]
    with open_output(str(out)) as o:
        expected = o.sql(sql).to_pylist()
    body = [line.rsplit(None, 1) for line in table[2 : 2 + len(expected)]]
    assert [(label.strip(), int(n)) for label, n in body] == [(r["label"], r["images"]) for r in expected]
    assert table[-1] == f"({len(expected)} rows)"

    assert main(["query", str(out), "SELECT no_such_column FROM segments"]) == 1
    assert "no_such_column" in capsys.readouterr().err


def test_show_writes_an_overlay_of_the_image_size(labelled, tmp_path, capsys):
    out, _ = labelled
    with open_output(str(out)) as o:
        image_id, source = (
            o.sql("SELECT image_id, source_uri FROM images ORDER BY image_id LIMIT 1").to_pylist()[0].values()
        )
    dest = tmp_path / "overlay.png"
    assert main(["show", str(out), image_id[:10], "--out", str(dest)]) == 0  # a unique prefix is enough
    printed = capsys.readouterr().out
    assert (
        f"wrote {dest} ({SIZE[1]}x{SIZE[0]} image; " in printed and "original | overlay | legend" in printed
    )
    drawn, original = Image.open(dest), Image.open(source)
    height, width = SIZE
    assert drawn.format == "PNG" and drawn.height == height and drawn.width > 2 * width
    pixels, plain = np.asarray(drawn.convert("RGB"), np.int16), np.asarray(original.convert("RGB"))
    assert np.array_equal(pixels[:, :width], plain)  # the original on the left, as it is
    assert np.abs(pixels[:, width + GAP : 2 * width + GAP] - plain).mean() > 5  # the overlay beside it
    assert main(["show", str(out), image_id, "--out", str(tmp_path / "alone.png"), "--no-side-by-side"]) == 0
    assert Image.open(tmp_path / "alone.png").width == drawn.width - width - GAP

    # The input's file name names the same image.
    assert main(["show", str(out), Path(source).name, "--out", str(tmp_path / "by_name.png")]) == 0
    assert (tmp_path / "by_name.png").read_bytes() == dest.read_bytes()
    capsys.readouterr()

    assert main(["show", str(out), "not-an-id", "--out", str(tmp_path / "x.png")]) == 1
    assert "no image 'not-an-id'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_export_coco_round_trips_through_pycocotools(labelled, tmp_path):
    from pycocotools.coco import COCO

    out, _ = labelled
    assert main(["export", str(out), str(tmp_path / "coco"), "--format", "coco"]) == 0
    coco = COCO(str(tmp_path / "coco" / "annotations.json"))
    with open_output(str(out)) as o:
        names = list(o.vocabulary.names)
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == names
        assert len(coco.getImgIds()) == COUNT
        for image in coco.loadImgs(coco.getImgIds()):
            label_map = o.label_map(image["ebseg_image_id"])
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
            assert {a["category_id"] - 1 for a in anns} == set(np.unique(label_map).tolist())
            for ann in anns:
                mask = coco.annToMask(ann).astype(bool)
                np.testing.assert_array_equal(mask, label_map == ann["category_id"] - 1)
                assert ann["area"] == mask.sum()

    assert main(["export", str(out), str(tmp_path / "png"), "--format", "png"]) == 0
    id2label = json.loads((tmp_path / "png" / "id2label.json").read_text())
    assert id2label == {str(i): n for i, n in enumerate(names)}
    assert len(list((tmp_path / "png").glob("*.png"))) == COUNT


def test_label_from_s3_with_a_spec_file_and_flag_overrides(shapes, s3_server, ray_local, tmp_path, capsys):
    bucket = s3_server.bucket("cli")
    fs = s3_server.filesystem()
    fs.put(str(shapes / "images"), f"{bucket}/in", recursive=True)
    spec = tmp_path / "label.yaml"
    spec.write_text(
        f"kind: label\ninput: s3://{bucket}/in\noutput: s3://{bucket}/out\n"
        f"vocabulary: {shapes / 'vocabulary.json'}\nmodel: demo\nbatch_size: 4\n"
    )
    # Flags override the file: tiny (random weights, with a warning) and a smaller batch.
    assert main(["label", "--spec", str(spec), "--model", "tiny", "--batch-size", "2", "--json"]) == 0
    captured = capsys.readouterr()
    assert "random weights" in captured.err
    summary = json.loads(captured.out)
    assert summary["images"] == COUNT and summary["model_id"].startswith("tiny:")
    job = json.loads(fs.cat(f"{bucket}/out/job.json"))
    assert job["batch_size"] == 2

    assert main(["query", f"s3://{bucket}/out", "SELECT count(*) AS n FROM images", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": COUNT}]


def test_label_with_proposals_then_relabel_through_the_cli(shapes, ray_local, tmp_path, capsys):
    names = [c["name"] for c in json.loads((shapes / "vocabulary.json").read_text())["classes"]]
    source, new = str(tmp_path / "source"), str(tmp_path / "new")
    args = ["label", str(shapes / "images"), source, "--vocabulary", ",".join(names[:3]), "--proposals"]
    assert main([*args, "--proposals-encoding", "lossless", "--json", "--no-progress"]) == 0
    capsys.readouterr()
    vocabulary = str(shapes / "vocabulary.json")
    # --dry-run: the spec, then the plan as comments (refusals said, nothing written).
    assert main(["relabel", source, new, "--vocabulary", vocabulary, "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "# would run: 1 shards" in plan and f"lossless encoding, read from {source}" in plan
    assert f"{COUNT} images" in plan and not os.path.exists(new)
    assert main(["relabel", source, source, "--vocabulary", vocabulary, "--dry-run"]) == 0
    assert "# plan: cannot relabel: " in capsys.readouterr().out
    args = ["relabel", source, new, "--vocabulary", vocabulary, "--resolution", "grid", "--json"]
    assert main([*args, "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["images"], summary["ok"]) == (COUNT, COUNT)
    job = json.loads((tmp_path / "new" / "job.json").read_text())
    assert (job["kind"], job["resolution"], job["source_run_id"]) == (
        "relabel",
        "grid",
        summary["source_run_id"],
    )
    with open_output(new) as output:
        found = set(output.sql("SELECT DISTINCT label FROM segments").column(0).to_pylist())
    assert found & set(names[3:])  # the classes the labelling left out
    page = (tmp_path / "new" / "report.html").read_text()  # every run ends with its page
    assert "relabelled from" in page and summary["source_run_id"] in page
    # The relabelled output reads the source's proposals: relabelled again, back to the source's
    # vocabulary at the original size, it gives the source's labels (lossless proposals: bit for bit).
    again = str(tmp_path / "again")
    assert main(["relabel", new, again, "--vocabulary", ",".join(names[:3]), "--no-progress"]) == 0
    assert f"report: {again}/report.html" in capsys.readouterr().out
    masks = "SELECT image_id, label, area, rle FROM segments ORDER BY image_id, label"
    assert main(["query", again, masks, "--format", "json"]) == 0
    relabelled = capsys.readouterr().out
    assert main(["query", source, masks, "--format", "json"]) == 0
    assert relabelled == capsys.readouterr().out and len(json.loads(relabelled)) >= COUNT
    # Once the source no longer holds them, the relabelled output cannot be relabelled: the reason, exit 1.
    (tmp_path / "source" / "proposals.json").unlink()
    assert main(["relabel", new, str(tmp_path / "third"), "--vocabulary", vocabulary]) == 1
    assert f"was relabelled from {source}" in capsys.readouterr().err
    assert main(["relabel", source, "--vocabulary", vocabulary]) == 2  # NEW_OUTPUT missing


def test_flags_and_spec_file_spell_the_same_spec(tmp_path):
    flags = ["label", "in/", "s3://b/out", "--vocabulary", "cat,dog", "--actors", "1-4",
             "--amp-dtype", "none", "--storage-option", "anon=false", "--no-progress"]  # fmt: skip
    spec = tmp_path / "label.yaml"
    spec.write_text(
        "kind: label\ninput: in/\noutput: s3://b/out\nvocabulary: [cat, dog]\nactors: [1, 4]\n"
        "amp_dtype: null\nstorage_options: {anon: false}\nprogress: false\n"
    )
    from_flags = spec_from_args(build_parser().parse_args(flags), "label")
    from_file = spec_from_args(build_parser().parse_args(["label", "--spec", str(spec)]), "label")
    assert from_flags == from_file
    assert from_flags.actors == (1, 4) and from_flags.amp_dtype is None


BAD_LABEL = "kind: label\ninput: a\noutput: OUT\nvocabulary: x,\n"
INVALID = [
    (["label", "--spec", "SPEC"], BAD_LABEL + "batch_size: 0\ncolour: red\n",
     ["label.batch_size (--batch-size): must be >= 1 (got 0)", "label.colour: unknown field; allowed:"]),
    (["label", "IN", "OUT", "--model", "tiny"], None,
     ["label.vocabulary (--vocabulary): model 'tiny' carries no vocabulary", "ade150", "'cat,dog,tree'"]),
    (["label", "IN", "OUT", "--vocabulary", "a,b", "--amp-dtype", "fp8"], None,
     ["label.amp_dtype (--amp-dtype): must be one of 'bf16', 'fp16' or 'fp32' (got 'fp8')"]),
    (["train", "SPEC"], "kind: train\nname: r1\nstorage: OUT\n",
     ["train.data (--data): required field is missing"]),
    (["eval", "SPEC"], BAD_LABEL, ["this is a 'label' spec"]),
    (["label", "--spec", "SPEC"], BAD_LABEL + "storage_options: {secret: abc}\n",
     ["label.storage_options.secret (--storage-option): looks like a credential"]),
    (["submit", "SPEC", "--address", "http://127.0.0.1:9"], "kind: eval\ndata: a\n",
     ["eval.output: required field is missing"]),
]  # fmt: skip


@pytest.mark.parametrize(("args", "spec_text", "expected"), INVALID)
def test_invalid_specs_fail_before_any_work_naming_the_field(args, spec_text, expected, tmp_path, capsys):
    out = tmp_path / "out"
    spec = tmp_path / "spec.yaml"
    if spec_text is not None:
        spec.write_text(spec_text.replace("OUT", str(out)))
    argv = [str(spec) if a == "SPEC" else str(out) if a == "OUT" else a for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    for line in expected:
        assert line in err
    assert not out.exists()


def test_invalid_spec_in_a_fresh_process_starts_nothing(tmp_path):
    spec = tmp_path / "label.yaml"
    spec.write_text(
        f"kind: label\ninput: {tmp_path}\noutput: {tmp_path / 'out'}\nvocabulary: a,\nactors: 0\n"
    )
    result = ebseg("label", "--spec", str(spec), timeout=60)
    assert result.returncode == 2
    assert "label.actors (--actors): must be a count >= 1" in result.stderr
    assert "Ray" not in result.stderr and not (tmp_path / "out").exists()


def test_dry_run_prints_the_resolved_spec(capsys, tmp_path):
    assert main(["label", "in", "out", "--vocabulary", "ade150", "--model", "base", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    from jobs.specs import load_spec

    spec = load_spec(printed)
    assert spec.kind == "label" and spec.model == "base" and spec.vocabulary == "ade150"
    # The printed spec is itself a valid spec file.
    (tmp_path / "s.yaml").write_text(printed)
    assert main(["label", "--spec", str(tmp_path / "s.yaml"), "--dry-run"]) == 0
    assert capsys.readouterr().out == printed


def test_console_script_is_installed():
    assert shutil.which("ebseg", path=str(EBSEG.parent)) == str(EBSEG)
    result = ebseg("--help", timeout=60)
    assert result.returncode == 0
    for command in ("label", "train", "eval", "submit", "status", "logs", "query", "show", "export"):
        assert command in result.stdout


def test_train_then_eval_through_the_cli(ray_local, tmp_path, capsys):
    data = tmp_path / "data"
    write_shapes(str(data / "train"), count=6, seed=0, size=128)
    write_shapes(str(data / "val"), count=3, seed=1, size=128)
    spec = tmp_path / "train.yaml"
    spec.write_text(
        f"kind: train\nname: r1\nstorage: {tmp_path / 'runs'}\ndata: {data / 'train'}\nmodel: tiny\n"
        "trainable: all\nworkers: 1\nbatch_size: 2\nloss: tiny\naugment: small\nlr: 0.001\n"
        "checkpoint_every: 2\nlog_every: 1\nsteps: 100\n"
    )
    assert main(["train", str(spec), "--steps", "2"]) == 0  # the flag overrides the file's 100
    out = capsys.readouterr().out
    final = tmp_path / "runs" / "r1" / "final.pt"
    assert "trained r1 to step 2" in out and f"model: {final}" in out
    assert final.is_file()

    args = ["--data", str(data / "val"), "--output", str(tmp_path / "eval"), "--model", str(final)]
    assert main(["eval", *args, "--batch-size", "2", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["images"] == 3 and metrics["num_classes"] == 7
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == metrics


def test_flags_must_be_spelled_out():
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["label", "in", "out", "--vocab", "a,b"])
    assert exc.value.code == 2


def test_dry_run_describes_the_plan_against_the_output(labelled, shapes, capsys):
    out, _ = labelled
    before = sorted(p.name for p in out.rglob("*"))
    assert main(["label", str(shapes / "images"), str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    from jobs.specs import load_spec

    assert load_spec(printed).vocabulary is None  # still a spec file: the plan is in comments
    assert f"# found: 1 shards, {COUNT} images" in printed
    assert f"# already committed in {out}: 1 shards" in printed and "# would run: 0 shards" in printed
    assert "# vocabulary: shapes (7 classes: background, red circle" in printed
    assert main(["label", str(shapes / "images"), str(out), "--dry-run", "--files-per-shard", "3"]) == 0
    printed = capsys.readouterr().out
    assert "# found: 3 shards, 8 images" in printed and "# would run: 3 shards" in printed
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing written


def test_a_disk_filling_mid_run_is_one_line_and_exit_1(shapes, tmp_path, monkeypatch, capsys):
    """What the labelling raises when the output's disk fills (``OSError`` ENOSPC, see
    ``tests/pipeline/label/test_faults.py`` for what stays committed) reaches the user as one line."""
    import errno

    import pipeline.label.run

    def full(job, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "_manifest" / "x.json"))

    monkeypatch.setattr(pipeline.label.run, "run", full)
    assert main(["label", str(shapes / "images"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ebseg: error: OSError:") and "No space left on device" in err[-1]
    assert not any("Traceback" in line for line in err)
