"""Online agentic GRPO: TRL's GRPOTrainer whose rollout is our multi-turn agent loop.

A thin subclass: only the rollout (`_generate`) is ours; the GRPO loss, KL, logging and the multimodal forward pass
are TRL's. Each rollout runs an `AgentEnv` (sandbox for `<code>`, search cache for `<search>`). The policy's token
ids are kept as generated (token-in/token-out); each observation is appended as chat-template tokens (a user turn,
with the new image) with loss mask 0, and the per-sample image lists (item image + tool images, in token order) go
back to TRL, whose tool-image branch builds pixel values and 3-D rotary positions over prompt + completion.

Relies on private GRPOTrainer internals of trl 1.16 (`_generate`'s 8-tuple, `self.tools` as the switch to the
tool-image forward branch): trl is pinned.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from trl import GRPOTrainer
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import pad

from arft_core.agent.env import AgentEnv, EnvItem
from arft_core.agent.rollout import mark_generation

SAMPLES = 8  # trajectories of a sampled rollout rendered (sample_sink) and traced


def _rollout_marker() -> None:
    """Marker tool: makes GRPOTrainer treat rollout images as tool images (never called)."""


class AgenticGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with multi-turn rollouts through `env_factory(row, workdir) -> AgentEnv`.

    `max_completion_length` is the per-trajectory token budget (model and observation tokens); each model turn
    gets at most `turn_max_new_tokens`. `forced_first_turn` (tests, demos) replaces the first model turn of row i
    by `forced_first_turn(i)` when that returns a string.
    """

    def __init__(self, *args, env_factory: Callable[[dict, Path], AgentEnv], max_turns: int,
                 turn_max_new_tokens: int, forced_first_turn: Callable[[int], str | None] | None = None,
                 sample_every: int = 0, sample_sink: Callable[[str, str], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.env_factory, self.max_turns, self.turn_max_new_tokens = env_factory, max_turns, turn_max_new_tokens
        self.forced_first_turn = forced_first_turn
        # Every `sample_every` steps, `sample_sink(file name, html)` gets the rollout's trajectories (MLflow).
        self.sample_every, self.sample_sink = sample_every, sample_sink
        self._scratch: tempfile.TemporaryDirectory | None = None
        # Truthy `tools` + non-empty tool images select TRL's forward branch that processes every image of each
        # sample; never passed at __init__ (that would ask the chat template for JSON tool calling).
        self.tools = [_rollout_marker]
        self.image_pad_id = self._tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.last_rollout: dict = {}  # per-turn image counts and endings of the latest rollout (logs, tests)

    def _generate_and_score_completions(self, inputs):
        self._rows = inputs  # `_generate` is not given the dataset rows; the environments need them
        return super()._generate_and_score_completions(inputs)

    def _generate(self, prompts: list):
        mode = "train" if self.model.training else "eval"
        budget = self.max_completion_length
        n = len(prompts)  # already repeated num_generations times by TRL's sampler
        prompt_ids, images = [], []
        for prompt in prompts:
            images.append([p["image"] for m in prompt if isinstance(m["content"], list) for p in m["content"]
                           if p.get("type") == "image"])
            enc = self.processing_class.apply_chat_template([prompt], add_generation_prompt=True, tokenize=True,
                                                            return_dict=True, **self.chat_template_kwargs)
            prompt_ids.append(list(enc["input_ids"][0]))
        if self._scratch is not None:  # the previous rollout's images are no longer needed
            self._scratch.cleanup()
        self._scratch = tempfile.TemporaryDirectory(prefix="arft-rollout-")
        scratch = Path(self._scratch.name)
        envs = [self.env_factory(row, scratch / f"rollout-{i}") for i, row in enumerate(self._rows)]
        for env in envs:
            env.reset()
        n_prompt_images = len(images[0])
        comp, mask, logps = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)]
        turn_images: list[list[int]] = []
        live = list(range(n))
        for turn in range(self.max_turns):
            if not self._on_any_rank(bool(live)):
                break
            if live:
                turn_images.append([len(images[i]) for i in live])
            outs = {}
            for i in live:
                forced = self.forced_first_turn(i) if self.forced_first_turn and turn == 0 else None
                if forced is not None:
                    ids = self._tokenizer(forced, add_special_tokens=False)["input_ids"]
                    ids = (ids + [self._tokenizer.eos_token_id])[:budget - len(comp[i])]
                    # Not sampled from the policy: no sampling log-prob (NaN: TRL's vLLM importance ratio is 1 there).
                    outs[i] = ids, [float("nan")] * len(ids)
            todo = [i for i in live if i not in outs and budget - len(comp[i]) > 0]
            window = None  # this rank's generation (epoch ns), for the traces
            if self._on_any_rank(bool(todo)):  # decided together: generation may be collective (ZeRO-3)
                if todo:
                    room = {i: budget - len(comp[i]) for i in todo}
                    start = time.time_ns()
                    new = self._generate_turn([prompt_ids[i] + comp[i] for i in todo], [images[i] for i in todo],
                                              max(room.values()))
                    window = start, time.time_ns()
                    outs.update({i: (ids[:room[i]], lp[:room[i]]) for i, (ids, lp) in zip(todo, new, strict=True)})
                else:  # another rank generates: take part with a filler generation of this rank's first prompt
                    # (with its image, so that the vision tower runs here too), whose output is dropped
                    self._generate_turn([prompt_ids[0]], [images[0][:n_prompt_images]], 1)
            still = []
            for i in (i for i in live if i in outs):
                ids, lp = outs[i]
                comp[i] += ids
                mask[i] += [1] * len(ids)
                logps[i] += lp
                if not ids or ids[-1] not in self.eos_token_ids:  # cut by the turn cap or the budget: it ends
                    envs[i].fail(RuntimeError("turn cut at the token limit"))
                    continue
                result = envs[i].step(self._tokenizer.decode(ids, skip_special_tokens=True))
                if result.done or turn + 1 >= self.max_turns:
                    continue
                obs = result.observation
                image = _open(obs.image) if obs and obs.image else None
                suffix = self._observation_ids(obs.text if obs else "", image)
                if len(comp[i]) + len(suffix) >= budget:  # never cut an observation (image tokens) in half
                    envs[i].fail(RuntimeError("trajectory token budget spent"))
                    continue
                comp[i] += suffix
                mask[i] += [0] * len(suffix)
                logps[i] += [0.0] * len(suffix)
                if image is not None:
                    images[i].append(image)
                still.append(i)
            if window is not None:  # every generated item stepped or failed: its newest turn is this one
                mark_generation([envs[i] for i in todo], *window)
            live = still
        records = [env.record() for env in envs]
        calls = [r["tool_calls"] for r in records]
        n_calls = sum(c["search"] + c["code"] for c in calls)
        self._metrics[mode]["tools/call_rate"].append(n_calls / n)
        self._metrics[mode]["tools/error_rate"].append(sum(c["code_failed"] for c in calls) / max(n_calls, 1))
        self._metrics[mode]["agent/mean_turns"].append(sum(r["n_turns"] for r in records) / n)
        self._metrics[mode]["completions/mean_length"].append(sum(map(sum, mask)) / n)
        self.last_rollout = {"turn_images": turn_images, "end": [r["end"] for r in records]}
        step = self.state.global_step + 1
        if self.sample_sink and self.sample_every and mode == "train" and (step - 1) % self.sample_every == 0:
            self.sample_sink(f"rollouts/step_{step:06d}.html",
                             render_trajectories(step, self._rows, records, limit=SAMPLES))
            _trace_samples([env.item for env in envs], records, step)
        # What reward functions see as the completion: the model's own tokens, observations left out.
        model_text = [self._tokenizer.decode([t for t, m in zip(c, k, strict=True) if m], skip_special_tokens=True)
                      for c, k in zip(comp, mask, strict=True)]
        completions = [[{"role": "assistant", "content": text}] for text in model_text]
        extra = {"records": records}
        # The 8-tuple of GRPOTrainer._generate; every sample's full image list doubles as its "tool images".
        return prompt_ids, comp, mask, completions, logps, extra, images, images

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

    def _observation_ids(self, text: str, image) -> list[int]:
        """Tokens that close the model's turn, show the observation as a user turn (with the new image) and open
        the next assistant turn; the processor expands `<|image_pad|>` exactly as for the forward pass."""
        s = ("\n<|im_start|>user\n" + ("<|vision_start|><|image_pad|><|vision_end|>" if image is not None else "")
             + text + "<|im_end|>\n<|im_start|>assistant\n")
        return list(self.processing_class(text=[s], images=[image] if image is not None else None)["input_ids"][0])

    def _generate_turn(self, seqs: list[list[int]], imgs: list[list], max_new: int):
        """One model turn for `seqs` (token ids so far, with their images): [(new ids, their log-probs)] each."""
        cap = min(self.turn_max_new_tokens, max_new)
        if not self.use_vllm:
            return self._hf_turn(seqs, imgs, cap)
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
        return [_cut_at_eos(list(i), [lp[0] for lp in lps], self.eos_token_ids) for i, lps in zip(ids, logps)]

    @torch.no_grad()
    def _hf_turn(self, seqs: list[list[int]], imgs: list[list], cap: int):
        device = self.accelerator.device
        ids = [torch.tensor(s) for s in seqs]
        input_ids = pad(ids, padding_value=self._tokenizer.pad_token_id, padding_side="left").to(device)
        attention = pad([torch.ones_like(t) for t in ids], padding_value=0, padding_side="left").to(device)
        inputs = {"input_ids": input_ids, "attention_mask": attention}
        flat = [im for lst in imgs for im in lst]
        if flat:
            inputs.update({k: v.to(device) for k, v in
                           self.processing_class.image_processor(images=flat, return_tensors="pt").items()})
            inputs["mm_token_type_ids"] = (input_ids == self.image_pad_id).long()  # 3-D rotary positions
        cfg = copy.deepcopy(self.generation_config)
        cfg.max_new_tokens = cap
        cfg.return_dict_in_generate = cfg.output_scores = True
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                         gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                                         generation_kwargs=self.generation_kwargs,
                                         gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs) as m, \
                self._dist.summon_full_params(self.model_wrapped, recurse=False):
            out = m.generate(**inputs, generation_config=cfg)  # synced across ranks under ZeRO-3 (transformers)
        new = out.sequences[:, input_ids.size(1):]
        logp = torch.stack(out.scores, 1).float().log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        return [_cut_at_eos(new[b].tolist(), logp[b].tolist(), self.eos_token_ids) for b in range(new.size(0))]


