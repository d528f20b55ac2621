"""A training job for the kill-and-resume test, run as its own process:

    python resume_job.py BASE DATA OUT CHECKPOINTS BATCH_LOG MAX_STEPS SAVE_STEPS [KILL_AT_STEP]

It trains with a reward that records which items each GRPO step saw, and with KILL_AT_STEP it SIGKILLs itself
at the end of that step (a real kill: no cleanup, no final save)."""

import json
import os
import signal
import sys
from pathlib import Path

from transformers import TrainerCallback

from arft_core.config import ModelConfig, TrainConfig
from arft_core.training import train

base, data, out, ckpt, batch_log = (Path(a) for a in sys.argv[1:6])
max_steps, save_steps = int(sys.argv[6]), int(sys.argv[7])
kill_at = int(sys.argv[8]) if len(sys.argv) > 8 else None


def record_batches(completions, item_id, trainer_state, **_):
    with batch_log.open("a") as f:
        f.write(json.dumps({"step": trainer_state.global_step + 1, "ids": list(item_id),
                            "texts": [c[0]["content"] for c in completions]}) + "\n")
    return [float(len(c[0]["content"])) for c in completions]


class KillAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


cfg = TrainConfig(max_steps=max_steps, save_steps=save_steps, num_generations=2, max_completion_length=4,
                  learning_rate=1e-2, reward_weights=[1.0], sft={"enabled": False})
summary = train(ModelConfig(embedded={"vocab_size": 1024}), cfg, base, data, out, out.parent / "log.csv",
                reward_funcs=[record_batches], checkpoint_dir=ckpt, callbacks=[KillAt()] if kill_at else [])
print(json.dumps(summary))
