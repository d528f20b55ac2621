"""A served agent cannot be held hostage (issue 26): one `mlflow models serve` of the tiny agent, logged with small
caps, answers each request that breaks a cap with a clear error (HTTP 400 for the request-level caps, an error row
for the per-row ones) while its memory stays bounded; a request past its deadline ends as error rows and frees the
model for the next one; search replays the logged cache only; SIGTERM stops the server mid-request within seconds
and its scratch folder goes with it (and a killed server's is removed at the next start). The loop's deadline and
the caps themselves are also checked in-process."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from types import SimpleNamespace

import mlflow
import psutil
import pytest
from mlflow.exceptions import MlflowException

from arft_core.config import Config, ServingConfig
from conftest import write_params
from servers import free_port, model_server, tracking_store
from test_serving import CACHED_QUERY, ROTATE, upside_down_png

DEADLINE_S = 8  # the server's ARFT_SERVING_DEADLINE_S: a generated coding turn (4096 tokens) takes 16-60 s on CPU
CAPS = {"allow_first_turn": True, "max_rows": 4, "max_prompt_tokens": 1500, "max_request_bytes": 1_000_000}
# Peak RSS of the server's process tree (uvicorn, the tiny model, the sandbox workers) while the bad requests run,
# measured 0.98 GB on the CI machine (docs/serving.md); a 13000 x 13000 image alone used to add 2.3 GB per row.
PEAK_RSS_BOUND = 1_600_000_000


def blank_png(width: int, height: int) -> bytes:
    """A one-colour 1-bit greyscale PNG: a few KB on disk, width x height pixels once decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row, z = b"\0" * (1 + (width + 7) // 8), zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def tree_rss(pid: int) -> int:
    total = 0
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class PeakRss:
    """Samples the RSS of a process tree every 50 ms in a thread; `peak` is the largest seen."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, tree_rss(self.pid))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def call(url: str, body: dict | bytes, timeout: float = 120) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        return 200, json.load(urllib.request.urlopen(req, timeout=timeout))
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


def rows_body(rows: list[list], params: dict | None = None) -> dict:
    return {"dataframe_split": {"columns": ["question", "image", "task"], "data": rows}, "params": params or {}}


def image_b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The tiny agent logged with CAPS (a generated coding turn of 4096 tokens) and served by `mlflow models serve`
    with ARFT_SERVING_DEADLINE_S and its own temporary folder, in which a killed server's scratch was left."""
    from arft_core.config import load_config
    from arft_core.model.embedded import prepare_base_model
    from arft_core.registry import _start_ticks, log_agent
    from arft_core.search import SearchResult
    from arft_core.search.cache import SearchCache

    root = tmp_path_factory.mktemp("serving-limits")
    docs = [{"id": "eiffel", "title": "Eiffel Tower", "text": "The Eiffel Tower in Paris is 330 metres tall."}]
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    cfg = load_config(write_params(root, {"search": {"corpus_path": "corpus.jsonl"}, "serving": CAPS,
                                          "eval": {"max_new_tokens": {"mat-coding": 4096}}}))
    cache = SearchCache(cfg.path("eval_search_cache"))
    cache.put("local", CACHED_QUERY, cfg.search.top_k,
              [SearchResult(title="Tower", snippet="Built by Gustave Eiffel's company.", source="cache")])
    cache.close()
    prepare_base_model(cfg.model, root / "model")
    uri = f"sqlite:///{root}/mlflow.db"
    # The server's temporary folder: under /tmp (pytest's folders are private to root, and the sandbox uid must
    # reach its worker folder), with the scratch of a killed server and of a live process (this one) in it.
    tmp = Path(tempfile.mkdtemp(prefix="arft-test-serving-"))
    tmp.chmod(0o711)
    stale = tmp / "arft-serving-999999999-1-abcd1234"
    (stale / "arft-predict-x").mkdir(parents=True)
    alive = tmp / f"arft-serving-{os.getpid()}-{_start_ticks(os.getpid())}-abcd1234"
    alive.mkdir()
    with tracking_store(uri):
        experiment = mlflow.create_experiment("limits", artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = log_agent(root / "model", cfg)
        port = free_port()
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TMPDIR": str(tmp),
               "ARFT_SERVING_DEADLINE_S": str(DEADLINE_S)}
        log = root / "serve.log"
        proc = model_server([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", info.model_uri,
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], env, port, log)
        try:
            uvicorn = next(p for p in psutil.Process(proc.pid).children(recursive=True) if "uvicorn" in " ".join(
                p.cmdline()))
            yield SimpleNamespace(url=f"http://127.0.0.1:{port}/invocations", proc=proc, uvicorn=uvicorn, tmp=tmp,
                                  stale=stale, alive=alive, cfg=cfg, info=info, log=log)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            shutil.rmtree(tmp, ignore_errors=True)


def good_request(served) -> tuple[float, dict]:
    """One coding row whose scripted first turn runs in the sandbox, no generation: (seconds, its prediction)."""
    started = time.perf_counter()
    status, reply = call(served.url, rows_body([["What is written?", image_b64(upside_down_png()), "coding"]],
                                               {"first_turn": ROTATE, "max_turns": 1}))
    assert status == 200, reply
    prediction = reply["predictions"][0]
    assert json.loads(prediction["trajectory"])[0]["code_ok"] is True and prediction["end"] == "turns"
    return time.perf_counter() - started, prediction


def row_error(prediction: dict) -> str:
    turns = json.loads(prediction["trajectory"])
    assert prediction["end"] == "error" and prediction["answer"] is None
    return turns[-1]["error"]


def test_served_model_records_its_caps_and_removes_a_killed_servers_scratch(served):
    folder = Path(mlflow.artifacts.download_artifacts(served.info.model_uri))
    settings = json.loads((folder / "artifacts" / "serving.json").read_text())
    assert settings["serving"] == {**ServingConfig().model_dump(mode="json"), **CAPS}
    # The killed server's folder is gone, the live process's is kept, and the server made its own.
    assert not served.stale.exists() and served.alive.is_dir()
    own = list(served.tmp.glob(f"arft-serving-{served.uvicorn.pid}-*"))
    assert len(own) == 1 and own[0].stat().st_mode & 0o777 == 0o711


def test_each_broken_cap_is_a_clear_error_and_memory_stays_bounded(served):
    normal, _ = good_request(served)
    before = tree_rss(served.uvicorn.pid)
    sampler = PeakRss(served.uvicorn.pid)
    try:
        refused = {
            "max_turns": rows_body([["What is written?", image_b64(upside_down_png()), "coding"]],
                                   {"max_turns": 100000}),
            "rows": rows_body([["What is written?", image_b64(upside_down_png()), "coding"]] * 5),
            # 1.5 MB of image bytes (base64 in the body): refused before anything is decoded or written.
            "bytes": rows_body([["What is written?", image_b64(os.urandom(1_500_000)), "coding"]]),
            "first_turn": rows_body([["What is written?", image_b64(upside_down_png()), "coding"]],
                                    {"first_turn": "x" * 4001}),
        }
        messages = {}
        for name, body in refused.items():
            status, reply = call(served.url, body)
            assert status == 400 and reply["error_code"] == "INVALID_PARAMETER_VALUE", (name, status, reply)
            messages[name] = reply["message"].rsplit("Error: ", 1)[-1]
        assert messages == {
            "max_turns": "max_turns 100000: must be 1 to 2 (the logged agent.max_turns)",
            "rows": "5 rows in the request; serving.max_rows is 4",
            "bytes": "a request of 1500022 bytes (questions, images, first_turn); serving.max_request_bytes is 1000000",
            "first_turn": "first_turn of 4001 characters; serving.max_question_chars is 4000"}

        # Per-row caps: error rows, the good row of the same request still runs.
        bomb = blank_png(13000, 13000)
        assert len(bomb) < 30_000  # 169 million pixels
        status, reply = call(served.url, rows_body(
            [["q" * 4001, image_b64(upside_down_png()), "coding"],
             ["What is written?", image_b64(bomb), "coding"], ["What is this?", image_b64(bomb), "coding"],
             ["What is written?", image_b64(upside_down_png()), "coding"]], {"first_turn": ROTATE, "max_turns": 1}))
        assert status == 200, reply
        rows = reply["predictions"]
        assert [row_error(r) for r in rows[:3]] == [
            "a question of 4001 characters; serving.max_question_chars is 4000",
            *["an image of 13000 x 13000 = 169000000 pixels; serving.max_image_pixels is 16777216"] * 2]
        assert rows[3]["end"] == "turns" and json.loads(rows[3]["trajectory"])[0]["code_ok"] is True
        # 3000 CJK characters: under the question cap, over the prompt-token cap (no generation runs).
        status, reply = call(served.url, rows_body([["猫" * 3000, image_b64(upside_down_png()), "coding"]]))
        assert status == 200, reply
        assert re.fullmatch(r"ValueError: the turn-1 prompt has \d+ tokens; serving.max_prompt_tokens is 1500",
                            row_error(reply["predictions"][0]))
        # A body well over the cap (16 MB): MLflow reads and parses all of it before the model refuses it.
        status, reply = call(served.url, rows_body([["What is written?", image_b64(os.urandom(12_000_000)),
                                                     "coding"]]))
        assert status == 400 and "serving.max_request_bytes is 1000000" in reply["message"]
    finally:
        peak = sampler.stop()
    after, _ = good_request(served)
    print(f"server tree RSS: {before / 1e9:.2f} GB before, peak {peak / 1e9:.2f} GB under the bad requests; "
          f"good request {normal:.2f} s before, {after:.2f} s after")
    assert peak < PEAK_RSS_BOUND


def test_a_request_past_its_deadline_ends_as_error_rows_and_frees_the_model(served):
    normal, _ = good_request(served)
    started = time.perf_counter()
    # No scripted turn: the model generates its 4096-token coding turn (16 s on an idle machine), cut at the deadline.
    status, reply = call(served.url, rows_body([["What is written?", image_b64(upside_down_png()), "coding"]] * 2))
    took = time.perf_counter() - started
    assert status == 200, reply
    assert [row_error(r) for r in reply["predictions"]] == \
        [f"DeadlineExceeded: deadline of {DEADLINE_S} s (serving.deadline_s) reached"] * 2
    after, _ = good_request(served)
    print(f"deadline request {took:.1f} s (deadline {DEADLINE_S} s); good request {normal:.2f} s before, "
          f"{after:.2f} s after")
    assert DEADLINE_S <= took < DEADLINE_S + 5 and after < normal + 3


def test_served_search_replays_the_logged_cache_only(served):
    trajectories = []
    for query in (CACHED_QUERY, "eiffel tower height"):
        status, reply = call(served.url, {"dataframe_split": {"columns": ["question", "task"],
                                                              "data": [["Who built it?", "search"]]},
                                          "params": {"first_turn": f"<think> Search. </think>\n<search> {query} "
                                                                   "</search>", "max_turns": 1}})
        assert status == 200, reply
        trajectories.append(json.loads(reply["predictions"][0]["trajectory"])[0])
    assert "Gustave Eiffel's company" in trajectories[0]["observation"]["text"]
    # Not in the evaluation's cache: replay mode does not search the index (nor record).
    searched = trajectories[1]
    assert searched["observation"]["text"] == "<information> Search failed. </information>"
    assert re.fullmatch(r"search failed: replay mode: no cached result for query 'eiffel tower height' \(k=4\) from "
                        r"backend 'local' in the cache cache\.sqlite", searched["error"])


def test_sigterm_stops_the_server_mid_request_and_removes_its_scratch(served):
    """Last: it stops the module's server."""
    replies = []
    request = threading.Thread(target=lambda: replies.append(call(served.url, rows_body(
        [["What is written?", image_b64(upside_down_png()), "coding"]]))))
    request.start()
    time.sleep(3)  # the sandbox has started and the model is generating
    own = list(served.tmp.glob(f"arft-serving-{served.uvicorn.pid}-*"))
    assert len(own) == 1 and list(own[0].glob("arft-predict-*")) and list(own[0].glob("arft-sandbox-*"))
    sent = time.perf_counter()
    os.killpg(served.proc.pid, signal.SIGTERM)
    served.uvicorn.wait(timeout=30)
    stopped = time.perf_counter() - sent
    request.join(timeout=30)
    print(f"SIGTERM to exit: {stopped:.2f} s")
    assert stopped < 10
    (status, reply), = replies
    assert status == 200 and row_error(reply["predictions"][0]) == \
        "DeadlineExceeded: the server is shutting down"
    assert sorted(p.name for p in served.tmp.iterdir()) == [served.alive.name]


# ---- in-process: the loop's deadline, the caps' settings
def slow_engine(seconds: float, output: str):
    """An engine that sleeps `seconds` per call (checking the deadline every 10 ms, as the HF back-end does per
    decode step), then writes `output` for every input."""
    from scripted import TextEngine, processor

    return TextEngine(processor(), lambda prompt, call: output, seconds)


def search_envs(tmp_path: Path, n: int):
    from arft_core.agent import AgentEnv, EnvItem
    from arft_core.agent.env import Tools

    return [AgentEnv(EnvItem(k, "search", f"Who is {k}?", ["x"]), Tools(), Config().agent, tmp_path / str(k))
            for k in range(n)]


def run(envs, engine, **loop) -> list[dict]:
    from arft_core.agent import run_episodes
    from scripted import transcript

    return [e.record for e in run_episodes(envs, engine, transcript(), max_new_tokens=64, **loop)]


def test_run_episodes_stops_every_item_at_the_deadline(tmp_path):
    from arft_core.agent.rollout import Deadline

    generator = slow_engine(0.3, "<think> t </think>\n<search> q </search>")  # searches fail: no tool, next turn
    started = time.monotonic()
    records = run(search_envs(tmp_path, 2), generator, deadline=Deadline(started + 0.5, "deadline of 0.5 s (test)"))
    took = time.monotonic() - started
    assert 0.5 <= took < 0.8 and generator.calls == 2  # the second call was cut short, its outputs not run
    assert [(r["end"], r["n_turns"], r["turns"][-1]["error"]) for r in records] == \
        [("error", 1, "DeadlineExceeded: deadline of 0.5 s (test) reached")] * 2

    stopping = iter([None, "the server is shutting down"])
    records = run(search_envs(tmp_path, 1), slow_engine(0, "<answer> x </answer>"),
                  deadline=Deadline(time.monotonic() + 60, "deadline", lambda: next(stopping)))
    assert records[0]["turns"][-1]["error"] == "DeadlineExceeded: the server is shutting down"


def test_run_episodes_check_prompt_ends_only_that_item(tmp_path):
    from scripted import processor

    def check(context, turn):
        if "Who is 1?" in processor().tokenizer.decode(context.ids):
            raise ValueError("too long")

    records = run(search_envs(tmp_path, 2), slow_engine(0, "<answer> x </answer>"), check_prompt=check)
    assert [(r["end"], r["pred_answer"], r["turns"][-1]["error"]) for r in records] == \
        [("answer", "x", None), ("error", None, "ValueError: too long")]


def test_serving_caps_come_from_the_logged_settings_and_the_environment():
    import pandas as pd

    from arft_core.registry import _check_request, serving_limits

    assert Config().serving.allow_first_turn is False and Config().serving.live_search is False
    limits = serving_limits({"max_rows": 4}, {"ARFT_SERVING_DEADLINE_S": "2.5", "ARFT_SERVING_ALLOW_FIRST_TURN": "1"})
    assert (limits.max_rows, limits.deadline_s, limits.allow_first_turn) == (4, 2.5, False)  # no policy override
    with pytest.raises(ValueError) as e:
        serving_limits({}, {"ARFT_SERVING_MAX_ROWS": "0"})
    assert str(e.value) == "serving settings: ARFT_SERVING_MAX_ROWS: Input should be greater than or equal to 1 " \
                           "(got '0')"
    with pytest.raises(MlflowException) as e:
        _check_request(pd.DataFrame({"question": ["q"]}), {"first_turn": "<answer> x </answer>"}, limits, 5)
    assert e.value.message == "the first_turn parameter is off for this model (it was logged with " \
                              "serving.allow_first_turn: false)" and e.value.get_http_status_code() == 400
