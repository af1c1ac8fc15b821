"""Job specs: YAML / JSON / flags -> validated specs -> the pipeline's job configs; clear errors."""

from __future__ import annotations

import json

import pytest

from jobs.specs import (
    EvalSpec,
    LabelSpec,
    SpecError,
    TrainSpec,
    dump_spec,
    load_spec,
    parse_spec,
    spec_from_flags,
)
from pipeline.evaluate.job import EvalJob
from pipeline.label.job import LabelJob
from pipeline.train.job import TrainJob

LABEL_YAML = """
kind: label
input: s3://photos/2024/
output: s3://labels/run-1
vocabulary: [cat, dog, tree]
model: tiny
batch_size: 8
actors: 1-3
gpus_per_actor: 0.5
amp_dtype: fp16
storage_options:
  endpoint_url: http://127.0.0.1:9000
  anon: false
  client_kwargs: {region_name: eu-west-1}
"""


def test_label_yaml_builds_the_label_job():
    spec = load_spec(LABEL_YAML)
    assert isinstance(spec, LabelSpec)
    job = spec.to_job()
    assert isinstance(job, LabelJob)
    assert job.input == "s3://photos/2024/"
    assert job.output == "s3://labels/run-1"
    assert job.vocabulary == "cat,dog,tree"
    assert job.model == "tiny"
    assert job.batch_size == 8
    assert job.actors == (1, 3)
    assert job.gpus_per_actor == 0.5
    assert job.amp_dtype == "fp16"
    assert dict(job.storage_options) == {
        "endpoint_url": "http://127.0.0.1:9000",
        "anon": False,
        "client_kwargs": {"region_name": "eu-west-1"},
    }
    # Everything not named keeps the pipeline's default.
    assert job.files_per_shard == 256 and job.max_restarts == 3 and job.device is None and job.run_id is None


def test_train_json_file_builds_the_train_job(tmp_path):
    path = tmp_path / "train.json"
    fields = {"kind": "train", "name": "shapes-demo", "storage": str(tmp_path / "runs"), "data": "s3://b/shapes",
              "val_data": "s3://b/shapes-val", "vocabulary": "circle,square,triangle", "model": "demo",
              "trainable": "all", "steps": 2000, "batch_size": 2, "workers": 2, "cpus_per_worker": 0.5,
              "lr": 3e-4, "amp": None, "loss": "tiny", "augment": "small", "keep_checkpoints": None,
              "val_images": 16, "seed": 7}  # fmt: skip
    path.write_text(json.dumps(fields))
    job = load_spec(path).to_job()
    assert isinstance(job, TrainJob)
    for key, value in fields.items():
        if key != "kind":
            assert getattr(job, key) == value, key
    assert job.storage_options is None  # unset: fsspec defaults and the environment, as for every job
    assert job.run_uri == str(tmp_path / "runs" / "shapes-demo")
    assert job.images_per_step == 4


