"""Model back-ends for the agent loop: Hugging Face `generate` and vLLM, as `rollout.engine` chooses.

Both batch many prompts per call and stop right after a closing action tag (`protocol.STOP_SEQUENCES`;
`stop_sequences=()` turns that off: the paper's harness has none). Their decoding is resolved once, in the open
(`decoding`): EvalConfig's explicit values (`eval.decoding: explicit`), or the model folder's generation_config.json
(`checkpoint`: what the authors' HF `generate` with no sampling arguments used); either way every batch is seeded.
Both work on token ids (the loop's `Engine`); `max_new_tokens` is an argument of each call (the evaluation passes
each benchmark's eval.max_new_tokens), never state of the engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from arft_core.agent.rollout import Deadline
from arft_core.config import EvalConfig, RolloutConfig
from arft_core.protocol import STOP_SEQUENCES


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


def turn_end(ids: list[int], eos: set[int], tokenizer=None, stops: Sequence[str] = ()) -> int:
    """How many of a turn's generated `ids` are the turn: up to and including the first end-of-sequence token, or
    the token that completes the first stop string (a batch runs on past both)."""
    cut = next((j + 1 for j, t in enumerate(ids) if t in eos), len(ids))
    if not stops or tokenizer is None:
        return cut
    text = tokenizer.decode(ids[:cut], skip_special_tokens=True)
    ends = [text.find(s) + len(s) for s in stops if s in text]
    if not ends:
        return cut
    need = text[:min(ends)]
    lo, hi = 1, cut  # the fewest tokens whose text holds the first stop (a prefix's text only grows)
    while lo < hi:
        mid = (lo + hi) // 2
        if tokenizer.decode(ids[:mid], skip_special_tokens=True).startswith(need):
            hi = mid
        else:
            lo = mid + 1
    return lo


def eos_ids(model, tokenizer) -> set[int]:
    """The tokens that end a turn: the model's generation_config eos ids (Qwen2.5-VL: <|im_end|> and
    <|endoftext|>) and the tokenizer's."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return {*ids, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])}


def decoding_config(model, decoding: dict):
    """The model's generation_config with `decoding`'s values (sampling ones only when sampling, so that none of
    the checkpoint's stays in force unseen)."""
    import copy

    cfg = copy.deepcopy(model.generation_config)
    cfg.do_sample, cfg.repetition_penalty = decoding["do_sample"], decoding["repetition_penalty"]
    if decoding["do_sample"]:
        cfg.temperature, cfg.top_p, cfg.top_k = decoding["temperature"], decoding["top_p"], decoding["top_k"]
    return cfg


class HFEngine:
    """Hugging Face `generate` on token ids, batched with left padding: the evaluation's and the served model's
    engine, and (on the unwrapped policy, `model=`) the GRPO trainer's. `generation_config` holds the decoding;
    `seed` (evaluation) seeds each batch from (seed, call) so that a run gives the same samples whatever came
    before; `logprobs` returns each new token's log-probability under the sampling distribution (training)."""

    def __init__(self, model, processor, generation_config, *, stop_sequences: Sequence[str] = (),
                 batch_size: int = 8, seed: int | None = None, logprobs: bool = False,
                 progress: Callable[[int], None] = lambda _: None):
        self.model, self.processor, self.generation_config = model, processor, generation_config
        self.stop_sequences, self.batch_size, self.seed = tuple(stop_sequences), batch_size, seed
        self.logprobs, self.progress = logprobs, progress
        self.eos = eos_ids(model, processor.tokenizer)
        self.decoding: dict | None = None  # the resolved decoding values, when built from them (make_engine)
        self.image_pad_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.calls = 0
        self._stop = None  # built once: transformers' StopStringCriteria takes ~2 s to index a 151k vocabulary

    def generate(self, ids: Sequence[list[int]], images: Sequence[list], max_new_tokens: int,
                 deadline: Deadline | None = None, model=None) -> list[tuple[list[int], list[float] | None]]:
        """One turn per input; with a `deadline`, decoding stops at the first step after it expires and the
        batches not yet started are skipped (their turns are empty)."""
        import copy

        import torch
        from transformers import StoppingCriteriaList, StopStringCriteria

        model = model or self.model
        tok = self.processor.tokenizer
        if self._stop is None and self.stop_sequences:
            self._stop = StoppingCriteriaList([StopStringCriteria(tok, list(self.stop_sequences))])
        stopping = StoppingCriteriaList([*(self._stop or []), *([_DeadlineCriteria(deadline)] if deadline else [])])
        cfg = copy.deepcopy(self.generation_config)
        cfg.max_new_tokens = max_new_tokens
        cfg.return_dict_in_generate, cfg.output_scores = True, self.logprobs
        out: list[tuple[list[int], list[float] | None]] = []
        for start in range(0, len(ids), self.batch_size):
            batch, imgs = ids[start:start + self.batch_size], images[start:start + self.batch_size]
            if deadline is not None and deadline.expired():
                out += [([], None)] * len(batch)
                continue
            inputs = self.model_inputs(batch, imgs, model.device)
            if self.seed is not None:
                torch.manual_seed(self.seed * 1_000_003 + self.calls)
            self.calls += 1
            with torch.no_grad():
                gen = model.generate(**inputs, generation_config=cfg, stopping_criteria=stopping or None,
                                     pad_token_id=tok.pad_token_id)
            new = gen.sequences[:, inputs["input_ids"].shape[1]:]
            logp = None
            if self.logprobs:
                logp = torch.stack(gen.scores, 1).float().log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
            for b in range(new.size(0)):
                row = new[b].tolist()
                n = turn_end(row, self.eos, tok, self.stop_sequences)
                out.append((row[:n], logp[b, :n].tolist() if logp is not None else None))
            self.progress(len(batch))
        return out

    def model_inputs(self, batch: Sequence[list[int]], imgs: Sequence[list], device) -> dict:
        """The model's inputs for token sequences with their images: left-padded ids, pixel values, and the
        multimodal token types (Qwen2.5-VL's 3-D rotary positions)."""
        import torch

        from trl.trainer.utils import pad

        seqs = [torch.tensor(s, dtype=torch.long) for s in batch]
        input_ids = pad(seqs, padding_value=self.processor.tokenizer.pad_token_id, padding_side="left")
        attention = pad([torch.ones_like(t) for t in seqs], padding_value=0, padding_side="left")
        inputs = {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)}
        flat = [im for lst in imgs for im in lst]
        if flat:
            inputs.update({k: v.to(device) for k, v in
                           self.processor.image_processor(images=flat, return_tensors="pt").items()})
            inputs["mm_token_type_ids"] = (inputs["input_ids"] == self.image_pad_id).long()  # 3-D rotary positions
        return inputs


