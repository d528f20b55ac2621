"""The team stack of infra/compose.yaml as local processes on loopback (`arft stack up|down|status|env`).

The compose file is the one source: its services, their order (depends_on), commands, environment and buckets.
Natively, each container host name becomes a loopback port, and each image a local program: `postgres` runs
Debian's PostgreSQL server, `minio` an S3 server (moto; its objects are saved in the stack's folder from a `down`
to the next `up`), `minio-buckets` creates the same buckets through the S3 API, and the services with an `mlflow`
or `prefect` command run that command with this environment's Python.
Secrets come from the environment, as compose's `${VAR:?}` takes them; they reach a service through its environment
(or a 0600 file of compose's `configs`), never its command line, the state file or a log line of ours. A service gets
only the secrets compose gives it: its environment is the shell's minus every secret and client setting, plus its own
compose `environment`. The S3 server (`serve_s3`) accepts only the stack's key and has no admin API.

Every process of the stack carries STACK_MARKER=<home> in its environment (inherited by what it starts, e.g. a
worker's flow runs), so `down` finds and stops all of them, and `leftovers` can prove it did.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from arft_core.config import Config
from arft_core.io import write_json_atomic

COMPOSE_FILE = Path("infra/compose.yaml")
STACK_MARKER = "ARFT_STACK_HOME"
STATE_FILE = "stack.json"
_VAR = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")
# A variable holding a credential: required ones (`${VAR:?}`) and, by name, optional ones such as SERPER_API_KEY.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|AUTH_STRING|CREDENTIAL|PRIVATE_KEY")
# Client settings of the shell that must not reach a service (it would talk to another stack, or as another user).
_CLIENT_SETTING = re.compile(r"^(AWS_|MLFLOW_TRACKING_|MLFLOW_S3_|PREFECT_API_|PG[A-Z]+$)")


class StackError(RuntimeError):
    pass


@dataclass
class Service:
    """One compose service as a local process: `argv` with `env`, answering on `port` (None: no port)."""

    name: str
    kind: str  # postgres | s3 | buckets | command | oneshot (a command run to completion on every `up`)
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int | None = None
    cwd: Path | None = None
    health: str | None = None  # URL that answers once the service is up
    secrets: set[str] = field(default_factory=set)  # names of the environment variables holding secrets
    secret_vars: set[str] = field(default_factory=set)  # the shell's secret variables they come from
    files: dict[str, str] = field(default_factory=dict)  # compose `configs` written (0600) before it starts


@dataclass
class Plan:
    """The stack as this machine runs it: services in start order, and the settings they share."""

    home: Path
    host: str
    services: list[Service]
    compose: dict
    compose_dir: Path  # relative paths in compose (volumes) resolve against it

    def service(self, name: str) -> Service:
        return next(s for s in self.services if s.name == name)

    def url(self, name: str) -> str:
        return f"http://{self.host}:{self.service(name).port}"


# ---------------------------------------------------------------------------------------------------------------
# From compose to a plan


def load_compose(root: Path) -> dict:
    path = root / COMPOSE_FILE
    if not path.is_file():
        raise StackError(f"{path}: the compose file the stack is read from is missing")
    return yaml.safe_load(path.read_text())


def _interpolate(value: str, where: str, missing: list[str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?message}` from the environment; `$$` is a literal `$`."""

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        got = os.environ.get(name)
        if op == "?":
            if not got:
                missing.append(f"{name} ({where}: {arg or 'required'})")
                return ""
        if not got and op == "-":
            return arg
        return got or ""

    return _VAR.sub(sub, value).replace("$$", "$")


def _published(service: dict) -> tuple[int, int] | None:
    """(host port, container port) of the service's first published port (`[address:]host:container`; natively
    every service listens on stack.host whatever the address)."""
    for spec in service.get("ports", []):
        parts = _interpolate(str(spec), "ports", []).split(":")
        return int(parts[-2] if len(parts) > 1 else parts[-1]), int(parts[-1])
    return None


