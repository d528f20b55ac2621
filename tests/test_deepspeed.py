"""DeepSpeed ZeRO-2 and ZeRO-3 training for real, on 2 CPU ranks, through the train stage a user runs
(`train.launcher: accelerate` with the project's DeepSpeed accelerate configs): SFT cold start, then GRPO steps.

The first DeepSpeed start compiles its shared-memory communication op (0.5-2 min, once per machine; cached in
~/.cache/torch_extensions); after that each run takes under a minute.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from arft_core.config import load_config
from arft_core.data.mat_coding import generate
from arft_core.model.embedded import load_model, prepare_base_model
from conftest import arft, copy_project

pytestmark = pytest.mark.slow

OVERRIDES = {
    # Small easy-vqa images keep the tiny model's prompts short.
    "data": {"n_train": 4, "n_test": 2, "sources": {"synthetic": 0, "easy_vqa": 1}, "hard": [["rotation90", "dark"]]},
    "train": {"launcher": "accelerate", "num_processes": 2, "max_steps": 2, "save_steps": 1,
              "reward_variant": "paper", "sft": {"max_steps": 2, "batch_size": 2}},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project copy with the base model and the coding step samples already in place (train's inputs)."""
    root = copy_project(tmp_path_factory.mktemp("deepspeed") / "project", OVERRIDES)
    cfg = load_config(root / "params.yaml")
    prepare_base_model(cfg.model, cfg.path("base_model"))
    generate(cfg.data, cfg.path("mat_coding"), root)
    return root


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    assert files, f"{model_dir}: no safetensors weights"
    saved = {k: v for f in files for k, v in load_file(f).items()}
    # The output layer is tied to the embeddings: a state dict gathered by DeepSpeed writes it out as a copy.
    if "lm_head.weight" in saved:
        assert torch.equal(saved.pop("lm_head.weight"), saved["model.embed_tokens.weight"]), model_dir
    return saved


def test_the_stage_says_when_deepspeed_compiles_its_ops(tmp_path, monkeypatch):
    from arft_core.stages.train import SHM_COMM_OP, deepspeed_ops_note

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert "compiling its C++ ops once" in deepspeed_ops_note() and str(tmp_path) in deepspeed_ops_note()
    built = tmp_path / "py311_cpu" / SHM_COMM_OP
    built.mkdir(parents=True)
    (built / f"{SHM_COMM_OP}.so").touch()
    assert deepspeed_ops_note() is None


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_deepspeed_training_on_two_cpu_ranks_saves_whole_weights(project, zero):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["accelerate_config"] = f"infra/accelerate/deepspeed_{zero}.yaml"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    arft("train", cwd=project)
    summary = json.loads((project / "reports" / "train.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2 and summary["sft_steps"] == 2

    base = weights(project / "models" / "base")
    # The SFT result (the KL reference and resume point) and the final model: every tensor whole (ZeRO-3 saves
    # gathered shards, never (0,)-shaped placeholders), and moved away from the base weights.
    for folder in (project / "models" / "checkpoints" / "sft_model", project / "models" / "trained"):
        saved = weights(folder)
        assert set(saved) == set(base), folder
        assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in base.items()}, folder
        assert any(not torch.equal(v, base[k]) for k, v in saved.items()), f"{folder}: weights did not move"
    # Loads under the names it was saved with: nothing missing (left randomly initialised) or left over.
    _, info = AutoModelForImageTextToText.from_pretrained(project / "models" / "trained", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert load_model(project / "models" / "trained")[1].tokenizer is not None
    assert sorted(p.name for p in (project / "models" / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-1", "checkpoint-2"]
