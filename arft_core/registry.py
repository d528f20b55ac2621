"""Registration: the trained model is logged to MLflow as a pyfunc agent, registered, tagged and aliased."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd


class AgentModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: input rows with `question` and `image_path`, output one answer (or None) per row."""

    def load_context(self, context):
        from arft_core.model.embedded import load_model

        self.model, self.processor = load_model(Path(context.artifacts["model"]))

    def predict(self, context, model_input: pd.DataFrame, params=None):
        """One answer step per row (the coding prompt), generated in batches by the evaluation's back-end."""
        from arft_core.agent.generation import HFGenerator
        from arft_core.agent.rollout import Prompt
        from arft_core.config import EvalConfig
        from arft_core.protocol import coding_prompt, extract_answer

        prompts = [Prompt(coding_prompt(q), [Path(p)], i, 1)
                   for i, (q, p) in enumerate(zip(model_input["question"], model_input["image_path"], strict=True))]
        completions = HFGenerator(self.model, self.processor, EvalConfig()).generate(prompts)
        return [extract_answer(c) for c in completions]


def _requirements() -> list[str]:
    import torch
    import transformers

    return [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}", "pillow"]


def register_model(model_dir: Path, name: str, alias: str, tags: dict[str, str]) -> dict:
    """Log `model_dir` in the active run, register a new version of `name`, tag it and point `alias` at it."""
    client = mlflow.MlflowClient()
    info = mlflow.pyfunc.log_model(name="model", python_model=AgentModel(), artifacts={"model": str(model_dir)},
                                   pip_requirements=_requirements(), registered_model_name=name)
    version = str(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, alias, version)
    return {"name": name, "version": version, "alias": alias, "model_uri": f"models:/{name}@{alias}",
            "run_id": mlflow.active_run().info.run_id}
