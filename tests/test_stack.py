"""The team stack, run for real: `arft stack up` starts PostgreSQL, S3 (moto), `mlflow server`, `prefect server start`
and a CPU-pool and a GPU-pool process worker from infra/compose.yaml, as local processes. The retraining chain fires
on the server's schedule on the CPU worker, its train stage is dispatched to the GPU pool's worker (a CPU process
here, playing the GPU machine), which is killed while it trains: the automation marks that run Crashed, the chain's
retry trains on the restarted worker, evaluates, registers in MLflow (PostgreSQL, artifacts on S3), promotes, commits
dvc.lock and pushes the outputs to the S3 remote; a fresh clone pulls them back. The next firing skips training.
`arft stack down` leaves no process behind. Every service is authenticated: a client without the stack's credentials
is refused by Prefect, MLflow and S3, and each process holds only the secrets compose gives its service."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import copy_project
from servers import free_port, postgres_bin_or_skip

pytestmark = [pytest.mark.slow, pytest.mark.stack]

SECRETS = {"POSTGRES_PASSWORD": "pg-secret-7f3a", "MINIO_ROOT_PASSWORD": "s3-secret-91cd",
           "PREFECT_AUTH_STRING": "arft:pf-secret-55ab", "MLFLOW_ADMIN_PASSWORD": "mlf-admin-secret-3c1e",
           "MLFLOW_WORKER_PASSWORD": "mlf-worker-secret-8d2f", "MLFLOW_FLASK_SECRET_KEY": "flask-secret-6b0a",
           "SERPER_API_KEY": "serper-secret-4e7c", "BRAVE_API_KEY": "brave-secret-2a9d"}
# The secrets each service's processes hold (compose's per-service `environment`; docs/deployment.md's table).
WORKER_SECRETS = {"MINIO_ROOT_PASSWORD", "PREFECT_AUTH_STRING", "MLFLOW_WORKER_PASSWORD", "SERPER_API_KEY",
                  "BRAVE_API_KEY"}
HELD = {"postgres": {"POSTGRES_PASSWORD"}, "minio": {"MINIO_ROOT_PASSWORD"},
        "mlflow": {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SECRET_KEY"},
        "prefect": {"POSTGRES_PASSWORD", "PREFECT_AUTH_STRING"}, "cpu-worker": WORKER_SECRETS,
        "gpu-worker": WORKER_SECRETS}


def _run(*argv: str, cwd: Path, env: dict) -> str:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{argv} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _flow_runs(client, deployment: str) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter
    from prefect.client.schemas.filters import FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    flow, name = deployment.split("/")
    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])),
                                 flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                                     not_any_=[StateType.SCHEDULED, StateType.CANCELLED]))),
                                 sort=FlowRunSort.START_TIME_ASC)
    return [r for r in runs if r.start_time is not None]


def _wait(what: str, check, timeout: float, logs: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(2)
    tails = {p.name: p.read_text(errors="replace")[-3000:] for p in sorted(logs.glob("*worker.log"))}
    raise AssertionError(f"timed out waiting for {what}:\n" + "\n".join(f"--- {k}\n{v}" for k, v in tails.items()))


def _status(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None) -> int:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json",
                                                                             **(headers or {})})
    try:
        return urllib.request.urlopen(request, timeout=30).status
    except urllib.error.HTTPError as exc:
        return exc.code


def _basic(user_pass: str) -> dict:
    import base64

    return {"Authorization": "Basic " + base64.b64encode(user_pass.encode()).decode()}


def _check_authentication(env: dict, state: dict) -> None:
    """Without the stack's credentials nothing is read or written; each process holds only its service's secrets."""
    import boto3
    import botocore.exceptions
    import psutil

    prefect = env["PREFECT_API_URL"]
    assert _status(f"{prefect}/health") == 200  # (probes stay open)
    for headers in ({}, _basic("arft:wrong")):
        for path, body in (("/flows/", b'{"name": "x"}'), ("/deployments/", b'{"name": "x", "flow_id": '
                           b'"00000000-0000-0000-0000-000000000000"}'), ("/flow_runs/", b'{"flow_id": '
                           b'"00000000-0000-0000-0000-000000000000"}'), ("/work_pools/filter", b"{}")):
            assert _status(prefect + path, "POST", body, headers) == 401, (path, headers)
    assert _status(f"{prefect}/work_pools/filter", "POST", b"{}", _basic(SECRETS["PREFECT_AUTH_STRING"])) == 200

    mlflow_url = env["MLFLOW_TRACKING_URI"]
    wrong = _basic("arft-worker:wrong")
    for headers in ({}, wrong):
        assert _status(f"{mlflow_url}/api/2.0/mlflow/experiments/search?max_results=5", headers=headers) == 401
        assert _status(f"{mlflow_url}/api/2.0/mlflow/experiments/create", "POST", b'{"name": "x"}', headers) == 401
        assert _status(f"{mlflow_url}/api/2.0/mlflow-artifacts/artifacts/1/r/artifacts/model/python_model.pkl",
                       "PUT", b"not a model", headers) == 401
    worker = _basic(f"arft-worker:{SECRETS['MLFLOW_WORKER_PASSWORD']}")
    assert _status(f"{mlflow_url}/api/2.0/mlflow/experiments/search?max_results=5", headers=worker) == 200
    # The workers' user is no admin: it cannot create users (or grant itself anything).
    assert _status(f"{mlflow_url}/api/2.0/mlflow/users/create", "POST", b'{"username": "x", "password": '
                   b'"0123456789abcdef"}', worker) == 403

    s3_url = env["AWS_ENDPOINT_URL"]
    for key, secret in (("arft", "wrong"), ("someone", SECRETS["MINIO_ROOT_PASSWORD"])):
        s3 = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id=key,
                          aws_secret_access_key=secret)
        with pytest.raises(botocore.exceptions.ClientError) as refused:
            s3.list_objects_v2(Bucket="mlflow")
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert _status(f"{s3_url}/mlflow") == 403 and _status(f"{s3_url}/moto-api/reset", "POST") == 403

    for name, held in HELD.items():
        proc = psutil.Process(state[name]["pid"])
        for p in [proc, *proc.children(recursive=True)]:
            try:
                environ = "\0".join(f"{k}={v}" for k, v in p.environ().items())
            except psutil.Error:  # (a PostgreSQL backend that just ended)
                continue
            found = {k for k, v in SECRETS.items() if v in environ}
            # The service's main process holds exactly its secrets; what it starts holds no more.
            assert found == held if p is proc else found <= held, (name, p.pid, found)


def _logs(client, run) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + 60
    while True:
        text = "\n".join(log.message for log in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(
            any_=[run.id]))))
        if "Finished in state" in text or time.monotonic() > deadline:
            return text
        time.sleep(1)


def test_team_stack_retrains_on_the_gpu_pool_and_pushes_to_s3(tmp_path, monkeypatch):
    import boto3
    import mlflow
    import psutil
    from prefect.client.orchestration import SyncPrefectClient

    from arft_core.stack import leftovers

    postgres_bin_or_skip()
    # Not under pytest's tmp_path when root: PostgreSQL then runs as `postgres`, which must reach its folder.
    home = Path(tempfile.mkdtemp(prefix="arft-stack-")) / "stack"
    home.parent.chmod(0o755)
    ports = {name: free_port() for name in ("postgres", "minio", "mlflow", "prefect")}
    project = copy_project(tmp_path / "project", {
        "retrain": {"cron": "* * * * * */15", "train_dispatch": "deployment", "record_lock": "commit",
                    "dvc_remote": "minio", "heartbeat_seconds": 30, "crash_after_seconds": 40},
        "stack": {"home": str(home), "ports": ports}})
    git_id = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    base = {**{k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")},
            **SECRETS, **git_id,
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            # Test pace: the scheduler and the workers poll every second.
            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1", "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    arft_cmd = [sys.executable, "-m", "arft_core.cli"]
    up = _run(*arft_cmd, "stack", "up", cwd=project, env=base)
    try:
        assert "gpu-worker: started" in up and "cpu-worker: started" in up
        exports = _run(*arft_cmd, "stack", "env", cwd=project, env=base)
        assert SECRETS["MINIO_ROOT_PASSWORD"] not in exports and "${MINIO_ROOT_PASSWORD}" in exports
        client_env = dict(line.removeprefix("export ").split("=", 1) for line in exports.splitlines())
        assert not any(secret in exports for secret in SECRETS.values())
        # What `eval "$(arft stack env)"` gives a shell holding the secrets.
        client_env = {k: re.sub(r"\$\{(\w+)\}", lambda m: base[m.group(1)], v.strip('"').strip("'"))
                      for k, v in client_env.items()}
        assert client_env["AWS_SECRET_ACCESS_KEY"] == SECRETS["MINIO_ROOT_PASSWORD"]
        assert client_env["MLFLOW_TRACKING_USERNAME"] == "arft-worker"
        env = {**base, **client_env}
        s3_url = client_env["AWS_ENDPOINT_URL"]
        assert s3_url == f"http://127.0.0.1:{ports['minio']}"
        state = json.loads((home / "stack.json").read_text())["services"]
        _check_authentication(env, state)
        # This test's own MLflow client (below) is the workers' user too.
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "arft-worker")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRETS["MLFLOW_WORKER_PASSWORD"])
        # This machine's address of the team remote (compose's is localhost:9000): local config, not committed.
        _run(sys.executable, "-m", "dvc", "remote", "modify", "--local", "minio", "endpointurl", s3_url, cwd=project,
             env=env)
        deployed = _run(*arft_cmd, "deploy", cwd=project, env=env)
        assert "arft-train/gpu -> pool gpu" in deployed and "automation" in deployed

        with SyncPrefectClient(env["PREFECT_API_URL"], auth_string=SECRETS["PREFECT_AUTH_STRING"]) as client:
            # The first firing sends training to the GPU pool; its worker dies mid-training (the machine is lost).
            killed = _wait("the training flow run on the GPU pool", lambda: next(
                (r for r in _flow_runs(client, "arft-train/gpu") if r.state.is_running()), None), 900, home / "logs")
            time.sleep(5)
            worker = psutil.Process(state["gpu-worker"]["pid"])
            victims = [worker, *worker.children(recursive=True)]
            assert any("prefect.engine" in " ".join(p.cmdline()) for p in victims[1:])  # the training run's process
            for p in victims:
                p.kill()
            psutil.wait_procs(victims, timeout=10)
            crashed = _wait("the killed run to be marked Crashed", lambda: (lambda r: r if r.state.is_crashed()
                            else None)(client.read_flow_run(killed.id)), 180, home / "logs")
            assert "no heartbeat for 40 s" in (crashed.state.message or "")
            # A replacement worker comes up; the chain's retry trains on it.
            again = _run(*arft_cmd, "stack", "up", cwd=project, env=base)
            assert "gpu-worker: started" in again and "mlflow: running" in again

            finished = _wait("two completed retraining firings", lambda: (lambda rs: rs if len(rs) >= 2 else None)(
                [r for r in _flow_runs(client, "arft-retrain/scheduled") if r.state.is_final()]), 900, home / "logs")
            first, second = finished[:2]
            assert first.state.is_completed() and second.state.is_completed(), (first.state, second.state)
            assert first.auto_scheduled and second.auto_scheduled
            first_logs, second_logs = _logs(client, first), _logs(client, second)
            trains = _flow_runs(client, "arft-train/gpu")
            assert [r.state.type.value for r in trains] == ["CRASHED", "COMPLETED"]
            gpu_log = (home / "logs" / "gpu-worker.log").read_text()
            cpu_log = (home / "logs" / "cpu-worker.log").read_text()
            for run in trains:  # both ran on the GPU pool's worker, none on the CPU worker
                assert run.work_pool_name == "gpu" and str(run.id) in gpu_log and str(run.id) not in cpu_log
            assert str(first.id) in cpu_log and str(first.id) not in gpu_log
            # The chain's train task failed on the crashed run, and its retry (the second run) completed.
            from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

            dispatch = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(
                any_=["train-on-gpu-pool"])))
            assert len(dispatch) == 1 and dispatch[0].run_count == 2 and dispatch[0].state.is_completed()
        assert (f"stage 'train' failed on the GPU pool: flow run {killed.name} ended Crashed('no heartbeat for 40 s"
                in cpu_log), cpu_log[-5000:]
        assert "'train': 'ran'" in first_logs and "'promote': 'ran'" in first_logs
        assert "new dvc.lock recorded in" in first_logs and "dvc push to remote 'minio'" in first_logs
        assert "inputs unchanged since the last run: skipping training" in second_logs
        assert "changed:" not in second_logs

        # MLflow on PostgreSQL: the registered version's artifacts are objects in the S3 bucket.
        mlf = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        version = mlf.get_model_version_by_alias("arft-agent", "candidate")
        model = mlf.get_logged_model(version.model_id or version.source.removeprefix("models:/"))
        prefix = model.artifact_location.split("mlflow-artifacts:/", 1)[1].strip("/") + "/"
        s3 = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id="arft",
                          aws_secret_access_key=SECRETS["MINIO_ROOT_PASSWORD"])
        keys = {o["Key"][len(prefix):] for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket="mlflow", Prefix=prefix) for o in page.get("Contents", [])}
        assert "MLmodel" in keys and any(k.endswith(".safetensors") for k in keys), sorted(keys)

        # ... and the registry behind the server is the stack's PostgreSQL.
        import psycopg2

        with psycopg2.connect(host="127.0.0.1", port=ports["postgres"], user="arft", dbname="mlflow",
                              password=SECRETS["POSTGRES_PASSWORD"]) as db, db.cursor() as cur:
            cur.execute("SELECT version FROM model_versions WHERE name = 'arft-agent'")
            assert [str(v) for (v,) in cur.fetchall()] == [str(version.version)]

        # dvc.lock was committed; a fresh clone pulls models/trained from the S3 remote with dvc.lock's hashes.
        assert "dvc.lock" in _run("git", "show", "--stat", "HEAD", cwd=project, env=env)
        fresh = tmp_path / "clone"
        _run("git", "clone", "-q", str(project), str(fresh), cwd=tmp_path, env=env)
        _run(sys.executable, "-m", "dvc", "remote", "modify", "--local", "minio", "endpointurl", s3_url, cwd=fresh,
             env=env)
        _run(sys.executable, "-m", "dvc", "pull", "--remote", "minio", "models/trained", cwd=fresh, env=env)
        lock = yaml.safe_load((fresh / "dvc.lock").read_text())
        out = next(o for o in lock["stages"]["train"]["outs"] if o["path"] == "models/trained")
        listing = next((fresh / ".dvc" / "cache" / "files" / "md5").glob(f"{out['md5'][:2]}/{out['md5'][2:]}"))
        entries = json.loads(listing.read_text())
        assert entries and len(entries) == out["nfiles"]
        for entry in entries:
            assert _md5(fresh / "models" / "trained" / entry["relpath"]) == entry["md5"], entry["relpath"]
            assert (fresh / "models/trained" / entry["relpath"]).read_bytes() == \
                (project / "models/trained" / entry["relpath"]).read_bytes()
        # `down` then `up` keeps the S3 objects, as compose's MinIO volume does (moto holds them in memory).
        assert "objects saved to" in _run(*arft_cmd, "stack", "down", cwd=project, env=base)
        assert leftovers(home) == []
        assert "objects restored from" in _run(*arft_cmd, "stack", "up", cwd=project, env=base)
        again = {o["Key"][len(prefix):] for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket="mlflow", Prefix=prefix) for o in page.get("Contents", [])}
        assert again == keys
        in_sync = _run(sys.executable, "-m", "dvc", "status", "--cloud", "--remote", "minio", cwd=project, env=env)
        assert "Cache and remote 'minio' are in sync" in in_sync
    finally:
        # From a shell without the secrets: stopping needs none.
        down = subprocess.run([*arft_cmd, "stack", "down"], cwd=project, capture_output=True, text=True,
                              env={k: v for k, v in base.items() if k not in SECRETS})
    assert down.returncode == 0, down.stderr
    assert leftovers(home) == []
    for log in (home / "logs").glob("*.log"):  # the secrets never reach a log
        text = log.read_text(errors="replace")
        assert not any(secret in text for secret in SECRETS.values()), log.name
    shutil.rmtree(home.parent, ignore_errors=True)
