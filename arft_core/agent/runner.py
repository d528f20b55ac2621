"""The assembled agent that evaluation and the served model run: an engine, the transcript renderer of the
configured protocol and form, the agent settings and each benchmark's token cap; plus the one tool set-up.

    agent = Agent(engine, cfg.agent.for_training_mode(cfg.train.mode), cfg.eval.max_new_tokens, tool_threads=2)
    with open_tools(cfg.sandbox, code=True, search=backend, top_k=4) as tools:
        episodes = agent.run("mat-coding", items, tools, scratch)
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from arft_core.agent.env import AgentEnv, EnvItem, Tools
from arft_core.agent.rollout import Episode, run_episodes
from arft_core.agent.transcript import Transcript
from arft_core.config import AgentConfig, SandboxConfig
from arft_core.protocol import direct_prompt


@contextmanager
def open_tools(sandbox: SandboxConfig, *, code: bool, search: Any = None, top_k: int = 4,
               scratch: Path | None = None) -> Iterator[Tools]:
    """The agent's tools: a sandbox pool when `code` (started here, closed on exit; its folder under `scratch` when
    given) and the search backend `search` (made by the caller: each keeps its own cache)."""
    pool = None
    if code:
        from arft_core.sandbox import SandboxPool

        pool = SandboxPool(sandbox, scratch)
    try:
        yield Tools(sandbox=pool, search=search, top_k=top_k)
    finally:
        if pool is not None:
            pool.close()


class Agent:
    """An engine (agent.generation) run as the agent: `run` the tool loop, or `direct` the paper's direct-answer
    baseline. `cfg.transcript` must be resolved (AgentConfig.for_training_mode). The token cap of every call comes
    from `max_new_tokens[benchmark]`: an argument of each run, never state of the engine."""

    def __init__(self, engine, cfg: AgentConfig, max_new_tokens: dict[str, int], tool_threads: int = 4):
        self.engine, self.cfg, self.max_new_tokens, self.tool_threads = engine, cfg, max_new_tokens, tool_threads
        self.transcript = Transcript(engine.processor, cfg.protocol, cfg.transcript)

    def run(self, benchmark: str, items: Sequence[EnvItem], tools: Tools, scratch: Path, *,
            max_turns: int | None = None, **loop) -> list[Episode]:
        """Each item through the loop (its own folder under `scratch`); `loop`: run_episodes' progress, deadline,
        check_prompt and scripted."""
        cfg = self.cfg if max_turns is None else self.cfg.model_copy(update={"max_turns": max_turns})
        envs = [AgentEnv(item, tools, cfg, Path(scratch) / f"item-{k}") for k, item in enumerate(items)]
        return run_episodes(envs, self.engine, self.transcript, max_new_tokens=self.max_new_tokens[benchmark],
                            tool_threads=self.tool_threads, **loop)

    def direct(self, benchmark: str, items: Sequence[EnvItem]) -> list[dict]:
        """The paper's direct baseline: question + an 'answer directly' suffix, no tools, one call; the output is
        the prediction (stripped)."""
        kind = "multihop" if benchmark == "multihop" else "mat"
        inputs = [(direct_prompt(i.question, kind, i.image is not None), [i.image] if i.image else []) for i in items]
        try:
            outs = self.engine.generate([self.transcript.encode(m, imgs) for m, imgs in inputs],
                                        [[self.transcript.open_image(p) for p in imgs] for _, imgs in inputs],
                                        self.max_new_tokens[benchmark])
        except Exception as e:  # recorded per item, like the agent's failures
            return [{"id": i.id, "pred_answer": None, "end": "error", "n_turns": 0, "tool_calls": {},
                     "turns": [{"output": None, "error": f"{type(e).__name__}: {e}"}]} for i in items]
        texts = [self.transcript.text(ids) for ids, _ in outs]
        return [{"id": i.id, "pred_answer": text.strip(), "end": "answer", "n_turns": 1, "tool_calls": {},
                 "turns": [{"output": text, "action": "answer", "error": None, "reward": {}, "observation": None}]}
                for i, text in zip(items, texts, strict=True)]
