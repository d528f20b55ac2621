"""Model back-ends for the agent loop: Hugging Face `generate` and vLLM, as `rollout.engine` chooses.

Both batch many prompts per call and stop right after a closing action tag (`protocol.STOP_SEQUENCES`;
`stop_sequences=()` turns that off: the paper's harness has none). Their decoding is resolved once, in the open
(`decoding`): EvalConfig's explicit values (`eval.decoding: explicit`), or the model folder's generation_config.json
(`checkpoint`: what the authors' HF `generate` with no sampling arguments used); either way every batch is seeded.
`max_new_tokens` is the cap per call; the evaluation sets it per benchmark (eval.max_new_tokens).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from arft_core.agent.rollout import Deadline, Prompt
from arft_core.config import EvalConfig, RolloutConfig
from arft_core.protocol import STOP_SEQUENCES


def cut_at_stop(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """Text up to and including the first stop sequence (batched decoding may run on past it); no stops: as is."""
    ends = [text.find(s) + len(s) for s in stops if s in text]
    return text[:min(ends)] if ends else text


DECODING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")


def checkpoint_decoding(generation_config) -> dict:
    """The decoding values of a transformers GenerationConfig (a checkpoint's generation_config.json); unset ones
    take the values `generate` would use (transformers' defaults: greedy, temperature 1, top_k 50)."""
    from transformers import GenerationConfig

    fallback = GenerationConfig._get_default_generation_params()
    values = {k: getattr(generation_config, k, None) for k in DECODING_KEYS}
    return {k: type(fallback[k])(fallback[k] if v is None else v) for k, v in values.items()}


def resolve_decoding(cfg: EvalConfig, generation_config=None) -> dict:
    """The decoding values a back-end uses: eval's explicit ones, or (`decoding: checkpoint`) the checkpoint's."""
    if cfg.decoding == "checkpoint":
        from transformers import GenerationConfig

        return checkpoint_decoding(generation_config if generation_config is not None else GenerationConfig())
    return {k: getattr(cfg, k) for k in DECODING_KEYS}


def folder_generation_config(model_dir: Path):
    """The generation_config.json of a model folder (a real-checkpoint reference followed); transformers' defaults
    when it has none."""
    from transformers import GenerationConfig

    from arft_core.model.embedded import resolve_model_dir

    path = resolve_model_dir(model_dir)
    return GenerationConfig.from_pretrained(path) if (path / "generation_config.json").is_file() else GenerationConfig()


class HFGenerator:
    """Batched `model.generate` with left padding; images are opened per batch (not kept for the whole run)."""

    def __init__(self, model, processor, cfg: EvalConfig, progress: Callable[[int], None] = lambda _: None,
                 stop_sequences: Sequence[str] = STOP_SEQUENCES, max_new_tokens: int | None = None):
        self.model, self.processor, self.cfg, self.progress = model, processor, cfg, progress
        self.stop_sequences = tuple(stop_sequences)
        # The checkpoint's values are the loaded model's generation_config (read from its folder's file).
        self.decoding = resolve_decoding(cfg, model.generation_config)
        self.max_new_tokens = max_new_tokens or max(cfg.max_new_tokens.values())
        self.calls = 0
        self._stop = None  # built once: transformers' StopStringCriteria takes ~2 s to index a 151k vocabulary

    def generate(self, prompts: Sequence[Prompt], deadline: Deadline | None = None) -> list[str]:
        """One completion per prompt; with a `deadline`, decoding stops at the first step after it expires and the
        batches not yet started are skipped (their completions are empty)."""
        import torch
        from PIL import Image

        from transformers import StoppingCriteriaList, StopStringCriteria

        tok = self.processor.tokenizer
        tok.padding_side = "left"
        self.model.eval()
        if self._stop is None and self.stop_sequences:
            self._stop = StoppingCriteriaList([StopStringCriteria(tok, list(self.stop_sequences))])
        outputs: list[str] = []
        stopping = self._stop
        if deadline is not None:
            stopping = StoppingCriteriaList([*(self._stop or []), _DeadlineCriteria(deadline)])
        for start in range(0, len(prompts), self.cfg.batch_size):
            batch = prompts[start:start + self.cfg.batch_size]
            if deadline is not None and deadline.expired():
                outputs += [""] * len(batch)
                continue
            texts = [self.processor.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True)
                     for p in batch]
            images = [Image.open(path).convert("RGB") for p in batch for path in p.images]
            inputs = self.processor(text=texts, images=images or None, return_tensors="pt", padding=True)
            inputs = inputs.to(self.model.device)
            d = self.decoding
            gen = dict(max_new_tokens=self.max_new_tokens, do_sample=d["do_sample"],
                       repetition_penalty=d["repetition_penalty"], stopping_criteria=stopping,
                       pad_token_id=tok.pad_token_id)
            if d["do_sample"]:  # all three, so that none of the checkpoint's stays in force unseen
                gen.update(temperature=d["temperature"], top_p=d["top_p"], top_k=d["top_k"])
            # Seeded per batch from (seed, call): the same run gives the same samples whatever came before.
            torch.manual_seed(self.cfg.seed * 1_000_003 + self.calls)
            self.calls += 1
            with torch.no_grad():
                out = self.model.generate(**inputs, **gen)
            new = out[:, inputs["input_ids"].shape[1]:]
            outputs += [cut_at_stop(t, self.stop_sequences)
                        for t in self.processor.batch_decode(new, skip_special_tokens=True)]
            self.progress(len(batch))
        return outputs


class VLLMGenerator:
    """vLLM back-end: one `LLM.chat` call per batch of prompts, stopping after a closing action tag."""

    def __init__(self, model_dir: Path, cfg: EvalConfig, rollout: RolloutConfig, dtype: str,
                 stop_sequences: Sequence[str] = STOP_SEQUENCES, max_new_tokens: int | None = None,
                 min_pixels: int | None = None, max_pixels: int | None = None):
        import tempfile

        from arft_core.agent.engine import build_llm

        self.cfg, self.stop_sequences = cfg, tuple(stop_sequences)
        self._folder = tempfile.TemporaryDirectory(prefix="arft-vllm-")  # the vLLM view of an embedded model
        self.decoding = resolve_decoding(cfg, folder_generation_config(model_dir))
        self.max_new_tokens = max_new_tokens or max(cfg.max_new_tokens.values())
        pixels = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}
        self.llm = build_llm(model_dir, Path(self._folder.name), rollout, dtype=dtype, seed=cfg.seed,
                             limit_mm_per_prompt={"image": 8}, mm_processor_kwargs=pixels or None)

    def _params(self):
        from vllm import SamplingParams

        d = self.decoding
        return SamplingParams(
            max_tokens=self.max_new_tokens, temperature=d["temperature"] if d["do_sample"] else 0.0,
            top_p=d["top_p"] if d["do_sample"] else 1.0, top_k=(d["top_k"] or -1) if d["do_sample"] else -1,
            repetition_penalty=d["repetition_penalty"], stop=list(self.stop_sequences) or None,
            include_stop_str_in_output=True, seed=self.cfg.seed)

    def generate(self, prompts: Sequence[Prompt], deadline: Deadline | None = None) -> list[str]:
        """One completion per prompt; vLLM's call is not interrupted: a `deadline` is checked between turns by
        the loop (a call is bounded by max_new_tokens)."""
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
        results = self.llm.chat(conversations, self._params(), use_tqdm=False)
        return [cut_at_stop(r.outputs[0].text, self.stop_sequences) for r in results]


