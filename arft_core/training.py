"""Training: an optional SFT cold start (TRL SFTTrainer) on the teacher's step samples, then GRPO (TRL
GRPOTrainer) on the same step samples with the paper's rewards (spec §1.4-1.5, §3). No ground-truth injection.

A step row is the input the agent loop gives the model at one turn of the teacher's trajectory (replayed through
the loop with the real tools, `agent.steps`), in the evaluation's protocol and transcript form; the target is the
teacher's turn (`solution`), which also tells the rewards the step type.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from contextlib import nullcontext

from arft_core.agent.engine import trl_engine, use_vllm
from arft_core.config import AgentConfig, ModelConfig, RolloutConfig, TrainConfig
from arft_core.io import load_image

MetricsSink = Callable[[dict[str, float], int], None]
TRAIN_CONFIG_FILE = "arft_train_config.json"
SFT_CHECKPOINTS = "sft"  # SFT's checkpoint-<step> folders, under the GRPO checkpoint folder


def step_rows(data_dir: Path, task: str, tools, agent_cfg: AgentConfig, processor, image_size: int | None,
              scratch: Path) -> list[dict]:
    """The step rows of the train manifest in `data_dir`: the teacher's trajectories replayed through the agent loop
    (`agent.steps`) under `agent_cfg` (its transcript resolved), tool images in `scratch`."""
    from arft_core.agent.steps import step_rows as replay
    from arft_core.io import load_manifest

    records = load_manifest(data_dir, "train")
    if not records:
        raise ValueError(f"{data_dir / 'train.json'}: no items to train on (run the data stage for this task first)")
    rows = replay(records, task, data_dir, tools, agent_cfg, transcript_for(processor, agent_cfg, image_size), scratch)
    if not rows:
        raise ValueError(f"{data_dir / 'train.json'}: the teacher's replay gave no step rows")
    return rows


def transcript_for(processor, agent_cfg: AgentConfig, image_size: int | None):
    """The transcript renderer training uses: the evaluation's, images resized by train.image_size when set."""
    from functools import partial

    from arft_core.agent.transcript import Transcript, open_image

    return Transcript(processor, agent_cfg.protocol, agent_cfg.transcript,
                      open_image=partial(load_image, size=image_size) if image_size else open_image)


def build_step_dataset(rows: list[dict], image_size: int | None):
    """Columns: prompt (chat messages), images (in placeholder order), solution (the teacher's turn), answers,
    image_path (the image the turn works on), item_id."""
    from datasets import Dataset

    return Dataset.from_dict({
        "prompt": [r["prompt"] for r in rows],
        "images": [[load_image(Path(p), image_size) for p in r["images"]] for r in rows],
        "solution": [r["solution"] for r in rows],
        "answers": [r["answers"] for r in rows],
        "image_path": [r["image_path"] for r in rows],
        "item_id": [r["item_id"] for r in rows],
    })


def build_item_dataset(items: list[dict], data_dir: Path, task: str, image_size: int | None):
    """Agentic mode: one row per item (`item_id`); the environments render every turn, the rows only say which
    item (`prompt` and `image` are what TRL's sampler and signature columns need)."""
    from datasets import Dataset

    from arft_core.agent.env import EnvItem

    envs = [EnvItem.from_manifest(i, task, data_dir) for i in items]
    return Dataset.from_dict({
        "prompt": [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": e.question}]}]
                   for e in envs],
        "image": [load_image(e.image, image_size) for e in envs],
        "item_id": [str(e.id) for e in envs],
    })


def _sft_dataset(dataset):
    # SFTTrainer's prompt-completion form: the loss covers the teacher's step only.
    return dataset.map(lambda r: {"completion": [{"role": "assistant", "content": [{"type": "text",
                                                                                    "text": r["solution"]}]}]},
                       remove_columns=[c for c in dataset.column_names if c not in ("prompt", "images")])


def grpo_step_offset(cfg: TrainConfig) -> int:
    """Training steps before GRPO's first: the SFT cold start's. GRPO step g is training step offset + g, in MLflow
    metrics and checkpoint models alike (one step axis for the whole training)."""
    return cfg.sft.max_steps if cfg.sft.enabled else 0


