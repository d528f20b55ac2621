"""The agent's text protocol in one place (spec §2): the paper's prompts and tags, step parsing (multi-line),
stop sequences, the coding `<tips>`, the direct-answer baselines, and the paper's crop-box teacher forcing.

Nothing here runs a tool or a model; the agent environment (`arft_core.agent`) uses these pieces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CODING_SYSTEM_PROMPT = """# Role
You are a step-by-step image processing assistant.
Your task is to solve an image-based task by applying OpenCV operations one step at a time, optionally using a reasoning chain.

# Output Format
At each step, output **only one** of the following, preceded by a <think> tag:
1. <problem> Describe the image issue from {'rotation90', 'rotation180', 'dark', 'overexposure', 'blur', 'noise', 'crop', 'none'} </problem>
2. <code> OpenCV code to process and save the image </code>
3. <answer> Final answer based on the processed image </answer>

# Image Processing Rules
- Always read from `'path_to_input_image.jpg'` and write to `'path_to_output_image.jpg'`.

# Output Format (strict):
Always begin with <think>. Then, depending on current reasoning chain, output one of the following:

## 1. If this is the first step and only the query is given, output in the following format:
<think> Initial analysis of the image issue. </think>
<problem> {'problem1', ...} </problem>

## 2. If <problem> is given, continue with image operations:
<think> Explain what to fix next. </think>
<code>
```python
One Python code block using OpenCV to perform the operation, and save the processed images.
```
</code>

## 3. If ready to conclude:
<think> Summarize the processing steps and provide the result or outcome </think> 
<answer> Final answer, as briefly as possible</answer>

# Current reasoning chain:
"""

# The paper's search prompt, verbatim (spec §2.2; several lines end with two spaces, kept on purpose). Both prompts
# end with a newline, as the authors' strings do: the `<query>` line follows after one more ("chain:\n\n<query>").
SEARCH_SYSTEM_PROMPT = '# Role  \nYou are a step-by-step multimodal reasoning assistant.  \nGiven an image, a question, and optional partial reasoning chain, your task is to solve the problem **one substep at a time**.  \n\n# Guiding Principles  \nAt each turn, you must **either**:  \n1. Issue **one specific, text-only search** enclosed in <search> </search> tags,  \n2. Or provide the **final answer** enclosed in <answer> </answer> tags.  \n\nAll outputs **must begin with a thought** enclosed in <think> </think> tags, explaining your current reasoning and what to do next.  \n\n- Do not reference “the image” in your searches.  \n- Do not repeat past queries.  \n- Only output **one action per step**: either <search> or <answer>, never both.  \n- When ready to conclude, summarize reasoning and give a final answer.\n\n# Output Format (strict):  \nAlways start with <think>. Do not output the previous reasoning chain. Then, depending on the case, output one of the following:\n\n## 1. If reasoning continues:  \n<think> Your current reasoning and next plan </think>  \n<search> One precise, retrievable textual query </search>\n\n## 2. If ready to conclude:  \n<think> Summarize all reasoning and derive the answer </think>  \n<answer> Final answer, as briefly as possible </answer>\n\n# Current reasoning chain:\n'

TASKS = ("coding", "search")
# The two protocols (`agent.protocol`): ours, and the authors' evaluation harness byte for byte (spec §2, §6.2).
PROTOCOLS = ("arft", "paper")
ACTIONS = {"coding": ("problem", "code", "answer"), "search": ("search", "answer")}
# Generation stops right after a closing action tag: the model cannot go on to write its own `<information>`
# (the paper's harness had no stop sequences, spec §6.2).
STOP_SEQUENCES = ("</answer>", "</search>", "</code>", "</problem>")
# The image-problem labels: the one vocabulary of MAT-Coding corruption labels (an item's `type`, a `<problem>`
# step), in the coding prompt's order. Data generation applies every label but crop to the pixels (crop is a
# region question); the teacher, importers, validation, config checks and rewards all read these.
ROTATIONS = ("rotation90", "rotation180")
PHOTOMETRIC = ("dark", "overexposure", "blur", "noise")
PROBLEM_LABELS = (*ROTATIONS, *PHOTOMETRIC, "crop", "none")


def stop_sequences(protocol: str) -> tuple[str, ...]:
    """Where generation stops under `protocol`: after a closing action tag (ours), or nowhere (the paper's
    harness generated until EOS or the token cap)."""
    return () if protocol == "paper" else STOP_SEQUENCES


DEFAULT_MAX_TURNS = 5  # the paper's cap on model calls per item (spec §6.2)

# The direct-answer baselines' suffixes (spec §6.2): MAT benchmarks, and text multi-hop QA.
DIRECT_SUFFIX = {"mat": "\nAnswer the question directly. The answer should be very brief.",
                 "multihop": "\nOnly Return the answer."}

# The coding harness's hints after a `<problem>` step, keyed on the first label (exact strings, spec §2.3).
_TIPS_CROP = ("<tips> We now need to crop the image. Please provide the Python code. Use [x_min, y_min, x_max, "
              "y_max] to represent the bounding box coordinates. </tips>")
_TIPS_NONE = ("<tips> The image has no issues, so no code is needed in the next step. You can directly provide "
              "the answer. </tips>")
_TIPS_FIX = ("<tips> Now that we have identified the issue in the image: {labels}, please proceed to address it by "
             "outputting the python code. </tips>")


def has_cjk(text: str) -> bool:
    """Whether `text` holds a CJK Unified Ideograph (U+4E00-U+9FFF): the one test of "Chinese text", for scoring
    (metrics' `cjk=True`) and for data's `lang` ("zh"/"en").

    The range is the authors' MAT-Coding notebook's, kept exactly because Table 1 reproduces from their released
    predictions only with it. Data labelling uses the same range, not a wider one (Extension A U+3400-U+4DBF,
    compatibility ideographs U+F900-U+FAFF), so an item is "zh" exactly when its text is scored as Chinese; real
    Chinese text always contains basic-block ideographs, so the wider set would only relabel texts made of rare or
    compatibility characters alone, which the metric scores as non-Chinese anyway.
    """
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def system_prompt(task: str) -> str:
    return {"coding": CODING_SYSTEM_PROMPT, "search": SEARCH_SYSTEM_PROMPT}[task]


def query_text(task: str, question: str, protocol: str = "arft") -> str:
    """The first user text: the system prompt, then the question in `<query>` tags. The paper's coding harness
    writes it with no newline and a malformed closing tag (`<query> q <query>`, spec §2.3), reproduced under the
    `paper` protocol only; training rows and everything else use `\n<query> q </query>`."""
    if protocol == "paper" and task == "coding":
        return f"{system_prompt(task)}<query> {question} <query>"
    return f"{system_prompt(task)}\n<query> {question} </query>"


def coding_prompt(question: str, protocol: str = "arft") -> list[dict]:
    """Chat messages for one MAT-Coding question: image first, then prompt and `<query>`."""
    return [{"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": query_text("coding", question, protocol)}]}]


def direct_prompt(question: str, kind: str, with_image: bool = True) -> list[dict]:
    """The direct-answer baseline (no tools, no system prompt): question + the paper's suffix for `kind`."""
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question + DIRECT_SUFFIX[kind]}]
    return [{"role": "user", "content": content}]


