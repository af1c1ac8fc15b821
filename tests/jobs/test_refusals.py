"""Every invalid spec or flag is a clean refusal: random and mutated specs and argument lists go to the CLI
entry in this process; each either validates (the runner is reached, here a stand-in) or exits 2 with a
message naming a field, never a traceback and never a started Ray."""

from __future__ import annotations

import contextlib
import io
import json
import re

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jobs.runs
import pipeline.cluster
from jobs import cli
from jobs.flags import flag_name
from jobs.specs import SPEC_TYPES, load_spec, parse_spec

VALID = {
    "label": {"kind": "label", "input": "in/", "output": "out/", "vocabulary": "cat,dog", "model": "tiny"},
    "train": {"kind": "train", "name": "run", "storage": "runs/", "data": "pairs/", "model": "tiny"},
    "eval": {"kind": "eval", "data": "pairs/", "output": "out/", "model": "tiny"},
}
FIELDS = {kind: [n for n in model.model_fields if n != "kind"] for kind, model in SPEC_TYPES.items()}
ALL_FIELDS = sorted({n for names in FIELDS.values() for n in names})

# Values of every type a YAML or JSON spec (or a flag) can carry, the awkward ones included.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", " ", "none", "1-4", "4-1", "0", "-1", "1e400", "nan", "inf", "a,b", ",", "x=1",
                     "secret=hunter2", "key=AKIA", "fp16", "reference", "tiny", "s3://b/p", "a/b", "ä"]),
    st.text(max_size=12),
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["a", "token", "key", "x"]), inner, max_size=3),
    ),
    max_leaves=6,
)


@st.composite
def mutated_specs(draw):
    kind = draw(st.sampled_from(sorted(VALID)))
    spec = dict(VALID[kind])
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        action = draw(st.sampled_from(["set", "set", "delete", "unknown", "kind", "options"]))
        if action == "set":
            spec[draw(st.sampled_from(FIELDS[kind]))] = draw(values)
        elif action == "delete" and spec:
            spec.pop(draw(st.sampled_from(sorted(spec))))
        elif action == "unknown":
            spec[draw(st.sampled_from(["bogus", "Steps", "batchsize", "aws_secret_access_key"]))] = draw(
                values
            )
        elif action == "kind":
            spec["kind"] = draw(st.one_of(st.sampled_from(["label", "train", "eval", "relabel", ""]), values))
        else:
            key = draw(
                st.sampled_from(["endpoint_url", "anon", "secret", "password", "client_kwargs", "token"])
            )
            spec["storage_options"] = draw(
                st.one_of(st.dictionaries(st.just(key), values, max_size=1), st.lists(st.text(max_size=10)))
            )
    return kind, spec


@st.composite
def argument_lists(draw):
    kind = draw(st.sampled_from(sorted(VALID)))
    argv = [kind]
    base = {k: v for k, v in VALID[kind].items() if k != "kind"}
    if kind == "label":
        argv += [base.pop("input"), base.pop("output")] if draw(st.booleans()) else []
    for name, value in base.items():
        if draw(st.integers(0, 3)):
            argv += [flag_name(name), value]
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        name = draw(st.sampled_from([*ALL_FIELDS, "dry_run", "json", "bogus", "spec"]))
        flag = flag_name(name)
        if name in ("dry_run", "json") or draw(st.integers(0, 9)) == 0:
            argv.append(flag)
        else:
            argv += [flag, draw(scalars.map(lambda v: v if isinstance(v, str) else json.dumps(v)))]
    return argv


class Started(Exception):
    """What the stand-ins raise if a refused command still got as far as running or connecting."""


