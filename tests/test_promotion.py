"""Training rounds on the tiny model, tracked on the team backend: MLflow server over PostgreSQL, artifacts proxied
by the server. Each round imports annotations, trains, evaluates, registers and runs the promotion gate; the scores
differ because the data does (real SFT + GRPO, real evaluation), not because anything is scripted.

Round 1 learns the answer "otter" (test gold: otter / otter falcon / otter falcon -> F1 77.78) and becomes champion.
Round 2 skips the SFT cold start (the tiny model then writes no answer: F1 0) and stays candidate.
Round 3 gets new annotations, "otter falcon" (F1 88.89), on a changed evaluation (longer generations): the champion
is re-scored on it, and the candidate takes the champion alias. Its models (two GRPO checkpoints and the final one)
are LoggedModels of its train run, then compared again with `arft eval --checkpoints all`.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from conftest import arft, copy_project, merge
from servers import mlflow_server, postgres

pytestmark = pytest.mark.slow

# (animal drawn on the card, card colour, gold answer of the test item)
CARDS = [("otter", "red", "otter"), ("falcon", "blue", "otter falcon"), ("walrus", "green", "otter falcon")]
OVERRIDES = {
    "train": {"task": "search", "max_steps": 1, "sft": {"max_steps": 70, "batch_size": 4, "learning_rate": 5e-3}},
    "eval": {"benchmarks": ["mat-search"], "modes": ["agent"], "max_new_tokens": 40},
    "agent": {"max_turns": 1},
    "tracking": {"promotion_metrics": ["eval.mat-search.agent.avg.f1"], "promotion_margin": 1.0},
}


def write_annotations(folder: Path, train_answer: str) -> Path:
    """A JSONL export: each card once for training (answer `train_answer`) and once for the test set."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (animal, colour, gold) in enumerate(CARDS):
        image = Image.new("RGB", (64, 64), colour)
        ImageDraw.Draw(image).text((4, 24), animal, fill="black")
        image.save(folder / f"{animal}.png")
        question = f"Which animals are named on the {colour} card?"
        common = {"question": question, "image_path": f"{animal}.png", "split": ("hard", "simple")[i % 2]}
        rows.append({"id": f"{animal}-train", "answer": [train_answer], "partition": "train", **common})
        rows.append({"id": f"{animal}-test", "answer": [gold], "partition": "test", **common})
    export = folder / "export.jsonl"
    export.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return export


@pytest.fixture(scope="module")
def team_mlflow(tmp_path_factory):
    base = tmp_path_factory.mktemp("team")
    with postgres() as database, mlflow_server(database, base / "artifacts") as url:
        yield url, base / "artifacts"