def secret_variables(compose: dict) -> set[str]:
    """The shell variables compose takes secrets from: every required one (`${VAR:?}`) and any whose name says it
    is a credential."""
    text = yaml.safe_dump(compose)
    return {m.group(1) for m in _VAR.finditer(text) if m.group(2) == "?" or SECRET_NAME.search(m.group(1))}


def _topological(services: dict) -> list[str]:
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in path:
            raise StackError(f"{COMPOSE_FILE}: depends_on cycle through {name!r}")
        for dep in services[name].get("depends_on") or {}:
            visit(dep, path + (name,))
        order.append(name)

    for name in services:
        visit(name, ())
    return order


def _kind(service: dict) -> str:
    image = str(service.get("image", ""))
    command = service.get("command") or []
    program = (command.split() if isinstance(command, str) else command or [""])[0]
    if image.startswith("postgres:"):
        return "postgres"
    if image.startswith("minio/minio"):
        return "s3"
    if image.startswith("minio/mc"):
        return "buckets"
    if program in ("mlflow", "prefect"):
        return "command"
    if program == "python":  # a one-shot script (mlflow-users): this environment's Python runs it
        return "oneshot"
    raise StackError(f"{COMPOSE_FILE}: no local equivalent for a service with image {image!r} and program "
                     f"{program!r}")


def plan(cfg: Config, secrets: bool = True) -> Plan:
    """The services of compose as local processes, with every secret and port resolved: errors (a missing secret, an
    unknown service in stack.ports) surface here, before anything starts. `secrets=False`: a missing secret is left
    empty (what `down`, `status` and `env` need does not hold one)."""
    compose = load_compose(cfg.root)
    services = compose["services"]
    st = cfg.stack
    unknown = sorted(set(st.ports) - set(services))
    if unknown:
        raise StackError(f"stack.ports: unknown service(s) {unknown}; compose defines {sorted(services)}")
    text = yaml.safe_dump(compose)
    # Container address in a URL -> loopback address: `@postgres:5432`, `//minio:9000` (compose's network) and
    # `//localhost:4200` (a published port) all become 127.0.0.1:<the service's local port>.
    ports: dict[str, int] = {}
    rewrite: dict[str, str] = {}
    for name, service in services.items():
        published = _published(service)
        inside = sorted({int(p) for p in re.findall(rf"(?<=[/@]){re.escape(name)}:(\d+)", text)})
        container = published[1] if published else (inside[0] if inside else None)
        if container is None:
            continue
        ports[name] = st.ports.get(name) or (published[0] if published else container)
        for port in inside:
            rewrite[f"{name}:{port}"] = f"{st.host}:{ports[name]}"
        if published:
            rewrite[f"localhost:{published[0]}"] = f"{st.host}:{ports[name]}"
    pattern = re.compile(r"(?<=[/@])(" + "|".join(map(re.escape, rewrite)) + r")(?!\d)") if rewrite else None

    def local(value: str) -> str:
        return pattern.sub(lambda m: rewrite[m.group(1)], value) if pattern else value

    home = (cfg.root / st.home).resolve()
    workdir = Path(cfg.retrain.workdir) if cfg.retrain.workdir else cfg.root.resolve()
    secret_vars = secret_variables(compose)
    missing: list[str] = []
    out = []
    for name in _topological(services):
        service = services[name]
        kind = _kind(service)
        raw = {k: str(v) for k, v in (service.get("environment") or {}).items()}
        env = {k: local(_interpolate(v, f"{name}.environment.{k}", missing)) for k, v in raw.items()}
        used = {k: {m.group(1) for m in _VAR.finditer(v)} & secret_vars for k, v in raw.items()}
        svc = Service(name, kind, env=env, port=ports.get(name), secrets={k for k, v in used.items() if v},
                      secret_vars=set().union(*used.values()))
        # compose `configs` (e.g. MLflow's basic_auth.ini): a file in stack.home; the container path in the
        # service's environment becomes that file.
        for mount in service.get("configs") or []:
            source, target = (mount["source"], mount["target"]) if isinstance(mount, dict) else (mount, f"/{mount}")
            content = str(compose.get("configs", {}).get(source, {}).get("content", ""))
            svc.secret_vars |= {m.group(1) for m in _VAR.finditer(content)} & secret_vars
            path = str(home / "configs" / name / Path(target).name)
            svc.files[path] = local(_interpolate(content, f"configs.{source}", missing))
            svc.env = {k: path if v == target else v for k, v in svc.env.items()}
        command = service.get("command") or []
        argv = command.split() if isinstance(command, str) else [str(a) for a in command]
        argv = [local(_interpolate(a, f"{name}.command", missing)) for a in argv]
        if kind == "oneshot":
            svc.argv, svc.cwd = [sys.executable, *argv[1:]], home
        if kind == "command":
            svc.argv = _local_command(argv, st.host, svc.port)
            svc.cwd = workdir if "working_dir" in service else home
            if argv[:2] == ["prefect", "server"]:
                svc.env["PREFECT_HOME"] = str(home / "prefect")
        if svc.port and kind in ("command", "s3"):
            svc.health = {"mlflow": f"http://{st.host}:{svc.port}/health",
                          "prefect": f"http://{st.host}:{svc.port}/api/health"}.get(argv[0] if argv else "",
                                                                                    f"http://{st.host}:{svc.port}/")
        out.append(svc)
    if missing and secrets:
        raise StackError("set in the environment (as for `docker compose`): " + "; ".join(dict.fromkeys(missing)))
    return Plan(home=home, host=st.host, services=out, compose=compose,
                compose_dir=(cfg.root / COMPOSE_FILE).parent.resolve())


