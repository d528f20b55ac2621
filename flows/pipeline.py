"""The pipeline flow: runs the stages of dvc.yaml in DAG order inside one MLflow parent run and one Prefect flow run.

With the project's params.yaml each stage goes through `dvc repro --single-item` (an unchanged stage is skipped and
dvc.lock records what ran; the stage command is the stage's `arft` command). With another params file DVC cannot
tell what changed (dvc.yaml's `params:` and `${...}` read params.yaml), so every stage runs in this process with
that file, and dvc.lock is left untouched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from prefect import flow, task

from arft_core.config import PARAMS_FILE, Config, ConfigError, load_config
from arft_core.dag import stage_order
from flows.session import note

UNTRACKED = ("DVC change tracking is off: the params file {source} is not {params}, which dvc.yaml's params and "
             "${{...}} read; every stage runs in this process, in DAG order, and dvc.lock is left untouched")


class StageFailed(RuntimeError):
    pass


def stage_env() -> dict[str, str]:
    # Stage commands (`arft <stage>`) must resolve to this interpreter's environment even if it is not activated.
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def untracked_notice(cfg: Config) -> str | None:
    """The one line saying that DVC change tracking is off for this config; None when DVC tracks it."""
    return None if cfg.dvc_tracks_params else UNTRACKED.format(source=cfg.source, params=cfg.root / PARAMS_FILE)


def out_of_date(root: Path, stage: str) -> bool:
    """DVC's own decision, before `dvc repro`: whether the stage would run (`dvc status` of it lists changes)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return bool(repo.status(targets=[f"{root / 'dvc.yaml'}:{stage}"]))


@task(name="dvc-repro")
def reproduce_stage(stage: str, root: str, force: bool = False) -> str:
    """`dvc repro --single-item <stage>`, its output shown live; returns 'ran' when it was forced or DVC found the
    stage out of date, 'cached' when its inputs had not changed."""
    ran = force or out_of_date(Path(root), stage)
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage, *(["--force"] if force else [])]
    # Its own process group, so that an interrupted pipeline stops the stage command under dvc too.
    proc = subprocess.Popen(cmd, cwd=root, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True)
    tail: list[str] = []
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            tail = (tail + [line.rstrip()])[-40:]
        proc.wait()
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C, SIGTERM): the stage ends its MLflow run KILLED and exits
            _stop_group(proc)
    if proc.returncode != 0:
        raise StageFailed(f"stage {stage!r} failed (dvc repro exit {proc.returncode}); last output:\n"
                          + "\n".join(tail))
    return "ran" if ran else "cached"


@task(name="stage")
def run_stage_here(stage: str, params: str) -> str:
    """The stage in this process, with the params file `params` (no DVC): its nested MLflow run sits under the
    pipeline's run. Always 'ran'."""
    from flows.stages import run_in_flow

    try:
        run_in_flow(stage, params)
    except Exception as exc:
        raise StageFailed(f"stage {stage!r} failed: {exc}") from exc
    return "ran"


def _stop_group(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM to the stage's process group (dvc and the stage command), SIGKILL to what is left after `grace_s`."""
    deadline = time.monotonic() + grace_s
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            while time.monotonic() < deadline:
                proc.poll()  # reap the leader: a zombie would keep the group alive
                os.killpg(proc.pid, 0)
                time.sleep(0.1)
        except ProcessLookupError:  # the whole group has ended
            break
    proc.wait()


def _check_retries(cfg: Config, stages: list[str]) -> None:
    unknown = sorted(set(cfg.pipeline.retries) - set(stages))
    if unknown:
        raise ConfigError(f"pipeline.retries: unknown stage(s) {unknown}; stages are {stages}")


@flow(name="arft-pipeline", log_prints=True)
def pipeline_flow(params: str | None = None, force: list[str] | None = None) -> dict:
    """Whole chain: model, data, validate, train, evaluate, register, promote (order and deps from dvc.yaml), each
    stage through `dvc repro` with the project's params.yaml, or in this process with another params file. Stages in
    `force` run even when DVC sees no change (e.g. search_data when the annotation export changed)."""
    import mlflow

    from arft_core.tracking import pipeline_run

    cfg = load_config(params)
    stages = stage_order(cfg.root)
    _check_retries(cfg, stages)
    notice = untracked_notice(cfg)
    if notice:
        print(notice)
    results: dict[str, str] = {}
    with pipeline_run(cfg) as run:
        note(mlflow_run_id=run.info.run_id, tracking_uri=mlflow.get_tracking_uri())
        for stage in stages:
            retry = {"retries": cfg.pipeline.retries.get(stage, 0),
                     "retry_delay_seconds": cfg.pipeline.retry_delay_seconds}
            if stage == "train" and cfg.retrain.train_dispatch == "deployment":
                step = train_on_gpu_pool.with_options(task_run_name="train-on-gpu-pool", **retry)
                results[stage] = step(str(cfg.source), stage in (force or []))
            elif notice:
                step = run_stage_here.with_options(task_run_name=f"stage-{stage}", **retry)
                results[stage] = step(stage, str(cfg.source))
            else:
                step = reproduce_stage.with_options(task_run_name=f"dvc-repro-{stage}", **retry)
                results[stage] = step(stage, str(cfg.root), stage in (force or []))
            mlflow.set_tag(f"stage.{stage}", results[stage])
        return {"mlflow_run_id": run.info.run_id, "stages": results}


TRAIN_DEPLOYMENT = "arft-train/gpu"


@task(name="train-on-gpu-pool")
def train_on_gpu_pool(params: str, force: bool = False) -> str:
    """The train stage on the GPU pool: when DVC says it must rerun (always, with a params file DVC does not
    track), run the training deployment (its worker shares the project folder), wait for it, then record its
    outputs in dvc.lock with `dvc commit` (tracked params only). A run that fails or crashes (its worker died) fails
    this task, which pipeline.retries.train reruns as a new flow run of the deployment."""
    from prefect.deployments import run_deployment

    cfg = load_config(params)
    tracked = cfg.dvc_tracks_params
    if tracked and not force and not out_of_date(cfg.root, "train"):
        print("train: unchanged, skipping")
        return "cached"
    run = run_deployment(TRAIN_DEPLOYMENT, parameters={"params": str(cfg.source)}, timeout=None)
    if not run.state or not run.state.is_completed():
        raise StageFailed(f"stage 'train' failed on the GPU pool: flow run {run.name} ended {run.state}")
    if tracked:
        subprocess.run([sys.executable, "-m", "dvc", "commit", "--force", "train"], cwd=cfg.root, env=stage_env(),
                       check=True)
    return "ran"


@contextmanager
def prefect_api() -> Iterator[str]:
    """Use PREFECT_API_URL when set; otherwise start one temporary local server for this process and its stage
    subprocesses (rather than one per stage), and stop it afterwards."""
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()
    try:
        server.start()  # waits up to PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS
        os.environ["PREFECT_API_URL"] = server.api_url
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)  # send buffered logs while the server is up (else a minute of retries)
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()
