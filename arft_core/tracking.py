"""MLflow tracking: one parent run per pipeline run, one nested run per stage, each tagged with the git commit and
the content hashes (DVC's md5 scheme) of the stage's inputs, with params logged from the typed config.

Stages run as separate processes under `dvc repro`; the pipeline passes its parent run id in ARFT_PARENT_RUN_ID.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml

from arft_core.config import Config

PARENT_RUN_ENV = "ARFT_PARENT_RUN_ID"
_IGNORED = ("__pycache__",)


def configure(cfg: Config) -> str:
    """Point MLflow at the configured store and experiment (creating them); returns the tracking URI."""
    import mlflow

    uri = cfg.tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(cfg.tracking.experiment) is None:
        # A local store gets an explicit artifact folder under the project, not ./mlruns of the caller's cwd.
        location = None
        if uri.startswith("sqlite:"):
            location = (cfg.root / cfg.tracking.artifact_location).resolve().as_uri()
        mlflow.create_experiment(cfg.tracking.experiment, artifact_location=location)
    mlflow.set_experiment(cfg.tracking.experiment)
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
        mlflow.log_metrics(flat, step=step)


@contextmanager
def pipeline_run(cfg: Config) -> Iterator:
    """The parent run of one pipeline execution; exports its id so stage processes nest under it."""
    import mlflow

    configure(cfg)
    with mlflow.start_run(run_name="pipeline", tags={"arft.stage": "pipeline", **git_tags(cfg.root)}) as run:
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
    tags.update({f"dvc.input.{path}": h for path, h in input_hashes(cfg.root, stage).items()})
    dumped = cfg.model_dump(mode="json")
    # System metrics (CPU, memory, GPU when present) for the long-running stages.
    with mlflow.start_run(run_name=stage, parent_run_id=os.environ.get(PARENT_RUN_ENV) or None, tags=tags,
                          log_system_metrics=stage in ("train", "evaluate")) as run:
        mlflow.log_params(flatten({s: dumped[s] for s in sections}))
        yield run
