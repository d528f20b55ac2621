"""The train stage: SFT cold start and GRPO in this process, or on the ranks of a distributed launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from arft_core.config import PARAMS_FILE, Config
from arft_core.io import write_json_atomic

MACHINE_RANK_ENV = "ARFT_MACHINE_RANK"  # this node's rank in a multi-node launch (0: the main node)
SHM_COMM_OP = "deepspeed_shm_comm"  # DeepSpeed's shared-memory communication op, built at its first start on CPU
CPU_ADAM_OP = "cpu_adam"  # DeepSpeed's CPU Adam, built at the first start with optimizer offload


def train_stage(cfg: Config) -> dict:
    """SFT cold start (optional), then GRPO with TRL's GRPOTrainer on the task's step samples."""
    import mlflow

    from arft_core.tracking import log_metrics

    cfg.path("train_checkpoints").mkdir(parents=True, exist_ok=True)  # a DVC dependency of evaluate, even if empty
    if cfg.train.launcher != "none":
        run = mlflow.active_run()
        launch_distributed(cfg, run.info.run_id if run else None)
        summary = json.loads(cfg.path("train_metrics").read_text())
    else:
        summary = train_here(cfg, lambda m, step: log_metrics(m, step=step))
    mlflow.log_artifact(str(cfg.path("train_log")))
    if cfg.train.save_steps:  # where the resumable checkpoints are (too large to copy into the tracking store)
        mlflow.set_tag("train.checkpoints", str(cfg.path("train_checkpoints")))
    # What the evaluate stage compares (each becomes a LoggedModel of this run there): train.json, its dependency.
    summary["models"] = saved_models(cfg, summary["steps"])
    run = mlflow.active_run()
    summary["run_id"] = run.info.run_id if run else None
    write_json_atomic(cfg.path("train_metrics"), summary)
    return {k: v for k, v in summary.items() if k not in ("models", "run_id")}


def saved_models(cfg: Config, grpo_steps: int) -> list[dict]:
    """Every model one training saved, by training step: SFT checkpoints (train.sft.save_steps; SFT step s is step
    s), GRPO checkpoints (train.save_steps; GRPO step g is step sft.max_steps + g) and the final model, phase
    `final` (its own last checkpoint, the same weights, is not listed twice). Folders relative to the project."""
    from arft_core.training import SFT_CHECKPOINTS, checkpoint_steps, grpo_step_offset

    t, folder = cfg.train, cfg.path("train_checkpoints")
    sft = grpo_step_offset(t)
    found = [{"step": s, "phase": "sft", "folder": f} for s, f in checkpoint_steps(folder / SFT_CHECKPOINTS)
             if t.sft.enabled and t.sft.save_steps]
    found += [{"step": sft + s, "phase": "grpo", "folder": f} for s, f in checkpoint_steps(folder) if t.save_steps]
    final = {"step": sft + grpo_steps, "phase": "final", "folder": cfg.path("trained_model")}
    return [{**m, "folder": os.path.relpath(m["folder"], cfg.root)} for m in found if m["step"] < final["step"]] \
        + [{**final, "folder": os.path.relpath(final["folder"], cfg.root)}]


def train_here(cfg: Config, sink: Callable[[dict, int], None], **collaborators) -> dict:
    """Train in this process (one rank of a distributed launch, or the only one); `collaborators` go to
    `training.train` as they are (callbacks, a scripted `forced_first_turn`)."""
    from arft_core.training import train

    data_dir = cfg.path("mat_coding" if cfg.train.task == "coding" else "mat_search")
    agentic = cfg.train.mode == "agentic"
    kwargs: dict = {"sink": sink, "checkpoint_dir": cfg.path("train_checkpoints"), "rollout": cfg.rollout,
                    **collaborators}
    from arft_core.agent.runner import open_tools
    from arft_core.search import make_backend

    coding = cfg.train.task == "coding"
    # Training searches use their own cache (an output of this stage), never the search_data stage's.
    search = None if coding else make_backend(
        cfg.search.model_copy(update={"cache_path": cfg.paths.train_search_cache}), cfg.root)
    # The tools replay the teacher's trajectories into step rows and run agentic rollouts; code runs in the sandbox
    # (also for the corrected code reward).
    with open_tools(cfg.sandbox, code=coding, search=search, top_k=cfg.search.top_k) as tools:
        kwargs.update(tools=tools, agent_cfg=cfg.agent)
        if agentic:
            kwargs["artifact_sink"] = _log_text_artifact
        elif coding and cfg.train.reward_variant == "corrected":
            from arft_core.agent.env import code_runner

            kwargs["code_runner"] = code_runner(tools.sandbox)
        return train(cfg.model, cfg.train, cfg.path("base_model"), data_dir, cfg.path("trained_model"),
                     cfg.path("train_log"), **kwargs)


def _log_text_artifact(name: str, text: str) -> None:
    import mlflow

    if mlflow.active_run():
        mlflow.log_text(text, name)


def launch_command(cfg: Config, machine_rank: int = 0) -> list[str]:
    """The launcher command of `train.launcher` for this node: `accelerate launch` with accelerate_config (DDP or
    DeepSpeed ZeRO on GPUs) or `torchrun` (plain DDP: NCCL on GPUs, gloo on CPU), single- or multi-node."""
    t = cfg.train
    worker = ["-m", "arft_core.cli", "train-worker", "--params", str(cfg.source or cfg.root / PARAMS_FILE)]
    multi = t.num_machines > 1
    if multi and not t.main_process_ip:
        raise ValueError("train.main_process_ip: required when train.num_machines > 1 (the rank-0 node's address)")
    if t.launcher == "accelerate":
        config_file = cfg.root / t.accelerate_config
        if not config_file.is_file():
            raise FileNotFoundError(f"train.accelerate_config: {config_file} does not exist")
        nodes = ["--num_machines", str(t.num_machines), "--machine_rank", str(machine_rank), "--main_process_ip",
                 t.main_process_ip, "--main_process_port", str(t.main_process_port)] if multi else []
        # accelerate counts processes over all nodes
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
                "--num_processes", str(t.num_processes * t.num_machines), *nodes, *worker]
    nodes = (["--nnodes", str(t.num_machines), "--node_rank", str(machine_rank), "--master_addr",
              t.main_process_ip, "--master_port", str(t.main_process_port)] if multi else ["--standalone"])
    return [sys.executable, "-m", "torch.distributed.run", *nodes, "--nproc_per_node", str(t.num_processes),
            *worker]


def machine_rank(cfg: Config) -> int:
    """This node's rank in a `train.num_machines` launch, from ARFT_MACHINE_RANK (default 0, the main node)."""
    raw = os.environ.get(MACHINE_RANK_ENV, "0")
    if not raw.strip().isdigit() or int(raw) >= cfg.train.num_machines:
        raise ValueError(f"{MACHINE_RANK_ENV}={raw!r}: must be a node rank from 0 to "
                         f"{cfg.train.num_machines - 1} (train.num_machines is {cfg.train.num_machines})")
    return int(raw)


