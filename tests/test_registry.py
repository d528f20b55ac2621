"""The promotion gate on a real MLflow registry (SQLite): the first candidate becomes champion, a worse one stays
candidate, a better one takes champion; every decision is tagged with both scores; `arft promote` / `arft models`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from arft_core.registry import list_versions, promote, version_score
from conftest import ROOT

METRICS = ["eval.mat-coding.agent.avg.f1", "eval.mat-search.agent.avg.f1"]


@pytest.fixture
def registry(tmp_path: Path):
    # set_tracking_uri also exports MLFLOW_TRACKING_URI to every later subprocess: restore it afterwards.
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.MlflowClient()
    client.create_registered_model("agent")
    yield client, tmp_path
    mlflow.set_tracking_uri(before)


def new_candidate(client, coding: float, search: float) -> str:
    version = client.create_model_version("agent", source="models/trained",
                                          tags={METRICS[0]: str(coding), METRICS[1]: str(search)}).version
    client.set_registered_model_alias("agent", "candidate", version)
    return version


def test_version_score_needs_every_metric():
    assert version_score({METRICS[0]: "10", METRICS[1]: "30"}, METRICS) == 20.0
    assert version_score({METRICS[0]: "10"}, METRICS) is None


def test_gate_promotes_only_a_better_candidate(registry):
    client, _ = registry
    v1 = new_candidate(client, 20.0, 40.0)
    first = promote("agent", METRICS, margin=1.0, client=client)
    assert first["promoted"] and first["champion_now"] == v1 and first["reason"] == "no scored champion yet"

    v2 = new_candidate(client, 19.0, 42.0)  # 30.5 vs 30.0: better, but not by the margin
    second = promote("agent", METRICS, margin=1.0, client=client)
    assert not second["promoted"] and (second["candidate_score"], second["champion_score"]) == (30.5, 30.0)
    assert client.get_model_version_by_alias("agent", "champion").version == v1
    assert client.get_model_version_by_alias("agent", "candidate").version == v2

    v3 = new_candidate(client, 30.0, 45.0)
    third = promote("agent", METRICS, margin=1.0, client=client)
    assert third["promoted"] and client.get_model_version_by_alias("agent", "champion").version == v3
    tags = client.get_model_version("agent", v2).tags
    assert tags["promotion.promoted"] == "False" and tags["promotion.champion_score"] == "30.0"
    assert tags["promotion.candidate_score"] == "30.5"
    rows = list_versions("agent", METRICS, client=client)
    assert [r["version"] for r in rows] == [str(v) for v in (v3, v2, v1)]
    assert rows[0]["aliases"] == ["candidate", "champion"] and rows[0]["score"] == 37.5


def test_champion_of_another_evaluation_is_rescored(registry):
    client, _ = registry
    v1 = new_candidate(client, 20.0, 40.0)
    client.set_model_version_tag("agent", v1, "eval.fingerprint", "old-eval")
    promote("agent", METRICS, margin=0.0, client=client)
    v2 = new_candidate(client, 25.0, 40.0)  # 32.5 beats the stored 30.0, but not the re-scored 35.0
    client.set_model_version_tag("agent", v2, "eval.fingerprint", "new-eval")
    with pytest.raises(ValueError, match="scored on another evaluation"):
        promote("agent", METRICS, margin=0.0, client=client)
    seen = []

    def rescore(version):
        seen.append(version.version)
        return {METRICS[0]: "30.0", METRICS[1]: "40.0"}

    decision = promote("agent", METRICS, margin=0.0, client=client, rescore=rescore)
    assert seen == [v1] and decision["champion_rescored"] and decision["champion_score"] == 35.0
    assert not decision["promoted"] and client.get_model_version_by_alias("agent", "champion").version == v1


def test_candidate_without_scores_is_refused(registry):
    client, _ = registry
    version = client.create_model_version("agent", source="models/trained").version
    client.set_registered_model_alias("agent", "candidate", version)
    with pytest.raises(ValueError, match="no score, it lacks tag"):
        promote("agent", METRICS, margin=0.0, client=client)


def test_promote_and_models_cli(registry, prefect_server):
    client, tmp_path = registry
    new_candidate(client, 10.0, 20.0)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["tracking"].update(uri=f"sqlite:///{tmp_path}/mlflow.db", registered_model="agent")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = subprocess.run([sys.executable, "-m", "arft_core.cli", "promote", "-p", str(tmp_path / "params.yaml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    decision = json.loads((tmp_path / "reports" / "promotion.json").read_text())
    assert decision["promoted"] is True and "promoted: @champion -> version 1" in out.stdout + out.stderr
    listed = subprocess.run([sys.executable, "-m", "arft_core.cli", "models", "-p", str(tmp_path / "params.yaml")],
                            capture_output=True, text=True)
    assert listed.returncode == 0 and "champion" in listed.stdout and "15.0000" in listed.stdout
