"""The deployment files (Dockerfile, deploy/compose.yaml, deploy/k8s/) hold together with the server they deploy.

The Kubernetes manifests are validated offline against the JSON schemas that ``kubernetes-validate``
ships; the fields that matter are checked against the real server: probe paths answer, ports agree,
the grace period covers the drain, every ``ASYNCSERVE_*`` variable is a setting.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from asyncserve import Service, Settings
from tests.conftest import serving

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33"
"""The oldest Kubernetes the manifests are written for (autoscaling/v2, probes on named ports)."""


MANIFESTS = [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]
"""Every document of deploy/k8s/, read once (async tests must not read files on the event loop)."""


def of_kind(kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in MANIFESTS if doc["kind"] == kind]
    copied: dict[str, Any] = copy.deepcopy(found)
    return copied


def container() -> dict[str, Any]:
    (only,) = of_kind("Deployment")["spec"]["template"]["spec"]["containers"]
    found: dict[str, Any] = only
    return found


def literal_env(env: list[dict[str, Any]]) -> dict[str, str]:
    """The container's variables, those from secrets standing for a value of the right shape."""
    stand_ins = {"ASYNCSERVE_PREDICTION_LOG": "postgresql://user@db:5432/predictions"}
    return {e["name"]: e["value"] if "value" in e else stand_ins[e["name"]] for e in env}


SETTING_NAMES = {f"ASYNCSERVE_{field.name.upper()}" for field in dataclasses.fields(Settings)} - {"ASYNCSERVE_WEBHOOKS"}


def assert_settings(env: dict[str, str]) -> Settings:
    """Every ASYNCSERVE_ variable names a setting (from_env would ignore a misspelt one) and its value is valid."""
    ours = {name: value for name, value in env.items() if name.startswith("ASYNCSERVE_")}
    unknown = {name for name in ours if name not in SETTING_NAMES and not name.startswith("ASYNCSERVE_WEBHOOK_")}
    assert not unknown, f"not settings: {sorted(unknown)}"
    return Settings.from_env(ours)


def example_service() -> Service:
    spec = importlib.util.spec_from_file_location("deploy_example_service", REPO / "deploy/example/service.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    service: Service = module.service
    return service


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda path: path.name)
def test_each_manifest_is_valid_kubernetes(path: Path) -> None:
    for document in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_the_validator_refuses_a_misspelt_field() -> None:
    deployment = of_kind("Deployment")
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_probes_and_service_reach_the_server_port() -> None:
    main = container()
    (port,) = main["ports"]
    settings = assert_settings(literal_env(main["env"]))
    assert port["containerPort"] == settings.port
    assert main["startupProbe"]["httpGet"] == {"path": "/v2/health/live", "port": port["name"]}
    assert main["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": port["name"]}
    assert main["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": port["name"]}
    (service_port,) = of_kind("Service")["spec"]["ports"]
    assert service_port["targetPort"] == port["name"]
    selector = of_kind("Service")["spec"]["selector"]
    assert selector.items() <= of_kind("Deployment")["spec"]["template"]["metadata"]["labels"].items()


def test_kubernetes_waits_longer_than_the_drain() -> None:
    main = container()
    settings = assert_settings(literal_env(main["env"]))
    pre_stop_s = int(main["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace_s = of_kind("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # After preStop, SIGTERM starts the drain (grace_period_s); then the components close.
    assert grace_s >= pre_stop_s + settings.grace_period_s + 10


async def test_the_probed_routes_and_the_scaling_metric_are_served() -> None:
    hpa = of_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == of_kind("Deployment")["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert f"seriesQuery: '{name}{{" in of_kind("ConfigMap")["data"]["config.yaml"]
    settings = Settings(executor_workers=1, jobs="")
    service = await asyncio.to_thread(example_service)
    async with serving(service, settings) as running, running.client() as client:
        live = await client.get("/v2/health/live")
        ready = await client.get("/v2/health/ready")
        exposition = (await client.get("/metrics")).text
        answer = await client.post("/v1/models/scorer/predict", json={"x": [5.1, 3.5, 1.4, 0.2]})
    assert (live.status_code, ready.status_code, answer.status_code) == (200, 200, 200)
    assert f'{name}{{model="scorer"}}' in exposition


def check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    """``check-jsonschema`` with the Compose specification's schema, which it ships: no network."""
    command = [str(Path(sys.executable).parent / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec"]
    return subprocess.run([*command, str(path)], capture_output=True, text=True, timeout=60, check=False)


def test_the_compose_file_follows_the_compose_specification(tmp_path: Path) -> None:
    result = check_compose(REPO / "deploy/compose.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    misspelt = tmp_path / "compose.yaml"
    misspelt.write_text((REPO / "deploy/compose.yaml").read_text().replace("stop_grace_period:", "stop_grace:", 1))
    assert check_compose(misspelt).returncode != 0


def test_compose_runs_the_server_with_redis_and_postgres() -> None:
    compose = yaml.safe_load((REPO / "deploy/compose.yaml").read_text())
    services = compose["services"]
    assert {"server", "worker", "redis", "postgres"} <= services.keys()
    server = assert_settings(services["server"]["environment"])
    worker = assert_settings(services["worker"]["environment"])
    assert server.jobs == worker.jobs == "redis://redis:6379/0"  # the worker takes the server's jobs
    assert server.job_workers == 0
    assert server.prediction_cache.startswith("redis://redis:")
    assert server.prediction_log.startswith("postgresql://")
    assert "@postgres:5432/" in server.prediction_log
    assert "/v2/health/ready" in " ".join(services["server"]["healthcheck"]["test"])
    assert _seconds(services["server"]["stop_grace_period"]) > server.grace_period_s
    assert services["worker"]["command"][0] == "worker"


def _seconds(duration: str) -> int:
    found = re.fullmatch(r"(\d+)s", duration)
    assert found is not None, duration
    return int(found.group(1))


def test_the_image_is_small_non_root_and_checks_liveness() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", dockerfile, re.MULTILINE)
    assert stages == ["python:${PYTHON_VERSION}-slim", "python:${PYTHON_VERSION}-slim"]  # build, then run
    (user,) = re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)
    assert user.split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/v2/health/live", dockerfile, re.MULTILINE)
    env = dict(re.findall(r"(ASYNCSERVE_\w+)=(\S+)", dockerfile))
    settings = assert_settings(env)
    assert re.search(rf"^EXPOSE {settings.port}$", dockerfile, re.MULTILINE)
    assert container()["securityContext"]["allowPrivilegeEscalation"] is False
    assert of_kind("Deployment")["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(user.split(":")[0])
