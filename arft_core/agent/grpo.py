"""Online agentic GRPO: TRL's GRPOTrainer whose rollout is our multi-turn agent loop.

A thin subclass: only the rollout (`_generate`) is ours, and it is the agent loop that evaluation and serving run
(`rollout.run_episodes` with the chat `Transcript`); the GRPO loss, KL, logging and the multimodal forward pass are
TRL's. The loop keeps the policy's token ids as generated and appends each observation as chat-template tokens (a
user turn, with the new image); they go back to TRL with loss mask 0, and the per-sample image lists (item image +
tool images, in token order) go to TRL's tool-image branch, which builds pixel values and 3-D rotary positions over
prompt + completion. What training adds around the loop is here: the engine adapter (`_TrainerEngine`: HF `generate`
on the unwrapped policy, or TRL's vLLM engine `agent.engine.TrainerVLLM` with the weights synced when the step
changes; ZeRO-3 ranks in lockstep), the trajectory token budget, and the rollout metrics.

Relies on private GRPOTrainer internals of trl 1.16 (`_generate`'s 8-tuple, `self.tools` as the switch to the
tool-image forward branch): trl is pinned.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Sequence

import torch
from trl import GRPOTrainer
from trl.models import unwrap_model_for_generation

from arft_core.agent.env import AgentEnv, EnvItem
from arft_core.agent.generation import HFEngine, turn_end
from arft_core.agent.rollout import first_turn, run_episodes
from arft_core.agent.transcript import Transcript
from arft_core.reports import render_trajectories

SAMPLES = 8  # trajectories of a sampled rollout rendered (sample_sink) and traced


def _rollout_marker() -> None:
    """Marker tool: makes GRPOTrainer treat rollout images as tool images (never called)."""


class AgenticGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose rollout is the agent loop (`rollout.run_episodes`) on `env_factory(row, workdir) -> AgentEnv`.

    `transcript` renders each turn's input (the chat form: one growing token sequence per trajectory).
    `max_completion_length` is the per-trajectory token budget (model and observation tokens); each model turn
    gets at most `turn_max_new_tokens` and stops after a closing action tag (`stop_sequences`, as in evaluation).
    `forced_first_turn` (tests, demos) replaces the first model turn of row i by `forced_first_turn(i)` when that
    returns a string.
    """

    def __init__(self, *args, env_factory: Callable[[dict, Path], AgentEnv], transcript: Transcript,
                 turn_max_new_tokens: int, stop_sequences: Sequence[str] = (),
                 forced_first_turn: Callable[[int], str | None] | None = None, tool_threads: int = 4,
                 sample_every: int = 0, sample_sink: Callable[[str, str], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if transcript.form != "chat":
            raise ValueError("agentic GRPO trains on one token sequence per trajectory: the chat transcript only")
        self.env_factory, self.transcript, self.turn_max_new_tokens = env_factory, transcript, turn_max_new_tokens
        self.forced_first_turn, self.tool_threads = forced_first_turn, tool_threads
        # Every `sample_every` steps, `sample_sink(file name, html)` gets the rollout's trajectories (MLflow).
        self.sample_every, self.sample_sink = sample_every, sample_sink
        self._scratch: tempfile.TemporaryDirectory | None = None
        # Truthy `tools` + non-empty tool images select TRL's forward branch that processes every image of each
        # sample; never passed at __init__ (that would ask the chat template for JSON tool calling).
        self.tools = [_rollout_marker]
        self.image_pad_id = self._tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.stop_sequences = tuple(stop_sequences)
        # TRL's sampling settings (no generation_config of its own when it generates with vLLM).
        self._hf = HFEngine(self.model, self.processing_class, getattr(self, "generation_config", None),
                            stop_sequences=stop_sequences,
                            batch_size=10**9, logprobs=True)
        self._hf.eos |= set(self.eos_token_ids)
        self.last_rollout: dict = {}  # per-turn image counts and endings of the latest rollout (logs, tests)

    def _generate_and_score_completions(self, inputs):
        self._rows = inputs  # `_generate` is not given the dataset rows; the environments need them
        return super()._generate_and_score_completions(inputs)

    def _generate(self, prompts: list):
        mode = "train" if self.model.training else "eval"
        n = len(prompts)  # already repeated num_generations times by TRL's sampler; the envs read the rows
        if self._scratch is not None:  # the previous rollout's images are no longer needed
            self._scratch.cleanup()
        self._scratch = tempfile.TemporaryDirectory(prefix="arft-rollout-")
        scratch = Path(self._scratch.name)
        envs = [self.env_factory(row, scratch / f"rollout-{i}") for i, row in enumerate(self._rows)]
        index = {id(env): i for i, env in enumerate(envs)}
        scripted = first_turn(lambda env: self.forced_first_turn(index[id(env)])) if self.forced_first_turn else None
        turn_images: list[list[int]] = []
        envs[0].reset()  # (the loop resets it again) its first input is this rank's filler generation
        first = self.transcript.first(envs[0])
        filler = [first.ids], [[self.transcript.open_image(p) for p in first.images]]
        engine = _TrainerEngine(self, turn_images, filler)
        episodes = run_episodes(envs, engine, self.transcript, max_new_tokens=self.turn_max_new_tokens,
                                budget=self.max_completion_length, tool_threads=self.tool_threads,
                                scripted=scripted, any_rank=self._on_any_rank)
        records = [e.record for e in episodes]
        calls = [r["tool_calls"] for r in records]
        n_calls = sum(c["search"] + c["code"] for c in calls)
        self._metrics[mode]["tools/call_rate"].append(n_calls / n)
        self._metrics[mode]["tools/error_rate"].append(sum(c["code_failed"] for c in calls) / max(n_calls, 1))
        self._metrics[mode]["agent/mean_turns"].append(sum(r["n_turns"] for r in records) / n)
        self._metrics[mode]["completions/mean_length"].append(sum(sum(e.mask) for e in episodes) / n)
        self.last_rollout = {"turn_images": turn_images, "end": [r["end"] for r in records]}
        step = self.state.global_step + 1
        if self.sample_sink and self.sample_every and mode == "train" and (step - 1) % self.sample_every == 0:
            self.sample_sink(f"rollouts/step_{step:06d}.html",
                             render_trajectories(step, [env.item for env in envs], records, limit=SAMPLES))
            _trace_samples([env.item for env in envs], records, step)
        # What reward functions see as the completion: the model's own tokens, observations left out.
        model_text = [self._tokenizer.decode([t for t, m in zip(e.completion, e.mask, strict=True) if m],
                                             skip_special_tokens=True) for e in episodes]
        completions = [[{"role": "assistant", "content": text}] for text in model_text]
        images = [[self.transcript.open_image(p) for p in e.images] for e in episodes]
        extra = {"records": records}
        # The 8-tuple of GRPOTrainer._generate; every sample's full image list doubles as its "tool images".
        return ([e.prompt for e in episodes], [e.completion for e in episodes], [e.mask for e in episodes],
                completions, [e.logps for e in episodes], extra, images, images)

    def _on_any_rank(self, flag: bool) -> bool:
        """Whether `flag` holds on some rank, where ranks must generate in lockstep: under ZeRO-3 every generation
        is collective (the sharded weights are gathered, and each forward pass is kept in step across ranks), so
        while any rank generates, every rank must, or the ranks deadlock. Elsewhere generation is local: `flag`."""
        collective = self._dist.is_zero3 or (self.use_vllm and self.vllm_mode == "server")  # server: gathered
        if not collective or self.accelerator.num_processes == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([int(flag)], device=self.accelerator.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _generate_turn(self, seqs: list[list[int]], imgs: list[list], cap: int):
        """One model turn for `seqs` (token ids so far, with their images): [(new ids, their log-probs)] each."""
        if not self.use_vllm:
            with unwrap_model_for_generation(
                    self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                    generation_kwargs=self.generation_kwargs,
                    gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs) as m, \
                    self._dist.summon_full_params(self.model_wrapped, recurse=False):
                return self._hf.generate(seqs, imgs, cap, model=m)  # synced across ranks under ZeRO-3
        if self.state.global_step != self._last_loaded_step:  # the engine follows the policy after each update
            self.vllm_generation.sync_weights()
            self._last_loaded_step = self.state.global_step
        engine = self.vllm_generation
        engine.max_completion_length, full = cap, engine.max_completion_length  # the cap of this turn
        try:
            images = [lst or None for lst in imgs]
            _, ids, logps, _ = engine.generate(seqs, images if any(images) else None, num_generations=1)
        finally:
            engine.max_completion_length = full
        out = []
        for i, lps in zip(ids, logps):
            i = list(i)
            k = turn_end(i, self._hf.eos, self._tokenizer, self.stop_sequences)
            out.append((i[:k], [lp[0] for lp in lps][:k]))
        return out


class _TrainerEngine:
    """The loop's engine during a rollout: the trainer's policy (HF on the unwrapped model, or TRL's vLLM engine with
    the weights synced), and under ZeRO-3 a filler generation when this rank has nothing to generate but another
    rank does: this rank's first prompt with its image (so that the vision tower runs here too), output dropped."""

    def __init__(self, trainer: AgenticGRPOTrainer, turn_images: list[list[int]], filler: tuple[list, list]):
        self.trainer, self.turn_images, self.filler = trainer, turn_images, filler

    def generate(self, ids, images, max_new_tokens, deadline=None):
        if not ids:
            self.trainer._generate_turn(*self.filler, 1)
            return []
        self.turn_images.append([len(x) for x in images])
        return self.trainer._generate_turn(list(ids), list(images), max_new_tokens)


def _trace_samples(items: list[EnvItem], records: list[dict], step: int) -> None:
    """The sampled trajectories as MLflow traces of the active run (none without one), while the rollout's tool
    images still exist."""
    import mlflow

    from arft_core.traces import log_training_traces

    if (run := mlflow.active_run()) is not None:
        log_training_traces(items, records, step, limit=SAMPLES, run_id=run.info.run_id)


# ---- trajectory rewards (TRL form; `records` comes from the rollout)
def trajectory_format_reward(completions, records, **_) -> list[float]:
    """Mean format reward over the model's turns (0 for a trajectory without any)."""
    out = []
    for r in records:
        parts = [t["reward"].get("format", 0.0) for t in r["turns"] if t["output"] is not None]
        out.append(sum(parts) / len(parts) if parts else 0.0)
    return out


def trajectory_answer_reward(completions, records, **_) -> list[float]:
    """The final answer's F1 (the evaluation metric; 0 when the trajectory never answered)."""
    out = []
    for r in records:
        final = [t["reward"].get("answer_f1") for t in r["turns"] if "answer_f1" in t.get("reward", {})]
        out.append(final[-1] if final else 0.0)
    return out


TRAJECTORY_REWARDS = [trajectory_format_reward, trajectory_answer_reward]
