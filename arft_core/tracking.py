"""MLflow tracking: one parent run per pipeline run, one nested run per stage, each tagged with the git commit and
the content hashes (DVC's md5 scheme) of the stage's inputs, with params logged from the typed config.

Stages run as separate processes under `dvc repro`; the pipeline passes its parent run id in ARFT_PARENT_RUN_ID.

A local SQLite store is shared by those processes: one that finds it locked by another waits (SQLite's busy handler,
which retries with growing sleeps) for up to `LOCK_TIMEOUT_S` seconds, or ARFT_TRACKING_LOCK_TIMEOUT_S; a lock held
longer, or a corrupted store file, is a `TrackingStoreError` naming the file. Server and PostgreSQL stores are left
to MLflow.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml

from arft_core.config import Config

PARENT_RUN_ENV = "ARFT_PARENT_RUN_ID"
# The experiment's kind, as MLflow 3's UI reads it: model training, so that it opens on the training runs rather
# than on the (empty) GenAI traces overview.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
_IGNORED = ("__pycache__",)
# How long a call waits on a SQLite store another process holds locked (a long write, a stuck process) before
# failing. Stages of one pipeline write briefly; a minute absorbs contention without hiding a stuck holder for long.
LOCK_TIMEOUT_S = 60.0
LOCK_TIMEOUT_ENV = "ARFT_TRACKING_LOCK_TIMEOUT_S"
_SQLITE = "sqlite:///"
_BUSY_PRAGMA = re.compile(r"\s*PRAGMA\s+busy_timeout\s*=", re.IGNORECASE)
_STORES: set[str] = set()  # database paths of the SQLite stores given the lock budget


class TrackingStoreError(RuntimeError):
    """The MLflow store cannot be used: a SQLite file locked for too long, or corrupted. Names the file."""


def lock_timeout_s() -> float:
    """The lock wait budget: ARFT_TRACKING_LOCK_TIMEOUT_S when set, else `LOCK_TIMEOUT_S`."""
    value = os.environ.get(LOCK_TIMEOUT_ENV)
    if not value:
        return LOCK_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        raise TrackingStoreError(f"{LOCK_TIMEOUT_ENV}={value!r} is not a number of seconds") from None
    if seconds < 0:
        raise TrackingStoreError(f"{LOCK_TIMEOUT_ENV}={value!r} must be >= 0")
    return seconds


def _store_path(uri: str) -> str:
    return uri[len(_SQLITE):].split("?", 1)[0]


def _busy_timeout_sql() -> str:
    return f"PRAGMA busy_timeout = {int(lock_timeout_s() * 1000)}"


def _is_store(conn: Any) -> bool:
    return conn.dialect.name == "sqlite" and conn.engine.url.database in _STORES


def _set_busy_timeout(conn: Any) -> None:
    # Without it a connection gets sqlite3's default of 5 s, as MLflow's store creation (table check, migrations)
    # does. Set at each connect (a checkout) so that the budget read now applies to pooled connections too.
    if _is_store(conn):
        conn.connection.dbapi_connection.execute(_busy_timeout_sql())


def _replace_busy_timeout(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> tuple[str, Any]:
    # MLflow 3.17 starts every store session with its own `PRAGMA busy_timeout = 20000;` (mlflow/store/db/utils.py);
    # the budget takes its place.
    if _BUSY_PRAGMA.match(statement) and _is_store(conn):
        return _busy_timeout_sql(), parameters
    return statement, parameters


def _use_lock_budget(uri: str) -> None:
    """Make MLflow's connections to the SQLite store at `uri` wait out another process's lock for the budget:
    SQLite's busy handler retries with growing sleeps (up to 100 ms apart) until the budget is spent.

    MLflow builds its engines itself, so listeners on the Engine class, limited to the stores registered here, are
    the hooks that reach them. `?timeout=` in the URI works for store creation too, but the URI is exported to
    every stage process and recorded, and MLflow's per-session pragma would still override it.
    """
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    lock_timeout_s()  # a bad ARFT_TRACKING_LOCK_TIMEOUT_S fails here, not inside an engine event
    _STORES.add(_store_path(uri))
    if not event.contains(Engine, "engine_connect", _set_busy_timeout):
        event.listen(Engine, "engine_connect", _set_busy_timeout)
    if not event.contains(Engine, "before_cursor_execute", _replace_busy_timeout):
        event.listen(Engine, "before_cursor_execute", _replace_busy_timeout, retval=True)


def _sqlite_errors(exc: BaseException) -> Iterator[sqlite3.Error]:
    """The sqlite3 errors behind `exc`: MLflow wraps SQLAlchemy's error, which wraps sqlite3's."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, sqlite3.Error):
            yield e
        orig = getattr(e, "orig", None)  # sqlalchemy.exc.DBAPIError
        todo += [e.__cause__, e.__context__, orig if isinstance(orig, BaseException) else None]


