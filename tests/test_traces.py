"""Trajectories as MLflow traces, in a real SQLite store: scripted episodes through `evaluate` (the real sandbox:
code that fixes the image, code that crashes, an immediate answer) and a search episode; one trace per item with
its spans, timing, attachments, tags, and links to a LoggedModel and a run; and sampled rollouts of agentic
training traced into the active run."""

from __future__ import annotations

import io
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
import pytest
from mlflow.entities import SpanStatusCode, SpanType
from mlflow.tracing.attachments import Attachment
from mlflow.tracking._tracking_service.utils import _use_tracking_uri
from PIL import Image

from arft_core.agent import AgentEnv, EnvItem, Tools, run_episodes
from arft_core.agent.preview import FixedResults
from arft_core.config import AgentConfig, Config
from arft_core.evaluation import BenchItem, evaluate, score_run
from arft_core import traces
from arft_core.traces import Trajectory, log_eval_traces, log_trajectories, outcome
from scripted import processor, scripted, transcript
from test_agent import CRASH, ROTATE, same_picture
from test_training import tiny  # noqa: F401  (the tiny model and data, a fixture)

PROBLEM = "<think> Upside down. </think>\n<problem> {'rotation180'} </problem>"
SEARCH = "<think> Look it up. </think>\n<search> Mona Lisa museum </search>"


