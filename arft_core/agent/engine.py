"""The rollout engine (`rollout.engine`): Hugging Face `generate` or vLLM, for evaluation and GRPO training alike.

vLLM runs in its own environment (`make vllm-env`: its CPU build needs another transformers and a torchvision the
main install keeps out), so everything here imports it lazily. Three things TRL 1.16's colocated vLLM gets wrong
are fixed in `TrainerVLLM`, the engine our GRPO trainers use:
- image prompts: TRL sends token ids whose `<|image_pad|>` runs are already expanded and vLLM expands each pad
  again (127 pads for 64); each run is collapsed to one pad first (TRL issue #6294);
- dtype: TRL passes none, so a float32 policy ran in bf16; the engine runs the policy's dtype;
- weight sync: per-tensor `load_weights` fails on the CPU backend (its linear weights are repacked); the weights
  go through vLLM's `reload_weights`, the tied lm_head is repacked on CPU, and the encoder cache is dropped (it
  would serve image embeddings of the old vision weights; TRL never drops it).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from functools import cache, partial
from pathlib import Path
from typing import Iterable

from arft_core.config import RolloutConfig

IMAGE_PAD = "<|image_pad|>"


@cache
def vllm_installed() -> bool:
    from importlib.util import find_spec

    return find_spec("vllm") is not None


def _on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def vllm_obstacle(model_dir: Path) -> str | None:
    """Why vLLM cannot run the model in `model_dir` here (None: it can)."""
    if not vllm_installed():
        return "vLLM is not installed in this environment (CPU: `make vllm-env`; GPU: `pip install vllm`)"
    if _on_cpu():
        from transformers import AutoConfig
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        from arft_core.model.embedded import resolve_model_dir

        text = AutoConfig.from_pretrained(resolve_model_dir(model_dir)).get_text_config()
        head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if head not in sizes:
            return f"vLLM's CPU attention supports head sizes {sizes}; the model's is {head}"
    return None


def use_vllm(cfg: RolloutConfig, model_dir: Path) -> bool:
    """Whether the policy in `model_dir` generates through vLLM: `engine: vllm` (an error says why it cannot),
    or `auto` where nothing stands in the way."""
    if cfg.engine == "hf":
        return False
    obstacle = vllm_obstacle(model_dir)
    if cfg.engine == "vllm" and obstacle:
        raise RuntimeError(f"rollout.engine is vllm, but {obstacle}")
    return obstacle is None


def configure_environment(cfg: RolloutConfig) -> None:
    """vLLM's environment settings, unless the environment has its own: the CPU KV cache size, and on CPU the
    engine in this process (faster there, and the weight sync reaches the model runner directly)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kvcache_gb))
    if _on_cpu():
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def build_llm(model_dir: Path, view_dir: Path, cfg: RolloutConfig, *, dtype: str, seed: int, **kwargs):
    """A vLLM engine on `model_dir` in the policy's `dtype`; `view_dir` receives the folder vLLM is shown (an
    embedded model's linked view with stock processor files). On CPU the engine runs eagerly: compiling takes
    ~25 s at start for no gain on tiny models."""
    from vllm import LLM

    from arft_core.model.embedded import resolve_model_dir
    from arft_core.model.processor import vllm_model_folder

    configure_environment(cfg)
    folder = vllm_model_folder(resolve_model_dir(model_dir), view_dir)
    return LLM(model=str(folder), dtype=dtype, seed=seed, enforce_eager=_on_cpu(), **kwargs)


def collapse_image_pads(ids: list[int], pad_id: int) -> list[int]:
    """Each run of image pads as one pad: the form vLLM expands itself (it would expand an expanded run again)."""
    return [t for k, t in enumerate(ids) if t != pad_id or k == 0 or ids[k - 1] != pad_id]


def load_weights(llm, named_params: Iterable) -> None:
    """Put the trained weights (HF names) into a colocated engine, in place, and forget what the old ones
    computed (prefix and encoder caches)."""
    runner = llm.llm_engine.model_executor.driver_worker.model_runner
    runner.reload_weights(weights_iterator=iter(named_params))
    if _on_cpu():
        # The tied lm_head shares the embedding's weight but keeps its own packed copy for the CPU GEMM.
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        model = runner.get_model()
        head = getattr(getattr(model, "language_model", model), "lm_head", None)
        if head is not None and getattr(head, "weight", None) is not None and head.weight.numel():
            dispatch_cpu_unquantized_gemm(head, remove_weight=False)
    llm.llm_engine.reset_encoder_cache()
    llm.reset_prefix_cache()


@cache
def trainer_vllm_class():
    """`TrainerVLLM`: TRL's vLLM generation with the three fixes of this module (defined on first use: TRL's
    vLLM module imports vLLM)."""
    from trl.generation.vllm_generation import VLLMGeneration
    from trl.trainer.utils import ensure_master_addr_port

    class TrainerVLLM(VLLMGeneration):
        def __init__(self, *args, rollout: RolloutConfig, seed: int, **kwargs):
            import tempfile

            self.rollout, self.seed = rollout, seed
            self._view = tempfile.TemporaryDirectory(prefix="arft-vllm-")
            super().__init__(*args, **kwargs)
            self.pad_id = self.processing_class.tokenizer.convert_tokens_to_ids(IMAGE_PAD)

        def _init_vllm(self):
            if self.mode != "colocate":
                return super()._init_vllm()
            if self.tensor_parallel_size != 1:
                raise ValueError("rollout: a colocated engine runs one per training process (tensor parallel 1); "
                                 "use vllm_mode server for a larger policy")
            acc = self.accelerator
            # vLLM's external launcher joins the training processes' own ranks.
            os.environ.update(RANK=str(acc.process_index), LOCAL_RANK=str(acc.local_process_index),
                              WORLD_SIZE=str(acc.num_processes))
            ensure_master_addr_port()
            self.llm = build_llm(
                Path(self.model.name_or_path), Path(self._view.name), self.rollout,
                dtype=str(self.model.dtype).removeprefix("torch."), seed=self.seed + acc.process_index,
                gpu_memory_utilization=self.rollout.gpu_memory_utilization, max_model_len=self.max_model_length,
                max_num_seqs=self.max_num_seqs, enable_sleep_mode=self.enable_sleep_mode,
                distributed_executor_backend="external_launcher", max_num_batched_tokens=4096,
                logprobs_mode="processed_logprobs", limit_mm_per_prompt={"image": 8})
            if self.enable_sleep_mode:
                self.llm.sleep(level=2)
            self._llm_weights_sleeping = self.enable_sleep_mode
            acc.wait_for_everyone()

        def sync_weights(self):
            if self.mode != "colocate":
                return super().sync_weights()
            if self.enable_sleep_mode:
                self.llm.wake_up(tags=["weights"])
                self._llm_weights_sleeping = False
            load_weights(self.llm, self._iter_named_params())

        def generate(self, prompts, images, num_generations, profiler=None):
            if self.mode == "colocate" and images is not None:
                prompts = [collapse_image_pads(list(p), self.pad_id) for p in prompts]
            return super().generate(prompts, images, num_generations, profiler)

    return TrainerVLLM


@contextmanager
def trl_engine(cfg: RolloutConfig, seed: int):
    """While GRPOTrainer is built: its vLLM generation is `TrainerVLLM` (TRL builds the engine in `__init__`, from
    a name it imports; no argument chooses the class)."""
    from unittest import mock

    import trl.trainer.grpo_trainer as grpo

    with mock.patch.object(grpo, "VLLMGeneration", partial(trainer_vllm_class(), rollout=cfg, seed=seed)):
        yield
