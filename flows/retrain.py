"""Scheduled retraining: a run first asks what changed since the last one (`dvc status`, plus the MAT-Search
annotation export, which lives outside DVC's graph). Nothing changed: it skips training and says so. Otherwise it
runs the pipeline (train, evaluate, register, promote), then records the new dvc.lock. With a params file other than
the project's params.yaml DVC cannot tell what changed: the run says so, runs every stage and records no dvc.lock."""

from __future__ import annotations

import subprocess
import sys

from prefect import flow

from arft_core.config import Config, ConfigError, load_config
from arft_core.dag import changed_stages
from arft_core.stages.data import annotation_changes
from flows.pipeline import pipeline_flow, stage_env, untracked_notice

SKIP_MESSAGE = "inputs unchanged since the last run: skipping training"


def record_lock(cfg: Config, run_id: str) -> str:
    """Log dvc.lock to the pipeline's MLflow run; with retrain.record_lock: commit, also commit it to git."""
    import mlflow

    from arft_core.tracking import configure

    lock = cfg.root / "dvc.lock"
    configure(cfg)
    mlflow.MlflowClient().log_artifact(run_id, str(lock))
    where = f"MLflow run {run_id} (artifact dvc.lock)"
    if cfg.retrain.record_lock == "commit":
        subprocess.run(["git", "add", "dvc.lock"], cwd=cfg.root, check=True)
        subprocess.run(["git", "commit", "-m", f"retrain: dvc.lock of MLflow run {run_id}", "--", "dvc.lock"],
                       cwd=cfg.root, check=True, capture_output=True)
        where += " and a git commit"
    return where


@flow(name="arft-retrain", log_prints=True)
def retrain_flow(params: str | None = None) -> dict:
    """Retrain when inputs changed (new annotations, params, code, data); skip when nothing did."""
    cfg = load_config(params)
    check_remote(cfg)
    if untracked_notice(cfg):  # DVC cannot compare: run the chain (it prints why), leave dvc.lock alone
        result = pipeline_flow(params=str(cfg.source))
        print(f"stages: {result['stages']}; dvc.lock not recorded (untouched)")
        return {"skipped": False, "changes": {}, **result, "lock": None}
    changes = changed_stages(cfg.root)
    new_annotations = annotation_changes(cfg)
    if new_annotations:
        changes["search_data"] = changes.get("search_data", []) + new_annotations
    if not changes:
        print(SKIP_MESSAGE)
        return {"skipped": True, "changes": {}}
    for stage, why in changes.items():
        print(f"changed: {stage}: {'; '.join(why)}")
    result = pipeline_flow(params=str(cfg.source), force=["search_data"] if new_annotations else None)
    where = record_lock(cfg, result["mlflow_run_id"])
    print(f"stages: {result['stages']}; new dvc.lock recorded in {where}")
    if cfg.retrain.dvc_remote:
        print(push_outputs(cfg, cfg.retrain.dvc_remote))
    return {"skipped": False, "changes": changes, **result, "lock": where}


def check_remote(cfg: Config) -> None:
    """retrain.dvc_remote names a remote of the project's DVC config (checked before any work)."""
    from dvc.config import Config as DvcConfig

    remote = cfg.retrain.dvc_remote
    if remote:
        known = sorted(DvcConfig(str(cfg.root / ".dvc"))["remote"])
        if remote not in known:
            raise ConfigError(f"retrain.dvc_remote: no DVC remote {remote!r}; the project's DVC config defines "
                              f"{known or 'none'} (`dvc remote add`)")


def push_outputs(cfg: Config, remote: str) -> str:
    """`dvc push` of the pipeline's outputs to `remote`, so a teammate's `dvc pull` restores this run."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "push", "--remote", remote], cwd=cfg.root, env=stage_env(),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc push to remote {remote!r} failed: {(proc.stderr or proc.stdout).strip()[-2000:]}")
    return f"dvc push to remote {remote!r}: {(proc.stdout.strip().splitlines() or ['done'])[-1]}"
