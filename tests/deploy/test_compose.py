"""docker-compose.yml fits the code: the modules it runs exist, each service's metrics port is
the one Prometheus scrapes (and the one `segflow up` uses), the mounted files exist where the
Prometheus and Grafana configs expect them, and every SEGFLOW_* variable is a real setting.

CI has no Docker engine, so the stack is checked here rather than started.
"""

from __future__ import annotations

import importlib
import re
import shlex
from importlib.util import find_spec
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from pydantic_settings import BaseSettings

from segflow.stack import SERVICES as STACK
from segflow.supervisor import SERVICES

#: Every service of the stack (SERVICES: those with a query endpoint behind the gateway).
DEPLOYED = tuple(s.name for s in STACK)
#: The compose services that run each: itself, or identity as its split roles (role given).
COMPOSED: dict[str, dict[str, str | None]] = {
    **{name: {name: None} for name in DEPLOYED},
    "identity": {
        "identity-front": "front",
        "identity-writer": "writer",
        "identity-writer-standby": "writer",
    },
}

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
PROMETHEUS = REPO / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA_PROVISIONING = REPO / "deploy" / "grafana" / "provisioning"
#: Where every SEGFLOW_* setting is defined: the runtime's, the gateway's, and each deployed
#: service's own settings module (#14 moved them out of the app.py shells; the dispatcher's
#: playbook location is a pure module of its own, which replay reads too).
SETTINGS_MODULES = (
    "segflow.runtime.settings",
    "segflow.runtime.vault",  # SEGFLOW_VAULT_KEY, SEGFLOW_VAULT_PREVIOUS_KEYS
    "segflow.api.gateway",
    "services.dispatcher.vendors",  # VendorSettings (DispatcherSettings inherits them)
    "services.dispatcher.playbook_settings",  # SEGFLOW_DISPATCHER_PLAYBOOKS
    "segflow.collector.app",  # SEGFLOW_COLLECTOR_* (a product command, not a stack service)
    *(f"services.{s}.settings" for s in DEPLOYED),
)
#: Variables read straight from the environment rather than through a settings class, and
#: the file that reads each (checked below, so the list cannot outlive the code).
PROCESS_VARIABLES = {
    "SEGFLOW_BROKER_PORT": "segflow/cli.py",
    "SEGFLOW_CACHE_DIR": "segflow/runtime/broker.py",
    "SEGFLOW_DEMO_NO_WAIT": "segflow/api/wiring.py",
    "SEGFLOW_SKIP_BROWSER_INSTALL": "run",
    "SEGFLOW_VENV": "run",
}
#: A variable named in text; a trailing ``_*``, ``_<TYPE>``, ``_{...}`` or a bare ``_`` (an
#: ``env_prefix``) makes it a prefix.
_VARIABLE = re.compile(r"(?<![A-Z0-9_])(SEGFLOW_[A-Z0-9_]*[A-Z0-9])(_(?:\*|<|\{|(?![A-Za-z0-9])))?")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    svcs: dict[str, dict[str, Any]] = compose["services"]
    return svcs


def scrape_targets() -> dict[str, list[str]]:
    config = yaml.safe_load(PROMETHEUS.read_text())
    return {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in config["scrape_configs"]
    }


