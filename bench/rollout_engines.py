"""Rollout engines side by side: the authors' pattern, HF batched and vLLM, same model and prompts, one run.

  (a) authors: one prompt at a time, `generate(num_return_sequences=G)` (their GRPO trainer);
  (b) HF batched: every prompt x G in one `generate` call (the agent's `HFEngine` batching);
  (c) vLLM: one `LLM.generate` call, n=G per prompt (the engine `rollout.engine: vllm` builds, `agent.engine`).
Each generates exactly --new-tokens per sequence (sampling at temperature 1, end-of-text ignored) from image
prompts; tokens/s and the ratios (c)/(b) and (b)/(a) are printed as a markdown table and one JSON line.

Runs in the vLLM environment (`make vllm-env`):

    .vllm-venv/bin/python bench/rollout_engines.py --tiny          # CPU: the embedded-size model, float32
    .vllm-venv/bin/python bench/rollout_engines.py --size 3b       # GPU: a Qwen2.5-VL-3B-shaped bf16 model

Record the figures with the machine they ran on in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_rollout import SHAPES, build_model, timed_generate  # noqa: E402


def timed_vllm(model_dir: Path, texts, images, G: int, new_tokens: int, dtype: str, seed: int = 0) -> dict:
    from vllm import SamplingParams

    from arft_core.agent.engine import build_llm
    from arft_core.config import RolloutConfig

    with tempfile.TemporaryDirectory() as view:
        start = time.perf_counter()
        llm = build_llm(model_dir, Path(view), RolloutConfig(gpu_memory_utilization=0.8), dtype=dtype, seed=seed,
                        limit_mm_per_prompt={"image": 1})
        startup = time.perf_counter() - start
        params = SamplingParams(n=G, temperature=1.0, max_tokens=new_tokens, min_tokens=new_tokens,
                                ignore_eos=True)
        prompts = [{"prompt": t, "multi_modal_data": {"image": im}} for t, im in zip(texts, images, strict=True)]
        llm.generate(prompts[:1], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up, as for HF
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
    generated = sum(len(o.token_ids) for r in outs for o in r.outputs)
    return {"seconds": round(seconds, 2), "tokens": generated, "tokens_per_s": round(generated / seconds, 1),
            "startup_s": round(startup, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--image-px", type=int, default=224, help="square image side (the model sees (px/28)^2 tokens)")
    ap.add_argument("--size", choices=sorted(SHAPES), default="3b")
    ap.add_argument("--tiny", action="store_true", help="the embedded-size model (CPU)")
    args = ap.parse_args()

    from arft_core.protocol import coding_prompt

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = build_model(args.size, args.tiny, device)
    dtype = str(model.dtype).removeprefix("torch.")
    images = [Image.new("RGB", (args.image_px,) * 2, (40 * i % 255, 90, 160)) for i in range(args.prompts)]
    msgs = [coding_prompt(f"What is written in region {i}?") for i in range(args.prompts)]
    texts = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]
    rows: dict[str, dict] = {}
    timed_generate(model, processor, texts[:1], images[:1], 2, 8, False)  # warm-up
    for name, one in (("authors: one prompt x G", True), ("HF batched", False)):
        rows[name] = timed_generate(model, processor, texts, images, args.G, args.new_tokens, one)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "model")
        processor.save_pretrained(Path(tmp) / "model")
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        rows["vLLM"] = timed_vllm(Path(tmp) / "model", texts, images, args.G, args.new_tokens, dtype)
    a, b, c = (rows[k]["tokens_per_s"] for k in ("authors: one prompt x G", "HF batched", "vLLM"))
    ratios = {"vllm_over_hf_batched": round(c / b, 2), "hf_batched_over_authors": round(b / a, 2)}
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{'tiny' if args.tiny else args.size} model, {dtype}, {where}: {args.prompts} prompts x G={args.G}, "
          f"{args.new_tokens} new tokens each, {args.image_px}px images\n")
    print("| engine | tokens | seconds | tokens/s |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['tokens']} | {r['seconds']} | {r['tokens_per_s']} |")
    print(f"\nvLLM / HF batched: {ratios['vllm_over_hf_batched']}x; HF batched / authors: "
          f"{ratios['hf_batched_over_authors']}x (vLLM engine start: {rows['vLLM']['startup_s']} s, not counted)")
    print(json.dumps({**vars(args), "device": where, "dtype": dtype, "size": "tiny" if args.tiny else args.size,
                      "rows": rows, **ratios}))


if __name__ == "__main__":
    main()
