"""deploy/k8s fits Kubernetes and the code: every object validates against the Kubernetes
OpenAPI schemas (kubernetes-validate, strict: unknown fields are errors), the modules run
exist, every SEGFLOW_* variable is a real setting, each pod's instance id is its stable
StatefulSet name, and only the services with partitioned state run more than one replica
(identity as its split roles: front-stage pods, and the graph writer as 2 pods, one active and
one warm standby).

No cluster runs here; this is the check that can.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from segflow import stack
from segflow.cli import SCALABLE
from segflow.stack import Process
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


def workloads() -> dict[str, Process]:
    """StatefulSet name -> what it runs: each service of the stack, identity as its split
    roles (identity-front, identity-writer), as ``segflow up --replicas 2`` runs them."""
    procs = stack.processes({name: 2 for name in DEPLOYED})
    return {p.name: p for p in procs if p.instance == 0}


def test_there_are_manifests() -> None:
    assert MANIFESTS and set(statefulsets()) == set(workloads())
    assert {"identity-front", "identity-writer"} <= set(statefulsets())


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
    run = workloads()
    for name, sts in statefulsets().items():
        spec = sts["spec"]
        assert spec["serviceName"] == name
        [container] = spec["template"]["spec"]["containers"]
        assert container["command"] == ["python", "-m", run[name].module]
        assert find_spec(f"{run[name].module}.__main__") is not None
        env = {e["name"]: e for e in container["env"]}
        assert env["SEGFLOW_INSTANCE_ID"]["valueFrom"] == {
            "fieldRef": {"fieldPath": "metadata.name"}
        }, f"{name}: the instance id must be the pod's stable name"
        for var in env:
            assert var in known, f"{name}: {var} is not a setting of any segflow process"
        # identity's role: front stage or graph writer; the one-process role runs nowhere
        assert env.get("SEGFLOW_IDENTITY_ROLE", {}).get("value") == run[name].role, name
        if run[name].role == "writer":  # one active writer and its warm standby
            assert spec["replicas"] == stack.IDENTITY_WRITERS, name
            continue
        expected_replicas_max = 4 if name in SCALABLE or run[name].role == "front" else 1
        assert 1 <= spec["replicas"] <= expected_replicas_max, name
    config = next(o for o in objects() if o["kind"] == "ConfigMap")
    for var in config["data"]:
        assert var in known, f"ConfigMap: {var} is not a setting"


def test_identity_roles_get_their_secrets_and_only_the_writers_answer_queries() -> None:
    for name in ("identity-front", "identity-writer"):
        sts = statefulsets()[name]
        [container] = sts["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        for var, key in (
            ("SEGFLOW_HASH_SECRET", "hash-secret"),
            ("SEGFLOW_VAULT_KEY", "vault-key"),
        ):
            assert env[var]["valueFrom"] == {
                "secretKeyRef": {"name": "segflow-secrets", "key": key}
            }, f"{name}: {var} must come from the Secret"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        if name == "identity-writer":  # the graph: the gateway's identity endpoint
            assert env["SEGFLOW_IDENTITY_HTTP_PORT"]["value"] == str(ports["query"])
        else:
            assert "SEGFLOW_IDENTITY_HTTP_PORT" not in env and "query" not in ports
