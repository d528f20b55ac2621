"""Scripted engines for the token-level agent loop (TRL's style: fixed outputs instead of a model).

The loop hands an engine token ids (`agent.rollout.Engine`); these doubles decode each input with the embedded
model's tokenizer, ask a text policy for the turn and hand its tokens back. `processor()` is the embedded model's
processor (the real Qwen2.5 tokenizer cut to a small vocabulary, built offline in well under a second).

    engine = TextEngine(processor(), lambda prompt, call: "<think> x </think>\\n<answer> y </answer>")
    episodes = run_episodes(envs, engine, chat(), max_new_tokens=64)
"""

from __future__ import annotations

import functools
import time
from typing import Callable, Sequence

from arft_core.agent.transcript import Transcript


@functools.lru_cache(maxsize=None)
def processor():
    """The embedded model's processor (model.embedded.vocab_size 2048, the default pixel budget)."""
    from arft_core.config import ModelConfig
    from arft_core.model.processor import build_processor
    from arft_core.model.tokenizer import build_qwen_tokenizer

    cfg = ModelConfig()
    return build_processor(build_qwen_tokenizer(2048), cfg.min_pixels, cfg.max_pixels)


def transcript(protocol: str = "arft", form: str = "chat") -> Transcript:
    """The transcript renderer on the embedded processor (the old `env.prompt()` took transcript `auto` as chat)."""
    return Transcript(processor(), protocol, form)


def user_text(prompt: str) -> str:
    """The first user message's text of a rendered prompt (image placeholders left out)."""
    body = prompt.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
    return body.replace("<|vision_start|>", "").replace("<|image_pad|>", "").replace("<|vision_end|>", "")


class TextEngine:
    """An engine whose turns come from a text policy: `policy(prompt, call)` gets each input decoded (special
    tokens kept: the chat template's markers) and the 1-based number of this engine's generate calls; its text is
    the turn, as tokens. Keeps each call's batch size, token cap and prompts; `seconds` sleeps per call, checking the
    deadline every 10 ms as the Hugging Face engine does per decode step."""

    def __init__(self, processor_, policy: Callable[[str, int], str], seconds: float = 0.0):
        self.processor, self.policy, self.seconds = processor_, policy, seconds
        self.batches: list[int] = []
        self.caps: list[int] = []
        self.prompts: list[str] = []
        self.calls = 0

    def generate(self, ids: Sequence[list[int]], images: Sequence[list], max_new_tokens: int, deadline=None):
        self.calls += 1
        self.batches.append(len(ids))
        self.caps.append(max_new_tokens)
        end = time.monotonic() + self.seconds
        while time.monotonic() < end and not (deadline and deadline.expired()):
            time.sleep(0.01)
        tok = self.processor.tokenizer
        texts = [tok.decode(list(s)) for s in ids]
        self.prompts += texts
        return [(tok(self.policy(t, self.calls), add_special_tokens=False)["input_ids"], None) for t in texts]


class Script:
    """A text policy of fixed turns per item: `items` is (marker, turns) pairs, the marker a string found in the
    item's first user message (its question). An input belongs to the item whose marker it holds and whose turns
    written so far all appear in it, in order (chat or single-message transcript alike), the one furthest along
    first; items with the same question at turn 1 are taken in order, one per input of a call."""

    def __init__(self, items: Sequence[tuple[str, Sequence[str]]]):
        self.items = [(marker, list(turns)) for marker, turns in items]
        self.done = [0] * len(self.items)
        self.last_call = [0] * len(self.items)

    def __call__(self, prompt: str, call: int) -> str:
        question = user_text(prompt)
        fits = [k for k, (marker, turns) in enumerate(self.items)
                if marker in question and self.last_call[k] != call and self.done[k] < len(turns)
                and _in_order(turns[:self.done[k]], prompt)]
        if not fits:
            raise AssertionError(f"no scripted item for call {call}: {prompt!r}")
        k = max(fits, key=lambda j: (self.done[j], -j))
        self.last_call[k] = call
        self.done[k] += 1
        return self.items[k][1][self.done[k] - 1]


def scripted(processor_, items: Sequence[tuple[str, Sequence[str]]]) -> TextEngine:
    """A TextEngine on a Script of `items` ((question, turns) pairs)."""
    return TextEngine(processor_, Script(items))


def _in_order(parts: Sequence[str], text: str) -> bool:
    at = 0
    for p in parts:
        found = text.find(p, at)
        if found < 0:
            return False
        at = found + len(p)
    return True
