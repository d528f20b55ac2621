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


class DeadlineExceeded(RuntimeError):
    """Recorded on each item a run stopped unfinished (its message names the deadline or the shutdown)."""


class Deadline:
    """When a run must stop: at `at` (time.monotonic()), or once `cancelled()` returns a reason (a server shutting
    down). `what` names the limit in the error each unfinished item gets, e.g. "deadline of 45 s
    (serving.deadline_s)". Checked between turns and, by the Hugging Face back-end, between decode steps."""

    def __init__(self, at: float, what: str, cancelled: Callable[[], str | None] = lambda: None):
        self.at, self.what, self.cancelled = at, what, cancelled

    def expired(self) -> str | None:
        """None while the work may go on, else why it must stop."""
        return self.cancelled() or (f"{self.what} reached" if time.monotonic() >= self.at else None)


class Generator(Protocol):
    """A model back-end: one completion per prompt, generated in batches; with a `deadline`, it may stop early
    (what it returns then is discarded)."""

    def generate(self, prompts: Sequence[Prompt], deadline: Deadline | None = None) -> list[str]: ...


def run_episodes(envs: Sequence[AgentEnv], generator: Generator, tool_threads: int = 4,
                 progress: Callable[[int], None] = lambda _: None, deadline: Deadline | None = None,
                 check_prompt: Callable[[Prompt], None] | None = None) -> list[dict]:
    """Run every environment to its end; returns each episode's `record()` in input order.

    `progress(n)` is called with the number of items that finished after each turn. With a `deadline`, the items
    still running when it expires end with a DeadlineExceeded error (checked before each turn and after each
    generation; tool calls have their own timeouts). `check_prompt(prompt)` may raise to end that item with the
    error instead of generating (serving's prompt-token cap).
    """
    for env in envs:
        env.reset()
    live = list(envs)
    turn = 0
    with ThreadPoolExecutor(max_workers=tool_threads) as pool:
        while live:
            turn += 1
            if deadline is not None and (why := deadline.expired()):
                _stop(live, why, progress)
                break
            prompts, asked = [], []
            for env in live:
                messages, images = env.prompt()
                prompt = Prompt(messages, images, env.item.id, turn)
                try:
                    if check_prompt is not None:
                        check_prompt(prompt)
                except Exception as e:  # this item only
                    env.fail(e)
                    progress(1)
                    continue
                prompts.append(prompt)
                asked.append(env)
            live = asked
            if not live:
                break
            gen_start = time.time_ns()
            try:
                # Only a deadline is passed on: back-ends (and test doubles) without one keep their signature.
                outputs = generator.generate(prompts, deadline=deadline) if deadline else generator.generate(prompts)
            except Exception as e:  # the back-end failed for the whole batch: record on each item, stop them
                for env in live:
                    env.fail(e)
                mark_generation(live, gen_start, time.time_ns())
                progress(len(live))
                break
            gen_end = time.time_ns()
            if deadline is not None and (why := deadline.expired()):  # the outputs may be cut short: not run
                _stop(live, why, progress)
                mark_generation(live, gen_start, gen_end)  # on the error turn, as for a failed back-end
                break
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


def _stop(live: Sequence[AgentEnv], why: str, progress: Callable[[int], None]) -> None:
    for env in live:
        env.fail(DeadlineExceeded(why))
    progress(len(live))


def _step(env: AgentEnv, output: str) -> None:
    try:
        env.step(output)
    except Exception as e:  # a tool or the sandbox broke on this item only
        env.fail(e)