def _metrics_callback(sink: MetricsSink, prefix: str = "", offset: int = 0):
    from transformers import TrainerCallback

    class ForwardMetrics(TrainerCallback):
        """Hands every numeric log entry of the trainer to `sink` (MLflow in the pipeline), at training step
        `offset` + the trainer's step."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            numeric = {prefix + k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
            if numeric:
                sink(numeric, offset + state.global_step)

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


def _set_pixel_budget(processor, model_cfg: ModelConfig, cfg: TrainConfig) -> None:
    """train.min/max_pixels, else model's: a real checkpoint's own processor (Qwen2.5-VL: up to 12.8 MP) never
    decides the training resolution."""
    from arft_core.model.processor import set_pixel_budget

    set_pixel_budget(processor, cfg.min_pixels or model_cfg.min_pixels, cfg.max_pixels or model_cfg.max_pixels)


def _stop_at(step: int):
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        """Ends training after optimizer step `step` (train.checkpoint_step), the schedule left as configured."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= step:
                control.should_training_stop = True

    return StopAt()


def distributed_state():
    """This process's place in a launch (torchrun, `accelerate launch` with or without DeepSpeed, or none), set up
    before anything is built. On CPU it must be asked for (`cpu=True`): a bare `PartialState()` finds no backend
    there and reports one process on every rank, so every rank would act as rank 0."""
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes > 1 and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        from deepspeed import comm

        # On GPUs accelerate does this itself; on CPU it does not, and until the first DeepSpeed engine starts,
        # a model built under ZeRO-3 (the KL reference of a resumed run) would size its batch for 1 rank.
        if not comm.is_initialized():
            comm.init_distributed(dist_backend=state.backend, auto_mpi_discovery=False)
    return state


def _shared_scratch(state, near: Path) -> Path:
    """A scratch folder that every rank sees (the SFT result goes through it): rank 0 makes it and tells the others.
    In the system's temp folder on one node; beside `near` (the shared checkout) when the ranks span nodes."""
    import torch.distributed as dist

    multi_node = state.num_processes > int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
    if multi_node and state.is_main_process:
        near.mkdir(parents=True, exist_ok=True)
    made = [tempfile.mkdtemp(prefix="arft-train-", dir=near if multi_node else None) if state.is_main_process
            else None]
    if state.num_processes > 1:
        dist.broadcast_object_list(made, src=0)
    return Path(made[0])


def _load_policy(model_dir: Path, dtype: str):
    """`load_model`, saving later under the checkpoint's own weight names. Loaded under ZeRO-3 (weights partitioned
    as they load), transformers 5.23 records an extra prefix change that `save_pretrained` then reverts into
    `model.model.*` names nothing loads; without a record, saving uses the model type's default renamings."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    from arft_core.model.embedded import load_model

    model, processor = load_model(model_dir, dtype)
    if is_deepspeed_zero3_enabled():
        model._weight_conversions = None
    return model, processor


def _check_deepspeed_save(trainer, lora: bool = False) -> None:
    """Under ZeRO-3 each rank holds a shard of every weight; `save_model` writes whole weights only when the
    DeepSpeed config gathers them on save (otherwise a DeepSpeed checkpoint and no model.safetensors)."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    zero = plugin.deepspeed_config.get("zero_optimization", {}) if plugin is not None else {}
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save"):
        raise ValueError("DeepSpeed ZeRO-3 config: set zero_optimization.stage3_gather_16bit_weights_on_model_save "
                         "to true, or the saved model has no weights (infra/deepspeed/zero3*.json have it)")
    if zero.get("stage") == 3 and lora:  # the merge on rank 0 would see sharded, empty weights
        raise ValueError("train.lora with DeepSpeed ZeRO-3 is not supported: use deepspeed_zero2.yaml")


