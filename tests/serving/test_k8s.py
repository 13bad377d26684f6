"""deploy/k8s: the manifests pass the Kubernetes schemas offline (kubernetes-validate --strict) and refer to each other."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.helpers import REPO
from tests.serving.common import serving_python

K8S = REPO / "deploy" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))


def validate(*paths: Path) -> subprocess.CompletedProcess[str]:
    tool = serving_python().parent / "kubernetes-validate"
    return subprocess.run([str(tool), "--strict", *map(str, paths)], capture_output=True, text=True)


def load(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def test_manifests_pass_the_kubernetes_schemas() -> None:
    assert {p.name for p in MANIFESTS} == {"deployment.yaml", "service.yaml", "hpa.yaml", "prometheus-adapter.yaml"}
    done = validate(*MANIFESTS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed for resource") == len(MANIFESTS), done.stdout


def test_the_schema_check_catches_a_misspelt_field_and_a_wrong_type(tmp_path: Path) -> None:
    text = (K8S / "deployment.yaml").read_text()
    (tmp_path / "misspelt.yaml").write_text(text.replace("  replicas: 2", "  replica: 2"))
    (tmp_path / "typed.yaml").write_text(text.replace("periodSeconds: 5", 'periodSeconds: "five"'))
    done = validate(tmp_path / "misspelt.yaml", tmp_path / "typed.yaml")
    assert done.returncode != 0
    assert "'replica' was unexpected" in done.stdout and "'five' is not of type 'integer'" in done.stdout, done.stdout


def test_the_manifests_refer_to_each_other() -> None:
    deployment, service, hpa, adapter = (load(n) for n in ("deployment.yaml", "service.yaml", "hpa.yaml", "prometheus-adapter.yaml"))
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    container = pod["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}  # tritonserver's defaults, as the image runs it
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    assert [r["name"]["as"] for r in rules] == [metric]
    assert "nv_inference_queue_duration_us" in rules[0]["metricsQuery"]
    # the grace period outlasts the server's own exit timeout, so in-flight images finish on a rollout
    timeout = next(int(a.split("=")[1]) for a in container["args"] if a.startswith("--exit-timeout-secs="))
    assert pod["spec"]["terminationGracePeriodSeconds"] > timeout
