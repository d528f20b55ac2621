"""The whole chain on a real Prefect server, MLflow store and DVC repo, with the tiny configuration.

One pipeline run (module fixture) is inspected by several tests, in file order; the last ones change params.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import arft, copy_project

pytestmark = pytest.mark.slow

STAGES = ["model", "data", "search_index", "search_data", "validate", "train", "evaluate", "register", "promote"]


def dvc(*args: str, cwd: Path) -> str:
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def mlflow_client(project: Path):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{project}/tracking/mlflow.db")


@pytest.fixture(scope="module")
def pipeline_project(tmp_path_factory, prefect_server):
    # SFT saves a checkpoint at each of its 2 steps: with the final model, 3 models to compare.
    project = copy_project(tmp_path_factory.mktemp("e2e") / "project", {"train": {"sft": {"save_steps": 1}}})
    proc = arft("pipeline", cwd=project)
    return project, proc.stdout + proc.stderr


def test_pipeline_runs_every_stage_and_says_where_to_look(pipeline_project):
    project, output = pipeline_project
    assert stages_run(output) == STAGES
    assert f"mlflow ui --backend-store-uri sqlite:///{project}/tracking/mlflow.db" in output
    assert "/#/experiments/1?workflowType=machine_learning" in output  # the model-training view of the experiment
    assert "/#/experiments/1/models?workflowType=machine_learning" in output  # its Models tab: the checkpoints
    assert str(project / "reports" / "eval.json") in output
    scores = json.loads((project / "reports" / "eval.json").read_text())
    assert set(scores) == {"mat-coding", "mat-search", "multihop"}
    assert scores["mat-coding"]["agent"]["avg"]["n"] == 4 and set(scores["mat-coding"]) == {"agent", "direct"}
    assert scores["multihop"]["direct"]["avg"]["n"] == 2
    report = (project / "reports" / "eval_report.html").read_text()
    assert str(project / "reports" / "eval_report.html") in output and report.count('href="#') == 6
    rows = json.loads((project / "reports" / "predictions" / "mat-coding.agent.json").read_text())
    assert len(rows) == 4 and {"id", "gt", "pred_answer", "turns"} <= set(rows[0])
    assert json.loads((project / "reports" / "validation.json").read_text())["success"] is True


def test_mlflow_has_parent_and_nested_stage_runs(pipeline_project):
    project, _ = pipeline_project
    client = mlflow_client(project)
    exp = client.get_experiment_by_name("arft")
    assert exp.artifact_location == (project / "tracking" / "artifacts").as_uri()
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags["arft.stage"] == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    children = {r.data.tags["arft.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == sorted(STAGES)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    for run in [parent, *children.values()]:
        assert run.info.status == "FINISHED"
        assert run.data.tags["git.commit"] == commit
    train = children["train"]
    assert {"reward", "kl", "rewards.format_reward.mean", "steps"} <= set(train.data.metrics)
    assert train.data.params["train.max_steps"] == "1"
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    data_md5 = next(o["md5"] for o in lock["data"]["outs"] if o["path"] == "data/mat_coding")
    assert train.data.tags["dvc.input.data/mat_coding"] == data_md5
    assert train.data.tags["dvc.input.params.yaml"]
    assert {"mat-coding.agent.avg.f1", "mat-search.direct.simple.em", "multihop.agent.avg.no_answer_rate"} <= set(
        children["evaluate"].data.metrics)
    assert "data.n_train" in parent.data.params and "data.n_train" in children["data"].data.params


def test_checkpoints_are_logged_models_with_linked_metrics_and_traces(pipeline_project):
    """Every saved model is a LoggedModel of the train run with the evaluation's metrics linked at its step (and to
    the benchmark's dataset); each evaluated item of each model is one trace, linked to the model and the
    evaluation run, searchable by its tags."""
    import mlflow

    project, _ = pipeline_project
    client = mlflow_client(project)
    exp = client.get_experiment_by_name("arft")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    train = json.loads((project / "reports" / "train.json").read_text())
    assert [(m["step"], m["phase"]) for m in train["models"]] == [(1, "sft"), (2, "sft"), (3, "final")]
    models = client.search_logged_models([exp.experiment_id], filter_string=f"source_run_id = '{train['run_id']}'")
    assert sorted(int(m.tags["arft.step"]) for m in models) == [1, 2, 3]
    scores = json.loads((project / "reports" / "eval.json").read_text())
    per_model = sum(s["avg"]["n"] for modes in scores.values() for s in modes.values())
    evaluate_run = client.search_runs([exp.experiment_id], "tags.`arft.stage` = 'evaluate'")[0].info.run_id
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(f"sqlite:///{project}/tracking/mlflow.db")  # also exported to subprocesses: undo it
    try:
        for m in models:
            step = int(m.tags["arft.step"])
            assert m.status.to_int() == 2  # READY: the agent's files are logged
            linked = {x.key: x for x in m.metrics if x.run_id == evaluate_run}
            assert {"mat-coding.agent.avg.f1", "mat-coding.agent.avg.valid_action_rate",
                    "multihop.direct.avg.em"} <= set(linked)
            assert {x.step for x in linked.values()} == {step}
            assert linked["mat-search.agent.avg.f1"].dataset_name == "mat-search-test"
            traces = mlflow.search_traces(locations=[exp.experiment_id], return_type="list",
                                          filter_string=f"request_metadata.`mlflow.modelId` = '{m.model_id}'")
            assert len(traces) == per_model
            assert {t.info.request_metadata["mlflow.sourceRun"] for t in traces} == {evaluate_run}
            coding = mlflow.search_traces(
                locations=[exp.experiment_id], return_type="list",
                filter_string=f"request_metadata.`mlflow.modelId` = '{m.model_id}' AND "
                              "tags.`arft.benchmark` = 'mat-coding' AND tags.`arft.mode` = 'agent'")
            assert len(coding) == scores["mat-coding"]["agent"]["avg"]["n"]
            assert all(t.info.tags["arft.item_id"] and t.info.tags["arft.corruption"] for t in coding)
    finally:
        mlflow.set_tracking_uri(before)
    csv = (project / "reports" / "checkpoints" / "checkpoints.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in csv[1:]] == ["1", "2", "3"]


def test_each_stage_reads_only_the_params_it_declares(pipeline_project):
    """The sections a stage's code really read (recorded during the run) are among those dvc.yaml tracks for it;
    `paths` is tracked through the stage's deps and outs instead."""
    from arft_core.stages import STAGES

    project, _ = pipeline_project
    client = mlflow_client(project)
    runs = client.search_runs([client.get_experiment_by_name("arft").experiment_id], "tags.`arft.stage` != 'pipeline'")
    seen = {}
    for run in runs:
        read = set(filter(None, run.data.tags["arft.sections_read"].split(","))) - {"paths"}
        seen[run.data.tags["arft.stage"]] = read
        assert read <= set(STAGES[run.data.tags["arft.stage"]].sections), (run.data.tags["arft.stage"], read)
    assert set(seen) == set(STAGES) and "model" in seen["train"] and "sandbox" in seen["data"]


