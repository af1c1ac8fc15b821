"""The compose stack and the cluster-launcher config: valid for their tools, token auth on, Ray nodes that can
host the specs meant for them, and every `ebseg` command in infra/README.md accepted by the CLI."""

from __future__ import annotations

import contextlib
import io

import pytest
import yaml

from jobs.specs import load_spec
from tests.infra import (
    COMPOSE,
    INFRA_README,
    LAUNCHER,
    ROOT,
    SPECS,
    compose_groups,
    ebseg_commands,
    launcher_groups,
    load_documents,
    spec_demand,
)


def compose() -> dict:
    [doc] = load_documents(COMPOSE)
    return doc


def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text(encoding="utf-8"))


def test_compose_runs_minio_a_bucket_job_and_a_token_protected_ray_head_and_worker():
    services = compose()["services"]
    assert {"minio", "create-bucket", "ray-head", "ray-worker"} <= services.keys()
    assert services["minio"]["image"].startswith("minio/minio:RELEASE."), "pin MinIO to a release"
    bucket = services["create-bucket"]
    assert bucket["depends_on"]["minio"]["condition"] == "service_started"
    assert "fs.mkdir(bucket)" in bucket["command"][-1]
    assert services["ray-head"]["depends_on"] == {
        "create-bucket": {"condition": "service_completed_successfully"}
    }
    assert services["ray-worker"]["depends_on"] == {"ray-head": {"condition": "service_healthy"}}
    assert "--address=ray-head:6379" in services["ray-worker"]["command"]
    for name in ("create-bucket", "ray-head", "ray-worker"):
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token", f"{name}: Ray token authentication must stay on"
        assert env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?"), f"{name}: the token is required"
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
        assert env["AWS_ACCESS_KEY_ID"].startswith("${MINIO_ROOT_USER:?")
        assert env["AWS_SECRET_ACCESS_KEY"].startswith("${MINIO_ROOT_PASSWORD:?")
    for service in services.values():  # nothing is published beyond this machine
        assert all(str(p).startswith("127.0.0.1:") for p in service.get("ports", [])), service.get("ports")


def test_compose_specs_use_the_stack_bucket_and_fit_its_ray_nodes():
    env = compose()["services"]["ray-head"]["environment"]
    bucket = env["EBSEG_BUCKET"].removeprefix("${EBSEG_BUCKET:-").removesuffix("}")
    groups = compose_groups(compose())
    assert [g.name for g in groups] == ["ray-head", "ray-worker"]
    specs = sorted(SPECS.glob("minio-*.yaml"))
    assert specs, "infra/specs/minio-*.yaml: the local stack's example specs"
    for path in specs:
        spec = load_spec(path)
        for uri in (spec.input, spec.output, spec.vocabulary):
            assert uri.startswith(f"s3://{bucket}/"), f"{path.name}: {uri} is not in the stack's bucket"
        most, cpus, gpus = spec_demand(spec)
        assert gpus == 0, f"{path.name}: the local stack has no GPU"
        capacity = sum(g.capacity(cpus=cpus, gpus=gpus) for g in groups)
        assert capacity >= most, f"{path.name}: {most} x {cpus} CPUs do not fit the stack ({capacity})"


def test_launcher_config_is_valid_for_ray_and_keeps_token_auth():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = launcher()
    validate_config(prepare_config(config))  # Ray's own schema and checks, as `ray up` runs them
    docker = config["docker"]
    assert "--env RAY_AUTH_MODE=token" in docker["run_options"]
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any(o.startswith("--volume") and o.endswith(":/cache") for o in docker["run_options"])
    groups = {g.name: g for g in launcher_groups(config)}
    assert groups["head"].cpus == 0 and groups["gpu"].gpus >= 1 and groups["cpu"].gpus == 0
    assert config["max_workers"] >= sum(g.max_nodes for n, g in groups.items() if n != "head")


def test_launcher_validation_rejects_a_broken_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = launcher()
    config["available_node_types"]["gpu"]["min_worker"] = 1  # a typo `ray up` must refuse
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(config))


def test_cloud_specs_fit_the_launcher_cluster():
    groups = launcher_groups(launcher())
    specs = sorted(SPECS.glob("cloud-*.yaml"))
    assert specs
    for path in specs:
        spec = load_spec(path)
        most, cpus, gpus = spec_demand(spec)
        capacity = sum(g.capacity(cpus=cpus, gpus=gpus) for g in groups)
        assert capacity >= most, (
            f"{path.name}: up to {most} x ({cpus} CPU, {gpus} GPU); cluster hosts {capacity}"
        )


def test_every_ebseg_command_in_the_infra_readme_is_accepted_by_the_cli(tmp_path):
    cli = pytest.importorskip("jobs.cli", reason="jobs.cli (the `ebseg` CLI) is not importable")
    commands = ebseg_commands(INFRA_README.read_text(encoding="utf-8"))
    kinds = {argv[1] for argv in commands}
    assert {"label", "submit", "query"} <= kinds, f"infra/README.md shows only {sorted(kinds)}"
    parser = cli.build_parser()
    for argv in commands:
        try:
            parser.parse_args(argv[1:])
        except SystemExit as e:
            raise AssertionError(f"infra/README.md: `{' '.join(argv)}` is rejected (exit {e.code})") from None
        for arg in argv[2:]:  # spec files in the repository validate with the project's models
            if arg.startswith("infra/") and arg.endswith((".yaml", ".yml")):
                assert (ROOT / arg).is_file(), f"infra/README.md names {arg}, which does not exist"
                load_spec(ROOT / arg)
        if argv[1] in ("label", "train", "eval"):  # the CLI resolves the spec (flags + file) without running
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = cli.main([*argv[1:], "--dry-run"])
            assert code == 0, f"infra/README.md: `{' '.join(argv)} --dry-run` exited {code}: {err.getvalue()}"
            load_spec(out.getvalue())


def test_readme_ebseg_command_extraction_sees_compose_exec_and_env_prefixes():
    text = (
        "```bash\nRAY_AUTH_MODE=token ebseg submit a.yaml --wait\n"
        "docker compose exec ray-head ebseg query o 'SELECT 1'\n```\n"
    )
    assert ebseg_commands(text) == [
        ["ebseg", "submit", "a.yaml", "--wait"],
        ["ebseg", "query", "o", "SELECT 1"],
    ]
    assert ebseg_commands("ebseg label a b, outside a code block") == []


def test_the_walkthrough_flags_and_its_spec_file_are_the_same_job():
    """The local-stack walkthrough labels once with flags and once with infra/specs/minio-label.yaml into the
    same output: the second resumes the first only if both resolve to the same spec."""
    cli = pytest.importorskip("jobs.cli", reason="jobs.cli (the `ebseg` CLI) is not importable")
    spec = load_spec(SPECS / "minio-label.yaml")
    commands = [a for a in ebseg_commands(INFRA_README.read_text(encoding="utf-8")) if a[1] == "label"]
    matching = [a for a in commands if spec.output in a]
    assert matching, f"infra/README.md has no `ebseg label` command writing to {spec.output}"
    for argv in matching:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            assert cli.main([*argv[1:], "--dry-run"]) == 0
        assert load_spec(out.getvalue()) == spec, f"`{' '.join(argv)}` differs from minio-label.yaml"
