"""infra/k8s: the KubeRay manifests run real `ebseg` commands on specs the project's models accept, on
clusters that can host what those specs ask for, with the pinned image, Ray version and token auth."""

from __future__ import annotations

import contextlib
import io
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from jobs.specs import load_spec
from tests.infra import (
    CONSTRAINTS,
    INFRA_README,
    K8S,
    k8s_groups,
    k8s_objects,
    load_documents,
    ray_container,
    spec_demand,
    yaml_files,
)

RAY_KINDS = ("RayCluster", "RayJob")


def pinned(name: str) -> str:
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        if line.lower().startswith(f"{name}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{CONSTRAINTS}: {name} is not pinned")


def cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """(``file:kind/name``, RayCluster spec) for every RayCluster and every RayJob's own cluster."""
    found = []
    for path, obj in k8s_objects():
        where = f"{path.name}:{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "RayCluster":
            found.append((where, obj["spec"]))
        elif obj["kind"] == "RayJob":
            found.append((where, obj["spec"]["rayClusterSpec"]))
    return found


def pod_templates(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def rayjobs() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, obj) for path, obj in k8s_objects() if obj["kind"] == "RayJob"]


def spec_text_for(path: Path, job: dict[str, Any], spec_path: str) -> str:
    """The spec file at ``spec_path`` on the RayJob's head: the ConfigMap key mounted there (same file)."""
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    volumes = {v["name"]: v for v in head["spec"].get("volumes", [])}
    config_maps = {o["metadata"]["name"]: o for o in load_documents(path) if o["kind"] == "ConfigMap"}
    for mount in ray_container(head).get("volumeMounts", []):
        target = PurePosixPath(spec_path)
        if not target.is_relative_to(mount["mountPath"]):
            continue
        volume = volumes[mount["name"]]
        assert "configMap" in volume, f"{path.name}: {spec_path} is mounted from {volume}, not a ConfigMap"
        name = volume["configMap"]["name"]
        assert name in config_maps, f"{path.name}: ConfigMap {name} is not defined in the same file"
        key = str(target.relative_to(mount["mountPath"]))
        data = config_maps[name].get("data", {})
        assert key in data, f"{path.name}: ConfigMap {name} has no key {key!r} (has {sorted(data)})"
        return data[key]
    raise AssertionError(f"{path.name}: {spec_path} is on no volume mounted in the head container")


def resolve_entrypoint(path: Path, job: dict[str, Any], tmp_path: Path):
    """The spec a RayJob's entrypoint runs, resolved by the CLI itself (``--dry-run``: spec file + flags)."""
    cli = pytest.importorskip("jobs.cli", reason="jobs.cli (the `ebseg` CLI) is not importable")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "ebseg", f"{path.name}: entrypoint must be an `ebseg` command, got {argv[0]!r}"
    try:
        cli.build_parser().parse_args(argv[1:])
    except SystemExit as e:
        raise AssertionError(
            f"{path.name}: `ebseg` rejects the entrypoint {argv[1:]} (exit {e.code})"
        ) from None
    files = [a for a in argv[1:] if a.startswith("/") and a.endswith((".yaml", ".yml", ".json"))]
    assert len(files) == 1, f"{path.name}: the entrypoint should name one spec file, got {files}"
    local = tmp_path / PurePosixPath(files[0]).name
    local.write_text(spec_text_for(path, job, files[0]), encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(local) if a == files[0] else a for a in argv[1:]] + ["--dry-run"])
    assert code == 0, f"{path.name}: `{' '.join(argv)} --dry-run` exited {code}: {err.getvalue()}"
    return load_spec(out.getvalue())


def test_every_yaml_parses_and_k8s_objects_are_well_formed():
    files = yaml_files()
    assert {p.name for p in files} >= {
        "raycluster.yaml",
        "rayjob-label.yaml",
        "rayjob-train.yaml",
        "aws.yaml",
    }
    for path in files:
        assert load_documents(path), f"{path}: no YAML documents"
    kinds = []
    for path, obj in k8s_objects():
        assert {"apiVersion", "kind", "metadata"} <= obj.keys(), f"{path.name}: not a Kubernetes object"
        assert obj["metadata"].get("name"), f"{path.name}: {obj['kind']} without a name"
        if obj["kind"] in RAY_KINDS:
            assert obj["apiVersion"] == "ray.io/v1", f"{path.name}: {obj['kind']} must be ray.io/v1"
        kinds.append(obj["kind"])
    assert kinds.count("RayCluster") == 1 and kinds.count("RayJob") == 2