def test_registered_version_has_candidate_alias(pipeline_project):
    project, _ = pipeline_project
    client = mlflow_client(project)
    version = client.get_model_version_by_alias("arft-agent", "candidate")
    registration = json.loads((project / "reports" / "registration.json").read_text())
    assert str(version.version) == registration["version"] == "1"
    assert "eval.mat-coding.agent.avg.f1" in version.tags and version.tags["git.commit"]
    # Scores, fingerprint, data and code version only; each input's hash is a tag of the register run, and the
    # version's digest is of exactly those.
    assert len(version.tags) <= 40 and not any(k.startswith(("config.", "dvc.input.")) for k in version.tags)
    run_inputs = {k[len("dvc.input."):]: v for k, v in client.get_run(version.tags["arft.register_run"]).data.tags.items()
                  if k.startswith("dvc.input.")}
    assert run_inputs["models/trained"].endswith(".dir")
    import hashlib

    assert version.tags["dvc.inputs"] == hashlib.sha256(json.dumps(run_inputs, sort_keys=True).encode()).hexdigest()
    # The registered version is the LoggedModel of the final model, a model of the train run.
    train = json.loads((project / "reports" / "train.json").read_text())
    final = client.get_logged_model(version.source.removeprefix("models:/"))
    assert final.source_run_id == train["run_id"] and final.tags["arft.phase"] == "final"
    assert int(final.tags["arft.step"]) == train["models"][-1]["step"]
    # It loads by alias and runs the agent loop (None: the tiny model writes no <answer> tag).
    import mlflow
    import pandas as pd

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(f"sqlite:///{project}/tracking/mlflow.db")  # also exported to subprocesses: undo it
    try:
        item = json.loads((project / "data" / "mat_coding" / "test.json").read_text())[0]
        model = mlflow.pyfunc.load_model("models:/arft-agent@candidate")
        image = (project / "data" / "mat_coding" / item["processed_image_path"]).read_bytes()
        out = model.predict(pd.DataFrame({"question": [item["question"]], "image": [image]}))
    finally:
        mlflow.set_tracking_uri(before)
    assert len(out) == 1 and (out["answer"][0] is None or isinstance(out["answer"][0], str))
    assert len(json.loads(out["trajectory"][0])) == out["n_turns"][0] >= 1