def train_node(cfg: Config) -> None:
    """A node other than the main one (ARFT_MACHINE_RANK > 0): start its ranks and wait for them. It tracks and
    writes nothing: global rank 0, on the main node's `arft train`, logs to MLflow and writes the outputs."""
    launch_distributed(cfg, None)


def deepspeed_config(cfg: Config) -> dict | None:
    """The DeepSpeed config that `train.launcher` starts (an accelerate config with distributed_type DEEPSPEED and
    its deepspeed_config_file, relative to the project root), or None when the launch is not DeepSpeed."""
    import yaml

    if cfg.train.launcher != "accelerate":
        return None
    launch = yaml.safe_load((cfg.root / cfg.train.accelerate_config).read_text()) or {}
    if launch.get("distributed_type") != "DEEPSPEED":
        return None
    file = (launch.get("deepspeed_config") or {}).get("deepspeed_config_file")
    return json.loads((cfg.root / file).read_text()) if file else {}


def deepspeed_ops_note(ds_config: dict) -> str | None:
    """On CPU, a line saying that DeepSpeed compiles its C++ ops now, once, and where they are cached; None when
    the ops this config needs there are built: the communication op (every start) and CPU Adam (optimizer
    offload)."""
    from torch.utils.cpp_extension import get_default_build_root

    offload = (ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device") == "cpu"
    needed = {SHM_COMM_OP: "communication op 0.5-2 min", **({CPU_ADAM_OP: "CPU Adam about 3 min"} if offload else {})}
    # torch's extension cache (TORCH_EXTENSIONS_DIR wins); the ops land in <cache>/<python-torch tag>/<op name>
    cache = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    missing = [what for op, what in needed.items()
               if not any(cache.glob(f"*/{op}/{op}.so")) and not any(cache.glob(f"{op}/{op}.so"))]
    if not missing:
        return None
    return f"DeepSpeed: compiling its C++ ops once ({', '.join(missing)}), cached in {cache} for later runs"


def launch_distributed(cfg: Config, run_id: str | None) -> None:
    """Start this node's ranks of `arft train-worker` (see `launch_command`); global rank 0 logs to MLflow run
    `run_id` and writes the outputs. A multi-node launch reads this node's rank from ARFT_MACHINE_RANK."""
    import torch

    cmd = launch_command(cfg, machine_rank(cfg))
    env = {**os.environ, "ARFT_TRAIN_RUN_ID": run_id or ""}
    ds_config = deepspeed_config(cfg)
    if ds_config is not None and not torch.cuda.is_available():
        note = deepspeed_ops_note(ds_config)
        if note:
            print(note, flush=True)
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed finds the CPU by itself; this silences its warning
    proc = subprocess.run(cmd, cwd=cfg.root, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"distributed training failed (exit {proc.returncode}): {' '.join(cmd)}")


def train_worker(cfg: Config, **collaborators) -> dict:
    """One rank of a distributed launch: train; rank 0 logs metrics to the launching stage's MLflow run.
    `collaborators`: see `train_here`."""
    import mlflow

    from arft_core.tracking import log_metrics
    from arft_core.training import distributed_state

    # Set up before anything else: every rank must know at once whether it is rank 0 (see distributed_state).
    state = distributed_state()
    run_id = os.environ.get("ARFT_TRAIN_RUN_ID")
    if state.is_main_process and run_id:
        mlflow.set_tracking_uri(cfg.tracking_uri())
        with mlflow.start_run(run_id=run_id):
            summary = train_here(cfg, lambda m, step: log_metrics(m, step=step), **collaborators)
    else:
        summary = train_here(cfg, lambda m, step: None, **collaborators)
    if state.is_main_process:
        write_json_atomic(cfg.path("train_metrics"), summary)
    # Closed before exit: left open, DeepSpeed's CPU communication can abort a rank at exit (SIGABRT, "terminate
    # called without an active exception") after a finished run, and the launch then counts as failed.
    state.wait_for_everyone()
    state.destroy_process_group()
    return summary
