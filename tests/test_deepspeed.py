"""DeepSpeed training for real, on 2 CPU ranks, through the train stage a user runs (`train.launcher: accelerate`
with the project's DeepSpeed accelerate configs): SFT cold start, then GRPO, in step and agentic mode; ZeRO-3
with CPU offload; kill-and-resume from DeepSpeed checkpoints; and a 2-node launch over loopback.

The first DeepSpeed start compiles its shared-memory communication op (0.5-2 min, once per machine; CPU Adam for
offload about 3 min more; cached in ~/.cache/torch_extensions); after that each run takes under a minute.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from arft_core.config import load_config
from arft_core.data.mat_coding import generate
from arft_core.model.embedded import load_model, prepare_base_model
from arft_core.training import tensors_digest
from conftest import ROOT, arft, copy_project
from test_training import batches_by_step, resume_job_args

pytestmark = pytest.mark.slow

OVERRIDES = {
    # Small easy-vqa images keep the tiny model's prompts short.
    "data": {"n_train": 4, "n_test": 2, "sources": {"synthetic": 0, "easy_vqa": 1}, "hard": [["rotation90", "dark"]]},
    "train": {"launcher": "accelerate", "num_processes": 2, "max_steps": 2, "save_steps": 1,
              "reward_variant": "paper", "sft": {"max_steps": 2, "batch_size": 2}},
}
LAUNCH_TIMEOUT_S = 300  # a deadlock between ranks fails the test instead of hanging the suite


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project copy with the base model and the coding step samples already in place (train's inputs)."""
    root = copy_project(tmp_path_factory.mktemp("deepspeed") / "project", OVERRIDES)
    cfg = load_config(root / "params.yaml")
    prepare_base_model(cfg.model, cfg.path("base_model"))
    generate(cfg.data, cfg.path("mat_coding"), root)
    return root


