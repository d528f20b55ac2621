from pathlib import Path

import pytest
import yaml

from arft_core.config import Config, ConfigError, describe, load_config
from conftest import ROOT, arft, write_params


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


def test_multi_node_launch_commands(tmp_path):
    from arft_core.config import load_config
    from arft_core.stages import launch_command

    params = write_params(tmp_path, {"train": {"launcher": "torchrun", "num_processes": 8, "num_machines": 2,
                                               "main_process_ip": "10.0.0.1"}})
    cfg = load_config(params)
    cmd = launch_command(cfg, machine_rank=1)
    assert cmd[cmd.index("--nnodes") + 1] == "2" and cmd[cmd.index("--node_rank") + 1] == "1"
    assert cmd[cmd.index("--master_addr") + 1] == "10.0.0.1" and "--standalone" not in cmd
    assert cmd[cmd.index("--nproc_per_node") + 1] == "8" and cmd[-3:] == ["train-worker", "--params", str(params)]
    (tmp_path / "zero3.yaml").write_text("distributed_type: DEEPSPEED\n")
    cfg.train.launcher, cfg.train.accelerate_config = "accelerate", "zero3.yaml"
    cmd = launch_command(cfg, machine_rank=0)
    assert cmd[cmd.index("--num_processes") + 1] == "16"  # accelerate counts all nodes' processes
    assert cmd[cmd.index("--machine_rank") + 1] == "0" and cmd[cmd.index("--main_process_port") + 1] == "29500"
    cfg.train.main_process_ip = None
    with pytest.raises(ValueError, match="main_process_ip"):
        launch_command(cfg)
    cfg.train.num_machines = 1
    assert "--num_machines" not in launch_command(cfg)
