"""The Prefect deployments of the repository, defined in code from params.yaml's `retrain` section (`arft deploy`):

- `arft-retrain/scheduled`: the retraining chain on the cron schedule, CPU pool;
- `arft-train/gpu`: the train stage alone, GPU pool (what the chain runs when retrain.train_dispatch: deployment);
- `arft-evaluate/cpu`: an evaluation on demand (any model, e.g. models:/arft-agent@champion), CPU pool.

One retraining and one training run at a time (deployment concurrency limits: a firing while the chain still runs
is cancelled, a second training waits). Their flow runs send heartbeats; an automation marks a run Crashed when they
stop (its worker or machine died), so the chain waiting on it fails clearly and its retry runs it again.
"""

from __future__ import annotations

from arft_core.config import Config
from flows.retrain import retrain_flow
from flows.stages import STAGE_FLOWS


CRASH_AUTOMATION = "arft: crash flow runs whose heartbeats stopped"


def build_deployments(cfg: Config) -> list[tuple[object, str]]:
    """(RunnerDeployment, work pool) pairs."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.client.schemas.schedules import CronSchedule

    params = {"params": str(cfg.source)}
    r = cfg.retrain
    schedule = CronSchedule(cron=r.cron, timezone=r.timezone)
    train, evaluate = STAGE_FLOWS["train"], STAGE_FLOWS["evaluate"]
    one_chain = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
    return [
        (retrain_flow.to_deployment(name="scheduled", schedule=schedule, parameters=params,
                                    concurrency_limit=one_chain,
                                    description="Retrain when inputs changed; promote or not."), r.cpu_pool),
        (train.to_deployment(name="gpu", parameters=params, concurrency_limit=1,
                             description="The train stage (GRPO) on a GPU worker."), r.gpu_pool),
        (evaluate.to_deployment(name="cpu", parameters=params,
                                description="Evaluate a model on MAT and multi-hop QA."), r.cpu_pool),
    ]


def apply_deployments(cfg: Config) -> list[str]:
    """Create (or update) the deployments on the Prefect server for workers of their pools; missing pools are
    created as process pools. Process workers start flow runs in retrain.workdir (default: this project)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    names, ids = [], []
    with get_client(sync_client=True) as client:
        for deployment, pool in build_deployments(cfg):
            try:
                pool_type = client.read_work_pool(pool).type
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
                pool_type = "process"
            variables = {"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(cfg.retrain.heartbeat_seconds)}}
            if pool_type == "process":
                variables["working_dir"] = cfg.retrain.workdir or str(cfg.root)
            deployment.job_variables = variables
            ids.append(deployment.apply(work_pool_name=pool))
            names.append(f"{deployment.flow_name}/{deployment.name} -> pool {pool}")
    names.append(apply_crash_automation(cfg, ids))
    return names


def apply_crash_automation(cfg: Config, deployment_ids: list) -> str:
    """Prefect's recipe for runs whose process died with its worker (no one left to report it): when a flow run of
    these deployments sends no heartbeat, and no final state, for retrain.crash_after_seconds, mark it Crashed.
    Only the deployments' runs, whose heartbeat interval `arft deploy` sets: a flow run started by hand keeps
    Prefect's default interval (180 s). Replaces an earlier version of itself."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.exceptions import ObjectNotFound

    seconds = cfg.retrain.crash_after_seconds
    finals = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed")}
    automation = Automation(
        name=CRASH_AUTOMATION,
        description=f"Flow runs of arft's deployments without a heartbeat for {seconds} s are marked Crashed.",
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "deployment",
                           "prefect.resource.id": [f"prefect.deployment.{i}" for i in deployment_ids]},
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *finals},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=seconds)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=f"no heartbeat for {seconds} s: the worker "
                                    "running this flow run, or its machine, stopped")])
    try:
        Automation.read(name=CRASH_AUTOMATION).delete()
    except (ObjectNotFound, ValueError):
        pass
    automation.create()
    return f"automation {CRASH_AUTOMATION!r} (after {seconds} s)"


def serve_deployments(cfg: Config) -> None:
    """Serve the deployments from this process (one machine, no workers): scheduled runs execute here, one at a
    time. Blocks until interrupted."""
    import os

    from prefect import serve

    # The served runs are subprocesses of this one: they send heartbeats as often as the workers' runs do.
    os.environ["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = str(cfg.retrain.heartbeat_seconds)
    serve(*[deployment for deployment, _ in build_deployments(cfg)], limit=1, pause_on_shutdown=False)
