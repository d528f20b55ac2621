"""Rule-based rewards in TRL's reward-function form: `f(completions, **dataset_columns) -> list[float]`.

This is the answer-step subset of the paper's rewards (spec §3): format + answer F1, summed.
"""

from __future__ import annotations

from arft_core import metrics
from arft_core.protocol import extract_answer, is_answer_step


def _text(completion) -> str:
    # TRL passes conversational completions as [{"role": "assistant", "content": str}].
    return completion[0]["content"] if isinstance(completion, list) else completion


def format_reward(completions, **_) -> list[float]:
    """1 when the completion is exactly a think + answer step, else 0."""
    return [float(is_answer_step(_text(c))) for c in completions]


def answer_f1_reward(completions, answers, **_) -> list[float]:
    """Best F1 of the `<answer>` content against the gold answers; 0 without an answer tag (no fallback)."""
    rewards = []
    for completion, golds in zip(completions, answers, strict=True):
        pred = extract_answer(_text(completion))
        rewards.append(metrics.score(pred, list(golds), cjk=True)["f1"] if pred is not None else 0.0)
    return rewards


REWARD_FUNCS = [format_reward, answer_f1_reward]