def test_prefect_recorded_the_flow_runs(pipeline_project):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        names = {client.read_flow(r.flow_id).name: r.state.type.value for r in runs}
    assert names["arft-pipeline"] == "COMPLETED"
    assert all(names[f"arft-{s.replace('_', '-')}"] == "COMPLETED" for s in STAGES)


def test_second_repro_does_nothing(pipeline_project):
    project, _ = pipeline_project
    out = dvc("repro", cwd=project)
    assert stages_run(out) == []
    assert "Data and pipelines are up to date" in out


def _status_after(project: Path, edit) -> set[str]:
    """The stages `dvc status` lists after `edit()` (which returns a function that undoes it)."""
    undo = edit()
    try:
        out = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=project, capture_output=True,
                             text=True, check=True).stdout
    finally:
        undo()
    return {name.rsplit(":", 1)[-1] for name in json.loads(out or "{}")}


def _append_comment(path: Path):
    before = path.read_bytes()
    path.write_bytes(before + b"\n# an edit\n")
    return lambda: path.write_bytes(before)


def _set_param(project: Path, section: str, key: str, value):
    path = project / "params.yaml"
    before = path.read_bytes()
    params = yaml.safe_load(before)
    params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return lambda: path.write_bytes(before)


@pytest.mark.parametrize("rel,expected", [
    ("arft_core/model/embedded.py", {"model", "train", "evaluate"}),
    ("arft_core/metrics.py", {"train", "evaluate"}),
    ("arft_core/config.py", set(STAGES)),
    ("arft_core/sandbox/pool.py", {"data", "train", "evaluate"}),
    ("arft_core/search/cache.py", {"search_data", "train", "evaluate"}),
    ("arft_core/data/corruptions.py", {"data"}),
])
def test_editing_code_a_stage_imports_makes_it_stale(pipeline_project, rel, expected):
    """Even a comment: DVC hashes the files, and dvc.yaml declares every file a stage's code imports."""
    project, _ = pipeline_project
    assert expected <= _status_after(project, lambda: _append_comment(project / rel))


@pytest.mark.parametrize("section,key,value,expected,unaffected", [
    ("model", "dtype", "bfloat16", {"train", "evaluate"}, {"data", "validate"}),
    ("sandbox", "memory_mb", 777, {"data", "train", "evaluate"}, {"model", "validate"}),
    ("eval", "batch_size", 3, {"evaluate"}, {"model", "data", "search_data", "validate", "train"}),
])
def test_changing_a_param_makes_exactly_its_readers_stale(pipeline_project, section, key, value, expected,
                                                          unaffected):
    project, _ = pipeline_project
    stale = _status_after(project, lambda: _set_param(project, section, key, value))
    assert expected <= stale and not (stale & unaffected), stale


def test_dvc_push_and_pull_through_a_remote(pipeline_project, tmp_path):
    """The cached outputs go to a (local) remote and come back from it into an emptied cache: what a GPU worker or
    a teammate does with the team's MinIO remote."""
    import shutil

    from arft_core.tracking import content_hash

    project, _ = pipeline_project
    dvc("remote", "add", "--local", "-d", "scratch", str(tmp_path / "remote"), cwd=project)
    try:
        before = content_hash(project / "models" / "trained")
        assert "files pushed" in dvc("push", cwd=project)
        shutil.rmtree(project / ".dvc" / "cache")
        shutil.rmtree(project / "models" / "trained")
        assert "fetched" in dvc("pull", cwd=project)
        assert content_hash(project / "models" / "trained") == before
    finally:
        dvc("remote", "remove", "--local", "scratch", cwd=project)
    assert "Data and pipelines are up to date" in dvc("status", cwd=project)