def _local_command(argv: list[str], host: str, port: int | None) -> list[str]:
    """Compose's `mlflow ...`/`prefect ...` with this Python, listening on `host` and the service's local port."""
    out = [sys.executable, "-m", argv[0]]
    rest = iter(argv[1:])
    for arg in rest:
        out.append(arg)
        if arg == "--host":
            out.append(host)
            next(rest, None)
        elif arg == "--port" and port is not None:
            out.append(str(port))
            next(rest, None)
    return out


def client_env(p: Plan, worker: str = "cpu-worker") -> dict[str, str]:
    """What a client of the stack sets: the environment compose gives a worker, with secret values written as
    references to the variables that hold them (printable)."""
    raw = p.compose["services"][worker].get("environment") or {}
    svc = p.service(worker)
    out = {}
    for key in raw:
        if key in svc.secrets:
            out[key] = "${" + _VAR.search(str(raw[key])).group(1) + "}"
        else:
            out[key] = svc.env[key]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Processes


def _state_path(p: Plan) -> Path:
    return p.home / STATE_FILE


def read_state(p: Plan) -> dict:
    import json

    path = _state_path(p)
    return json.loads(path.read_text()) if path.is_file() else {"services": {}}


def _alive(entry: dict | None):
    """The psutil.Process of a recorded service, if that very process still runs."""
    import psutil

    if not entry:
        return None
    try:
        proc = psutil.Process(entry["pid"])
        if abs(proc.create_time() - entry["created"]) > 1 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.Error:
        return None


