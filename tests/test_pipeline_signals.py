"""A stopped or killed `arft pipeline` leaves nothing behind: its temporary Prefect server and stage processes are
stopped (at once on SIGTERM, at the next start after kill -9) and its MLflow runs are not left RUNNING."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import copy_project

pytestmark = pytest.mark.slow


def start(project: Path, log: Path) -> subprocess.Popen:
    """`arft pipeline` with no Prefect API configured, so it starts its own temporary server."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env.update(PYTHONUNBUFFERED="1", PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    return subprocess.Popen([sys.executable, "-m", "arft_core.cli", "pipeline"], cwd=project, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def record(project: Path) -> dict:
    try:
        return json.loads((project / ".arft" / "pipeline.json").read_text())
    except (OSError, ValueError):
        return {}


def wait_mid_stage(proc: subprocess.Popen, project: Path, log: Path, not_session: str = "") -> dict:
    """Wait until the pipeline has its MLflow run and a stage command is running; returns its record."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        rec = record(project)
        if rec.get("mlflow_run_id") and rec["session"] != not_session and "Running stage" in log.read_text():
            return rec
        time.sleep(0.5)
    raise AssertionError(f"the pipeline never reached a stage:\n{log.read_text()[-3000:]}")


def commands(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            pass
    return out


def runs_status(project: Path, run_id: str) -> dict[str, str]:
    """Status of the pipeline run and of each of its nested stage runs."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project}/tracking/mlflow.db")
    run = client.get_run(run_id)
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    return {"pipeline": run.info.status, **{r.data.tags["arft.stage"]: r.info.status for r in children}}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return copy_project(tmp_path_factory.mktemp("signals") / "project")


def test_sigterm_stops_the_server_and_the_stage_and_ends_the_run_killed(project, tmp_path):
    from flows.session import session_processes

    log = tmp_path / "pipeline.log"
    proc = start(project, log)
    rec = wait_mid_stage(proc, project, log)
    assert any("prefect.server.api.server" in c for c in commands(session_processes(rec["session"])))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) != 0
    assert session_processes(rec["session"]) == [], commands(session_processes(rec["session"]))
    statuses = runs_status(project, rec["mlflow_run_id"])
    assert statuses["pipeline"] == "KILLED", statuses
    assert "RUNNING" not in statuses.values(), statuses
    assert not (project / ".arft" / "pipeline.json").exists()


def test_kill_9_leftovers_are_stopped_by_the_next_run_and_a_live_run_is_not_joined(project, tmp_path):
    from flows.session import session_processes

    log = tmp_path / "killed.log"
    proc = start(project, log)
    killed = wait_mid_stage(proc, project, log)
    proc.kill()
    proc.wait()
    orphans = commands(session_processes(killed["session"]))
    assert any("prefect.server.api.server" in c for c in orphans), orphans  # what kill -9 leaves behind
    assert runs_status(project, killed["mlflow_run_id"])["pipeline"] == "RUNNING"

    log2 = tmp_path / "next.log"
    nxt = start(project, log2)
    try:
        current = wait_mid_stage(nxt, project, log2, not_session=killed["session"])
        assert session_processes(killed["session"]) == []
        assert "left by a killed arft pipeline" in log2.read_text()
        statuses = runs_status(project, killed["mlflow_run_id"])
        assert statuses["pipeline"] == "KILLED" and "RUNNING" not in statuses.values(), statuses

        # A third start beside the live one refuses at once, naming the live pipeline, and touches nothing.
        third = start(project, tmp_path / "third.log")
        assert third.wait(timeout=60) == 1
        assert f"another arft pipeline (pid {nxt.pid}) is running" in (tmp_path / "third.log").read_text()
        assert record(project)["session"] == current["session"]
    finally:
        nxt.send_signal(signal.SIGTERM)
        nxt.wait(timeout=120)
    assert session_processes(current["session"]) == []


def test_temporary_prefect_server_gets_time_to_start_on_a_loaded_machine():
    """Standalone stage commands start Prefect's own temporary server; its 20 s default failed under CPU load."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    code = ("import arft_core; from prefect.settings import get_current_settings; "
            "print(get_current_settings().server.ephemeral.startup_timeout_seconds)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout) == 120