def test_clusters_pin_ray_image_token_auth_and_non_root():
    ray_version = pinned("ray")
    for where, spec in cluster_specs():
        assert str(spec["rayVersion"]) == ray_version, (
            f"{where}: rayVersion {spec['rayVersion']} != {ray_version}"
        )
        auth = spec.get("authOptions") or {}
        assert auth.get("mode") == "token", (
            f"{where}: Ray token authentication must stay on (authOptions.mode)"
        )
        assert auth.get("secretName") == "ebseg-ray-auth", (
            f"{where}: the token comes from Secret ebseg-ray-auth"
        )
        assert spec.get("enableInTreeAutoscaling") is True, f"{where}: the worker groups autoscale"
        for template in pod_templates(spec):
            security = template["spec"].get("securityContext", {})
            assert security.get("runAsNonRoot") is True and security.get("runAsUser") == 1000, where
            container = ray_container(template)
            env_from = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
            assert env_from == ["ebseg-s3"], f"{where}: S3 credentials come from Secret ebseg-s3 ({env_from})"
            assert not any("AWS_SECRET" in str(e) for e in container.get("env", [])), where


def test_groups_gpu_and_cpu_workers_with_requests_equal_to_limits():
    for where, spec in cluster_specs():
        groups = {g.name: g for g in k8s_groups(spec)}
        assert groups["head"].cpus == 0, f"{where}: the head runs drivers only (num-cpus 0)"
        assert groups["gpu"].gpus >= 1 and groups["cpu"].gpus == 0 and groups["cpu"].cpus > 0, where
        for group in spec["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group["maxReplicas"], (
                f"{where}: {group['groupName']} replicas"
            )
            resources = ray_container(group["template"])["resources"]
            assert resources["requests"] == resources["limits"], f"{where}: {group['groupName']} requests"
            assert "memory" in resources["limits"], f"{where}: {group['groupName']} has no memory limit"


@pytest.mark.parametrize("name", ["rayjob-label.yaml", "rayjob-train.yaml"])
def test_rayjob_entrypoint_is_an_ebseg_command_whose_spec_validates_and_fits(name, tmp_path):
    path = K8S / name
    [(_, job)] = [(p, o) for p, o in rayjobs() if p == path]
    spec = resolve_entrypoint(path, job, tmp_path)
    assert spec.kind == shlex.split(job["spec"]["entrypoint"])[1]
    most, cpus, gpus = spec_demand(spec)
    assert gpus >= 1, f"{name}: the example jobs use GPUs"
    standalone = next(s for w, s in cluster_specs() if w.startswith("raycluster.yaml"))
    for where, cluster in [(name, job["spec"]["rayClusterSpec"]), ("raycluster.yaml", standalone)]:
        groups = k8s_groups(cluster)
        capacity = sum(g.capacity(cpus=cpus, gpus=gpus) for g in groups)
        assert capacity >= most, (
            f"{where}: {spec.kind} asks for up to {most} x ({cpus} CPU, {gpus} GPU), the worker groups at "
            f"maxReplicas host {capacity}"
        )
        if spec.kind == "label":  # decoding needs CPUs beyond the model actors'
            total_cpus = sum(g.cpus * g.max_nodes for g in groups)
            assert total_cpus > most * cpus, f"{where}: no CPUs left for decoding beside {most} actors"


def test_model_loading_pods_mount_the_weight_cache():
    claims = {o["metadata"]["name"] for _, o in k8s_objects() if o["kind"] == "PersistentVolumeClaim"}
    for where, spec in cluster_specs():
        groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
        for name, group in groups:
            if name == "cpu":
                continue  # decoding only: no model
            template = group["template"]
            mounts = {m["mountPath"]: m["name"] for m in ray_container(template).get("volumeMounts", [])}
            assert "/cache" in mounts, f"{where}: {name} pods must mount the weight cache at /cache"
            volume = next(v for v in template["spec"]["volumes"] if v["name"] == mounts["/cache"])
            assert volume["persistentVolumeClaim"]["claimName"] in claims, f"{where}: unknown cache PVC"


def test_every_secret_the_manifests_use_is_documented():
    used = set()
    for _, spec in cluster_specs():
        used.add(spec["authOptions"]["secretName"])
        for template in pod_templates(spec):
            used |= {e["secretRef"]["name"] for e in ray_container(template).get("envFrom", [])}
    readme = INFRA_README.read_text(encoding="utf-8")
    for name in sorted(used):
        assert f"kubectl create secret generic {name}" in readme, f"infra/README.md must show creating {name}"
