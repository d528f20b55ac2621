"""Step rows for step-mode training (SFT cold start, step GRPO, the teacher-forced score): the teacher's
trajectories replayed through the agent loop with the real tools, so that row k's prompt is exactly the input the
loop gives the model at turn k under the same protocol and transcript form, and its target is the teacher's turn.

A coding teacher turns are its `<problem>` diagnosis, its `<code>` fix (none for 'none' items) and its `<answer>`
(data/teacher.py, stored in the manifest); a search teacher searches each annotated gold query, then answers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from arft_core.agent.env import AgentEnv, EnvItem, Tools
from arft_core.agent.rollout import run_episodes
from arft_core.agent.transcript import Transcript, current_image, messages
from arft_core.config import AgentConfig


def search_step(query: str) -> str:
    return f"<think> I need more information, so I will search for it. </think>\n<search> {query} </search>"


def answer_step(answer: str) -> str:
    return f"<think> The information found answers the question. </think>\n<answer> {answer} </answer>"


def teacher_turns(record: dict, task: str) -> list[str]:
    """The teacher's model turns for one manifest item of `task`."""
    if task == "coding":
        t = record["teacher"]
        return [t["problem"], *([t["code_step"]] if t.get("code_step") else []), t["answer"]]
    gold = record.get("gold") or {}
    answer = gold.get("answer") or record["answers"][0]
    return [search_step(q) for q in gold.get("queries") or []] + [answer_step(answer)]


def step_rows(records: Sequence[dict], task: str, folder: Path, tools: Tools, cfg: AgentConfig,
              transcript: Transcript, scratch: Path, tool_threads: int = 4) -> list[dict]:
    """One row per teacher turn of each manifest item in `records` (images under `folder`), replayed through the
    loop in `scratch` (which must outlive the rows: tool images live there). Row columns: prompt (chat messages,
    images as placeholders), images (paths in placeholder order), solution (the teacher's turn), image_path (the
    image the turn works on: code rewards run the solution on it), answers, item_id, type (the turn's action).
    Items whose replay ended in an error (a teacher fix the sandbox refused) keep the rows before it."""
    items = [EnvItem.from_manifest(r, task, folder) for r in records]
    scripts = {id(item): teacher_turns(r, task) for item, r in zip(items, records, strict=True)}
    envs = [AgentEnv(item, tools, cfg, Path(scratch) / f"teacher-{k}") for k, item in enumerate(items)]

    def scripted(env: AgentEnv, turn: int) -> str | None:
        script = scripts[id(env.item)]
        return script[turn - 1] if turn <= len(script) else None

    episodes = run_episodes(envs, None, transcript, max_new_tokens=1 << 30, scripted=scripted,
                            tool_threads=tool_threads)
    rows = []
    for item, ep in zip(items, episodes, strict=True):
        turns = ep.record["turns"]
        for k, turn in enumerate(turns):
            if turn["output"] is None or turn.get("error"):
                break
            prompt, images = messages(item, turns[:k], transcript.protocol, transcript.form)
            rows.append({"prompt": prompt, "images": [str(p) for p in images], "solution": turn["output"],
                         "image_path": str(current_image(item, turns[:k])), "answers": list(item.answers),
                         "item_id": str(item.id), "type": turn["action"]})
    return rows
