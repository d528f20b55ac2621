"""The Prefect deployments of the repository, defined in code from params.yaml's `retrain` section (`arft deploy`):

- `arft-retrain/scheduled`: the retraining chain on the cron schedule, CPU pool;
- `arft-train/gpu`: the train stage alone, GPU pool (what the chain runs when retrain.train_dispatch: deployment);
- `arft-evaluate/cpu`: an evaluation on demand (any model, e.g. models:/arft-agent@champion), CPU pool.
"""

from __future__ import annotations

from arft_core.config import Config
from flows.retrain import retrain_flow
from flows.stages import STAGE_FLOWS


def build_deployments(cfg: Config) -> list[tuple[object, str]]:
    """(RunnerDeployment, work pool) pairs."""
    from prefect.client.schemas.schedules import CronSchedule

    params = {"params": str(cfg.source)}
    r = cfg.retrain
    schedule = CronSchedule(cron=r.cron, timezone=r.timezone)
    train, evaluate = STAGE_FLOWS["train"], STAGE_FLOWS["evaluate"]
    return [
        (retrain_flow.to_deployment(name="scheduled", schedule=schedule, parameters=params,
                                    description="Retrain when inputs changed; promote or not."), r.cpu_pool),
        (train.to_deployment(name="gpu", parameters=params, description="The train stage (GRPO) on a GPU worker."),
         r.gpu_pool),
        (evaluate.to_deployment(name="cpu", parameters=params,
                                description="Evaluate a model on MAT and multi-hop QA."), r.cpu_pool),
    ]


def apply_deployments(cfg: Config) -> list[str]:
    """Create (or update) the deployments on the Prefect server for workers of their pools; missing pools are
    created as process pools. Process workers start flow runs in retrain.workdir (default: this project)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    names = []
    with get_client(sync_client=True) as client:
        for deployment, pool in build_deployments(cfg):
            try:
                pool_type = client.read_work_pool(pool).type
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
                pool_type = "process"
            if pool_type == "process":
                deployment.job_variables = {"working_dir": cfg.retrain.workdir or str(cfg.root)}
            deployment.apply(work_pool_name=pool)
            names.append(f"{deployment.flow_name}/{deployment.name} -> pool {pool}")
    return names


def serve_deployments(cfg: Config) -> None:
    """Serve the deployments from this process (one machine, no workers): scheduled runs execute here, one at a
    time. Blocks until interrupted."""
    from prefect import serve

    serve(*[deployment for deployment, _ in build_deployments(cfg)], limit=1, pause_on_shutdown=False)