def test_adhoc_eval_of_another_model_leaves_the_pipeline_outputs_alone(pipeline_project):
    project, _ = pipeline_project
    before = (project / "reports" / "eval.json").read_bytes()
    proc = arft("eval", "--model", "models/base", "--benchmark", "multihop", "--mode", "direct", "--out", "adhoc",
                cwd=project)
    assert "eval done" in proc.stdout
    scores = json.loads((project / "adhoc" / "eval.json").read_text())
    assert list(scores) == ["multihop"] and list(scores["multihop"]) == ["direct"]
    assert (project / "adhoc" / "predictions" / "multihop.direct.json").is_file()
    assert (project / "reports" / "eval.json").read_bytes() == before
    assert "Data and pipelines are up to date" in dvc("repro", cwd=project)
    bad = arft("eval", "--benchmark", "mat-nothing", cwd=project, check=False)
    assert bad.returncode == 1 and "mat-nothing" in bad.stderr


def _flow_runs(client, flow_name: str) -> list:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                 sort=FlowRunSort.EXPECTED_START_TIME_ASC)


def _logs(client, run, timeout: float = 60) -> str:
    """A flow run's log messages; they reach the server in batches after the run ends, so wait for its last one."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout
    while True:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
        text = "\n".join(log.message for log in logs)
        if "Finished in state" in text or time.monotonic() > deadline:
            return text
        time.sleep(1)


def test_scheduled_retraining_runs_on_changed_inputs_and_skips_otherwise(pipeline_project, tmp_path):
    """`arft deploy` registers the deployments on a real `prefect server start`; `arft deploy --serve` runs them.
    The schedule fires: a changed train param retrains (train, evaluate, register, promote) and records dvc.lock;
    the next firing finds nothing changed and skips training. The evaluation changed too, so promotion re-scores the
    champion, through its own search cache: the evaluation's outputs stay as DVC recorded them."""
    from prefect.client.orchestration import SyncPrefectClient

    from servers import prefect_server, stop

    project, _ = pipeline_project
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["learning_rate"] = 2e-5
    params["eval"]["max_new_tokens"] += 1
    params["retrain"]["cron"] = "* * * * * */15"  # every 15 s (croniter's sixth field is seconds)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with prefect_server(tmp_path / "prefect") as api:
        env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_RUNNER_POLL_FREQUENCY": "1",
               "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
        deployed = subprocess.run([sys.executable, "-m", "arft_core.cli", "deploy"], cwd=project, env=env,
                                  capture_output=True, text=True)
        assert deployed.returncode == 0, deployed.stderr
        with SyncPrefectClient(api) as client:
            deployments = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()}
            assert set(deployments) == {"arft-retrain/scheduled", "arft-train/gpu", "arft-evaluate/cpu"}
            assert deployments["arft-train/gpu"].work_pool_name == "gpu"
            assert deployments["arft-retrain/scheduled"].work_pool_name == "cpu"
            assert deployments["arft-retrain/scheduled"].schedules[0].schedule.cron == "* * * * * */15"
        log = (tmp_path / "serve.log").open("w")
        served = subprocess.Popen([sys.executable, "-m", "arft_core.cli", "deploy", "--serve"], cwd=project, env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
        try:
            with SyncPrefectClient(api) as client:
                deadline = time.monotonic() + 400
                while time.monotonic() < deadline:
                    # (firings while a run is going are cancelled: the deployment runs one at a time)
                    done = [r for r in _flow_runs(client, "arft-retrain")
                            if r.state.is_final() and not r.state.is_cancelled()]
                    if len(done) >= 2:
                        break
                    time.sleep(2)
                assert len(done) >= 2, (tmp_path / "serve.log").read_text()[-4000:]
                first, second = sorted(done, key=lambda r: r.start_time)[:2]
                assert first.state.is_completed() and second.state.is_completed()
                assert first.auto_scheduled and second.auto_scheduled  # fired by the schedule, not by hand
                first_logs, second_logs = _logs(client, first), _logs(client, second)
        finally:
            stop(served)
            log.close()
    assert "changed: train: changed deps: params.yaml (train)" in first_logs, first_logs
    assert "new dvc.lock recorded" in first_logs
    assert "'train': 'ran'" in first_logs and "'promote': 'ran'" in first_logs
    assert "inputs unchanged since the last run: skipping training" in second_logs
    assert "changed:" not in second_logs
    client = mlflow_client(project)
    assert str(client.get_model_version_by_alias("arft-agent", "candidate").version) == "2"
    promotion = json.loads((project / "reports" / "promotion.json").read_text())
    assert str(promotion["candidate_version"]) == "2" and "candidate_score" in promotion
    assert promotion["champion_rescored"] is True
    assert "Data and pipelines are up to date" in dvc("status", cwd=project)
    exp = client.get_experiment_by_name("arft")
    parent = client.search_runs([exp.experiment_id], "tags.`arft.stage` = 'pipeline'", order_by=["start_time DESC"])[0]
    assert "dvc.lock" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "Data and pipelines are up to date" in dvc("repro", cwd=project)


def test_validate_cli_names_the_broken_item(pipeline_project):
    project, _ = pipeline_project
    manifest = json.loads((project / "data" / "mat_coding" / "test.json").read_text())
    (project / "data" / "mat_coding" / manifest[0]["processed_image_path"]).write_bytes(b"corrupt")
    proc = arft("validate", cwd=project, check=False)
    assert proc.returncode == 1
    assert f"item id={manifest[0]['id']}: bad image" in proc.stderr
    assert "expect_column_values_to_be_in_set" in proc.stderr


def test_changing_a_corruption_parameter_reruns_data_generation(pipeline_project):
    project, _ = pipeline_project
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["ranges"]["dark_factor"] = [0.2, 0.3]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "data" in dvc("status", cwd=project)
    out = dvc("repro", "--single-item", "data", cwd=project)
    assert stages_run(out) == ["data"]
    report = json.loads((project / "reports" / "data.json").read_text())
    assert report["manifests"]["train"]["n"] == 8 and (project / "reports" / "contact_sheet.png").is_file()


def test_distributed_training_on_two_cpu_processes(pipeline_project):
    """train.launcher: torchrun starts 2 ranks (DDP over gloo); rank 0 gathers and writes checkpoints, the model
    and the metrics, and logs to the stage's MLflow run."""
    project, _ = pipeline_project
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(launcher="torchrun", num_processes=2, max_steps=2, save_steps=1)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    arft("train", cwd=project)
    summary = json.loads((project / "reports" / "train.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert sorted(p.name for p in (project / "models" / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-1", "checkpoint-2"]
    assert (project / "models" / "trained" / "model.safetensors").is_file()
    client = mlflow_client(project)
    exp = client.get_experiment_by_name("arft")
    run = client.search_runs([exp.experiment_id], "tags.`arft.stage` = 'train'", order_by=["start_time DESC"])[0]
    assert run.info.status == "FINISHED" and {"sft.loss", "reward", "world_size"} <= set(run.data.metrics)


def test_failed_validation_stops_the_chain(pipeline_project):
    # Last in the module (it leaves the data invalid): the validation suite stops accepting the 'dark' label, so
    # validation reruns and fails, and nothing after it runs.
    project, _ = pipeline_project
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["validation"]["known_labels"] = [x for x in params["validation"]["known_labels"] if x != "dark"]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = arft("pipeline", cwd=project, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert re.search(r"item id=\d+: unknown corruption label in type \(type='dark'\)", output)
    assert set(stages_run(output)) == {"validate"}  # (the failure message repeats the stage's last output)
    client = mlflow_client(project)
    runs = client.search_runs([client.get_experiment_by_name("arft").experiment_id], order_by=["start_time DESC"])
    latest = {}
    for r in runs:
        latest.setdefault(r.data.tags["arft.stage"], r.info.status)
    assert latest["pipeline"] == "FAILED" and latest["validate"] == "FAILED"
    assert "dvc-repro-train" not in output