def postgres_bin() -> Path:
    """The folder of Debian's PostgreSQL server programs (the newest version installed)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise StackError("PostgreSQL server binaries not found: install Debian's postgresql package "
                         "(apt-get install postgresql)")
    return Path(found[-1]).parent


def _as_postgres_user(folder: Path) -> list[str]:
    """PostgreSQL refuses to run as root: then it runs as the `postgres` user, which must own its folder."""
    if os.geteuid() != 0:
        return []
    as_user = ["runuser", "-u", "postgres", "--"]
    for path in [folder, *folder.rglob("*")]:
        shutil.chown(path, "postgres", "postgres")
    if subprocess.run([*as_user, "test", "-w", str(folder)], capture_output=True).returncode != 0:
        raise StackError(f"postgres: running as root, PostgreSQL runs as the user `postgres`, which cannot reach "
                         f"{folder}: set stack.home to a folder whose parents it can enter (e.g. under /var/tmp)")
    return as_user


def _base_env(p: Plan) -> dict[str, str]:
    """What every service starts from: the shell's environment without any secret (compose's variables, anything
    named like a credential) and without client settings (a server must not talk to another stack, or as another
    user); each service then gets its own compose `environment`, as in a container."""
    drop = {m.group(1) for m in _VAR.finditer(yaml.safe_dump(p.compose))}
    env = {k: v for k, v in os.environ.items()
           if k not in drop and not SECRET_NAME.search(k) and not _CLIENT_SETTING.match(k)}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env[STACK_MARKER] = str(p.home)
    return env


def _spawn(p: Plan, svc: Service, argv: list[str], env: dict[str, str], cwd: Path) -> dict:
    import psutil

    log = p.home / "logs" / f"{svc.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return {"pid": proc.pid, "created": psutil.Process(proc.pid).create_time(), "port": svc.port,
            "log": str(log.relative_to(p.home))}


def _wait(p: Plan, svc: Service, entry: dict, ready, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _alive(entry) is None:
            raise StackError(f"{svc.name}: exited while starting; its log ({p.home / entry['log']}) ends:\n"
                             + _tail(p.home / entry["log"]))
        if ready():
            return
        time.sleep(0.3)
    raise StackError(f"{svc.name}: no answer in {timeout:.0f} s; its log ({p.home / entry['log']}) ends:\n"
                     + _tail(p.home / entry["log"]))


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else "(no log)"


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
        return True
    except urllib.error.HTTPError:  # it answered
        return True
    except OSError:
        return False


def _start_postgres(p: Plan, svc: Service, env: dict[str, str], timeout: float) -> dict:
    bindir = postgres_bin()
    folder = p.home / "postgres"
    data = folder / "data"
    user = svc.env.get("POSTGRES_USER", "postgres")
    password = svc.env.get("POSTGRES_PASSWORD", "")
    fresh = not (data / "PG_VERSION").is_file()
    if fresh:
        shutil.rmtree(data, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        pwfile = folder / ".pwfile"
        pwfile.touch(mode=0o600)
        pwfile.write_text(password + "\n")
        as_user = _as_postgres_user(folder)
        try:
            done = subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", user, "-A",
                                   "scram-sha-256", f"--pwfile={pwfile}"], capture_output=True, text=True, env=env)
        finally:
            pwfile.unlink(missing_ok=True)
        if done.returncode != 0:
            raise StackError(f"postgres: initdb failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    as_user = _as_postgres_user(folder)
    entry = _spawn(p, svc, [*as_user, str(bindir / "postgres"), "-D", str(data), "-h", p.host, "-p", str(svc.port),
                            "-k", str(folder)], env, folder)

    def ready() -> bool:
        return subprocess.run([str(bindir / "pg_isready"), "-h", p.host, "-p", str(svc.port)],
                              capture_output=True).returncode == 0

    _wait(p, svc, entry, ready, timeout)
    if fresh:  # what the image's entrypoint does on an empty volume: POSTGRES_DB, then the init scripts
        psql = [str(bindir / "psql"), "-h", p.host, "-p", str(svc.port), "-U", user, "-v", "ON_ERROR_STOP=1", "-q"]
        client = {**env, "PGPASSWORD": password}
        db = svc.env.get("POSTGRES_DB", user)
        steps = [[*psql, "-d", "postgres", "-c", f'CREATE DATABASE "{db}"']]
        service = p.compose["services"][svc.name]
        for volume in service.get("volumes", []):
            source, _, target = str(volume).partition(":")
            if target.startswith("/docker-entrypoint-initdb.d/") and source.endswith(".sql"):
                steps.append([*psql, "-d", db, "-f", str(p.compose_dir / source)])
        for step in steps:
            done = subprocess.run(step, env=client, capture_output=True, text=True)
            if done.returncode != 0:
                raise StackError(f"postgres: {' '.join(step[-2:])} failed: {done.stderr.strip()}")
    else:  # a stack.home from before a database was added to the init scripts (e.g. mlflow_auth): create it
        psql = [str(bindir / "psql"), "-h", p.host, "-p", str(svc.port), "-U", user, "-d", "postgres", "-q", "-t", "-A"]
        client = {**env, "PGPASSWORD": password}
        have = set(subprocess.run([*psql, "-c", "SELECT datname FROM pg_database"], env=client, capture_output=True,
                                  text=True).stdout.split())
        for volume in p.compose["services"][svc.name].get("volumes", []):
            source, _, target = str(volume).partition(":")
            if target.startswith("/docker-entrypoint-initdb.d/") and source.endswith(".sql"):
                for db in re.findall(r"CREATE DATABASE (\w+)", (p.compose_dir / source).read_text()):
                    if db not in have:
                        subprocess.run([*psql, "-c", f'CREATE DATABASE "{db}"'], env=client, capture_output=True)
    return entry


def _s3(p: Plan, svc: Service, proc=None):
    """A boto3 client of the S3 service `svc`, with the key compose gives MinIO (the only one it accepts). `down`
    may run without the secrets: then the key is read from the running server's environment (`proc`), which the
    user stopping it can read anyway."""
    import boto3

    env = svc.env
    if not env.get("MINIO_ROOT_PASSWORD") and proc is not None:
        env = proc.environ()
    return boto3.client("s3", endpoint_url=p.url(svc.name), region_name="us-east-1",
                        aws_access_key_id=env.get("MINIO_ROOT_USER") or "arft",
                        aws_secret_access_key=env.get("MINIO_ROOT_PASSWORD") or "unset")


S3_USER = "arft-stack"


def serve_s3(host: str, port: int) -> None:
    """The native stack's S3 server: moto with an IAM check on every request, where the only key is the one compose
    gives MinIO (MINIO_ROOT_USER / MINIO_ROOT_PASSWORD, set up in this process before it listens); its admin API
    (/moto-api: reset or dump every bucket) answers 403 and no response allows another origin (no CORS)."""
    import json

    key_id, secret = os.environ.get("MINIO_ROOT_USER"), os.environ.get("MINIO_ROOT_PASSWORD")
    if not key_id or not secret:
        raise SystemExit("serve_s3: MINIO_ROOT_USER and MINIO_ROOT_PASSWORD must be set")
    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"  # read by moto.settings at import: check from the first request
    os.environ["MOTO_DISABLE_GLOBAL_CORS"] = "true"
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.iam.models import iam_backends
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import run_simple

    iam = iam_backends[DEFAULT_ACCOUNT_ID]["aws"]
    iam.create_user("us-east-1", S3_USER)
    key = iam.create_access_key(S3_USER)
    iam.access_keys.pop(key.physical_resource_id, None)
    key.access_key_id, key.secret_access_key = key_id, secret  # moto generates keys; the stack's is given
    iam.access_keys[key.physical_resource_id] = key
    iam.put_user_policy(S3_USER, "s3", json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    app = DomainDispatcherApplication(create_backend_app)

    def guarded(environ, start_response):
        if environ.get("PATH_INFO", "").startswith("/moto-api"):
            start_response("403 Forbidden", [("Content-Type", "text/plain")])
            return [b"no admin API on the stack's S3 server\n"]
        if "HTTP_AUTHORIZATION" not in environ:  # unsigned (or presigned): moto would fail with a 500
            start_response("403 Forbidden", [("Content-Type", "application/xml")])
            return [b"<Error><Code>AccessDenied</Code><Message>requests must be signed</Message></Error>"]
        return app(environ, start_response)

    run_simple(host, port, guarded, threaded=True)


def _create_buckets(p: Plan, svc: Service) -> None:
    s3_name = next(name for name in p.compose["services"][svc.name].get("depends_on") or {}
                   if p.service(name).kind == "s3")
    s3 = _s3(p, p.service(s3_name))
    have = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    for bucket in svc.env.get("BUCKETS", "").split():
        if bucket not in have:
            s3.create_bucket(Bucket=bucket)


# moto holds its objects in memory; the stack keeps them in stack.home/s3/<bucket>/<key> between a `down` and the
# next `up`, as compose's MinIO volume does.
def _save_objects(p: Plan, svc: Service, proc=None) -> int:
    s3, folder = _s3(p, svc, proc), p.home / "s3"
    staging = p.home / "s3.saving"
    shutil.rmtree(staging, ignore_errors=True)
    count = 0
    for bucket in (b["Name"] for b in s3.list_buckets().get("Buckets", [])):
        (staging / bucket).mkdir(parents=True)
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                target = staging / bucket / obj["Key"]
                target.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, obj["Key"], str(target))
                count += 1
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)  # the saved copy is replaced only once this one is whole
    return count


def _restore_objects(p: Plan, svc: Service) -> int:
    s3, folder = _s3(p, svc), p.home / "s3"
    count = 0
    for bucket in sorted(d for d in folder.iterdir() if d.is_dir()) if folder.is_dir() else []:
        s3.create_bucket(Bucket=bucket.name)
        for path in sorted(f for f in bucket.rglob("*") if f.is_file()):
            s3.upload_file(str(path), bucket.name, path.relative_to(bucket).as_posix())
            count += 1
    return count


def _worker_ready(log: Path, offset: int):
    def ready() -> bool:
        return log.is_file() and b" started!" in log.read_bytes()[offset:]  # (offset: bytes, not characters)

    return ready


def up(cfg: Config, echo=print) -> Plan:
    """Start every service that is not running, in compose's order, each once it answers; then the buckets."""
    p = plan(cfg)
    p.home.mkdir(parents=True, exist_ok=True)
    state = read_state(p)
    env0 = _base_env(p)
    timeout = cfg.stack.start_timeout_s
    for svc in p.services:
        entry = state["services"].get(svc.name)
        if svc.kind not in ("buckets", "oneshot") and _alive(entry):
            echo(f"{svc.name}: running (pid {entry['pid']})")
            continue
        env = {**env0, **svc.env}
        for path, content in svc.files.items():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).touch(mode=0o600)
            Path(path).write_text(content)
        if svc.kind == "postgres":
            entry = _start_postgres(p, svc, env, timeout)
        elif svc.kind == "buckets":
            _create_buckets(p, svc)
            echo(f"{svc.name}: buckets {svc.env.get('BUCKETS', '').split()} ready")
            continue
        elif svc.kind == "oneshot":
            _run_oneshot(p, svc, env, timeout)
            echo(f"{svc.name}: done")
            continue
        elif svc.kind == "s3":
            entry = _spawn(p, svc, [sys.executable, "-m", "arft_core.stack", "serve-s3", p.host, str(svc.port)],
                           env, p.home)
            _wait(p, svc, entry, lambda: _answers(svc.health), timeout)
            if (p.home / "s3").is_dir():
                echo(f"{svc.name}: {_restore_objects(p, svc)} objects restored from {p.home / 's3'}")
        else:
            log = p.home / "logs" / f"{svc.name}.log"
            offset = log.stat().st_size if log.is_file() else 0
            (svc.cwd or p.home).mkdir(parents=True, exist_ok=True)
            entry = _spawn(p, svc, svc.argv, env, svc.cwd or p.home)
            ready = (lambda: _answers(svc.health)) if svc.health else _worker_ready(log, offset)
            _wait(p, svc, entry, ready, timeout)
        state["services"][svc.name] = entry
        write_json_atomic(_state_path(p), state)
        where = f" on {p.host}:{svc.port}" if svc.port else ""
        echo(f"{svc.name}: started{where} (pid {entry['pid']}, log {p.home / entry['log']})")
    return p


