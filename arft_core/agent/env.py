"""One item's tool environment in SkyRL's style: `reset() -> Observation`, `step(model_output) -> StepResult`
(observation, reward parts, done). `<code>` runs in the sandbox and brings back the new image (or the error);
`<search>` goes through the search tool and its cache; `<answer>` ends the item; so does the turn cap.

Each environment owns its own working folder and transcript: nothing is shared between items (the paper's harness
leaked variables and a shared `cache.jpg` across items, spec §8.6).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar, cast

from arft_core import metrics, protocol, rewards
from arft_core.config import AgentConfig
from arft_core.io import input_image_path


@dataclass
class EnvItem:
    """What the environment needs of one benchmark item."""

    id: Any
    task: str  # "coding" | "search"
    question: str
    answers: list[str]
    image: Path | None = None  # None for text-only multi-hop QA
    labels: list[str] = field(default_factory=list)  # MAT-Coding corruption labels (problem-step reward)
    cjk: bool = False  # score answers with the MAT-Coding CJK metric
    gold_queries: list[str] = field(default_factory=list)  # annotated searches (query-similarity reward part)

    @classmethod
    def from_manifest(cls, record: dict, task: str, folder: Path) -> EnvItem:
        """An item of a MAT manifest in `folder` (data/mat_coding for task coding, data/mat_search for search): its
        image as the model sees it, corruption labels (coding, CJK-aware scoring) or annotated searches (search,
        manifest `gold.queries`, absent for unannotated items)."""
        if task == "coding":
            return cls(record["id"], "coding", record["question"], list(record["answers"]),
                       Path(folder) / input_image_path(record), labels=list(record["type"]), cjk=True)
        return cls(record["id"], "search", record["question"], list(record["answers"]),
                   Path(folder) / record["image_path"],
                   gold_queries=list((record.get("gold") or {}).get("queries") or []))


@dataclass
class Tools:
    """The tools an environment may call; either may be None (then that action reports an error)."""

    sandbox: Any = None  # arft_core.sandbox.SandboxPool
    search: Any = None  # arft_core.search.SearchBackend
    top_k: int = 4
    embedder: Any = None  # sentence encoder for the query-similarity part (default: the offline MiniLM)


@dataclass
class Observation:
    """What the model is shown after a step: text (tool result, tips or error) and/or a new image."""

    text: str = ""
    image: Path | None = None


@dataclass
class StepResult:
    observation: Observation | None
    reward: dict[str, float]
    done: bool
    info: dict[str, Any]


def run_code(sandbox, code: str, image: Path, out_dir: Path) -> tuple[Path | None, str | None]:
    """Run model code on `image` in the sandbox: (the new image saved as `out_dir/image.png`, None) when the code
    ran and wrote a decodable image, else (None, why). The code reward of the corrected variant asks the same."""
    from PIL import Image

    result = sandbox.run(code, [image], out_dir)
    if not result.ok:
        return None, result.error or "the code failed"
    if not result.images:
        return None, "the code wrote no output image (save to 'path_to_output_image.jpg')"
    try:
        with Image.open(result.images[0]) as im:
            im.load()
            new = Path(out_dir) / "image.png"
            im.convert("RGB").save(new)
    except Exception as e:  # the code wrote something that is not an image
        return None, f"output is not a valid image: {e}"
    return new, None


def code_runner(sandbox, image_column: str = "image_path", root: Path | None = None):
    """A `code_runner` for `rewards.make_reward_funcs(..., "corrected")`: runs a completion's `<code>` on the row's
    image (column `image_column`, relative to `root`) and says whether it produced a valid image."""
    import tempfile

    def ran(completion: str, index: int, **columns) -> bool:
        step = protocol.parse_step(completion, "coding")
        if step.action != "code":
            return False
        image = Path(columns[image_column][index])
        with tempfile.TemporaryDirectory(prefix="arft-code-reward-") as tmp:
            new, _ = run_code(sandbox, step.content, (root / image) if root else image, Path(tmp))
            return new is not None

    return ran


_Tool = TypeVar("_Tool", bound=Callable[..., Any])


def _timed(tool: _Tool) -> _Tool:
    """Record a tool call's wall time on the turn's info: `tool_start_ns` (epoch ns, as the rollout's generation
    windows) and `tool_elapsed_s`; traces place the tool's span by them."""

    @functools.wraps(tool)
    def timed(self, content, info: dict):
        info["tool_start_ns"] = time.time_ns()
        start = time.perf_counter()  # monotonic: a clock adjustment mid-call cannot make the duration negative
        try:
            return tool(self, content, info)
        finally:
            info["tool_elapsed_s"] = time.perf_counter() - start

    return cast(_Tool, timed)


