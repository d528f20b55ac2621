"""GRPO training of the policy with TRL's GRPOTrainer on MAT-Coding answer steps (format + answer-F1 rewards)."""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from arft_core.config import ModelConfig, TrainConfig
from arft_core.data.mat_coding import input_image_path, load_manifest
from arft_core.protocol import coding_prompt
from arft_core.rewards import make_reward_funcs

MetricsSink = Callable[[dict[str, float], int], None]
TRAIN_CONFIG_FILE = "arft_train_config.json"


def build_dataset(items: list[dict], data_dir: Path):
    from datasets import Dataset
    from PIL import Image

    return Dataset.from_dict({
        "prompt": [coding_prompt(i["question"]) for i in items],
        "image": [Image.open(data_dir / input_image_path(i)).convert("RGB") for i in items],
        "answers": [i["answers"] for i in items],
        "solution": [f"<answer> {i['answers'][0]} </answer>" for i in items],  # the step type: answer
    })


def _metrics_callback(sink: MetricsSink):
    from transformers import TrainerCallback

    class ForwardMetrics(TrainerCallback):
        """Hands every numeric log entry of the trainer to `sink` (MLflow in the pipeline)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            numeric = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
            if numeric:
                sink(numeric, state.global_step)

    return ForwardMetrics()


def write_log_csv(history: list[dict], path: Path) -> None:
    """Per-step log for DVC plots: step, reward, each reward component, KL, loss, completion length."""
    steps = [h for h in history if "reward" in h]
    keys = ["step", "reward", "reward_std", "kl", "loss", "entropy", "completions/mean_length"]
    keys += sorted({k for h in steps for k in h if k.startswith("rewards/") and k.endswith("/mean")})
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k.replace("/", "_") for k in keys])
        w.writeheader()
        for h in steps:
            w.writerow({k.replace("/", "_"): h.get(k, "") for k in keys})


def train(model_cfg: ModelConfig, cfg: TrainConfig, base_model: Path, data_dir: Path, out_dir: Path,
          log_csv: Path, sink: MetricsSink = lambda m, s: None, reward_funcs: list | None = None) -> dict:
    """Run GRPO on the train manifest; save the final model and processor to `out_dir`; return final metrics.

    `reward_funcs` defaults to the coding [format, accuracy] pair of `cfg.reward_variant`; `cfg.reward_weights`
    must match its length.
    """
    import torch
    from trl import GRPOConfig, GRPOTrainer

    from arft_core.model.embedded import load_model

    reward_funcs = reward_funcs or make_reward_funcs("coding", cfg.reward_variant,
                                                     similarity_floor=cfg.similarity_floor, code_reward=cfg.code_reward)
    if len(cfg.reward_weights) != len(reward_funcs):
        raise ValueError(f"train.reward_weights needs {len(reward_funcs)} values "
                         f"({', '.join(f.__name__ for f in reward_funcs)}), got {cfg.reward_weights}")
    if (cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps) % cfg.num_generations:
        raise ValueError("train.per_device_train_batch_size x gradient_accumulation_steps must be a multiple of "
                         f"train.num_generations ({cfg.num_generations})")
    model, processor = load_model(base_model, model_cfg.dtype)
    dataset = build_dataset(load_manifest(data_dir, "train"), data_dir)
    with tempfile.TemporaryDirectory(prefix="arft-grpo-") as scratch:
        args = GRPOConfig(
            output_dir=scratch, seed=cfg.seed, max_steps=cfg.max_steps, learning_rate=cfg.learning_rate,
            per_device_train_batch_size=cfg.per_device_train_batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps, num_generations=cfg.num_generations,
            max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, beta=cfg.beta,
            loss_type=cfg.loss_type, reward_weights=cfg.reward_weights, logging_steps=cfg.logging_steps,
            report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available(),
            bf16=model_cfg.dtype == "bfloat16", disable_tqdm=False,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset,
                              processing_class=processor, callbacks=[_metrics_callback(sink)])
        trainer.train()
        history = trainer.state.log_history
    if out_dir.exists():
        shutil.rmtree(out_dir)
    trainer.model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    # Provenance travels with the weights: the settings that produced them.
    (out_dir / TRAIN_CONFIG_FILE).write_text(json.dumps(
        {"train": cfg.model_dump(mode="json"), "base_model": model_cfg.model_dump(mode="json"),
         "reward_funcs": [f.__name__ for f in reward_funcs]}, indent=2))
    write_log_csv(history, log_csv)
    steps = [h for h in history if "reward" in h]
    last = steps[-1] if steps else {}
    return {
        "steps": trainer.state.global_step,
        "final_reward": float(last.get("reward", 0.0)),
        "final_kl": float(last.get("kl", 0.0)),
        "mean_reward": sum(h["reward"] for h in steps) / len(steps) if steps else 0.0,
        "train_items": len(dataset),
    }
