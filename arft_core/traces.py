"""Agent trajectories as MLflow traces: one trace per evaluated item, and per sampled rollout of agentic training.

A trace is a root AGENT span (question and input image in, answer and scores out) over, in time order, one LLM span
per model turn (`turn k`, the model's output) and one TOOL span per tool call (`code` / `search`: its input, the
observation and the new image, ERROR status when the tool failed). Spans are placed by the records' timing keys
(`gen_start_ns`/`gen_end_ns` of the batched generation, `tool_start_ns`/`tool_elapsed_s`); spans without them
are drawn zero-length, in order. Images travel as MLflow attachments (files under the trace's artifacts).

Traces carry `arft.*` tags for search and MLflow's own metadata linking them to a LoggedModel (`mlflow.modelId`:
the Models page, `search_traces(model_id=...)`) and a run (`mlflow.sourceRun`: `search_traces(run_id=...)`).
Dotted tag keys need backticks in filters, e.g.
``mlflow.search_traces(locations=[experiment_id], filter_string="tags.`arft.outcome` = 'wrong'")``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from arft_core import metrics

if TYPE_CHECKING:
    from mlflow.entities import LiveSpan

    from arft_core.agent.env import EnvItem

TOOL_INPUTS = {"code": "code", "search": "query"}  # tool action -> the turn key holding the tool's input
# MLflow exports spans from background queues that drop what overflows (2048 spans; 1000 export tasks, one per
# batch of up to 5 spans plus one per trace) and holds every attachment in memory until then: spans are logged far
# faster than a SQLite store takes them, so a flush every so many spans bounds both.
FLUSH_SPANS = 500


@dataclass
class Trajectory:
    """What one trace shows: the item (question, input image, gold), its episode record (`AgentEnv.record()` or
    a prediction of `score_run`: pred_answer, end, n_turns, tool_calls, turns), its scores and its tags."""

    name: str
    question: str
    image: Path | None
    gold: list[str]
    record: dict[str, Any]
    f1: float
    em: float
    tags: dict[str, str]


def outcome(pred_answer: str | None, f1: float, em: float) -> str:
    """`no_answer`, `correct` (exact match), `partial` (some F1) or `wrong` (the `arft.outcome` tag)."""
    if pred_answer is None:
        return "no_answer"
    return "correct" if em else "partial" if f1 > 0 else "wrong"


def log_eval_traces(items: list[Any], predictions: list[dict], benchmark: str, mode: str, *,
                    model_id: str | None = None, run_id: str | None = None) -> list[str]:
    """Log one trace per evaluated item (`items`: the evaluation's BenchItems; `predictions` as `score_run` returns
    them, images still on disk) into the
    experiment of `run_id` (else of `model_id`, else the active one), linked to both; returns the trace ids, once
    every trace is stored.

    Tags: arft.phase (eval), arft.benchmark, arft.mode, arft.item_id, arft.split, arft.corruption (MAT-Coding type
    labels joined with '+') and arft.outcome."""
    trajectories = []
    for b, p in zip(items, predictions, strict=True):
        tags = {"arft.phase": "eval", "arft.benchmark": benchmark, "arft.mode": mode, "arft.item_id": str(p["id"]),
                **({"arft.split": str(b.split)} if b.split else {}),
                **({"arft.corruption": "+".join(b.types)} if b.types else {})}
        trajectories.append(Trajectory(f"{benchmark}/{mode}", b.env.question, b.env.image, list(b.env.answers), p,
                                       p["f1"], p["em"], tags))
    return log_trajectories(trajectories, model_id=model_id, run_id=run_id)


def log_training_traces(items: Sequence[EnvItem], records: Sequence[dict], step: int, *, limit: int = 8,
                        model_id: str | None = None, run_id: str | None = None) -> list[str]:
    """Log the first `limit` trajectories of a training rollout (records of `AgentEnv.record()`, tool images still
    on disk) as traces, scored as the evaluation scores them; tags arft.phase (train), arft.step, arft.sample (the
    trajectory's index in the rollout), arft.item_id, arft.task, arft.corruption and arft.outcome."""
    trajectories = []
    for k, (item, rec) in enumerate(list(zip(items, records, strict=True))[:limit]):
        s = metrics.score(rec["pred_answer"], item.answers, item.cjk)
        tags = {"arft.phase": "train", "arft.step": str(step), "arft.sample": str(k), "arft.item_id": str(item.id),
                "arft.task": item.task, **({"arft.corruption": "+".join(item.labels)} if item.labels else {})}
        trajectories.append(Trajectory(f"train/{item.task}", item.question, item.image, list(item.answers), rec,
                                       s["f1"], s["em"], tags))
    return log_trajectories(trajectories, model_id=model_id, run_id=run_id)


def log_trajectories(trajectories: Iterable[Trajectory], *, model_id: str | None = None,
                     run_id: str | None = None) -> list[str]:
    """Log each trajectory as a trace (see the module's docstring) and wait until all are stored; returns their
    ids (none when tracing is disabled)."""
    import mlflow
    from mlflow.tracing.constant import TraceMetadataKey

    client = mlflow.MlflowClient()
    # A trace lives in one experiment: the run's, so that search_traces(run_id=...) finds it there.
    experiment_id = (client.get_run(run_id).info.experiment_id if run_id else
                     client.get_logged_model(model_id).experiment_id if model_id else None)
    # Set explicitly, not through set_active_model / an active run: no global state, and other threads unaffected.
    metadata = {**({TraceMetadataKey.MODEL_ID: model_id} if model_id else {}),
                **({TraceMetadataKey.SOURCE_RUN: run_id} if run_id else {})}
    ids, pending = [], 0
    try:
        for t in trajectories:
            trace_id, n_spans = _log_trajectory(t, experiment_id, metadata)
            if trace_id is not None:
                ids.append(trace_id)
            pending += n_spans
            if pending >= FLUSH_SPANS:
                mlflow.flush_trace_async_logging()
                pending = 0
    finally:
        if pending:  # exported in background threads: stored only after a flush (each waits about a second)
            mlflow.flush_trace_async_logging()
    return ids


def _log_trajectory(t: Trajectory, experiment_id: str | None, metadata: dict[str, str]) -> tuple[str | None, int]:
    """Log one trace: (its id, or None when tracing is off; the number of spans)."""
    import mlflow
    from mlflow.entities import NoOpSpan, SpanStatus, SpanStatusCode, SpanType

    rec = t.record
    turns = rec["turns"]
    timeline = _timeline(turns)
    start = min((w[0] for pair in timeline for w in pair if w), default=time.time_ns())
    end = max((w[1] for pair in timeline for w in pair if w), default=start)
    inputs = {"question": t.question, **_image("image", t.image)}
    root = mlflow.start_span_no_context(
        t.name, span_type=SpanType.AGENT, inputs=inputs, tags={**t.tags, "arft.outcome": outcome(
            rec["pred_answer"], t.f1, t.em)}, metadata=metadata, experiment_id=experiment_id, start_time_ns=start,
        attributes={"arft.n_turns": rec.get("n_turns"), "arft.tool_calls": rec.get("tool_calls")})
    if isinstance(root, NoOpSpan):  # tracing disabled (mlflow.tracing.disable()) or the span failed to start
        return None, 0
    broken = False
    for k, (turn, (generation, tool)) in enumerate(zip(turns, timeline, strict=True), start=1):
        _turn_span(root, k, turn, generation, tool is None)
        if tool is not None:
            _tool_span(root, turn, tool)
        broken |= turn.get("output") is None  # a turn `AgentEnv.fail` recorded
    outputs = {"answer": rec["pred_answer"], "gold": t.gold, "f1": t.f1, "em": t.em, "end": rec["end"]}
    # ERROR marks episodes that broke (a back-end or tool crash; in training also a turn cut at the token limit),
    # so that `trace.status = 'ERROR'` finds them; a wrong or missing answer is an outcome, a failed tool a span.
    root.end(outputs=outputs, status=SpanStatus(SpanStatusCode.ERROR, "the episode failed") if broken else None,
             end_time_ns=end)
    return root.trace_id, 1 + len(turns) + sum(tool is not None for _, tool in timeline)


def _turn_span(root: LiveSpan, k: int, turn: dict, window: tuple[int, int], with_error: bool) -> None:
    """The model's turn k: its output, action and reward parts; a turn that never produced output (a failed
    generation or step) is an ERROR span with the reason."""
    import mlflow
    from mlflow.entities import SpanStatus, SpanStatusCode, SpanType

    error = turn.get("error")
    attributes = {"arft.action": turn.get("action"), "arft.reward": turn.get("reward"),
                  **({"arft.labels": turn["labels"]} if "labels" in turn else {}),
                  **({"arft.error": error} if error and with_error else {})}
    span = mlflow.start_span_no_context(f"turn {k}", span_type=SpanType.LLM, parent_span=root,
                                        start_time_ns=window[0], attributes=attributes)
    failed = turn.get("output") is None
    span.end(outputs=turn.get("output"), status=SpanStatus(SpanStatusCode.ERROR, error or "") if failed else None,
             end_time_ns=window[1])


def _tool_span(root: LiveSpan, turn: dict, window: tuple[int, int]) -> None:
    """The turn's tool call: input, observation text and new image; ERROR status and `arft.error` on failure."""
    import mlflow
    from mlflow.entities import SpanStatus, SpanStatusCode, SpanType

    action = turn["action"]
    key = TOOL_INPUTS[action]
    obs = turn.get("observation") or {}
    error = turn.get("error")
    attributes = {**({"arft.code_ok": turn["code_ok"]} if "code_ok" in turn else {}),
                  **({"arft.error": error} if error else {})}
    span = mlflow.start_span_no_context(action, span_type=SpanType.TOOL, parent_span=root,
                                        inputs={key: turn.get(key)}, start_time_ns=window[0], attributes=attributes)
    span.end(outputs={"text": obs.get("text"), **_image("image", obs.get("image"))},
             status=SpanStatus(SpanStatusCode.ERROR, error) if error else None, end_time_ns=window[1])


def _timeline(turns: list[dict]) -> list[tuple[tuple[int, int], tuple[int, int] | None]]:
    """Per turn, the (start, end) epoch ns of its generation and of its tool call (None: no tool called). A span
    without recorded times is zero-length, 1 ns after the previous one (the first: 1 ns before the first recorded
    time): MLflow orders spans by start time, and ties would show them in any order."""
    known = [t[k] for t in turns for k in ("gen_start_ns", "tool_start_ns") if k in t]
    cursor = min(known) - 1 if known else time.time_ns()
    out = []
    for turn in turns:
        g0 = turn.get("gen_start_ns", cursor)
        generation = (g0, turn.get("gen_end_ns", g0))
        cursor = generation[1] + 1
        tool = None
        if turn.get("action") in TOOL_INPUTS and ("tool_start_ns" in turn or TOOL_INPUTS[turn["action"]] in turn):
            s0 = turn.get("tool_start_ns", cursor)
            tool = (s0, s0 + round(turn.get("tool_elapsed_s", 0.0) * 1e9))
            cursor = max(cursor, tool[1] + 1)
        out.append((generation, tool))
    return out


def _image(key: str, path: Path | str | None) -> dict[str, Any]:
    """`{key: Attachment}` of the image file at `path`, or nothing (no image, or its file is gone)."""
    if path is None or not Path(path).is_file():
        return {}
    from mlflow.tracing.attachments import Attachment

    return {key: Attachment.from_file(path)}
