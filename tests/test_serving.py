"""The registered model is the agent that was evaluated: `log_agent` logs the tiny model (from a Trainer
`checkpoint-N` folder, its training state left out) with the evaluation's settings, its search corpus, index and
cache, and the arft_core code; `register_model` registers that LoggedModel. Loaded by alias, it runs the agent loop
with the real sandbox (bubblewrap) and the search tool; `arft serve` answers a MAT-Coding item over REST."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from arft_core.data.teacher import code_step, fix_code
from arft_core.integrity import DIGEST_TAG
from conftest import write_params
from servers import free_port, model_server, tracking_store

NAME = "arft-agent"
# A scripted first turn in the coding protocol: the teacher's own fix for an upside-down image (OpenCV reading
# 'path_to_input_image.jpg' and writing 'path_to_output_image.png').
ROTATE = code_step(["rotation180"], fix_code(["rotation180"], [{}]))
CACHED_QUERY = "who built the tower"  # in the evaluation's search cache only: replayed, never searched
TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "rng_state_1.pth", "trainer_state.json",
                  "training_args.bin")


def upside_down_png() -> bytes:
    image = Image.new("RGB", (120, 80), "white")
    ImageDraw.Draw(image).text((10, 30), "OTTER 42", fill="black")
    buf = io.BytesIO()
    image.rotate(180).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """The tiny model logged with log_agent into a temporary SQLite store and registered as @candidate."""
    from arft_core.config import load_config
    from arft_core.model.embedded import prepare_base_model
    from arft_core.registry import log_agent, register_model
    from arft_core.search import SearchResult
    from arft_core.search.cache import SearchCache

    root = tmp_path_factory.mktemp("serving")
    docs = [{"id": "eiffel", "title": "Eiffel Tower", "text": "The Eiffel Tower in Paris is 330 metres tall."},
            {"id": "otter", "title": "Otter", "text": "Otters are semiaquatic mammals."}]
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    # A scripted first turn and searches of the shipped index (recorded): both off unless logged so.
    cfg = load_config(write_params(root, {"search": {"corpus_path": "corpus.jsonl"},
                                          "serving": {"allow_first_turn": True, "live_search": True}}))
    # The evaluation's search cache (the serving cache's seed): one answer that no corpus search would give.
    cache = SearchCache(cfg.path("eval_search_cache"))
    cache.put("local", CACHED_QUERY, cfg.search.top_k,
              [SearchResult(title="Tower", snippet="Built by Gustave Eiffel's company.", source="cache")])
    cache.close()
    checkpoint = root / "checkpoints" / "checkpoint-3"
    prepare_base_model(cfg.model, checkpoint)
    for name in TRAINING_STATE:
        (checkpoint / name).write_bytes(b"training state")
    uri = f"sqlite:///{root}/mlflow.db"
    with tracking_store(uri):  # only this module sees the store
        experiment = mlflow.create_experiment("serving", artifact_location=(root / "artifacts").as_uri())
        started = time.perf_counter()
        with mlflow.start_run(experiment_id=experiment) as run:
            info = log_agent(checkpoint, cfg, params={"checkpoint.step": 3}, tags={"arft.kind": "agent"})
        result = register_model(info.model_uri, NAME, "candidate", {"eval.fingerprint": "f" * 16})
        print(f"log_agent + register_model: {time.perf_counter() - started:.1f} s")
        yield SimpleNamespace(uri=uri, root=root, cfg=cfg, info=info, result=result, run_id=run.info.run_id)


def test_logged_model_carries_the_model_settings_search_and_code(registered):
    from arft_core.evaluation import generation_eval
    from arft_core.stages.evaluate import registered_model_dir

    r, cfg = registered.result, registered.cfg
    assert r == {"name": NAME, "version": "1", "alias": "candidate", "model_uri": f"models:/{NAME}@candidate",
                 "model_id": registered.info.model_id, "run_id": registered.run_id}
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(NAME, "candidate")
    logged = mlflow.get_logged_model(r["model_id"])
    assert version.tags == {"eval.fingerprint": "f" * 16, DIGEST_TAG: logged.tags[DIGEST_TAG]}  # see test_integrity
    assert version.source == f"models:/{r['model_id']}"
    assert logged.params == {"checkpoint.step": "3"} and logged.tags["arft.kind"] == "agent"
    assert logged.source_run_id == registered.run_id

    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@candidate"))
    model = folder / "artifacts" / "model"
    shipped = {p.name for p in model.iterdir()}
    assert not shipped & set(TRAINING_STATE)
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "processor_config.json", "chat_template.jinja"} <= shipped
    assert registered_model_dir(f"models:/{NAME}@candidate").name == "model"  # what `arft eval --model` loads

    settings = json.loads((folder / "artifacts" / "serving.json").read_text())
    assert settings["agent"] == cfg.agent.for_training_mode(cfg.train.mode).model_dump(mode="json")
    assert settings["agent"]["transcript"] == "single_message"  # train.mode step, resolved
    assert settings["eval"] == generation_eval(cfg).model_dump(mode="json")
    assert settings["model"] == {"dtype": "float32", "min_pixels": cfg.model.min_pixels,
                                 "max_pixels": cfg.model.max_pixels}
    assert settings["sandbox"] == cfg.sandbox.model_dump(mode="json")
    assert {k: settings["search"][k] for k in ("backend", "corpus_path", "index_dir", "cache_path")} == \
        {"backend": "local", "corpus_path": "corpus.jsonl", "index_dir": "index", "cache_path": "cache.sqlite"}
    search = folder / "artifacts" / "search"
    assert (search / "corpus.jsonl").read_text() == (registered.root / "corpus.jsonl").read_text()
    assert (search / "index" / "meta.json").is_file() and (search / "cache.sqlite").is_file()

    code = folder / "code" / "arft_core"
    assert (code / "registry.py").read_text() == (Path(__file__).parents[1] / "arft_core" / "registry.py").read_text()
    assert (code / "sandbox" / "worker.py").is_file() and not list(code.rglob("__pycache__"))
    requirements = (folder / "requirements.txt").read_text()
    assert all(f"{d}==" in requirements for d in ("torch", "transformers", "opencv-python-headless", "tantivy"))
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in (model, search, code)}
    print("artifact sizes (bytes):", sizes)
    assert sizes["arft_core"] < 2_000_000


def sandbox_children() -> list[str]:
    """Command lines of this process's children that are sandbox workers (bubblewrap or worker.py)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and ("bwrap" in cmd or "worker.py" in cmd):
            found.append(cmd)
    return found


