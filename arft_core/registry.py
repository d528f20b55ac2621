"""Registration: the trained model is logged to MLflow as a pyfunc agent, registered, tagged and aliased."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

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


# ---- promotion gate
FINGERPRINT = "eval.fingerprint"  # version tag: which frozen evaluation its scores come from


def version_score(tags: dict[str, str], metrics: list[str]) -> float | None:
    """Mean of the version's metric tags (e.g. `eval.mat-coding.agent.avg.f1`); None when one is missing."""
    if not metrics or any(m not in tags for m in metrics):
        return None
    return sum(float(tags[m]) for m in metrics) / len(metrics)


def promote(name: str, metrics: list[str], margin: float, candidate: str = "candidate",
            champion: str = "champion", client=None, rescore: Callable[[Any], dict[str, str]] | None = None) -> dict:
    """Move `champion` to the `candidate` version when it beats the champion's score by more than `margin` (or
    when there is no champion yet). The decision and both scores are tagged on the candidate version.

    Both must be scored on the same frozen evaluation: when the versions' `eval.fingerprint` tags differ (the test
    sets or evaluation settings changed since the champion was scored), `rescore(champion_version)` evaluates the
    champion again on the candidate's evaluation and returns its metric tags; without `rescore` that is an error.
    """
    from mlflow.exceptions import MlflowException

    client = client or mlflow.MlflowClient()
    cand = client.get_model_version_by_alias(name, candidate)
    cand_score = version_score(cand.tags, metrics)
    if cand_score is None:
        raise ValueError(f"{name} version {cand.version}: no score, it lacks tag(s) "
                         f"{', '.join(m for m in metrics if m not in cand.tags)}")
    try:
        champ = client.get_model_version_by_alias(name, champion)
    except MlflowException:
        champ = None
    champ_tags, rescored = (champ.tags if champ else {}), False
    if champ and champ.version != cand.version and champ.tags.get(FINGERPRINT) != cand.tags.get(FINGERPRINT):
        if rescore is None:
            raise ValueError(f"{name}: champion version {champ.version} was scored on another evaluation "
                             f"({champ.tags.get(FINGERPRINT)} vs {cand.tags.get(FINGERPRINT)}); re-score it first")
        champ_tags, rescored = rescore(champ), True
    champ_score = version_score(champ_tags, metrics) if champ else None
    if champ is None or champ_score is None:
        promoted, reason = True, "no scored champion yet"
    elif champ.version == cand.version:
        promoted, reason = False, "the candidate already is the champion"
    elif cand_score > champ_score + margin:
        promoted, reason = True, f"candidate {cand_score:.4f} > champion {champ_score:.4f} + margin {margin}"
    else:
        promoted, reason = False, f"candidate {cand_score:.4f} <= champion {champ_score:.4f} + margin {margin}"
    if promoted:
        client.set_registered_model_alias(name, champion, cand.version)
    decision = {"name": name, "candidate_version": cand.version, "candidate_score": cand_score,
                "champion_version": champ.version if champ else None, "champion_score": champ_score,
                "champion_rescored": rescored, "promoted": promoted, "reason": reason,
                "champion_now": cand.version if promoted else (champ.version if champ else None)}
    for key in ("promoted", "reason", "candidate_score", "champion_score", "champion_version", "champion_rescored"):
        client.set_model_version_tag(name, cand.version, f"promotion.{key}", str(decision[key]))
    return decision


def list_versions(name: str, metrics: list[str], client=None) -> list[dict]:
    """Every version of `name`, newest first, with its aliases and score."""
    client = client or mlflow.MlflowClient()
    versions = client.search_model_versions(f"name = '{name}'")
    aliases: dict[str, list[str]] = {}  # search results carry no aliases; the registered model has them all
    for alias, version in (client.get_registered_model(name).aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    rows = [{"version": str(v.version), "aliases": sorted(aliases.get(str(v.version), [])),
             "score": version_score(v.tags, metrics), "run_id": v.run_id,
             "git_commit": v.tags.get("git.commit", "")} for v in versions]
    return sorted(rows, key=lambda r: int(r["version"]), reverse=True)
