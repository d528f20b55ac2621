"""One rank of the DeepSpeed agentic-rollout test, started by `accelerate launch ... agentic_job.py PARAMS LOG`.

It runs `arft train-worker`'s code with a scripted first turn that differs by rank: rank 0's trajectories open
with a code call (the sandbox rotates the image and the model gets a second turn), rank 1's with a final answer
(they end after one turn). Rank 1 is then idle while rank 0 generates: under ZeRO-3 it must still take part in
the weight gather. Each rank appends the turn counts (model turns, generated or scripted) of its trajectories, per GRPO step, to LOG.rank<R>."""

import json
import os
import sys
from pathlib import Path

ROTATE_90 = ("<think> The image is rotated. </think>\n<code>\n```python\nimport cv2\n"
             "img = cv2.imread('path_to_input_image.jpg')\nimg = cv2.rotate(img, cv2.ROTATE_90_COUNTERCLOCKWISE)\n"
             "cv2.imwrite('path_to_output_image.png', img)\n```\n</code>")
ANSWER = "<think> It is clear. </think>\n<answer> 1 </answer>"

if __name__ == "__main__":
    from arft_core.agent.grpo import trajectory_answer_reward, trajectory_format_reward
    from arft_core.config import load_config
    from arft_core.stages.train import train_worker

    params, log = Path(sys.argv[1]), Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    first = ROTATE_90 if rank == 0 else ANSWER

    def answer_reward(completions, records, **kwargs):
        with log.with_name(f"{log.name}.rank{rank}").open("a") as f:
            f.write(json.dumps([len(r["turns"]) for r in records]) + "\n")
        return trajectory_answer_reward(completions, records, **kwargs)

    train_worker(load_config(params), forced_first_turn=lambda i: first,
                 reward_funcs=[trajectory_format_reward, answer_reward])