@pytest.fixture
def entry(monkeypatch):
    """``run(argv) -> (exit status, stdout, stderr, runner reached)``: the CLI entry with the runners and
    Ray's start replaced, so a valid spec costs nothing and a refused one is seen never to start."""
    reached = []

    def runner(spec, args):
        reached.append(spec)
        return {}

    def no_ray(*args, **kwargs):
        raise Started("ensure_ray was called")

    for kind in VALID:
        monkeypatch.setitem(jobs.runs.RUNNERS, kind, runner)
    monkeypatch.setattr(pipeline.cluster, "ensure_ray", no_ray)

    def run(argv: list[str]):
        reached.clear()
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as e:  # argparse's own refusals
                code = e.code
        return code, out.getvalue(), err.getvalue(), bool(reached)

    return run


FIELD_LINE = re.compile(r"^  (?P<path>[A-Za-z_][\w.\[\]]*)( \([^)]*\))?: \S")


def assert_clean(code, out: str, err: str, reached: bool) -> None:
    assert "Traceback" not in err + out
    if code == 0:  # valid: the runner (a stand-in) was reached, or a dry run printed the spec
        return
    assert (code, reached) == (2, False), err
    if "invalid job spec" not in err:  # argparse: it names the argument
        assert re.search(r"error: (argument |unrecognized arguments|the following arguments)", err), err
        return
    lines = [line for line in err.splitlines()[1:] if line.strip()]
    assert lines, err
    for line in lines:
        match = FIELD_LINE.match(line)
        assert match, f"a problem line that names no field: {line!r}"
        head = re.split(r"[.\[]", match["path"])[0]
        assert head in {*SPEC_TYPES, "kind", "spec", "credentials", *ALL_FIELDS}, line


RANDOM = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@RANDOM
@given(case=mutated_specs(), as_json=st.booleans())
def test_mutated_specs_are_run_or_refused_cleanly(entry, case, as_json):
    kind, spec = case
    try:
        text = json.dumps(spec, allow_nan=True) if as_json else yaml.safe_dump(spec)
    except (TypeError, ValueError):
        return
    if not text.lstrip().startswith("{") and "\n" not in text:
        text += "\n"  # the CLI reads text (not a file name) only when it has a line break
    argv = ["label", "--spec", text] if kind == "label" else [kind, text]
    code, out, err, reached = entry([*argv, "--dry-run"])
    assert_clean(code, out, err, reached)
    if code == 0:  # what a dry run prints is a spec that loads back to the same one
        assert load_spec(out) == parse_spec({**spec, "kind": kind})  # the command names the kind


@RANDOM
@given(argv=argument_lists())
def test_random_argument_lists_are_run_or_refused_cleanly(entry, argv):
    code, out, err, reached = entry(argv)
    assert_clean(code, out, err, reached)


TRAIN = ["train", "--name", "r", "--storage", "s", "--data", "d"]


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        ([*TRAIN, "--lr", "inf"], r"train\.lr \(--lr\): must be a finite number"),
        ([*TRAIN, "--weight-decay", "nan"], r"train\.weight_decay \(--weight-decay\): must be (>= 0|a fin)"),
        (["label", "i", "o", "--vocabulary", "a,b", "--storage-option", "secret=hunter2"],
         r"storage_options\.secret \(--storage-option\): looks like a credential"),
        (["label", "i", "o", "--vocabulary", "a,b", "--storage-option", "a=[1"],
         r"label\.storage_options \(--storage-option\): item 0"),
        (["label", "i", "o", "--vocabulary", "a,b", "--storage-option", "a=!!python/name:os.system"],
         r"label\.storage_options \(--storage-option\): item 0"),
        (["label", "--spec", "kind: label\ninput: i\noutput: o\nvocabulary: [1, 2]\n"],
         r"label\.vocabulary \(--vocabulary\): "),
        (["train", "kind: [1]\n"], r"kind: must be one of"),
    ],
)  # fmt: skip
def test_refusals_found_by_the_property_name_the_field(entry, argv, problem):
    code, _, err, reached = entry(argv)
    assert (code, reached) == (2, False), err
    assert re.search(problem, err), err
    assert "hunter2" not in err
