"""A training job for the kill-and-resume tests, run as its own process (or as each rank of a launch):

    python resume_job.py BASE DATA OUT CHECKPOINTS BATCH_LOG --max-steps N --save-steps K [--kill-at S] [--sft-steps M]

It trains with a reward that records which items each GRPO step saw (one log per rank under a launcher:
BATCH_LOG.rank<R>), and with --kill-at it SIGKILLs itself at the end of that step (a real kill: no cleanup, no final
save; under a launcher every rank does)."""

import argparse
import json
import os
import signal
from pathlib import Path

from transformers import TrainerCallback

from arft_core.agent.runner import open_tools
from arft_core.config import ModelConfig, SandboxConfig, TrainConfig
from arft_core.training import train

parser = argparse.ArgumentParser()
for name in ("base", "data", "out", "ckpt", "batch_log"):
    parser.add_argument(name, type=Path)
parser.add_argument("--max-steps", type=int, required=True)
parser.add_argument("--save-steps", type=int, required=True)
parser.add_argument("--kill-at", type=int)
parser.add_argument("--sft-steps", type=int, default=0)
a = parser.parse_args()
rank = os.environ.get("RANK")
batch_log = a.batch_log.with_name(f"{a.batch_log.name}.rank{rank}") if rank is not None else a.batch_log


def record_batches(completions, item_id, trainer_state, **_):
    with batch_log.open("a") as f:
        f.write(json.dumps({"step": trainer_state.global_step + 1, "ids": list(item_id),
                            "texts": [c[0]["content"] for c in completions]}) + "\n")
    return [float(len(c[0]["content"])) for c in completions]


class KillAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == a.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


sft = {"enabled": True, "max_steps": a.sft_steps, "batch_size": 2} if a.sft_steps else {"enabled": False}
cfg = TrainConfig(max_steps=a.max_steps, save_steps=a.save_steps, num_generations=2, max_completion_length=4,
                  learning_rate=1e-2, reward_weights=[1.0], sft=sft)
with open_tools(SandboxConfig(workers=1), code=True) as tools:  # the sandbox replays the teacher into step rows
    summary = train(ModelConfig(embedded={"vocab_size": 1024}), cfg, a.base, a.data, a.out, a.out.parent / "log.csv",
                    reward_funcs=[record_batches], checkpoint_dir=a.ckpt, callbacks=[KillAt()] if a.kill_at else [],
                    tools=tools)
if rank in (None, "0"):  # one summary line, not two ranks' interleaved
    print(json.dumps(summary), flush=True)
