"""GRPO on the tiny model through TRL's GRPOTrainer, and evaluation on its output (real code paths, tiny sizes)."""

import csv
from pathlib import Path

import torch

from arft_core.config import Config, DataConfig, ModelConfig, TrainConfig
from arft_core.data.mat_coding import generate
from arft_core.evaluation import evaluate
from arft_core.model.embedded import load_model, prepare_base_model
from arft_core.training import train

MODEL = ModelConfig(embedded={"vocab_size": 1024})
# Small easy-vqa images keep the tiny model's prompts short.
DATA = dict(sources={"synthetic": 0, "easy_vqa": 1}, hard=[["rotation90", "dark"]])


def length_reward(completions, **_):
    """A reward with variance inside each group, so that advantages (and so gradients) are non-zero."""
    return [float(len(c[0]["content"])) for c in completions]


def test_paper_rewards_give_zero_advantage_to_a_tagless_policy(tmp_path: Path):
    base, data = tmp_path / "base", tmp_path / "data"
    prepare_base_model(MODEL, base)
    generate(DataConfig(n_train=2, n_test=1, **DATA), data, tmp_path)
    cfg = TrainConfig(max_steps=1, per_device_train_batch_size=2, num_generations=2, max_completion_length=4)
    logged = []
    train(MODEL, cfg, base, data, tmp_path / "out", tmp_path / "log.csv", sink=lambda m, s: logged.append(m))
    step = next(m for m in logged if "reward" in m)
    # The random policy never writes tags: both paper rewards are 0, logged per component.
    assert step["rewards/format_reward/mean"] == 0.0 and step["rewards/accuracy_reward/mean"] == 0.0


def test_grpo_updates_weights_and_logs_rewards(tmp_path: Path):
    base, data, out = tmp_path / "base", tmp_path / "data", tmp_path / "trained"
    prepare_base_model(MODEL, base)
    generate(DataConfig(n_train=4, n_test=3, **DATA), data, tmp_path)
    cfg = TrainConfig(max_steps=2, per_device_train_batch_size=2, num_generations=2, max_completion_length=6,
                      learning_rate=1e-2, reward_weights=[1.0])
    logged = []
    summary = train(MODEL, cfg, base, data, out, tmp_path / "log.csv", sink=lambda m, s: logged.append((s, m)),
                    reward_funcs=[length_reward])
    assert summary["steps"] == 2 and summary["train_items"] == 4
    before, _ = load_model(base)
    after, processor = load_model(out)
    changed = [k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert changed, "two GRPO steps at lr 1e-2 must move some weights"
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == 1024 + 12
    assert {s for s, m in logged if "reward" in m} == {1, 2}
    assert any("rewards/length_reward/mean" in m for _, m in logged)
    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    assert [r["step"] for r in rows] == ["1", "2"] and "rewards_length_reward_mean" in rows[0]

    # The trained weights go through the evaluation harness: both modes, the real sandbox for the agent.
    cfg = Config.model_validate({"model": MODEL.model_dump(), "paths": {"mat_coding": "data"},
                                 "eval": {"benchmarks": ["mat-coding"], "max_new_tokens": 4},
                                 "agent": {"max_turns": 2}, "sandbox": {"workers": 1}})
    cfg._root = tmp_path
    scores, predictions, report = evaluate(out, cfg)
    assert scores["mat-coding"]["agent"]["avg"]["n"] == 3 and scores["mat-coding"]["direct"]["avg"]["n"] == 3
    rows = predictions["mat-coding.agent"]
    assert len(rows) == 3 and set(rows[0]) >= {"id", "gt", "pred_answer", "turns"}
    assert all(r["end"] in ("answer", "turns") and r["n_turns"] <= 2 for r in rows)
    assert report.count("<details") == 6
