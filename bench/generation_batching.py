"""Batched vs one-item-at-a-time generation: the same model, the same prompts, in one run.

The model is the embedded tiny Qwen2.5-VL (real Qwen tokenizer, random weights) unless --model points at a
checkpoint folder. Prompts are MAT-style direct questions over the six MAT-Coding demo images (resized to 512 px,
the data stage's size), repeated to --items. Greedy decoding of --new-tokens tokens; the random model never
stops early, so every item generates the full length in both runs.

    python bench/generation_batching.py [--items 32] [--batch 8] [--new-tokens 32] [--model DIR]

Prints a markdown table (paste into docs/benchmarks.md) and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from arft_core.agent.generation import HFGenerator
from arft_core.agent.rollout import Prompt
from arft_core.config import EvalConfig, ModelConfig
from arft_core.model.embedded import load_model, prepare_base_model
from arft_core.protocol import direct_prompt

DEMO = Path(__file__).resolve().parents[2] / "shared" / "reference" / "mat-coding-demo"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the embedded model)")
    ap.add_argument("--demo", type=Path, default=DEMO, help="folder of MAT-Coding demo images")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            model_dir = Path(tmp) / "model"
            prepare_base_model(ModelConfig(), model_dir)
        model, processor = load_model(model_dir)
        sources = sorted(p for p in args.demo.glob("*.png"))
        if not sources:
            sys.exit(f"no demo images under {args.demo}")
        images = []
        for k, src in enumerate(sources):
            im = Image.open(src).convert("RGB")
            im.thumbnail((512, 512))
            images.append(Path(tmp) / f"{k}.png")
            im.save(images[-1])
        questions = ["What is the title?", "What text is shown?", "What is the serving size?", "Read the number."]
        prompts = [Prompt(direct_prompt(questions[i % len(questions)], "mat"), [images[i % len(images)]], i, 1)
                   for i in range(args.items)]
        results = {}
        for batch in (1, args.batch):
            gen = HFGenerator(model, processor, EvalConfig(max_new_tokens=args.new_tokens, batch_size=batch))
            gen.generate(prompts[:min(batch, 2)])  # warm-up (allocations, kernels)
            start = time.perf_counter()
            outputs = gen.generate(prompts)
            seconds = time.perf_counter() - start
            results[batch] = {"seconds": round(seconds, 2), "items_per_s": round(len(prompts) / seconds, 2),
                              "outputs": outputs}
    one, many = results[1], results[args.batch]
    same = sum(a == b for a, b in zip(one["outputs"], many["outputs"], strict=True)) / len(prompts)
    speedup = one["seconds"] / many["seconds"]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {'embedded' if args.model is None else args.model} ({n_params / 1e6:.1f} M params), "
          f"{args.items} items, {args.new_tokens} new tokens, greedy; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores")
    print("\n| batch | items | seconds | items/s | speed-up |\n|---|---|---|---|---|")
    print(f"| 1 | {args.items} | {one['seconds']} | {one['items_per_s']} | 1.00x |")
    print(f"| {args.batch} | {args.items} | {many['seconds']} | {many['items_per_s']} | {speedup:.2f}x |")
    print(f"\nidentical outputs (batched vs one at a time): {same:.0%}")
    print(json.dumps({"items": args.items, "batch": args.batch, "one_s": one["seconds"], "batched_s": many["seconds"],
                      "speedup": round(speedup, 2), "identical": round(same, 3)}))


if __name__ == "__main__":
    main()
