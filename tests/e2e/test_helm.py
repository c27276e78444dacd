"""The Helm chart (`deploy/helm/parallama`) as a team would use it, checked without a cluster
(none can run here): `helm lint --strict`, then what `helm template` renders validated against
the Kubernetes schemas of the oldest and newest versions the chart names (kubernetes-validate,
strict: an unknown field fails), the ServiceMonitor against the Prometheus Operator's schema,
checkov's misconfiguration checks, and the settings the pods would start with read by the
gateway's own settings loader.
"""

from __future__ import annotations

import functools
import json
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from parallama import config
from parallama.config import BackendSettings
from tests.docs import ROOT
from tests.kubehelpers import checkov, helm, node, npm_folder
from tests.simhelpers import gateway_with, sim_server

CHART = ROOT / "deploy" / "helm" / "parallama"
SECRETS = {
    "secrets.adminToken": "test-admin-token",
    "secrets.databaseUrl": "postgresql://parallama:pw@postgres:5432/parallama",
}
# checkov's checks this chart does not pass, each for a reason a user can weigh.
CHECKOV_SKIPS = {
    "CKV_K8S_43": "an image digest: the chart takes one (image.digest), but no public "
    "registry carries parallama's image, so the default cannot name one",
    "CKV_K8S_15": "imagePullPolicy Always: with a digest or a fixed tag IfNotPresent is "
    "what Kubernetes recommends",
    "CKV_K8S_35": "secrets as files instead of environment variables: the gateway reads "
    "its token and database URL from the environment, as the container image documents",
}


def rendered(*settings: str, values: dict[str, str] | None = None) -> str:
    """`helm template` of the chart, with the values given as --set (and the secrets)."""
    sets = {**SECRETS, **(values or {})}
    command = [str(helm()), "template", "demo", str(CHART), "--namespace", "llm"]
    for name, value in sets.items():
        command += ["--set-string" if name.startswith("secrets.") else "--set", f"{name}={value}"]
    done = subprocess.run(
        [*command, *settings], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip())
    return done.stdout


