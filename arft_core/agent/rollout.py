"""The batched multi-turn driver: all live items generate together at each turn, then each steps its own
environment (tools in parallel threads). A failure in one item is recorded on that item and never stops the run."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from arft_core.agent.env import AgentEnv


@dataclass
class Prompt:
    """One model call: chat messages, their images in placeholder order, and who asks (for logs and tests)."""

    messages: list[dict]
    images: list[Path]
    item_id: Any = None
    turn: int = 0


class Generator(Protocol):
    """A model back-end: one completion per prompt, generated in batches."""

    def generate(self, prompts: Sequence[Prompt]) -> list[str]: ...


def run_episodes(envs: Sequence[AgentEnv], generator: Generator, tool_threads: int = 4,
                 progress: Callable[[int], None] = lambda _: None) -> list[dict]:
    """Run every environment to its end; returns each episode's `record()` in input order.

    `progress(n)` is called with the number of items that finished after each turn.
    """
    for env in envs:
        env.reset()
    live = list(envs)
    turn = 0
    with ThreadPoolExecutor(max_workers=tool_threads) as pool:
        while live:
            turn += 1
            prompts = []
            for env in live:
                messages, images = env.prompt()
                prompts.append(Prompt(messages, images, env.item.id, turn))
            gen_start = time.time_ns()
            try:
                outputs = generator.generate(prompts)
            except Exception as e:  # the back-end failed for the whole batch: record on each item, stop them
                for env in live:
                    env.fail(e)
                mark_generation(live, gen_start, time.time_ns())
                progress(len(live))
                break
            gen_end = time.time_ns()
            list(pool.map(_step, live, outputs))
            mark_generation(live, gen_start, gen_end)
            finished = [env for env in live if env.done]
            live = [env for env in live if not env.done]
            if finished:
                progress(len(finished))
    return [env.record() for env in envs]


def mark_generation(envs: Sequence[AgentEnv], start_ns: int, end_ns: int) -> None:
    """Record on each env's newest turn (`fail` turns too) the window of the batched generation that produced it:
    every item of a batch waited for the whole call, so they share it (traces time the model turns by it)."""
    for env in envs:
        if env.turns:
            env.turns[-1].update(gen_start_ns=start_ns, gen_end_ns=end_ns)


def _step(env: AgentEnv, output: str) -> None:
    try:
        env.step(output)
    except Exception as e:  # a tool or the sandbox broke on this item only
        env.fail(e)
