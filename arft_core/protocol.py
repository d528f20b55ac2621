"""The agent's text protocol in one place: the paper's coding prompt (spec §2.3), the tags, and their parsing."""

from __future__ import annotations

import re

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

# Current reasoning chain:"""

# The paper's search prompt, verbatim (spec §2.2; several lines end with two spaces, kept on purpose).
SEARCH_SYSTEM_PROMPT = '# Role  \nYou are a step-by-step multimodal reasoning assistant.  \nGiven an image, a question, and optional partial reasoning chain, your task is to solve the problem **one substep at a time**.  \n\n# Guiding Principles  \nAt each turn, you must **either**:  \n1. Issue **one specific, text-only search** enclosed in <search> </search> tags,  \n2. Or provide the **final answer** enclosed in <answer> </answer> tags.  \n\nAll outputs **must begin with a thought** enclosed in <think> </think> tags, explaining your current reasoning and what to do next.  \n\n- Do not reference “the image” in your searches.  \n- Do not repeat past queries.  \n- Only output **one action per step**: either <search> or <answer>, never both.  \n- When ready to conclude, summarize reasoning and give a final answer.\n\n# Output Format (strict):  \nAlways start with <think>. Do not output the previous reasoning chain. Then, depending on the case, output one of the following:\n\n## 1. If reasoning continues:  \n<think> Your current reasoning and next plan </think>  \n<search> One precise, retrievable textual query </search>\n\n## 2. If ready to conclude:  \n<think> Summarize all reasoning and derive the answer </think>  \n<answer> Final answer, as briefly as possible </answer>\n\n# Current reasoning chain:'


def search_prompt(question: str, with_image: bool = True) -> list[dict]:
    """Chat messages for one MAT-Search question (text-only multi-hop QA passes `with_image=False`)."""
    text = f"{SEARCH_SYSTEM_PROMPT}\n<query> {question} </query>"
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANSWER_STEP = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)
_TAGS = ("<think>", "<answer>", "<code>", "<problem>", "<search>")


def coding_prompt(question: str) -> list[dict]:
    """Chat messages for one MAT-Coding question: image first, then prompt and `<query>` (training's form)."""
    text = f"{CODING_SYSTEM_PROMPT}\n<query> {question} </query>"
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def extract_answer(completion: str) -> str | None:
    """Content of the first `<answer>` (multi-line allowed), stripped; None when there is none."""
    m = _ANSWER.search(completion)
    return m.group(1).strip() if m else None


def is_answer_step(completion: str) -> bool:
    """`<think>…</think><answer>…</answer>` and nothing else, each tag once (the paper's answer-step format)."""
    if any(completion.count(tag) > 1 for tag in _TAGS):
        return False
    return _ANSWER_STEP.fullmatch(completion) is not None