def command(svc: dict[str, Any]) -> list[str]:
    cmd = svc["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def bind_mounts(svc: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of the service's ``./...`` bind mounts."""
    out: dict[str, Path] = {}
    for vol in svc.get("volumes", []):
        source, target = vol.split(":")[:2]
        if source.startswith("./"):
            out[target] = REPO / source
    return out


def test_the_stack_has_every_part(services: dict[str, dict[str, Any]]) -> None:
    composed = [c for roles in COMPOSED.values() for c in roles]
    assert {"kafka", "topics", *composed, "prometheus", "grafana"} <= set(services)
    assert "identity" not in services  # the one-process role would identify every event twice
    assert services["kafka"]["image"].startswith("apache/kafka:")


@pytest.mark.parametrize("name", DEPLOYED)
def test_each_service_runs_its_module_with_the_metrics_port_prometheus_scrapes(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    from segflow.cli import build_parser

    for host, role in COMPOSED[name].items():
        svc = services[host]
        assert command(svc) == ["python", "-m", f"services.{name}"]
        assert find_spec(f"services.{name}.__main__") is not None
        assert svc["environment"].get("SEGFLOW_IDENTITY_ROLE") == role, host
        port = int(svc["environment"]["SEGFLOW_METRICS_PORT"])
        # the port `segflow up` gives the same service, so both Prometheus configs agree
        assert port == build_parser().parse_args(["up"]).metrics_port + DEPLOYED.index(name)
    assert scrape_targets()[name] == [f"{host}:{port}" for host in COMPOSED[name]]


def test_every_scrape_target_is_a_compose_service(services: dict[str, dict[str, Any]]) -> None:
    for job, targets in scrape_targets().items():
        for target in targets:
            host, port = target.rsplit(":", 1)
            if job == "prometheus":
                assert target == "localhost:9090"
                continue
            assert host in services, f"{job}: {target} is not a compose service"
            assert services[host]["environment"]["SEGFLOW_METRICS_PORT"] == port


def test_other_commands_exist(services: dict[str, dict[str, Any]]) -> None:
    from segflow.cli import build_parser

    for name, svc in services.items():
        cmd = command(svc) if "command" in svc else []
        if cmd[:1] == ["segflow"]:
            args = build_parser().parse_args(cmd[1:])  # exits (fails the test) if invalid
            assert callable(getattr(args, "func", None) or getattr(args, "handler", None)), name
        elif cmd[:2] == ["python", "-m"]:
            assert find_spec(cmd[2]) is not None, f"{name}: no module {cmd[2]}"


def test_mounted_files_exist_where_the_configs_expect_them(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, svc in services.items():
        for source in bind_mounts(svc).values():
            assert source.exists(), f"{name} mounts {source}, which does not exist"
    prom = services["prometheus"]
    mounts = bind_mounts(prom)
    flags = dict(a.split("=", 1) for a in prom["command"] if "=" in a)
    config = flags["--config.file"]
    assert mounts[config] == PROMETHEUS
    for rule_file in yaml.safe_load(PROMETHEUS.read_text())["rule_files"]:
        in_container = str(PurePosixPath(config).parent / rule_file)
        assert in_container in mounts, f"{rule_file} is not mounted beside {config}"
        assert mounts[in_container] == PROMETHEUS.parent / rule_file

    graf = bind_mounts(services["grafana"])
    assert graf["/etc/grafana/provisioning"] == GRAFANA_PROVISIONING
    providers = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "segflow.yml").read_text())
    for provider in providers["providers"]:
        dashboards = graf[provider["options"]["path"]]
        assert list(dashboards.glob("*.json")), f"no dashboard JSON in {dashboards}"
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    folder, file = home.rsplit("/", 1)
    assert (graf[folder] / file).exists()


def test_grafana_reaches_prometheus(services: dict[str, dict[str, Any]]) -> None:
    sources = yaml.safe_load((GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (ds,) = sources["datasources"]
    assert ds["url"] == "http://prometheus:9090"
    assert "prometheus" in services
    assert any(p.endswith(":9090") for p in services["prometheus"]["ports"])


def test_services_reach_the_broker(services: dict[str, dict[str, Any]]) -> None:
    advertised = services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    listeners = {item.split("://", 1)[1] for item in advertised.split(",")}
    composed = [c for roles in COMPOSED.values() for c in roles]
    for name in ("topics", *composed):
        assert services[name]["environment"]["KAFKA_BOOTSTRAP_SERVERS"] in listeners, name
        if name in composed:
            assert services[name]["depends_on"]["topics"] == {
                "condition": "service_completed_successfully"
            }


def settings_variables() -> set[str]:
    names = {"KAFKA_BOOTSTRAP_SERVERS"}
    for module_name in SETTINGS_MODULES:
        module = importlib.import_module(module_name)
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, BaseSettings)
                and value.__module__ == module_name
            ):
                prefix = str(value.model_config.get("env_prefix", ""))
                names |= {(prefix + field).upper() for field in value.model_fields}
    return names


def test_every_segflow_variable_is_a_real_setting(services: dict[str, dict[str, Any]]) -> None:
    known = settings_variables()
    assert "SEGFLOW_METRICS_PORT" in known and "SEGFLOW_DISPATCHER_CRM_BASE_URL" in known
    for name, svc in services.items():
        env = svc.get("environment", {})
        for var in env:
            if var.startswith(("SEGFLOW_", "KAFKA_BOOTSTRAP")):
                assert var in known, f"{name}: {var} is not a setting of any segflow process"


def test_no_service_shell_defines_settings() -> None:
    """Each deployed service's settings live in its pure ``settings.py`` (importable without
    Kafka or HTTP: the purity test), not in the ``app.py`` shell beside the I/O imports."""
    for name in DEPLOYED:
        module_name = f"services.{name}.app"
        module = importlib.import_module(module_name)
        own = [
            v.__name__
            for v in vars(module).values()
            if isinstance(v, type) and issubclass(v, BaseSettings) and v.__module__ == module_name
        ]
        assert own == [], f"{module_name} defines settings {own}: move them to its settings.py"
        assert find_spec(f"services.{name}.settings") is not None, name


def test_every_documented_or_used_segflow_variable_is_read() -> None:
    """Every SEGFLOW_* variable the READMEs, the deploy files or the services' code name is a
    setting of a settings module (or one of the few read directly, where they are read)."""
    known = settings_variables()
    for variable, reader in PROCESS_VARIABLES.items():
        text = (REPO / reader).read_text()
        assert re.search(rf"environ(\.get)?[\(\[]\s*[\"']{variable}|\${{?{variable}", text), (
            f"{reader} no longer reads {variable}: drop it from PROCESS_VARIABLES"
        )
    known |= set(PROCESS_VARIABLES)
    sources = [
        REPO / "README.md",
        COMPOSE,
        *(REPO / "services").glob("*/README.md"),
        *(REPO / "segflow").rglob("README.md"),
        *(REPO / "deploy").rglob("*.md"),
        *(REPO / "deploy").rglob("*.y*ml"),
        *(REPO / "services").rglob("*.py"),
    ]
    unknown = []
    for path in sources:
        for match in _VARIABLE.finditer(path.read_text()):
            name, prefix = match.groups()
            ok = any(k.startswith(name + "_") for k in known) if prefix else name in known
            if not ok:
                unknown.append(f"{path.relative_to(REPO)}: {name}{prefix or ''}")
    assert unknown == [], f"named but no setting reads them: {sorted(set(unknown))}"


def test_published_ports_listen_on_localhost_only(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on all interfaces"


def test_the_image_is_built_from_files_that_exist(services: dict[str, dict[str, Any]]) -> None:
    builds = {svc["build"]["dockerfile"] for svc in services.values() if "build" in svc}
    assert builds == {"deploy/Dockerfile"}
    for line in (REPO / "deploy" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            *sources, _dest = line.split()[1:]
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"


def test_the_api_gateway_reaches_every_service_query_endpoint(
    services: dict[str, dict[str, Any]],
) -> None:
    from segflow.api.gateway import SERVICE_PORT_ENV

    api = services["api"]
    assert command(api) == ["python", "-m", "segflow.api"]
    env = api["environment"]
    assert env["SEGFLOW_API_TOKEN"] == "${SEGFLOW_API_TOKEN:-}"  # from the environment only
    assert api["ports"] == [f"127.0.0.1:{env['SEGFLOW_API_PORT']}:{env['SEGFLOW_API_PORT']}"]
    for name in SERVICES:
        urls = []
        for host, role in COMPOSED[name].items():
            svc_env = {**services[host]["environment"]}
            if role == "front":  # holds no graph: no query endpoint
                assert SERVICE_PORT_ENV[name] not in svc_env, host
                continue
            port = svc_env[SERVICE_PORT_ENV[name]]
            urls.append(f"http://{host}:{port}")
            # bound beyond loopback so another container reaches it, but never published
            assert svc_env["SEGFLOW_INTERNAL_API_HOST"] == "0.0.0.0"
            assert not any(str(p).endswith(f":{port}") for p in services[host].get("ports", []))
        assert env[f"SEGFLOW_API_{name.upper()}_URL"] == ",".join(urls)


def test_identity_runs_scalable_fronts_and_a_writer_with_a_standby(
    services: dict[str, dict[str, Any]],
) -> None:
    front = services["identity-front"]
    assert front["deploy"]["replicas"] >= 1  # `--scale identity-front=N` or deploy.replicas
    assert front["environment"]["SEGFLOW_INSTANCE_ID"] == "hostname"  # one per replica
    writers = [services[h] for h, role in COMPOSED["identity"].items() if role == "writer"]
    ids = [w["environment"]["SEGFLOW_INSTANCE_ID"] for w in writers]
    # one active and one warm standby, each with its own static instance id (fencing)
    assert len(writers) == 2 and len(set(ids)) == 2 and "hostname" not in ids
    assert all(w.get("deploy", {}).get("replicas", 1) == 1 for w in writers)
