"""The pipeline's stages: one function each, shared by the CLI (`arft <stage>`), the Prefect flows and dvc.yaml.

`STAGES` is the registry: stage name -> its function, the params sections it reads and the CLI command that runs
it. dvc.yaml is the only list of stages and their order; tests/test_stages.py checks that this registry, the
Prefect flows (flows/stages.py, derived from it) and the CLI commands (arft_core/cli.py, derived from it) match
dvc.yaml, and that each dvc.yaml `cmd` is the CLI command of its stage. A stage's help text (CLI, flow
description) is its function's docstring.

`run_stage` wraps a stage in its MLflow run and logs what it returns; each stage reads and writes only the paths
of `params.yaml`, and writes its outputs whole (a failed stage leaves no half-written output behind as valid).
The stage bodies live by concern: `data` (model, data, search_index, search_data, validate), `train` (and the
distributed launch), `evaluate` (and ad-hoc evaluations, the checkpoint sweep), `release` (register, promote).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from arft_core.config import Config
from arft_core.stages.data import data_stage, model_stage, search_data_stage, search_index_stage, validate_stage
from arft_core.stages.evaluate import evaluate_stage
from arft_core.stages.release import promote_stage, register_stage
from arft_core.stages.train import train_stage


@dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    `sections`: the params.yaml sections its code reads, logged as its MLflow run's params. Every stage also reads
    `paths` (where its inputs and outputs are) and `tracking` for its MLflow run; those two are listed only where
    the stage's own work uses them. `command`: the words after `arft` that run it (dvc.yaml's `cmd`). `report`: a
    `paths` key whose file the CLI prints when the stage is done.
    """

    name: str
    run: Callable[[Config], dict]
    sections: tuple[str, ...]
    command: tuple[str, ...]
    report: str | None = None

    @property
    def help(self) -> str:
        """What the stage does: its function's docstring (the CLI's help and the Prefect flow's description)."""
        return inspect.getdoc(self.run) or ""

    @property
    def flow_name(self) -> str:
        """Its Prefect flow: `arft-<name with - for _>`."""
        return "arft-" + self.name.replace("_", "-")

    @property
    def cmd(self) -> str:
        """The shell command that runs it, as dvc.yaml writes it."""
        return " ".join(["arft", *self.command])


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("model", model_stage, ("model",), ("model",)),
    Stage("data", data_stage, ("data", "sandbox"), ("data", "coding")),
    Stage("search_index", search_index_stage, ("search",), ("data", "search-index")),
    Stage("search_data", search_data_stage, ("search_data", "search", "validation"), ("data", "search")),
    Stage("validate", validate_stage, ("validation", "data"), ("validate",)),
    Stage("train", train_stage, ("train", "train_presets", "model", "sandbox", "search", "agent", "rollout"),
          ("train",)),
    # train.preset and train_presets: a preset also sets eval and agent values (the paper's decoding and protocol).
    Stage("evaluate", evaluate_stage, ("eval", "rollout", "agent", "search", "sandbox", "model", "train",
                                       "train_presets", "serving"),
          ("evaluate",)),
    Stage("register", register_stage, ("tracking", "eval", "rollout", "agent", "search", "train", "train_presets",
                                       "model"),
          ("register",)),
    Stage("promote", promote_stage, ("tracking", "eval", "rollout", "agent", "search", "sandbox", "model",
                                     "train", "train_presets"), ("promote",), report="promotion"),
)}


def run_stage(name: str, cfg: Config) -> dict:
    """Run one stage inside its MLflow run; returns the stage's summary (also logged as metrics)."""
    from arft_core.tracking import log_metrics, stage_run

    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    import mlflow

    from arft_core.config import sections_read

    stage = STAGES[name]
    with stage_run(cfg, name, list(stage.sections)):
        with sections_read() as read:
            summary = stage.run(cfg)
        # What the stage really read, beside what it declares (tests/test_pipeline.py compares them).
        mlflow.set_tag("arft.sections_read", ",".join(sorted(read)))
        log_metrics(summary)
    return summary
