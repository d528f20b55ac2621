"""Model back-ends for the agent loop: Hugging Face `generate` (default) and vLLM (used when installed).

Both batch many prompts per call, stop right after a closing action tag (`protocol.STOP_SEQUENCES`), and take
their decoding parameters from `EvalConfig` explicitly, seeded, instead of a checkpoint's hidden defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from arft_core.agent.rollout import Prompt
from arft_core.config import EvalConfig
from arft_core.protocol import STOP_SEQUENCES


def cut_at_stop(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """Text up to and including the first stop sequence (batched decoding may run on past it)."""
    ends = [text.find(s) + len(s) for s in stops if s in text]
    return text[:min(ends)] if ends else text


def vllm_available() -> bool:
    from importlib.util import find_spec

    if find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


class HFGenerator:
    """Batched `model.generate` with left padding; images are opened per batch (not kept for the whole run)."""

    def __init__(self, model, processor, cfg: EvalConfig, progress: Callable[[int], None] = lambda _: None):
        self.model, self.processor, self.cfg, self.progress = model, processor, cfg, progress
        self.calls = 0
        self._stop = None  # built once: transformers' StopStringCriteria takes ~2 s to index a 151k vocabulary

    def generate(self, prompts: Sequence[Prompt]) -> list[str]:
        import torch
        from PIL import Image

        from transformers import StoppingCriteriaList, StopStringCriteria

        tok = self.processor.tokenizer
        tok.padding_side = "left"
        self.model.eval()
        if self._stop is None:
            self._stop = StoppingCriteriaList([StopStringCriteria(tok, list(STOP_SEQUENCES))])
        outputs: list[str] = []
        for start in range(0, len(prompts), self.cfg.batch_size):
            batch = prompts[start:start + self.cfg.batch_size]
            texts = [self.processor.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True)
                     for p in batch]
            images = [Image.open(path).convert("RGB") for p in batch for path in p.images]
            inputs = self.processor(text=texts, images=images or None, return_tensors="pt", padding=True)
            inputs = inputs.to(self.model.device)
            gen = dict(max_new_tokens=self.cfg.max_new_tokens, do_sample=self.cfg.do_sample,
                       repetition_penalty=self.cfg.repetition_penalty, stopping_criteria=self._stop,
                       pad_token_id=tok.pad_token_id)
            if self.cfg.do_sample:
                gen.update(temperature=self.cfg.temperature, top_p=self.cfg.top_p)
            # Seeded per batch from (seed, call): the same run gives the same samples whatever came before.
            torch.manual_seed(self.cfg.seed * 1_000_003 + self.calls)
            self.calls += 1
            with torch.no_grad():
                out = self.model.generate(**inputs, **gen)
            new = out[:, inputs["input_ids"].shape[1]:]
            outputs += [cut_at_stop(t) for t in self.processor.batch_decode(new, skip_special_tokens=True)]
            self.progress(len(batch))
        return outputs


class VLLMGenerator:
    """vLLM back-end: one `LLM.chat` call per batch of prompts, stopping after a closing action tag."""

    def __init__(self, model_dir: Path, cfg: EvalConfig, dtype: str = "bfloat16"):
        from vllm import LLM, SamplingParams

        self.cfg = cfg
        self.llm = LLM(model=str(model_dir), dtype=dtype, seed=cfg.seed, limit_mm_per_prompt={"image": 8})
        self.params = SamplingParams(
            max_tokens=cfg.max_new_tokens, temperature=cfg.temperature if cfg.do_sample else 0.0,
            top_p=cfg.top_p if cfg.do_sample else 1.0, repetition_penalty=cfg.repetition_penalty,
            stop=list(STOP_SEQUENCES), include_stop_str_in_output=True, seed=cfg.seed)

    def generate(self, prompts: Sequence[Prompt]) -> list[str]:
        conversations = []
        for p in prompts:
            images = iter(p.images)
            conv = []
            for m in p.messages:
                # Data URLs work across vLLM versions (the PIL content part is recent).
                content = [{"type": "image_url", "image_url": {"url": _data_url(next(images))}}
                           if c["type"] == "image" else c for c in m["content"]]
                conv.append({"role": m["role"], "content": content})
            conversations.append(conv)
        results = self.llm.chat(conversations, self.params, use_tqdm=False)
        return [cut_at_stop(r.outputs[0].text) for r in results]


def _data_url(path: Path) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    with Image.open(path) as im:
        im.convert("RGB").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def make_generator(model_dir: Path, cfg: EvalConfig, dtype: str = "float32",
                   progress: Callable[[int], None] = lambda _: None):
    """vLLM when asked for (or `auto` and installed with a GPU), else Hugging Face."""
    if cfg.backend == "vllm" or (cfg.backend == "auto" and vllm_available()):
        return VLLMGenerator(model_dir, cfg, "bfloat16" if dtype == "float32" else dtype)
    from arft_core.model.embedded import load_model

    model, processor = load_model(model_dir, dtype)
    return HFGenerator(model, processor, cfg, progress)