@contextmanager
def store_errors() -> Iterator[None]:
    """Turn a locked or corrupted SQLite store behind the current tracking URI into a `TrackingStoreError` naming
    the file; any other error, and any other kind of store, passes through unchanged."""
    import mlflow

    try:
        yield
    except TrackingStoreError:
        raise
    except Exception as exc:
        uri = mlflow.get_tracking_uri()
        if not uri.startswith(_SQLITE):
            raise
        path = Path(_store_path(uri))
        for err in _sqlite_errors(exc):
            text = str(err)
            if isinstance(err, sqlite3.OperationalError) and ("locked" in text or "busy" in text):
                raise TrackingStoreError(
                    f"MLflow store {path} is locked: another process holds a lock on it and did not release it "
                    f"within {lock_timeout_s():g} s ({text}). Find it with `fuser {path}` and let it finish or "
                    f"stop it, or raise {LOCK_TIMEOUT_ENV}.") from exc
            if "not a database" in text or "malformed" in text or "corrupt" in text:
                raise TrackingStoreError(
                    f"MLflow store {path} is corrupted ({text}): restore it from a backup, or move it away; a fresh "
                    f"store is created on the next run (without the runs recorded in the old one).") from exc
        raise


def configure(cfg: Config) -> str:
    """Point MLflow at the configured store and experiment (creating them); returns the tracking URI."""
    import mlflow

    uri = cfg.tracking_uri()
    if uri.startswith(_SQLITE):
        Path(uri[len(_SQLITE):]).parent.mkdir(parents=True, exist_ok=True)
        _use_lock_budget(uri)
    mlflow.set_tracking_uri(uri)
    # The first call opens the store (MLflow creates or migrates its tables there): a bad file fails here.
    with store_errors():
        if mlflow.get_experiment_by_name(cfg.tracking.experiment) is None:
            # A local store gets an explicit artifact folder under the project, not ./mlruns of the caller's cwd.
            location = None
            if uri.startswith("sqlite:"):
                location = (cfg.root / cfg.tracking.artifact_location).resolve().as_uri()
            mlflow.create_experiment(cfg.tracking.experiment, artifact_location=location,
                                     tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        experiment = mlflow.set_experiment(cfg.tracking.experiment)
        if experiment.tags.get(EXPERIMENT_KIND_TAG) is None:  # made by an older version, or by hand
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return uri


def git_tags(root: Path) -> dict[str, str]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    return {"git.commit": commit or "unknown", "git.dirty": str(bool(git("status", "--porcelain", "--untracked-files=no")))}


def _file_md5(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def content_hash(path: Path) -> str:
    """DVC 3's hash of a file (md5) or folder (md5 of its sorted file listing, suffixed `.dir`)."""
    if path.is_file():
        return _file_md5(path)
    if not path.is_dir():
        return "missing"
    entries = sorted(
        (p.relative_to(path).parts, p)
        for p in path.rglob("*")
        if p.is_file() and not any(part in _IGNORED for part in p.parts) and p.suffix != ".pyc"
    )
    listing = [{"md5": _file_md5(p), "relpath": "/".join(parts)} for parts, p in entries]
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"


def locked_out_hashes(root: Path, exclude_stage: str | None = None) -> dict[str, str]:
    """Hashes DVC recorded for other stages' outputs (already computed, so no re-hashing of large folders)."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    data = yaml.safe_load(lock.read_text()) or {}
    return {o["path"]: o.get("md5", "") for name, s in data.get("stages", {}).items() if name != exclude_stage
            for o in s.get("outs", [])}


def input_hashes(root: Path, stage: str) -> dict[str, str]:
    """{dep path: hash} for the stage's dvc.yaml deps (params.yaml included); empty outside a DVC project."""
    from arft_core.dag import stage_deps

    if not (root / "dvc.yaml").is_file():
        return {}
    locked = locked_out_hashes(root, stage)
    return {dep: locked.get(dep) or content_hash(root / dep) for dep in stage_deps(root, stage)}


def flatten(obj: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def log_metrics(metrics: dict, step: int | None = None, prefix: str = "") -> None:
    """Log every numeric leaf of a (nested) dict, keys joined with '.'."""
    import mlflow

    flat = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            log_metrics(v, step, f"{prefix}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            flat[f"{prefix}{k}".replace("/", ".")] = float(v)
    if flat:
        uri = mlflow.get_tracking_uri()
        if uri.startswith(_SQLITE):
            _use_lock_budget(uri)  # a process that set the URI itself (a training rank) gets the budget too
        with store_errors():
            mlflow.log_metrics(flat, step=step)


@contextmanager
def _start_run(**kwargs) -> Iterator:
    """`mlflow.start_run`, except that an interruption (Ctrl-C, SIGTERM as the CLI or Prefect raise it: anything
    that is not an Exception) ends the run KILLED instead of FAILED, so a stopped run is told from a broken one."""
    import mlflow

    # Store faults at the run's start and end become TrackingStoreErrors; the body's own errors pass through as
    # they are (a stage's "database is locked" from another SQLite file must not be blamed on the MLflow store).
    with store_errors():
        run = mlflow.start_run(**kwargs)
    exc_info: tuple[Any, Any, Any] = (None, None, None)
    try:
        yield run
    except BaseException:
        exc_info = sys.exc_info()
        raise
    finally:
        with store_errors():
            if exc_info[0] is not None and not issubclass(exc_info[0], Exception):
                mlflow.end_run("KILLED")
            run.__exit__(*exc_info)  # ends it FINISHED, or FAILED after an error; a no-op once ended KILLED


@contextmanager
def pipeline_run(cfg: Config) -> Iterator:
    """The parent run of one pipeline execution; exports its id so stage processes nest under it."""
    import mlflow

    configure(cfg)
    with _start_run(run_name="pipeline", tags={"arft.stage": "pipeline", **git_tags(cfg.root)}) as run:
        with store_errors():
            mlflow.log_params(flatten(cfg.model_dump(mode="json")))
        previous = os.environ.get(PARENT_RUN_ENV)
        os.environ[PARENT_RUN_ENV] = run.info.run_id
        try:
            yield run
        finally:
            if previous is None:
                os.environ.pop(PARENT_RUN_ENV, None)
            else:
                os.environ[PARENT_RUN_ENV] = previous


@contextmanager
def stage_run(cfg: Config, stage: str, sections: list[str]) -> Iterator:
    """A run for one stage, nested under the pipeline's run when there is one."""
    import mlflow

    configure(cfg)
    tags = {"arft.stage": stage, **git_tags(cfg.root)}
    if cfg.dvc_tracks_params:  # with another params file, DVC's hashes (params.yaml, dvc.lock) describe other inputs
        tags.update({f"dvc.input.{path}": h for path, h in input_hashes(cfg.root, stage).items()})
    dumped = cfg.model_dump(mode="json")
    # System metrics (CPU, memory, GPU when present) for the long-running stages. Nested when the pipeline's run is
    # active in this process (stages run in-process with a params file other than params.yaml).
    with _start_run(run_name=stage, parent_run_id=os.environ.get(PARENT_RUN_ENV) or None, tags=tags,
                    nested=mlflow.active_run() is not None,
                    log_system_metrics=stage in ("train", "evaluate")) as run:
        with store_errors():
            mlflow.log_params(flatten({s: dumped[s] for s in sections}))
        yield run