def sft_cold_start(model, processor, dataset, cfg: TrainConfig, scratch: Path, sink: MetricsSink, save_to: Path,
                   checkpoints: Path | None = None):
    """A few SFTTrainer steps on the teacher steps so that the policy starts out writing the protocol's tags; the
    result (model and processor) is saved to `save_to`. Every rank calls this (the save gathers ZeRO-3 shards).
    With `checkpoints` (a folder, empty), the model is also saved there every `cfg.sft.save_steps`
    (`checkpoint-<step>`, weights only)."""
    import torch
    from trl import SFTConfig, SFTTrainer

    saving = bool(cfg.sft.save_steps and checkpoints is not None)
    args = SFTConfig(output_dir=str(checkpoints if saving else scratch / "sft"), max_steps=cfg.sft.max_steps,
                     learning_rate=cfg.sft.learning_rate, per_device_train_batch_size=cfg.sft.batch_size,
                     seed=cfg.seed, logging_steps=cfg.logging_steps, report_to=[],
                     save_strategy="steps" if saving else "no", save_steps=cfg.sft.save_steps or 500,
                     save_only_model=True, use_cpu=not torch.cuda.is_available(), max_length=None,
                     gradient_checkpointing=cfg.gradient_checkpointing, bf16=model.dtype == torch.bfloat16,
                     disable_tqdm=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=_sft_dataset(dataset), processing_class=processor,
                         callbacks=[_metrics_callback(sink, "sft/")])
    _check_deepspeed_save(trainer)
    trainer.train()
    # Through the trainer on every rank, not `model.save_pretrained` on rank 0: under ZeRO-3 the latter writes
    # (0,)-shaped tensors without an error. Rank 0 writes the files (model and processor).
    trainer.save_model(str(save_to))
    steps = [h for h in trainer.state.log_history if "loss" in h]
    return {"sft_steps": trainer.state.global_step,
            "sft_final_loss": float(steps[-1]["loss"]) if steps else float("nan")}