_TAG_NAMES = ("think", "answer", "search", "code", "problem")
_TAGS = tuple(f"<{t}>" for t in _TAG_NAMES)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANSWER_STEP = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)
_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n?(.*?)```", re.DOTALL)
_QUOTED = re.compile(r"'([^']+)'")
_BBOX = re.compile(r"\[\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\]")
_SLICE_2D = re.compile(r"\[\s*[^\[\]:,]+?\s*:\s*[^\[\]:,]+?\s*,\s*[^\[\]:,]+?\s*:\s*[^\[\]:,]+?\s*\]")


@dataclass(frozen=True)
class Step:
    """One parsed model output. `action` is None when no usable action was found; `error` then says why."""

    action: str | None  # "answer" | "search" | "code" | "problem" | None
    content: str = ""  # the action's content, stripped (for code: the fenced block when there is one)
    think: str | None = None
    error: str | None = None


def _between(text: str, tag: str) -> str | None:
    m = re.search(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL)
    return m.group(1).strip() if m else None


def parse_step(text: str, task: str) -> Step:
    """Parse one model output for `task` ("coding" or "search"); multi-line contents are fine.

    An `<answer>` wins (it ends the item, as in the paper's harness); otherwise the first complete action tag of
    the task is taken. Unbalanced tags, an empty search query or code, and actions of the other task give a
    Step with `action=None` and the reason in `error` — the caller records it and goes on.
    """
    think = _between(text, "think")
    allowed = ACTIONS[task]
    found = []
    for tag in allowed:
        opened, closed = text.count(f"<{tag}>"), text.count(f"</{tag}>")
        if opened and not closed:
            return Step(None, think=think, error=f"unclosed <{tag}> tag")
        if closed and not opened:
            return Step(None, think=think, error=f"</{tag}> without <{tag}>")
        if opened:
            found.append((text.index(f"<{tag}>"), tag))
    if not found:
        others = [t for t in _TAG_NAMES if t not in allowed and t != "think" and f"<{t}>" in text]
        why = f"<{others[0]}> is not an action of the {task} task" if others else "no action tag"
        return Step(None, think=think, error=why)
    tag = "answer" if any(t == "answer" for _, t in found) else min(found)[1]
    content = _between(text, tag) or ""
    if tag == "code":
        fenced = _FENCE.search(content)
        content = fenced.group(1).strip() if fenced else content
    if tag in ("search", "code") and not content:
        return Step(None, think=think, error=f"empty <{tag}>")
    return Step(tag, content, think)


def extract_answer(completion: str) -> str | None:
    """Content of the first `<answer>` (multi-line allowed), stripped; None when there is none."""
    m = _ANSWER.search(completion)
    return m.group(1).strip() if m else None


def is_answer_step(completion: str) -> bool:
    """`<think>…</think><answer>…</answer>` and nothing else, each tag once (the paper's answer-step format)."""
    if any(completion.count(tag) > 1 for tag in _TAGS):
        return False
    return _ANSWER_STEP.fullmatch(completion) is not None


def problem_labels(content: str, sort: bool = True) -> list[str]:
    """Labels of a `<problem>` step: every single-quoted token (the paper's reading of `{'dark', ...}`), sorted
    as the reward compares them, or in the order written (`sort=False`, what the tips are keyed on)."""
    labels = _QUOTED.findall(content)
    return sorted(labels) if sort else labels


def tips(labels: list[str]) -> str:
    """The coding harness's hint after a `<problem>` step, keyed on the first label of `labels` (our protocol
    passes them as written; the paper's harness sorts them first, see `paper_tips`)."""
    if labels and labels[0] == "crop":
        return _TIPS_CROP
    if labels and labels[0] == "none":
        return _TIPS_NONE
    return _TIPS_FIX.format(labels=labels)


def paper_tips(labels: list[str]) -> str:
    """What the paper's harness appends to the transcript after the `<problem>` step itself: a newline, the tips
    for the sorted labels, and a newline after them except after the `none` tips (their code has none there)."""
    ordered = sorted(labels)
    return "\n" + tips(ordered) + ("" if ordered[0] == "none" else "\n")


# The paper's harness reads actions by substring and these regexes, none of them DOTALL except the problem set and
# the code block, so a multi-line answer or query is not read (spec §6.2).
_PAPER_ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>")
_PAPER_SEARCH = re.compile(r"<search>\s*(.*?)\s*</search>")
_PAPER_PROBLEM = re.compile(r"<problem>\s*\{(.*?)\}\s*</problem>", re.DOTALL)
_PAPER_CODE = re.compile(r"<code>\s*```python(.*?)```.*?</code>", re.DOTALL)


def paper_read(text: str, tag: str) -> str | None:
    """The paper harness's reading of `tag` ("answer", "search", "problem", "code") in one model output: the
    content its regex captures (stripped; for problem: the set's inside), or None when the regex does not match."""
    regex = {"answer": _PAPER_ANSWER, "search": _PAPER_SEARCH, "problem": _PAPER_PROBLEM, "code": _PAPER_CODE}[tag]
    m = regex.search(text)
    if m is None:
        return None
    return m.group(1).strip() if tag in ("answer", "search") else m.group(1)


def paper_information(snippets: list[str]) -> str:
    """The paper's search feedback block: entries `i. Content:{snippet}` joined with nothing, raw snippets, a
    space inside each tag and one after the block; no results give an empty block (spec §2.2)."""
    return "<information> " + "".join(f"{i}. Content:{s}" for i, s in enumerate(snippets, start=1)) + \
        " </information> "


def question_bbox(question: str, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The crop question's box ([x_min, y_min, x_max, y_max], normalised 0-1000) in pixels, or None."""
    m = _BBOX.search(question)
    if not m:
        return None
    x0, y0, x1, y1 = (int(v) for v in m.groups())
    return (x0 * width // 1000, y0 * height // 1000, x1 * width // 1000, y1 * height // 1000)


def force_crop_box(code: str, question: str, width: int, height: int) -> str:
    """The paper's crop teacher forcing (spec §2.3, off by default): every 2-D slice `[a:b, c:d]` in the model's
    code is overwritten with the ground-truth box taken from the question."""
    box = question_bbox(question, width, height)
    if box is None:
        return code
    x0, y0, x1, y1 = box
    return _SLICE_2D.sub(f"[{y0}:{y1}, {x0}:{x1}]", code)
