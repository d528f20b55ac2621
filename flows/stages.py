"""One Prefect flow per pipeline stage; each loads params.yaml and calls the shared stage function."""

from __future__ import annotations

from prefect import flow

from arft_core.config import load_config
from arft_core.stages import run_stage


def _run(stage: str, params: str | None) -> dict:
    return run_stage(stage, load_config(params))


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
def evaluate_flow(params: str | None = None) -> dict:
    """Evaluate the trained policy on the MAT-Coding test split (F1/EM)."""
    return _run("evaluate", params)


@flow(name="arft-register", log_prints=True)
def register_flow(params: str | None = None) -> dict:
    """Register the trained model in MLflow and set its alias."""
    return _run("register", params)


STAGE_FLOWS = {
    "model": model_flow,
    "data": data_flow,
    "validate": validate_flow,
    "train": train_flow,
    "evaluate": evaluate_flow,
    "register": register_flow,
}
