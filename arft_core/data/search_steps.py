"""Step samples for step-level GRPO from annotated MAT-Search trajectories (the paper's training format, spec
§1.4): for each gold step, the context so far with the `<information>` results filled in by the search tool
(through its cache), and the target step."""

from __future__ import annotations

from arft_core.search import SearchBackend, format_information


def search_step(query: str) -> str:
    return f"<think> I need more information, so I will search for it. </think>\n<search> {query} </search>"


def answer_step(answer: str) -> str:
    return f"<think> The information found answers the question. </think>\n<answer> {answer} </answer>"


def search_step_samples(item: dict, search: SearchBackend, k: int) -> list[dict]:
    """One row per gold query (`type: search`) and one for the final answer (`type: answer`)."""
    gold = item.get("gold") or {}
    queries, answer = gold.get("queries") or [], gold.get("answer") or item["answers"][0]
    problem = f"<query> {item['question']} </query>"
    rows, context = [], ""
    for query in queries:
        target = search_step(query)
        rows.append({"type": "search", "solution": target, "context": context})
        info = format_information(search.search(query, k), k)
        context = f"{context}\n{target}\n{info}".lstrip("\n")
    rows.append({"type": "answer", "solution": answer_step(answer), "context": context})
    for row in rows:
        row.update({"item_id": item["id"], "image_path": item["image_path"], "problem": problem,
                    "gt": row["solution"], "answers": item["answers"]})
    return rows
