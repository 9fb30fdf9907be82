"""Static checks of docker-compose.yml and the Dockerfile; no database, no Docker engine needed."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

REQUIRED_SERVICES = {"postgres", "redis", "migrate", "web", "worker", "beat", "flower"}
MUST_HAVE_HEALTHCHECK = {"postgres", "redis", "web", "worker"}
NO_HEALTHCHECK_OK = {"migrate", "beat", "flower"}
APP_SERVICES = {"migrate", "web", "worker", "beat", "flower"}
LONG_RUNNING_APP_SERVICES = APP_SERVICES - {"migrate"}


def load_compose() -> dict[str, Any]:
    with COMPOSE_FILE.open() as fh:
        data = yaml.safe_load(fh)
    assert isinstance(data, dict), "docker-compose.yml must be a mapping"
    return data


def services() -> dict[str, dict[str, Any]]:
    return load_compose()["services"]


def command_args(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    if isinstance(command, str):
        return shlex.split(command)
    return [str(arg) for arg in command]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return {name: {} for name in deps}
    return {name: (spec or {}) for name, spec in deps.items()}


def option_values(args: list[str], *names: str) -> list[str]:
    """Values of an option given as ``-Q value``, ``--queues value`` or ``--queues=value``."""
    values = []
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                values.append(args[i + 1])
            elif name.startswith("--") and arg.startswith(name + "="):
                values.append(arg.split("=", 1)[1])
    return values


def test_compose_has_no_obsolete_version_key():
    assert "version" not in load_compose()


def test_required_services_exist():
    missing = REQUIRED_SERVICES - set(services())
    assert not missing, f"services missing from docker-compose.yml: {sorted(missing)}"


def test_healthchecks():
    for name, service in services().items():
        healthcheck = service.get("healthcheck")
        if name in MUST_HAVE_HEALTHCHECK:
            assert healthcheck, f"{name} must have a healthcheck"
        elif name not in NO_HEALTHCHECK_OK:
            assert healthcheck, f"long-running service {name} has no healthcheck"
        if healthcheck:
            assert not healthcheck.get("disable"), f"{name} healthcheck is disabled"
            assert healthcheck.get("test"), f"{name} healthcheck has no test"


def test_depends_on_targets_exist():
    all_services = services()
    for name, service in all_services.items():
        for target in depends_on(service):
            assert target in all_services, f"{name} depends on unknown service {target}"


def test_app_services_wait_for_healthy_infra():
    all_services = services()
    for name in APP_SERVICES:
        deps = depends_on(all_services[name])
        for infra in ("postgres", "redis"):
            assert deps.get(infra, {}).get("condition") == "service_healthy", (
                f"{name} must wait for {infra} to be healthy"
            )


def test_long_running_app_services_wait_for_migrate():
    all_services = services()
    assert str(all_services["migrate"].get("restart", "no")) == "no", "migrate is one-shot"
    for name in LONG_RUNNING_APP_SERVICES:
        condition = depends_on(all_services[name]).get("migrate", {}).get("condition")
        assert condition == "service_completed_successfully", (
            f"{name} must start only after migrate completed successfully"
        )


def test_app_services_get_database_and_broker_urls():
    all_services = services()
    for name in APP_SERVICES:
        env = environment(all_services[name])
        assert env.get("DATABASE_URL", "").startswith("postgres://"), (
            f"{name} has no Postgres DATABASE_URL"
        )
        assert env.get("CELERY_BROKER_URL", "").startswith("redis://"), (
            f"{name} has no Redis CELERY_BROKER_URL"
        )


def test_migrate_runs_migrations():
    command = " ".join(command_args(services()["migrate"]))
    assert "manage.py migrate" in command


def test_worker_consumes_all_queues():
    args = command_args(services()["worker"])
    assert args[:4] == ["celery", "-A", "agentsite", "worker"], args
    queues = {
        queue.strip()
        for value in option_values(args, "-Q", "--queues")
        for queue in value.split(",")
    }
    missing = {"models", "tools", "maintenance"} - queues
    assert not missing, f"worker does not consume queues {sorted(missing)} (has {queues})"


def test_web_runs_gunicorn_with_uvicorn_workers_on_agentsite_asgi():
    args = command_args(services()["web"])
    joined = " ".join(args)
    assert "gunicorn" in joined
    assert "agentsite.asgi" in joined and "uvicorn_worker.UvicornWorker" in joined


def test_metrics_are_served_by_every_web_worker_and_by_each_worker_container():
    web = command_args(services()["web"])
    assert "--config=gunicorn.conf.py" in web  # multiprocess mode (gunicorn.conf.py)
    assert (ROOT / "gunicorn.conf.py").is_file()
    worker = services()["worker"]
    assert environment(worker)["AGENTSITE_WORKER_METRICS_PORT"] == "9808"
    assert environment(worker)["AGENTSITE_WORKER_METRICS_ADDR"] == "0.0.0.0"  # noqa: S104 (reached by Prometheus in the network)
    assert "9808" in [str(port) for port in worker.get("expose", [])]


def test_flower_asks_for_a_password_from_the_environment():
    args = " ".join(command_args(services()["flower"]))
    assert "flower" in args
    assert "--basic-auth=${FLOWER_USER:-admin}:${FLOWER_PASSWORD:?set FLOWER_PASSWORD}" in args
    procfile = (ROOT / "Procfile").read_text()
    flower = next(line for line in procfile.splitlines() if line.startswith("flower:"))
    assert "--basic-auth=" in flower and "${FLOWER_PASSWORD:?" in flower
    assert "--address=127.0.0.1" in flower  # make up: not on every interface


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuations joined."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    if current.strip():
        keyword, _, rest = current.strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_cmd_runs_gunicorn_on_asgi():
    assert DOCKERFILE.is_file(), "Dockerfile is missing"
    instructions = dockerfile_instructions()
    cmds = [rest for keyword, rest in instructions if keyword == "CMD"]
    assert cmds, "Dockerfile has no CMD"
    assert "gunicorn" in cmds[-1], f"Dockerfile CMD does not run gunicorn: {cmds[-1]}"
    assert "agentsite.asgi" in cmds[-1] and "uvicorn_worker.UvicornWorker" in cmds[-1]
    assert "--config gunicorn.conf.py" in cmds[-1]
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and not re.fullmatch(r"(root|0)(:.*)?", users[-1]), "image must not run as root"


def compose_cli() -> list[str] | None:
    """``docker compose`` if the plugin is installed, else standalone ``docker-compose``."""
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for cli in candidates:
        try:
            probe = subprocess.run(
                [*cli, "version"], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return cli
    return None


def test_docker_compose_config_is_valid():
    """``docker compose config`` only parses and interpolates; it needs no Docker engine."""
    cli = compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is available")
    env = {
        **os.environ,
        "SECRET_KEY": "test-compose-secret-key",
        "FLOWER_PASSWORD": "test-compose-flower-password",
    }
    result = subprocess.run(
        [*cli, "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"compose config failed:\n{result.stderr}"