class _DeadlineCriteria:
    """A transformers stopping criterion: every sequence is done once the deadline has expired (checked after
    each decode step), so that a request past its deadline frees the model within one step."""

    def __init__(self, deadline: Deadline):
        self.deadline = deadline

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.deadline.expired() is not None, dtype=torch.bool,
                          device=input_ids.device)


def _data_url(path: Path) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    with Image.open(path) as im:
        im.convert("RGB").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def make_generator(model_dir: Path, cfg: EvalConfig, rollout: RolloutConfig, dtype: str = "float32",
                   progress: Callable[[int], None] = lambda _: None, *, stop_sequences: Sequence[str] = STOP_SEQUENCES,
                   min_pixels: int | None = None, max_pixels: int | None = None):
    """vLLM or Hugging Face, as `rollout.engine` resolves for this model (`engine.use_vllm`), in the model's own
    dtype: a float32 model run in bf16 would not give the same greedy tokens. The pixel bounds
    (model.min_pixels / max_pixels) replace the checkpoint processor's; `stop_sequences=()`: no stop strings."""
    from arft_core.agent.engine import use_vllm

    if use_vllm(rollout, model_dir):
        return VLLMGenerator(model_dir, cfg, rollout, dtype, stop_sequences, min_pixels=min_pixels,
                             max_pixels=max_pixels)
    from arft_core.model.embedded import load_model

    model, processor = load_model(model_dir, dtype, min_pixels, max_pixels)
    return HFGenerator(model, processor, cfg, progress, stop_sequences)
