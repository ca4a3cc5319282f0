"""Cluster recipes: launcher YAMLs pass Ray's own validation, manifests reference what they must, scripts parse."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cluster_launcher_yaml_passes_rays_validation(name: str) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster" / name).read_text())
    validate_config(prepare_config(config))
    commands = " ".join(config["setup_commands"] + config["head_start_ray_commands"])
    assert "pip install -e ~/ember" in commands and "RAY_AUTH_MODE=token" in commands


@pytest.mark.parametrize("path", ["cluster/kuberay/raycluster.yaml", "launchers/kuberay/rayjob.yaml"])
def test_kuberay_manifests_reference_image_gpus_and_token(path: str) -> None:
    manifest = yaml.safe_load((REPO / path).read_text())
    cluster = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    containers = [cluster["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        group["template"]["spec"]["containers"][0] for group in cluster["workerGroupSpecs"]
    ]
    assert all(c["image"] == "ember:latest" for c in containers)
    assert all({"name": "RAY_AUTH_MODE", "value": "token"} in c["env"] for c in containers)
    assert any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in containers)
    if manifest["kind"] == "RayJob":
        assert manifest["spec"]["entrypoint"].startswith("ember run ")


@pytest.mark.parametrize(
    "script", ["launchers/slurm/ember.sbatch", "launchers/ray-submit.sh", "cluster/local/dev-cluster.sh"]
)
def test_shell_recipes_parse(script: str) -> None:
    assert subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True).returncode == 0


def test_dockerfile_installs_ember_on_the_ray_image() -> None:
    text = (REPO / "cluster" / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM rayproject/ray:" in text and "pip install --no-cache-dir -e ." in text
