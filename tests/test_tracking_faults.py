"""Faults of the local MLflow store (arft_core.tracking): a SQLite file another process holds locked is waited for
within the lock budget, then a clear `TrackingStoreError` naming the file; a corrupted file is an error naming the
file and what to do. The lock is held by a real second process on a real store."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest

from arft_core.config import Config, load_config
from arft_core.tracking import LOCK_TIMEOUT_ENV, TrackingStoreError, configure, log_metrics, pipeline_run
from conftest import write_params

HOLD = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")  # no other connection may read or write until COMMIT
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("COMMIT")
"""


@contextmanager
def locked(db: Path, seconds: float) -> Iterator[float]:
    """Another process holds an exclusive lock on `db` for `seconds`; yields the monotonic time it got the lock."""
    db.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(db), str(seconds)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield time.monotonic()
    finally:
        proc.terminate()  # a no-op when it already finished; releases the lock early otherwise
        proc.wait(timeout=10)


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch) -> Iterator[Config]:
    """The tiny config with its default store, tmp_path/tracking/mlflow.db."""
    # configure() exports MLFLOW_TRACKING_URI (mlflow.set_tracking_uri does), and so does resetting it below.
    # monkeypatch puts back the first state it recorded; delenv alone records nothing for an unset variable, so
    # setenv first records it (set or not) before anything else touches it.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.delenv(LOCK_TIMEOUT_ENV, raising=False)
    before = mlflow.get_tracking_uri()
    yield load_config(write_params(tmp_path))
    if mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(before)


def store(cfg: Config) -> Path:
    return cfg.root / "tracking" / "mlflow.db"


def finished_runs(cfg: Config) -> list[str]:
    runs = mlflow.MlflowClient(cfg.tracking_uri()).search_runs(
        [mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    return [r.info.status for r in runs]


def test_a_lock_shorter_than_the_budget_is_waited_for(cfg: Config, monkeypatch, capsys):
    monkeypatch.setenv(LOCK_TIMEOUT_ENV, "30")
    db = store(cfg)
    # A new store, locked before its first use: MLflow's table creation waits for the lock, longer than sqlite3's
    # default 5 s (what store creation got before).
    with locked(db, 5.5) as t_lock:
        with pipeline_run(cfg):
            first_wait = time.monotonic() - t_lock
    # An existing store this process already has connections to.
    with locked(db, 3.0) as t_lock:
        with pipeline_run(cfg):
            second_wait = time.monotonic() - t_lock
    with capsys.disabled():
        print(f"\n[tracking] locked 5.5 s: new store usable after {first_wait:.2f} s; locked 3 s: existing store "
              f"after {second_wait:.2f} s")
    assert 5.0 <= first_wait < 20 and 2.5 <= second_wait < 15
    assert finished_runs(cfg) == ["FINISHED", "FINISHED"]


def test_a_lock_outlasting_the_budget_is_a_clear_error(cfg: Config, monkeypatch, capsys):
    monkeypatch.setenv(LOCK_TIMEOUT_ENV, "1")
    db = store(cfg)
    with locked(db, 20.0):
        t0 = time.monotonic()
        with pytest.raises(TrackingStoreError) as exc:
            configure(cfg)  # a new store: fails while MLflow opens it
        new_store_s = time.monotonic() - t0
    message = str(exc.value)
    assert str(db) in message and "is locked: another process holds a lock on it" in message
    assert "within 1 s" in message and LOCK_TIMEOUT_ENV in message

    configure(cfg)  # the lock is gone: the store is created
    run = mlflow.start_run()
    try:
        with locked(db, 20.0):
            t0 = time.monotonic()
            with pytest.raises(TrackingStoreError, match="is locked") as exc:
                log_metrics({"loss": 1.0})
            metrics_s = time.monotonic() - t0
    finally:
        mlflow.end_run()
    assert str(db) in str(exc.value)
    with capsys.disabled():
        print(f"\n[tracking] 1 s budget: new store failed after {new_store_s:.2f} s, log_metrics after "
              f"{metrics_s:.2f} s")
    assert 1.0 <= new_store_s < 5 and 1.0 <= metrics_s < 5
    assert mlflow.MlflowClient().get_run(run.info.run_id).info.status == "FINISHED"


def test_run_end_status_survives_the_store_handling(cfg: Config):
    with pipeline_run(cfg):
        pass
    with pytest.raises(ValueError, match="stage bug"), pipeline_run(cfg):
        raise ValueError("stage bug")  # not a store fault: passes through as it is
    with pytest.raises(KeyboardInterrupt), pipeline_run(cfg):
        raise KeyboardInterrupt
    assert sorted(finished_runs(cfg)) == ["FAILED", "FINISHED", "KILLED"]


def corrupt_whole(db: Path) -> None:
    db.write_bytes(os.urandom(16384))


def corrupt_pages(db: Path) -> None:
    # Keep the 100-byte header (still "an SQLite file") and scramble every page after the first.
    data = bytearray(db.read_bytes())
    page = int.from_bytes(data[16:18], "big") or 65536
    data[page:] = os.urandom(len(data) - page)
    db.write_bytes(bytes(data))


@pytest.mark.parametrize("corrupt", [corrupt_whole, corrupt_pages])
def test_a_corrupted_store_names_the_file_and_the_way_out(cfg: Config, tmp_path: Path, monkeypatch, corrupt):
    db = store(cfg)
    with pipeline_run(cfg):
        pass
    corrupt(db)
    with pytest.raises(TrackingStoreError) as exc:  # the store this process has open
        with pipeline_run(cfg):
            pass
    message = str(exc.value)
    assert str(db) in message and "is corrupted" in message and "restore it from a backup" in message

    # A store opened for the first time (a new stage process): fails while MLflow creates its engine and tables.
    (tmp_path / "other").mkdir()
    fresh = load_config(write_params(tmp_path / "other"))
    store(fresh).parent.mkdir(parents=True)
    store(fresh).write_bytes(db.read_bytes())
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # exported by configure(cfg); it would win over fresh's params
    with pytest.raises(TrackingStoreError, match="is corrupted") as exc:
        configure(fresh)
    assert str(store(fresh)) in str(exc.value)

    # What the message suggests: move it away, and the next run creates a fresh store. This process's MLflow keeps
    # the moved file open in its pool, so another spelling of the same path stands in for the next process.
    db.rename(db.with_suffix(".db.corrupt"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db.parent}/./{db.name}")
    with pipeline_run(cfg):
        pass
    assert finished_runs(cfg) == ["FINISHED"] and db.is_file()


def test_a_stage_command_on_a_corrupted_store_ends_with_the_clear_error(tmp_path: Path):
    write_params(tmp_path)
    (tmp_path / "tracking").mkdir()
    (tmp_path / "tracking" / "mlflow.db").write_bytes(b"not a database " * 4096)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, "-m", "arft_core.cli", "model"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    last = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and last, proc.stderr[-3000:]
    assert f"MLflow store {tmp_path / 'tracking' / 'mlflow.db'} is corrupted" in last[-1]
    assert not (tmp_path / "models").exists()  # no stage work before the store was found broken


def test_the_experiment_is_a_model_training_experiment(cfg):
    """MLflow 3's UI opens an experiment by its kind: ours is model training (runs), also when an older version
    made the experiment without one."""
    from arft_core.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    configure(cfg)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    client.delete_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG)
    configure(cfg)
    assert client.get_experiment(experiment.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
