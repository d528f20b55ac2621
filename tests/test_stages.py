"""The stage glue: dvc.yaml is the one list of stages, and the registry, the Prefect flows and the CLI commands are
made from it and checked against it; "ran or cached" comes from DVC; a params file other than params.yaml reaches
every stage of `arft pipeline` (and `arft retrain`), which then runs them in-process and leaves dvc.lock alone."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import click
import pytest
import typer
import yaml
from typer.testing import CliRunner

from arft_core import cli
from arft_core.config import Config
from arft_core.stages import STAGES
from conftest import ROOT, copy_project
from flows import stages as stage_flows

DVC_STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


class Dispatched(Exception):
    def __init__(self, stage: str, params):
        super().__init__(stage)
        self.stage, self.params = stage, params


def resolve(words: list[str]) -> click.Command:
    """The click command `arft WORDS...` resolves to."""
    command = typer.main.get_command(cli.app)
    for word in words:
        command = command.get_command(click.Context(command), word)
        assert command is not None, f"arft {' '.join(words)}: no such command"
    return command


def test_registry_flows_and_cli_are_dvc_yamls_stages():
    assert list(STAGES) == list(DVC_STAGES)  # same stages, same order: a stage added on one side only fails here
    assert list(stage_flows.STAGE_FLOWS) == list(DVC_STAGES)
    for name, stage in STAGES.items():
        flow = stage_flows.STAGE_FLOWS[name]
        assert flow.name == stage.flow_name == f"arft-{name.replace('_', '-')}"
        # a deployment loads the flow from its entrypoint, flows/stages.py:<name>_flow
        assert getattr(stage_flows, f"{name}_flow") is flow and flow.fn.__qualname__ == f"{name}_flow"
        assert flow.description == stage.help != ""
        assert set(stage.sections) <= set(Config.model_fields), name


@pytest.mark.parametrize("name", list(DVC_STAGES))
def test_dvc_cmd_is_the_cli_command_that_runs_its_stage(name, monkeypatch):
    words = shlex.split(DVC_STAGES[name]["cmd"])
    assert words[0] == "arft" and DVC_STAGES[name]["cmd"] == STAGES[name].cmd
    assert resolve(words[1:]).help.startswith(STAGES[name].help)  # the help is the stage function's docstring

    def dispatch(stage, params):
        raise Dispatched(stage, params)

    monkeypatch.setattr(cli, "_run_stage", dispatch)
    result = CliRunner().invoke(cli.app, [*words[1:], "-p", "other.yaml"])
    assert isinstance(result.exception, Dispatched), result.output
    assert (result.exception.stage, result.exception.params) == (name, Path("other.yaml"))


def test_every_stage_flow_runs_its_own_stage_with_the_given_params(tiny_params, monkeypatch):
    seen = []
    monkeypatch.setattr(stage_flows, "run_stage", lambda stage, cfg: seen.append((stage, cfg.source)) or {})
    for name, flow in stage_flows.STAGE_FLOWS.items():
        flow.fn(params=str(tiny_params))  # the flow's body, without a Prefect run
    assert seen == [(name, tiny_params) for name in DVC_STAGES]


def dvc(*args: str, cwd: Path) -> None:
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, check=True, capture_output=True)


def test_ran_or_cached_is_dvcs_decision(tmp_path):
    from flows.pipeline import reproduce_stage

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc("init", "-q", cwd=tmp_path)
    copy = f"{shlex.quote(sys.executable)} -c \"import shutil; shutil.copy('in.txt', 'out.txt')\""
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(
        {"stages": {"copy": {"cmd": copy, "deps": ["in.txt"], "outs": [{"out.txt": {"cache": False}}]}}}))
    (tmp_path / "in.txt").write_text("a")
    repro = reproduce_stage.fn  # the task's body, without a Prefect run
    assert repro("copy", str(tmp_path)) == "ran"
    lock = (tmp_path / "dvc.lock").read_bytes()
    assert repro("copy", str(tmp_path)) == "cached"
    assert repro("copy", str(tmp_path), force=True) == "ran"
    (tmp_path / "out.txt").unlink()  # DVC reruns it, though its dvc.lock entry comes out the same
    assert repro("copy", str(tmp_path)) == "ran" and (tmp_path / "dvc.lock").read_bytes() == lock
    (tmp_path / "in.txt").write_text("b")
    assert repro("copy", str(tmp_path)) == "ran" and (tmp_path / "out.txt").read_text() == "b"


def test_pipeline_and_retrain_with_another_params_file_run_every_stage_with_its_values(tmp_path, prefect_server,
                                                                                     monkeypatch, caplog):
    """`arft pipeline -p other.yaml`: every stage gets other.yaml's values, in one MLflow parent run and one Prefect
    flow run (the stages' own functions are replaced by recorders; the glue around them is real)."""
    import mlflow

    project = copy_project(tmp_path / "project")
    other = project / "other.yaml"
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["n_train"] = 5
    other.write_text(yaml.safe_dump(params, sort_keys=False))
    lock_file = project / "dvc.lock"
    lock = lock_file.read_bytes() if lock_file.exists() else None  # (None: no run recorded yet; it stays so)
    seen = []
    for name, stage in STAGES.items():
        monkeypatch.setitem(STAGES, name, replace(stage, run=lambda cfg, name=name: seen.append(
            (name, cfg.source, cfg.data.n_train, mlflow.active_run().data.tags.get("mlflow.parentRunId"))) or {}))
    uri = f"sqlite:///{project}/tracking/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(project)
    result = CliRunner().invoke(cli.app, ["pipeline", "-p", str(other)])
    assert result.exit_code == 0, result.output
    # A flow's print() goes to its Prefect run logger (log_prints), which caplog sees.
    notices = [r.getMessage() for r in caplog.records if "DVC change tracking is off" in r.getMessage()]
    assert len(notices) == 1 and str(other) in notices[0], [r.getMessage() for r in caplog.records]
    client = mlflow.MlflowClient(uri)
    parent = client.search_runs([client.get_experiment_by_name("arft").experiment_id],
                                "tags.`arft.stage` = 'pipeline'")[0]
    assert seen == [(name, other, 5, parent.info.run_id) for name in DVC_STAGES]
    assert parent.data.params["data.n_train"] == "5" and parent.data.tags["stage.train"] == "ran"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["arft.stage"] for r in children) == sorted(DVC_STAGES)
    data = next(r for r in children if r.data.tags["arft.stage"] == "data")
    assert data.data.params["data.n_train"] == "5" and not any(t.startswith("dvc.") for t in data.data.tags)
    assert (lock_file.read_bytes() if lock_file.exists() else None) == lock

    seen.clear()
    result = CliRunner().invoke(cli.app, ["retrain", "-p", str(other)])
    assert result.exit_code == 0, result.output
    retrained = json.loads(next(ln for ln in reversed(result.output.splitlines()) if ln.startswith("{")))
    assert retrained["lock"] is None and set(retrained["stages"].values()) == {"ran"}
    assert [s[:3] for s in seen] == [(name, other, 5) for name in DVC_STAGES]
    assert (lock_file.read_bytes() if lock_file.exists() else None) == lock
