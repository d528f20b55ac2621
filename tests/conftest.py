"""Shared fixtures: a small-vocabulary params file, a copy of the project for DVC runs, a Prefect test server."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "reference"

import arft_core  # noqa: F401,E402  (telemetry defaults for this process and the subprocesses it starts)

# tests/in_vllm_env runs in the vLLM environment (tests/test_engine_vllm.py starts it there); here only where vLLM is installed.
collect_ignore = [] if importlib.util.find_spec("vllm") else ["in_vllm_env"]

# Small enough that the whole chain runs in seconds per stage, large enough to exercise every code path.
TINY_OVERRIDES = {
    "model": {"embedded": {"vocab_size": 2048}},
    "data": {"n_train": 8, "n_test": 4},
    "train": {"max_steps": 1, "max_completion_length": 8, "num_generations": 2,
              "sft": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-3, "save_steps": 0}},
    "eval": {"max_new_tokens": 8, "multihop_limit": 2},
    "agent": {"max_turns": 2},
}


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_params(folder: Path, overrides: dict | None = None) -> Path:
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), merge(TINY_OVERRIDES, overrides or {}))
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture
def tiny_params(tmp_path: Path) -> Path:
    """params.yaml for the tiny configuration, in an empty folder (outputs land next to it)."""
    return write_params(tmp_path)


def copy_project(dest: Path, overrides: dict | None = None) -> Path:
    """A git checkout of the project's files (tests excluded) at `dest` with the tiny params, for `dvc repro`."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        # dvc.lock: a record of this workspace's own runs, never an input of a copy
        if (ROOT / rel).is_file() and not rel.startswith("tests/") and rel != "dvc.lock":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    write_params(dest, overrides)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "fixture"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)
    return dest


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    return copy_project(tmp_path / "project")


@pytest.fixture(scope="session")
def prefect_server():
    """One real Prefect server for the session, exported so that subprocesses (dvc stages) use it too."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        from prefect.settings import PREFECT_API_URL

        url = PREFECT_API_URL.value()
        old = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url
        try:
            yield url
        finally:
            if old is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = old


def arft(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run the installed `arft` CLI (this interpreter's environment) and capture its output."""
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "arft_core.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"arft {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
