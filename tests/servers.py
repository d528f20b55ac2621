"""Real servers on loopback for the tests: PostgreSQL (Debian's packages) with `mlflow server` on top, and
`prefect server start`, each started as its own process and stopped afterwards; and `loopback_http`, an in-process
HTTP server that records what it receives and answers as scripted (fake web APIs)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def tracking_store(uri: str) -> Iterator[None]:
    """MLflow pointed at `uri` for this block only: MLFLOW_TRACKING_URI (restored afterwards), no stale global URI,
    and sys.path restored (loading a model puts its code folder first)."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setattr(tracking_utils, "_tracking_uri", None)
        mp.setattr(registry_utils, "_registry_uri", None)
        mp.setattr(sys, "path", list(sys.path))
        yield


def model_server(argv: list[str], env: dict[str, str], port: int, log: Path,
                 timeout: float = 120.0) -> subprocess.Popen:
    """Start a model server (`mlflow models serve`, `arft serve`) in its own session with this environment's bin
    first on PATH (`mlflow models serve` execs uvicorn from it), logging to `log`; return once it answers /ping on
    `port`, failing with the log's tail when it exits or takes longer than `timeout`."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**env, "PATH": os.pathsep.join([bin_dir, env.get("PATH", "")])}
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None or time.perf_counter() - started > timeout:
                proc.kill()
                pytest.fail(f"the model server did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url}: no answer in {timeout} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def postgres_bin_or_skip() -> Path:
    """Debian's PostgreSQL server programs; skips the test when the package is not installed (`.ci/run` installs
    it)."""
    from arft_core.stack import StackError, postgres_bin

    try:
        return postgres_bin()
    except StackError as exc:
        pytest.skip(str(exc))


@contextmanager
def postgres() -> Iterator[str]:
    """A throw-away PostgreSQL cluster on a loopback port; yields its SQLAlchemy URL (database `mlflow`). Skips the
    test when Debian's postgresql package is not installed (`.ci/run` installs it)."""
    bindir = postgres_bin_or_skip()
    # Not under pytest's tmp_path: PostgreSQL refuses to run as root, and its user must reach the folder.
    base = Path(tempfile.mkdtemp(prefix="arft-pg-"))
    data, log = base / "data", base / "postgres.log"
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        os.chmod(base, 0o755)
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "arft"], check=True,
                   capture_output=True)
    port = free_port()
    with log.open("w") as out:
        proc = subprocess.Popen([*as_user, str(bindir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p",
                                 str(port), "-k", str(base)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                             capture_output=True).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "arft", "mlflow"],
                       check=True, capture_output=True)
        yield f"postgresql://arft@127.0.0.1:{port}/mlflow"
    finally:
        stop(proc)
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def mlflow_server(backend_uri: str, artifacts: Path) -> Iterator[str]:
    """`mlflow server` over `backend_uri`, proxying artifacts to `artifacts` (as the team stack does with MinIO)."""
    port = free_port()
    log = artifacts.parent / f"mlflow-server-{port}.log"
    artifacts.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        # No background job runner (five extra processes): the tests run no MLflow server jobs.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
                                 "--artifacts-destination", artifacts.as_uri(), "--host", "127.0.0.1",
                                 "--port", str(port), "--workers", "1"], stdout=out, stderr=subprocess.STDOUT,
                                env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc, log)
        yield url
    finally:
        stop(proc)


@contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """`prefect server start` (all services, the scheduler polling every second); yields its API URL."""
    port = free_port()
    home.mkdir(parents=True, exist_ok=True)
    log = home / "server.log"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(f"{url}/health", proc, log)
        yield url
    finally:
        stop(proc)


@dataclass
class Recorded:
    """One request a `loopback_http` server received; header names lowercased."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class LoopbackHTTP:
    url: str  # http://127.0.0.1:PORT, no trailing slash
    requests: list[Recorded] = field(default_factory=list)


# What a `loopback_http` server answers: (status, headers, body).
Respond = Callable[[Recorded], tuple[int, dict[str, str], bytes]]


@contextmanager
def loopback_http(respond: Respond) -> Iterator[LoopbackHTTP]:
    """A threaded HTTP server on a free loopback port that records every request (any method) and answers with
    `respond(request)`; stopped afterwards."""
    server_state: LoopbackHTTP

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            request = Recorded(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                               self.rfile.read(length) if length else b"")
            server_state.requests.append(request)  # list.append is atomic: safe across handler threads
            status, headers, body = respond(request)
            try:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:  # the client gave up
                pass

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _serve

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server_state = LoopbackHTTP(url=f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server_state
    finally:
        server.shutdown()
        server.server_close()