def _run_oneshot(p: Plan, svc: Service, env: dict[str, str], timeout: float) -> None:
    log = p.home / "logs" / f"{svc.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        try:
            done = subprocess.run(svc.argv, env=env, cwd=svc.cwd or p.home, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise StackError(f"{svc.name}: not done in {timeout:.0f} s; its log ({log}) ends:\n{_tail(log)}")
    if done.returncode != 0:
        raise StackError(f"{svc.name}: failed (exit {done.returncode}); its log ({log}) ends:\n{_tail(log)}")


def status(cfg: Config) -> list[dict]:
    """Per service: name, running, pid, port (one-shot services are left out)."""
    p = plan(cfg, secrets=False)
    state = read_state(p)
    rows = []
    for svc in p.services:
        if svc.kind in ("buckets", "oneshot"):
            continue
        entry = state["services"].get(svc.name)
        proc = _alive(entry)
        rows.append({"service": svc.name, "running": proc is not None, "pid": entry["pid"] if proc else None,
                     "port": svc.port})
    return rows


def leftovers(home: Path) -> list:
    """Processes of the stack rooted at `home` that still run: those carrying its marker, and PostgreSQL's (whose
    command line names its data folder)."""
    import psutil

    home = home.resolve()
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid == os.getpid():
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if str(home) in " ".join(proc.info["cmdline"] or []) or proc.environ().get(STACK_MARKER) == str(home):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _stop_tree(proc, sig: int, grace_s: float) -> None:
    import psutil

    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return
    for q in procs:
        try:
            q.send_signal(sig)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for q in alive:
        try:
            q.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def down(cfg: Config, volumes: bool = False, echo=print) -> None:
    """Stop the services in reverse order (each with what it started), then anything else carrying the stack's
    marker; with `volumes`, delete the stack's folder (PostgreSQL's databases, the S3 objects) too. The S3 server
    holds its objects in memory: they are saved to stack.home/s3 first, and the next `up` puts them back."""
    p = plan(cfg, secrets=False)
    state = read_state(p)
    for svc in reversed(p.services):
        proc = _alive(state["services"].get(svc.name))
        if proc is None:
            continue
        if svc.kind == "s3" and not volumes:
            try:
                echo(f"{svc.name}: {_save_objects(p, svc, proc)} objects saved to {p.home / 's3'}")
            except Exception as exc:  # stop the stack all the same; the last saved copy stays
                echo(f"{svc.name}: could not save its objects ({exc}); {p.home / 's3'} keeps the previous copy")
        # PostgreSQL: SIGINT is its "fast" shutdown (SIGTERM waits for clients to leave).
        _stop_tree(proc, signal.SIGINT if svc.kind == "postgres" else signal.SIGTERM, 20)
        echo(f"{svc.name}: stopped")
    rest = leftovers(p.home)
    for proc in rest:
        _stop_tree(proc, signal.SIGTERM, 10)
    if rest:
        echo(f"stopped {len(rest)} more process(es) of the stack")
    state["services"] = {}
    if p.home.is_dir():
        write_json_atomic(_state_path(p), state)
    if volumes:
        shutil.rmtree(p.home, ignore_errors=True)
        echo(f"deleted {p.home}")


if __name__ == "__main__":  # the native stack's S3 server: python -m arft_core.stack serve-s3 HOST PORT
    if sys.argv[1:2] != ["serve-s3"] or len(sys.argv) != 4:
        raise SystemExit("usage: python -m arft_core.stack serve-s3 HOST PORT")
    serve_s3(sys.argv[2], int(sys.argv[3]))
