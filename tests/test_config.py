from pathlib import Path

import pytest
import yaml

from arft_core.config import Config, ConfigError, describe, load_config
from conftest import ROOT, arft


def test_project_params_match_schema_defaults():
    cfg = load_config(ROOT / "params.yaml")
    # params.yaml spells out every setting; it must agree with the documented defaults.
    assert cfg.model_dump() == Config().model_dump()
    assert cfg.root == ROOT


def test_unknown_key_is_named(tmp_path: Path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"learning_rte": 1e-5}}))
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "params.yaml")
    assert "train.learning_rte: unknown key" in str(exc.value)


def test_mistyped_value_is_named(tmp_path: Path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"max_steps": "many"}, "data": {"n_test": 0}}))
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "params.yaml")
    assert "train.max_steps" in str(exc.value) and "'many'" in str(exc.value)
    assert "data.n_test" in str(exc.value)


def test_dvc_style_float_string_is_read_as_float(tmp_path: Path):
    # `dvc exp run -S train.learning_rate=2e-6` writes 2e-06, which PyYAML reads as a string.
    (tmp_path / "params.yaml").write_text("train:\n  learning_rate: 2e-06\n")
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["train"]["learning_rate"] == "2e-06"
    assert load_config(tmp_path / "params.yaml").train.learning_rate == pytest.approx(2e-6)


def test_relative_sqlite_uri_resolves_under_project(tmp_path: Path, monkeypatch):
    (tmp_path / "params.yaml").write_text("{}\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(tmp_path)
    assert cfg.tracking_uri() == f"sqlite:///{tmp_path.resolve()}/tracking/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert cfg.tracking_uri() == "http://127.0.0.1:5000"


def test_every_field_has_help():
    rows = describe()
    assert len(rows) > 40
    assert all(help_text for _, _, help_text in rows), [k for k, _, h in rows if not h]


def test_cli_reports_config_errors(tmp_path: Path):
    (tmp_path / "params.yaml").write_text("evals:\n  batch_size: 2\n")
    proc = arft("config", "--values", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "evals: unknown key" in proc.stderr
