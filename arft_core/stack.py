"""The team stack of infra/compose.yaml as local processes on loopback (`arft stack up|down|status|env`).

The compose file is the one source: its services, their order (depends_on), commands, environment and buckets.
Natively, each container host name becomes a loopback port, and each image a local program: `postgres` runs
Debian's PostgreSQL server, `minio` an S3 server (moto; its objects are saved in the stack's folder from a `down`
to the next `up`), `minio-buckets` creates the same buckets through the S3 API, and the services with an `mlflow`
or `prefect` command run that command with this environment's Python.
Secrets come from the environment, as compose's `${VAR:?}` takes them; they reach a service through its environment,
never its command line, the state file or a log line of ours.

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


class StackError(RuntimeError):
    pass


@dataclass
class Service:
    """One compose service as a local process: `argv` with `env`, answering on `port` (None: no port)."""

    name: str
    kind: str  # postgres | s3 | buckets | command
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int | None = None
    cwd: Path | None = None
    health: str | None = None  # URL that answers once the service is up
    secrets: set[str] = field(default_factory=set)  # names of the environment variables holding secrets


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
    """(host port, container port) of the service's first published port."""
    for spec in service.get("ports", []):
        host, _, container = str(spec).rpartition(":")
        return int(host or container), int(container)
    return None


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
    missing: list[str] = []
    out = []
    for name in _topological(services):
        service = services[name]
        kind = _kind(service)
        env = {k: local(_interpolate(str(v), f"{name}.environment.{k}", missing))
               for k, v in (service.get("environment") or {}).items()}
        secret_keys = {k for k, v in (service.get("environment") or {}).items()
                       if any(m.group(2) == "?" for m in _VAR.finditer(str(v)))}
        command = service.get("command") or []
        argv = command.split() if isinstance(command, str) else [str(a) for a in command]
        argv = [local(_interpolate(a, f"{name}.command", missing)) for a in argv]
        svc = Service(name, kind, env=env, port=ports.get(name), secrets=secret_keys)
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
    # Client settings of the shell are not the services' (a server must not talk to another stack).
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
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
    return entry


def _s3(p: Plan, svc: Service):
    """A boto3 client of the S3 service `svc` (moto accepts the credentials compose gives MinIO)."""
    import boto3

    return boto3.client("s3", endpoint_url=p.url(svc.name), region_name="us-east-1",
                        aws_access_key_id=svc.env.get("MINIO_ROOT_USER") or "arft",
                        aws_secret_access_key=svc.env.get("MINIO_ROOT_PASSWORD") or "unset")  # (down: not needed)


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
def _save_objects(p: Plan, svc: Service) -> int:
    s3, folder = _s3(p, svc), p.home / "s3"
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
        if svc.kind != "buckets" and _alive(entry):
            echo(f"{svc.name}: running (pid {entry['pid']})")
            continue
        env = {**env0, **svc.env}
        if svc.kind == "postgres":
            entry = _start_postgres(p, svc, env, timeout)
        elif svc.kind == "buckets":
            _create_buckets(p, svc)
            echo(f"{svc.name}: buckets {svc.env.get('BUCKETS', '').split()} ready")
            continue
        elif svc.kind == "s3":
            entry = _spawn(p, svc, [sys.executable, "-m", "moto.server", "-H", p.host, "-p", str(svc.port)],
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


def status(cfg: Config) -> list[dict]:
    """Per service: name, running, pid, port (one-shot services are left out)."""
    p = plan(cfg, secrets=False)
    state = read_state(p)
    rows = []
    for svc in p.services:
        if svc.kind == "buckets":
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
                echo(f"{svc.name}: {_save_objects(p, svc)} objects saved to {p.home / 's3'}")
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