def test_loaded_agent_runs_the_loop_with_the_sandbox_and_search(registered):
    from arft_core.sandbox import SandboxPool

    with SandboxPool(registered.cfg.sandbox) as pool:
        assert pool.use_bwrap  # a real bubblewrap sandbox on this machine
    started = time.perf_counter()
    agent = mlflow.pyfunc.load_model(f"models:/{NAME}@candidate")
    loaded = time.perf_counter()
    rows = pd.DataFrame({"question": ["What is written on the card?", "What is written?"],
                         "image": [upside_down_png(), b"not an image"]})
    out = agent.predict(rows, params={"first_turn": ROTATE})
    print(f"load {loaded - started:.1f} s, predict {time.perf_counter() - loaded:.1f} s")
    assert list(out.columns) == ["answer", "trajectory", "end", "n_turns"]
    first, *rest = json.loads(out.trajectory[0])
    assert first["action"] == "code" and first["code_ok"] is True and first["error"] is None
    assert "cv2.rotate(img, cv2.ROTATE_180)" in first["code"]
    assert first["observation"] == {"text": "", "new_image": True}  # the rotated image, no path
    assert out.n_turns[0] == 2 == 1 + len(rest) and out.end[0] in ("turns", "answer")  # agent.max_turns: 2
    assert out.end[1] == "error" and out.answer[1] is None and out.n_turns[1] == 0
    assert "not a readable image" in json.loads(out.trajectory[1])[0]["error"]
    assert not sandbox_children()  # the sandbox is closed after each predict

    # Search: the evaluation's cached answer is replayed; another query searches the shipped index (and records).
    search = pd.DataFrame({"question": ["Who built it?", "How tall is it?"], "task": ["search", "search"]})
    queries = [f"<think> Search. </think>\n<search> {q} </search>" for q in (CACHED_QUERY, "eiffel tower height")]
    found = [json.loads(agent.predict(search.iloc[[i]], params={"first_turn": q, "max_turns": 1}).trajectory[0])[0]
             for i, q in enumerate(queries)]
    assert [t["action"] for t in found] == ["search", "search"] and found[0]["query"] == CACHED_QUERY
    assert "Gustave Eiffel's company" in found[0]["observation"]["text"]
    assert "330 metres" in found[1]["observation"]["text"]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        return json.load(urllib.request.urlopen(req, timeout=60))
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{e.code}: {e.read().decode()[:2000]}") from None


def test_arft_serve_answers_a_coding_item_over_rest(registered, tmp_path):
    port = free_port()
    started = time.perf_counter()
    proc = model_server([str(Path(sys.executable).parent / "arft"), "serve", f"models:/{NAME}@candidate",
                         "--params", str(registered.root / "params.yaml"), "--port", str(port)],
                        {**os.environ, "MLFLOW_TRACKING_URI": registered.uri}, port, tmp_path / "serve.log")
    try:
        up = time.perf_counter()
        image = base64.b64encode(upside_down_png()).decode()
        body = {"dataframe_split": {"columns": ["question", "image", "task"],
                                    "data": [["What is written on the card?", image, "coding"]]},
                "params": {"first_turn": ROTATE}}
        prediction = post(f"http://127.0.0.1:{port}/invocations", body)["predictions"][0]
        print(f"server up in {up - started:.1f} s, request {time.perf_counter() - up:.1f} s")
        assert set(prediction) == {"answer", "trajectory", "end", "n_turns"} and "answer" in prediction
        turns = json.loads(prediction["trajectory"])
        # The base64 text arrived as the image's bytes: the code ran on it and wrote a new image.
        assert turns[0]["action"] == "code" and turns[0]["code_ok"] is True
        assert turns[0]["observation"]["new_image"] is True and prediction["n_turns"] == 2
        # `inputs` (column -> values) leaves a binary column as base64 text; the agent decodes it.
        body = {"inputs": {"question": ["What is written?"], "image": [image]},
                "params": {"first_turn": ROTATE, "max_turns": 1}}
        prediction = post(f"http://127.0.0.1:{port}/invocations", body)["predictions"][0]
        assert json.loads(prediction["trajectory"])[0]["code_ok"] is True and prediction["end"] == "turns"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # arft serve and the mlflow server it started
            proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