class AgentEnv:
    def __init__(self, item: EnvItem, tools: Tools, cfg: AgentConfig, workdir: Path):
        if item.task not in protocol.TASKS:
            raise ValueError(f"item {item.id}: unknown task {item.task!r}")
        self.item, self.tools, self.cfg, self.workdir = item, tools, cfg, Path(workdir)
        self.turns: list[dict[str, Any]] = []
        self.done = False
        self.end: str | None = None  # "answer" | "turns" | "error"
        self.pred_answer: str | None = None
        self.image: Path | None = None
        self.diagnosis: list[str] | None = None  # the latest <problem> labels, sorted (crop forcing, paper's code)

    # ---- contract
    def reset(self) -> Observation:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.turns, self.done, self.end, self.pred_answer, self.diagnosis = [], False, None, None, None
        self.image = self.item.image
        return Observation(self._first_text(), self.image)

    def step(self, output: str) -> StepResult:
        if self.done:
            raise RuntimeError(f"item {self.item.id}: step() after the episode ended ({self.end})")
        if self.cfg.protocol == "paper":
            return self._paper_step(output)
        parsed = protocol.parse_step(output, self.item.task)
        reward = {"format": self._format(output, parsed)}
        info: dict[str, Any] = {"action": parsed.action, "error": parsed.error}
        obs: Observation | None = None
        if parsed.action == "answer":
            self.pred_answer = parsed.content
            reward["answer_f1"] = metrics.score(parsed.content, self.item.answers, self.item.cjk)["f1"]
            self._finish("answer")
        elif parsed.action == "search":
            obs = self._search(parsed.content, info)
            if self.item.gold_queries:
                reward["query_similarity"] = max(rewards.query_similarity(parsed.content, g, self.tools.embedder)
                                                 for g in self.item.gold_queries)
        elif parsed.action == "problem":
            labels = protocol.problem_labels(parsed.content, sort=False)
            info["labels"] = labels
            self.diagnosis = sorted(labels)
            if self.item.labels:
                reward["problem"] = rewards.problem_label_reward(output, self.item.labels)
            obs = Observation(protocol.tips(labels) if self.cfg.coding_tips else "")
        elif parsed.action == "code":
            obs = self._code(parsed.content, info)
            reward["code_ran"] = float(info["code_ok"])
        else:
            obs = Observation(f"<error> {parsed.error}: write <think> ... </think> and then one action. </error>")
        # What the single-message transcript gains: the output, then the tool's text (our separators).
        context = f"\n{output}" + (f"\n{obs.text} " if obs is not None and obs.text else "")
        return self._record(output, info, reward, obs, context)

    def _record(self, output: str, info: dict, reward: dict, obs: Observation | None, context: str) -> StepResult:
        self.turns.append({"output": output, **info, "reward": reward, "context": context,
                           "observation": None if obs is None else {"text": obs.text, "image": obs.image}})
        if not self.done and len(self.turns) >= self.cfg.max_turns:
            self._finish("turns")
        return StepResult(None if self.done else obs, reward, self.done, info)

    def _paper_step(self, output: str) -> StepResult:
        """One turn as the authors' harness takes it (spec §2, §6.2): actions found by substring and read by their
        regexes; `<answer>` ends the item (no answer when their regex cannot read it); a search appends the output
        and the raw `<information>` block, and a failed search ends the item unanswered; `<problem>` appends the
        output and the tips of the sorted labels; `<code>` appends the output and, when it ran, replaces the
        image, with no feedback either way; an output with none of these appends nothing. Where their harness
        would crash or reuse another item's state (code before any diagnosis, an unreadable problem set or
        query), the item ends unanswered."""
        task = self.item.task
        parsed = protocol.parse_step(output, task)
        reward = {"format": self._format(output, parsed)}  # logged only: the paper scores the final answer
        info: dict[str, Any] = {"action": None, "error": None}
        obs: Observation | None = None
        context = ""
        if "<answer>" in output:
            info["action"] = "answer"
            self.pred_answer = protocol.paper_read(output, "answer")
            if self.pred_answer is None:
                info["error"] = "<answer> not readable by the paper's harness (one line only)"
            reward["answer_f1"] = metrics.score(self.pred_answer, self.item.answers, self.item.cjk)["f1"] \
                if self.pred_answer is not None else 0.0
            self._finish("answer")
        elif task == "search" and "<search>" in output:
            info["action"] = "search"
            query = protocol.paper_read(output, "search")
            obs = self._paper_search(query, info) if query is not None else None
            if query is None:
                info["error"] = "<search> not readable by the paper's harness (one line only)"
            elif self.item.gold_queries:
                reward["query_similarity"] = max(rewards.query_similarity(query, g, self.tools.embedder)
                                                 for g in self.item.gold_queries)
            if obs is None:
                self._finish("error")
            else:
                context = f"\n{output}\n{obs.text}"
        elif task == "coding":
            if "<problem>" in output:
                info["action"] = "problem"
                inside = protocol.paper_read(output, "problem")
                labels = protocol.problem_labels(inside) if inside is not None else []
                if not labels:
                    info["error"] = "no problem labels the paper's harness can read"
                    self._finish("error")
                else:
                    self.diagnosis = info["labels"] = labels
                    if self.item.labels:
                        reward["problem"] = rewards.problem_label_reward(output, self.item.labels, "paper")
                    tips = protocol.paper_tips(labels) if self.cfg.coding_tips else ""
                    context, obs = f"\n{output}{tips}", Observation(tips.strip())
            if "<code>" in output and not self.done:
                if self.diagnosis is None:
                    info["action"], info["error"] = "code", "code before any <problem> diagnosis"
                    self._finish("error")
                else:
                    info["action"] = "code"
                    code = protocol.paper_read(output, "code")
                    ran = self._code(code, info) if code is not None else None
                    info.setdefault("code_ok", False)
                    obs = Observation("", ran.image) if ran is not None and ran.image else Observation()  # no feedback
                    reward["code_ran"] = float(info["code_ok"])
                    context += f"\n{output}"
        return self._record(output, info, reward, obs, context)

    def fail(self, error: BaseException) -> None:
        """End the episode because something outside the model's control broke (recorded, never raised)."""
        self.turns.append({"output": None, "action": None, "error": f"{type(error).__name__}: {error}",
                           "reward": {}, "observation": None})
        self._finish("error")

    def record(self) -> dict[str, Any]:
        """The episode as data: prediction, end reason, tool-call counts and every turn."""
        actions = [t["action"] for t in self.turns]
        invalid = sum(1 for t in self.turns if t["output"] is not None and t["action"] is None)
        return {"id": self.item.id, "pred_answer": self.pred_answer, "end": self.end, "turns": self.turns,
                "n_turns": len([t for t in self.turns if t["output"] is not None]),
                "tool_calls": {"search": actions.count("search"), "code": actions.count("code"),
                               "code_failed": sum(1 for t in self.turns if t.get("code_ok") is False),
                               "invalid": invalid}}

    def _first_text(self) -> str:
        return protocol.query_text(self.item.task, self.item.question, self.cfg.protocol)

    # ---- tools
    @_timed
    def _paper_search(self, query: str, info: dict) -> Observation | None:
        """The paper's search feedback (raw snippets), or None when the search fails (the item then ends)."""
        from arft_core.search import SearchError

        info["query"] = query
        if self.tools.search is None:
            info["error"] = "no search tool configured"
            return None
        try:
            results = self.tools.search.search(query, self.tools.top_k)
        except SearchError as e:
            info["error"] = f"search failed: {e}"
            return None
        return Observation(protocol.paper_information([r.snippet for r in results[:self.tools.top_k]]))

    @_timed
    def _search(self, query: str, info: dict) -> Observation:
        from arft_core.search import SearchError, format_information

        info["query"] = query
        if self.tools.search is None:
            info["error"] = "no search tool configured"
            return Observation("<information> Search is not available. </information>")
        try:
            text = format_information(self.tools.search.search(query, self.tools.top_k), self.tools.top_k)
        except SearchError as e:
            info["error"] = f"search failed: {e}"
            text = "<information> Search failed. </information>"
        return Observation(text)

    @_timed
    def _code(self, code: str, info: dict) -> Observation:
        """Run `code` on the current image; the new image, or our `<error>` feedback (the paper protocol shows the
        model nothing on failure: its transcript takes each turn's `context`, never this text)."""
        info["code_ok"] = False
        if self.image is None:
            info["error"] = "no image to process"
            return Observation("<error> There is no image to process. </error>")
        if self.tools.sandbox is None:
            info["error"] = "no sandbox configured"
            return Observation("<error> Code execution is not available. </error>")
        # The paper's crop hack fires as theirs does: on the model's own diagnosis of crop (first sorted label).
        if self.cfg.crop_teacher_forcing and self.diagnosis and self.diagnosis[0] == "crop":
            from PIL import Image

            with Image.open(self.image) as im:
                code = protocol.force_crop_box(code, self.item.question, *im.size)
        info["code"] = code
        new, error = run_code(self.tools.sandbox, code, self.image, self.workdir / f"turn{len(self.turns) + 1}")
        if new is None:
            info["error"] = error
            return Observation(f"<error> {error.strip()[-500:]} </error>")
        info["code_ok"] = True
        self.image = new
        return Observation("", new)

    # ---- helpers
    def _format(self, output: str, parsed: protocol.Step) -> float:
        if parsed.action is None:
            return 0.0
        variant = "paper" if self.cfg.protocol == "paper" else "corrected"  # the protocol's own reward rules
        if self.item.task == "search":
            return rewards.search_format(output, variant)
        return rewards.coding_format(output, f"<{parsed.action}>", variant)

    def _finish(self, end: str) -> None:
        self.done, self.end = True, end
