"""The ebseg image: one repository and version across every file that names it, the Ray version pinned once,
the extras the README installs for running, exact pins for every runtime dependency, weights on a volume."""

from __future__ import annotations

import re

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.infra import (
    COMPOSE,
    CONSTRAINTS,
    DOCKERFILE,
    INFRA_README,
    LAUNCHER,
    ROOT,
    docker_build_tags,
    dockerfile_args,
    k8s_objects,
    load_documents,
    pyproject,
)

README = ROOT / "README.md"


def pins() -> dict[str, str]:
    found = {}
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            found[canonicalize_name(name)] = version.strip()
    return found


def images_in(value) -> list[str]:
    """Every ``image:`` value anywhere under a parsed YAML value."""
    if isinstance(value, dict):
        own = [value["image"]] if isinstance(value.get("image"), str) else []
        return own + [i for v in value.values() for i in images_in(v)]
    if isinstance(value, list):
        return [i for v in value for i in images_in(v)]
    return []


def ebseg_images() -> dict[str, list[str]]:
    """file -> the ebseg image references in it (third-party images such as MinIO left out)."""
    found = {
        "infra/k8s": [i for _, o in k8s_objects() for i in images_in(o)],
        "infra/ray/aws.yaml": [yaml.safe_load(LAUNCHER.read_text(encoding="utf-8"))["docker"]["image"]],
        "infra/compose.yaml": images_in(load_documents(COMPOSE)[0]),
        "docker build -t (Dockerfile, infra/README.md)": docker_build_tags(
            DOCKERFILE.read_text(encoding="utf-8")
        )
        + docker_build_tags(INFRA_README.read_text(encoding="utf-8")),
    }
    return {k: [i for i in v if i.rsplit(":", 1)[0].rsplit("/", 1)[-1] == "ebseg"] for k, v in found.items()}


def test_image_name_and_version_agree_across_files():
    version = pyproject()["version"]
    images = ebseg_images()
    for where, refs in images.items():
        assert refs, f"{where}: names no ebseg image"
    repositories = {ref.rsplit(":", 1)[0] for refs in images.values() for ref in refs}
    assert len(repositories) == 1, f"one image repository everywhere, found {sorted(repositories)}"
    for where, refs in images.items():
        for ref in refs:
            assert ref.rsplit(":", 1)[-1] in (version, f"{version}-cpu"), (
                f"{where}: {ref} is not version {version}"
            )
    # GPU clusters run the default (CUDA) build; the laptop stack runs the CPU build it builds itself.
    assert all(r.endswith(f":{version}") for r in images["infra/k8s"] + images["infra/ray/aws.yaml"])
    compose = load_documents(COMPOSE)[0]
    assert all(r.endswith(f":{version}-cpu") for r in images["infra/compose.yaml"])
    builds = [s["build"] for s in compose["services"].values() if "build" in s]
    assert builds and all(b["args"]["TORCH_INDEX"] == "cpu" for b in builds)
    assert all(b["dockerfile"] == "infra/docker/Dockerfile" and b["context"] == ".." for b in builds)
    dockerfile = DOCKERFILE.read_text(encoding="utf-8")
    assert f'org.opencontainers.image.version="{version}"' in dockerfile


def test_ray_version_is_pinned_once_and_satisfies_pyproject():
    ray_pin = pins()["ray"]
    [ray_requirement] = [Requirement(r) for r in pyproject()["dependencies"] if Requirement(r).name == "ray"]
    assert ray_requirement.specifier.contains(ray_pin), f"ray=={ray_pin} does not satisfy {ray_requirement}"
    assert f'io.ray.version="{ray_pin}"' in DOCKERFILE.read_text(encoding="utf-8")
    versions = {str(o["spec"].get("rayVersion") or o["spec"]["rayClusterSpec"]["rayVersion"])
                for _, o in k8s_objects() if o["kind"] in ("RayCluster", "RayJob")}  # fmt: skip
    assert versions == {ray_pin}, f"KubeRay rayVersion {versions} != constraints ray=={ray_pin}"


def test_image_extras_match_the_readme_and_every_runtime_dependency_is_pinned():
    optional = pyproject()["optional-dependencies"]
    extras = {e.strip() for e in dockerfile_args()["EXTRAS"].split(",") if e.strip()}
    assert extras <= optional.keys(), f"Dockerfile EXTRAS {extras} not in pyproject {sorted(optional)}"
    assert "dev" not in extras, "the image carries the runtime package, not the test tools"
    # The README's set-up command (the line that creates the venv) installs the package with extras; those a
    # user needs to run jobs (all but the test-only `dev`) must be in the image, and the image adds no others.
    setup = [line for line in README.read_text(encoding="utf-8").splitlines() if "-m venv" in line]
    readme_extras = set()
    for match in re.finditer(r"pip install (?:-e )?'?\.\[([\w,\s-]+)\]'?", "\n".join(setup)):
        readme_extras |= {e.strip() for e in match[1].split(",")}
    assert readme_extras, "README.md's set-up command (`python3 -m venv ...`) installs no `'.[...]'` extras"
    runtime = readme_extras - {"dev"}
    assert runtime == extras, f"README set-up installs runtime extras {runtime}, the image {extras}"
    documented = "pip install ." if not extras else f"pip install '.[{','.join(sorted(extras))}]'"
    assert documented in INFRA_README.read_text(encoding="utf-8"), f"infra/README.md must say `{documented}`"
    pinned = pins()
    wanted = pyproject()["dependencies"] + [r for e in sorted(extras) for r in optional[e]]
    # Packages the Dockerfile adds beyond pyproject (boto3 for the cluster launcher's autoscaler).
    added = re.findall(r'^deps\.append\("([^"]+)"\)', DOCKERFILE.read_text(encoding="utf-8"), re.M)
    assert "boto3" in added, "the launcher's autoscaler on the head needs boto3 in the image"
    wanted += added
    for requirement in map(Requirement, wanted):
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{CONSTRAINTS.name}: {name} is a runtime dependency but is not pinned"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"{CONSTRAINTS.name}: {name}=={pinned[name]} does not satisfy pyproject's {requirement}"
        )


def test_weights_are_cached_on_a_volume_not_baked_in():
    dockerfile = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r'^VOLUME \["/cache"\]', dockerfile, re.M)
    env = dict(re.findall(r"(HF_HOME|HF_HUB_CACHE|TORCH_HOME)=(\S+)", dockerfile))
    assert env.keys() == {"HF_HOME", "HF_HUB_CACHE", "TORCH_HOME"}
    assert all(v.startswith("/cache/") for v in env.values()), env
    # ebseg.downloads reads HF_HUB_CACHE for the official checkpoints and the open_clip weights.
    assert "HF_HUB_CACHE" in (ROOT / "ebseg" / "downloads.py").read_text(encoding="utf-8")
    assert not re.search(r"^(COPY|ADD)\s.*\.(pth|pt|safetensors|bin)\b", dockerfile, re.M | re.I)
    assert re.search(r"^USER 1000", dockerfile, re.M), "the image runs as the non-root uid 1000"
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\}", dockerfile, re.M)
    base = dockerfile_args()["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), (
        f"unpinned base {base}"
    )
    dockerignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert dockerignore[dockerignore.index("**") + 1 :], ".dockerignore lets nothing into the context"
    for copied in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, re.M):
        for source in copied.split():
            assert f"!{source}" in dockerignore or f"!{source}/" in dockerignore, f"{source} is ignored"
