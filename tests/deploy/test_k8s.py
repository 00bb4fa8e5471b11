"""deploy/k8s fits Kubernetes and the code: every object validates against the Kubernetes
OpenAPI schemas (kubernetes-validate, strict: unknown fields are errors), the modules run
exist, every SEGFLOW_* variable is a real setting, each pod's instance id is its stable
StatefulSet name, and only the services with partitioned state run more than one replica.

No cluster runs here; this is the check that can.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from segflow.cli import SCALABLE
from tests.deploy.test_compose import DEPLOYED, settings_variables

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((REPO / "deploy" / "k8s").glob("*.yaml"))
K8S_VERSION = "1.33"


def objects() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in MANIFESTS:
        out += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def statefulsets() -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects() if o["kind"] == "StatefulSet"}


def test_there_are_manifests() -> None:
    assert MANIFESTS and set(statefulsets()) == set(DEPLOYED)


@pytest.mark.parametrize("obj", objects(), ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_each_object_is_valid_kubernetes(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_the_schema_check_rejects_a_broken_object() -> None:
    # The check above must be able to fail: a misspelt field and a wrong type are caught.
    broken = statefulsets()["segmenter"]
    broken = {**broken, "spec": {**broken["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_pods_run_their_service_with_a_stable_instance_id_and_real_settings() -> None:
    known = settings_variables()
    for name, sts in statefulsets().items():
        spec = sts["spec"]
        assert spec["serviceName"] == name
        [container] = spec["template"]["spec"]["containers"]
        assert container["command"] == ["python", "-m", f"services.{name}"]
        assert find_spec(f"services.{name}.__main__") is not None
        env = {e["name"]: e for e in container["env"]}
        assert env["SEGFLOW_INSTANCE_ID"]["valueFrom"] == {
            "fieldRef": {"fieldPath": "metadata.name"}
        }, f"{name}: the instance id must be the pod's stable name"
        for var in env:
            assert var in known, f"{name}: {var} is not a setting of any segflow process"
        expected_replicas_max = 4 if name in SCALABLE else 1
        assert 1 <= spec["replicas"] <= expected_replicas_max, name
    config = next(o for o in objects() if o["kind"] == "ConfigMap")
    for var in config["data"]:
        assert var in known, f"ConfigMap: {var} is not a setting"
