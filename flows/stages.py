"""One Prefect flow per pipeline stage, derived from the stage registry (`arft_core.stages.STAGES`): each loads the
params file and calls the shared stage function through `run_stage`.

A flow is named `arft-<stage with - for _>` and is a module attribute `<stage>_flow` (deployments load flows by that
name). `evaluate_flow` is written out: it also takes the overrides of an ad-hoc evaluation (`arft eval`).
"""

from __future__ import annotations

from prefect import Flow, flow

from arft_core.config import Config, load_config
from arft_core.stages import STAGES, Stage, run_stage
from arft_core.stages.evaluate import eval_overrides


def _export_search_key(cfg: Config) -> None:
    """Web search keys come from the environment; when unset there, from the Prefect Secret block of the same
    name (lower-case, dashes), so that deployments need no key in their environment. Never logged."""
    import os

    if cfg.search.backend == "local":
        return
    var = cfg.search.api_key_env[cfg.search.backend]
    if os.environ.get(var):
        return
    from prefect.blocks.system import Secret

    try:
        os.environ[var] = Secret.load(var.lower().replace("_", "-")).get()
    except ValueError:
        pass  # no such block: the backend reports the missing variable by name


def run_in_flow(stage: str, params: str | None, cfg: Config | None = None) -> dict:
    """Run a stage in the current Prefect flow run: load the params (unless `cfg` is given), fetch the web search key
    for a stage that searches, then `run_stage`."""
    cfg = cfg or load_config(params)
    if "search" in STAGES[stage].sections:
        _export_search_key(cfg)
    return run_stage(stage, cfg)


def _stage_flow(stage: Stage) -> Flow:
    def stage_flow(params: str | None = None) -> dict:
        return run_in_flow(stage.name, params)

    stage_flow.__name__ = stage_flow.__qualname__ = f"{stage.name}_flow"
    stage_flow.__doc__ = stage.help
    return flow(name=stage.flow_name, log_prints=True)(stage_flow)


@flow(name=STAGES["evaluate"].flow_name, log_prints=True, description=STAGES["evaluate"].help)
def evaluate_flow(params: str | None = None, model: str | None = None, benchmarks: list[str] | None = None,
                  modes: list[str] | None = None, out: str | None = None, checkpoints: str | None = None) -> dict:
    """With no overrides this is the pipeline's stage (the trained model, outputs at the configured paths). An ad-hoc
    evaluation sets another model (a folder or models:/NAME@ALIAS), benchmarks, modes, an output folder, or
    `checkpoints="all"` to also evaluate every checkpoint the last training saved (each an MLflow LoggedModel)."""
    cfg = eval_overrides(load_config(params), model, benchmarks, modes, out, checkpoints)
    return run_in_flow("evaluate", params, cfg)


STAGE_FLOWS: dict[str, Flow] = {name: evaluate_flow if name == "evaluate" else _stage_flow(stage)
                                for name, stage in STAGES.items()}
globals().update({f"{name}_flow": f for name, f in STAGE_FLOWS.items()})  # model_flow, train_flow, ...
