"""Readers for the files under infra/ that the infra tests share: YAML documents, Kubernetes pod resources,
the Dockerfile's build arguments and the `ebseg` commands in the docs.

Everything here parses text: no Docker, Kubernetes or cloud is needed.
"""

from __future__ import annotations

import re
import shlex
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
CONSTRAINTS = INFRA / "docker" / "constraints.txt"
COMPOSE = INFRA / "compose.yaml"
LAUNCHER = INFRA / "ray" / "aws.yaml"
SPECS = INFRA / "specs"
INFRA_README = INFRA / "README.md"


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_documents(path: Path) -> list[Any]:
    """Every YAML document of ``path`` (empty documents dropped)."""
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def k8s_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in sorted(K8S.glob("*.yaml")) for doc in load_documents(path)]


# ---------------------------------------------------------------------------------------- resources


def cpu_quantity(value: Any) -> float:
    """A Kubernetes CPU quantity ("500m", "8", 8) in cores."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


@dataclass(frozen=True)
class NodeGroup:
    """What one Ray node of a group offers to tasks and actors, and how many such nodes there can be."""

    name: str
    cpus: float
    gpus: float
    max_nodes: int

    def fits(self, *, cpus: float, gpus: float) -> int:
        """How many bundles of ``cpus`` CPUs and ``gpus`` GPUs one node of the group can host at once."""
        by_cpu = int(self.cpus // cpus) if cpus > 0 else 10**9
        by_gpu = int(self.gpus // gpus) if gpus > 0 else 10**9
        return min(by_cpu, by_gpu)

    def capacity(self, *, cpus: float, gpus: float) -> int:
        return self.max_nodes * self.fits(cpus=cpus, gpus=gpus)


def ray_container(template: dict[str, Any]) -> dict[str, Any]:
    """The Ray container of a KubeRay pod template (the first one, as KubeRay assumes)."""
    return template["spec"]["containers"][0]


def k8s_group(name: str, group: dict[str, Any], *, max_nodes: int) -> NodeGroup:
    """The Ray resources of a KubeRay head or worker group: ``num-cpus`` / ``num-gpus`` in rayStartParams
    when given, else what KubeRay derives from the container's limits (requests when no limits)."""
    resources = ray_container(group["template"])["resources"]
    amounts = {**resources.get("requests", {}), **resources.get("limits", {})}
    params = group.get("rayStartParams") or {}
    cpus = float(params["num-cpus"]) if "num-cpus" in params else cpu_quantity(amounts["cpu"])
    gpus = float(params["num-gpus"]) if "num-gpus" in params else float(amounts.get("nvidia.com/gpu", 0))
    return NodeGroup(name, cpus, gpus, max_nodes)


def k8s_groups(cluster_spec: dict[str, Any]) -> list[NodeGroup]:
    head = k8s_group("head", cluster_spec["headGroupSpec"], max_nodes=1)
    workers = [
        k8s_group(g["groupName"], g, max_nodes=int(g["maxReplicas"]))
        for g in cluster_spec["workerGroupSpecs"]
    ]
    return [head, *workers]


def launcher_groups(config: dict[str, Any]) -> list[NodeGroup]:
    groups = []
    for name, node_type in config["available_node_types"].items():
        resources = node_type.get("resources", {})
        max_nodes = 1 if name == config["head_node_type"] else int(node_type["max_workers"])
        groups.append(
            NodeGroup(name, float(resources.get("CPU", 0)), float(resources.get("GPU", 0)), max_nodes)
        )
    return groups


def compose_groups(compose: dict[str, Any]) -> list[NodeGroup]:
    """Ray nodes of the compose stack: services whose command is `ray start`, with their --num-cpus."""
    groups = []
    for name, service in compose["services"].items():
        command = service.get("command")
        argv = shlex.split(command) if isinstance(command, str) else list(command or [])
        if argv[:2] != ["ray", "start"]:
            continue
        flags = dict(a.removeprefix("--").split("=", 1) for a in argv if a.startswith("--") and "=" in a)
        groups.append(NodeGroup(name, float(flags["num-cpus"]), float(flags.get("num-gpus", 0)), 1))
    return groups


def spec_demand(spec: Any) -> tuple[int, float, float]:
    """(how many bundles at most, CPUs each, GPUs each) a validated spec asks Ray for."""
    if spec.kind == "train":
        return spec.workers, spec.cpus_per_worker, 1.0 if spec.use_gpu else 0.0
    most = spec.actors if isinstance(spec.actors, int) else spec.actors[1]
    return most, spec.cpus_per_actor, spec.gpus_per_actor


# ---------------------------------------------------------------------------------------- Dockerfile


def dockerfile_args() -> dict[str, str]:
    """Default values of the Dockerfile's ARG lines (last one wins, as in a single-stage read)."""
    args = {}
    for match in re.finditer(r"^ARG\s+(\w+)(?:=(\S*))?", DOCKERFILE.read_text(encoding="utf-8"), re.M):
        args[match[1]] = (match[2] or "").strip("\"'")
    return args


def docker_build_tags(text: str) -> list[str]:
    """The ``-t`` / ``--tag`` values of every ``docker build`` command in ``text``."""
    tags = []
    for line in text.splitlines():
        if "docker build" in line:
            tags += re.findall(r"(?:-t|--tag)[ =](\S+)", line)
    return tags


# ---------------------------------------------------------------------------------------- docs


def shell_blocks(markdown: str) -> list[str]:
    """The bodies of the ```bash / ```sh / ```console code blocks of a Markdown text."""
    blocks = re.findall(r"^[ \t]*```(?:bash|sh|shell|console)\n(.*?)^[ \t]*```", markdown, re.S | re.M)
    return [textwrap.dedent(block) for block in blocks]  # blocks inside list items are indented


def ebseg_commands(markdown: str) -> list[list[str]]:
    """Every `ebseg ...` command line in the shell blocks of ``markdown``, as argv (continuations joined,
    leading VAR=value assignments and `docker compose ... exec SERVICE` prefixes dropped)."""
    commands = []
    for block in shell_blocks(markdown):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            for part in re.split(r"\s*(?:&&|;|\|)\s*", line):
                if not re.search(r"(^|\s)ebseg\s", part):
                    continue  # other tools' lines may hold shell syntax shlex does not read ($(...| ...))
                argv = shlex.split(part)
                while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
                    argv = argv[1:]
                if "ebseg" in argv and argv[:1] != ["ebseg"] and argv[:1] in (["docker"], ["kubectl"]):
                    argv = argv[argv.index("ebseg") :]
                if argv[:1] == ["ebseg"]:
                    commands.append(argv)
    return commands
