"""One Prefect flow per pipeline stage; each loads params.yaml and calls the shared stage function."""

from __future__ import annotations

from prefect import flow

from arft_core.config import load_config
from arft_core.stages import eval_overrides, run_stage


def _export_search_key(cfg) -> None:
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


def _run(stage: str, params: str | None, cfg=None) -> dict:
    cfg = cfg or load_config(params)
    if stage in ("search_data", "evaluate"):
        _export_search_key(cfg)
    return run_stage(stage, cfg)


@flow(name="arft-model", log_prints=True)
def model_flow(params: str | None = None) -> dict:
    """Build the embedded base model (or check and reference a real checkpoint)."""
    return _run("model", params)


@flow(name="arft-data", log_prints=True)
def data_flow(params: str | None = None) -> dict:
    """Generate the MAT-Coding train/test manifests and images."""
    return _run("data", params)


@flow(name="arft-validate", log_prints=True)
def validate_flow(params: str | None = None) -> dict:
    """Validate the manifests with the Great Expectations suite; fails with a per-item report."""
    return _run("validate", params)


@flow(name="arft-train", log_prints=True)
def train_flow(params: str | None = None) -> dict:
    """GRPO-train the policy (TRL GRPOTrainer)."""
    return _run("train", params)


@flow(name="arft-evaluate", log_prints=True)
def evaluate_flow(params: str | None = None, model: str | None = None, benchmarks: list[str] | None = None,
                  modes: list[str] | None = None, out: str | None = None, checkpoints: str | None = None) -> dict:
    """Evaluate a model on MAT-Coding, MAT-Search and multi-hop QA, with tools and direct (F1/EM).

    With no overrides this is the pipeline's stage (the trained model, outputs at the configured paths);
    `checkpoints="all"` also evaluates every saved training checkpoint (one MLflow child run each).
    """
    cfg = eval_overrides(load_config(params), model, benchmarks, modes, out, checkpoints)
    return _run("evaluate", params, cfg)


@flow(name="arft-register", log_prints=True)
def register_flow(params: str | None = None) -> dict:
    """Register the trained model in MLflow and set its alias."""
    return _run("register", params)


@flow(name="arft-promote", log_prints=True)
def promote_flow(params: str | None = None) -> dict:
    """Move the champion alias to the candidate when it scores better by the margin on the same evaluation."""
    return _run("promote", params)


@flow(name="arft-search-index", log_prints=True)
def search_index_flow(params: str | None = None) -> dict:
    """Build the local search index over the corpus."""
    return _run("search_index", params)


@flow(name="arft-search-data", log_prints=True)
def search_data_flow(params: str | None = None) -> dict:
    """Import MAT-Search annotations and build their step samples through the search cache."""
    return _run("search_data", params)


STAGE_FLOWS = {
    "model": model_flow,
    "data": data_flow,
    "search_index": search_index_flow,
    "search_data": search_data_flow,
    "validate": validate_flow,
    "train": train_flow,
    "evaluate": evaluate_flow,
    "register": register_flow,
    "promote": promote_flow,
}