def _fingerprint(cfg: TrainConfig, model_cfg: ModelConfig, base_model: Path, data_dir: Path,
                 agent_cfg: AgentConfig) -> str:
    """What a checkpoint belongs to: the settings (the agent's too: they render the turns), the base model and the
    train manifest. A run resumes only from checkpoints with the same fingerprint (a param change must not continue
    an old run)."""
    import hashlib

    keep = cfg.model_dump(mode="json", exclude={"max_steps", "num_train_epochs", "checkpoint_step", "save_steps",
                                                "save_total_limit", "logging_steps"})
    blob = json.dumps({"train": keep, "model": model_cfg.model_dump(mode="json"), "base": str(base_model.resolve()),
                       "agent": agent_cfg.model_dump(mode="json"),
                       "items": hashlib.sha256((data_dir / "train.json").read_bytes()).hexdigest()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def prepare_checkpoints(folder: Path, fingerprint: str) -> str | None:
    """The last checkpoint to resume from, or None; clears checkpoints of another configuration."""
    stamp = folder / "fingerprint.txt"
    if folder.exists() and (not stamp.is_file() or stamp.read_text().strip() != fingerprint):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint)
    return _last_checkpoint(folder)


def checkpoint_steps(folder: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoint-<step>` under `folder`, by step."""
    found = [(int(p.name.split("-")[1]), p) for p in folder.glob("checkpoint-*")
             if p.is_dir() and p.name.split("-")[1].isdigit()]
    return sorted(found)


def _last_checkpoint(folder: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def _restore_weights(model, checkpoint: Path, dtype: str) -> None:
    """Load a checkpoint's weights into the policy. transformers 5 saves Qwen2.5-VL under its original key names,
    which the Trainer's own resume loads non-strictly and so silently skips; `from_pretrained` maps them."""
    from arft_core.model.embedded import load_model

    saved, _ = load_model(checkpoint, dtype)
    missing = set(model.state_dict()) - set(saved.state_dict())
    if missing:
        raise RuntimeError(f"{checkpoint}: checkpoint lacks weights {sorted(missing)[:3]}")
    model.load_state_dict(saved.state_dict())


def tensors_digest(tensors) -> str:
    """A digest of tensors independent of their names and order: the sorted hashes of each one's shape and bytes."""
    import hashlib

    import torch

    parts = []
    for t in tensors:
        data = t.detach().cpu().contiguous()
        raw = data.view(-1).view(torch.uint8).numpy().tobytes()  # bytes of any dtype (bf16 too)
        parts.append(hashlib.sha256(str(tuple(data.shape)).encode() + raw).hexdigest())
    return hashlib.sha256("".join(sorted(parts)).encode()).hexdigest()


def weights_digest(model) -> str:
    """`tensors_digest` of the model's distinct parameters (tied weights once), as the saved model holds them.
    Under ZeRO-3 each parameter is gathered in turn: every rank must call this."""
    from contextlib import nullcontext

    zero3 = any(hasattr(p, "ds_id") for p in model.parameters())  # ZeRO-3 shards
    if zero3:
        import deepspeed

    def whole():  # each one is hashed while it is gathered
        for param in model.parameters():
            with deepspeed.zero.GatheredParameters([param]) if zero3 else nullcontext():
                yield param

    return tensors_digest(whole())


def _rank_digests(state, model) -> list[str]:
    """Each rank's `weights_digest` after training; they must agree (a rank that drifted would make the saved
    model depend on which rank wrote it)."""
    import torch.distributed as dist

    digests: list = [None] * state.num_processes
    dist.all_gather_object(digests, weights_digest(model))
    if len(set(digests)) > 1:
        raise RuntimeError(f"ranks disagree on the trained weights: {dict(enumerate(digests))}")
    return digests


def _agentic_trainer(common: dict, cfg: TrainConfig, data_dir: Path, tools, agent_cfg: AgentConfig, processor,
                     forced_first_turn, artifact_sink):
    from arft_core.agent.env import AgentEnv, EnvItem
    from arft_core.agent.grpo import AgenticGRPOTrainer
    from arft_core.io import load_manifest
    from arft_core.protocol import stop_sequences

    agent = agent_cfg.for_training_mode("agentic")
    items = {str(i["id"]): EnvItem.from_manifest(i, cfg.task, data_dir) for i in load_manifest(data_dir, "train")}

    def env_factory(row: dict, workdir: Path) -> AgentEnv:
        return AgentEnv(items[row["item_id"]], tools, agent, workdir)

    return AgenticGRPOTrainer(**common, env_factory=env_factory, transcript=transcript_for(processor, agent,
                                                                                           cfg.image_size),
                              turn_max_new_tokens=cfg.turn_max_new_tokens,
                              stop_sequences=stop_sequences(agent.protocol), forced_first_turn=forced_first_turn,
                              sample_every=cfg.sample_every, sample_sink=artifact_sink)


def _lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")


def train(model_cfg: ModelConfig, cfg: TrainConfig, base_model: Path, data_dir: Path, out_dir: Path,
          log_csv: Path, sink: MetricsSink = lambda m, s: None, reward_funcs: list | None = None,
          code_runner: Callable | None = None, checkpoint_dir: Path | None = None,
          callbacks: list | None = None, tools=None, agent_cfg: AgentConfig | None = None,
          forced_first_turn: Callable[[int], str | None] | None = None,
          artifact_sink: Callable[[str, str], None] | None = None, rollout: RolloutConfig | None = None) -> dict:
    """SFT cold start (if enabled), then GRPO on the step samples in `data_dir`; save the model and processor to
    `out_dir` (LoRA adapters merged); return final metrics.

    `reward_funcs` defaults to the task's [format, accuracy] pair of `cfg.reward_variant`; the corrected coding
    variant runs code steps through `code_runner` (the sandbox). With `cfg.save_steps` and `checkpoint_dir`, GRPO
    checkpoints every `save_steps` and a new call resumes from the last checkpoint of the same configuration
    (weights, optimizer, scheduler, RNG, data position); the SFT result is kept there too, as the KL reference.

    The step rows are the teacher's trajectories replayed through the agent loop with `tools` (sandbox, search)
    under `agent_cfg` (default AgentConfig()): the turns evaluation shows. `cfg.mode == "agentic"` trains on whole
    trajectories instead (`AgenticGRPOTrainer`, the same loop and tools); rewards default to the trajectory's format
    and final-answer F1; the SFT cold start still uses the step rows.

    `rollout` chooses the engine that generates the rollouts (HF `generate`, or vLLM through TRL's support with
    `agent.engine`'s fixes, weights synced after each update).
    """
    import torch
    from trl import GRPOConfig, GRPOTrainer

    from arft_core.rewards import make_reward_funcs

    state = distributed_state()  # one process, or one rank of a launch; rank 0 writes the files

    agentic = cfg.mode == "agentic"
    if agentic:
        from arft_core.agent.grpo import TRAJECTORY_REWARDS

        reward_funcs = reward_funcs or TRAJECTORY_REWARDS
    reward_funcs = reward_funcs or make_reward_funcs(cfg.task, cfg.reward_variant, code_runner=code_runner,
                                                     similarity_floor=cfg.similarity_floor,
                                                     code_reward=cfg.code_reward)
    if len(cfg.reward_weights) != len(reward_funcs):
        raise ValueError(f"train.reward_weights needs {len(reward_funcs)} values "
                         f"({', '.join(f.__name__ for f in reward_funcs)}), got {cfg.reward_weights}")
    if tools is None:
        raise ValueError("training needs the tools (sandbox for coding, search for search) to replay the teacher")
    agent_cfg = agent_cfg or AgentConfig()
    resume = None
    if cfg.save_steps and checkpoint_dir is not None:
        if state.is_main_process:
            prepare_checkpoints(checkpoint_dir, _fingerprint(cfg, model_cfg, base_model, data_dir, agent_cfg))
        state.wait_for_everyone()
        resume = _last_checkpoint(checkpoint_dir)
    sft_dir = checkpoint_dir / "sft_model" if checkpoint_dir is not None and cfg.save_steps else None
    start = sft_dir if sft_dir is not None and (sft_dir / "config.json").is_file() else base_model
    # Before any work: `rollout.engine: vllm` where vLLM cannot run fails here, not after the SFT cold start.
    rollout = rollout or RolloutConfig()
    vllm = use_vllm(rollout, start)
    model, processor = _load_policy(start, model_cfg.dtype)
    _set_pixel_budget(processor, model_cfg, cfg)
    summary: dict = {"resumed_from": Path(resume).name if resume else None}
    scratch = _shared_scratch(state, out_dir.parent)
    try:
        dataset = None
        if not agentic or (cfg.sft.enabled and start == base_model):
            # Each rank replays the teacher in its own folder (the rows' tool images live there while training).
            # In the transcript form evaluation will use for this training mode.
            rows = step_rows(data_dir, cfg.task, tools, agent_cfg.for_training_mode(cfg.mode), processor, cfg.image_size,
                             scratch / f"steps-rank{state.process_index}")
            dataset = build_step_dataset(rows, cfg.image_size)
        if agentic:
            from arft_core.io import load_manifest

            rl_dataset = build_item_dataset(load_manifest(data_dir, "train"), data_dir, cfg.task, cfg.image_size)
        else:
            rl_dataset = dataset
        if cfg.sft.enabled and start == base_model:
            # Saved and reloaded: TRL builds the KL reference from the model's folder, which must be the SFT
            # result (not the base); with checkpoints it is also the starting point of a resumed run.
            sft_dir = sft_dir or scratch / "sft_model"
            sft_checkpoints = checkpoint_dir / SFT_CHECKPOINTS if checkpoint_dir and cfg.sft.save_steps else None
            if sft_checkpoints is not None and state.is_main_process:  # SFT starts over: so do its checkpoints
                shutil.rmtree(sft_checkpoints, ignore_errors=True)
            state.wait_for_everyone()
            summary.update(sft_cold_start(model, processor, dataset, cfg, scratch, sink, save_to=sft_dir,
                                          checkpoints=sft_checkpoints))
            state.wait_for_everyone()
            model, _ = _load_policy(sft_dir, model_cfg.dtype)
            start = sft_dir
        processor.tokenizer.padding_side = "left"
        checkpoints = cfg.save_steps and checkpoint_dir is not None
        args = GRPOConfig(
            output_dir=str(checkpoint_dir) if checkpoints else str(scratch / "grpo"), seed=cfg.seed,
            # max_steps -1: TRL/HF count num_train_epochs instead (the paper's recipes are in epochs).
            max_steps=cfg.max_steps or -1, num_train_epochs=cfg.num_train_epochs, learning_rate=cfg.learning_rate,
            lr_scheduler_type=cfg.lr_scheduler_type, warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
            per_device_train_batch_size=cfg.prompts_per_device * cfg.num_generations,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps, num_generations=cfg.num_generations,
            max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, beta=cfg.beta,
            loss_type=cfg.loss_type, reward_weights=cfg.reward_weights, logging_steps=cfg.logging_steps,
            gradient_checkpointing=cfg.gradient_checkpointing, report_to=[],
            save_strategy="steps" if checkpoints else "no", save_steps=cfg.save_steps or 500,
            save_total_limit=cfg.save_total_limit,
            use_cpu=not torch.cuda.is_available(), bf16=model_cfg.dtype == "bfloat16", disable_tqdm=False,
            # Fixed, not a setting: ZeRO-3 generation needs the gathered weights (False fails in TRL's loss).
            ds3_gather_for_generation=True,
            use_vllm=vllm, vllm_mode=rollout.vllm_mode, vllm_server_base_url=rollout.vllm_server_base_url,
            vllm_gpu_memory_utilization=rollout.gpu_memory_utilization,
        )
        common = dict(model=model, reward_funcs=reward_funcs, args=args, train_dataset=rl_dataset,
                      processing_class=processor, callbacks=[_metrics_callback(sink, offset=grpo_step_offset(cfg)), *(callbacks or []),
                                                             *([_stop_at(cfg.checkpoint_step)] if cfg.checkpoint_step
                                                               else [])],
                      peft_config=_lora_config(cfg) if cfg.lora.enabled else None)
        with trl_engine(rollout, cfg.seed) if vllm else nullcontext():
            if agentic:
                trainer = _agentic_trainer(common, cfg, data_dir, tools, agent_cfg, processor, forced_first_turn,
                                           artifact_sink if state.is_main_process else None)
            else:
                trainer = GRPOTrainer(**common)
        summary["rollout_engine"] = "vllm" if vllm else "hf"
        _check_deepspeed_save(trainer, lora=cfg.lora.enabled)
        # DeepSpeed's own checkpoint restores the weights (by position, in `train`); the plain Trainer's
        # resume would skip them (see _restore_weights).
        if resume and not cfg.lora.enabled and not trainer.is_deepspeed_enabled:
            _restore_weights(trainer.model, Path(resume), model_cfg.dtype)
        trainer.train(resume_from_checkpoint=resume)
        history = trainer.state.log_history
        if state.is_main_process and out_dir.exists():
            shutil.rmtree(out_dir)
        state.wait_for_everyone()
        if cfg.lora.enabled:  # adapters merged into a plain model folder, on rank 0
            if state.is_main_process:
                trainer.accelerator.unwrap_model(trainer.model).merge_and_unload().save_pretrained(out_dir)
                processor.save_pretrained(out_dir)
        else:
            # On every rank (a collective under ZeRO-3, see sft_cold_start); rank 0 writes model and processor.
            trainer.save_model(str(out_dir))
        if state.num_processes > 1:
            summary["rank_weights"] = _rank_digests(state, trainer.accelerator.unwrap_model(trainer.model))
        if state.is_main_process:
            (out_dir / "training_args.bin").unlink(missing_ok=True)  # the trainer's arguments, not the model's
            # Provenance travels with the weights: the settings that produced them.
            (out_dir / TRAIN_CONFIG_FILE).write_text(json.dumps(
                {"train": cfg.model_dump(mode="json"), "base_model": model_cfg.model_dump(mode="json"),
                 "reward_funcs": [f.__name__ for f in reward_funcs]}, indent=2))
            write_log_csv(history, log_csv)
        state.wait_for_everyone()
    finally:
        if state.is_main_process:
            shutil.rmtree(scratch, ignore_errors=True)
    steps = [h for h in history if "reward" in h]
    last = steps[-1] if steps else {}
    return {
        **summary,
        "steps": trainer.state.global_step,
        "final_reward": float(last.get("reward", 0.0)),
        "final_kl": float(last.get("kl", 0.0)),
        "mean_reward": sum(h["reward"] for h in steps) / len(steps) if steps else 0.0,
        "train_items": len(rl_dataset),
        "world_size": state.num_processes,
    }
