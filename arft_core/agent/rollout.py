"""The one agent loop: every caller that runs the agent — evaluation, the served model, agentic GRPO rollouts and
the teacher replay that makes step-mode training rows — runs `run_episodes`.

    engine ──ids──▶ loop ──text──▶ AgentEnv.step (tools) ──turn record──▶ Transcript.next ──ids──▶ engine …

All live items generate together at each turn (one engine call), then each steps its own environment (tools in
parallel threads). The loop works on token ids: each turn's input comes from the transcript renderer, the
model's tokens are kept as generated, and every episode returns its token trajectory with its record. A failure
in one item is recorded on that item and never stops the run.

What callers add around it: evaluation and serving a deadline and a prompt check (serving's caps); training a
token budget per trajectory, scripted turns, and `any_rank` (ZeRO-3 ranks generate in lockstep).
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

from arft_core.agent.env import AgentEnv
from arft_core.agent.transcript import Context, Transcript


class DeadlineExceeded(RuntimeError):
    """Recorded on each item a run stopped unfinished (its message names the deadline or the shutdown)."""


class Deadline:
    """When a run must stop: at `at` (time.monotonic()), or once `cancelled()` returns a reason (a server shutting
    down). `what` names the limit in the error each unfinished item gets, e.g. "deadline of 45 s
    (serving.deadline_s)". Checked between turns and, by the Hugging Face engine, between decode steps."""

    def __init__(self, at: float, what: str, cancelled: Callable[[], str | None] = lambda: None):
        self.at, self.what, self.cancelled = at, what, cancelled

    def expired(self) -> str | None:
        """None while the work may go on, else why it must stop."""
        return self.cancelled() or (f"{self.what} reached" if time.monotonic() >= self.at else None)


Generation = tuple[list[int], list[float] | None]  # a turn's new token ids and their sampling log-probs (or None)


class Engine(Protocol):
    """A model back-end (agent.generation: Hugging Face or vLLM; the GRPO trainer's adapter): one turn for each
    input — token ids with their images (decoded) — at most `max_new_tokens` new tokens, each cut after the end of
    its turn (end of sequence or a stop string). With a `deadline` it may stop early (what it returns then is
    discarded). An engine that must take part in collective generation (ZeRO-3) is also called with no inputs."""

    def generate(self, ids: Sequence[list[int]], images: Sequence[list], max_new_tokens: int,
                 deadline: Deadline | None = None) -> list[Generation]: ...


@dataclass
class Episode:
    """One item's run: its record (`AgentEnv.record()`) and its tokens. `prompt` is turn 1's input; in the chat form
    `completion` holds everything after it — the model's tokens (mask 1, with their log-probs) and the observations
    (mask 0) — and `images` every image of prompt + completion in placeholder order. `inputs` is each model call's
    input ids, turn by turn (in the single-message form they are not one growing sequence)."""

    record: dict
    prompt: list[int]
    completion: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    inputs: list[list[int]] = field(default_factory=list)


