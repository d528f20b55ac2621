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
    env = SERVICES["mlflow"]["environment"]
    backend = env["MLFLOW_BACKEND_STORE_URI"]  # the password in the environment, not on the command line
    assert backend.startswith("postgresql://") and "@postgres:5432/" in backend
    assert "--backend-store-uri" not in argv
    assert argv[argv.index("--artifacts-destination") + 1] == "s3://mlflow/"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert SERVICES["minio-buckets"]["environment"]["BUCKETS"].split() == ["mlflow", "dvc"]
    assert "$$BUCKETS" in " ".join(SERVICES["minio-buckets"]["command"])


# Which secret each service gets, in compose and natively alike (docs/deployment.md, "Who holds what").
WORKER_SECRETS = {"MINIO_ROOT_PASSWORD", "PREFECT_AUTH_STRING", "MLFLOW_WORKER_PASSWORD", "SERPER_API_KEY",
                  "BRAVE_API_KEY"}
SECRET_TABLE = {
    "postgres": {"POSTGRES_PASSWORD"},
    "minio": {"MINIO_ROOT_PASSWORD"},
    "minio-buckets": {"MINIO_ROOT_PASSWORD"},
    "mlflow": {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SECRET_KEY"},
    "mlflow-users": {"MLFLOW_ADMIN_PASSWORD", "MLFLOW_WORKER_PASSWORD"},
    "prefect": {"POSTGRES_PASSWORD", "PREFECT_AUTH_STRING"},
    "cpu-worker": WORKER_SECRETS,
    "gpu-worker": WORKER_SECRETS,
}
SECRET_VALUES = {name: f"{name.lower()}-pw-{i}" for i, name in enumerate(sorted(set().union(*SECRET_TABLE.values())))}


@pytest.fixture
def stack_plan(monkeypatch, tmp_path):
    from arft_core.config import Config
    from arft_core.stack import plan

    for name, value in SECRET_VALUES.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("POSTGRES_PASSWORD", "pg-pw-1")
    monkeypatch.setenv("MINIO_ROOT_PASSWORD", "s3-pw-2")
    monkeypatch.delenv("MINIO_ROOT_USER", raising=False)
    cfg = Config.from_dict({"stack": {"home": str(tmp_path / "st"), "ports": {"mlflow": 5999}}}, root=ROOT)
    return plan(cfg)


def test_native_stack_is_derived_from_compose(stack_plan):
    """`arft stack up` runs compose's services in depends_on order, with compose's commands and environment, the
    container addresses turned into loopback ports (stack.ports wins over the published port)."""
    p = stack_plan
    names = [s.name for s in p.services]
    assert set(names) == set(SERVICES)
    for name, service in SERVICES.items():
        for dep in service.get("depends_on") or {}:
            assert names.index(dep) < names.index(name), (dep, name)
    assert {s.name: s.kind for s in p.services if s.kind != "command"} == {
        "postgres": "postgres", "minio": "s3", "minio-buckets": "buckets", "mlflow-users": "oneshot"}
    mlflow = p.service("mlflow")
    assert mlflow.port == 5999 and p.service("prefect").port == 4200 and p.service("postgres").port == 5432
    assert mlflow.argv[1:4] == ["-m", "mlflow", "server"]
    assert mlflow.argv[mlflow.argv.index("--host") + 1] == "127.0.0.1"
    assert mlflow.argv[mlflow.argv.index("--port") + 1] == "5999"
    assert [a for a in mlflow.argv[3:] if a.startswith("--")] == [a for a in _command(SERVICES["mlflow"])
                                                                  if a.startswith("--")]
    assert mlflow.env["MLFLOW_BACKEND_STORE_URI"] == "postgresql://arft:pg-pw-1@127.0.0.1:5432/mlflow"
    assert mlflow.env["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    worker = p.service("gpu-worker")
    assert worker.argv[3:] == _command(SERVICES["gpu-worker"])[1:]
    assert worker.env["PREFECT_API_URL"] == "http://127.0.0.1:4200/api" and worker.cwd == ROOT.resolve()
    assert worker.env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5999"
    assert p.service("prefect").env["PREFECT_UI_API_URL"] == "http://127.0.0.1:4200/api"
    for service in p.services:  # a secret reaches a service through its environment only
        assert not any("pw-" in a for a in service.argv), service.name


def test_native_stack_prints_secret_references_not_values(stack_plan):
    from arft_core.stack import client_env

    env = client_env(stack_plan)
    assert env["AWS_SECRET_ACCESS_KEY"] == "${MINIO_ROOT_PASSWORD}" and env["AWS_ACCESS_KEY_ID"] == "arft"
    assert env["PREFECT_API_AUTH_STRING"] == "${PREFECT_AUTH_STRING}"
    assert env["MLFLOW_TRACKING_USERNAME"] == "arft-worker"
    assert env["MLFLOW_TRACKING_PASSWORD"] == "${MLFLOW_WORKER_PASSWORD}"
    assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5999" and "pw-" not in str(env)


def _compose_secrets(name: str) -> set[str]:
    """The shell variables holding secrets that compose hands service `name` (its environment, its configs)."""
    from arft_core.stack import _VAR, secret_variables

    service = SERVICES[name]
    text = yaml.safe_dump(service.get("environment") or {})
    for mount in service.get("configs") or []:
        text += COMPOSE["configs"][mount["source"]]["content"]
    return {m.group(1) for m in _VAR.finditer(text)} & secret_variables(COMPOSE)


def test_each_service_gets_only_its_own_secrets_in_compose_and_natively(stack_plan):
    """The table of who holds which secret, checked on compose (no env_file: that would hand a service every
    secret of .env) and on the native plan derived from it."""
    assert set(SECRET_TABLE) == set(SERVICES)
    for name, service in SERVICES.items():
        assert "env_file" not in service, f"{name}: env_file hands the service every variable of the file"
        assert _compose_secrets(name) == SECRET_TABLE[name], name
        assert stack_plan.service(name).secret_vars == SECRET_TABLE[name], name
    held = {name: {k for k, v in SECRET_VALUES.items() if v in str(s.env)}
            for name, s in ((s.name, s) for s in stack_plan.services)}
    # (The test's values of POSTGRES_PASSWORD and MINIO_ROOT_PASSWORD differ from SECRET_VALUES'.)
    for name, got in held.items():
        assert got <= SECRET_TABLE[name], name


def test_native_services_start_from_an_environment_without_secrets(stack_plan, monkeypatch):
    """A service's environment is the shell's without any secret or client setting, plus its own compose
    environment: the shell's SERPER_API_KEY reaches the workers only, a stray token none."""
    from arft_core.stack import _base_env

    monkeypatch.setenv("HF_TOKEN", "hf-pw-9")
    monkeypatch.setenv("PREFECT_API_URL", "http://elsewhere/api")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "other-user-pw")
    monkeypatch.setenv("PREFECT_WORKER_QUERY_SECONDS", "1")  # a tuning setting goes through
    base = _base_env(stack_plan)
    assert base["PREFECT_WORKER_QUERY_SECONDS"] == "1"
    assert not {"HF_TOKEN", "PREFECT_API_URL", "MLFLOW_TRACKING_PASSWORD"} & set(base)
    assert not any("pw-" in v for v in base.values())
    for svc in stack_plan.services:
        env = {**base, **svc.env}
        has_serper = env.get("SERPER_API_KEY") == SECRET_VALUES["SERPER_API_KEY"]
        assert has_serper == svc.name.endswith("-worker"), svc.name


def test_published_ports_are_bound_to_the_switchable_loopback_address():
    for name, service in SERVICES.items():
        for spec in service.get("ports", []):
            assert str(spec).startswith("${ARFT_BIND_ADDRESS:-127.0.0.1}:"), f"{name}: {spec} is published on all " \
                "addresses"
    assert set(n for n, s in SERVICES.items() if s.get("ports")) == {"minio", "mlflow", "prefect"}


def test_servers_require_authentication():
    """Prefect: an API auth string on the server, the same on every worker. MLflow: the basic-auth app, users in
    PostgreSQL, no permission by default (the workers' user owns what it creates), the admin from a secret."""
    prefect = SERVICES["prefect"]["environment"]
    assert prefect["PREFECT_SERVER_API_AUTH_STRING"].startswith("${PREFECT_AUTH_STRING:?")
    for name in ("cpu-worker", "gpu-worker"):
        env = SERVICES[name]["environment"]
        assert env["PREFECT_API_AUTH_STRING"] == prefect["PREFECT_SERVER_API_AUTH_STRING"]
        assert env["MLFLOW_TRACKING_USERNAME"] == SERVICES["mlflow-users"]["environment"]["WORKER_USERNAME"]
        assert env["MLFLOW_TRACKING_PASSWORD"].startswith("${MLFLOW_WORKER_PASSWORD:?")
        assert SERVICES[name]["depends_on"]["mlflow-users"] == {"condition": "service_completed_successfully"}
        # Artifacts through the authenticated proxy, not presigned S3 URLs (minio:9000 is not the clients' address).
        assert env["MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD"] == env["MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD"] == "false"
    argv = _command(SERVICES["mlflow"])
    assert argv[argv.index("--app-name") + 1] == "basic-auth"
    env = SERVICES["mlflow"]["environment"]
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith("${MLFLOW_ADMIN_PASSWORD:?")
    mount = SERVICES["mlflow"]["configs"][0]
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == mount["target"]
    import configparser

    ini = configparser.ConfigParser()
    ini.read_string(COMPOSE["configs"][mount["source"]]["content"])
    assert ini["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    assert ini["mlflow"]["database_uri"].endswith("@postgres:5432/mlflow_auth")
    assert "CREATE DATABASE mlflow_auth;" in (INFRA / "postgres" / "init.sql").read_text()
    assert "admin_password" not in ini["mlflow"]  # (from the environment, MLFLOW_AUTH_ADMIN_PASSWORD)


def test_native_stack_writes_the_mlflow_auth_config_for_the_server(stack_plan):
    mlflow = stack_plan.service("mlflow")
    (path, content), = mlflow.files.items()
    assert mlflow.env["MLFLOW_AUTH_CONFIG_PATH"] == path and path.endswith("basic_auth.ini")
    assert "postgresql://arft:pg-pw-1@127.0.0.1:5432/mlflow_auth" in content
    users = stack_plan.service("mlflow-users")
    assert users.argv[1] == "-c" and users.env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5999"


def test_native_stack_names_the_missing_secret_before_starting(monkeypatch, tmp_path):
    from arft_core.config import Config
    from arft_core.stack import StackError, plan

    monkeypatch.delenv("POSTGRES_PASSWORD", raising=False)
    monkeypatch.setenv("MINIO_ROOT_PASSWORD", "x")
    cfg = Config.from_dict({"stack": {"home": str(tmp_path / "st")}}, root=ROOT)
    with pytest.raises(StackError, match=r"POSTGRES_PASSWORD \(postgres.environment.POSTGRES_PASSWORD"):
        plan(cfg)
    assert not (tmp_path / "st").exists()
    # What `down`, `status` and `env` need holds no secret: they work in a shell without them.
    assert plan(cfg, secrets=False).service("mlflow").env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://arft:@")
    bad = Config.from_dict({"stack": {"ports": {"mlfow": 1}}}, root=ROOT)
    with pytest.raises(StackError, match=r"stack.ports: unknown service\(s\) \['mlfow'\]"):
        plan(bad)


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
    for name in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "PREFECT_AUTH_STRING", "MLFLOW_ADMIN_PASSWORD",
                 "MLFLOW_WORKER_PASSWORD", "MLFLOW_FLASK_SECRET_KEY"):
        assert "${" + name + ":?" in text, name
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


def test_retrain_dvc_remote_must_be_a_remote_of_the_project():
    """A mistyped retrain.dvc_remote stops the retraining before any work, naming the remotes there are."""
    from arft_core.config import Config, ConfigError
    from flows.retrain import check_remote

    check_remote(Config.from_dict({"retrain": {"dvc_remote": "minio"}}, root=ROOT))
    with pytest.raises(ConfigError, match=r"retrain.dvc_remote: no DVC remote 'mino'; .* defines \['minio'\]"):
        check_remote(Config.from_dict({"retrain": {"dvc_remote": "mino"}}, root=ROOT))