def objects(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


@functools.cache
def default_objects() -> list[dict[str, Any]]:
    return objects(rendered(values={"serviceMonitor.enabled": "true"}))


def test_the_chart_lints_strictly() -> None:
    sets = ",".join(f"{k}={v}" for k, v in SECRETS.items())
    lint = [str(helm()), "lint", "--strict", str(CHART), "--set", sets]
    done = subprocess.run(lint, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("version", ["1.25.0", kubernetes_validate.latest_version()])
def test_every_object_validates_against_the_kubernetes_schemas(version: str) -> None:
    docs = default_objects()
    kinds = sorted(doc["kind"] for doc in docs)
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "Deployment",  # and Redis's
        "NetworkPolicy",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    ]
    for doc in docs:
        if doc["kind"] != "ServiceMonitor":  # a CRD: below
            kubernetes_validate.validate(doc, version, strict=True)


def service_monitor_errors(monitor: dict[str, Any]) -> str:
    """What the Prometheus Operator's schema finds wrong with a ServiceMonitor ("": nothing)."""
    script = (
        'import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/'
        'monitoring.coreos.com/v1/ServiceMonitor";\n'
        'import { readFileSync } from "node:fs";\n'
        "new ServiceMonitor(JSON.parse(readFileSync(0, 'utf8'))).validate();\n"
    )
    done = subprocess.run(
        [node(), "--input-type=module", "-e", script],
        input=json.dumps(monitor),
        capture_output=True,
        text=True,
        cwd=npm_folder(),
        timeout=60,
        check=False,
    )
    return "" if done.returncode == 0 else done.stderr or "refused"


def test_the_service_monitor_validates_against_the_prometheus_operators_schema() -> None:
    (monitor,) = of_kind(default_objects(), "ServiceMonitor")
    assert service_monitor_errors(monitor) == ""
    broken = {**monitor, "spec": {**monitor["spec"], "endpoints": [{"interval": "often"}]}}
    assert "interval" in service_monitor_errors(broken)  # the check can fail
    # It selects the gateway's Service (not Redis's), by the port's name.
    selector = monitor["spec"]["selector"]["matchLabels"].items()
    picked = [
        s
        for s in of_kind(default_objects(), "Service")
        if selector <= s["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in picked] == ["demo-parallama"]
    assert monitor["spec"]["endpoints"][0]["port"] == picked[0]["spec"]["ports"][0]["name"]


def test_checkov_finds_no_misconfiguration(tmp_path: Path) -> None:
    manifests = tmp_path / "parallama.yaml"
    manifests.write_text(rendered(values={"serviceMonitor.enabled": "true"}))
    command = [str(checkov()), "--quiet", "--compact", "--framework", "kubernetes"]
    command += ["--output", "json", "--skip-check", ",".join(CHECKOV_SKIPS), "-f", str(manifests)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    report = json.loads(done.stdout)
    summary = report["summary"]
    failed = [
        f"{c['check_id']} {c['check_name']} ({c['resource']})"
        for c in report.get("results", {}).get("failed_checks", [])
    ]
    assert summary["failed"] == 0, "\n".join(failed)
    assert summary["passed"] > 50  # it did look


def test_the_pods_settings_are_what_the_gateway_reads() -> None:
    docs = default_objects()
    (deployment,) = [
        d for d in of_kind(docs, "Deployment") if d["metadata"]["name"] == "demo-parallama"
    ]
    (config_map,) = of_kind(docs, "ConfigMap")
    (secret,) = of_kind(docs, "Secret")
    pod = deployment["spec"]["template"]["spec"]
    (gateway,) = pod["containers"]
    env = {item["name"]: item["value"] for item in gateway["env"]}
    assert gateway["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"]}}]
    env.update(secret["stringData"])
    mount = next(m for m in gateway["volumeMounts"] if m["name"] == "config")
    file = Path(env["PARALLAMA_CONFIG"])
    assert file.parent == Path(mount["mountPath"]) and file.name in config_map["data"]
    settings = config.load(file_data=tomllib.loads(config_map["data"][file.name]), env=env)
    assert settings.auth == "keys" and len(settings.backends) == 2
    assert settings.admin_token == SECRETS["secrets.adminToken"]
    assert settings.database == SECRETS["secrets.databaseUrl"]
    # Shared state: the chart's Redis, by its Service's name and port.
    redis = next(s for s in of_kind(docs, "Service") if "redis" in s["metadata"]["name"])
    assert settings.state == f"redis://{redis['metadata']['name']}:6379/0"
    assert redis["spec"]["ports"][0]["port"] == 6379
    # Redis admits the gateway's pods alone.
    policy = next(n for n in of_kind(docs, "NetworkPolicy") if "redis" in n["metadata"]["name"])
    (peer,) = policy["spec"]["ingress"][0]["from"]
    labels = deployment["spec"]["template"]["metadata"]["labels"].items()
    assert peer["podSelector"]["matchLabels"].items() <= labels
    # The grace period covers the pause before SIGTERM and the drain after it.
    pause = int(gateway["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > pause + settings.drain_timeout
    # The probes, asked of a real gateway (in front of an emulated engine, not the chart's):
    # the pod's port and paths answer, and ready says so.
    assert gateway["ports"] == [{"name": "http", "containerPort": settings.port, "protocol": "TCP"}]
    probes = {
        name: gateway[name]["httpGet"]
        for name in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert {p["port"] for p in probes.values()} == {"http"}
    with sim_server() as engine, gateway_with((BackendSettings(url=engine.url),)) as running:
        for probe in probes.values():
            assert httpx.get(running.url + probe["path"], timeout=10).status_code == 200


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"secrets.adminToken": ""}, "secrets.adminToken is required"),
        ({"secrets.databaseUrl": "/var/lib/parallama/keys.db"}, "a postgresql:// URL"),
        ({"redis.enabled": "false"}, "replicas > 1 need shared state"),
    ],
)
def test_values_that_cannot_work_are_refused_with_the_reason(
    values: dict[str, str], error: str
) -> None:
    with pytest.raises(RuntimeError, match=error):
        rendered(values=values)


def test_own_secret_and_own_redis_and_one_replica() -> None:
    own = objects(
        rendered(
            "--set-string",
            'config=state = "redis://cache.example:6379/2"\n[[backends]]\nurl = "http://e:11434"\n',
            values={"secrets.existingSecret": "team-secrets", "redis.enabled": "false"},
        )
    )
    assert of_kind(own, "Secret") == []
    (deployment,) = of_kind(own, "Deployment")  # no Redis of the chart's
    (gateway,) = deployment["spec"]["template"]["spec"]["containers"]
    assert gateway["envFrom"] == [{"secretRef": {"name": "team-secrets"}}]
    assert "PARALLAMA_STATE" not in {item["name"] for item in gateway["env"]}
    single = objects(rendered(values={"replicas": "1", "redis.enabled": "false"}))
    assert of_kind(single, "PodDisruptionBudget") == []  # a budget of one pod blocks drains
