"""The team stack's files, validated without a Docker engine (none runs on these machines): the compose file's
services, commands (checked against the real CLIs' options), environment and wiring; the images' Dockerfiles; the
Kubernetes GPU job template; the DVC remote."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

INFRA = ROOT / "infra"
COMPOSE = yaml.safe_load((INFRA / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]


def _command(service: dict) -> list[str]:
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def _click_command(argv: list[str]):
    """The click command `argv` names (mlflow, prefect or arft), and the options it was given."""
    import click
    import typer

    if argv[0] == "mlflow":
        from mlflow.cli import cli as group
    elif argv[0] == "arft":
        from arft_core.cli import app

        group = typer.main.get_command(app)
    else:
        raise AssertionError(f"unexpected program {argv[0]!r}")
    command, rest = group, argv[1:]
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        command = command.get_command(click.Context(command), rest[0])
        assert command is not None, f"{argv}: no such subcommand {rest[0]!r}"
        rest = rest[1:]
    return command, [a.split("=")[0] for a in rest if a.startswith("--")]


def test_compose_has_the_team_services():
    assert set(SERVICES) >= {"postgres", "minio", "mlflow", "prefect", "cpu-worker", "gpu-worker"}
    for name, service in SERVICES.items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            assert (ROOT / service["build"]["dockerfile"]).is_file(), name
        image = service.get("image", "")
        assert not image.endswith(":latest") or image.startswith("arft-"), f"{name}: pin third-party images"


def test_mlflow_server_command_has_those_options():
    argv = _command(SERVICES["mlflow"])
    command, options = _click_command(argv)
    known = {opt for p in command.params for opt in p.opts}
    assert set(options) <= known, f"unknown option(s) {set(options) - known} for mlflow server"


def test_prefect_commands_have_those_options():
    """Prefect's CLI (cyclopts) is asked for its help: `prefect server start` and `prefect worker start`."""
    import subprocess
    import sys

    commands = {tuple(_command(SERVICES[n])[:3]): _command(SERVICES[n]) for n in ("prefect", "cpu-worker",
                                                                                    "gpu-worker")}
    assert set(commands) == {("prefect", "server", "start"), ("prefect", "worker", "start")}
    for head, argv in commands.items():
        shown = subprocess.run([sys.executable, "-m", "prefect", *head[1:], "--help"], capture_output=True,
                               text=True).stdout
        for option in (a for a in argv if a.startswith("--")):
            assert option in shown, f"{' '.join(head)}: no option {option}"


def test_workers_serve_the_pools_of_params_and_reach_the_servers():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["retrain"]
    pools = {name: _command(SERVICES[name])[_command(SERVICES[name]).index("--pool") + 1]
             for name in ("cpu-worker", "gpu-worker")}
    assert pools == {"cpu-worker": params["cpu_pool"], "gpu-worker": params["gpu_pool"]}
    ports = {"mlflow": "5000", "prefect": "4200", "minio": "9000"}
    for name in ("cpu-worker", "gpu-worker"):
        env = SERVICES[name]["environment"]
        for value in env.values():
            for host, port in re.findall(r"http://([a-z-]+):(\d+)", str(value)):
                assert host in SERVICES and ports[host] == port, f"{name}: {value}"
        assert {"PREFECT_API_URL", "MLFLOW_TRACKING_URI"} <= set(env)
        assert SERVICES[name]["working_dir"] == "/opt/arft"
    gpu = SERVICES["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]


def test_mlflow_uses_postgres_and_minio():
    argv = _command(SERVICES["mlflow"])
    backend = argv[argv.index("--backend-store-uri") + 1]
    assert backend.startswith("postgresql://") and "@postgres:5432/" in backend
    assert argv[argv.index("--artifacts-destination") + 1].startswith("s3://")
    assert SERVICES["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    buckets = " ".join(SERVICES["minio-buckets"]["command"])
    assert "local/mlflow" in buckets and "local/dvc" in buckets


def test_prefect_settings_in_compose_are_real_settings(monkeypatch):
    """Every PREFECT_* variable the stack sets is read by Prefect's settings (a misspelt one would be ignored)."""
    from prefect.settings import Settings

    env = {k: str(v) for s in SERVICES.values() for k, v in (s.get("environment") or {}).items()
           if k.startswith("PREFECT_")}
    assert env
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    read = {v.lower() for v in Settings().to_environment_variables(exclude_unset=True).values()}
    for key, value in env.items():
        assert value.lower() in read, f"{key} is not a Prefect setting"


def test_secrets_are_required_from_the_environment_not_written_down():
    text = (INFRA / "compose.yaml").read_text()
    assert "${POSTGRES_PASSWORD:?" in text and "${MINIO_ROOT_PASSWORD:?" in text
    for name, service in SERVICES.items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|API_KEY", key):
                assert str(value).startswith("${"), f"{name}: {key} is written down; take it from the environment"


@pytest.mark.parametrize("dockerfile", sorted((INFRA / "docker").glob("*.Dockerfile")), ids=lambda p: p.name)
def test_dockerfiles_copy_files_that_exist(dockerfile: Path):
    lines = [ln.strip() for ln in dockerfile.read_text().splitlines()]
    base = next(ln.split()[1] for ln in lines if ln.startswith("FROM "))
    assert ":" in base and not base.endswith(":latest")
    for line in (ln for ln in lines if ln.startswith("COPY ")):
        for source in line.split()[1:-1]:
            assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"
    text = dockerfile.read_text()
    assert not any("torchvision" in ln for ln in lines if ln.startswith("RUN"))
    if dockerfile.name.startswith("cpu"):
        assert "torch==2.13.0" in text and "constraints-cpu.txt" in text


def test_k8s_gpu_job_requests_gpus_and_defines_its_variables():
    template = yaml.safe_load((INFRA / "k8s" / "gpu-job-template.yaml").read_text())
    manifest = template["job_configuration"]["job_manifest"]
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert manifest["kind"] == "Job"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", (INFRA / "k8s" / "gpu-job-template.yaml").read_text()))
    assert used <= set(template["variables"]["properties"]), used - set(template["variables"]["properties"])


def test_dvc_remote_for_minio_is_configured_but_not_the_default():
    from dvc.config import Config

    config = Config(str(ROOT / ".dvc"))
    remote = config["remote"]["minio"]
    assert remote["url"] == "s3://dvc/arft" and remote["endpointurl"] == "http://localhost:9000"
    assert config["core"].get("remote") is None  # laptops push nowhere until they opt in