def answer(text: str) -> str:
    return f"<think> done </think>\n<answer> {text} </answer>"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fresh SQLite store (its folder); the tracking URI as it was afterwards."""
    root = tmp_path_factory.mktemp("traces")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", "")  # set_tracking_uri exports the variable: this puts it back afterwards
        with _use_tracking_uri(f"sqlite:///{root}/mlflow.db"):  # restores the previous URI, unset included
            yield root


def experiment(root: Path, name: str) -> str:
    """A new experiment of the store, one per test (searches see only that test's traces), artifacts beside."""
    return mlflow.create_experiment(name, artifact_location=(root / "artifacts" / name).as_uri())


@pytest.fixture(scope="module")
def logged(store):
    """Three MAT-Coding items evaluated (agent mode) with a tracer logging their traces, and one MAT-Search item
    run and traced directly; the run and LoggedModel they are linked to."""
    root = store
    experiment_id = experiment(root, "eval")
    clean = np.zeros((40, 60, 3), np.uint8)
    clean[:10, :, 0] = 255  # a red band at the top
    image = root / "upside_down.png"
    Image.fromarray(clean[::-1, ::-1]).save(image)
    client = mlflow.MlflowClient()
    run = client.create_run(experiment_id)  # not started: no active run is left behind
    model = mlflow.initialize_logged_model("policy", experiment_id=experiment_id)

    def coding(id_, gold, split, types):
        return BenchItem(EnvItem(id_, "coding", "What colour is the band?", [gold], image, labels=types, cjk=True),
                         split, types)

    items = [coding("fix", "red", "hard", ["rotation180"]), coding("crash", "red", "simple", ["rotation90", "dark"]),
             coding("direct", "dark red", "simple", ["none"])]
    question = "What colour is the band?"  # the same for the three items: told apart by what each wrote so far
    policy = scripted(processor(), [(question, [PROBLEM, ROTATE, answer("red")]), (question, [CRASH, answer("blue")]),
                                    (question, [answer("red")])])
    calls, ids, traced = [], {}, {}

    def tracer(bench, mode, bench_items, preds):
        traced[f"{bench}.{mode}"] = preds  # with their timings (the prediction files leave them out)
        # The fixed image is still in the scratch folder when the tracer runs.
        calls.append((bench, mode, [b.env.id for b in bench_items], [p["id"] for p in preds],
                      preds[0]["turns"][1]["observation"]["image"].is_file()))
        ids["mat-coding"] = log_eval_traces(bench_items, preds, bench, mode, model_id=model.model_id,
                                            run_id=run.info.run_id)

    cfg = Config.from_dict({"eval": {"benchmarks": ["mat-coding"], "modes": ["agent"]},
                            "agent": {"max_turns": 3}, "sandbox": {"workers": 1}}, root=root)
    scores, written, _ = evaluate(None, cfg, engine=policy, plan={"mat-coding": items}, tracer=tracer)
    assert not any(k.endswith("_ns") for p in written["mat-coding.agent"] for t in p["turns"] for k in t)
    predictions = traced

    search = BenchItem(EnvItem("look", "search", "Where is the Mona Lisa?", ["Louvre"]), "simple")
    env = AgentEnv(search.env, Tools(search=FixedResults(["The Mona Lisa hangs in the Louvre."]), top_k=1),
                   AgentConfig(max_turns=2), root / "look")
    engine = scripted(processor(), [("Where is the Mona Lisa?", [SEARCH, "no tags at all"])])
    records = [e.record for e in run_episodes([env], engine, transcript(), max_new_tokens=64)]
    _, search_preds = score_run([search], records, "mat-search")
    ids["mat-search"] = log_eval_traces([search], search_preds, "mat-search", "agent", run_id=run.info.run_id)
    predictions["mat-search.agent"] = search_preds
    by_id = {t.info.tags["arft.item_id"]: t
             for t in mlflow.search_traces(locations=[experiment_id], return_type="list")}
    return {"experiment": experiment_id, "run": run.info.run_id, "model": model.model_id, "ids": ids, "calls": calls,
            "traces": by_id, "predictions": {p["id"]: p for rows in predictions.values() for p in rows},
            "clean": clean, "image": image}


def search(logged, **kwargs) -> set[str]:
    found = mlflow.search_traces(locations=[logged["experiment"]], return_type="list", **kwargs)
    return {t.info.tags["arft.item_id"] for t in found}


def spans(trace) -> dict[str, object]:
    return {s.name: s for s in trace.data.spans}


def attachment_bytes(trace, ref: str) -> bytes:
    """An attachment's stored bytes: `attachments/<id>` under the trace's artifact folder (a local store here)."""
    parsed = Attachment.parse_ref(ref)
    assert parsed is not None and parsed["trace_id"] == trace.info.trace_id, ref
    folder = Path(urlparse(trace.info.tags["mlflow.artifactLocation"]).path)
    return (folder / "attachments" / parsed["attachment_id"]).read_bytes()


def test_evaluate_calls_the_tracer_once_per_benchmark_and_mode_while_tool_images_exist(logged):
    assert logged["calls"] == [("mat-coding", "agent", ["fix", "crash", "direct"], ["fix", "crash", "direct"], True)]
    assert len(logged["ids"]["mat-coding"]) == 3 and len(logged["ids"]["mat-search"]) == 1


def test_records_time_generation_batches_and_tool_calls(logged):
    preds = logged["predictions"]
    first = {(t["gen_start_ns"], t["gen_end_ns"]) for p in ("fix", "crash", "direct") for t in preds[p]["turns"][:1]}
    assert len(first) == 1  # turn 1 of the three items: one batched generation, one window
    for p in preds.values():
        for t in p["turns"]:
            assert t["gen_start_ns"] <= t["gen_end_ns"]
            if t["action"] in ("code", "search"):
                assert t["tool_start_ns"] >= t["gen_end_ns"] and 0 < t["tool_elapsed_s"] < 10
            else:
                assert "tool_start_ns" not in t and "tool_elapsed_s" not in t
    # The next turn's generation starts after the tool returned.
    code = preds["fix"]["turns"][1]
    assert code["tool_start_ns"] + code["tool_elapsed_s"] * 1e9 <= preds["fix"]["turns"][2]["gen_start_ns"]


def test_one_trace_per_item_with_search_tags(logged):
    traces = logged["traces"]
    assert set(traces) == {"fix", "crash", "direct", "look"}
    assert set(logged["ids"]["mat-coding"] + logged["ids"]["mat-search"]) == {
        t.info.trace_id for t in traces.values()}
    tags = {k: {tag: v for tag, v in t.info.tags.items() if tag.startswith("arft.")} for k, t in traces.items()}
    coding = {"arft.phase": "eval", "arft.benchmark": "mat-coding", "arft.mode": "agent"}
    assert tags == {
        "fix": {**coding, "arft.item_id": "fix", "arft.split": "hard", "arft.corruption": "rotation180",
                "arft.outcome": "correct"},
        "crash": {**coding, "arft.item_id": "crash", "arft.split": "simple", "arft.corruption": "rotation90+dark",
                  "arft.outcome": "wrong"},
        "direct": {**coding, "arft.item_id": "direct", "arft.split": "simple", "arft.corruption": "none",
                   "arft.outcome": "partial"},
        "look": {"arft.phase": "eval", "arft.benchmark": "mat-search", "arft.mode": "agent", "arft.item_id": "look",
                 "arft.split": "simple", "arft.outcome": "no_answer"}}
    assert {k: t.info.tags["mlflow.traceName"] for k, t in traces.items()} == {
        "fix": "mat-coding/agent", "crash": "mat-coding/agent", "direct": "mat-coding/agent",
        "look": "mat-search/agent"}


def test_filters_on_dotted_tag_keys_take_backticks(logged):
    assert search(logged, filter_string="tags.`arft.item_id` = 'crash'") == {"crash"}
    assert search(logged, filter_string="tags.`arft.benchmark` = 'mat-search'") == {"look"}
    assert search(logged, filter_string="tags.`arft.corruption` = 'rotation90+dark'") == {"crash"}
    assert search(logged, filter_string="tags.`arft.outcome` = 'no_answer'") == {"look"}
    assert search(logged, filter_string="tags.`arft.benchmark` = 'mat-coding' AND tags.`arft.outcome` != 'correct'"
                  ) == {"crash", "direct"}
    assert search(logged, filter_string="tags.`arft.corruption` LIKE '%dark%'") == {"crash"}
    assert search(logged, filter_string="trace.status = 'OK'") == {"fix", "crash", "direct", "look"}


def test_linked_to_the_logged_model_and_the_run(logged):
    assert search(logged, model_id=logged["model"]) == {"fix", "crash", "direct"}  # the search item had no model
    assert search(logged, run_id=logged["run"]) == {"fix", "crash", "direct", "look"}
    fix = logged["traces"]["fix"].info.trace_metadata
    assert fix["mlflow.modelId"] == logged["model"] and fix["mlflow.sourceRun"] == logged["run"]
    assert "mlflow.modelId" not in logged["traces"]["look"].info.trace_metadata
    other = mlflow.initialize_logged_model("other", experiment_id=logged["experiment"])
    assert search(logged, model_id=other.model_id) == set()


def test_code_that_fixed_the_image_is_a_tool_span_with_the_new_image(logged):
    trace, pred = logged["traces"]["fix"], logged["predictions"]["fix"]
    assert [(s.name, s.span_type) for s in trace.data.spans] == [
        ("mat-coding/agent", SpanType.AGENT), ("turn 1", SpanType.LLM), ("turn 2", SpanType.LLM),
        ("code", SpanType.TOOL), ("turn 3", SpanType.LLM)]
    root, by_name = trace.data.spans[0], spans(trace)
    assert all(s.parent_id == root.span_id for s in trace.data.spans[1:])
    assert root.inputs["question"] == "What colour is the band?"
    assert attachment_bytes(trace, root.inputs["image"]) == logged["image"].read_bytes()
    assert root.outputs == {"answer": "red", "gold": ["red"], "f1": 1.0, "em": 1.0, "end": "answer"}
    assert root.attributes["arft.n_turns"] == 3 and root.attributes["arft.tool_calls"]["code"] == 1
    assert [by_name[f"turn {k}"].outputs for k in (1, 2, 3)] == [PROBLEM, ROTATE, answer("red")]
    assert by_name["turn 1"].attributes["arft.labels"] == ["rotation180"]
    assert by_name["turn 2"].attributes["arft.action"] == "code"
    assert by_name["turn 2"].attributes["arft.reward"] == {"format": 1.0, "code_ran": 1.0}

    code = by_name["code"]
    assert code.status.status_code == SpanStatusCode.OK and code.attributes["arft.code_ok"] is True
    assert "cv2.rotate(img, cv2.ROTATE_180)" in code.inputs["code"] and code.outputs["text"] == ""
    fixed = Image.open(io.BytesIO(attachment_bytes(trace, code.outputs["image"])))
    fixed.save(Path(logged["image"]).with_name("fixed.png"))
    assert same_picture(Path(logged["image"]).with_name("fixed.png"), logged["clean"])

    # Timed by the records: each model turn by its batch's generation window, the code by its tool call.
    turns = pred["turns"]
    for k, t in enumerate(turns, start=1):
        assert (by_name[f"turn {k}"].start_time_ns, by_name[f"turn {k}"].end_time_ns) == (
            t["gen_start_ns"], t["gen_end_ns"])
    assert code.start_time_ns == turns[1]["tool_start_ns"]
    assert code.end_time_ns - code.start_time_ns == round(turns[1]["tool_elapsed_s"] * 1e9)
    assert (root.start_time_ns, root.end_time_ns) == (turns[0]["gen_start_ns"], turns[2]["gen_end_ns"])


def test_crashing_code_is_an_error_tool_span(logged):
    trace = logged["traces"]["crash"]
    assert [s.name for s in trace.data.spans] == ["mat-coding/agent", "turn 1", "code", "turn 2"]
    code = spans(trace)["code"]
    assert code.status.status_code == SpanStatusCode.ERROR and "boom" in code.status.description
    assert "ValueError" in code.attributes["arft.error"] and code.attributes["arft.code_ok"] is False
    assert code.inputs == {"code": "raise ValueError('boom at line 1')"}
    assert "boom" in code.outputs["text"] and "image" not in code.outputs  # no new image
    assert "arft.error" not in spans(trace)["turn 1"].attributes  # the error belongs to the tool
    # A tool failure is the model's doing, not a broken run: the trace itself is OK.
    assert trace.info.state.value == "OK" and trace.data.spans[0].outputs["answer"] == "blue"


def test_an_immediate_answer_has_no_tool_span(logged):
    trace = logged["traces"]["direct"]
    assert [s.name for s in trace.data.spans] == ["mat-coding/agent", "turn 1"]
    assert trace.data.spans[0].outputs == {"answer": "red", "gold": ["dark red"],
                                           "f1": logged["predictions"]["direct"]["f1"], "em": 0.0, "end": "answer"}


def test_search_is_a_tool_span_with_the_query_and_results(logged):
    trace = logged["traces"]["look"]
    assert [s.name for s in trace.data.spans] == ["mat-search/agent", "turn 1", "search", "turn 2"]
    root, by_name = trace.data.spans[0], spans(trace)
    assert root.inputs == {"question": "Where is the Mona Lisa?"}  # text-only item: no image
    assert by_name["search"].inputs == {"query": "Mona Lisa museum"}
    assert "hangs in the Louvre" in by_name["search"].outputs["text"] and "image" not in by_name["search"].outputs
    assert by_name["turn 2"].attributes["arft.error"] == "no action tag"  # a format error stays on the turn
    assert by_name["turn 2"].status.status_code == SpanStatusCode.OK
    assert root.outputs["answer"] is None and root.outputs["end"] == "turns"


def test_a_failed_episode_is_an_error_trace(store, tmp_path):
    """A back-end that fails a whole batch: the turn without output, and the trace, are ERROR."""
    experiment_id = experiment(store, "failed")

    class Broken:
        def generate(self, ids, images, max_new_tokens, deadline=None):
            raise RuntimeError("GPU fell over")

    item = BenchItem(EnvItem("b1", "search", "Q?", ["x"]), None)
    records = [e.record for e in run_episodes([AgentEnv(item.env, Tools(), AgentConfig(), tmp_path / "b1")],
                                              Broken(), transcript(), max_new_tokens=64)]
    _, preds = score_run([item], records, "multihop")
    run = mlflow.MlflowClient().create_run(experiment_id)
    (trace_id,) = log_eval_traces([item], preds, "multihop", "agent", run_id=run.info.run_id)
    trace = mlflow.get_trace(trace_id)
    assert trace.info.state.value == "ERROR" and trace.info.tags["arft.outcome"] == "no_answer"
    turn = spans(trace)["turn 1"]
    assert turn.status.status_code == SpanStatusCode.ERROR and "GPU fell over" in turn.status.description
    assert "arft.split" not in trace.info.tags and "arft.corruption" not in trace.info.tags
    assert (turn.start_time_ns, turn.end_time_ns) == (preds[0]["turns"][0]["gen_start_ns"],
                                                      preds[0]["turns"][0]["gen_end_ns"])


def answered(k: int) -> Trajectory:
    """A one-turn trajectory without timing or images."""
    record = {"pred_answer": "a", "end": "answer", "n_turns": 1, "tool_calls": {},
              "turns": [{"output": answer("a"), "action": "answer", "error": None, "reward": {}}]}
    return Trajectory("multihop/agent", "Q?", None, ["a"], record, 1.0, 1.0, {"arft.item_id": str(k)})


def test_traces_are_flushed_in_chunks_so_that_mlflow_drops_none(store, monkeypatch):
    """MLflow's export queue discards what overflows, and traces are logged much faster than a SQLite store takes
    them: cut to 8 tasks, the queue still loses nothing, as `log_trajectories` flushes every FLUSH_SPANS spans."""
    experiment_id = experiment(store, "flush")
    run = mlflow.MlflowClient().create_run(experiment_id)
    monkeypatch.setattr(traces, "FLUSH_SPANS", 10)  # 5 two-span traces: at most 7 export tasks queued
    try:
        with monkeypatch.context() as mp:
            mp.setenv("MLFLOW_ASYNC_TRACE_LOGGING_MAX_QUEUE_SIZE", "8")
            mlflow.tracing.reset()  # the exporter reads the queue size when it is built
            ids = log_trajectories([answered(k) for k in range(15)], run_id=run.info.run_id)
    finally:
        mlflow.tracing.reset()  # the next trace builds an exporter with the default queue again
    found = mlflow.search_traces(locations=[experiment_id], run_id=run.info.run_id, return_type="list")
    assert len(ids) == 15 and {t.info.trace_id for t in found} == set(ids)
    # Untimed turns: zero-length spans at the logging time, in order.
    trace = found[0]
    assert trace.data.spans[0].start_time_ns == trace.data.spans[1].start_time_ns == trace.data.spans[1].end_time_ns


def test_untimed_spans_keep_their_order(store):
    """Records without timing (hand-made, or from before it was recorded): spans in turn order, 1 ns apart."""
    run = mlflow.MlflowClient().create_run(experiment(store, "untimed"))
    turns = [{"output": SEARCH, "action": "search", "error": None, "reward": {}, "query": "Mona Lisa museum",
              "observation": {"text": "<information> Louvre </information>", "image": None}},
             {"output": "no tags at all", "action": None, "error": "no action tag", "reward": {}},
             {"output": answer("Louvre"), "action": "answer", "error": None, "reward": {}}]
    record = {"pred_answer": "Louvre", "end": "answer", "n_turns": 3, "tool_calls": {"search": 1}, "turns": turns}
    (trace_id,) = log_trajectories([Trajectory("mat-search/agent", "Q?", None, ["Louvre"], record, 1.0, 1.0, {})],
                                   run_id=run.info.run_id)
    found = mlflow.get_trace(trace_id).data.spans
    assert [s.name for s in found] == ["mat-search/agent", "turn 1", "search", "turn 2", "turn 3"]
    starts = [s.start_time_ns for s in found[1:]]
    assert starts == list(range(starts[0], starts[0] + 4)) and found[0].start_time_ns == starts[0]
    assert all(s.start_time_ns == s.end_time_ns for s in found[1:])


def test_nothing_is_logged_while_tracing_is_disabled(store):
    experiment_id = experiment(store, "disabled")
    run = mlflow.MlflowClient().create_run(experiment_id)
    mlflow.tracing.disable()
    try:
        assert log_trajectories([answered(0)], run_id=run.info.run_id) == []
    finally:
        mlflow.tracing.enable()
    assert mlflow.search_traces(locations=[experiment_id], run_id=run.info.run_id, return_type="list") == []


def test_outcome():
    assert [outcome(None, 0.0, 0.0), outcome("a", 1.0, 1.0), outcome("a", 0.5, 0.0), outcome("a", 0.0, 0.0)] == [
        "no_answer", "correct", "partial", "wrong"]


def test_agentic_training_traces_sampled_rollouts_into_the_active_run(store, tiny, tmp_path):
    """One agentic GRPO step on the tiny model inside a run: the sampled trajectories (scripted code call, then a
    generated turn) become traces of that run, next to the HTML page."""
    from arft_core.config import SandboxConfig, TrainConfig
    from arft_core.sandbox import SandboxPool
    from arft_core.training import train
    from agentic_job import ROTATE_90
    from test_training import MODEL, NO_SFT, length_reward

    experiment_id = experiment(store, "train")
    cfg = TrainConfig(mode="agentic", max_steps=1, num_generations=2, max_completion_length=400,
                      turn_max_new_tokens=4, reward_weights=[1.0], sft=NO_SFT, sample_every=1)
    artifacts = {}
    with SandboxPool(SandboxConfig(workers=1)) as pool, mlflow.start_run(experiment_id=experiment_id) as run:
        train(MODEL, cfg, tiny / "base", tiny / "data", tmp_path / "out", tmp_path / "log.csv",
              tools=Tools(sandbox=pool), agent_cfg=AgentConfig(max_turns=2), forced_first_turn=lambda i: ROTATE_90,
              reward_funcs=[length_reward], artifact_sink=artifacts.__setitem__)
    assert list(artifacts) == ["rollouts/step_000001.html"]
    traces = mlflow.search_traces(locations=[experiment_id], run_id=run.info.run_id, return_type="list")
    assert len(traces) == 2  # one prompt x 2 generations, both sampled
    tags = [{k: v for k, v in t.info.tags.items() if k.startswith("arft.")} for t in traces]
    assert sorted(t.pop("arft.sample") for t in tags) == ["0", "1"]
    item_ids = {t.pop("arft.item_id") for t in tags}
    assert len(item_ids) == 1 and f"item {item_ids.pop()}" in artifacts["rollouts/step_000001.html"]
    outcomes = {t.pop("arft.outcome") for t in tags}
    assert outcomes <= {"correct", "partial", "wrong", "no_answer"}
    assert {tuple(sorted(t.items())) for t in tags} == {(("arft.corruption", tags[0]["arft.corruption"]),
                                                         ("arft.phase", "train"), ("arft.step", "1"),
                                                         ("arft.task", "coding"))}
    assert search({"experiment": experiment_id}, filter_string="tags.`arft.phase` = 'train'") == {
        t.info.tags["arft.item_id"] for t in traces}
    for trace in traces:
        assert trace.info.trace_metadata["mlflow.sourceRun"] == run.info.run_id
        names = [s.name for s in trace.data.spans]
        assert names[:4] == ["train/coding", "turn 1", "code", "turn 2"], names
        by_name = spans(trace)
        code = by_name["code"]
        assert "ROTATE_90_COUNTERCLOCKWISE" in code.inputs["code"] and code.status.status_code == SpanStatusCode.OK
        assert Image.open(io.BytesIO(attachment_bytes(trace, code.outputs["image"]))).size[0] > 0
        assert by_name["turn 1"].outputs == ROTATE_90  # scripted: no generation window, drawn before the tool
        assert by_name["turn 1"].end_time_ns < code.start_time_ns
        generated = by_name["turn 2"]  # timed by the policy's generation, after the tool returned
        assert code.end_time_ns <= generated.start_time_ns < generated.end_time_ns