def set_train(project: Path, **train) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(train)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(project: Path, zero: str, *argv: str) -> subprocess.CompletedProcess:
    """`accelerate launch` of a script on 2 CPU ranks with the project's DeepSpeed config `zero`."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           f"infra/accelerate/deepspeed_{zero}.yaml", "--num_processes", "2", "--main_process_port",
           str(free_port()), *argv]
    proc = subprocess.Popen(cmd, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "DS_ACCELERATOR": "cpu"}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    finally:
        if proc.poll() is None:  # ranks included: a deadlocked launch leaves nothing behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    assert files, f"{model_dir}: no safetensors weights"
    saved = {k: v for f in files for k, v in load_file(f).items()}
    # The output layer is tied to the embeddings: a state dict gathered by DeepSpeed writes it out as a copy.
    if "lm_head.weight" in saved:
        assert torch.equal(saved.pop("lm_head.weight"), saved["model.embed_tokens.weight"]), model_dir
    return saved


def assert_trained_model(project: Path, summary: dict) -> None:
    """The acceptance of every DeepSpeed run: 2 ranks; the SFT result (the KL reference and resume point) and the
    final model hold every tensor whole (ZeRO-3 saves gathered shards, never (0,)-shaped placeholders), moved away
    from the base weights, load cleanly, and equal the weights every rank holds, rank 1's included."""
    assert summary["world_size"] == 2 and summary["sft_steps"] == 2
    base = weights(project / "models" / "base")
    for folder in (project / "models" / "checkpoints" / "sft_model", project / "models" / "trained"):
        saved = weights(folder)
        assert set(saved) == set(base), folder
        assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in base.items()}, folder
        assert any(not torch.equal(v, base[k]) for k, v in saved.items()), f"{folder}: weights did not move"
    trained = project / "models" / "trained"
    assert summary["rank_weights"] == [tensors_digest(weights(trained).values())] * 2
    # Loads under the names it was saved with: nothing missing (left randomly initialised) or left over.
    _, info = AutoModelForImageTextToText.from_pretrained(trained, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert load_model(trained)[1].tokenizer is not None


def test_the_stage_says_when_deepspeed_compiles_its_ops(project, tmp_path, monkeypatch):
    from arft_core.stages.train import CPU_ADAM_OP, SHM_COMM_OP, deepspeed_config, deepspeed_ops_note

    def note(accelerate_config: str) -> str | None:
        set_train(project, accelerate_config=f"infra/accelerate/{accelerate_config}")
        return deepspeed_ops_note(deepspeed_config(load_config(project / "params.yaml")))

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    first = note("deepspeed_zero3.yaml")
    assert "compiling its C++ ops once (communication op" in first and str(tmp_path) in first
    assert "CPU Adam" not in first and "CPU Adam" in note("deepspeed_zero3_offload.yaml")
    for op in (SHM_COMM_OP, CPU_ADAM_OP):
        (tmp_path / "py311_cpu" / op).mkdir(parents=True)
        (tmp_path / "py311_cpu" / op / f"{op}.so").touch()
    assert note("deepspeed_zero3.yaml") is None and note("deepspeed_zero3_offload.yaml") is None
    set_train(project, launcher="torchrun")
    assert deepspeed_config(load_config(project / "params.yaml")) is None
    set_train(project, launcher="accelerate")


@pytest.mark.parametrize("zero", ["zero3", "zero3_offload"])
def test_deepspeed_training_on_two_cpu_ranks_saves_whole_weights(project, zero):
    set_train(project, mode="step", accelerate_config=f"infra/accelerate/deepspeed_{zero}.yaml")
    arft("train", cwd=project)
    summary = json.loads((project / "reports" / "train.json").read_text())
    assert summary["steps"] == 2
    assert_trained_model(project, summary)
    assert sorted(p.name for p in (project / "models" / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-1", "checkpoint-2"]
    # save_steps wrote DeepSpeed checkpoints: per-rank optimizer shards beside the gathered weights.
    shards = sorted(p.name for p in (project / "models" / "checkpoints" / "checkpoint-2").glob("global_step*/*"))
    assert sum("optim_states" in name for name in shards) == 2, shards


def test_two_nodes_over_loopback_train_one_zero2_model(project):
    """num_machines 2 x 1 process, both "nodes" on this machine: node 1's `arft train` starts its rank and
    nothing else (no MLflow run, no outputs); node 0's runs the stage, logs and writes the one model."""
    from mlflow import MlflowClient

    tracking = MlflowClient(load_config(project / "params.yaml").tracking_uri())

    def train_runs() -> int:
        return len(tracking.search_runs([e.experiment_id for e in tracking.search_experiments()],
                                        filter_string="tags.`arft.stage` = 'train'"))

    before = train_runs()
    port = free_port()
    set_train(project, mode="step", accelerate_config="infra/accelerate/deepspeed_zero2.yaml", num_processes=1,
              num_machines=2, main_process_ip="127.0.0.1", main_process_port=port)
    env = {**os.environ, "ARFT_MACHINE_RANK": "1"}
    node1 = subprocess.Popen([sys.executable, "-m", "arft_core.cli", "train"], cwd=project, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        arft("train", cwd=project)
        out, _ = node1.communicate(timeout=120)
    finally:
        node1.kill()
    assert node1.returncode == 0 and "train done on node 1" in out, out[-3000:]
    summary = json.loads((project / "reports" / "train.json").read_text())
    assert summary["steps"] == 2
    assert_trained_model(project, summary)
    assert train_runs() == before + 1  # one run for the launch, from the main node


def test_zero3_agentic_rollouts_where_only_one_rank_calls_a_tool(project):
    """The deadlock case: rank 0's trajectories call the code tool and need a second model turn, rank 1's answer
    at once. Under ZeRO-3 each turn's generation gathers the sharded weights on every rank, so rank 1 must join
    while rank 0 generates (and every forward must run the same modules on both ranks)."""
    set_train(project, mode="agentic", accelerate_config="infra/accelerate/deepspeed_zero3.yaml", save_steps=1,
              max_steps=1, max_completion_length=400, turn_max_new_tokens=8, num_processes=2, num_machines=1)
    log = project / "turns.jsonl"
    done = launch(project, "zero3", str(ROOT / "tests" / "agentic_job.py"), str(project / "params.yaml"), str(log))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    turns = {r: [json.loads(line) for line in log.with_name(f"{log.name}.rank{r}").read_text().splitlines()]
             for r in (0, 1)}
    assert turns == {0: [[2, 2]], 1: [[1, 1]]}  # one step, one prompt x 2 generations per rank
    summary = json.loads((project / "reports" / "train.json").read_text())
    assert summary["steps"] == 1
    assert_trained_model(project, summary)


def test_zero3_training_killed_after_a_checkpoint_resumes_where_it_stopped(project, tmp_path):
    """Every rank SIGKILLed at the end of step 2 (checkpoint-1 on disk); the next launch resumes from DeepSpeed's
    checkpoint (weights, optimizer, scheduler, RNG, data position) and ends at the same step with the same batches
    on every rank as an uninterrupted run; the SFT result, the KL reference, is reused, not retrained."""
    data, base = project / "data" / "mat_coding", project / "models" / "base"
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    tiny = tmp_path / "inputs"
    tiny.mkdir()
    (tiny / "base").symlink_to(base)
    (tiny / "data").symlink_to(data)

    def job(work: Path, kill_at: int | None = None) -> subprocess.CompletedProcess:
        return launch(project, "zero3", *resume_job_args(tiny, work, 3, 1, kill_at, sft_steps=1))

    done = job(straight)
    assert done.returncode == 0, done.stderr[-3000:]
    dead = job(killed, kill_at=2)
    assert dead.returncode != 0
    assert sorted(p.name for p in (killed / "ckpt").glob("checkpoint-*")) == ["checkpoint-1"]
    sft = (killed / "ckpt" / "sft_model" / "model.safetensors").stat().st_mtime_ns
    resumed = job(killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] == "checkpoint-1" and summary["steps"] == 3 and "sft_steps" not in summary
    assert (killed / "ckpt" / "sft_model" / "model.safetensors").stat().st_mtime_ns == sft
    for rank in (0, 1):
        expected = batches_by_step(straight / f"batches.jsonl.rank{rank}")
        got = batches_by_step(killed / f"batches.jsonl.rank{rank}")
        assert sorted(got) == [1, 2, 3]
        assert {s: b["ids"] for s, b in got.items()} == {s: b["ids"] for s, b in expected.items()}, rank
