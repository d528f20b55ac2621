"""One pipeline session per project: what a running `arft pipeline` (or `arft retrain`) owns, so that nothing it
started outlives it.

The session writes a small record (`paths.pipeline_state`: its pid, a session id, its MLflow run) and exports the
session id to every process it starts (the temporary Prefect server, `dvc repro`, the stage commands), which inherit
it in their environment. A graceful end (return, error, Ctrl-C, SIGTERM) stops them and removes the record. After a
`kill -9` the record stays: the next session finds its owner dead, stops every process that still carries the old
session id, and marks the old MLflow run (and its running stage runs) KILLED.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from arft_core.config import Config

SESSION_ENV = "ARFT_PIPELINE_SESSION"
_active: Path | None = None  # this process's record, while a session is open


class PipelineBusy(RuntimeError):
    """Another pipeline session of this project is alive."""


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (tells a pid apart from a later process reusing it); None if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def session_processes(session: str) -> list[int]:
    """Live processes (other than this one) that carry the session id in their environment."""
    marker = f"{SESSION_ENV}={session}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0") and _start_time(int(entry.name)):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def stop_processes(pids: list[int], grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL whatever is still alive after `grace_s`."""
    started = {pid: _start_time(pid) for pid in pids}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            pids = [p for p in pids if started[p] is not None and _start_time(p) == started[p]]
            if not pids:
                return
            time.sleep(0.1)


def _mark_killed(uri: str, run_id: str) -> list[str]:
    """End the run and its still-running nested runs KILLED; returns the run ids it ended."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    ended = []
    for r in [run, *children]:
        if r.info.status == "RUNNING":
            client.set_terminated(r.info.run_id, "KILLED")
            ended.append(r.info.run_id)
    return ended


def reap(record: Path) -> None:
    """Clean up after a pipeline session that died without ending (kill -9, power loss); refuse to go on beside a
    live one."""
    if not record.is_file():
        return
    try:
        old = json.loads(record.read_text())
        pid, start, session = old["pid"], old["start"], old["session"]
    except (ValueError, KeyError, TypeError):
        record.unlink()  # unreadable: nothing can be traced from it
        return
    if _start_time(pid) == start:
        raise PipelineBusy(f"another arft pipeline (pid {pid}) is running in this project (its record: {record}); "
                           "wait for it to finish or stop it")
    leftovers = session_processes(session)
    if leftovers:
        print(f"stopping {len(leftovers)} process(es) left by a killed arft pipeline (pid {pid}): {leftovers}")
        stop_processes(leftovers)
    if old.get("mlflow_run_id"):
        try:
            ended = _mark_killed(old["tracking_uri"], old["mlflow_run_id"])
        except Exception as exc:  # the store may be gone or moved; the record must not block every later run
            print(f"could not mark MLflow run {old['mlflow_run_id']} of the killed pipeline KILLED: {exc}")
        else:
            if ended:
                print(f"MLflow runs of the killed pipeline marked KILLED: {', '.join(ended)}")
    record.unlink()


def _write(record: Path, data: dict) -> None:
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, record)


def note(**fields: str) -> None:
    """Add facts to this process's session record (e.g. its MLflow run); nothing outside a session."""
    if _active is not None and _active.is_file():
        _write(_active, {**json.loads(_active.read_text()), **fields})


@contextmanager
def pipeline_session(cfg: Config) -> Iterator[None]:
    """Own the project's pipeline for the duration: clean up after a killed predecessor, record this session,
    export its id to every child, and on the way out stop every child still alive."""
    global _active
    record = cfg.path("pipeline_state")
    record.parent.mkdir(parents=True, exist_ok=True)
    reap(record)
    session = uuid.uuid4().hex
    _write(record, {"pid": os.getpid(), "start": _start_time(os.getpid()), "session": session})
    previous, os.environ[SESSION_ENV] = os.environ.get(SESSION_ENV), session
    _active = record
    try:
        yield
    finally:
        _active = None
        leftovers = session_processes(session)
        if leftovers:  # e.g. a stage that ignored SIGTERM; normally every child has ended by now
            stop_processes(leftovers)
        if previous is None:
            os.environ.pop(SESSION_ENV, None)
        else:
            os.environ[SESSION_ENV] = previous
        record.unlink(missing_ok=True)
