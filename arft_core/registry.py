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
        from PIL import Image

        from arft_core.config import EvalConfig
        from arft_core.evaluation import generate_answers
        from arft_core.protocol import extract_answer

        images = [Image.open(p).convert("RGB") for p in model_input["image_path"]]
        completions = generate_answers(self.model, self.processor, list(model_input["question"]), images,
                                       EvalConfig())
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
