"""Known failures end every `arft` command with one `error:` line and a non-zero exit, no traceback (issue 26): a
corrupted or locked MLflow store under `arft pipeline` (the real CLI, a real store, a real second process holding
the lock), a broken params.yaml; `arft --debug` (or ARFT_DEBUG=1) brings the traceback back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import copy_project
from test_tracking_faults import locked


def arft(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "ARFT_DEBUG")}
    clean["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), clean.get("PATH", "")])
    return subprocess.run([sys.executable, "-m", "arft_core.cli", *args], cwd=cwd, env={**clean, **env},
                          capture_output=True, text=True, timeout=600)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return copy_project(tmp_path_factory.mktemp("cli-errors") / "project")


def test_pipeline_on_a_corrupted_store_ends_with_one_error_line(project: Path):
    db = project / "tracking" / "mlflow.db"
    db.parent.mkdir(exist_ok=True)
    db.write_bytes(b"not a database " * 4096)
    try:
        proc = arft("pipeline", cwd=project)
    finally:
        db.unlink()
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    assert error_lines(proc) == [f"error: MLflow store {db} is corrupted"
                                 + error_lines(proc)[0].split("is corrupted", 1)[1]], proc.stderr[-3000:]
    assert "restore it from a backup" in error_lines(proc)[0]
    assert not (project / "models").exists()  # no stage ran


def test_pipeline_on_a_locked_store_ends_with_one_error_line(project: Path):
    db = project / "tracking" / "mlflow.db"
    with locked(db, 120.0):
        proc = arft("pipeline", cwd=project, ARFT_TRACKING_LOCK_TIMEOUT_S="1")
    db.unlink()
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith(f"error: MLflow store {db} is locked"), proc.stderr[-3000:]
    assert "ARFT_TRACKING_LOCK_TIMEOUT_S" in lines[0]


def test_a_yaml_error_is_one_error_naming_the_broken_line_and_debug_shows_the_traceback(tmp_path: Path):
    (tmp_path / "params.yaml").write_text("train:\n  max_steps 2\n  learning_rate: 1.0e-5\n")
    proc = arft("config", "--values", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    # The first key of a section without its `:`: PyYAML reads on into the next line and gives no context mark.
    assert proc.stderr.splitlines() == [
        f"error: {tmp_path / 'params.yaml'}:3:16: YAML error: mapping values are not allowed here",
        "  line 2: '  max_steps 2' (a value starts here and runs on to line 3: is a `:` missing after the key?)",
        "  line 3: '  learning_rate: 1.0e-5' (mapping values are not allowed here)",
    ]
    for debug in (arft("--debug", "config", "--values", cwd=tmp_path),
                  arft("config", "--values", cwd=tmp_path, ARFT_DEBUG="1")):
        assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
        assert "arft_core.config.ConfigError: " in debug.stderr and "line 2: '  max_steps 2'" in debug.stderr