def test_eval_yaml_file_builds_the_eval_job(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text(
        "kind: eval\ndata: /data/shapes-val\noutput: /out/eval\nmodel: /ckpt/final.pt\nlimit: 50\n"
        "actors: '2'\namp_dtype: bf16\ndevice: cuda:1\ngpus_per_actor: 1\n"
    )
    job = load_spec(str(path)).to_job()
    expected = EvalJob(data="/data/shapes-val", output="/out/eval", model="/ckpt/final.pt", limit=50,
                       actors=2, amp_dtype="bf16", device="cuda:1", gpus_per_actor=1.0)  # fmt: skip
    assert job == expected


@pytest.mark.parametrize(
    ("spec_type", "job_type"), [(LabelSpec, LabelJob), (TrainSpec, TrainJob), (EvalSpec, EvalJob)]
)
def test_a_spec_is_its_job_plus_a_kind(spec_type, job_type):
    """One definition: a spec's fields, defaults and checks are its job's, so both refuse alike."""
    assert issubclass(spec_type, job_type)
    assert set(spec_type.model_fields) == {*job_type.model_fields, "kind"}
    required = {"label": ("input", "output"), "train": ("name", "storage", "data")}
    fields = {name: "x" for name in required.get(spec_type.JOB.KIND, ("data", "output"))}
    bad = {**fields, "batch_size": 0}
    with pytest.raises(SpecError) as from_python:
        job_type(**bad)
    with pytest.raises(SpecError) as from_spec:
        parse_spec({"kind": spec_type.JOB.KIND, **bad})
    assert (
        from_python.value.problems
        == from_spec.value.problems
        == [f"{spec_type.JOB.KIND}.batch_size: must be >= 1 (got 0)"]
    )


def test_flags_and_yaml_spell_the_same_spec():
    flags = spec_from_flags(
        "label",
        input="s3://photos/2024/",
        output="s3://labels/run-1",
        vocabulary="cat,dog,tree",
        model="tiny",
        batch_size="8",  # argparse may hand over strings
        actors="1-3",
        gpus_per_actor="0.5",
        amp_dtype="fp16",
        storage_options=[
            "endpoint_url=http://127.0.0.1:9000",
            "anon=false",
            "client_kwargs={region_name: eu-west-1}",
        ],
        device=None,  # a flag not given keeps the default
    )
    spec = load_spec(LABEL_YAML)
    assert flags == spec
    assert flags.to_job() == spec.to_job()
    assert spec_from_flags("eval", data="d", output="o", actors=3) == load_spec(
        '{"kind": "eval", "data": "d", "output": "o", "actors": "3"}'
    )


BASE = {
    "label": {"kind": "label", "input": "in", "output": "out", "vocabulary": "coco171"},
    "train": {"kind": "train", "name": "run", "storage": "runs", "data": "data"},
    "eval": {"kind": "eval", "data": "data", "output": "out"},
    "relabel": {"kind": "relabel", "source": "out", "output": "new", "vocabulary": "cat,dog"},
}


@pytest.mark.parametrize(
    ("kind", "change", "expected"),
    [
        (
            "label",
            {"colour": "red"},
            "label.colour: unknown field; allowed: input, output, vocabulary, model, ",
        ),
        ("label", {"batch_size": 0}, "label.batch_size: must be >= 1 (got 0)"),
        ("label", {"batch_size": True}, "label.batch_size: must be a number, not a boolean"),
        (
            "label",
            {"amp_dtype": "fp8"},
            "label.amp_dtype: must be one of 'bf16', 'fp16' or 'fp32' (got 'fp8')",
        ),
        ("label", {"actors": "4-1"}, "label.actors: must be a count >= 1 or a range MIN-MAX"),
        ("label", {"actors": 0}, "label.actors: must be a count >= 1"),
        ("label", {"gpus_per_actor": -1}, "label.gpus_per_actor: must be >= 0 (got -1)"),
        ("label", {"cpus_per_actor": 0}, "label.cpus_per_actor: must be > 0 (got 0)"),
        ("label", {"vocabulary": []}, "label.vocabulary: a list of names must be non-empty"),
        ("label", {"storage_options": ["anon"]}, "label.storage_options: item 0 is not KEY=VALUE"),
        ("train", {"steps": "many"}, "train.steps: must be an integer (got 'many')"),
        ("train", {"trainable": "some"}, "train.trainable: must be one of 'reference' or 'all' (got 'some')"),
        ("train", {"augment": "heavy"}, "train.augment: must be one of 'reference' or 'small' (got 'heavy')"),
        ("train", {"amp": "fp32"}, "train.amp: must be one of 'bf16' or 'fp16' (got 'fp32')"),
        ("train", {"name": "../x"}, "train.name: must be letters, digits, '.', '_' or '-'"),
        ("train", {"use_gpu": "maybe"}, "train.use_gpu: must be true or false (got 'maybe')"),
        ("train", {"max_failures": -1}, "train.max_failures: must be >= 0 (got -1)"),
        ("eval", {"data": None}, "eval.data: must be a string (got None)"),
        ("eval", {"limit": 0}, "eval.limit: must be >= 1 (got 0)"),
        ("eval", {"model": ""}, "eval.model: must not be empty"),
        ("eval", {"kind": "fit"}, "kind: must be one of label, train, eval, relabel (got 'fit')"),
    ],
)
def test_bad_field_names_the_field_and_what_is_allowed(kind, change, expected):
    with pytest.raises(SpecError) as info:
        parse_spec({**BASE[kind], **change})
    assert expected in str(info.value)
    assert len(info.value.problems) == 1, info.value.problems


def test_every_problem_is_reported_at_once():
    with pytest.raises(SpecError) as info:
        load_spec("kind: train\nname: run\ndata: d\nsteps: 0\nlr: -1\nbogus: 1\n")
    text = str(info.value)
    for line in ("train.storage: required field is missing", "train.steps: must be >= 1 (got 0)",
                 "train.lr: must be > 0 (got -1)", "train.bogus: unknown field"):  # fmt: skip
        assert line in text
    assert len(info.value.problems) == 4


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"password": "hunter2"}, "label.password"),
        ({"storage_options": {"secret": "s"}}, "label.storage_options.secret"),
        ({"storage_options": {"key": "AKIA"}}, "label.storage_options.key"),
        (
            {"storage_options": {"client_kwargs": {"aws_secret_access_key": "s"}}},
            "label.storage_options.client_kwargs.aws_secret_access_key",
        ),
        ({"storage_options": ["token=abc"]}, "label.storage_options.token"),
        ({"storage_options": "secret=abc"}, "label.storage_options.secret"),
        ({"storage_options": {"AWS_ACCESS_KEY_ID": "AKIA"}}, "label.storage_options.AWS_ACCESS_KEY_ID"),
    ],
)
def test_credentials_are_refused(change, path):
    with pytest.raises(SpecError) as info:
        parse_spec({**BASE["label"], **change})
    text = str(info.value)
    assert "looks like a credential" in text
    assert "AWS_ENDPOINT_URL" in text and "AWS_SECRET_ACCESS_KEY" in text
    assert f"{path}: looks like a credential" in text
    # The secret itself is never echoed.
    assert "hunter2" not in text and "AKIA" not in text and "abc" not in text


