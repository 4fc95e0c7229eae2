"""The Kubernetes manifests (deploy/kubernetes): rendered by kubectl's
kustomize, each object validated against the Kubernetes API's own schema
(kubernetes-validate, strict: an unknown field is an error), and what the
gateway needs of them checked against its configuration."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from gateway.config import settings_from_mapping

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = "1.32"  # the version docs/operations.md names
pytestmark = pytest.mark.external


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is missing: .ci/run installs it")
        pytest.skip("kubectl is not installed")
    done = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "deploy" / "kubernetes")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return {d["kind"]: d for d in yaml.safe_load_all(done.stdout)}


def test_every_object_is_valid_for_the_kubernetes_api(rendered: dict[str, Any]) -> None:
    kinds = {"Namespace", "ConfigMap", "Service", "Deployment", "PodDisruptionBudget",
             "HorizontalPodAutoscaler", "ServiceMonitor", "NetworkPolicy"}  # fmt: skip
    assert set(rendered) == kinds
    for kind, obj in rendered.items():
        if kind == "ServiceMonitor":  # the Prometheus Operator's CRD: no schema in the API's
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    typo = copy.deepcopy(rendered["Deployment"])  # the check itself: a misspelt field fails
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES, strict=True)


def test_the_pod_drains_whole_and_is_probed_on_the_gateway_s_routes(
    rendered: dict[str, Any],
) -> None:
    config = rendered["ConfigMap"]["data"]["gateway.toml"]
    settings = settings_from_mapping(tomllib.loads(config), {})
    pod = rendered["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    pause = 5  # the preStop's sleep
    assert "time.sleep(5)" in container["lifecycle"]["preStop"]["exec"]["command"][-1]
    assert pod["terminationGracePeriodSeconds"] > pause + settings.server.shutdown_grace_s
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": settings.server.port, "metrics": settings.metrics.port}
    assert settings.server.host == "0.0.0.0" and settings.redis.url
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    env = {e["name"]: e["value"] for e in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert env["CHATIQ_API_KEY_FILE"].startswith(mounts["chatiq-api-key"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == rendered["ConfigMap"]["metadata"]["name"]
    assert (
        rendered["Service"]["spec"]["selector"]
        == rendered["Deployment"]["spec"]["selector"]["matchLabels"]
    )
    monitor = rendered["ServiceMonitor"]["spec"]
    assert monitor["endpoints"][0]["port"] == "metrics"


def test_checkov_finds_nothing_left_in_the_manifests_and_the_dockerfile(tmp_path: Path) -> None:
    """make scan: checkov over the rendered manifests and the Dockerfile,
    with only the checks deploy/checkov.yaml explains skipped; and the scan
    itself fails on a weakened pod."""
    if shutil.which("kubectl") is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is missing: .ci/run installs it")
        pytest.skip("kubectl is not installed")
    done = subprocess.run(
        ["make", "--no-print-directory", "scan"], cwd=ROOT,
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("Failed checks: 0") == 2, done.stdout  # kubernetes, dockerfile
    rendered = (ROOT / ".venv-scan" / "kubernetes.yaml").read_text()
    weakened = tmp_path / "kubernetes.yaml"
    weakened.write_text(
        rendered.replace("readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false")
    )
    done = subprocess.run(
        [str(ROOT / ".venv-scan" / "bin" / "checkov"),
         "--config-file", str(ROOT / "deploy" / "checkov.yaml"), "--file", str(weakened)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 1 and "CKV_K8S_22" in done.stdout, done.stdout
