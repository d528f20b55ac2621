"""What the model receives, without a model: the messages of an item's first turn, or of its second turn after a
scripted first step (`arft prompt`). Built by the same environment that evaluation and training use, so what is
printed is what the model gets under either protocol."""

from __future__ import annotations

import tempfile
from pathlib import Path

from arft_core import protocol
from arft_core.agent import transcript
from arft_core.agent.env import AgentEnv, EnvItem, Tools
from arft_core.config import AgentConfig
from arft_core.search.base import SearchResult

BENCHMARKS = {"mat-coding": ("coding", "mat"), "mat-search": ("search", "mat"), "multihop": ("search", "multihop")}


class FixedResults:
    """A search backend that answers every query with the snippets it was given (for previews only)."""

    def __init__(self, snippets: list[str]):
        self.snippets = snippets

    def search(self, query: str, k: int) -> list[SearchResult]:
        return [SearchResult(title="", snippet=s, source="") for s in self.snippets[:k]]


def scripted_first_step(task: str, question: str, labels: list[str]) -> str:
    """A first model step that calls the task's tool: a `<problem>` diagnosis with `labels` (coding), or a
    `<search>` for the question (search)."""
    if task == "coding":
        return "<think> The image needs fixing first. </think>\n<problem> {%s} </problem>" % ", ".join(
            f"'{label}'" for label in labels)
    return f"<think> I need to look this up. </think>\n<search> {question} </search>"


def preview_messages(benchmark: str, mode: str, protocol_name: str, question: str, labels: list[str] | None = None,
                     after_tool: bool = False, output: str | None = None,
                     snippets: list[str] | None = None, form: str = "chat") -> list[dict]:
    """The chat messages (text verbatim, images as `{"type": "image"}`) the model receives on the first turn of a
    `benchmark` item in `mode` ("agent" or "direct") under `protocol_name`; with `after_tool`, on the second turn
    after the first step `output` (default: `scripted_first_step`) and its tool result (`snippets` for a
    search), in the transcript `form` (chat or single_message; the paper protocol is always single_message)."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark {benchmark!r}: one of {', '.join(BENCHMARKS)}")
    if protocol_name not in protocol.PROTOCOLS:
        raise ValueError(f"protocol {protocol_name!r}: one of {', '.join(protocol.PROTOCOLS)}")
    task, kind = BENCHMARKS[benchmark]
    with_image = benchmark != "multihop"
    if mode == "direct":
        if after_tool:
            raise ValueError("--after-tool: the direct mode has no tools (one turn)")
        return protocol.direct_prompt(question, kind, with_image)
    if mode != "agent":
        raise ValueError(f"mode {mode!r}: agent or direct")
    labels = labels or (["none"] if task == "coding" else [])
    with tempfile.TemporaryDirectory(prefix="arft-prompt-") as tmp:
        # A placeholder path: only its position in the messages is shown, the file is never opened.
        item = EnvItem("preview", task, question, [], image=Path(tmp) / "image.png" if with_image else None,
                       labels=labels)
        search = FixedResults(snippets if snippets is not None else ["First snippet.", "Second snippet."])
        env = AgentEnv(item, Tools(search=search), AgentConfig(protocol=protocol_name), Path(tmp) / "work")
        env.reset()
        if after_tool:
            step = env.step(output or scripted_first_step(task, question, labels))
            if step.done:
                raise ValueError(f"the first step ended the item ({env.end}): give one that calls a tool")
        messages, _ = transcript.messages(env.item, env.turns, protocol_name, form)
    return messages