def test_credentials_from_flags_are_refused():
    with pytest.raises(SpecError, match=r"eval\.storage_options\.secret: looks like a credential"):
        spec_from_flags("eval", data="d", output="o", storage_options=["secret=abc"])


@pytest.mark.parametrize("kind", ["label", "train", "eval", "relabel"])
def test_round_trip(kind, tmp_path):
    extra = {"storage_options": {"endpoint_url": "http://h:9000"}, "batch_size": 2}
    if kind == "label":
        extra["actors"] = [2, 5]
    if kind == "relabel":
        extra = {**extra, "resolution": "grid", "actors": 2}
        del extra["batch_size"]
    spec = parse_spec({**BASE[kind], **extra})
    assert parse_spec(spec.model_dump()) == spec
    assert load_spec(json.dumps(spec.model_dump(mode="json"))) == spec
    path = tmp_path / "spec.yaml"
    path.write_text(dump_spec(spec))
    assert load_spec(path) == spec
    assert load_spec(path).to_job() == spec.to_job()


def test_unreadable_specs(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "missing.yaml")
    with pytest.raises(SpecError, match="not valid YAML or JSON"):
        load_spec("kind: label\ninput: [unclosed\n")
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec("- kind: label\n- x\n")
    with pytest.raises(SpecError, match="kind: required field is missing; one of label, train, eval"):
        load_spec("input: a\noutput: b\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: eval\ndata: d\noutput: o\nlimit: -2\n")
    with pytest.raises(SpecError) as info:
        load_spec(bad)
    assert str(info.value).startswith(f"{bad}: invalid job spec")