class VLLMEngine:
    """vLLM on token ids (`LLM.generate` with each input's image-pad runs collapsed, as vLLM expands them itself);
    stops after a closing action tag as the Hugging Face engine does. A call is not interrupted: a `deadline` is
    checked between turns by the loop (a call is bounded by max_new_tokens)."""

    def __init__(self, model_dir: Path, cfg: EvalConfig, rollout: RolloutConfig, dtype: str,
                 stop_sequences: Sequence[str] = STOP_SEQUENCES, min_pixels: int | None = None,
                 max_pixels: int | None = None):
        import tempfile

        from arft_core.agent.engine import build_llm
        from arft_core.model.processor import load_processor

        self.cfg, self.stop_sequences = cfg, tuple(stop_sequences)
        self._folder = tempfile.TemporaryDirectory(prefix="arft-vllm-")  # the vLLM view of an embedded model
        self.decoding = resolve_decoding(cfg, folder_generation_config(model_dir))
        self.processor = load_processor(model_dir, min_pixels, max_pixels)  # the transcript's (same pixel budget)
        pixels = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}
        self.llm = build_llm(model_dir, Path(self._folder.name), rollout, dtype=dtype, seed=cfg.seed,
                             limit_mm_per_prompt={"image": 8}, mm_processor_kwargs=pixels or None)
        tok = self.processor.tokenizer
        self.pad_id = tok.convert_tokens_to_ids("<|image_pad|>")
        self.eos = {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}

    def _params(self, max_new_tokens: int):
        from vllm import SamplingParams

        d = self.decoding
        return SamplingParams(
            max_tokens=max_new_tokens, temperature=d["temperature"] if d["do_sample"] else 0.0,
            top_p=d["top_p"] if d["do_sample"] else 1.0, top_k=(d["top_k"] or -1) if d["do_sample"] else -1,
            repetition_penalty=d["repetition_penalty"], stop=list(self.stop_sequences) or None,
            include_stop_str_in_output=True, seed=self.cfg.seed)

    def generate(self, ids: Sequence[list[int]], images: Sequence[list], max_new_tokens: int,
                 deadline: Deadline | None = None) -> list[tuple[list[int], list[float] | None]]:
        from arft_core.agent.engine import collapse_image_pads

        prompts = [{"prompt_token_ids": collapse_image_pads(list(s), self.pad_id),
                    **({"multi_modal_data": {"image": list(imgs)}} if imgs else {})} for s, imgs in zip(ids, images)]
        results = self.llm.generate(prompts, self._params(max_new_tokens), use_tqdm=False)
        tok = self.processor.tokenizer
        out = []
        for r in results:
            row = list(r.outputs[0].token_ids)
            out.append((row[:turn_end(row, self.eos, tok, self.stop_sequences)], None))
        return out


class _DeadlineCriteria:
    """A transformers stopping criterion: every sequence is done once the deadline has expired (checked after
    each decode step), so that a request past its deadline frees the model within one step."""

    def __init__(self, deadline: Deadline):
        self.deadline = deadline

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.deadline.expired() is not None, dtype=torch.bool,
                          device=input_ids.device)


def make_engine(model_dir: Path, cfg: EvalConfig, rollout: RolloutConfig, dtype: str = "float32",
                progress: Callable[[int], None] = lambda _: None, *, stop_sequences: Sequence[str] = STOP_SEQUENCES,
                min_pixels: int | None = None, max_pixels: int | None = None):
    """vLLM or Hugging Face, as `rollout.engine` resolves for this model (`engine.use_vllm`), in the model's own
    dtype: a float32 model run in bf16 would not give the same greedy tokens. Decoding: `cfg`'s (resolve_decoding),
    each batch seeded from eval.seed. The pixel bounds (model.min_pixels / max_pixels) replace the checkpoint
    processor's; `stop_sequences=()`: no stop strings. The engine's `processor` is the one its transcript uses."""
    from arft_core.agent.engine import use_vllm

    if use_vllm(rollout, model_dir):
        return VLLMEngine(model_dir, cfg, rollout, dtype, stop_sequences, min_pixels=min_pixels,
                          max_pixels=max_pixels)
    from arft_core.model.embedded import load_model

    model, processor = load_model(model_dir, dtype, min_pixels, max_pixels)
    model.eval()
    decoding = resolve_decoding(cfg, model.generation_config)
    engine = HFEngine(model, processor, decoding_config(model, decoding), stop_sequences=stop_sequences,
                      batch_size=cfg.batch_size, seed=cfg.seed, progress=progress)
    engine.decoding = decoding
    return engine