def _cut_at_eos(ids: list[int], logps: list[float], eos: set[int] | list[int]) -> tuple[list[int], list[float]]:
    """The turn's tokens up to and including the first end-of-turn token (a batch runs on past it), with their
    log-probs."""
    cut = next((j + 1 for j, t in enumerate(ids) if t in eos), len(ids))
    return ids[:cut], logps[:cut]


def _trace_samples(items: list[EnvItem], records: list[dict], step: int) -> None:
    """The sampled trajectories as MLflow traces of the active run (none without one), while the rollout's tool
    images still exist."""
    import mlflow

    from arft_core.traces import log_training_traces

    if (run := mlflow.active_run()) is not None:
        log_training_traces(items, records, step, limit=SAMPLES, run_id=run.info.run_id)


def render_trajectories(step: int, rows: list[dict], records: list[dict], limit: int = SAMPLES) -> str:
    """A self-contained HTML page of a rollout's first trajectories: each turn, its tool result and images."""
    import html

    from arft_core.evaluation import inline_image

    parts = [f"<h1>GRPO step {step}: sample rollouts</h1>"]
    for row, rec in list(zip(rows, records, strict=True))[:limit]:
        turns = []
        for k, t in enumerate(rec["turns"], start=1):
            obs = t.get("observation") or {}
            turns.append(f"<h4>turn {k} · {html.escape(str(t.get('action')))} · reward {t.get('reward')}</h4>"
                         f"<pre>{html.escape(t.get('output') or '')}</pre>"
                         + (f"<pre>{html.escape(t['error'])}</pre>" if t.get("error") else "")
                         + (f"<pre>{html.escape(obs.get('text') or '')}</pre>" if obs.get("text") else "")
                         + inline_image(obs.get("image"), 256))
        parts.append(f"<details open><summary>item {html.escape(str(row.get('item_id')))} · "
                     f"{html.escape(str(row.get('question')))} · gold {html.escape(str(row.get('answers')))} · "
                     f"end {rec['end']}</summary>{inline_image(Path(row['image_path']), 256)}"
                     f"{''.join(turns)}</details>")
    return "<!doctype html><meta charset='utf-8'><body style='font-family:sans-serif'>" + "".join(parts)


def _open(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


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