def test_training_rounds_promote_only_a_better_model(tmp_path, team_mlflow, monkeypatch):
    import mlflow

    from arft_core.config import load_config
    from arft_core.stages import run_stage

    url, artifact_store = team_mlflow
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)  # restored afterwards (mlflow.set_tracking_uri exports it too)
    annotations = tmp_path / "annotations"
    write_annotations(annotations, "otter")
    project = copy_project(tmp_path / "project", merge(OVERRIDES, {
        "search_data": {"export": str(annotations / "export.jsonl"), "image_dir": str(annotations)}}))
    params = project / "params.yaml"

    def run_round(**changes) -> dict:
        import yaml

        data = yaml.safe_load(params.read_text())
        params.write_text(yaml.safe_dump(merge(data, changes), sort_keys=False))
        cfg = load_config(params)
        for stage in ("search_data", "train", "evaluate", "register", "promote"):
            run_stage(stage, cfg)
        return json.loads((project / "reports" / "promotion.json").read_text())

    for stage in ("model", "search_index"):
        run_stage(stage, load_config(params))
    first = run_round()
    assert first["promoted"] and first["reason"] == "no scored champion yet"
    assert first["candidate_score"] == pytest.approx(77.78, abs=0.01)

    second = run_round(train={"sft": {"enabled": False}})
    assert not second["promoted"] and second["champion_now"] == first["candidate_version"]
    assert (second["candidate_score"], second["champion_score"]) == (0.0, pytest.approx(77.78, abs=0.01))

    write_annotations(annotations, "otter falcon")  # new annotations arrive
    third = run_round(train={"sft": {"enabled": True}, "max_steps": 3, "save_steps": 1, "save_total_limit": 3},
                      eval={"max_new_tokens": 48})
    assert third["promoted"] and third["champion_rescored"]  # another evaluation: the champion was re-scored
    assert third["candidate_score"] == pytest.approx(88.89, abs=0.01)
    assert third["champion_score"] == pytest.approx(77.78, abs=0.01)

    # The registry, on PostgreSQL: aliases, tags with both scores, data hashes, config and commit.
    client = mlflow.MlflowClient(url)
    name = "arft-agent"
    assert client.get_model_version_by_alias(name, "champion").version == third["candidate_version"]
    assert client.get_model_version_by_alias(name, "candidate").version == third["candidate_version"]
    v2 = client.get_model_version(name, second["candidate_version"]).tags
    assert v2["promotion.promoted"] == "False" and float(v2["promotion.champion_score"]) == pytest.approx(77.78, 0.01)
    assert v2["dvc.data.data/mat_search"].endswith(".dir") and len(v2) <= 40
    register_run = v2["arft.register_run"]
    resolved = mlflow.artifacts.load_dict(f"runs:/{register_run}/config/resolved_params.json")
    assert resolved["train"]["sft"]["enabled"] is False  # the config travels as one artifact, not tags
    assert v2["git.commit"] != "unknown" and len(v2["eval.fingerprint"]) == 16
    # Each decision is an MLflow run with both scores.
    exp = client.get_experiment_by_name("arft")
    runs = client.search_runs([exp.experiment_id], "tags.`arft.stage` = 'promote'", order_by=["start_time ASC"])
    assert [r.data.tags["promotion.promoted"] for r in runs] == ["True", "False", "True"]
    assert runs[1].data.metrics["champion_score"] == pytest.approx(77.78, abs=0.01)
    assert runs[1].data.metrics["candidate_score"] == 0.0
    # Artifacts went through the server into its store.
    assert list(artifact_store.rglob("promotion.json")) and list(artifact_store.rglob("model.safetensors"))

    # Round 3's models are LoggedModels of its train run (SFT's 70 steps, then GRPO checkpoints 71, 72 and the final
    # 73), each with its metrics linked at its step; the registered version is the final one.
    train = json.loads((project / "reports" / "train.json").read_text())
    assert [(m["step"], m["phase"]) for m in train["models"]] == [(71, "grpo"), (72, "grpo"), (73, "final")]
    logged = mlflow.search_logged_models(experiment_ids=[exp.experiment_id], output_format="list",
                                         filter_string=f"source_run_id = '{train['run_id']}'")
    assert sorted(int(m.tags["arft.step"]) for m in logged) == [71, 72, 73]
    for m in logged:
        linked = [x for x in m.metrics if x.key == "mat-search.agent.avg.f1"]
        assert [x.step for x in linked] == [int(m.tags["arft.step"])] and linked[0].dataset_name == "mat-search-test"
    final = next(m for m in logged if m.tags["arft.phase"] == "final")
    assert client.get_model_version(name, third["candidate_version"]).source == f"models:/{final.model_id}"

    # The champion loads by alias, and every model of round 3 is compared with it on the same evaluation.
    proc = arft("eval", "--model", "models:/arft-agent@champion", "--checkpoints", "all", "--out", "cmp",
                cwd=project)
    assert json.loads((project / "cmp" / "eval.json").read_text())["mat-search"]["agent"]["avg"]["f1"] == \
        pytest.approx(88.89, abs=0.01), proc.stdout
    lines = (project / "cmp" / "checkpoints" / "checkpoints.csv").read_text().splitlines()
    assert lines[0].split(",")[:2] == ["step", "mat-search.agent.f1"] and [ln.split(",")[0] for ln in lines[1:]] \
        == ["71", "72", "73"]
    assert (project / "cmp" / "checkpoints" / "f1_vs_step.png").stat().st_size > 5000

    # The MLflow UI and REST API serve it all.
    page = urllib.request.urlopen(f"{url}/").read().decode()
    assert "<title>MLflow</title>" in page
    listed = json.load(urllib.request.urlopen(f"{url}/api/2.0/mlflow/registered-models/get?name={name}"))
    assert {a["alias"] for a in listed["registered_model"]["aliases"]} == {"champion", "candidate"}
