"""GPU rollout and GRPO-step benchmark on a Qwen2.5-VL-3B-shaped model with random bf16 weights (no download).

Side by side, in one run, same model and prompts:
  (a) the authors' generation pattern: one prompt at a time, `generate(num_return_sequences=G)`;
  (b) ours: all prompts of a step in one `generate` call (the agent's `HFEngine` batching, G copies per prompt).
For each: rollout tokens/s, seconds, peak GPU memory, and MFU (2 x params x generated tokens / time / peak
bf16 FLOP/s; a lower bound: attention and the vision tower are not counted). Then one GRPO optimizer step
(TRL GRPOTrainer, G completions per prompt) with its wall time and peak memory, plain and then under each
DeepSpeed config of --deepspeed (default ZeRO-3: weights partitioned at load, gathered for generation), run
from the project root.

    python bench/gpu_rollout.py [--prompts 8] [--G 8] [--new-tokens 256] [--size 3b|7b] [--peak-tflops 989]
    python bench/gpu_rollout.py --tiny          # CPU smoke run of the same code path (tiny model)

Prints a markdown table (paste into docs/benchmarks.md) and one JSON line. Record the device it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

SHAPES = {  # Qwen2.5-VL's published text and vision tower sizes
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4),
}
VISION = dict(vision_depth=32, vision_hidden_size=1280, vision_intermediate_size=3420, vision_num_heads=16)


def build_model(size: str, tiny: bool, device: str):
    """The embedded model builder at a real size (full vocabulary, random weights), in bf16 on `device`."""
    from arft_core.config import ModelConfig
    from arft_core.model.embedded import build_embedded_model

    embedded = {"vocab_size": 2048} if tiny else {"vocab_size": None, "mrope_section": [16, 24, 24],
                                                  **SHAPES[size], **VISION}
    model, processor = build_embedded_model(ModelConfig(embedded=embedded))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return model.to(device=device, dtype=dtype), processor


def timed_generate(model, processor, prompts, images, G: int, new_tokens: int, one_at_a_time: bool) -> dict:
    tok = processor.tokenizer
    tok.padding_side = "left"
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, temperature=1.0,
               pad_token_id=tok.pad_token_id)
    sync()
    start = time.perf_counter()
    generated = 0
    with torch.no_grad():
        if one_at_a_time:  # the authors' trainer: one prompt, num_return_sequences=G
            for text, image in zip(prompts, images, strict=True):
                inputs = processor(text=[text], images=[image], return_tensors="pt").to(model.device)
                out = model.generate(**inputs, num_return_sequences=G, **gen)
                generated += (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]
        else:  # ours: every prompt x G in one batch
            inputs = processor(text=[t for t in prompts for _ in range(G)],
                               images=[im for im in images for _ in range(G)], return_tensors="pt",
                               padding=True).to(model.device)
            out = model.generate(**inputs, **gen)
            generated += (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]
    sync()
    seconds = time.perf_counter() - start
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None
    return {"seconds": round(seconds, 2), "tokens": generated, "tokens_per_s": round(generated / seconds, 1),
            "peak_gib": peak}


def grpo_step(model_dir: Path, images, prompts_msgs, G: int, new_tokens: int, tmp: Path,
              deepspeed: str | None = None) -> dict:
    """One TRL GRPO optimizer step from a saved model (TRL builds the KL reference from the model's folder); with
    `deepspeed` (a DeepSpeed JSON config), under DeepSpeed as one rank, the model built under its ZeRO-3 init."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from arft_core.model.embedded import load_model

    if deepspeed:
        import deepspeed as ds

        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0", "LOCAL_RANK": "0",
                           "WORLD_SIZE": "1"}.items():
            os.environ.setdefault(key, value)  # a one-rank launch without a launcher
        ds.init_distributed()  # before the model is built under ZeRO-3 (its batch size needs the world size)

    def length_reward(completions, **_):
        return [float(len(c[0]["content"])) for c in completions]

    ds = Dataset.from_dict({"prompt": prompts_msgs, "image": images})
    args = GRPOConfig(output_dir=str(tmp / "grpo"), max_steps=1, per_device_train_batch_size=G, num_generations=G,
                      max_completion_length=new_tokens, learning_rate=1e-6, beta=0.04, loss_type="grpo",
                      bf16=torch.cuda.is_available(), gradient_checkpointing=True, report_to=[],
                      save_strategy="no", use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
                      deepspeed=deepspeed)
    # Built after the arguments: with a ZeRO-3 config, from_pretrained then partitions the weights as they load.
    model, processor = load_model(model_dir, "bfloat16" if torch.cuda.is_available() else "float32")
    processor.tokenizer.padding_side = "left"
    trainer = GRPOTrainer(model=model, reward_funcs=[length_reward], args=args, train_dataset=ds,
                          processing_class=processor)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None
    return {"seconds": round(seconds, 2), "peak_gib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--size", choices=sorted(SHAPES), default="3b")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s (H100/H200: 989)")
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU: checks the code path only")
    ap.add_argument("--skip-grpo", action="store_true")
    ap.add_argument("--deepspeed", nargs="*", default=["infra/deepspeed/zero3.json"],
                    help="DeepSpeed configs for extra GRPO-step rows, after the plain one (none: skip them)")
    args = ap.parse_args()

    from arft_core.protocol import coding_prompt

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = build_model(args.size, args.tiny, device)
    n_params = sum(p.numel() for p in model.parameters())
    images = [Image.new("RGB", (616, 616), (40 * i % 255, 90, 160)) for i in range(args.prompts)]  # 720->616 cap
    msgs = [coding_prompt(f"What is written in region {i}?") for i in range(args.prompts)]
    texts = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]
    timed_generate(model, processor, texts[:1], images[:1], 2, 8, False)  # warm-up
    results = {name: timed_generate(model, processor, texts, images, args.G, args.new_tokens, one)
               for name, one in (("authors: one prompt x G", True), ("ours: batched", False))}
    for r in results.values():
        r["mfu"] = round(2 * n_params * r["tokens"] / r["seconds"] / (args.peak_tflops * 1e12), 4)
    steps = None
    if not args.skip_grpo:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(Path(tmp) / "model")
            processor.save_pretrained(Path(tmp) / "model")
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            steps = {"plain": grpo_step(Path(tmp) / "model", images, msgs, args.G, args.new_tokens, Path(tmp))}
            for config in args.deepspeed:  # last: DeepSpeed's global ZeRO-3 state outlives its trainer
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                steps[f"DeepSpeed {Path(config).stem}"] = grpo_step(Path(tmp) / "model", images, msgs, args.G,
                                                                    args.new_tokens, Path(tmp), config)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"device: {name}; model: {'tiny' if args.tiny else 'Qwen2.5-VL-' + args.size.upper()}-shaped, "
          f"{n_params / 1e9:.2f} B params, random bf16; {args.prompts} prompts x G={args.G}, "
          f"{args.new_tokens} new tokens")
    print("\n| generation | seconds | tokens/s | peak GiB | MFU |\n|---|---|---|---|---|")
    for k, r in results.items():
        print(f"| {k} | {r['seconds']} | {r['tokens_per_s']} | {r['peak_gib']} | {r['mfu']:.2%} |")
    if steps:
        print(f"\n| GRPO step (TRL, G={args.G}, 1 prompt x G, one device) | seconds | peak GiB |\n|---|---|---|")
        for k, r in steps.items():
            print(f"| {k} | {r['seconds']} | {r['peak_gib']} |")
    print(json.dumps({"device": name, "params": n_params, "generation": results, "grpo_step": steps}))


if __name__ == "__main__":
    main()