def run_episodes(envs: Sequence[AgentEnv], engine: Engine | None, transcript: Transcript, *, max_new_tokens: int,
                 budget: int | None = None, tool_threads: int = 4, progress: Callable[[int], None] = lambda _: None,
                 deadline: Deadline | None = None, check_prompt: Callable[[Context, int], None] | None = None,
                 scripted: Callable[[AgentEnv, int], str | None] | None = None,
                 any_rank: Callable[[bool], bool] = lambda flag: flag) -> list[Episode]:
    """Run every environment to its end; returns each one's Episode, in input order.

    - `max_new_tokens`: the cap of each model turn (evaluation: the benchmark's eval.max_new_tokens).
    - `budget`: the most tokens after the first prompt (model turns and observations; training's
      max_completion_length); an observation that would not fit ends the item ("trajectory token budget spent").
    - `progress(n)`: n items finished.
    - `deadline`: items still running when it expires end with DeadlineExceeded (checked before each turn and after
      each generation; tool calls have their own timeouts).
    - `check_prompt(context, turn)` may raise to end that item with the error instead of generating (serving's
      prompt-token cap).
    - `scripted(env, turn)`: text that replaces the model's turn when not None (a demo's first turn, the teacher's
      trajectory); its tokens get NaN log-probs (not sampled from the policy).
    - `any_rank(flag)`: whether `flag` holds on some rank of a distributed run: the engine is called while any rank
      generates (with no inputs on the others) and the loop runs while any rank has items.
    """
    for env in envs:
        env.reset()
    contexts = [transcript.first(env) for env in envs]
    episodes = [Episode(env.record(), list(c.ids), images=list(c.images)) for env, c in zip(envs, contexts)]
    live = list(range(len(envs)))
    turn = 0
    with ThreadPoolExecutor(max_workers=tool_threads) as pool:
        while any_rank(bool(live)):
            turn += 1
            if deadline is not None and (why := deadline.expired()):
                _stop([envs[i] for i in live], why, progress)
                live = []
                continue
            outs: dict[int, Generation] = {}
            room: dict[int, int] = {}  # new tokens each asked item may take this turn
            for i in live:
                env, ctx = envs[i], contexts[i]
                try:
                    if check_prompt is not None:
                        check_prompt(ctx, turn)
                except Exception as e:  # this item only
                    env.fail(e)
                    progress(1)
                    continue
                left = None if budget is None else max(budget - len(episodes[i].completion), 0)
                text = scripted(env, turn) if scripted is not None else None
                if text is not None:  # not generated: only the trajectory budget bounds it, not the turn cap
                    ids = transcript.tokens(text)[:left]
                    outs[i] = ids, [math.nan] * len(ids)
                elif left is None or left > 0:
                    room[i] = max_new_tokens if left is None else min(max_new_tokens, left)
                else:
                    env.fail(RuntimeError("trajectory token budget spent"))
                    progress(1)
                    continue
            asked = list(room)
            todo = [i for i in live if i in outs or i in room]
            window = None
            if any_rank(bool(asked)):  # decided together: generation may be collective (ZeRO-3)
                start = time.time_ns()
                try:
                    new = engine.generate([contexts[i].ids for i in asked],
                                          [[transcript.open_image(p) for p in contexts[i].images] for i in asked],
                                          max(room.values(), default=1), **({"deadline": deadline} if deadline else {}))
                except Exception as e:  # the back-end failed for the whole batch: recorded on each item, they stop
                    for i in asked:
                        envs[i].fail(e)
                    mark_generation([envs[i] for i in asked], start, time.time_ns())
                    progress(len(asked))
                    todo = [i for i in todo if i not in asked]
                    new = []
                window = start, time.time_ns()
                outs.update({i: (ids[:room[i]], None if lp is None else lp[:room[i]])
                             for i, (ids, lp) in zip(asked, new)})
                if deadline is not None and (why := deadline.expired()):  # outputs may be cut short: not run
                    stopped = [envs[i] for i in todo]
                    _stop(stopped, why, progress)
                    mark_generation([envs[i] for i in asked if i in outs], *window)
                    live = []
                    continue
            todo = [i for i in todo if i in outs]
            texts = {i: transcript.text(outs[i][0]) for i in todo}
            list(pool.map(lambda i: _step(envs[i], texts[i]), todo))
            if window is not None:
                mark_generation([envs[i] for i in asked if i in outs], *window)
            finished = 0
            for i in todo:
                ids, lp = outs[i]
                ep = episodes[i]
                ep.inputs.append(contexts[i].ids)
                ep.completion += ids
                ep.mask += [1] * len(ids)
                ep.logps += [math.nan] * len(ids) if lp is None else lp
                env = envs[i]
                if env.done:
                    finished += 1
                    continue
                ctx, n_obs = transcript.next(env, contexts[i], ids)
                if budget is not None and len(ep.completion) + n_obs >= budget:
                    # never cut an observation (image tokens) in half
                    env.fail(RuntimeError("trajectory token budget spent"))
                    finished += 1
                    continue
                if transcript.form == "chat":
                    ep.completion += ctx.ids[len(ctx.ids) - n_obs:]
                    ep.mask += [0] * n_obs
                    ep.logps += [0.0] * n_obs
                    ep.images = list(ctx.images)
                contexts[i] = ctx
            live = [i for i in live if not envs[i].done]
            if finished:
                progress(finished)
    for ep, env in zip(episodes, envs):
        ep.record = env.record()
    return episodes


def first_turn(text_of: Callable[[AgentEnv], str | None]) -> Callable[[AgentEnv, int], str | None]:
    """The `scripted` hook of a scripted first turn: `text_of(env)` replaces the model's turn 1 (a served request's
    `first_turn`, a training demo's `forced_first_turn`); later turns are the model's."""
    return lambda env, turn: text_of(env) if turn == 1 else None


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
