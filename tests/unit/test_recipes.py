"""Cluster recipes, checked without a cluster: the launcher configs pass Ray's own validation and share one token +
setup block, the KubeRay manifests fit KubeRay v1.5.1's API and resolve their paths inside the pod, the
Dockerfile's torch matches its CUDA, and the shell recipes parse."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from ember.spec.job import JobSpec

REPO = Path(__file__).resolve().parents[2]
LAUNCHER_CONFIGS = ["aws", "gcp", "onprem"]
KUBERAY_MANIFESTS = ["cluster/kuberay/raycluster.yaml", "launchers/kuberay/rayjob.yaml"]


def load_yaml(path: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / path).read_text())


# ---- Ray cluster launcher ----

@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_cluster_launcher_config_passes_rays_validation(name: str) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load_yaml(f"cluster/{name}.yaml")))


def test_rays_validation_rejects_a_misspelled_key() -> None:
    """The check above has teeth: Ray's schema refuses keys it does not know."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_yaml("cluster/gcp.yaml")
    config["setup_command"] = config.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


def test_launcher_configs_are_rendered_from_one_shared_block() -> None:
    """aws/gcp/onprem.yaml are cluster/parts/<provider>.yaml + common.yaml, as `cluster/render.py` writes them."""
    check = subprocess.run([sys.executable, str(REPO / "cluster/render.py"), "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    common = load_yaml("cluster/parts/common.yaml")
    for name in LAUNCHER_CONFIGS:
        config = load_yaml(f"cluster/{name}.yaml")
        assert {key: config[key] for key in common} == common


def test_every_node_gets_the_token_through_file_mounts_and_fails_loudly_without_it() -> None:
    common = load_yaml("cluster/parts/common.yaml")
    assert common["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    commands = [c for key, value in common.items() if key.endswith("_commands") for c in value]
    assert not any("|| true" in c for c in commands)
    assert any(c.startswith("test -s ~/.ray/auth_token") for c in common["setup_commands"])
    starts = [c for c in common["head_start_ray_commands"] + common["worker_start_ray_commands"] if "ray start" in c]
    assert starts
    assert all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts)


@pytest.mark.parametrize("name", ["aws", "gcp"])
def test_gpu_workers_declare_their_gpus(name: str) -> None:
    """Ray's GCP provider does not fill GPU counts; without them GPU demand looks infeasible and nothing scales."""
    node_types = load_yaml(f"cluster/{name}.yaml")["available_node_types"]
    assert node_types["gpu_worker"]["resources"]["GPU"] == 8


# ---- KubeRay: a schema of the fields these manifests use, written from KubeRay v1.5.1's API ----
# (ray-operator/apis/ray/v1/raycluster_types.go and rayjob_types.go at tag v1.5.1; core/v1 for pod templates).
# Every object is closed: a field that v1.5.1 does not have there, or one put at the wrong level, fails.
KUBERAY_RELEASE = "v1.5.1"


def closed(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


STRING, INTEGER, BOOLEAN = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
QUANTITIES = {"type": "object", "additionalProperties": {"type": ["string", "integer"]}}
CONTAINER = closed({
    "name": STRING, "image": STRING, "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
    "env": {"type": "array", "items": closed({"name": STRING, "value": STRING}, ("name",))},
    "ports": {"type": "array", "items": closed({"containerPort": INTEGER, "name": STRING}, ("containerPort",))},
    "resources": closed({"limits": QUANTITIES, "requests": QUANTITIES}),
    "volumeMounts": {"type": "array", "items": closed({"name": STRING, "mountPath": STRING, "readOnly": BOOLEAN},
                                                      ("name", "mountPath"))},
}, ("name", "image"))
VOLUME = closed({"name": STRING, "persistentVolumeClaim": closed({"claimName": STRING}, ("claimName",))},
                ("name", "persistentVolumeClaim"))
TOLERATION = closed({"key": STRING, "operator": {"enum": ["Exists", "Equal"]}, "effect": STRING})
POD_TEMPLATE = closed({"spec": closed({
    "containers": {"type": "array", "minItems": 1, "items": CONTAINER},
    "volumes": {"type": "array", "items": VOLUME},
    "tolerations": {"type": "array", "items": TOLERATION},
}, ("containers",))}, ("spec",))
RAY_CLUSTER_SPEC = closed({
    "rayVersion": STRING,
    "authOptions": closed({"mode": {"enum": ["disabled", "token"]}}),  # new in v1.5.1; `mode` is its only field
    "headGroupSpec": closed({"rayStartParams": STRING_MAP, "template": POD_TEMPLATE}, ("template",)),
    "workerGroupSpecs": {"type": "array", "items": closed({
        "groupName": STRING, "replicas": INTEGER, "minReplicas": INTEGER, "maxReplicas": INTEGER,
        "rayStartParams": STRING_MAP, "template": POD_TEMPLATE}, ("groupName", "template"))},
}, ("headGroupSpec",))
RAY_JOB_SPEC = closed({
    "entrypoint": STRING, "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
    "shutdownAfterJobFinishes": BOOLEAN, "ttlSecondsAfterFinished": INTEGER, "rayClusterSpec": RAY_CLUSTER_SPEC,
})
KUBERAY_SCHEMA = {"RayCluster": RAY_CLUSTER_SPEC, "RayJob": RAY_JOB_SPEC}


def validate_kuberay(manifest: dict[str, Any]) -> None:
    spec_schema = KUBERAY_SCHEMA[manifest["kind"]]
    jsonschema.validate(manifest, closed({"apiVersion": {"const": "ray.io/v1"}, "kind": STRING,
                                          "metadata": closed({"name": STRING}, ("name",)), "spec": spec_schema},
                                         ("apiVersion", "kind", "metadata", "spec")))


def cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


def pod_specs(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = cluster_spec(manifest)
    return [group["template"]["spec"] for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]]


@pytest.mark.parametrize("path", KUBERAY_MANIFESTS)
def test_kuberay_manifest_fits_the_named_releases_api(path: str) -> None:
    validate_kuberay(load_yaml(path))


@pytest.mark.parametrize("where", ["spec.headGroupSpec", "spec.headGroupSpec.template.spec.containers.0"])
def test_kuberay_schema_rejects_a_misplaced_field(where: str) -> None:
    manifest = load_yaml("cluster/kuberay/raycluster.yaml")
    target = manifest
    for key in where.split("."):
        target = target[int(key)] if key.isdigit() else target[key]
    target["authOptions"] = {"mode": "token"}
    with pytest.raises(jsonschema.ValidationError):
        validate_kuberay(manifest)


@pytest.mark.parametrize("path", KUBERAY_MANIFESTS)
def test_kuberay_token_mode_is_the_releases_own_and_ray_is_new_enough(path: str) -> None:
    """authOptions.mode=token (v1.5.1) gives head, workers and the RayJob submitter the operator's token, so no
    container carries its own RAY_AUTH_TOKEN; rayVersion is the Dockerfile's Ray, which has token auth (>= 2.52)."""
    manifest = load_yaml(path)
    cluster = cluster_spec(manifest)
    assert cluster["authOptions"] == {"mode": "token"}
    base_image_ray = re.search(r"^FROM rayproject/ray:([\d.]+)-", dockerfile(), re.M).group(1)
    assert cluster["rayVersion"] == base_image_ray
    assert tuple(int(p) for p in cluster["rayVersion"].split(".")[:2]) >= (2, 52)
    containers = [c for pod in pod_specs(manifest) for c in pod["containers"]]
    assert not any(e["name"].startswith("RAY_AUTH") for c in containers for e in c.get("env", []))


@pytest.mark.parametrize("path", KUBERAY_MANIFESTS)
def test_kuberay_image_and_pull_policy_are_set_on_purpose(path: str) -> None:
    """The image is a placeholder the user must replace (README says so) and every pull policy is explicit."""
    containers = [c for pod in pod_specs(load_yaml(path)) for c in pod["containers"]]
    assert {c["image"] for c in containers} == {"SET-ME/ember:SET-ME"}
    assert all(c["imagePullPolicy"] == "IfNotPresent" for c in containers)
    assert "SET-ME/ember:SET-ME" in (REPO / "README.md").read_text()


def test_rayjob_spec_data_and_run_paths_resolve_inside_the_pods() -> None:
    """The entrypoint's spec is the one the Dockerfile copies into the image, and its shards, shard build folder
    and run folder all lie on the volume that the head and every worker mount."""
    manifest = load_yaml("launchers/kuberay/rayjob.yaml")
    command = shlex.split(manifest["spec"]["entrypoint"])
    assert command[:2] == ["ember", "run"]
    workdir = re.search(r"^WORKDIR (\S+)", dockerfile(), re.M).group(1)
    spec_in_image = Path(command[2]).relative_to(workdir)
    assert re.search(rf"^COPY .* {spec_in_image.parts[0]} ", dockerfile(), re.M)
    overrides = [command[i + 1] for i, word in enumerate(command) if word == "--set"]
    spec = JobSpec.load(REPO / spec_in_image, overrides)
    mounts = [{m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]} for pod in pod_specs(manifest)]
    shared = set.intersection(*mounts)
    paths = [spec.run_dir, spec.data.build.out, spec.data.train.urls, spec.data.val.urls]
    assert all(any(str(p).startswith(m + "/") for m in shared) for p in paths), (paths, shared)


# ---- image and shell recipes ----

def dockerfile() -> str:
    return (REPO / "cluster/Dockerfile").read_text()


def test_dockerfile_torch_matches_the_base_images_cuda_and_deps_come_from_the_constraints() -> None:
    text = dockerfile()
    cuda = re.search(r"^FROM rayproject/ray:[\d.]+-py\d+-(cu\d+)$", text, re.M).group(1)
    assert re.search(rf'pip install .*"torch==\$\{{TORCH_VERSION\}}" --index-url \S+/whl/{cuda}$', text, re.M)
    assert re.search(r"^ARG TORCH_VERSION=\d+\.\d+\.\d+$", text, re.M)
    assert "pip install --no-cache-dir -c /tmp/constraints-cuda.txt -e ." in text
    assert re.search(r"^COPY .*constraints\.txt", text, re.M)


def test_constraints_pin_the_ray_of_the_image() -> None:
    """The image's Ray (its base) is the Ray CI tests with: pip would otherwise replace it from constraints.txt."""
    constraints = REPO / "constraints.txt"
    if not constraints.exists():
        pytest.skip("no constraints.txt in this checkout")
    pinned = re.search(r"^ray(\[[^\]]*\])?==([\d.]+)", constraints.read_text(), re.M)
    base_image_ray = re.search(r"^FROM rayproject/ray:([\d.]+)-", dockerfile(), re.M).group(1)
    assert pinned
    assert pinned.group(2) == base_image_ray


def test_dependency_floors_match_what_ember_needs_and_tests() -> None:
    """pyproject's ranges: a Ray with token auth (2.52), and DeepSpeed exactly the minor versions resharding reads
    (reshard.py refuses the others at resume with exit 2; pip should not install them in the first place)."""
    import tomllib
    from packaging.requirements import Requirement

    from ember.engines.deepspeed.reshard import TESTED_DEEPSPEED

    needs = {(r := Requirement(line)).name: r.specifier for line in
             tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert "2.51.9" not in needs["ray"] and "2.52.0" in needs["ray"]
    (low_major, low_minor), (high_major, high_minor) = TESTED_DEEPSPEED
    assert f"{low_major}.{low_minor}.0" in needs["deepspeed"] and f"{low_major}.{low_minor}.99" in needs["deepspeed"]
    assert f"{high_major}.{high_minor}.0" not in needs["deepspeed"]
    assert f"{low_major}.{low_minor - 1}.99" not in needs["deepspeed"]
    pinned = re.search(r"^deepspeed==([\d.]+)", (REPO / "constraints.txt").read_text(), re.M)
    assert pinned and pinned.group(1) in needs["deepspeed"]


@pytest.mark.parametrize(
    "script", ["launchers/slurm/ember.sbatch", "launchers/ray-submit.sh", "cluster/local/dev-cluster.sh"]
)
def test_shell_recipes_parse(script: str) -> None:
    assert subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True).returncode == 0

