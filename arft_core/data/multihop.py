"""Text-only multi-hop QA sets: FlashRAG JSONL files (2Wiki, HotpotQA, MuSiQue, Bamboogle) and FanOutQA dev.

Items out are ``{"id", "question", "answers": [str, ...]}`` (FanOutQA adds its decomposition); `load_datasets`
gathers the datasets of one evaluation, by name. These are benchmarks, not annotations to clean: a bad line raises
(naming the file and line) instead of being quarantined, because silently dropping test items would change the
scores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FANOUTQA = "fanoutqa"  # the dataset name of the bundled FanOutQA dev set


def load_datasets(files: dict[str, str | Path], *, fanoutqa: bool | None = None, limit: int | None = None,
                  root: Path = Path("."), key: str = "eval.multihop_files") -> dict[str, list[dict]]:
    """The multi-hop datasets of one evaluation, by name, in order: each FlashRAG file of `files` (name -> path,
    relative to `root`), then the FanOutQA dev set as `fanoutqa` when `fanoutqa` is true (None: only when `files`
    is empty). Each is cut to its first `limit` items (None: all).

    Errors name the dataset's setting, `<key>.<name>`, and its file: FileNotFoundError for a missing file,
    ValueError for a bad line or a file without questions.
    """
    datasets: dict[str, list[dict]] = {}
    for name, path in files.items():
        path = Path(root) / path
        try:
            items = load_flashrag(path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{key}.{name}: {e}") from e
        except ValueError as e:
            raise ValueError(f"{key}.{name}: {e}") from e
        if not items:
            raise ValueError(f"{key}.{name}: {path} holds no questions")
        datasets[name] = items[:limit]
    if fanoutqa or (fanoutqa is None and not files):
        datasets[FANOUTQA] = load_fanoutqa_dev()[:limit]
    return datasets


def load_flashrag(path: Path) -> list[dict]:
    """Read a FlashRAG JSONL file (`id`, `question`, `golden_answers` list per line; other keys are ignored).

    Raises FileNotFoundError for a missing file and ValueError naming ``path:line`` for a bad line (not JSON,
    empty question, no non-empty answer, duplicate id). Blank lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"cannot parse {path}: {e}") from e
    items: list[dict] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        item_id = row.get("id")
        if item_id is None or isinstance(item_id, bool) or not str(item_id).strip():
            raise ValueError(f"{where}: field 'id' is missing or empty")
        item_id = str(item_id)
        if item_id in seen:
            raise ValueError(f"{where}: duplicate id {item_id!r}")
        seen.add(item_id)
        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: item {item_id}: field 'question' is missing or empty")
        golden = row.get("golden_answers")
        if not isinstance(golden, list):
            raise ValueError(f"{where}: item {item_id}: field 'golden_answers' must be a list, got {golden!r}")
        # Some FlashRAG sets carry numeric answers (years, counts); the scorers compare strings.
        answers = [str(a).strip() for a in golden if isinstance(a, (str, int, float)) and str(a).strip()]
        if not answers:
            raise ValueError(f"{where}: item {item_id}: field 'golden_answers' has no non-empty answer")
        items.append({"id": item_id, "question": question.strip(), "answers": answers})
    return items


def render_answer(answer: Any) -> str:
    """FanOutQA's structured answer as one string: lists joined by ', ', dicts as 'key: value' pairs."""
    if isinstance(answer, dict):
        return ", ".join(f"{k}: {render_answer(v)}" for k, v in answer.items())
    if isinstance(answer, list):
        return ", ".join(render_answer(v) for v in answer)
    return str(answer)


def load_fanoutqa_dev() -> list[dict]:
    """The FanOutQA dev set (310 questions) from the data file bundled with the `fanoutqa` package; no network.

    The JSON is read directly: importing `fanoutqa` would load spaCy, which this project does not need (the
    Makefile installs the package with --no-deps for its data).

    Items: ``{"id", "question", "answers": [rendered answer], "answer": raw structured answer, "decomposition":
    [sub-question dicts, nested], "categories"}``. FanOutQA's answers are lists or dicts of facts, so `answers`
    holds one rendered string (for F1-style scoring) and `answer` keeps the structure for FanOutQA's own scorer.
    """
    from importlib.util import find_spec

    spec = find_spec("fanoutqa")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the FanOutQA dev set needs the PyPI package fanoutqa (pip install --no-deps "
                                "fanoutqa==1.1.1)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "fanout-final-dev.json"
    items = []
    for q in json.loads(path.read_text()):
        items.append({"id": q["id"], "question": q["question"], "answers": [render_answer(q["answer"])],
                      "answer": q["answer"], "decomposition": q.get("decomposition", []),
                      "categories": list(q.get("categories") or [])})
    return items
