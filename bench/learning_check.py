"""Learning check on the embedded model: held-out reward of (a) the untrained model, (b) after SFT, (c) after
SFT + GRPO, in one run with fixed seeds.

Data: MAT-Coding built from easy-vqa (shapes and colours, 64x64), step rows (the teacher's trajectories replayed
through the agent loop, `agent.steps`) of the train items for training and of the test items (never trained on)
for the held-out score. The held-out score is the training objective,
format + accuracy (corrected variant: code steps are run in the sandbox), averaged over `--samples` completions
sampled at the training temperature for every held-out step, plus the share of well-formed steps and the
answer-step F1.

    python bench/learning_check.py [--train 48] [--test 16] [--sft-steps 60] [--grpo-steps 60] [--vocab 4096]

Prints a markdown table (paste into docs/benchmarks.md) and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from arft_core.agent.runner import open_tools
from arft_core.agent.steps import step_rows
from arft_core.config import AgentConfig, DataConfig, ModelConfig, SandboxConfig, TrainConfig
from arft_core.data.mat_coding import generate
from arft_core.io import load_image, load_manifest
from arft_core.model.embedded import load_model, prepare_base_model
from arft_core.model.processor import load_processor
from arft_core.rewards import make_reward_funcs, step_type
from arft_core.training import train, transcript_for


def held_out_score(model_dir: Path, rows: list[dict], funcs, samples: int, max_tokens: int, seed: int) -> dict:
    model, processor = load_model(model_dir)
    model.eval()
    processor.tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    fmt_sum = acc_sum = answers_f1 = n = n_answers = 0.0
    for row in rows:
        # The row's prompt: the input the agent loop gives the model at that turn (step mode: one user message).
        text = processor.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        images = [load_image(Path(p), None) for p in row["images"]]
        inputs = processor(text=[text] * samples, images=images * samples or None, return_tensors="pt",
                           padding=True)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=True, temperature=1.0)
        texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        completions = [[{"role": "assistant", "content": t}] for t in texts]
        cols = {"solution": [row["solution"]] * samples, "answers": [row["answers"]] * samples,
                "image_path": [row["image_path"]] * samples}
        fmt, acc = (f(completions, **cols) for f in funcs)
        fmt_sum += sum(fmt)
        acc_sum += sum(acc)
        n += samples
        if step_type(row["solution"]) == "answer":
            answers_f1 += sum(acc)
            n_answers += samples
    return {"reward": round((fmt_sum + acc_sum) / n, 4), "format": round(fmt_sum / n, 4),
            "accuracy": round(acc_sum / n, 4), "answer_f1": round(answers_f1 / max(n_answers, 1), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=48, help="train items (about 3 step rows each)")
    ap.add_argument("--test", type=int, default=16, help="held-out items")
    ap.add_argument("--sft-steps", type=int, default=60)
    ap.add_argument("--grpo-steps", type=int, default=60)
    ap.add_argument("--vocab", type=int, default=4096, help="tokenizer vocabulary kept (the real Qwen ids)")
    ap.add_argument("--samples", type=int, default=4, help="completions per held-out step")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    model_cfg = ModelConfig(embedded={"vocab_size": args.vocab, "seed": args.seed})
    data_cfg = DataConfig(n_train=args.train, n_test=args.test, seed=args.seed,
                          sources={"synthetic": 0, "easy_vqa": 1}, hard=[["rotation90", "dark"]],
                          simple=["rotation90", "rotation180", "dark", "none"])  # fixes that restore 112 px shapes
    common = dict(seed=args.seed, num_generations=4, prompts_per_device=2, max_completion_length=args.max_tokens,
                  temperature=1.0, beta=0.04, reward_variant="corrected", logging_steps=10)
    sft_only = TrainConfig(max_steps=1, learning_rate=1e-12, **common,
                           sft={"enabled": True, "max_steps": args.sft_steps, "learning_rate": 3e-3, "batch_size": 8})
    started = time.perf_counter()
    agent_cfg = AgentConfig().for_training_mode("step")  # the turns training renders (the paper's single message)
    with tempfile.TemporaryDirectory() as tmp, open_tools(SandboxConfig(workers=2), code=True) as tools:
        root = Path(tmp)
        prepare_base_model(model_cfg, root / "base")
        generate(data_cfg, root / "data", root)
        data = root / "data"
        # The test items' teacher turns, replayed through the loop with the sandbox (tool images under held-out/).
        held_out = step_rows(load_manifest(data, "test"), "coding", data, tools, agent_cfg,
                             transcript_for(load_processor(root / "base"), agent_cfg, None), root / "held-out")
        from arft_core.agent.env import code_runner

        runner = code_runner(tools.sandbox)
        funcs = make_reward_funcs("coding", "corrected", code_runner=runner)
        score = lambda d: held_out_score(d, held_out, funcs, args.samples, args.max_tokens, args.seed)  # noqa: E731
        results = {"untrained": score(root / "base")}
        # (b) SFT alone: one GRPO step at a negligible learning rate, so that (b) and (c) share every code path.
        train(model_cfg, sft_only, root / "base", data, root / "sft", root / "sft.csv", code_runner=runner,
              tools=tools, agent_cfg=agent_cfg)
        results["sft"] = score(root / "sft")
        grpo = TrainConfig(max_steps=args.grpo_steps, learning_rate=2e-4, **common, sft={"enabled": False})
        summary = train(model_cfg, grpo, root / "sft", data, root / "grpo", root / "grpo.csv", code_runner=runner,
                        tools=tools, agent_cfg=agent_cfg)
        results["sft+grpo"] = score(root / "grpo")
    seconds = time.perf_counter() - started
    print(f"embedded model (vocab {args.vocab}), easy-vqa MAT-Coding: {args.train} train items "
          f"({summary['train_items']} step rows), {len(held_out)} held-out steps x {args.samples} samples; "
          f"SFT {args.sft_steps} steps, GRPO {args.grpo_steps} steps; {seconds:.0f} s")
    print("\n| model | held-out reward | format | accuracy | answer F1 |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['reward']} | {r['format']} | {r['accuracy']} | {r['answer_f1']} |")
    print(json.dumps({"results": results, "grpo_mean_train_reward": round(summary["mean_reward"], 4),
                      "seconds": round(seconds)}))


if __name__ == "__main__":
    main()
